"""Turning uploaded bytes into an RGB Pillow image, or a clear client error.

Order matters for safety: the format is identified and the dimensions are read from the header
(`Image.open` is lazy) before a single pixel is decoded, so decompression bombs and undersized
images are refused without spending memory on them. All of this is blocking CPU work: callers run
it in a worker thread.
"""

from __future__ import annotations

import io
import re
import struct
from dataclasses import dataclass

from PIL import Image, PngImagePlugin, UnidentifiedImageError

from app.errors import ImageTooComplex, ImageTooLarge, ImageTooSmall, InvalidImage, UnsupportedImageFormat
from captioning.preprocess import DECODE_ERRORS, PILLOW_FORMATS, UnsupportedPixelMode, upright_rgb

# Pillow format name -> the name reported to clients. MPO is how Pillow names JPEGs from cameras
# that embed a second picture; it is a JPEG for every purpose here.
ALLOWED_FORMATS = {
    "JPEG": "JPEG",
    "MPO": "JPEG",
    "PNG": "PNG",
    "WEBP": "WEBP",
    "GIF": "GIF",
    "BMP": "BMP",
    "TIFF": "TIFF",
}
ALLOWED_FORMAT_NAMES = "JPEG, PNG, WebP, GIF, BMP, TIFF"

# Signatures of image formats we recognise but do not accept, so that a HEIC photo or an SVG gets
# "unsupported format" (415) rather than "not an image" (400). Checked only after Pillow, limited
# to the allow-list, has failed to identify the bytes.
_OTHER_IMAGE_SIGNATURES: tuple[tuple[int, bytes, str], ...] = (
    (0, b"8BPS", "PSD"),
    (0, b"%PDF-", "PDF"),
    (0, b"%!PS", "PostScript"),
    (0, b"\xc5\xd0\xd3\xc6", "EPS"),
    (0, b"\x00\x00\x00\x0cjP  \r\n\x87\n", "JPEG 2000"),
    (0, b"\xff\x4f\xff\x51", "JPEG 2000"),
    (0, b"\xff\x0a", "JPEG XL"),
    (0, b"\x00\x00\x00\x0cJXL \r\n\x87\n", "JPEG XL"),
    (0, b"qoif", "QOI"),
    (0, b"DDS ", "DDS"),
    (0, b"icns", "ICNS"),
    (0, b"v/1\x01", "OpenEXR"),
    (0, b"#?RADIANCE", "Radiance HDR"),
    (0, b"\x01\xda", "SGI"),
    (0, b"SIMPLE  =", "FITS"),
    (0, b"Image type:", "IM"),
    (0, b"gimp xcf", "XCF"),
)
_NETPBM = {b"P1", b"P2", b"P3", b"P4", b"P5", b"P6", b"P7", b"PF", b"Pf"}  # PBM, PGM, PPM, PAM, PFM
_NETPBM_HEADER = re.compile(rb"(\s+(#[^\n]*\n)?)+(\d+\s+\d+|WIDTH)")  # a width and a height (PAM: keywords)
_TGA_TYPES = {1, 2, 3, 9, 10, 11}  # colour-mapped, true-colour, grey; plain or run-length encoded
_HEIF_BRANDS = {
    b"heic": "HEIC",
    b"heix": "HEIC",
    b"hevc": "HEIC",
    b"heim": "HEIC",
    b"heis": "HEIC",
    b"mif1": "HEIF",
    b"msf1": "HEIF",
    b"avif": "AVIF",
    b"avis": "AVIF",
}

# Bytes per pixel held at the peak of decode_opened for each mode (Pillow stores 1, L and P in one
# byte, I;16 in two, every other mode in four); modes that captioning.preprocess.reduce_towards
# converts first count both copies, and Image.reduce makes a premultiplied copy (RGBa, La) of a mode
# with alpha before it averages: P is its frame, an RGBA copy and that (9; measured 9.0 for PNG,
# GIF, BMP and TIFF at 4000x4000), RGBA and LA their frame and that (8; measured 8.0).
_PEAK_BYTES_PER_PIXEL = {
    "1": 2,
    "L": 1,
    "P": 9,
    "PA": 12,
    "I;16": 6,
    "I;16L": 6,
    "I;16B": 6,
    "I;16N": 6,
    "I": 4,
    "F": 4,
}
_PEAK_BYTES_PER_PIXEL.update(dict.fromkeys(("La", "RGB", "RGBa", "RGBX", "CMYK", "YCbCr", "LAB", "HSV"), 4))
_PEAK_BYTES_PER_PIXEL.update(dict.fromkeys(("LA", "RGBA"), 8))
# Formats whose decoder holds more than the frame, whatever the mode: Pillow decodes a WebP through
# libwebp's RGBA canvas and a bytes copy of it before the frame exists (measured 16.0-16.1 bytes a
# pixel, lossy and lossless, with and without alpha).
_PEAK_BYTES_PER_PIXEL_OF_FORMAT = {"WEBP": 16}


@dataclass(frozen=True)
class DecodedImage:
    image: Image.Image  # mode RGB, EXIF orientation applied
    width: int  # as displayed: after EXIF orientation, before any draft downscaling
    height: int
    format: str


def decode_upload(data: bytes, *, draft_size: int | None = None, **limits) -> DecodedImage:
    """Validates and decodes an uploaded image; raises an ApiError subclass on bad input.

    draft_size: lets JPEG decode at a reduced scale (1/2 .. 1/8) that still covers
    draft_size x draft_size, which is all the model needs and far cheaper for large photos.
    `limits`: open_upload's (max_pixels, min_side, and the optional ones).
    """
    return decode_opened(open_upload(data, **limits), draft_size)


def open_upload(
    data: bytes,
    *,
    max_pixels: int,
    min_side: int,
    max_jpeg_scans: int | None = None,
    max_tiff_strips: int | None = None,
    max_tiff_tags: int | None = None,
) -> Image.Image:
    """Identifies the format and checks the dimensions from the header alone: no pixel is decoded
    yet (Image.open is lazy), so this is cheap, and bombs are refused before they cost memory.

    max_jpeg_scans: a JPEG with more scans is refused. A progressive JPEG's decoder walks every
    block of the image once per scan, and libjpeg only warns about scans that carry no data, so
    a few MB of 12-byte scan headers cost minutes of CPU (libjpeg-turbo's TurboJPEG API has a scan
    limit for this; encoders write about ten).

    max_tiff_strips, max_tiff_tags: a TIFF with more strips or tiles (beyond one per STRIP_PIXELS
    pixels), or more entries in its first directory, is refused before Pillow opens it, since
    opening reads every entry and builds a Python object for each strip (and decoding walks them
    all): a million one-row strips fit in 4 MB, and 21,000 junk entries in 254 kB. A PNG's text
    chunks are bounded by limit_png_text, once for the process."""
    if not data:
        raise InvalidImage("the uploaded file is empty")
    directory = tiff_directory(data) if (max_tiff_strips, max_tiff_tags) != (None, None) else None
    if directory is not None:
        problem = directory.too_complex(max_tiff_strips, max_tiff_tags)
        if problem:
            raise ImageTooComplex(problem)
    image = _open(data, max_pixels)
    # Pixel count and shortest side do not change under rotation, so the header size decides.
    _check_dimensions(*image.size, max_pixels=max_pixels, min_side=min_side)
    # Every FF DA in the file is counted first (a bound from above, at C speed: every scan's marker
    # is one); only past the limit are the segments walked, since FF DA also turns up in metadata
    # and in what phones append after the picture (a motion photo's video).
    if (
        max_jpeg_scans is not None
        and ALLOWED_FORMATS[image.format] == "JPEG"
        and data.count(b"\xff\xda") > max_jpeg_scans
    ):
        scans = jpeg_layout(data)[0]
        if scans > max_jpeg_scans:
            raise ImageTooComplex(f"the JPEG has {scans} scans; the limit is {max_jpeg_scans}")
    return image


def jpeg_layout(data: bytes, first_only: bool = False) -> tuple[int, int]:
    """(scans, components of the first scan) of a JPEG's first picture, walking its marker segments
    from SOI to EOI: metadata segments are skipped by their length, and a scan's entropy-coded data
    runs to the next marker (an FF followed by neither 00 nor a restart marker). `first_only`:
    stop at the first scan. A damaged file is walked as far as it goes; Pillow judges the rest."""
    position, scans, first_components, end = 2, 0, 0, len(data)
    while position + 4 <= end and data[position] == 0xFF:
        marker = data[position + 1]
        if marker == 0xFF:  # a fill byte before a marker
            position += 1
            continue
        if marker == 0xD9:  # EOI
            break
        if 0xD0 <= marker <= 0xD7 or marker == 0x01:  # no length field
            position += 2
            continue
        length = int.from_bytes(data[position + 2 : position + 4], "big")
        if marker != 0xDA:
            position += 2 + length
            continue
        scans += 1
        if scans == 1:  # a file cut off after the scan header's length: components unknown, as 0
            first_components = data[position + 4] if position + 4 < end else 0
            if first_only:
                break
        position += 2 + length
        while True:  # the scan's entropy-coded data
            position = data.find(b"\xff", position)
            if position < 0 or position + 1 >= end:
                return scans, first_components
            following = data[position + 1]
            if following == 0x00 or 0xD0 <= following <= 0xD7:
                position += 2
            elif following == 0xFF:
                position += 1
            else:
                break
    return scans, first_components


@dataclass(frozen=True)
class TiffDirectory:
    """What opening a TIFF costs Pillow, from its first directory (IFD): Pillow reads every entry
    of it in Python, and builds an object for each strip or tile of the image."""

    entries: int
    strips: int  # StripOffsets' or TileOffsets' count
    pixels: int  # width x height, 0 when the directory does not say

    def too_complex(self, max_strips: int | None, max_entries: int | None) -> str | None:
        """Why the file is refused, or None (a bound of None: not checked). A strip holds at least a
        row, so a tall picture has many honestly (libtiff writes a row a strip once a row is 4 KB):
        each strip may cover as few as STRIP_PIXELS pixels before the count beyond max_strips is refused."""
        if max_entries is not None and self.entries > max_entries:
            return f"the TIFF's first directory has {self.entries} entries; the limit is {max_entries}"
        allowed = None if max_strips is None else max(max_strips, self.pixels // STRIP_PIXELS)
        if allowed is not None and self.strips > allowed:
            return f"the TIFF has {self.strips} strips or tiles; the limit is {allowed}"
        return None


STRIP_PIXELS = 1024
_TIFF_INTEGER = {3: "H", 4: "I", 16: "Q"}  # SHORT, LONG, LONG8: the types a width or height takes


def tiff_directory(data: bytes) -> TiffDirectory | None:
    """The first directory of a TIFF (classic or BigTIFF, either byte order), read as Pillow reads
    it, header variants included (TiffImagePlugin.PREFIXES: the byte order from the first two
    bytes, BigTIFF when the third is 43); None for anything else or a header cut short, which
    Pillow then judges."""
    from PIL import TiffImagePlugin

    if data[:4] not in TiffImagePlugin.PREFIXES or len(data) < 16:
        return None
    order = "<" if data[:2] == b"II" else ">"
    if data[2] == 43:  # BigTIFF: 8-byte offsets, counts and values
        count_format, entry_format, first = "Q", "HHQ8s", struct.unpack_from(order + "Q", data, 8)[0]
    else:  # classic: 4-byte offsets, a 2-byte entry count, entries of tag, type, count, value
        count_format, entry_format, first = "H", "HHI4s", struct.unpack_from(order + "I", data, 4)[0]
    position = first + struct.calcsize(order + count_format)
    if position > len(data):
        return None
    entry_size = struct.calcsize(order + entry_format)
    entries = struct.unpack_from(order + count_format, data, first)[0]
    readable = min(entries, (len(data) - position) // entry_size)
    strips, sides = 0, {}
    for tag, kind, count, value in struct.iter_unpack(
        order + entry_format, memoryview(data)[position : position + readable * entry_size]
    ):
        if tag in (273, 324):  # StripOffsets, TileOffsets
            strips = max(strips, count)
        elif tag in (256, 257) and count == 1 and kind in _TIFF_INTEGER:  # ImageWidth, ImageLength
            size = struct.calcsize(_TIFF_INTEGER[kind])
            if size <= len(value):
                sides[tag] = struct.unpack(order + _TIFF_INTEGER[kind], value[:size])[0]
    return TiffDirectory(entries, strips, sides.get(256, 0) * sides.get(257, 0))


def limit_png_text(max_bytes: int) -> None:
    """Bounds what a PNG's text chunks may inflate to, each and together (Pillow's defaults: 1 MB a
    chunk, 64 MB in all, every one inflated and held from the moment the file is opened); the
    bound for one chunk also applies to a colour profile (iCCP). Pillow reads these bounds from
    its module, so they hold for the whole process; past them the file is refused
    (image_too_complex)."""
    PngImagePlugin.MAX_TEXT_CHUNK = PngImagePlugin.MAX_TEXT_MEMORY = max_bytes


def _text_too_large(exc: BaseException) -> ImageTooComplex | None:
    """Pillow's refusal of a PNG's text chunks (its message names the bound it passed, MAX_TEXT_CHUNK
    or MAX_TEXT_MEMORY) as the client's error."""
    if isinstance(exc, ValueError) and "MAX_TEXT_" in str(exc):
        return ImageTooComplex(
            f"the PNG's text chunks (metadata), or its colour profile, inflate to more than "
            f"{PngImagePlugin.MAX_TEXT_MEMORY} bytes, the limit (MAX_PNG_TEXT_BYTES)"
        )
    return None


def decode_opened(image: Image.Image, draft_size: int | None = None) -> DecodedImage:
    """Decodes an image from open_upload into the upright RGB picture the model sees
    (captioning.preprocess.upright_rgb, the path training and evaluation share), or raises the
    client error. draft_size (the model's input side) brings large pictures down early, so that no
    full-size copy is made after the decode itself; decode_bytes() is the peak memory this takes,
    known from the header."""
    format_name = ALLOWED_FORMATS[image.format]
    try:
        rgb, width, height = upright_rgb(image, draft_size)
    except Image.DecompressionBombError as exc:
        raise ImageTooLarge(str(exc)) from None
    except UnsupportedPixelMode as exc:
        raise UnsupportedImageFormat(str(exc)) from None
    except DECODE_ERRORS as exc:  # text chunks after the pixels are inflated here
        raise _text_too_large(exc) or InvalidImage(
            f"the {format_name} image could not be decoded: {_reason(exc)}"
        ) from None
    return DecodedImage(rgb, width, height, format_name)


def decode_bytes(image: Image.Image, data: bytes, draft_size: int | None = None) -> int:
    """Peak bytes decode_opened(image, draft_size) holds, from the header alone (`image` as
    open_upload(data) gave it; a JPEG's scan layout is read from `data`): the decoded
    frame, plus the full-size converted copy for modes that cannot be reduced as they are (a
    keyed transparent colour makes any mode an RGBA copy first) and the premultiplied copy a mode
    with alpha is reduced from (a WebP decoder's own copies, at least), plus, for a progressive JPEG or
    one with a scan per component, the decoder's coefficients of the whole image at full size (draft
    mode scales the output, not them: 2 bytes per coefficient, 64 per block of each component)."""
    width, height = image.size
    full = width * height
    coefficients = 0
    if ALLOWED_FORMATS.get(image.format) == "JPEG" and _whole_image_coefficients(image, data):
        coefficients = int(2 * _jpeg_samples_per_pixel(image) * full)
    if draft_size and ALLOWED_FORMATS.get(image.format) == "JPEG":
        scale = min(width // draft_size, height // draft_size)  # as JpegImageFile.draft picks it
        scale = next((s for s in (8, 4, 2) if scale >= s), 1)
        width, height = -(-width // scale), -(-height // scale)
    per_pixel = max(
        _PEAK_BYTES_PER_PIXEL.get(image.mode, 8),
        _PEAK_BYTES_PER_PIXEL_OF_FORMAT.get(ALLOWED_FORMATS.get(image.format), 0),
    )
    if "transparency" in image.info and image.mode not in ("P", "PA"):  # P's entry counts its RGBA copy
        per_pixel += 5  # the RGBA copy and a one-byte mask (measured: 5.8 bytes a pixel for L, 9.2 for RGB)
    return width * height * per_pixel + coefficients


def _whole_image_coefficients(image: Image.Image, data: bytes) -> bool:
    """Whether libjpeg keeps the coefficients of the whole image: a progressive file, or a
    sequential one whose first scan does not hold every component (one scan per component)."""
    if image.info.get("progressive"):
        return True
    layers = getattr(image, "layer", None) or []
    return len(layers) > 1 and jpeg_layout(data, first_only=True)[1] < len(layers)


def _jpeg_samples_per_pixel(image: Image.Image) -> float:
    """Component samples per pixel from the SOF's sampling factors (3 for 4:4:4 colour, 1.5 for
    4:2:0, 1 for grey); 4 when Pillow gives no layers."""
    layers = getattr(image, "layer", None) or []
    try:
        most = max(h * v for _, h, v, _ in layers)
        return sum(h * v for _, h, v, _ in layers) / most
    except (ValueError, TypeError, ZeroDivisionError):
        return 4.0


def _open(data: bytes, max_pixels: int) -> Image.Image:
    try:
        return Image.open(io.BytesIO(data), formats=PILLOW_FORMATS)  # training reads the same formats
    except Image.DecompressionBombError:  # Pillow's own bound, far above MAX_IMAGE_PIXELS: the same answer
        raise ImageTooLarge(f"the image has more pixels than the limit of {max_pixels}") from None
    except UnidentifiedImageError:
        other = sniff_other_image_format(data)
        if other:
            raise UnsupportedImageFormat(
                f"{other} images are not supported; send one of {ALLOWED_FORMAT_NAMES}"
            ) from None
        raise InvalidImage(f"the upload is not a recognisable image ({ALLOWED_FORMAT_NAMES})") from None
    except DECODE_ERRORS as exc:  # a known signature with a broken header
        raise _text_too_large(exc) or InvalidImage(f"the image header could not be read: {_reason(exc)}") from None


def sniff_other_image_format(data: bytes) -> str | None:
    """Names a non-allowed image format from its leading bytes, or None."""
    for offset, signature, name in _OTHER_IMAGE_SIGNATURES:
        if data[offset : offset + len(signature)] == signature:
            return name
    if data[4:8] == b"ftyp" and data[8:12] in _HEIF_BRANDS:
        return _HEIF_BRANDS[data[8:12]]
    # ICO and CUR start as a true-colour TGA often does (00 00 01|02 00): they also count images.
    if data[:2] == b"\x00\x00" and data[2:4] in (b"\x01\x00", b"\x02\x00") and data[4:6] != b"\x00\x00":
        return "ICO" if data[2] == 1 else "CUR"
    if data[:2] in _NETPBM and _NETPBM_HEADER.match(data, 2):
        return "Netpbm"
    if (
        data[:1] == b"\x0a"
        and data[1:2] in (b"\x00", b"\x02", b"\x03", b"\x04", b"\x05")
        and data[2:3] in (b"\x00", b"\x01")
    ):
        return "PCX"
    if data[-18:] == b"TRUEVISION-XFILE.\x00" or (
        len(data) > 18 and data[1] in (0, 1) and data[2] in _TGA_TYPES and data[16] in (8, 15, 16, 24, 32)
    ):
        return "TGA"
    if re.match(rb"#define \w+_width \d+", data):  # XBM; a C header's #define is not one
        return "XBM"
    head = data[:4096].lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if head.startswith(b"<svg") or (head.startswith((b"<?xml", b"<!--", b"<!doctype svg")) and b"<svg" in head):
        return "SVG"
    return None


def _check_dimensions(width: int, height: int, *, max_pixels: int, min_side: int) -> None:
    if width * height > max_pixels:
        raise ImageTooLarge(
            f"the image is {width}x{height} = {width * height} pixels; the limit is {max_pixels} pixels"
        )
    if min(width, height) < min_side:
        raise ImageTooSmall(f"the image is {width}x{height}; both sides must be at least {min_side} pixels")


def _reason(exc: BaseException) -> str:
    text = str(exc).strip()
    return text if text else type(exc).__name__
