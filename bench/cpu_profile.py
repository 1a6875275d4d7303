"""Where the server's CPU goes, per thread, under load: the profile behind the benchmark's verdicts.

    python -m bench.cpu_profile [--mode continuous] [--clients 32] [--duration 8] [--upload multipart|raw]

Runs the real service (app.__main__.main) under a wrapper that records which OS thread is which
Python thread, drives it like bench.load_test's closed loop, and splits the server's CPU time
(from /proc/PID/task/*/stat) into: the event loop (HTTP, multipart, JSON, small-image decoding),
the decoder thread (engine bookkeeping, searches, and the TensorFlow ops it runs inline), the
encoder thread, the domain check's statistics thread, the decode pool's threads (large-image
decoding, app/decode_pool.py) and TensorFlow's own native threads.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import threading
import time
from collections import Counter
from pathlib import Path

THREAD_MAP_ENV = "BENCH_THREAD_MAP"


def serve() -> int:
    """The service, plus a daemon thread that writes {native thread id: Python thread name}."""
    path = Path(os.environ[THREAD_MAP_ENV])

    def record_threads() -> None:
        for _ in range(100_000):
            names = {t.native_id: t.name for t in threading.enumerate() if t.native_id is not None}
            path.write_text(json.dumps(names))
            time.sleep(1.0)

    threading.Thread(target=record_threads, name="bench-thread-map", daemon=True).start()
    from app.__main__ import main

    return main()


def thread_group(name: str | None) -> str:
    if name is None:
        return "TensorFlow native threads"
    if name == "MainThread":
        return "event loop (HTTP)"
    if name.startswith("inference-encoder"):
        return "encoder thread (continuous)"
    if name.startswith("engine-domain-statistics"):
        return "domain statistics thread"
    if name.startswith("inference"):
        return "decoder thread"
    if name.startswith("decode") or "AnyIO" in name or name.startswith(("ThreadPoolExecutor", "asyncio")):
        return "decode pool and worker threads (large-image decoding)"
    return "other"


def thread_cpu_seconds(pid: int) -> dict[int, float]:
    ticks = os.sysconf("SC_CLK_TCK")
    seconds = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            fields = Path(f"/proc/{pid}/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        seconds[int(tid)] = (int(fields[11]) + int(fields[12])) / ticks
    return seconds


async def profile(
    mode: str,
    clients: int,
    duration_s: float,
    artifacts: Path,
    requests: list[bytes],
    log_dir: Path,
    extra_env: dict[str, str] | None = None,
) -> tuple[dict[str, float], float]:
    """Per-caption CPU milliseconds by thread group, and captions/s, for one closed-loop phase."""
    from bench import harness

    map_path = log_dir / f"threads-{mode}.json"
    server = harness.Server(
        mode,
        artifacts,
        {THREAD_MAP_ENV: str(map_path), **(extra_env or {})},
        log_dir / f"server-profile-{mode}.log",
        module="bench.cpu_profile",
        extra_args=["--serve"],
    )
    try:
        await server.wait_ready()
        await server.wait_warm()
        await harness.closed_loop(server.port, requests, clients, 1.0, 0.0)  # settle
        before = thread_cpu_seconds(server.process.pid)
        outcome = await harness.closed_loop(server.port, requests, clients, duration_s, 0.0)
        after = thread_cpu_seconds(server.process.pid)
        names = {int(k): v for k, v in json.loads(map_path.read_text()).items()}
    finally:
        server.stop()
    done = max(len(outcome.latencies_s), 1)
    groups: Counter[str] = Counter()
    for tid, seconds in after.items():
        groups[thread_group(names.get(tid))] += seconds - before.get(tid, 0.0)
    return {group: seconds / done * 1e3 for group, seconds in groups.most_common()}, outcome.served_per_s


def main() -> int:
    from bench.harness import DEFAULT_BUNDLE

    parser = argparse.ArgumentParser(prog="python -m bench.cpu_profile", description=__doc__.split("\n\n")[0])
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--mode", default="continuous")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--duration", type=float, default=8.0)
    parser.add_argument("--artifacts", type=Path, default=DEFAULT_BUNDLE)
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument(
        "--upload",
        choices=("multipart", "raw"),
        default="multipart",
        help="POST /caption body: a form or the PNG itself",
    )
    args = parser.parse_args()
    if args.serve:
        return serve()
    from bench import harness

    _, pngs = harness.load_images(64)
    requests = [harness.caption_request(png, args.upload) for png in pngs]
    log_dir = harness.REPO / "bench" / "out"
    log_dir.mkdir(parents=True, exist_ok=True)
    env = dict(item.split("=", 1) for item in args.env)
    groups, throughput = asyncio.run(
        profile(args.mode, args.clients, args.duration, args.artifacts.resolve(), requests, log_dir, env)
    )
    print(f"{args.mode}, {args.clients} clients, {args.upload} uploads: {throughput:.1f} captions/s")
    print("server CPU per caption:")
    for group, ms in groups.items():
        print(f"  {ms:6.2f} ms  {group}")
    print(f"  {sum(groups.values()):6.2f} ms  total")
    return 0


if __name__ == "__main__":
    sys.exit(main())
