"""What reading an upload costs the event loop: a multipart form against the raw body.

    python -m bench.upload_cost [--sizes 20000,1000000,8000000]

POST /caption takes the image as the multipart field `image` or as the whole body (`Content-Type:
image/*`). Both are read on the event loop, where every other request waits meanwhile. This reads
bodies of each size the way the service does (Starlette's `Request.form()` / `Request.body()`, fed
in 64 KiB messages as uvicorn delivers them) and prints the CPU time per upload, both ways.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time

from starlette.requests import Request

from bench.harness import BOUNDARY, multipart_body

CHUNK = 64 * 1024


async def read_once(body: bytes, content_type: bytes) -> bytes:
    offset = 0

    async def receive() -> dict:
        nonlocal offset
        chunk = body[offset : offset + CHUNK]
        offset += CHUNK
        return {"type": "http.request", "body": chunk, "more_body": offset < len(body)}

    headers = [(b"content-type", content_type), (b"content-length", str(len(body)).encode())]
    request = Request({"type": "http", "method": "POST", "path": "/caption", "headers": headers}, receive)
    if content_type.startswith(b"multipart/"):
        form = await request.form(max_part_size=len(body))
        data = await form["image"].read()
        await form.close()
        return data
    return await request.body()


async def cpu_ms_per_upload(data: bytes, raw: bool, repeats: int) -> float:
    body, content_type = (
        (data, b"image/png") if raw else (multipart_body(data), f"multipart/form-data; boundary={BOUNDARY}".encode())
    )
    assert await read_once(body, content_type) == data
    started = time.process_time()
    for _ in range(repeats):
        await read_once(body, content_type)
    return (time.process_time() - started) / repeats * 1e3


async def run(sizes: list[int]) -> None:
    print("| upload | multipart form, CPU ms | raw body, CPU ms | ratio |")
    print("|---:|---:|---:|---:|")
    for size in sizes:
        data = os.urandom(size)
        repeats = max(5, 20_000_000 // size)
        form_ms = await cpu_ms_per_upload(data, False, repeats)
        raw_ms = await cpu_ms_per_upload(data, True, repeats)
        print(f"| {size:,} bytes | {form_ms:.3f} | {raw_ms:.3f} | {form_ms / raw_ms:.1f}x |")


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.upload_cost", description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="20000,1000000,8000000", help="comma-separated body sizes in bytes")
    args = parser.parse_args()
    asyncio.run(run([int(size) for size in args.sizes.split(",")]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
