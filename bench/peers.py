"""Peer benchmark: this service against LitServe, PyTriton and Ray Serve serving the same model.

    make bench-peers          # builds bench/.peers-venv (PyTriton 0.7.0 needs numpy<2), then runs this
    python -m bench.peers --peers-python bench/.peers-venv/bin/python [--duration 6] [--repeats 2]

Each server runs alone, started for its turn and stopped after it (idle, LitServe's workers and
Ray's daemons keep using CPU that would otherwise be taken from the server being measured); the
servers take turns in an order that rotates from round to round. Each turn measures 32 and 64
closed-loop clients, each level idle and with a noisy neighbour (one CPU-bound process beside
the server). Same client (bench.harness), same multipart PNG uploads; before the
load, every server's captions for the first images are checked against the offline captioner's.
Server CPU is counted over each server's whole process tree (LitServe and Triton run workers in
child processes, Ray its GCS, raylet and replica). Writes bench/PEERS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from bench import harness
from bench.harness import DEFAULT_BUNDLE, REPO, NoisyNeighbour, Outcome, closed_loop, percentile

CLIENTS = (32, 64)
CHECKED_IMAGES = 8


def tree_cpu_seconds(root: int) -> float:
    """CPU seconds of a process and all its descendants alive now."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            children.setdefault(int(fields[1]), []).append(int(entry))
    total, stack = 0.0, [root]
    while stack:
        pid = stack.pop()
        try:
            total += harness.cpu_seconds(pid)
        except (OSError, IndexError):
            continue
        stack.extend(children.get(pid, []))
    return total


class PeerServer:
    """bench.peer_servers FRAMEWORK in the peers' virtualenv, on a free port."""

    def __init__(self, framework: str, python: str, artifacts: Path, log_path: Path):
        self.mode = framework
        self.port = harness.free_port()
        self.log = open(log_path, "wb")  # noqa: SIM115  (the server's output, for its whole life)
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        if framework == "pytriton":  # the Python stub must load this interpreter's libpython, not the system's
            libdir = subprocess.run(
                [python, "-c", "import sysconfig; print(sysconfig.get_config_var('LIBDIR'))"],
                capture_output=True,
                text=True,
                check=True,
            ).stdout.strip()
            env["LD_LIBRARY_PATH"] = f"{libdir}:{env.get('LD_LIBRARY_PATH', '')}"
        self.process = subprocess.Popen(
            [python, "-m", "bench.peer_servers", framework, "--port", str(self.port), "--artifacts", str(artifacts)],
            cwd=self.log.name.rsplit("/", 1)[0],
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    async def wait_ready(self) -> float:
        started = time.perf_counter()
        path = {"litserve": "/health", "ray": "/caption"}.get(self.mode, "/health/ready")
        while time.perf_counter() - started < harness.SERVER_START_TIMEOUT_S:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.mode} exited with {self.process.returncode}; see {self.log.name}")
            with contextlib.suppress(OSError, asyncio.TimeoutError, asyncio.IncompleteReadError):
                if (await harness.http_get(self.port, path))[0] == 200:
                    return time.perf_counter() - started
            await asyncio.sleep(0.5)
        raise RuntimeError(f"{self.mode} was not ready in time")

    def stop(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, 15)
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, 9)
            self.process.wait(10)
        self.log.close()


@dataclass
class Row:
    server: str
    clients: int
    neighbour: bool
    outcome: Outcome
    cpu_s: float


def caption_of(body: bytes) -> str:
    data = json.loads(body)
    return data["caption"] if "caption" in data else data["captions"][0]["text"]


async def check_captions(server, requests: list[bytes], expected: list[str]) -> float:
    connection, same = harness.Connection(server.port), 0
    try:
        for raw, text in zip(requests, expected, strict=True):
            status, body = await connection.request(raw)
            same += status == 200 and caption_of(body) == text
    finally:
        connection.close()
    return same / len(expected)


def offline_reference(artifacts: Path, pixels) -> tuple[list[str], float, float]:
    """(captions of the first images, offline captions/s at batch 32, CPU ms per caption), at the
    service's thread setting."""
    from app.main import configure_inference_threads
    from captioning.captioner import Captioner

    configure_inference_threads(0)
    captioner = Captioner.load(artifacts, encoder_precision=os.environ["ENCODER_PRECISION"])  # as every server
    captioner.warmup()
    texts = [c[0].text for c in captioner.caption(pixels[:CHECKED_IMAGES])]
    best, best_cpu = 0.0, 0.0
    for _ in range(3):
        started, cpu = time.perf_counter(), time.process_time()
        captioner.caption(pixels, batch_size=32)
        rate = len(pixels) / (time.perf_counter() - started)
        if rate > best:
            best, best_cpu = rate, (time.process_time() - cpu) / len(pixels) * 1e3
    return texts, best, best_cpu


def versions(python: str) -> str:
    code = (
        "import importlib.metadata as m\n"
        "print(', '.join(f'{p} {m.version(p)}' for p in ('litserve', 'nvidia-pytriton', 'ray', 'tensorflow', 'numpy')))"
    )
    return subprocess.run([python, "-c", code], capture_output=True, text=True).stdout.strip()


SELF = "this service (continuous)"


def start_server(name: str, args, log_path: Path):
    if name == SELF:
        return harness.Server("continuous", args.artifacts, {}, log_path)
    return PeerServer(name, args.peers_python, args.artifacts, log_path)


def pooled(old: Row | None, new: Row) -> Row:
    if old is None:
        return new
    return Row(new.server, new.clients, new.neighbour, old.outcome.pooled_with(new.outcome), old.cpu_s + new.cpu_s)


async def run(args) -> int:
    log_dir = REPO / "bench" / "out"
    log_dir.mkdir(parents=True, exist_ok=True)
    pixels, pngs = harness.load_images(256)
    requests = [harness.caption_request(png) for png in pngs]
    expected, offline_per_s, offline_cpu_ms = await asyncio.to_thread(offline_reference, args.artifacts, pixels)
    print(f"offline limit {offline_per_s:.0f} captions/s, {offline_cpu_ms:.2f} ms CPU/caption", flush=True)
    load_before = " / ".join(f"{x:.2f}" for x in os.getloadavg())
    names = [SELF, *args.frameworks]
    rows: dict[tuple[str, int, bool], Row] = {}
    matches: dict[str, float] = {}
    for round_ in range(args.repeats):
        # Each server runs alone: idle, LitServe's workers and Ray's daemons keep using CPU
        # (15% and 10% of a core measured here), which would tax whichever server is being measured.
        # The order rotates from round to round, so that no server always gets the same stretch of time.
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            server = start_server(name, args, log_dir / f"peer-{name.split()[0]}-{round_}.log")
            try:
                ready = await server.wait_ready()
                if isinstance(server, harness.Server):  # the peers compile everything before they say ready
                    ready += await server.wait_warm()
                matches.setdefault(name, await check_captions(server, requests[:CHECKED_IMAGES], expected))
                print(
                    f"{name}: ready and compiled in {ready:.0f} s; captions equal to offline: {matches[name]:.0%}",
                    flush=True,
                )
                for clients in CLIENTS:
                    for neighbour in (False, True):
                        with NoisyNeighbour() if neighbour else contextlib.nullcontext():
                            before = tree_cpu_seconds(server.process.pid)
                            outcome = await closed_loop(server.port, requests, clients, args.duration, 1.0)
                            cpu = tree_cpu_seconds(server.process.pid) - before
                        key = (name, clients, neighbour)
                        rows[key] = pooled(rows.get(key), Row(name, clients, neighbour, outcome, cpu))
                        print(
                            f"  {name:28s} {clients} clients{' + neighbour' if neighbour else ''}: "
                            f"{outcome.served_per_s:.0f}/s",
                            flush=True,
                        )
            finally:
                server.stop()
    report = render(args, rows, matches, offline_per_s, offline_cpu_ms, load_before)
    args.output.write_text(report)
    print(report)
    return 0


def render(args, rows, matches, offline_per_s, offline_cpu_ms, load_before) -> str:
    from bench.load_test import cpu_model

    def cell(row: Row) -> str:
        o = row.outcome
        return (
            f"{o.served_per_s:.0f} ({percentile(o.latencies_s, 50) * 1e3:.0f} / "
            f"{percentile(o.latencies_s, 95) * 1e3:.0f})"
        )

    lines = [
        "# Peer benchmark",
        "",
        f"- Command: `{args.command}`",
        f"- Date: {dt.datetime.now().astimezone().isoformat(timespec='seconds')}",
        f"- Machine: {cpu_model()}, {os.cpu_count()} cores, shared by the servers, the client and the neighbour; "
        f"load average before {load_before}, after {' / '.join(f'{x:.2f}' for x in os.getloadavg())}",
        f"- Peers' environment (bench/.peers-venv): {versions(args.peers_python)}",
        f"- Every server: the project's compiled batch captioner, its encoder in {os.environ['ENCODER_PRECISION']} "
        f"(TF_ENABLE_ONEDNN_OPTS={os.environ.get('TF_ENABLE_ONEDNN_OPTS')}), batch 32, 5 ms batch wait, TensorFlow "
        f"intra-op threads = CPUs - 1; multipart PNG uploads (shapes test split); {args.duration:g} s phases after 1 s "
        f"warm-up, {args.repeats} rounds pooled; each server runs alone for its turn, the order rotating by round",
        "- Noisy neighbour: one CPU-bound Python process at the servers' priority",
        "",
        "captions/s (p50 / p95 ms); server CPU ms per caption over the server's process tree",
        "",
        "| server | captions equal to offline | 32 clients | 64 clients | CPU ms/caption @64 | "
        "32 + neighbour | 64 + neighbour |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name in dict.fromkeys(r.server for r in rows.values()):
        r = {(c, n): rows[(name, c, n)] for c in CLIENTS for n in (False, True) if (name, c, n) in rows}
        cpu = r[(64, False)].cpu_s / max(len(r[(64, False)].outcome.latencies_s), 1) * 1e3
        lines.append(
            f"| {name} | {matches.get(name, 0):.0%} | {cell(r[(32, False)])} | {cell(r[(64, False)])} | "
            f"{cpu:.2f} | {cell(r[(32, True)])} | {cell(r[(64, True)])} |"
        )
    lines.append(f"| offline limit, in-process, batch 32 | | {offline_per_s:.0f} | | {offline_cpu_ms:.2f} | | |")
    lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.peers", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--peers-python",
        type=os.path.abspath,  # the peers start in another working directory; not resolved: a venv's python is a link
        default=str(REPO / "bench" / ".peers-venv" / "bin" / "python"),
    )
    parser.add_argument("--frameworks", default="litserve,pytriton,ray")
    parser.add_argument("--artifacts", type=Path, default=DEFAULT_BUNDLE)
    parser.add_argument("--duration", type=float, default=6.0)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--output", type=Path, default=REPO / "bench" / "PEERS.md")
    args = parser.parse_args(argv)
    args.frameworks = [f for f in args.frameworks.split(",") if f]
    args.artifacts = args.artifacts.resolve()
    harness.encoder_like_the_service({})  # every server and the offline reference: one encoder
    args.command = "python -m bench.peers" + (" " + " ".join(sys.argv[1:]) if len(sys.argv) > 1 else "")
    return asyncio.run(run(args))


if __name__ == "__main__":
    sys.exit(main())
