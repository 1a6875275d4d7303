"""Attack bench: the real server (`python -m app`) against hostile clients; prints one table.

    python -m bench.attack                 # make bench-attack; ~2-3 minutes
    python -m bench.attack --write bench/ATTACK.md

Phases, each against the same server (model_artifacts/default, API_KEY set):
  memory     C clients at once, each POST /captions with N 40-megapixel 16-bit grey PNGs (~80 KB
             each, 80 MB decoded): peak RSS during, settled RSS 20 s after, against idle RSS
  slowloris  256 keyless clients trickling a body at 10 B/s beside one keyed client captioning in a
             loop: the keyed client's success rate and p95; how fast each keyless client got its
             401 (its body held back)
  idle       N connections of each kind that holds a connection without a request to wait for
             (HOLD_KINDS: silent; trickling a header line a second; a CRLF a second after an answer;
             trickling the rest of a body answered 401), beside one keyed client: how many the
             server has closed HEADER_TIMEOUT_S + 3 s later (its open descriptors before, during and
             after), the keyed client's success
  framing    a Content-Length of 50 MB (413 before the body), a Content-Length larger than the
             body sent (408 once the body deadline passes)
  crafted    4 TIFFs of a million one-row strips (4 MB each) and 16 PNGs whose 63 text chunks
             inflate to 63 MB (186 KB each), at once, beside a keyed client captioning in a loop:
             their answers, peak RSS against idle, the keyed client's p95
  lockout    64 keyed connections from one address that send a POST's headers and then nothing,
             reconnecting whenever answered, beside a keyed client from another address captioning
             in a loop: its success
  decodes    8 /captions of 16 40 MP PNGs kept in flight from one address (valid, costly decodes)
             while a keyed client from another address sends a 12 MP JPEG photo at a time: the
             photo's latency alone and beside them
  burst      16 /captions of 16 small PNGs kept in flight from one address (256 queue places)
             while a keyed client from another address captions a small PNG at a time: its
             latency alone and beside them
  fill       the same with 32 /captions (512 images, twice the queue): the other client's answers
             (one address holds at most CLIENT_QUEUE_SHARE of the queue) and the flood's
  bodies     100 clients, each from its own address, each uploading a 9 MB PNG (a small picture
             and a 9 MB private chunk) at once: the answers, peak RSS against idle
  sigterm    keyed clients in a loop plus keyed uploads stalled mid-body, then SIGTERM: every
             answer after it, and the exit code
Every answer of every phase is checked for a JSON body; the non-JSON ones are listed.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.harness import multipart_form, open_descriptors, percentile, write_latest_run

ROOT = Path(__file__).resolve().parents[1]
API_KEY = "attack-bench-key"
GIB = 2**30


@dataclass
class Answer:
    status: int
    json: bool | None  # None: the body was cut off (connection reset), so it could not be judged
    seconds: float
    where: str
    captioned: int = 0  # /captions: images with a caption in the answer


@dataclass
class Log:
    answers: list[Answer] = field(default_factory=list)

    def add(self, answer: Answer) -> Answer:
        self.answers.append(answer)
        return answer

    def non_json(self) -> list[Answer]:
        return [a for a in self.answers if a.status and a.json is False]

    def cut_off(self) -> list[Answer]:
        return [a for a in self.answers if a.status and a.json is None]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def grey16_png(side_w=6400, side_h=6250) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("I;16", (side_w, side_h), 20000).save(buffer, "PNG")
    return buffer.getvalue()


def small_png() -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), (200, 40, 40)).save(buffer, "PNG")
    return buffer.getvalue()


def many_strips_tiff(strips: int, width: int = 8) -> bytes:
    """A valid grey TIFF of `strips` one-row strips, offsets and byte counts as 2-byte values: 4
    bytes a strip, so a million fit in 4 MB (Pillow builds an object per strip when it opens one)."""
    import struct

    entries = [(256, 3, 1, width), (257, 4, 1, strips), (258, 3, 1, 8), (259, 3, 1, 1), (262, 3, 1, 1)]
    entries += [(273, 3, strips, None), (277, 3, 1, 1), (278, 3, 1, 1), (279, 3, strips, None)]
    tables_at = 8 + 2 + 12 * len(entries) + 4
    table, directory = b"", b""
    for tag, kind, count, value in entries:
        if value is None:  # offsets: every strip reads the header's first bytes; counts: a row each
            directory += struct.pack("<HHII", tag, kind, count, tables_at + len(table))
            table += struct.pack("<H", 8 if tag == 273 else width) * count
        elif kind == 3:
            directory += struct.pack("<HHIHH", tag, kind, count, value, 0)
        else:
            directory += struct.pack("<HHII", tag, kind, count, value)
    return b"II*\x00" + struct.pack("<I", 8) + struct.pack("<H", len(entries)) + directory + b"\0\0\0\0" + table


def png_chunk(kind: bytes, body: bytes) -> bytes:
    import struct
    import zlib

    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def with_chunks(png: bytes, chunks: bytes, before: bytes = b"IDAT") -> bytes:
    """`png` with `chunks` inserted before its first `before` chunk (IDAT: where programs write
    metadata; IEND: after the pixels)."""
    at = png.index(before) - 4
    return png[:at] + chunks + png[at:]


def text_bomb_png(chunks: int = 63, inflated: int = 2**20, side: int = 6000) -> bytes:
    """A white side x side PNG with `chunks` zTXt chunks, each inflating to `inflated` zeros."""
    import zlib

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (side, side), "white").save(buffer, "PNG")
    text = b"".join(png_chunk(b"zTXt", b"note%d\0\0" % i + zlib.compress(bytes(inflated), 9)) for i in range(chunks))
    return with_chunks(buffer.getvalue(), text)


def multipart(field_name: str, files: list[bytes]) -> tuple[bytes, str]:
    return multipart_form(field_name, [(data, "image/png") for data in files])


async def read_answer(reader: asyncio.StreamReader, timeout: float) -> tuple[int, bool | None, int]:
    """(status, body is JSON, images captioned) of one HTTP/1.1 response; (0, False, 0) if none came;
    JSON-ness None if the connection was cut before the body was complete."""
    try:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
    except (TimeoutError, asyncio.IncompleteReadError, ConnectionError):
        return 0, False, 0
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
    length = int(headers.get("content-length", "0"))
    try:
        body = await asyncio.wait_for(reader.readexactly(length), timeout) if length else b""
    except (TimeoutError, asyncio.IncompleteReadError, ConnectionError):
        return status, None, 0
    try:
        is_json = headers.get("content-type", "").startswith("application/json") and isinstance(json.loads(body), dict)
    except ValueError:
        is_json = False
    captioned = sum(bool(r.get("ok")) for r in json.loads(body).get("results", [])) if is_json else 0
    return status, is_json, captioned


async def request(
    port: int,
    path: str,
    body: bytes,
    content_type: str,
    *,
    key: bool,
    where: str,
    log: Log,
    timeout: float = 60.0,
    declared_length: int | None = None,
    trickle_bps: float | None = None,
    stall_after: int | None = None,
    source: str | None = None,
) -> Answer:
    """One POST over its own connection. trickle_bps: send the body at this rate; stall_after: send
    that many body bytes, then nothing more (the answer is awaited meanwhile); source: the client's
    address (another loopback address is another client to the server)."""
    started = time.perf_counter()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0) if source else None)
    except OSError:
        return log.add(Answer(0, False, time.perf_counter() - started, where))
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {declared_length if declared_length is not None else len(body)}\r\n"
        + (f"X-API-Key: {API_KEY}\r\n" if key else "")
        + "Connection: close\r\n\r\n"
    ).encode()
    answer_task = asyncio.ensure_future(read_answer(reader, timeout))
    try:
        writer.write(head)
        if stall_after is not None:
            writer.write(body[:stall_after])
        elif trickle_bps:
            for offset in range(0, len(body), 10):
                if answer_task.done():
                    break
                writer.write(body[offset : offset + 10])
                await asyncio.wait({answer_task}, timeout=10 / trickle_bps)
        else:
            writer.write(body)
        await writer.drain()
    except ConnectionError:
        pass
    status, is_json, captioned = await answer_task
    writer.close()
    return log.add(Answer(status, is_json, time.perf_counter() - started, where, captioned))


class Server:
    def __init__(self, bundle: Path, env: dict[str, str], root: Path = ROOT):
        self.port = free_port()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "app"],
            cwd=root,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env={
                **os.environ,
                "PYTHONPATH": str(root),
                "HOST": "127.0.0.1",
                "PORT": str(self.port),
                "ARTIFACTS_DIR": str(bundle),
                "API_KEY": API_KEY,
                "LOG_LEVEL": "WARNING",
                "TF_CPP_MIN_LOG_LEVEL": "3",
                **env,
            },
        )

    def wait_ready(self, timeout: float = 180) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise SystemExit(f"server exited with {self.process.returncode}")
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/health/ready", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        raise SystemExit("server not ready")


async def sample_peak(pid: int, stop: asyncio.Event) -> int:
    peak = 0
    while not stop.is_set():
        peak = max(peak, rss_bytes(pid))
        await asyncio.sleep(0.05)
    return peak


async def memory_phase(server: Server, log: Log, clients: int, images: int, settle_s: float) -> dict:
    idle = rss_bytes(server.process.pid)
    body, content_type = multipart("images", [grey16_png()] * images)
    stop = asyncio.Event()
    sampler = asyncio.ensure_future(sample_peak(server.process.pid, stop))
    started = time.perf_counter()
    answers = await asyncio.gather(
        *(
            request(server.port, "/captions", body, content_type, key=True, where="memory", log=log, timeout=120)
            for _ in range(clients)
        )
    )
    took = time.perf_counter() - started
    await asyncio.sleep(settle_s)
    stop.set()
    peak = await sampler
    settled = rss_bytes(server.process.pid)
    return {
        "idle": idle,
        "peak": peak,
        "settled": settled,
        "took": took,
        "statuses": sorted(a.status for a in answers),
        "captioned": sum(a.captioned for a in answers),
    }


async def slowloris_phase(server: Server, log: Log, slow_clients: int, seconds: float) -> dict:
    body, content_type = multipart("image", [small_png()])
    big, _ = multipart("image", [b"\0" * 200_000])
    slow = [
        asyncio.ensure_future(
            request(
                server.port,
                "/caption",
                big,
                content_type,
                key=False,
                where="keyless slow",
                log=log,
                timeout=seconds + 20,
                trickle_bps=10,
            )
        )
        for _ in range(slow_clients)
    ]
    await asyncio.sleep(0.5)
    keyed: list[Answer] = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        keyed.append(
            await request(server.port, "/caption", body, content_type, key=True, where="keyed", log=log, timeout=30)
        )
    keyless = await asyncio.gather(*slow)
    latencies = sorted(a.seconds for a in keyed)
    ok = [a for a in keyed if a.status == 200]
    return {
        "keyed": len(keyed),
        "keyed_ok": len(ok),
        "p95": latencies[int(0.95 * (len(latencies) - 1))],
        "keyless_statuses": sorted({a.status for a in keyless}),
        "keyless_p95": sorted(a.seconds for a in keyless)[int(0.95 * (len(keyless) - 1))],
    }


HOLD_KINDS = {  # how each connection of the idle phase tries to stay open without a request the server must answer
    "silent": "send nothing",
    "headers": "a request line, then a header line a second",
    "crlf": "a request answered, then a CRLF a second",
    "body": "a keyless POST declaring 9 MiB, answered 401, then 100 body bytes a second",
}


async def idle_connections_phase(server: Server, log: Log, count: int, header_timeout_s: float) -> dict:
    """`count` connections of each HOLD_KINDS kind, never finishing a request the server would
    have to wait for; a keyed client captions meanwhile. Closed by the server = EOF read."""
    body, content_type = multipart("image", [small_png()])
    before = open_descriptors(server.process.pid)

    async def hold(kind: str) -> float | None:
        """Seconds until the server closed the connection; None if it was still open at the end."""
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        except OSError:
            return 0.0  # not even accepted
        opened = time.monotonic()
        try:
            if kind == "headers":
                writer.write(b"POST /caption HTTP/1.1\r\nHost: 127.0.0.1\r\n")
            elif kind in ("crlf", "body"):
                writer.write(
                    b"GET /health/live HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
                    if kind == "crlf"
                    else b"POST /caption HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 9437184\r\n\r\n"
                )
                status, is_json, _ = await read_answer(reader, 10)
                log.add(Answer(status, is_json, time.monotonic() - opened, f"idle-{kind}"))
                opened = time.monotonic()  # from the answer on
            for line in range(int(header_timeout_s) + 3):
                if kind != "silent":
                    writer.write({"headers": f"X-Slow-{line}: 1\r\n".encode(), "crlf": b"\r\n"}.get(kind, b"x" * 100))
                try:
                    await asyncio.wait_for(reader.read(65536), 1.0)  # b"" (or a 408) once closed
                    return time.monotonic() - opened
                except asyncio.TimeoutError:
                    continue
                except OSError:
                    return time.monotonic() - opened
            return None
        except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError):
            return time.monotonic() - opened
        finally:
            writer.close()

    holders = {kind: [asyncio.ensure_future(hold(kind)) for _ in range(count)] for kind in HOLD_KINDS}
    everyone = [h for group in holders.values() for h in group]
    await asyncio.sleep(1.0)
    during = open_descriptors(server.process.pid)
    keyed: list[Answer] = []
    while not all(h.done() for h in everyone):
        keyed.append(
            await request(server.port, "/caption", body, content_type, key=True, where="keyed", log=log, timeout=30)
        )
    closed = {kind: [h.result() for h in group] for kind, group in holders.items()}
    await asyncio.sleep(0.5)
    return {
        "count": count,
        "closed": {kind: sum(c is not None for c in times) for kind, times in closed.items()},
        "closed_after": sorted(c for times in closed.values() for c in times if c is not None),
        "fds": (before, during, open_descriptors(server.process.pid)),
        "keyed": len(keyed),
        "keyed_ok": sum(a.status == 200 for a in keyed),
    }


async def framing_phase(server: Server, log: Log) -> dict:
    body, content_type = multipart("image", [small_png()])
    huge = await request(
        server.port,
        "/caption",
        body[:100],
        content_type,
        key=True,
        where="content-length 50 MB",
        log=log,
        declared_length=50 * 2**20,
        stall_after=100,
        timeout=30,
    )
    short = await request(
        server.port,
        "/caption",
        body,
        content_type,
        key=True,
        where="content-length > body",
        log=log,
        declared_length=len(body) + 1000,
        timeout=60,
    )
    keyless_held = await request(
        server.port,
        "/caption",
        body,
        content_type,
        key=False,
        where="keyless, body held",
        log=log,
        declared_length=9 * 2**20,
        stall_after=0,
        timeout=10,
    )
    return {"huge": huge, "short": short, "keyless_held": keyless_held}


async def keyed_loop(server: Server, log: Log, stop: asyncio.Event, where: str, source: str) -> list[Answer]:
    """A keyed client from `source` captioning a small PNG in a loop until `stop`."""
    body, content_type = multipart("image", [small_png()])
    answers = []
    while not stop.is_set():
        answers.append(
            await request(
                server.port, "/caption", body, content_type, key=True, where=where, log=log, timeout=30, source=source
            )
        )
    return answers


async def crafted_phase(server: Server, log: Log) -> dict:
    """Small files whose header step cost seconds and hundreds of MB before MAX_TIFF_STRIPS and
    MAX_PNG_TEXT_BYTES (docs/HARDENING.md, round 41)."""
    tiff, png = many_strips_tiff(1_000_000), text_bomb_png()
    idle = rss_bytes(server.process.pid)
    stop = asyncio.Event()
    sampler = asyncio.ensure_future(sample_peak(server.process.pid, stop))
    loop = asyncio.ensure_future(keyed_loop(server, log, stop, "crafted: keyed", "127.0.0.2"))
    await asyncio.sleep(1)
    crafted = await asyncio.gather(
        *(  # each from an address of its own: MAX_UPLOADS_PER_CLIENT is not what is measured here
            request(
                server.port,
                "/caption",
                data,
                kind,
                key=True,
                where=f"crafted {kind}",
                log=log,
                timeout=120,
                source=f"127.0.3.{1 + i}",
            )
            for i, (data, kind) in enumerate([(tiff, "image/tiff")] * 4 + [(png, "image/png")] * 16)
        )
    )
    await asyncio.sleep(1)
    stop.set()
    keyed, peak = await loop, await sampler
    return {
        "statuses": sorted({(a.where.split()[1], a.status) for a in crafted}),
        "slowest": max(a.seconds for a in crafted),
        "idle": idle,
        "peak": peak,
        "keyed": len(keyed),
        "keyed_ok": sum(a.status == 200 for a in keyed),
        "keyed_p95": percentile([a.seconds for a in keyed], 95),
    }


async def lockout_phase(server: Server, log: Log, connections: int, seconds: float) -> dict:
    """Idle uploads from one address, renewed as soon as they are answered (a 408 after
    BODY_TIMEOUT_S, or at once when refused), beside a keyed client from another address."""
    body, content_type = multipart("image", [small_png()])
    stop = asyncio.Event()
    opened = [0]

    async def hold() -> None:
        stopped = asyncio.ensure_future(stop.wait())
        while not stop.is_set():
            opened[0] += 1
            answer = asyncio.ensure_future(
                request(
                    server.port,
                    "/caption",
                    body,
                    content_type,
                    key=True,
                    where="lockout: idle upload",
                    log=log,
                    declared_length=2**20,
                    stall_after=0,
                    timeout=seconds + 15,
                )
            )
            await asyncio.wait({answer, stopped}, return_when=asyncio.FIRST_COMPLETED)
            if not answer.done():
                answer.cancel()

    holders = [asyncio.ensure_future(hold()) for _ in range(connections)]
    await asyncio.sleep(1)
    loop = asyncio.ensure_future(keyed_loop(server, log, stop, "lockout: keyed", "127.0.0.2"))
    await asyncio.sleep(seconds)
    stop.set()
    keyed = await loop
    await asyncio.gather(*holders, return_exceptions=True)
    return {"keyed": len(keyed), "keyed_ok": sum(a.status == 200 for a in keyed), "opened": opened[0]}


def photo_jpeg(width: int = 4000, height: int = 3000) -> bytes:
    """A 12 MP JPEG like a phone's: too large to decode on the event loop, so it takes the pool."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    pixels = rng.random((height, width, 3)) * 40 + np.linspace(0, 200, width)[None, :, None]
    buffer = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8)).save(buffer, "JPEG", quality=85)
    return buffer.getvalue()


def latency(answers: list[Answer]) -> dict:
    ok = [a.seconds for a in answers if a.status == 200]
    others = collections.Counter(a.status for a in answers if a.status != 200)
    return {
        "answers": len(answers),
        "ok": len(ok),
        "p50": percentile(ok, 50),
        "p95": percentile(ok, 95),
        "others": "".join(f", {status} x{count}" for status, count in sorted(others.items())),
    }


async def beside_a_flood(
    server: Server, log: Log, victim, flood_images: list[bytes], requests: int, seconds: float, phase: str
) -> dict:
    """`victim(stop, where)`, a client from 127.0.0.2 in a loop, alone for a third of `seconds`, then
    for `seconds` beside `requests` /captions of `flood_images` kept in flight from one other address."""
    flood_body, content_type = multipart("images", flood_images)

    async def flood(stop: asyncio.Event) -> None:
        while not stop.is_set():
            await request(
                server.port, "/captions", flood_body, content_type, key=True, where=f"{phase}: flood", log=log,
                timeout=120, source="127.0.4.1",
            )  # fmt: skip

    stop = asyncio.Event()
    alone = asyncio.ensure_future(victim(stop, f"{phase}: alone"))
    await asyncio.sleep(seconds / 3)
    stop.set()
    result = {"alone": latency(await alone)}
    stop = asyncio.Event()
    flooders = [asyncio.ensure_future(flood(stop)) for _ in range(requests)]
    await asyncio.sleep(1)
    beside = asyncio.ensure_future(victim(stop, f"{phase}: beside the flood"))
    await asyncio.sleep(seconds)
    stop.set()
    result["beside"] = latency(await beside)
    await asyncio.gather(*flooders)
    flood = [a.status for a in log.answers if a.where == f"{phase}: flood"]
    result["flood_ok"] = flood.count(200)
    result["flood_statuses"] = ", ".join(
        f"{status} x{count}" for status, count in sorted(collections.Counter(flood).items())
    )
    return result


async def decodes_phase(server: Server, log: Log, requests: int, seconds: float) -> dict:
    """One address keeps `requests` /captions of 16 40 MP PNGs in flight (valid images, each a
    costly decode) while a keyed client from another address sends a 12 MP photo at a time."""
    photo = photo_jpeg()

    async def photos(stop: asyncio.Event, where: str) -> list[Answer]:
        answers = []
        while not stop.is_set():
            answers.append(
                await request(
                    server.port, "/caption", photo, "image/jpeg", key=True, where=where, log=log, source="127.0.0.2"
                )
            )
        return answers

    return await beside_a_flood(server, log, photos, [grey16_png()] * 16, requests, seconds, "decodes")


async def burst_phase(server: Server, log: Log, requests: int, seconds: float) -> dict:
    """One address keeps `requests` /captions of 16 small PNGs in flight (every image a cheap decode
    and a queue place in the engine) while a keyed client from another address captions a small PNG
    at a time."""

    async def small(stop: asyncio.Event, where: str) -> list[Answer]:
        return await keyed_loop(server, log, stop, where, "127.0.0.2")

    return await beside_a_flood(server, log, small, [small_png()] * 16, requests, seconds, "burst")


async def fill_phase(server: Server, log: Log, requests: int, seconds: float) -> dict:
    """The burst phase with more /captions in flight than the engine's queue has places."""

    async def small(stop: asyncio.Event, where: str) -> list[Answer]:
        return await keyed_loop(server, log, stop, where, "127.0.0.2")

    return await beside_a_flood(server, log, small, [small_png()] * 16, requests, seconds, "fill")


async def bodies_phase(server: Server, log: Log, clients: int, megabytes: int) -> dict:
    """Many large bodies at once, each client from its own loopback address."""
    padded = with_chunks(small_png(), png_chunk(b"prVt", bytes(megabytes * 2**20)))
    idle = rss_bytes(server.process.pid)
    stop = asyncio.Event()
    sampler = asyncio.ensure_future(sample_peak(server.process.pid, stop))
    answers = await asyncio.gather(
        *(
            request(
                server.port,
                "/caption",
                padded,
                "image/png",
                key=True,
                where="bodies",
                log=log,
                timeout=120,
                source=f"127.0.{1 + i // 250}.{1 + i % 250}",
            )
            for i in range(clients)
        )
    )
    await asyncio.sleep(1)
    stop.set()
    statuses = [a.status for a in answers]
    return {"idle": idle, "peak": await sampler, "statuses": {s: statuses.count(s) for s in sorted(set(statuses))}}


async def sigterm_phase(server: Server, log: Log, clients: int) -> dict:
    body, content_type = multipart("image", [small_png()])
    stop = asyncio.Event()
    after: list[Answer] = []
    signalled = [0.0]

    async def loop_client():
        while not stop.is_set():
            answer = await request(
                server.port, "/caption", body, content_type, key=True, where="sigterm", log=log, timeout=30
            )
            if signalled[0] and answer.status:
                after.append(answer)
            if answer.status == 0:
                return

    async def stalled_upload():  # still mid-body when the grace ends: must get the 503 JSON
        answer = await request(
            server.port,
            "/caption",
            body,
            content_type,
            key=True,
            where="sigterm stalled",
            log=log,
            timeout=40,
            stall_after=len(body) // 2,
        )
        after.append(answer)

    loops = [asyncio.ensure_future(loop_client()) for _ in range(clients)]
    stalled = [asyncio.ensure_future(stalled_upload()) for _ in range(4)]
    await asyncio.sleep(2)
    signalled[0] = time.perf_counter()
    server.process.send_signal(signal.SIGTERM)
    code = await asyncio.to_thread(server.process.wait, 60)
    stop.set()
    await asyncio.gather(*loops, *stalled)
    return {"exit": code, "after": after, "exit_s": time.perf_counter() - signalled[0]}


def table(results: dict, log: Log, args) -> str:
    memory, slow, framing, term = results["memory"], results["slowloris"], results["framing"], results["sigterm"]
    idle, crafted, lockout, bodies = results["idle"], results["crafted"], results["lockout"], results["bodies"]
    decodes, burst, fill = results["decodes"], results["burst"], results["fill"]
    idle_after = idle["closed_after"]
    gib = lambda value: f"{value / GIB:.2f} GiB"  # noqa: E731
    rate = slow["keyed_ok"] / max(slow["keyed"], 1)
    after = term["after"]
    non_json = log.non_json()
    rows = [
        ("idle RSS", gib(memory["idle"]), ""),
        (f"peak RSS, {args.clients} x /captions of {args.images} 40 MP 16-bit PNGs", gib(memory["peak"]), "<= 2 GiB"),
        (
            f"settled RSS, {args.settle:g} s after",
            gib(memory["settled"]),
            f"<= idle + 0.5 GiB ({gib(memory['idle'] + GIB / 2)})",
        ),
        (
            "memory phase answers",
            " ".join(map(str, memory["statuses"])) + f" in {memory['took']:.1f} s; "
            f"{memory['captioned']}/{args.clients * args.images} images captioned",
            "",
        ),
        (
            f"keyed success beside {args.slow} slow keyless clients",
            f"{slow['keyed_ok']}/{slow['keyed']} ({rate:.0%})",
            ">= 95%",
        ),
        ("keyed p95 latency (every answer)", f"{slow['p95']:.2f} s", "<= 2 s"),
        (
            "keyless trickling clients: answers, p95 time to answer",
            f"{slow['keyless_statuses']}, {slow['keyless_p95']:.2f} s",
            "401 before the body",
        ),
        (
            f"{idle['count']} connections of each kind ({'; '.join(f'{k}: {v}' for k, v in HOLD_KINDS.items())}): "
            "closed by the server",
            " + ".join(f"{idle['closed'][kind]}" for kind in HOLD_KINDS)
            + (f", after {idle_after[0]:.1f}-{idle_after[-1]:.1f} s" if idle_after else ""),
            f"all, HEADER_TIMEOUT_S ({args.header_timeout:g} s) after their last request or answer",
        ),
        (
            "server's open descriptors: before / with them / after",
            " / ".join(map(str, idle["fds"])),
            "back to before",
        ),
        ("keyed success beside them", f"{idle['keyed_ok']}/{idle['keyed']}", "all"),
        (
            "4 TIFFs of a million strips and 16 PNGs of 63 MB of text, at once: answers, slowest",
            ", ".join(f"{kind} {status}" for kind, status in crafted["statuses"]) + f"; {crafted['slowest']:.2f} s",
            "422 image_too_complex, at once",
        ),
        (
            "RSS: idle / peak during them",
            f"{gib(crafted['idle'])} / {gib(crafted['peak'])}",
            "peak <= idle + 0.25 GiB",
        ),
        (
            "keyed client beside them (another address): success, p95",
            f"{crafted['keyed_ok']}/{crafted['keyed']}, {crafted['keyed_p95']:.2f} s",
            "all, <= 1 s",
        ),
        (
            f"keyed success beside {args.lockout} idle uploads from one address, renewed when answered "
            f"({lockout['opened']} opened in {args.lockout_seconds:g} s)",
            f"{lockout['keyed_ok']}/{lockout['keyed']}",
            ">= 95%",
        ),
        (
            "a 12 MP JPEG photo at a time, alone: answers, p50 / p95",
            f"{decodes['alone']['ok']}/{decodes['alone']['answers']}, "
            f"{decodes['alone']['p50']:.2f} / {decodes['alone']['p95']:.2f} s",
            "",
        ),
        (
            f"the same beside {args.flood} /captions of 16 40 MP PNGs kept in flight from one address "
            f"({decodes['flood_ok']} of those answered 200)",
            f"{decodes['beside']['ok']}/{decodes['beside']['answers']}{decodes['beside']['others']}, "
            f"{decodes['beside']['p50']:.2f} / {decodes['beside']['p95']:.2f} s",
            "all, p95 <= 1 s (clients take turns for the decode budget)",
        ),
        (
            "a small PNG at a time, alone: answers, p50 / p95",
            f"{burst['alone']['ok']}/{burst['alone']['answers']}, "
            f"{burst['alone']['p50']:.3f} / {burst['alone']['p95']:.3f} s",
            "",
        ),
        (
            f"the same beside {args.burst} /captions of 16 small PNGs kept in flight from one address "
            f"({burst['flood_ok']} of those answered 200)",
            f"{burst['beside']['ok']}/{burst['beside']['answers']}{burst['beside']['others']}, "
            f"{burst['beside']['p50']:.3f} / {burst['beside']['p95']:.3f} s",
            "all, p95 <= 0.5 s (clients take turns in the engine's queue)",
        ),
        (
            f"the same beside {args.fill} /captions of 16 small PNGs kept in flight from one address, more images "
            f"than the queue's places (the flood's answers: {fill['flood_statuses']})",
            f"{fill['beside']['ok']}/{fill['beside']['answers']}{fill['beside']['others']}, "
            f"{fill['beside']['p50']:.3f} / {fill['beside']['p95']:.3f} s",
            "all, p95 <= 0.5 s (one address holds at most CLIENT_QUEUE_SHARE of the queue)",
        ),
        (
            f"{args.bodies} uploads of {args.body_mb} MB at once, each from its own address: answers",
            ", ".join(f"{status} x{count}" for status, count in bodies["statuses"].items()),
            "200, or 503 once UPLOAD_MEMORY_MB is held",
        ),
        (
            "RSS: idle / peak during them",
            f"{gib(bodies['idle'])} / {gib(bodies['peak'])}",
            "peak <= idle + 0.5 GiB (twice UPLOAD_MEMORY_MB's 128 MB, and decoding)",
        ),
        (
            "keyless, 9 MiB declared, body held back",
            f"{framing['keyless_held'].status} in {framing['keyless_held'].seconds:.2f} s",
            "401 at once",
        ),
        ("Content-Length 50 MB", f"{framing['huge'].status} in {framing['huge'].seconds:.2f} s", "413 at once"),
        (
            "Content-Length 1000 bytes over the body",
            f"{framing['short'].status} in {framing['short'].seconds:.2f} s",
            "408 after BODY_TIMEOUT_S",
        ),
        (
            "SIGTERM under load: answers after the signal",
            ", ".join(
                f"{status} x{sum(a.status == status for a in after)}" for status in sorted({a.status for a in after})
            )
            or "none",
            "200 or 503 JSON",
        ),
        (
            "SIGTERM: exit code, seconds to exit",
            f"{term['exit']}, {term['exit_s']:.1f} s",
            f"exit within SHUTDOWN_GRACE_S ({args.grace:g} s) + 3",
        ),
        (
            "answers checked / non-JSON answers",
            f"{len([a for a in log.answers if a.status])} / {len(non_json)}",
            "0 non-JSON",
        ),
        ("answers whose body the connection cut off (not judged)", str(len(log.cut_off())), ""),
    ]
    lines = ["| measure | result | target |", "|---|---|---|"]
    lines += [f"| {name} | {value} | {target} |" for name, value, target in rows]
    kinds = sorted({(a.status, a.where) for a in non_json})
    for status, where in kinds:
        count = sum(a.status == status and a.where == where for a in non_json)
        lines.append(f"| non-JSON answer | {status} x{count} in phase {where} | |")
    return "\n".join(lines)


async def main_async(args) -> str:
    log = Log()
    env = {"SHUTDOWN_GRACE_S": str(args.grace), "BODY_TIMEOUT_S": "10", "HEADER_TIMEOUT_S": str(args.header_timeout)}
    server = Server(Path(args.artifacts).resolve(), env, Path(args.root).resolve())
    try:
        server.wait_ready()
        await asyncio.sleep(2)
        results = {"memory": await memory_phase(server, log, args.clients, args.images, args.settle)}
        results["slowloris"] = await slowloris_phase(server, log, args.slow, args.seconds)
        results["idle"] = await idle_connections_phase(server, log, args.idle, args.header_timeout)
        results["crafted"] = await crafted_phase(server, log)
        results["lockout"] = await lockout_phase(server, log, args.lockout, args.lockout_seconds)
        results["decodes"] = await decodes_phase(server, log, args.flood, args.flood_seconds)
        results["burst"] = await burst_phase(server, log, args.burst, args.flood_seconds)
        results["fill"] = await fill_phase(server, log, args.fill, args.flood_seconds)
        results["bodies"] = await bodies_phase(server, log, args.bodies, args.body_mb)
        results["framing"] = await framing_phase(server, log)
        results["sigterm"] = await sigterm_phase(server, log, 8)
    finally:
        if server.process.poll() is None:
            server.process.kill()
    return table(results, log, args)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--artifacts", default=str(ROOT / "model_artifacts" / "default"))
    parser.add_argument("--root", default=str(ROOT), help="source tree of the server to attack (a baseline checkout)")
    parser.add_argument("--clients", type=int, default=4, help="memory phase: concurrent /captions requests")
    parser.add_argument("--images", type=int, default=16, help="memory phase: 40 MP images per request")
    parser.add_argument("--settle", type=float, default=20.0, help="memory phase: seconds before settled RSS")
    parser.add_argument("--slow", type=int, default=256, help="slowloris phase: trickling keyless clients")
    parser.add_argument("--seconds", type=float, default=20.0, help="slowloris phase: keyed client's run")
    parser.add_argument("--grace", type=float, default=3.0, help="SHUTDOWN_GRACE_S of the server")
    parser.add_argument("--idle", type=int, default=200, help="idle phase: connections of each HOLD_KINDS kind")
    parser.add_argument("--header-timeout", type=float, default=10.0, help="HEADER_TIMEOUT_S of the server")
    parser.add_argument("--lockout", type=int, default=64, help="lockout phase: idle uploads from one address")
    parser.add_argument("--lockout-seconds", type=float, default=25.0, help="lockout phase: the keyed client's run")
    parser.add_argument("--flood", type=int, default=8, help="decodes phase: /captions in flight from one address")
    parser.add_argument(
        "--flood-seconds", type=float, default=30.0, help="decodes, burst and fill phases: the other client's run"
    )
    parser.add_argument(
        "--burst", type=int, default=16, help="burst phase: /captions of 16 small PNGs from one address"
    )
    parser.add_argument("--fill", type=int, default=32, help="fill phase: /captions of 16 small PNGs from one address")
    parser.add_argument("--bodies", type=int, default=100, help="bodies phase: clients, each from its own address")
    parser.add_argument("--body-mb", type=int, default=9, help="bodies phase: megabytes per upload")
    parser.add_argument("--write", help="also write the table (with the command) to this Markdown file")
    args = parser.parse_args()
    result = asyncio.run(main_async(args))
    print(result)
    if args.write:
        command = "python -m bench.attack " + " ".join(sys.argv[1:])
        when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        section = f"Command: `{command}` ({when}, {os.cpu_count()} CPUs)\n\n{result}\n"
        write_latest_run(Path(args.write), "# Attack bench\n", section)


if __name__ == "__main__":
    main()
