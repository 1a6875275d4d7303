"""The benchmarks' shared harness: a minimal keep-alive HTTP client, closed- and open-loop load,
and the real service (`python -m app`) started on a free loopback port and stopped with SIGTERM."""

from __future__ import annotations

import asyncio
import io
import math
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from captioning.artifacts import bundle_path

REPO = Path(__file__).resolve().parent.parent
# The committed default model's highest version, the one the service serves: the benches' default.
DEFAULT_BUNDLE = bundle_path(REPO / "model_artifacts" / "default")
HOST = "127.0.0.1"
BOUNDARY = "benchboundary7d3f"
MAX_OPEN_CONNECTIONS = 1024
SERVER_START_TIMEOUT_S = 300

# ------------------------------------------------------------------------------- HTTP client


def multipart_form(field_name: str, files: list[tuple[bytes, str]]) -> tuple[bytes, str]:
    """A multipart form holding each (bytes, content type) of `files` under `field_name`, and the
    form's Content-Type (boundary BOUNDARY)."""
    parts = b"".join(
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{field_name}"; filename="{field_name}{index}"\r\n'
        f"Content-Type: {content_type}\r\n\r\n".encode()
        + data
        + b"\r\n"
        for index, (data, content_type) in enumerate(files)
    )
    return parts + f"--{BOUNDARY}--\r\n".encode(), f"multipart/form-data; boundary={BOUNDARY}"


def multipart_body(png: bytes) -> bytes:
    """A multipart form holding `png` as the field `image`."""
    return multipart_form("image", [(png, "image/png")])[0]


def post_request(path: str, body: bytes, content_type: str) -> bytes:
    """A complete keep-alive POST of `body` to `path`."""
    head = f"POST {path} HTTP/1.1\r\nHost: {HOST}\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
    return (head + "\r\n").encode() + body


def caption_request(png: bytes, upload: str = "multipart") -> bytes:
    """A complete keep-alive POST /caption: the image as multipart field `image`, or (`upload="raw"`)
    as the whole body with Content-Type image/png."""
    if upload not in ("multipart", "raw"):
        raise ValueError(f"upload is 'multipart' or 'raw', not {upload!r}")
    if upload == "raw":
        return post_request("/caption", png, "image/png")
    return post_request("/caption", *multipart_form("image", [(png, "image/png")]))


class Connection:
    """One keep-alive HTTP/1.1 connection; enough protocol for this server's responses.

    Like httpx's keep-alive expiry, it does not reuse a connection idle for REUSE_IDLE_S or more:
    uvicorn closes one idle for 5 s, and a request written as that close crosses it fails with
    an incomplete read although the server never saw it (measured: open-loop phases lost a request
    or four so, each on a connection idle 5.0x s)."""

    REUSE_IDLE_S = 4.0

    def __init__(self, port: int):
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.last_used = 0.0

    async def request(self, raw: bytes) -> tuple[int, bytes]:
        if self.writer is not None and (
            self.reader.at_eof() or time.perf_counter() - self.last_used >= self.REUSE_IDLE_S
        ):
            self.close()
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(HOST, self.port)
        try:
            self.writer.write(raw)
            head = await self.reader.readuntil(b"\r\n\r\n")
            status = int(head[9:12])
            length = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
            body = await self.reader.readexactly(int(length.group(1))) if length else b""
            if re.search(rb"(?i)\r\nconnection: *close", head):
                self.close()
            self.last_used = time.perf_counter()
            return status, body
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
            self.close()
            raise

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


@dataclass
class Outcome:
    latencies_s: list[float] = field(default_factory=list)  # successful requests
    rejected_s: list[float] = field(default_factory=list)  # 503 answers
    statuses: dict[int, int] = field(default_factory=dict)
    client_errors: int = 0  # connection failures, timeouts
    elapsed_s: float = 0.0  # the measured window: the phase's duration
    wall_s: float = 0.0  # the whole phase: warm-up, and draining the requests still in flight
    client_error_kinds: dict[str, int] = field(default_factory=dict)  # exception name -> count

    def client_failed(self, kind: str) -> None:
        self.client_errors += 1
        self.client_error_kinds[kind] = self.client_error_kinds.get(kind, 0) + 1

    @property
    def served_per_s(self) -> float:
        return len(self.latencies_s) / self.elapsed_s

    def record(self, status: int, latency_s: float) -> None:
        self.statuses[status] = self.statuses.get(status, 0) + 1
        if status == 200:
            self.latencies_s.append(latency_s)
        elif status == 503:
            self.rejected_s.append(latency_s)

    def pooled_with(self, other: Outcome) -> Outcome:
        """This phase's outcome and a repeat's as one: samples pooled, times and counters added."""
        statuses = {k: self.statuses.get(k, 0) + other.statuses.get(k, 0) for k in {*self.statuses, *other.statuses}}
        return Outcome(
            self.latencies_s + other.latencies_s,
            self.rejected_s + other.rejected_s,
            statuses,
            self.client_errors + other.client_errors,
            self.elapsed_s + other.elapsed_s,
            self.wall_s + other.wall_s,
            {
                k: self.client_error_kinds.get(k, 0) + other.client_error_kinds.get(k, 0)
                for k in {*self.client_error_kinds, *other.client_error_kinds}
            },
        )

    @property
    def total(self) -> int:
        return sum(self.statuses.values()) + self.client_errors

    @property
    def errors(self) -> int:
        """Anything but 200 and 503 (the overload answer), including client-side failures."""
        return self.total - len(self.latencies_s) - len(self.rejected_s)


def percentile(values: list[float], q: float) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))]


async def closed_loop(port: int, requests: list[bytes], clients: int, duration_s: float, warmup_s: float) -> Outcome:
    """`clients` workers send back to back; only requests started after the warm-up are counted."""
    outcome = Outcome()
    started = time.perf_counter()
    measure_from, stop_at = started + warmup_s, started + warmup_s + duration_s

    async def worker(index: int) -> None:
        connection = Connection(port)
        rng = random.Random(index)
        try:
            for _ in range(1_000_000):  # bounded; the time limit ends it first
                sent = time.perf_counter()
                if sent >= stop_at:
                    break
                failure = None
                try:
                    status, _ = await asyncio.wait_for(connection.request(rng.choice(requests)), 60)
                except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError, ValueError) as exc:
                    connection.close()
                    status, failure = None, type(exc).__name__
                if sent >= measure_from:
                    if failure is not None:
                        outcome.client_failed(failure)
                    else:
                        outcome.record(status, time.perf_counter() - sent)
        finally:
            connection.close()

    await asyncio.gather(*(worker(i) for i in range(clients)))
    outcome.elapsed_s = duration_s
    return outcome


async def open_loop(port: int, requests: list[bytes], rate: float, duration_s: float, seed: int) -> Outcome:
    """Poisson arrivals at `rate`/s for `duration_s`; each on an idle pooled connection or a new one."""
    rng = random.Random(seed)
    arrivals, t = [], 0.0
    while True:
        t += rng.expovariate(rate)
        if t >= duration_s:
            break
        arrivals.append(t)
    outcome = Outcome()
    idle: list[Connection] = []
    open_connections = 0

    async def one(scheduled: float) -> None:
        nonlocal open_connections
        if idle:
            connection = idle.pop()
        elif open_connections < MAX_OPEN_CONNECTIONS:
            connection = Connection(port)
            open_connections += 1
        else:
            outcome.client_failed("too many open connections")
            return
        try:
            status, _ = await asyncio.wait_for(connection.request(rng.choice(requests)), 60)
            outcome.record(status, time.perf_counter() - scheduled)
            idle.append(connection)
        except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError, ValueError) as exc:
            connection.close()
            open_connections -= 1
            outcome.client_failed(type(exc).__name__)

    tasks = []
    started = time.perf_counter()
    for offset in arrivals:
        delay = started + offset - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(started + offset)))
    await asyncio.gather(*tasks)
    for connection in idle:
        connection.close()
    # Throughput over the time it took to serve the arrivals, backlog included.
    outcome.elapsed_s = max(duration_s, time.perf_counter() - started)
    return outcome


async def http_get(port: int, path: str) -> tuple[int, bytes]:
    connection = Connection(port)
    try:
        return await asyncio.wait_for(
            connection.request(f"GET {path} HTTP/1.1\r\nHost: {HOST}:{port}\r\n\r\n".encode()), 10
        )
    finally:
        connection.close()


# ------------------------------------------------------------------------------------ server


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mib(pid: int) -> float:
    match = re.search(r"VmRSS:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text())
    return int(match.group(1)) / 1024 if match else math.nan


def thread_count(pid: int) -> int:
    match = re.search(r"Threads:\s+(\d+)", Path(f"/proc/{pid}/status").read_text())
    return int(match.group(1)) if match else -1


def open_descriptors(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


ENGINE_SERIES = (
    "encode_seconds_sum",
    "encode_seconds_count",
    "step_seconds_sum",
    "step_seconds_count",
    "batch_size_sum",
    "batch_size_count",
    "queue_wait_seconds_sum",
    "queue_wait_seconds_count",
)
# 503s as the server timed them (from the request reaching the app to the response): the client's
# figure adds whatever happened before the app read the request (connecting, waiting to be read).
REFUSAL_SERIES = ("server_503", "server_503_within_50ms")


def metric_samples(text: str | bytes, name: str, **labels: str) -> list[tuple[dict[str, str], float]]:
    """The samples of series `name` in a /metrics page whose labels include `labels`, as (all their
    labels, value). Read with prometheus_client's own parser, which the service's exporter is
    written for: label values may hold braces, commas or quotes (/v2/models/{model_name}/infer)."""
    from prometheus_client.parser import text_string_to_metric_families

    text = text.decode() if isinstance(text, bytes) else text
    return [
        (sample.labels, sample.value)
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items())
    ]


def metric_sum(text: str | bytes, name: str, **labels: str) -> float:
    """The sum of those samples: 0 when there are none."""
    return sum(value for _, value in metric_samples(text, name, **labels))


LATEST_RUN_BEGIN = "<!-- latest run: written by the bench, everything outside these markers is kept -->"
LATEST_RUN_END = "<!-- end of latest run -->"


def write_latest_run(path: Path, title: str, section: str) -> None:
    """Put a bench's report between the file's latest-run markers, keeping the notes and earlier
    runs around them (a curated report is not overwritten); a file without markers in order gets
    the section appended, a missing one is created as `title` plus the section. Written to a
    temporary file first, so a failure never leaves half a report."""
    block = f"{LATEST_RUN_BEGIN}\n{section.rstrip()}\n{LATEST_RUN_END}"
    text = path.read_text() if path.exists() else ""
    begin = text.find(LATEST_RUN_BEGIN)
    end = text.find(LATEST_RUN_END, begin + len(LATEST_RUN_BEGIN)) if begin >= 0 else -1
    if end >= 0:
        text = text[:begin] + block + text[end + len(LATEST_RUN_END) :]
    elif text:
        text = text.rstrip() + "\n\n## Latest run\n\n" + block + "\n"
    else:
        text = f"{title.rstrip()}\n\n{block}\n"
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(text)
    temporary.replace(path)


async def engine_counters(port: int) -> dict[str, float]:
    """The engine's cumulative timings and the server's 503 timings from /metrics, to profile each
    phase from the inside."""
    _, text = await http_get(port, "/metrics")
    counters = {name: metric_sum(text, f"captioning_engine_{name}") for name in ENGINE_SERIES}
    refused = {"method": "POST", "status": "503"}
    counters["server_503"] = metric_sum(text, "captioning_http_request_duration_seconds_count", **refused)
    counters["server_503_within_50ms"] = metric_sum(
        text, "captioning_http_request_duration_seconds_bucket", le="0.05", **refused
    )
    return counters


def encoder_like_the_service(extra_env: dict[str, str]) -> str:
    """The encoder precision a server started with `extra_env` will use (ENCODER_PRECISION, auto:
    this CPU decides), made explicit in this process's environment with the oneDNN switch that
    goes with it, so that an in-process reference (the offline limit) and every server started
    from here (peers included) run the same encoder. Call before TensorFlow is imported."""
    from app.resources import encoder_precision, onednn_flag

    precision = encoder_precision(extra_env.get("ENCODER_PRECISION", os.environ.get("ENCODER_PRECISION", "auto")))
    os.environ["ENCODER_PRECISION"] = precision
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", onednn_flag(precision))
    return precision


class Server:
    """`python -m app` in one batching mode, on a free loopback port."""

    def __init__(
        self,
        mode: str,
        artifacts: Path,
        extra_env: dict[str, str],
        log_path: Path,
        module: str = "app",
        extra_args: list[str] | None = None,
    ):
        self.mode = mode
        self.port = free_port()
        env = {
            **os.environ,
            "BATCHING_MODE": mode,
            "PORT": str(self.port),
            "HOST": HOST,
            "ARTIFACTS_DIR": str(artifacts),
            "LOG_LEVEL": "WARNING",
            "PYTHONPATH": str(REPO),
            **extra_env,
        }
        self.log = open(log_path, "wb")  # noqa: SIM115 - the server writes to it until stop() closes it
        self.process = subprocess.Popen(
            [sys.executable, "-m", module, *(extra_args or [])],
            cwd=REPO,
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )

    async def wait_ready(self) -> float:
        started = time.perf_counter()
        while time.perf_counter() - started < SERVER_START_TIMEOUT_S:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"the {self.mode} server exited with code {self.process.returncode}; see {self.log.name}"
                )
            try:
                if (await http_get(self.port, "/health/ready"))[0] == 200:
                    return time.perf_counter() - started
            except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError):
                pass
            await asyncio.sleep(0.25)
        raise RuntimeError(f"the {self.mode} server was not ready within {SERVER_START_TIMEOUT_S} s")

    async def wait_warm(self) -> float:
        """After readiness: waits until the engine has compiled its multi-step programs in the
        background (captioning_engine_programs_compiling is 0), so that a measurement starts on a
        warm engine and this server's compilation does not fall on the next server's start-up.
        Returns the seconds waited."""
        started = time.perf_counter()
        while time.perf_counter() - started < SERVER_START_TIMEOUT_S:
            if self.process.poll() is not None:
                raise RuntimeError(f"the {self.mode} server exited with code {self.process.returncode}")
            status, body = await http_get(self.port, "/metrics")
            # 404: no /metrics at all (bench.http_floor's model-less servers); no series: nothing compiles.
            if status == 404 or (status == 200 and metric_sum(body, "captioning_engine_programs_compiling") == 0):
                return time.perf_counter() - started
            await asyncio.sleep(0.25)
        raise RuntimeError(f"the {self.mode} server was still compiling after {SERVER_START_TIMEOUT_S} s")

    def stop(self, timeout_s: float = 60) -> tuple[int | None, float]:
        """SIGTERM, as an orchestrator would; returns (exit code, seconds to exit)."""
        started = time.perf_counter()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self.log.close()
        return self.process.returncode, time.perf_counter() - started


NEIGHBOUR_MAX_S = 3600  # a forgotten neighbour ends itself


class NoisyNeighbour:
    """A CPU-bound process beside the server, as a sidecar or another pod on a shared node would
    be: one busy Python loop (one core's worth), at the same priority as the server, ended on
    exit (and by itself after NEIGHBOUR_MAX_S)."""

    def __init__(self) -> None:
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> NoisyNeighbour:
        # It also ends when the benchmark that started it is gone (killed: __exit__ never ran), which
        # it checks every ~10 ms; a forgotten neighbour had skewed a later run (round 20). The parent's
        # pid is passed in, not read at its start: the parent may already be gone by then.
        code = (
            f"import os, time\nparent, end = {os.getpid()}, time.monotonic() + {NEIGHBOUR_MAX_S}\n"
            "while time.monotonic() < end and os.getppid() == parent:\n"
            "    for _ in range(100_000):\n"
            "        pass\n"
        )
        self.process = subprocess.Popen([sys.executable, "-c", code])
        return self

    def cpu_seconds(self) -> float:
        return cpu_seconds(self.process.pid) if self.process and self.process.poll() is None else math.nan

    def __exit__(self, *exc_info) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)


def load_images(count: int) -> tuple[list[np.ndarray], list[bytes]]:
    from PIL import Image

    from training.datasets.shapes import load_split

    pixels = [example.pixels for example in load_split("test", size=count)]
    pngs = []
    for image in pixels:
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, "PNG")
        pngs.append(buffer.getvalue())
    return pixels, pngs
