"""Every benchmark module imports against the current code (they run rarely, so a rename elsewhere
would otherwise break them silently), and the pieces they share work."""

import importlib
import pkgutil

import pytest

import bench

MODULES = sorted(info.name for info in pkgutil.iter_modules(bench.__path__))


def test_the_benchmarks_are_all_found():
    expected = {"load_test", "attack", "harness", "model_swap", "peers", "cpu_profile", "http_floor", "soak"}
    assert expected <= set(MODULES)


@pytest.mark.parametrize("name", MODULES)
def test_benchmark_module_imports(name):
    importlib.import_module(f"bench.{name}")


@pytest.mark.parametrize("decode", [False, True])
def test_the_http_floor_server_answers_an_upload_like_the_service(decode):
    """bench.http_floor's model-less server: the same multipart field, a JSON answer; with decode,
    the PNG is really decoded and resized to the model's input."""
    import io

    from fastapi.testclient import TestClient
    from PIL import Image

    from bench.http_floor import create_floor_app

    png = io.BytesIO()
    Image.new("RGB", (64, 48), "red").save(png, "PNG")
    client = TestClient(create_floor_app(decode, image_size=96))
    response = client.post("/caption", files={"image": ("a.png", png.getvalue(), "image/png")})
    assert response.status_code == 200 and response.json()["captions"][0]["text"]
    assert response.json()["width" if decode else "bytes"] == (96 if decode else len(png.getvalue()))
    assert client.post("/caption").status_code == 422  # no image: FastAPI's own validation
    assert client.get("/health/ready").status_code == 200


def test_open_loop_verdicts_compare_the_captions_served_of_the_same_arrivals():
    """Below capacity both modes serve every arrival: a tie in work, decided by p95, not by how long
    the last request took (captions/s). Past it, serving fewer of the same arrivals loses."""
    from bench.harness import Outcome
    from bench.load_test import versus_static_open

    def outcome(latencies_s: list[float], refused: int, elapsed_s: float) -> Outcome:
        result = Outcome(elapsed_s=elapsed_s)
        for latency in latencies_s:
            result.record(200, latency)
        for _ in range(refused):
            result.record(503, 0.01)
        return result

    # lower latencies, but its phase ended 10 ms later: fewer captions/s for the same 100 requests
    quicker = outcome([0.02] * 99 + [0.03], 0, 6.01)
    slower = outcome([0.04] * 99 + [0.05], 0, 6.00)
    assert quicker.served_per_s < slower.served_per_s
    assert versus_static_open("below", quicker, slower)[2]
    assert not versus_static_open("below", slower, quicker)[2]  # same work, worse p95
    served_fewer = outcome([0.02] * 90, 10, 6.0)
    assert not versus_static_open("past", served_fewer, outcome([0.03] * 95, 5, 6.0))[2]


def test_pooling_a_repeated_phase_keeps_every_sample_and_counter():
    from bench.harness import Outcome

    first = Outcome([0.1], [0.2], {200: 1, 503: 1}, 1, 6.0, 7.0)
    repeat = Outcome([0.3, 0.4], [], {200: 2, 400: 1}, 0, 6.0, 6.5)
    pooled = first.pooled_with(repeat)
    assert pooled == Outcome([0.1, 0.3, 0.4], [0.2], {200: 3, 400: 1, 503: 1}, 1, 12.0, 13.5)
    assert pooled.served_per_s == 3 / 12.0 and pooled.errors == 2  # the 400 and the client error


def test_a_noisy_neighbour_ends_with_the_benchmark_that_started_it_even_when_killed(tmp_path):
    """A benchmark killed by a signal never runs NoisyNeighbour.__exit__; its neighbour used to spin
    on for an hour and skew the next run (round 20)."""
    import contextlib
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    pid_file = tmp_path / "neighbour.pid"
    root = Path(bench.__file__).resolve().parents[1]
    code = (
        "import sys, time\n"
        f"sys.path.insert(0, {str(root)!r})\n"
        "from bench.harness import NoisyNeighbour\n"
        "with NoisyNeighbour() as neighbour:\n"
        f"    open({str(pid_file)!r}, 'w').write(str(neighbour.process.pid))\n"
        "    time.sleep(60)\n"
    )
    benchmark = subprocess.Popen([sys.executable, "-c", code])
    deadline = time.monotonic() + 30
    while not pid_file.exists() or not pid_file.read_text():
        assert time.monotonic() < deadline, "the neighbour did not start"
        time.sleep(0.05)
    neighbour = int(pid_file.read_text())
    benchmark.send_signal(signal.SIGKILL)
    benchmark.wait(10)
    deadline = time.monotonic() + 5
    try:
        while True:
            try:
                with open(f"/proc/{neighbour}/stat") as stat:
                    if stat.read().split(")")[-1].split()[0] == "Z":
                        break  # exited, a zombie until init reaps it
            except FileNotFoundError:
                break  # reaped: gone
            assert time.monotonic() < deadline, "the neighbour outlived its benchmark"
            time.sleep(0.05)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(neighbour, signal.SIGKILL)  # never leave one spinning, whatever the outcome


@pytest.mark.parametrize(
    ("answers", "waits"),
    [
        ([(404, b"")], False),  # no /metrics at all: a model-less floor server, nothing compiles
        ([(200, b"other_series 1\n")], False),  # metrics without the gauge: nothing compiles
        (
            [(200, b"captioning_engine_programs_compiling 1\n")] * 3
            + [(200, b"captioning_engine_programs_compiling 0\n")],
            True,
        ),
    ],
)
def test_wait_warm_waits_for_the_compilation_and_not_for_a_server_without_metrics(answers, waits):
    """Server.wait_warm waits while the engine's programs compile; a server with no /metrics (the
    HTTP floors of bench.http_floor) has nothing to wait for (it had waited 300 s and failed)."""
    import asyncio
    import types

    from bench import harness

    async def scenario() -> tuple[float, int]:
        asked = 0

        async def answer(reader, writer):
            nonlocal asked
            await reader.readuntil(b"\r\n\r\n")
            status, body = answers[min(asked, len(answers) - 1)]
            asked += 1
            writer.write(b"HTTP/1.1 %d X\r\nContent-Length: %d\r\n\r\n%s" % (status, len(body), body))
            await writer.drain()
            writer.close()

        listener = await asyncio.start_server(answer, harness.HOST, 0)
        server = harness.Server.__new__(harness.Server)  # no process: only the port is asked
        server.mode, server.port = "floor", listener.sockets[0].getsockname()[1]
        server.process = types.SimpleNamespace(poll=lambda: None)
        async with listener:
            waited = await asyncio.wait_for(server.wait_warm(), 10)
        return waited, asked

    waited, asked = asyncio.run(scenario())
    assert asked == (len(answers) if waits else 1)
    assert (waited >= 0.5) == waits  # three 0.25 s pauses before the gauge read 0


def test_http_floor_asks_for_the_references_as_load_test_defines_them(monkeypatch):
    """bench.http_floor calls bench.load_test's measure_references, whose signature grew a
    parameter once without http_floor following (a TypeError after the servers' start-up)."""
    import inspect
    from pathlib import Path

    from bench import http_floor, load_test

    bound = {}
    monkeypatch.setenv("ENCODER_PRECISION", "float32")
    monkeypatch.setattr(
        http_floor,
        "measure_references",
        lambda *args, **kwargs: bound.update(
            inspect.signature(load_test.measure_references).bind(*args, **kwargs).arguments
        ),
    )
    http_floor.in_process_references(Path("bundle"), [])
    assert bound["encoder_precision"] == "float32" and bound["threads"] == 0


def soak_pool():
    import io

    from PIL import Image

    pool = []
    for fmt, content_type in (("JPEG", "image/jpeg"), ("PNG", "image/png")):
        buffer = io.BytesIO()
        Image.new("RGB", (80, 64), (200, 40, 40)).save(buffer, fmt)
        pool.append((buffer.getvalue(), content_type))
    return pool


def test_each_soak_request_asks_what_its_kind_expects():
    """bench.soak's requests: framed with their body's length; the decoding options of every /caption
    kind accepted except the contradictory one (422); the bad bodies refused as undecodable (400),
    never named as another format (415), whatever the random bytes."""
    import random
    from urllib.parse import parse_qsl, urlsplit

    from app.errors import InvalidImage, InvalidParameters
    from app.images import open_upload
    from app.schemas import CaptionQuery
    from app.service import decode_options
    from bench.soak import EXPECTED, build_request

    pool = soak_pool()
    for kind in EXPECTED:
        head, body = build_request(kind, random.Random(1), pool).split(b"\r\n\r\n", 1)
        assert f"Content-Length: {len(body)}".encode() in head, kind
        target = urlsplit(head.split()[1].decode())
        if target.path == "/caption":
            query = CaptionQuery(**dict(parse_qsl(target.query)))
            if EXPECTED[kind] == 422:
                with pytest.raises(InvalidParameters):
                    decode_options(query)
            else:
                decode_options(query)
    for seed in range(300):
        _, body = build_request("not_an_image", random.Random(seed), pool).split(b"\r\n\r\n", 1)
        with pytest.raises(InvalidImage):
            open_upload(body, max_pixels=10**8, min_side=1)


def test_the_soak_verdicts_catch_what_they_guard():
    """bench.soak's report fails a run with a wrong status, an answer that is not JSON, a failed image,
    a client error, a 5xx the server counted (or a count of the server's that was not read), memory
    growth past the target (from the first window, not from idle) or a descriptor left open."""
    from argparse import Namespace
    from collections import Counter

    from bench.soak import SOAK_RSS_GROWTH_MIB, Window, report

    def passes(answers=None, rss_end=950.0, fds_after=16, alive=True, server_statuses=None, **last_window):
        first = Window(60, 900, 20, 30, Counter({("greedy", 200): 5}), [0.1] * 5)
        last = Window(120, rss_end, 20, 30, Counter(answers or {("greedy", 200): 1}), [0.1], **last_window)
        server_statuses = Counter(server_statuses if server_statuses is not None else {200: 100})
        after = {"fds": fds_after, "ready": 200, "caption": 200, "server_statuses": server_statuses}
        args = Namespace(minutes=2, clients=1, pictures=2)
        return report([first, last], alive, {"rss": 880, "fds": 16}, after, args)[1]

    assert passes(answers={("greedy", 200): 1, ("bad_options", 422): 1}, server_statuses={200: 7, 422: 1, 499: 3})
    assert passes(rss_end=900 + SOAK_RSS_GROWTH_MIB)  # more than the target above idle, not above the first window
    assert not passes(rss_end=900 + SOAK_RSS_GROWTH_MIB + 1)
    assert not passes(answers={("bad_options", 200): 1})  # a contradictory request captioned
    assert not passes(answers={("greedy", 500): 1})
    assert not passes(server_statuses={200: 6, 500: 1})  # a 5xx to a client that had gone
    assert not passes(not_json=1)
    assert not passes(images_failed=1)
    assert not passes(client_errors=1)
    assert not passes(fds_after=19)
    assert not passes(alive=False)
    assert not passes(server_statuses={})  # the server's count was not read: its "no 5xx" says nothing
    assert not passes(server_statuses={200: 2})  # it counted fewer answers than the bench got


def test_cpu_profile_counts_the_decode_pool_as_decoding_not_other():
    import threading

    from app.decode_pool import DecodePool
    from bench.cpu_profile import thread_group

    pool = DecodePool(threads=1, budget_bytes=1 << 20)  # its executor's threads, as the server names them
    name = pool._executor.submit(lambda: threading.current_thread().name).result()
    pool._executor.shutdown()
    assert name.startswith("decode")
    assert thread_group(name) == "decode pool and worker threads (large-image decoding)"
    assert thread_group("inference-encoder") == "encoder thread (continuous)"
    assert thread_group("some-other-thread") == "other"


def test_metric_samples_read_the_exposition_as_prometheus_writes_it():
    """The benchmarks read /metrics through one parser: a route label with braces and commas of its
    own, a histogram's buckets and a counter's _total series come back whole."""
    from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

    from bench.harness import metric_samples, metric_sum

    registry = CollectorRegistry()
    labels = ("route", "method", "status")
    requests = Counter("http_requests", "", labels, namespace="captioning", registry=registry)
    seconds = Histogram("http_request_duration_seconds", "", labels, namespace="captioning", registry=registry)
    odd_route = '/v2/models/{model_name}/infer,"x"'
    for route, status, took in [(odd_route, "503", 0.01), ("/caption", "503", 0.2), ("/caption", "200", 0.01)]:
        requests.labels(route, "POST", status).inc()
        seconds.labels(route, "POST", status).observe(took)
    page = generate_latest(registry)

    by_status = {(s["route"], s["status"]): v for s, v in metric_samples(page, "captioning_http_requests_total")}
    assert by_status == {(odd_route, "503"): 1.0, ("/caption", "503"): 1.0, ("/caption", "200"): 1.0}
    refused = {"method": "POST", "status": "503"}
    assert metric_sum(page, "captioning_http_request_duration_seconds_count", **refused) == 2
    assert metric_sum(page, "captioning_http_request_duration_seconds_bucket", le="0.05", **refused) == 1
    assert metric_sum(page.decode(), "captioning_engine_programs_compiling") == 0  # no such series


def test_a_bench_report_replaces_only_its_latest_run_and_keeps_the_notes_around_it(tmp_path):
    from bench.harness import LATEST_RUN_BEGIN, LATEST_RUN_END, write_latest_run

    report = tmp_path / "ATTACK.md"
    report.write_text("# Attack bench\n\nnotes before\n")
    write_latest_run(report, "# Attack bench", "first run\n")
    report.write_text(report.read_text() + "\n## Before and after\n\ncurated history\n")
    write_latest_run(report, "# Attack bench", "second run")
    text = report.read_text()
    assert "second run" in text and "first run" not in text
    assert text.index("notes before") < text.index("second run") < text.index("curated history")
    backwards = tmp_path / "backwards.md"  # an end marker before the begin marker: appended, not an error
    backwards.write_text(f"# B\n\n{LATEST_RUN_END}\nnotes\n{LATEST_RUN_BEGIN}\n")
    write_latest_run(backwards, "# B", "a run")
    assert backwards.read_text().startswith(f"# B\n\n{LATEST_RUN_END}\nnotes") and "a run" in backwards.read_text()
    fresh = tmp_path / "new.md"
    write_latest_run(fresh, "# Soak bench", "only run")
    assert fresh.read_text().startswith("# Soak bench\n") and "only run" in fresh.read_text()
