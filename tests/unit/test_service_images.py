"""Upload decoding: formats judged by bytes, every pixel mode to RGB, limits before decoding."""

from __future__ import annotations

import zlib

import numpy as np
import pytest
import uploads
from PIL import Image

from app.errors import ImageTooComplex, ImageTooLarge, ImageTooSmall, InvalidImage, UnsupportedImageFormat
from app.images import decode_bytes, decode_opened, decode_upload, open_upload, sniff_other_image_format
from bench.attack import many_strips_tiff, png_chunk, with_chunks
from captioning.preprocess import to_rgb

LIMITS = {"max_pixels": 40_000_000, "min_side": 8}


def decode(data: bytes, **overrides):
    return decode_upload(data, **{**LIMITS, **overrides})


def pixels_of(decoded) -> np.ndarray:
    assert decoded.image.mode == "RGB"
    return np.asarray(decoded.image)


@pytest.mark.parametrize(
    ("data", "format", "size"),
    [
        (uploads.png(size=(32, 24)), "PNG", (32, 24)),
        (uploads.jpeg(size=(32, 24)), "JPEG", (32, 24)),
        (uploads.webp(), "WEBP", (16, 16)),
        (uploads.animated_gif(), "GIF", (16, 16)),
        (uploads.one_bit_bmp(), "BMP", (16, 16)),
        (uploads.grey_tiff(), "TIFF", (16, 16)),
    ],
)
def test_allowed_formats_decode_to_rgb(data, format, size):
    decoded = decode(data)
    assert (decoded.format, (decoded.width, decoded.height)) == (format, size)
    assert pixels_of(decoded).shape == (size[1], size[0], 3)


def test_format_is_judged_by_bytes_whatever_the_name_says():
    # The decoder never sees a filename or content type; a PNG is a PNG.
    assert decode(uploads.png()).format == "PNG"


def test_exif_orientation_is_applied():
    decoded = decode(uploads.exif_rotated_jpeg(orientation=6))  # 40x20 stored, rotated 90 degrees
    assert (decoded.width, decoded.height) == (20, 40)
    pixels = pixels_of(decoded)
    assert pixels.shape == (40, 20, 3)
    # Orientation 6 means "rotate 90 degrees clockwise to view": the left (red) half goes on top.
    assert uploads.mean_colour(pixels[:15])[0] > 150 and uploads.mean_colour(pixels[-15:])[2] > 150


def test_transparent_pixels_are_composited_on_white():
    pixels = pixels_of(decode(uploads.rgba_png_with_hidden_black()))
    assert uploads.mean_colour(pixels[:8]) == uploads.RED
    assert uploads.mean_colour(pixels[8:]) == uploads.WHITE


def test_palette_transparency_and_la_are_composited_on_white():
    gif = pixels_of(decode(uploads.palette_gif_with_transparency()))
    assert uploads.mean_colour(gif[:8]) == uploads.RED and uploads.mean_colour(gif[8:]) == uploads.WHITE
    assert uploads.mean_colour(pixels_of(decode(uploads.la_png()))) == uploads.WHITE


def test_animated_gif_uses_the_first_frame():
    assert uploads.mean_colour(pixels_of(decode(uploads.animated_gif()))) == uploads.RED


def test_cmyk_becomes_rgb():
    red, green, blue = uploads.mean_colour(pixels_of(decode(uploads.cmyk_jpeg())))
    assert red > 180 and green < 80 and blue < 80


def test_sixteen_bit_grey_is_rescaled_not_clipped():
    value = uploads.mean_colour(pixels_of(decode(uploads.sixteen_bit_png(level=40000))))
    assert value == (156, 156, 156)  # round(40000 / 65535 * 255)


def test_one_bit_image_keeps_black_and_white():
    pixels = pixels_of(decode(uploads.one_bit_bmp()))
    assert uploads.mean_colour(pixels[:, :8]) == uploads.WHITE and uploads.mean_colour(pixels[:, 8:]) == (0, 0, 0)


@pytest.mark.parametrize("mode", ["L", "P", "I", "F", "YCbCr", "HSV", "RGBA", "1"])
def test_to_rgb_handles_every_mode(mode):
    source = Image.new("RGB", (9, 9), (128, 128, 128))
    image = source.convert(mode) if mode not in ("I", "F") else source.convert("L").convert(mode)
    assert to_rgb(image).mode == "RGB"


def test_jpeg_draft_decodes_large_photos_at_reduced_scale_but_reports_true_size():
    decoded = decode(uploads.jpeg(size=(800, 600)), draft_size=64)
    assert (decoded.width, decoded.height) == (800, 600)
    assert decoded.image.size == (100, 75)  # 1/8 scale still covers 64x64


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "empty"),
        (uploads.TEXT, "not a recognisable image"),
        (uploads.corrupt_png(), "could not be decoded"),
        (uploads.truncated_jpeg(), "could not be decoded"),
        (b"\x89PNG\r\n\x1a\n" + b"\x00" * 30, "image"),
    ],
    ids=["empty", "text", "corrupt", "truncated", "broken-header"],
)
def test_undecodable_bytes_are_invalid_images(data, message):
    with pytest.raises(InvalidImage, match=message):
        decode(data)


@pytest.mark.parametrize(
    ("data", "name"),
    [
        (uploads.ico(), "ICO"),
        (uploads.SVG, "SVG"),
        (b"<!-- " + b"x" * 2000 + b" -->" + uploads.SVG, "SVG"),  # the <svg> tag after 1 kB
        (uploads.encode(uploads.solid(), "TGA"), "TGA"),  # starts 00 00 02 00, as a CUR file does
        (uploads.encode(uploads.solid(), "PPM"), "Netpbm"),
        (uploads.encode(uploads.solid(mode="L"), "PPM"), "Netpbm"),  # PGM
        (uploads.encode(uploads.solid(), "PCX"), "PCX"),
        (uploads.encode(uploads.solid(mode="1"), "XBM"), "XBM"),
        (uploads.encode(uploads.solid(), "IM"), "IM"),
        (b"%PDF-1.7\n...", "PDF"),
        (b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00", "HEIC"),
    ],
)
def test_other_image_formats_are_unsupported_not_invalid(data, name):
    assert sniff_other_image_format(data) == name
    with pytest.raises(UnsupportedImageFormat, match=name):
        decode(data)


def test_text_is_not_mistaken_for_an_image_format():
    assert sniff_other_image_format(uploads.TEXT) is None
    for text in (b"P1 is the first item\n", b"P3 notes\n", b"#define LIMIT 10\n#include <stdio.h>\n"):
        assert sniff_other_image_format(text) is None, text


def test_a_jpeg_with_data_after_its_picture_is_not_counted_as_scans():
    """Phones append a video after the picture (motion photos); FF DA turns up in any such data
    about once every 64 kB. Only the picture's own scans count."""
    data = uploads.jpeg(size=(64, 48)) + np.random.default_rng(0).integers(0, 256, 2_000_000, np.uint8).tobytes()
    assert data.count(b"\xff\xda") > 20
    assert pixels_of(decode(data, max_jpeg_scans=20)).shape == (48, 64, 3)


@pytest.mark.parametrize("scan_headers_in_a_comment", [0, 101])
def test_a_jpeg_cut_off_after_its_scan_headers_length_is_undecodable_not_a_crash(scan_headers_in_a_comment):
    """FF DA 00 02 and the end of the file: the layout walk read one byte past the end (IndexError,
    a 500), from the memory charge of a large picture (decode_bytes) or from the scan count of a
    file with many FF DA bytes (open_upload; here in a comment segment, which the walk skips)."""
    data = bytearray(uploads.jpeg(size=(64, 64)))
    frame = data.index(b"\xff\xc0")
    data[frame + 5 : frame + 9] = (1024).to_bytes(2, "big") * 2  # a large picture, by its header
    data = bytes(data[: data.index(b"\xff\xda")])
    comment = b"\xff\xda" * scan_headers_in_a_comment
    if comment:
        data = data[:2] + b"\xff\xfe" + (len(comment) + 2).to_bytes(2, "big") + comment + data[2:]
    data += b"\xff\xda\x00\x02"
    image = open_upload(data, **LIMITS, max_jpeg_scans=100)
    assert decode_bytes(image, data, 96) > 0
    with pytest.raises(InvalidImage, match="could not be decoded"):
        decode_opened(image, 96)


def test_decompression_bomb_is_refused_from_the_header(monkeypatch):
    # Image.load must never run for a bomb: the header alone decides.
    monkeypatch.setattr(Image.Image, "load", lambda self: pytest.fail("pixels were decoded"))
    with pytest.raises(ImageTooLarge, match="limit"):
        decode(uploads.png_header_only(7000, 7000))
    with pytest.raises(ImageTooLarge):  # past Pillow's own hard limit as well
        decode(uploads.png_header_only(100_000, 100_000))


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_real_compressed_bomb_is_refused():
    with pytest.raises(ImageTooLarge):
        decode(uploads.bomb_png())


def test_limits_are_configurable():
    with pytest.raises(ImageTooLarge):
        decode(uploads.png(size=(32, 24)), max_pixels=32 * 24 - 1)
    with pytest.raises(ImageTooSmall, match="at least 8"):
        decode(uploads.png(size=(7, 100)))
    assert decode(uploads.png(size=(8, 8))).width == 8


def test_a_jpeg_with_too_many_scans_is_refused_before_decoding(monkeypatch):
    """Each scan is a pass over every block (10 real scans and 2000 empty ones here)."""
    bomb = uploads.many_scan_jpeg(scans=2000)
    monkeypatch.setattr(Image.Image, "load", lambda self: pytest.fail("pixels were decoded"))
    with pytest.raises(ImageTooComplex, match="2010 scans; the limit is 100"):
        decode(bomb, max_jpeg_scans=100)


def test_ordinary_progressive_and_baseline_jpegs_are_within_the_scan_limit():
    for options in ({"progressive": True}, {}):
        data = uploads.encode(uploads.noise(), "JPEG", **options)
        assert pixels_of(decode(data, max_jpeg_scans=20)).shape == (64, 64, 3)


def test_pillows_own_bomb_limit_is_answered_with_the_services_limit():
    with pytest.raises(ImageTooLarge, match="limit of 40000000"):
        decode(uploads.png_header_only(60000, 60000))


def tiff_by_tifffile(shape=(64, 48), **options) -> bytes:
    """A TIFF as another program writes it (tifffile, not Pillow)."""
    import io

    import tifffile

    buffer = io.BytesIO()
    tifffile.imwrite(buffer, np.arange(np.prod(shape), dtype=np.uint8).reshape(shape), **options)
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("options", "strips"),
    [
        ({"rowsperstrip": 1}, 64),
        ({"rowsperstrip": 1, "byteorder": ">"}, 64),
        ({"rowsperstrip": 1, "bigtiff": True}, 64),
        ({"tile": (16, 16)}, 12),  # 64 rows x 48 columns: 4 x 3 tiles
        ({}, 1),
    ],
    ids=["strips", "big-endian", "bigtiff", "tiles", "one-strip"],
)
def test_a_tiffs_strips_and_tiles_are_counted_from_its_header(options, strips):
    from app.images import tiff_directory

    data = tiff_by_tifffile(**options)
    directory = tiff_directory(data)
    assert (directory.strips, directory.pixels) == (strips, 64 * 48) and directory.entries < 30
    assert pixels_of(decode(data, max_tiff_strips=strips)).shape == (64, 48, 3)
    if strips > 3:  # 3072 pixels allow 3 strips whatever the limit
        with pytest.raises(ImageTooComplex, match=f"{strips} strips or tiles; the limit is {strips - 1}"):
            decode(data, max_tiff_strips=strips - 1)


def test_a_tiff_directory_is_none_for_anything_but_a_whole_tiff_header():
    from app.images import tiff_directory

    assert tiff_directory(many_strips_tiff(100)).strips == 100
    whole = many_strips_tiff(100)
    for data in (uploads.png(), b"II*\x00", whole[:12], b"MM\x00*" + b"\xff" * 12, b"", b"IIxx" + whole[4:]):
        assert tiff_directory(data) is None


@pytest.mark.parametrize("magic", [b"II*\x00", b"II\x00*"], ids=["standard", "swapped"])
def test_a_tiff_of_a_million_strips_is_refused_before_pillow_opens_it(monkeypatch, magic):
    """4 MB declaring a million one-row strips: opening it took Pillow 2.6 s and 320 MB (a Python
    object a strip), outside the decode memory budget; it is now refused from its header. Pillow
    also opens the file with its magic number's bytes swapped (a review's bypass of the first check)."""
    import time

    bomb = magic + many_strips_tiff(1_000_000)[4:]
    monkeypatch.setattr(Image, "open", lambda *args, **kwargs: pytest.fail("Pillow opened the file"))
    started = time.perf_counter()
    with pytest.raises(ImageTooComplex, match="1000000 strips or tiles; the limit is 16384"):
        decode(bomb, max_tiff_strips=16384)
    assert time.perf_counter() - started < 1.0


def test_a_tall_tiff_of_a_row_a_strip_is_not_refused():
    """libtiff writes a row a strip once a row is 4 KB: a long scan or screenshot has a strip per row,
    more than MAX_TIFF_STRIPS, each of them a whole row of pixels."""
    data = tiff_by_tifffile(shape=(17000, 1100), rowsperstrip=1, compression="zlib")
    assert pixels_of(decode(data, max_tiff_strips=16384)).shape[:2] == (17000, 1100)


def test_a_tiff_directory_of_thousands_of_entries_is_refused_before_pillow_reads_them(monkeypatch):
    """Pillow reads every entry of the first directory in Python when it opens the file (21,000
    junk entries fit in 254 kB, under the size decoded on the event loop)."""
    import struct

    entries = [(256, 3, 1, 8), (257, 3, 1, 8)] + [(40000 + i, 3, 1, 0) for i in range(2000)]
    directory = b"".join(struct.pack("<HHIHH", tag, kind, count, value, 0) for tag, kind, count, value in entries)
    data = b"II*\x00" + struct.pack("<I", 8) + struct.pack("<H", len(entries)) + directory + b"\0\0\0\0"
    monkeypatch.setattr(Image, "open", lambda *args, **kwargs: pytest.fail("Pillow opened the file"))
    with pytest.raises(ImageTooComplex, match="first directory has 2002 entries; the limit is 1024"):
        decode(data, max_tiff_strips=16384, max_tiff_tags=1024)


def png_with_text(chunks: int, inflated_bytes: int, where: str) -> bytes:
    """A 16x16 PNG with `chunks` zTXt chunks, each inflating to `inflated_bytes` zeros, written
    before its pixels (as most programs do) or after them."""
    text = b"".join(
        png_chunk(b"zTXt", b"note%d\0\0" % i + zlib.compress(bytes(inflated_bytes), 9)) for i in range(chunks)
    )
    return with_chunks(uploads.png(size=(16, 16)), text, b"IDAT" if where == "before" else b"IEND")


@pytest.mark.parametrize("where", ["before", "after"])
def test_a_pngs_text_chunks_are_bounded(where):
    """A 186 kB PNG carried 63 zTXt chunks of a megabyte each: Pillow inflated and held all of them
    from the moment it opened the file (its own bound is 64 MB). limit_png_text (the service's
    MAX_PNG_TEXT_BYTES) bounds them; an ordinary amount of metadata decodes."""
    from PIL import PngImagePlugin

    from app.images import limit_png_text

    saved = PngImagePlugin.MAX_TEXT_CHUNK, PngImagePlugin.MAX_TEXT_MEMORY
    limit_png_text(2**20)
    try:
        assert pixels_of(decode(png_with_text(3, 200_000, where))).shape == (16, 16, 3)
        for chunks, size in ((3, 600_000), (1, 2**20 + 1)):
            with pytest.raises(
                ImageTooComplex,
                match="colour profile, inflate to more than 1048576 bytes, the limit \\(MAX_PNG_TEXT_BYTES\\)",
            ):
                decode(png_with_text(chunks, size, where))
    finally:
        PngImagePlugin.MAX_TEXT_CHUNK, PngImagePlugin.MAX_TEXT_MEMORY = saved
