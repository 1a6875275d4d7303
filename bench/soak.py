"""Soak bench: the real server under a long run of mixed traffic. Does it stay up, answer every
request as it should, and hold its memory and descriptors?

    python -m bench.soak --minutes 15 --write bench/SOAK.md     # make bench-soak

One server (`python -m app`, the default model, every setting at its default) and C closed-loop
clients, each picking a request kind at random for each request:
  good       POST /caption as users send it: greedy (raw body), beam 3 with 3 captions, grounded,
             sampling 3 captions, mirror view with attention (multipart); POST /captions of 1-8
             images; the Open Inference Protocol's infer (JSON, base64, grounded)
  bad        a truncated JPEG (400), bytes that are no image (400), grounded without a beam (422)
  abandoned  a good request cut after half its body, or sent whole, and the connection closed at
             once: the server sees the client vanish mid-upload or while its request is queued
The pictures are the wild split's (64-640 px, square and not, PNG or the renderer's JPEG file), so
batch shapes, image sizes and decode lengths keep changing, as with real users.
Every window it samples the server's RSS, open descriptors and threads, and checks each answer.
Targets (printed against the measures): every answer a JSON object with the status its kind
expects, every image of a /captions 200 captioned, no client error, no 5xx (the server's own
count included, which sees the abandoned requests too), RSS at the end within
SOAK_RSS_GROWTH_MIB of the first window's end, descriptors back to their idle count once the
clients have gone, the server alive throughout and answering after.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import math
import os
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from bench.harness import (
    DEFAULT_BUNDLE,
    HOST,
    Connection,
    Server,
    http_get,
    metric_samples,
    multipart_form,
    open_descriptors,
    percentile,
    post_request,
    rss_mib,
    thread_count,
    write_latest_run,
)

SOAK_RSS_GROWTH_MIB = 100  # the memory target: growth allowed after the first window
EXPECTED = {  # request kind -> the status it must get
    "greedy": 200,
    "beam_n3": 200,
    "grounded": 200,
    "sample_n3": 200,
    "mirror_attention": 200,
    "batch": 200,
    "oip": 200,
    "truncated_jpeg": 400,
    "not_an_image": 400,
    "bad_options": 422,
}
GOOD = [kind for kind, status in EXPECTED.items() if status == 200]
ABANDONED = ("abandoned_mid_body", "abandoned_after_sending")
# Mostly good requests, as a service's traffic is; each bad or abandoned kind a third as often.
WEIGHTS = {kind: 3 if kind in GOOD else 1 for kind in [*EXPECTED, *ABANDONED]}
CLIENT_ERRORS = (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, asyncio.TimeoutError, ValueError)


def pictures(count: int, first: int) -> list[tuple[bytes, str]]:
    """(file bytes, content type) of wild-split pictures, cycling through its variations."""
    from PIL import Image

    from training.datasets.shapes_wide import VARIATIONS, load_wide_split

    out = []
    names = list(VARIATIONS)
    for index in range(count):
        record = load_wide_split("test", 1, variation=names[index % len(names)], first=first + index)[0]
        if record.encoded is not None:
            out.append((record.encoded, "image/jpeg"))
        else:
            buffer = io.BytesIO()
            Image.fromarray(record.pixels).save(buffer, "PNG")
            out.append((buffer.getvalue(), "image/png"))
    if not any(content_type == "image/jpeg" for _, content_type in out):
        raise ValueError("the pictures hold no JPEG to truncate; ask for more (--pictures)")
    return out


def build_request(kind: str, rng: random.Random, pool: list[tuple[bytes, str]]) -> bytes:
    data, content_type = rng.choice(pool)
    if kind == "greedy":
        return post_request("/caption", data, content_type)
    if kind == "batch":
        return post_request("/captions", *multipart_form("images", rng.choices(pool, k=rng.randint(1, 8))))
    if kind == "oip":
        images = [base64.b64encode(image).decode() for image, _ in rng.choices(pool, k=rng.randint(1, 4))]
        request = {
            "inputs": [{"name": "image", "datatype": "BYTES", "shape": [len(images)], "data": images}],
            "parameters": {"strategy": "beam", "grounded": True},
        }
        return post_request("/v2/models/default/infer", json.dumps(request).encode(), "application/json")
    if kind == "truncated_jpeg":
        jpeg = rng.choice([image for image, content_type in pool if content_type == "image/jpeg"])
        return post_request("/caption", jpeg[: len(jpeg) // 2], "image/jpeg")
    if kind == "not_an_image":
        # A fixed opening: random bytes alone now and then begin with a signature the server names
        # (JPEG XL, SGI, ...) and get 415 instead of 400.
        return post_request("/caption", b"not an image " + rng.randbytes(rng.randint(10, 5000)), "image/png")
    query = {
        "beam_n3": "strategy=beam&num_captions=3",
        "grounded": "strategy=beam&grounded=true",
        "sample_n3": f"strategy=sample&num_captions=3&seed={rng.randint(0, 2**32 - 1)}",
        "mirror_attention": "mirror_view=true&attention=true",
        "bad_options": "grounded=true",
    }[kind]
    return post_request(f"/caption?{query}", *multipart_form("image", [(data, content_type)]))


async def abandon(port: int, raw: bytes, mid_body: bool) -> None:
    """Sends a request (its head and half its body, or all of it) and closes the connection at once."""
    head, body = raw.split(b"\r\n\r\n", 1)
    _, writer = await asyncio.open_connection(HOST, port)
    try:
        writer.write(head + b"\r\n\r\n" + (body[: len(body) // 2] if mid_body else body))
        await writer.drain()
    finally:  # closed whether or not the write went through: the bench holds no socket of its own
        writer.transport.abort()


@dataclass
class Window:
    end_s: float = 0.0
    rss_mib: float = 0.0
    descriptors: int = 0
    threads: int = 0
    answers: Counter = field(default_factory=Counter)  # (kind, status) -> count
    latencies_s: list[float] = field(default_factory=list)  # the 200s
    not_json: int = 0  # answers whose body is not a JSON object
    images_failed: int = 0  # images without a caption inside /captions 200s
    abandoned: int = 0
    client_errors: int = 0  # connection failures and timeouts of the good and bad kinds


async def soak(server: Server, pool, clients: int, seconds: float, window_s: float) -> tuple[list[Window], bool]:
    """The windows, and whether the server was alive at every sample."""
    port, pid = server.port, server.process.pid
    windows: list[Window] = []
    current = Window()
    alive = True
    started = time.perf_counter()
    stop_at = started + seconds
    kinds, weights = list(WEIGHTS), list(WEIGHTS.values())

    async def client(index: int) -> None:
        rng = random.Random(index)
        connection = Connection(port)
        while time.perf_counter() < stop_at:
            kind = rng.choices(kinds, weights)[0]
            if kind in ABANDONED:
                try:
                    raw = build_request(rng.choice(GOOD), rng, pool)
                    await asyncio.wait_for(abandon(port, raw, kind == "abandoned_mid_body"), 120)
                    current.abandoned += 1
                except CLIENT_ERRORS:
                    current.client_errors += 1
                continue
            raw = build_request(kind, rng, pool)
            sent = time.perf_counter()
            try:
                status, body = await asyncio.wait_for(connection.request(raw), 120)
            except CLIENT_ERRORS:
                connection.close()
                current.client_errors += 1
                continue
            window = current  # the window the answer lands in (the sampler rebinds `current`)
            window.answers[(kind, status)] += 1
            try:
                answer = json.loads(body)
            except ValueError:
                answer = None
            if not isinstance(answer, dict):
                window.not_json += 1
            elif kind == "batch" and status == 200:  # one captioned result per image sent
                results = answer.get("results", [])
                missing = raw.count(b'name="images"') - len(results)
                window.images_failed += max(missing, 0) + sum(not result.get("ok") for result in results)
            if status == 200:
                window.latencies_s.append(time.perf_counter() - sent)
        connection.close()

    async def sampler() -> None:
        nonlocal current, alive
        while time.perf_counter() < stop_at:
            await asyncio.sleep(min(window_s, max(0.0, stop_at - time.perf_counter())))
            alive = alive and server.process.poll() is None
            current.end_s = time.perf_counter() - started
            try:
                if alive:
                    current.rss_mib, current.threads = rss_mib(pid), thread_count(pid)
                    current.descriptors = open_descriptors(pid)
            except OSError:  # it died since the poll
                alive = False
            windows.append(current)
            current = Window()

    await asyncio.gather(sampler(), *(client(i) for i in range(clients)))
    # Answers to requests still in flight when the last window closed count in the last window.
    last = windows[-1]
    last.answers.update(current.answers)
    last.latencies_s += current.latencies_s
    for name in ("not_json", "images_failed", "abandoned", "client_errors"):
        setattr(last, name, getattr(last, name) + getattr(current, name))
    return windows, alive


async def after_the_run(server: Server, pool) -> dict:
    """Once the clients have gone: descriptors, readiness, one caption, and the server's own count of
    answers by status (abandoned requests included: the bench never reads theirs)."""
    await asyncio.sleep(10)  # the server's own deadlines close what the abandoned clients left
    after = {"fds": 10**6, "ready": 0, "caption": 0, "server_statuses": Counter()}
    connection = Connection(server.port)
    try:
        after["fds"] = open_descriptors(server.process.pid)
        after["ready"] = (await asyncio.wait_for(http_get(server.port, "/health/ready"), 10))[0]
        after["caption"] = (
            await asyncio.wait_for(connection.request(build_request("greedy", random.Random(0), pool)), 30)
        )[0]
        _, metrics = await asyncio.wait_for(http_get(server.port, "/metrics"), 10)
        for labels, count in metric_samples(metrics, "captioning_http_requests_total"):
            after["server_statuses"][int(labels["status"])] += int(count)
    except CLIENT_ERRORS:
        pass  # a server that does not answer leaves the zeros, which fail the checks
    finally:
        connection.close()
    return after


def unexpected_statuses(answers: Counter) -> int:
    return sum(n for (kind, status), n in answers.items() if status != EXPECTED[kind])


def server_errors(answers: Counter) -> int:
    return sum(n for (_, status), n in answers.items() if status >= 500)


def report(windows: list[Window], alive: bool, idle: dict, after: dict, args) -> tuple[str, bool]:
    lines = [
        "| minute | answers | 200 | p50 / p99 of the 200s (s) | unexpected status | 5xx | not JSON | abandoned "
        "| client errors | RSS (MiB) | descriptors | threads |",
        "|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    totals = Counter()
    for window in windows:
        totals.update(window.answers)
        lines.append(
            f"| {window.end_s / 60:.1f} | {sum(window.answers.values())} | {len(window.latencies_s)} "
            f"| {percentile(window.latencies_s, 50):.2f} / {percentile(window.latencies_s, 99):.2f} "
            f"| {unexpected_statuses(window.answers)} | {server_errors(window.answers)} | {window.not_json} "
            f"| {window.abandoned} | {window.client_errors} | {window.rss_mib:.1f} | {window.descriptors} "
            f"| {window.threads} |"
        )
    unexpected = unexpected_statuses(totals)
    bench_5xx = server_errors(totals)
    server_statuses = after["server_statuses"]
    server_5xx = sum(n for status, n in server_statuses.items() if status >= 500)
    not_json = sum(window.not_json for window in windows)
    images_failed = sum(window.images_failed for window in windows)
    client_errors = sum(window.client_errors for window in windows)
    growth = windows[-1].rss_mib - windows[0].rss_mib if len(windows) >= 2 else math.inf  # one window: no growth seen
    # The server's count must cover every answer the bench got, or it was not read (a failed
    # /metrics, a renamed series) and its "no 5xx" would mean nothing.
    server_counted = sum(server_statuses.values()) >= sum(totals.values()) > 0
    checks = [
        ("answers checked / not a JSON object", f"{sum(totals.values())} / {not_json}", "0", not_json == 0),
        ("answers with a status other than their kind's", str(unexpected), "0", unexpected == 0),
        ("images failed inside /captions 200s", str(images_failed), "0", images_failed == 0),
        ("client errors (connection failures, 120 s timeouts)", str(client_errors), "0", client_errors == 0),
        (
            "5xx: answered to the bench / counted by the server (abandoned requests included)",
            f"{bench_5xx} / " + (str(server_5xx) if server_counted else "not read"),
            "0 / 0",
            server_counted and server_5xx == 0 and bench_5xx == 0,
        ),
        (
            "RSS: idle / end of the first window / end",
            f"{idle['rss']:.1f} / {windows[0].rss_mib:.1f} / {windows[-1].rss_mib:.1f} MiB (growth {growth:+.1f})",
            f"growth <= {SOAK_RSS_GROWTH_MIB} MiB",
            growth <= SOAK_RSS_GROWTH_MIB,
        ),
        (
            "descriptors: idle / most at a window's end / 10 s after the clients stopped",
            f"{idle['fds']} / {max(window.descriptors for window in windows)} / {after['fds']}",
            "back to idle (+2)",
            after["fds"] <= idle["fds"] + 2,
        ),
        (
            "server alive at every sample; GET /health/ready and a greedy caption after the run",
            f"{'yes' if alive else 'no'}; {after['ready']}, {after['caption']}",
            "yes; 200, 200",
            alive and after["ready"] == 200 and after["caption"] == 200,
        ),
    ]
    by_kind = ", ".join(
        f"{kind} {sum(n for (k, _), n in totals.items() if k == kind)}"
        + "".join(
            f" ({status}: {n})" for (k, status), n in sorted(totals.items()) if k == kind and status != EXPECTED[kind]
        )
        for kind in EXPECTED
    )
    summary = ["| check | measured | target | met |", "|---|---|---|---|"] + [
        f"| {name} | {value} | {target} | {'yes' if ok else '**no**'} |" for name, value, target, ok in checks
    ]
    bundle = DEFAULT_BUNDLE.relative_to(DEFAULT_BUNDLE.parents[2])
    text = (
        f"`python -m bench.soak --minutes {args.minutes:g} --clients {args.clients}` on {bundle}, "
        f"{args.pictures} pictures. Answers by kind (a status other than the kind's in brackets): {by_kind}; "
        f"requests abandoned: {sum(window.abandoned for window in windows)}. The server's own count of its "
        f"answers by status: {dict(sorted(server_statuses.items()))} (499: a client that went before its answer)."
        f"\n\n" + "\n".join(lines) + "\n\n" + "\n".join(summary) + "\n"
    )
    return text, all(ok for *_, ok in checks)


async def main_async(args) -> int:
    pool = pictures(args.pictures, first=50_000)  # indices no report or dev set uses
    server = Server("continuous", DEFAULT_BUNDLE, {}, Path(args.log))
    try:
        await server.wait_ready()
        await server.wait_warm()
        idle = {"rss": rss_mib(server.process.pid), "fds": open_descriptors(server.process.pid)}
        windows, alive = await soak(server, pool, args.clients, args.minutes * 60, args.window_s)
        after = await after_the_run(server, pool)
    finally:
        code, _ = server.stop()
    text, ok = report(windows, alive, idle, after, args)
    machine = f"{os.cpu_count()} CPU cores, load average {os.getloadavg()[0]:.1f} at the end"
    text = f"Measured {time.strftime('%Y-%m-%d %H:%M', time.gmtime())} UTC, {machine}. " + text
    text += f"\nServer exit code after SIGTERM: {code} (uvicorn re-raises the signal after a clean shutdown).\n"
    print(text)
    if args.write:
        write_latest_run(Path(args.write), "# Soak bench", text)
    return 0 if ok else 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=15)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--window-s", type=float, default=60)
    parser.add_argument("--pictures", type=int, default=140, help="distinct pictures the clients draw from")
    parser.add_argument("--log", default="/tmp/soak-server.log")
    parser.add_argument("--write", help="also write the report to this file (e.g. bench/SOAK.md)")
    args = parser.parse_args()
    raise SystemExit(asyncio.run(main_async(args)))


if __name__ == "__main__":
    main()
