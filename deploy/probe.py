"""Standard-library checks for deploy/container-test.sh (the host needs no project dependencies).

python3 deploy/probe.py caption URL     POST a generated PNG as the multipart field `image`
python3 deploy/probe.py json-lines      every non-empty line on stdin is one JSON object
"""

from __future__ import annotations

import json
import struct
import sys
import urllib.request
import uuid
import zlib


def png(width: int = 64, height: int = 48) -> bytes:
    """A red square on a blue background, encoded as an RGB PNG."""
    rows = []
    for y in range(height):
        row = bytearray([0])  # filter type: none
        for x in range(width):
            inside = width // 4 <= x < 3 * width // 4 and height // 4 <= y < 3 * height // 4
            row += bytes((220, 30, 30) if inside else (30, 60, 200))
        rows.append(bytes(row))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"".join(rows)))
        + chunk(b"IEND", b"")
    )


def caption(url: str) -> int:
    boundary = uuid.uuid4().hex
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="probe.png"\r\n'
            f"Content-Type: image/png\r\n\r\n"
        ).encode()
        + png()
        + f"\r\n--{boundary}--\r\n".encode()
    )
    request = urllib.request.Request(
        url, data=body, method="POST", headers={"Content-Type": f"multipart/form-data; boundary={boundary}"}
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        status, payload = response.status, json.load(response)
    text = payload.get("caption")
    if status != 200 or not isinstance(text, str) or not text.strip():
        print(f"unexpected response {status}: {payload}", file=sys.stderr)
        return 1
    print(f"POST /caption 200: {text!r}")
    return 0


def json_lines() -> int:
    count = 0
    for number, line in enumerate(sys.stdin, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if not isinstance(record, dict):
            print(f"log line {number} is not a JSON object: {line.rstrip()[:200]}", file=sys.stderr)
            return 1
        count += 1
    print(f"{count} log lines, all JSON")
    return 0 if count else 1


if __name__ == "__main__":
    command = sys.argv[1] if len(sys.argv) > 1 else ""
    if command == "caption" and len(sys.argv) == 3:
        sys.exit(caption(sys.argv[2]))
    if command == "json-lines":
        sys.exit(json_lines())
    sys.exit(__doc__)
