"""Images that are NOT shapes scenes, to measure the out-of-domain flag (never fitted on).

photographs   the photographs scikit-image ships in its wheel (skimage.data, no download):
              astronaut, chelsea the cat, coffee, rocket, moon, the Hubble deep field, ... (a dev dependency;
              absent -> the group is empty)
noise         uniform and Gaussian pixel noise, colour and grey
smooth_fields smooth random colour fields (blurred noise, upsampled)
text          lines of words drawn with Pillow's font on light and dark paper
textures      sine gratings, wood-like rings and fine checkerboards
"""

from __future__ import annotations

import warnings

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

PHOTOGRAPHS = (
    "astronaut",
    "brick",
    "camera",
    "chelsea",
    "clock",
    "coffee",
    "coins",
    "grass",
    "gravel",
    "hubble_deep_field",
    "immunohistochemistry",
    "microaneurysms",
    "moon",
    "page",
    "retina",
    "rocket",
    "text",
    "cell",
    "motorcycle_left",
    "motorcycle_right",
)
WORDS = (
    "the",
    "model",
    "reads",
    "shapes",
    "image",
    "caption",
    "report",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "lazy",
    "dog",
    "lorem",
    "ipsum",
    "dolor",
    "sit",
    "amet",
    "data",
    "table",
    "value",
)


def _rgb(array: np.ndarray) -> np.ndarray:
    array = np.asarray(array)
    if array.dtype != np.uint8:
        array = np.clip(array * (255 if array.max() <= 1.0 else 1), 0, 255).astype(np.uint8)
    if array.ndim == 2:
        array = np.stack([array] * 3, axis=-1)
    return np.ascontiguousarray(array[..., :3])


def photographs() -> list[tuple[str, np.ndarray]]:
    try:
        import skimage.data as data
    except ImportError:
        warnings.warn(
            "no photographs among the out-of-domain images: scikit-image is not installed (the training extra)",
            stacklevel=2,
        )
        return []
    found = []
    for name in PHOTOGRAPHS:
        try:
            if name.startswith("motorcycle_"):
                left, right, _ = data.stereo_motorcycle()
                image = left if name.endswith("left") else right
            else:
                image = getattr(data, name)()
        except Exception:  # noqa: BLE001 - a file this scikit-image version does not ship
            continue
        found.append((name, _rgb(image)))
    return found


def _size(rng) -> tuple[int, int]:
    return int(rng.integers(64, 641)), int(rng.integers(64, 641))


def noise(count: int, seed: int = 0) -> list[tuple[str, np.ndarray]]:
    rng = np.random.default_rng([seed, 1])
    images = []
    for i in range(count):
        width, height = _size(rng)
        channels = 3 if i % 2 == 0 else 1
        if i % 4 < 2:
            pixels = rng.integers(0, 256, (height, width, channels))
        else:
            pixels = rng.normal(rng.uniform(60, 200), rng.uniform(30, 80), (height, width, channels))
        images.append((f"noise-{i}", _rgb(np.clip(pixels, 0, 255).astype(np.uint8).squeeze())))
    return images


def smooth_fields(count: int, seed: int = 0) -> list[tuple[str, np.ndarray]]:
    rng = np.random.default_rng([seed, 2])
    images = []
    for i in range(count):
        width, height = _size(rng)
        cells = int(rng.integers(3, 12))
        small = rng.uniform(0, 255, (cells, cells, 3)).astype(np.uint8)
        field = Image.fromarray(small).resize((width, height), Image.Resampling.BICUBIC)
        field = field.filter(ImageFilter.GaussianBlur(max(width, height) / (cells * 4)))
        images.append((f"smooth-{i}", np.asarray(field, np.uint8)))
    return images


def text_images(count: int, seed: int = 0) -> list[tuple[str, np.ndarray]]:
    rng = np.random.default_rng([seed, 3])
    images = []
    for i in range(count):
        width, height = _size(rng)
        paper = rng.integers(200, 256, 3) if i % 3 else rng.integers(0, 60, 3)
        ink = 255 - paper
        image = Image.new("RGB", (width, height), tuple(int(v) for v in paper))
        draw = ImageDraw.Draw(image)
        font_size = int(rng.integers(10, 28))
        try:
            font = ImageFont.load_default(size=font_size)
        except TypeError:  # Pillow < 10.1 has one fixed-size default font
            font = ImageFont.load_default()
        for y in range(4, height - font_size, font_size + 4):
            line = " ".join(WORDS[j] for j in rng.integers(0, len(WORDS), 12))
            draw.text((4, y), line, fill=tuple(int(v) for v in ink), font=font)
        images.append((f"text-{i}", np.asarray(image, np.uint8)))
    return images


def textures(count: int, seed: int = 0) -> list[tuple[str, np.ndarray]]:
    rng = np.random.default_rng([seed, 4])
    images = []
    for i in range(count):
        width, height = _size(rng)
        ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
        kind = i % 3
        if kind == 0:  # sine grating
            angle, period = rng.uniform(0, np.pi), rng.uniform(4, 30)
            t = np.sin(2 * np.pi * (xs * np.cos(angle) + ys * np.sin(angle)) / period)
        elif kind == 1:  # rings around a point, like wood or ripples
            cx, cy, period = rng.uniform(0, width), rng.uniform(0, height), rng.uniform(4, 20)
            t = np.sin(2 * np.pi * np.hypot(xs - cx, ys - cy) / period)
        else:  # a fine checkerboard
            period = rng.uniform(3, 10)
            t = ((np.floor(xs / period) + np.floor(ys / period)) % 2) * 2 - 1
        low, high = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
        pixels = low + (t[..., None] + 1) / 2 * (high - low)
        images.append((f"texture-{i}", np.clip(pixels, 0, 255).astype(np.uint8)))
    return images


def ood_groups(per_group: int = 40, seed: int = 0) -> dict[str, list[tuple[str, np.ndarray]]]:
    return {
        "photographs": photographs(),
        "noise": noise(per_group, seed),
        "smooth_fields": smooth_fields(per_group, seed),
        "text": text_images(per_group, seed),
        "textures": textures(per_group, seed),
    }
