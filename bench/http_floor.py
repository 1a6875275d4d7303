"""The floor of the serving stack: what FastAPI + uvicorn cost per caption request with no model.

    python -m bench.http_floor                      # ~2 minutes; prints a table
    python -m bench.http_floor --artifacts model_artifacts/default/7 --rounds 3

Engine targets are ratios to in-process figures (1-client p50 <= 1.2x the in-process single-image
time, server CPU <= 1.25x the offline CPU per caption, event-loop CPU <= 0.5 ms per caption). Part of
every request's cost is not the engine's at all: uvicorn's HTTP parsing, FastAPI's multipart parsing
and routing, the PNG decode and resize, the JSON answer. This runs two servers without a model on
the same stack (`python -m bench.http_floor serve`), the real service, and the in-process
references, in one run with the same client and uploads, rounds taking turns, so that what no
engine change can remove is measured beside what the service costs:

  floor: HTTP     POST /caption: uvicorn + FastAPI + the multipart upload read, a fixed JSON answer
  floor: decode   the same, plus the PNG decode and resize to the model's input the service does
  this service    `python -m app` (BATCHING_MODE=continuous), the real engine and model

A floor server runs everything on its event loop, so its CPU per request is event-loop CPU.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

from fastapi import FastAPI, File, UploadFile  # noqa: E402 - at module level: the route's annotations name them

from bench.harness import (  # noqa: E402
    DEFAULT_BUNDLE,
    REPO,
    Server,
    caption_request,
    closed_loop,
    cpu_seconds,
    encoder_like_the_service,
    load_images,
)
from bench.load_test import measure_references  # noqa: E402
from captioning.config import ModelConfig  # noqa: E402

FLOORS = ("http", "decode")


# ------------------------------------------------------------------------------- the floor server


def create_floor_app(decode: bool, image_size: int):
    """A FastAPI app with the service's upload route shape and no model."""
    from PIL import Image

    from captioning.preprocess import model_input

    app = FastAPI()
    answer = {"captions": [{"text": "there is a red circle", "confidence": 0.9}], "in_domain": True}

    @app.get("/health/ready")
    async def ready() -> dict:
        return {"status": "ready"}

    @app.post("/caption")
    async def caption(image: UploadFile = File(...)) -> dict:
        data = await image.read()
        if decode:
            with Image.open(io.BytesIO(data)) as opened:
                pixels = model_input(opened.convert("RGB"), image_size)
            return {**answer, "width": int(pixels.shape[1])}
        return {**answer, "bytes": len(data)}

    return app


def serve() -> int:
    import uvicorn

    floor = os.environ.get("FLOOR", "http")
    if floor not in FLOORS:
        raise SystemExit(f"FLOOR must be one of {FLOORS}")
    app = create_floor_app(floor == "decode", int(os.environ.get("IMAGE_SIZE", "96")))
    uvicorn.run(
        app,
        host=os.environ.get("HOST", "127.0.0.1"),
        port=int(os.environ["PORT"]),
        log_level="warning",
        access_log=False,
        server_header=False,
    )
    return 0


# ------------------------------------------------------------------------------- the measurement


@dataclass
class Row:
    label: str
    server: Server
    one_client_ms: list[float] = field(default_factory=list)  # p50 of each round
    per_s: list[float] = field(default_factory=list)  # 32-client throughput of each round
    cpu_ms: list[float] = field(default_factory=list)  # server CPU per request at 32 clients


def in_process_references(artifacts: Path, pixels: list):
    """bench.load_test's references (so that the two tables mean the same thing), with the encoder
    the service started next will run (ENCODER_PRECISION resolved before TensorFlow loads)."""
    return measure_references(artifacts, pixels, True, 0, encoder_like_the_service({}))


async def measure(row: Row, requests: list[bytes], duration_s: float) -> None:
    one = await closed_loop(row.server.port, requests, 1, duration_s, 1.0)
    row.one_client_ms.append(statistics.median(one.latencies_s) * 1e3)
    cpu_before = cpu_seconds(row.server.process.pid)
    many = await closed_loop(row.server.port, requests, 32, duration_s, 0.0)
    row.cpu_ms.append((cpu_seconds(row.server.process.pid) - cpu_before) / max(1, many.total) * 1e3)
    row.per_s.append(many.served_per_s)
    if many.errors or one.errors:
        print(f"  {row.label}: {one.errors + many.errors} errors", flush=True)


async def run(args) -> int:
    log_dir = REPO / "bench" / "out"
    log_dir.mkdir(parents=True, exist_ok=True)
    pixels, pngs = load_images(256)
    requests = [caption_request(png) for png in pngs]
    print("in-process references ...", flush=True)
    references = await asyncio.to_thread(in_process_references, args.artifacts, pixels)
    single_ms, offline_cpu_ms = references.one_image_ms, references.offline_cpu_ms
    image_size = ModelConfig.load(args.artifacts / "config.json").image_size  # the floor resizes as the service does
    rows: list[Row] = []
    try:
        for floor in FLOORS:
            server = Server(
                f"floor-{floor}",
                args.artifacts,
                {"FLOOR": floor, "IMAGE_SIZE": str(image_size)},
                log_dir / f"floor-{floor}.log",
                module="bench.http_floor",
                extra_args=["serve"],
            )
            rows.append(Row(f"floor: {floor}", server))
        rows.append(Row("this service", Server("continuous", args.artifacts, {}, log_dir / "floor-service.log")))
        for row in rows:
            await row.server.wait_ready()
            await row.server.wait_warm()  # the floors have nothing to compile: no such series, no wait
            await closed_loop(row.server.port, requests, 4, 1.0, 0.0)  # first passes through each path
        for round_ in range(args.rounds):
            for row in rows:
                await measure(row, requests, args.duration)
            print(f"round {round_ + 1}/{args.rounds} done", flush=True)
    finally:
        for row in rows:
            row.server.stop()
    print(render(rows, single_ms, offline_cpu_ms, args))
    return 0


def render(rows: list[Row], single_ms: float, offline_cpu_ms: float, args) -> str:
    med = statistics.median
    lines = [
        f"HTTP floor, {args.rounds} rounds of {args.duration:.0f} s (medians), model {args.artifacts}, "
        f"load average before {os.getloadavg()[0]:.2f}",
        "",
        "| | 1 client p50 ms | 32 clients captions/s | server CPU ms/request @32 |",
        "|---|---:|---:|---:|",
        f"| in-process (no HTTP) | {single_ms:.1f} (one image) | | {offline_cpu_ms:.2f} (offline, best batch) |",
    ]
    for row in rows:
        lines.append(f"| {row.label} | {med(row.one_client_ms):.1f} | {med(row.per_s):.0f} | {med(row.cpu_ms):.2f} |")
    http, decode = rows[0], rows[1]
    lines += [
        "",
        f"1-client target (1.2x in-process): {1.2 * single_ms:.1f} ms, i.e. {0.2 * single_ms:.1f} ms for everything "
        f"that is not the model; the HTTP floor alone answers in {med(http.one_client_ms):.1f} ms, "
        f"with the decode {med(decode.one_client_ms):.1f} ms.",
        f"CPU target (1.25x offline): {1.25 * offline_cpu_ms:.2f} ms per caption, i.e. {0.25 * offline_cpu_ms:.2f} ms "
        f"beside the model; the HTTP floor alone costs {med(http.cpu_ms):.2f} ms, with the decode "
        f"{med(decode.cpu_ms):.2f} ms.",
        f"Event-loop target: 0.5 ms per caption; the HTTP floor's event loop costs {med(http.cpu_ms):.2f} ms.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["serve"]:
        return serve()
    parser = argparse.ArgumentParser(prog="python -m bench.http_floor", description=__doc__.split("\n\n")[0])
    parser.add_argument("--artifacts", type=Path, default=DEFAULT_BUNDLE)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per phase")
    return asyncio.run(run(parser.parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
