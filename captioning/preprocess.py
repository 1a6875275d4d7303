"""How any picture becomes the model's input. One path, shared by the service (every upload), the
training data, evaluation, calibration, the domain fit and the CLI, so that all of them see the
same pixels: the picture upright (EXIF orientation), transparency composited on white, 16-bit and
float data rescaled, brought down towards the model's side early (JPEG draft decoding, box
reduction), then the one resize.

The service adds its guards for untrusted bytes around this (app/images.py: format allow-list,
pixel limits from the header, memory budget); a mismatch here would be train/serve skew."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import ExifTags, Image

# The formats read, as Pillow names them (its JPEG opener also yields MPO, cameras' JPEG with a
# second picture). Anything else, EPS (which would run Ghostscript) included, is not opened.
PILLOW_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")

TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
HIGH_BIT_DEPTH_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I", "F"}
ALPHA_MODES = {"RGBA", "RGBa", "LA", "La", "PA"}

# Decoding can fail inside Pillow's plugins in many ways; each of them means "this is not a valid
# image" (the service answers 400), never a bug of the caller.
DECODE_ERRORS = (
    OSError,
    SyntaxError,
    ValueError,
    TypeError,
    EOFError,
    IndexError,
    KeyError,
    ZeroDivisionError,
    AttributeError,
    OverflowError,
    RuntimeError,
)


class UnsupportedPixelMode(ValueError):
    """A pixel mode with no RGB conversion (e.g. LAB)."""


def upright_rgb(image: Image.Image, draft_size: int | None = None) -> tuple[Image.Image, int, int]:
    """An opened (not yet decoded) image -> (RGB picture, width, height), the size as displayed:
    after EXIF orientation, before any draft downscaling. The first frame of an animation.

    draft_size (the model's input side): the picture is brought down towards it as early as
    possible, so that no full-size copy is made after the decode itself: JPEG decodes at 1/2..1/8
    scale (draft mode), anything else is box-reduced (Image.reduce) to no less than twice that
    side, and only then are colour conversion and EXIF rotation done, on the small copy."""
    width, height = image.size
    if draft_size and image.format in ("JPEG", "MPO"):
        image.draft("RGB", (draft_size, draft_size))
    image.load()
    orientation = exif_orientation(image)
    if orientation in (5, 6, 7, 8):  # rotated by 90 or 270 degrees
        width, height = height, width
    if draft_size:
        image = reduce_towards(image, draft_size)
    rgb = to_rgb(image)
    del image  # the full-size picture goes as soon as the small one exists
    if orientation in TRANSPOSE:
        rgb = rgb.transpose(TRANSPOSE[orientation])
    return rgb, width, height


def resize_to_input(image: Image.Image, size: int) -> Image.Image:
    """Squeezes (no crop, no padding) any RGB image to size x size, bilinear with a box pre-reduce."""
    if image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.BILINEAR, reducing_gap=3.0)
    return image


def model_input(image: Image.Image, size: int) -> np.ndarray:
    """An upright RGB picture -> the model's uint8 input [size, size, 3]: the early box reduction
    of a large picture (a no-op after upright_rgb's), then the one resize."""
    return np.asarray(resize_to_input(reduce_towards(image, size), size), dtype=np.uint8)


def load_image_file(path: str | Path | io.BytesIO, size: int, max_pixels: int) -> np.ndarray:
    """An image file -> the model's uint8 input [size, size, 3], decoded and resized as the service
    decodes and resizes an upload of the same bytes (its guards for untrusted uploads, the memory
    budget and the limits of its settings, are its own). ValueError naming the file when it is not
    a readable image of PILLOW_FORMATS."""
    return model_input(open_upright(path, size, max_pixels), size)


def open_upright(path: str | Path | io.BytesIO, draft_size: int, max_pixels: int) -> Image.Image:
    """An image file -> its upright RGB picture, brought down towards draft_size (upright_rgb).
    ValueError naming the file when it is not a readable image of PILLOW_FORMATS."""
    try:
        with Image.open(path, formats=PILLOW_FORMATS) as image:
            if image.width * image.height > max_pixels:
                raise ValueError(f"{image.width}x{image.height} is more than {max_pixels} pixels")
            return upright_rgb(image, draft_size)[0]
    except (*DECODE_ERRORS, Image.DecompressionBombError) as exc:
        reason = str(exc).strip() or type(exc).__name__
        raise ValueError(f"{path}: not a readable image: {reason}") from None


def exif_orientation(image: Image.Image) -> int:
    # Only after load(): for PNG, reading EXIF means reading past the pixel data.
    try:
        return int(image.getexif().get(ExifTags.Base.Orientation, 1))
    except DECODE_ERRORS:  # unreadable EXIF: the picture itself is still fine
        return 1


def reduce_towards(image: Image.Image, draft_size: int) -> Image.Image:
    """A box-reduced copy whose shorter side stays at least 2 * draft_size (so the model-size resize
    that follows sees what it would have seen from the full image), or the image itself."""
    factor = min(image.size) // (2 * draft_size)
    if factor < 2:
        return image
    if image.mode in ("P", "PA") or "transparency" in image.info:
        image = image.convert("RGBA")  # averaging palette indices or a keyed colour would be wrong
    elif image.mode == "1":
        image = image.convert("L")
    elif image.mode.startswith("I;16"):  # Image.reduce has no 16-bit modes; back to 16 bits after
        return image.convert("I").reduce(factor).convert("I;16")
    return image.reduce(factor)


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode -> RGB. Transparency is composited on white (a transparent PNG's hidden
    pixels are often black, which would change the picture); 16-bit and float data are rescaled
    to 8 bits rather than clipped."""
    mode = image.mode
    if mode == "RGB" and "transparency" not in image.info:
        return image
    if mode in HIGH_BIT_DEPTH_MODES:
        return _to_8_bit_grey(image).convert("RGB")
    try:
        if mode in ALPHA_MODES or "transparency" in image.info:
            rgba = image.convert("RGBA")
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(white, rgba).convert("RGB")
        return image.convert("RGB")
    except ValueError as exc:
        raise UnsupportedPixelMode(f"images with pixel mode {mode} are not supported: {exc}") from None


def _to_8_bit_grey(image: Image.Image) -> Image.Image:
    """16-bit, 32-bit integer or float grey -> 8 bits, in float32 and in place: one working copy of
    the (by now reduced) picture, never a float64 one."""
    values = np.asarray(image, dtype=np.float32)
    if not values.flags.writeable:
        values = values.copy()
    np.nan_to_num(values, copy=False, nan=0.0, posinf=0.0, neginf=0.0)
    peak = float(values.max()) if values.size else 0.0
    if image.mode == "F":
        scale = 255.0 if peak <= 1.0 else (1.0 if peak <= 255.0 else 255.0 / peak)
    elif image.mode == "I":
        scale = 1.0 if peak <= 255 else (255.0 / 65535.0 if peak <= 65535 else 255.0 / peak)
    else:  # I;16 variants: full 16-bit range
        scale = 255.0 / 65535.0
    values *= scale
    np.rint(values, out=values)
    np.clip(values, 0, 255, out=values)
    return Image.fromarray(values.astype(np.uint8), "L")
