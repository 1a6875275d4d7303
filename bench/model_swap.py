"""Hot reload under load: a new version dropped into the repository, a corrupt one, a rollback by pin.

    python -m bench.model_swap [--clients 4] [--phase-s 12] [--cycles 3]

Serves a temporary repository (version 1: `--v1`, model_artifacts/default/1 unless given) with `python -m app`
polling it every second, and keeps `--clients` closed-loop clients posting /caption throughout,
each response recording its status, latency and the model version that answered. Then:

  1. baseline: version 1 only;
  2. version 2 (the ShapeWorld bundle, a different model) appears, staged and renamed into place:
     the poll loads and warms it beside version 1, swaps, and version 1 is unloaded;
  3. version 3 appears corrupt (a truncated encoder): it is refused, version 2 keeps serving;
  4. rollback: POST /admin/reload {"version_policy": "specific:1"};
  5. --cycles more swaps between the pin and latest:1, to see whether unloading frees memory.

Prints failed requests per phase, latency percentiles before, during (the new version's load and
warm-up) and after each swap, the largest latency in the 2 s around the swap itself, the server's
load / warm-up times from /metrics, and the server's RSS after each step.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.harness import (
    HOST,
    REPO,
    SERVER_START_TIMEOUT_S,
    Connection,
    caption_request,
    free_port,
    http_get,
    load_images,
    metric_samples,
    percentile,
    rss_mib,
)

API_KEY = "bench-admin-key"


@dataclass
class Sample:
    sent: float  # seconds since the run started
    latency_s: float
    status: int
    version: str | None


@dataclass
class Run:
    started: float = field(default_factory=time.perf_counter)
    samples: list[Sample] = field(default_factory=list)
    marks: dict[str, float] = field(default_factory=dict)
    rss: dict[str, float] = field(default_factory=dict)
    stop: bool = False

    def now(self) -> float:
        return time.perf_counter() - self.started

    def mark(self, name: str) -> None:
        self.marks[name] = self.now()


async def client(port: int, requests: list[bytes], offset: int, run: Run) -> None:
    connection, index = Connection(port), offset
    while not run.stop:
        sent = run.now()
        raw = requests[index % len(requests)]
        index += 1
        try:
            status, body = await asyncio.wait_for(connection.request(raw), 60)
            version = json.loads(body)["model"]["version"] if status == 200 else None
        except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, ValueError):
            status, version = 0, None
            connection.close()
        run.samples.append(Sample(sent, run.now() - sent, status, version))
    connection.close()


async def post_json(port: int, path: str, payload: dict) -> tuple[int, dict]:
    body = json.dumps(payload).encode()
    raw = (
        f"POST {path} HTTP/1.1\r\nHost: {HOST}\r\nX-API-Key: {API_KEY}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    connection = Connection(port)
    try:
        status, answer = await asyncio.wait_for(connection.request(raw), 300)
        return status, json.loads(answer)
    finally:
        connection.close()


async def metric_values(port: int, name: str) -> dict[str, float]:
    """Each sample of captioning_<name>, keyed by its labels as the exposition writes them."""
    _, text = await http_get(port, "/metrics")
    return {
        ",".join(f'{key}="{value}"' for key, value in sorted(labels.items())): value
        for labels, value in metric_samples(text, f"captioning_{name}")
    }


async def wait_for_version(run: Run, version: str, timeout_s: float = 300) -> None:
    deadline = time.perf_counter() + timeout_s
    while time.perf_counter() < deadline:
        if any(s.version == version for s in run.samples[-8:]):
            return
        await asyncio.sleep(0.05)
    raise RuntimeError(f"version {version} never answered")


def stage(source: Path, model_dir: Path, version: int) -> Path:
    """Copies a bundle in as a deployment should: under a non-version name, then one rename."""
    staging = model_dir / f".staging-{version}"
    shutil.copytree(source, staging)
    return staging.rename(model_dir / str(version))


def window(run: Run, start: float, end: float) -> list[Sample]:
    return [s for s in run.samples if start <= s.sent < end]


def describe(samples: list[Sample]) -> str:
    ok = [s.latency_s * 1000 for s in samples if s.status == 200]
    failed = len(samples) - len(ok)
    versions = sorted({s.version for s in samples if s.version})
    return (
        f"{len(samples):5d} requests, {failed} failed, versions {','.join(versions) or '-'}; latency ms "
        f"p50 {percentile(ok, 50):7.1f}  p95 {percentile(ok, 95):7.1f}  p99 {percentile(ok, 99):7.1f}  "
        f"max {max(ok, default=float('nan')):7.1f}"
    )


async def main_async(args) -> int:
    root = Path(tempfile.mkdtemp(prefix="model-swap-"))
    model_dir = root / "default"
    stage(args.v1, model_dir, 1)
    port = free_port()
    env = {
        **os.environ,
        "MODEL_REPOSITORY": str(root),
        "MODEL_NAME": "default",
        "MODEL_POLL_INTERVAL_S": "1",
        "API_KEY": API_KEY,
        "PORT": str(port),
        "HOST": HOST,
        "LOG_LEVEL": "WARNING",
        "PYTHONPATH": str(REPO),
    }
    env.pop("ARTIFACTS_DIR", None)
    log = open(root / "server.log", "wb")  # noqa: SIM115 - the server writes to it for the whole run
    server = subprocess.Popen([sys.executable, "-m", "app"], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    run = Run()
    try:
        deadline = time.perf_counter() + SERVER_START_TIMEOUT_S
        while True:
            if server.poll() is not None:
                raise RuntimeError(f"the server exited; see {log.name}")
            try:
                if (await http_get(port, "/health/ready"))[0] == 200:
                    break
            except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError):
                pass
            if time.perf_counter() > deadline:
                raise RuntimeError("the server did not become ready")
            await asyncio.sleep(0.25)
        _, pngs = load_images(64)
        requests = [caption_request(png).replace(b"\r\n", f"\r\nX-API-Key: {API_KEY}\r\n".encode(), 1) for png in pngs]
        run = Run()
        clients = [asyncio.create_task(client(port, requests, i * 7, run)) for i in range(args.clients)]
        await asyncio.sleep(args.phase_s)
        if not any(s.status == 200 for s in run.samples):
            raise RuntimeError(f"no request succeeded: statuses {sorted({s.status for s in run.samples})}")
        run.rss["version 1 serving"] = rss_mib(server.pid)

        run.mark("v2 dropped")
        stage(args.v2, model_dir, 2)
        peak = run.rss["version 1 serving"]
        deadline = time.perf_counter() + SERVER_START_TIMEOUT_S
        while not any(s.version == "2" for s in run.samples[-8:]):
            if server.poll() is not None or time.perf_counter() > deadline:
                raise RuntimeError(f"version 2 never answered within {SERVER_START_TIMEOUT_S} s; see {log.name}")
            peak = max(peak, rss_mib(server.pid))
            await asyncio.sleep(0.1)
        run.mark("v2 first answer")
        first_load = await metric_values(port, "model_load_seconds")
        await asyncio.sleep(args.phase_s)
        run.rss["peak while both loaded"] = peak
        run.rss["version 2 serving (1 unloaded)"] = rss_mib(server.pid)

        run.mark("v3 corrupt dropped")
        corrupt = model_dir / ".staging-3"
        shutil.copytree(args.v1, corrupt)
        encoder = corrupt / "encoder.keras"
        encoder.write_bytes(encoder.read_bytes()[: encoder.stat().st_size // 2])
        corrupt.rename(model_dir / "3")
        await asyncio.sleep(args.phase_s)
        run.mark("rollback")
        status, report = await post_json(port, "/admin/reload", {"version_policy": "specific:1"})
        if status != 200:
            raise RuntimeError(f"rollback failed: {status} {report}")
        run.mark("rollback answered")
        await wait_for_version(run, "1")
        await asyncio.sleep(args.phase_s)
        run.rss["rolled back to 1 (2 unloaded)"] = rss_mib(server.pid)
        run.mark("cycles")
        for cycle in range(args.cycles):
            for policy in ("latest:1", "specific:1"):
                status, _ = await post_json(port, "/admin/reload", {"version_policy": policy})
                if status != 200:
                    raise RuntimeError(f"reload to {policy} failed: {status}")
                await asyncio.sleep(2)
            run.rss[f"after swap cycle {cycle + 1} (1 serving)"] = rss_mib(server.pid)
        run.mark("end")
        run.stop = True
        await asyncio.gather(*clients)
        loads = await metric_values(port, "model_load_seconds")
        outcomes = await metric_values(port, "model_loads_total")
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()

    m = run.marks
    print(
        f"clients {args.clients}, phase {args.phase_s:.0f} s, cpus {os.cpu_count()}, load average "
        f"{os.getloadavg()[0]:.2f}; server log {log.name}"
    )
    phases = [
        ("1 baseline (version 1)", 0, m["v2 dropped"]),
        ("2 version 2 loading + warm-up", m["v2 dropped"], m["v2 first answer"]),
        ("2 after the swap (version 2)", m["v2 first answer"], m["v3 corrupt dropped"]),
        ("3 corrupt version 3 dropped", m["v3 corrupt dropped"], m["rollback"]),
        ("4 rollback call in flight", m["rollback"], m["rollback answered"]),
        ("4 after rollback", m["rollback answered"], m["cycles"]),
        (f"5 {args.cycles} swap cycles", m["cycles"], m["end"]),
    ]
    for name, start, end in phases:
        print(f"{name:32s} {end - start:6.1f} s  {describe(window(run, start, end))}")
    swap = m["v2 first answer"]
    print(f"{'around the swap (+-1 s)':32s} {2.0:6.1f} s  {describe(window(run, swap - 1, swap + 1))}")
    print(f"{'whole run':32s} {m['end']:6.1f} s  {describe(run.samples)}")
    for labels, value in sorted(first_load.items()):
        print(f"load time at the first swap {labels}: {value:.2f} s")
    for labels, value in sorted(loads.items()):
        print(f"load time of the last load {labels}: {value:.2f} s")
    for labels, value in sorted(outcomes.items()):
        print(f"loads {labels}: {value:.0f}")
    for name, value in run.rss.items():
        print(f"RSS {name:36s} {value:7.1f} MiB")
    failed = sum(1 for s in run.samples if s.status != 200)
    print(f"failed requests: {failed} of {len(run.samples)}")
    shutil.rmtree(root, ignore_errors=True)
    return 0 if failed == 0 else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.model_swap", description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--phase-s", type=float, default=12.0, help="seconds of load in each steady phase")
    parser.add_argument("--cycles", type=int, default=3, help="extra pin/unpin swaps for the memory check")
    parser.add_argument("--v1", type=Path, default=REPO / "model_artifacts" / "default" / "1")
    parser.add_argument("--v2", type=Path, default=REPO / "model_artifacts" / "shapeworld" / "1")
    return asyncio.run(main_async(parser.parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
