"""Shared helpers for the service tests: upload builders and a tiny random-weights model bundle.

No tests live here; the service and end-to-end tests import it (`import uploads`; tests/ is on the path)
(pytest puts this rootless tests/ directory on sys.path).
"""

from __future__ import annotations

import contextlib
import io
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

from bench.attack import png_chunk

RED, BLUE, WHITE = (220, 30, 30), (30, 60, 230), (255, 255, 255)


def encode(image: Image.Image, format: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format, **options)
    return buffer.getvalue()


def solid(colour=RED, size=(32, 24), mode="RGB") -> Image.Image:
    return Image.new("RGB", size, colour).convert(mode)


def png(colour=RED, size=(32, 24)) -> bytes:
    return encode(solid(colour, size), "PNG")


def jpeg(colour=RED, size=(32, 24), **options) -> bytes:
    return encode(solid(colour, size), "JPEG", quality=95, **options)


def half_and_half(size=(40, 20)) -> Image.Image:
    """Left half red, right half blue: shows which way an image was rotated."""
    pixels = np.zeros((size[1], size[0], 3), np.uint8)
    pixels[:, : size[0] // 2] = RED
    pixels[:, size[0] // 2 :] = BLUE
    return Image.fromarray(pixels)


def exif_rotated_jpeg(orientation: int = 6) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(half_and_half(), "JPEG", quality=95, exif=exif)


def rgba_png_with_hidden_black() -> bytes:
    """Fully transparent pixels whose colour is black: must come out white, not black."""
    pixels = np.zeros((16, 16, 4), np.uint8)
    pixels[:8, :, :] = (*RED, 255)  # top half opaque red, bottom half transparent black
    return encode(Image.fromarray(pixels, "RGBA"), "PNG")


def la_png() -> bytes:
    pixels = np.zeros((16, 16, 2), np.uint8)
    pixels[..., 0] = 100
    pixels[..., 1] = 0
    return encode(Image.fromarray(pixels, "LA"), "PNG")


def cmyk_jpeg() -> bytes:
    return encode(solid(RED, (24, 24), "CMYK"), "JPEG", quality=95)


def sixteen_bit_png(level: int = 40000) -> bytes:
    return encode(Image.fromarray(np.full((16, 16), level, np.uint16)), "PNG")


def one_bit_bmp() -> bytes:
    image = Image.new("1", (16, 16), 0)
    image.paste(1, (0, 0, 8, 16))
    return encode(image, "BMP")


def grey_tiff() -> bytes:
    return encode(Image.new("L", (16, 16), 128), "TIFF")


def webp() -> bytes:
    return encode(solid(BLUE, (16, 16)), "WEBP", lossless=True)


def palette_gif_with_transparency() -> bytes:
    image = Image.new("P", (16, 16), 0)
    image.putpalette([0, 0, 0, *RED] + [0] * (256 * 3 - 6))
    image.paste(1, (0, 0, 16, 8))
    return encode(image, "GIF", transparency=0)


def animated_gif() -> bytes:
    """Red first frame, then blue: only the first frame counts."""
    frames = [solid(RED, (16, 16)), solid(BLUE, (16, 16))]
    return encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)


def ico() -> bytes:
    return encode(solid(RED, (16, 16)), "ICO")


SVG = b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>'
TEXT = b"this is a plain text file, not an image\n"


def noise(size=(64, 64), seed=0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), np.uint8))


def corrupt_png() -> bytes:
    """A valid PNG signature and header, with the compressed pixel data scrambled."""
    data = bytearray(encode(noise(), "PNG"))
    middle = len(data) // 2
    data[middle : middle + 64] = bytes(range(64))
    return bytes(data)


def truncated_jpeg() -> bytes:
    data = encode(noise(), "JPEG")
    return data[: len(data) // 2]


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height but whose pixel data is a few bytes: what a
    decompression bomb looks like to a header check (the pixels are never read)."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", header)
        + png_chunk(b"IDAT", zlib.compress(b"\x00" * 16))
        + png_chunk(b"IEND", b"")
    )


def bomb_png() -> bytes:
    """Really compressible: a 10000 x 10000 all-black PNG (100 M pixels) is under 100 kB."""
    return encode(Image.new("1", (10000, 10000), 0), "PNG", optimize=True)


def many_scan_jpeg(size=(256, 256), scans: int = 2000) -> bytes:
    """A progressive JPEG whose first scan header is repeated with no data after it: libjpeg only
    warns, and walks every block of the image once per scan, so the decode's cost is blocks x
    scans (an audit's 9 MB file at 1024x1024 took 110 s)."""
    data = encode(noise(size), "JPEG", progressive=True, quality=90)
    end = data.index(b"\xff\xda")  # the first scan's header: length-prefixed, data after it
    header = data[end : end + 2 + struct.unpack(">H", data[end + 2 : end + 4])[0]]
    return data[:-2] + header * scans + b"\xff\xd9"


def flat_grey_jpeg(size: int = 64, interleaved: bool = True) -> bytes:
    """A flat baseline JPEG of three full-resolution components, written by hand: in one scan, or
    one scan per component (non-interleaved), which makes libjpeg keep the whole image's
    coefficients as a progressive file does. Every block is DC 0 and end-of-block."""

    def segment(marker: int, payload: bytes) -> bytes:
        return b"\xff" + bytes([marker]) + struct.pack(">H", len(payload) + 2) + payload

    def blocks_data(blocks: int) -> bytes:  # per block: DC category 0 ("00"), EOB ("1010")
        bits = "001010" * blocks
        bits += "1" * (-len(bits) % 8)
        return int(bits, 2).to_bytes(len(bits) // 8, "big")

    dc_bits, dc_values = [0, 1, 5, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0], bytes(range(12))
    ac_bits = [0, 2, 1, 3, 3, 2, 4, 3, 5, 5, 4, 4, 0, 0, 1, 0x7D]
    ac_values = bytes([0x01, 0x02, 0x03, 0x00, 0x04, 0x11, 0x05, 0x12, 0x21, 0x31, 0x41, 0x06, 0x13, 0x51, 0x61, 0x07])
    ac_values += bytes(range(0x08, 0x08 + 162 - 16))  # any distinct symbols: only EOB (0x00) is used
    data = b"\xff\xd8" + segment(0xDB, b"\x00" + bytes([1] * 64))
    data += segment(0xC0, struct.pack(">BHHB", 8, size, size, 3) + b"".join(bytes([i, 0x11, 0]) for i in (1, 2, 3)))
    data += segment(0xC4, b"\x00" + bytes(dc_bits) + dc_values) + segment(0xC4, b"\x10" + bytes(ac_bits) + ac_values)
    blocks = (size // 8) ** 2
    if interleaved:
        data += segment(0xDA, b"\x03" + b"".join(bytes([i, 0]) for i in (1, 2, 3)) + b"\x00\x3f\x00")
        data += blocks_data(3 * blocks)
    else:
        for component in (1, 2, 3):
            data += segment(0xDA, b"\x01" + bytes([component, 0]) + b"\x00\x3f\x00") + blocks_data(blocks)
    return data + b"\xff\xd9"


def mean_colour(pixels: np.ndarray) -> tuple[int, ...]:
    return tuple(int(round(v)) for v in pixels.reshape(-1, 3).mean(axis=0))


# --- a tiny model bundle --------------------------------------------------------------------

_CAPTIONS = [
    "a red circle",
    "a blue square",
    "two green triangles",
    "a large yellow diamond",
    "a small purple cross is to the left of an orange circle",
    "an orange circle is to the right of a small purple cross",
    "there are three red squares",
    "a blue circle is above a red square and there is a green triangle",
]


def build_tiny_bundle(directory: Path) -> Path:
    """The service tests' bundle: random weights, real format, seeded, every caption max_length words."""
    from conftest import make_tiny_bundle

    return make_tiny_bundle(
        directory,
        captions=_CAPTIONS,
        seed=1234,
        never_end=True,
        backbone="small_cnn",
        name="tiny-test-captioner",
        version="0.0.1",
        training={"command": "tests/uploads.py build_tiny_bundle", "dataset": {"name": "shapes", "train_images": 0}},
        metrics={"test": {"exact_match": 0.0}},
    )


@contextlib.contextmanager
def tiny_service(tmp_path_factory, api_key: str, **settings):
    """A TestClient over the app serving build_tiny_bundle's model, keyed with `api_key`."""
    from fastapi.testclient import TestClient

    from app.main import create_app
    from app.settings import Settings

    bundle = build_tiny_bundle(tmp_path_factory.mktemp("artifacts") / "tiny")
    app = create_app(Settings(artifacts_dir=bundle, api_key=api_key, max_upload_bytes=200_000, **settings))
    with TestClient(app, headers={"X-API-Key": api_key}) as client:
        yield client
