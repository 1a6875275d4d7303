"""The wide-domain shapes dataset: the shapes grammar and checker, drawn the way users' images look.

Same objects, colours and caption grammar as `shapes.py` (so `captioning.scene_checker` grades it), but each
image draws its own:

  - size and shape: the long side log-uniform in 64-640 px, square or up to 1.6:1 either way;
  - background: any grey from black to white, or a colour, plain or textured (gradient, noise,
    stripes, checks), never too close to the colour of an object in the scene;
  - object size, relative to the image's LONGER side (so it survives squeezing into the model's
    square input): "small" objects are 10-16% of it across, "large" ones 24-36% (and at least
    6 px); the gap between the two keeps the words unambiguous;
  - edges: anti-aliased (4x supersampling) or hard (no smoothing);
  - degradations: Gaussian blur, pixel noise and JPEG compression, each now and then.

Splits: train / val / test draw from the training distribution (`TRAINING`) with their own seeds.
Loader option `small_corner=SHARE` draws that share of the *training* split's images from
`SMALL_CORNER` instead, the corner of the same ranges where the default model errs most (small
objects in small pictures); validation and test always draw `TRAINING`.
A *wild* variation (`VARIATIONS`, loader option `variation=NAME`) pins one factor to its hard end
(a light background, tiny objects, heavy JPEG, ...) and draws everything else as training does,
from a seed no training split uses.
"""

from __future__ import annotations

import dataclasses
import io
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from captioning.preprocess import load_image_file, model_input
from captioning.scenes import COLOURS, MAX_OBJECTS, SHAPES, Scene, ShapeObject
from training.datasets.base import CaptionedImage
from training.datasets.shapes import COLOUR_JITTER, RGB, _draw_shape, write_captions


@dataclass(frozen=True)
class WideSettings:
    """Ranges the renderer draws from; a wild variation replaces a few of them."""

    long_side: tuple[int, int] = (64, 640)  # log-uniform
    square_probability: float = 0.4
    max_aspect: float = 1.6
    small_fraction: tuple[float, float] = (0.10, 0.16)  # object width / longer image side
    large_fraction: tuple[float, float] = (0.24, 0.36)
    large_probability: float = 0.5
    min_object_px: float = 6.0
    tone: tuple[float, float] = (0.0, 255.0)  # background grey level
    coloured_probability: float = 0.3
    textures: tuple[str, ...] = ("plain", "plain", "gradient", "noise", "stripes", "checks")
    anti_alias_probability: float = 0.7
    blur_probability: float = 0.25
    blur_fraction: tuple[float, float] = (0.001, 0.004)  # Gaussian radius / longer side
    noise_probability: float = 0.25
    noise_sigma: tuple[float, float] = (2.0, 10.0)
    jpeg_probability: float = 0.4
    jpeg_quality: tuple[int, int] = (30, 95)


TRAINING = WideSettings()
VARIATIONS: dict[str, WideSettings] = {
    "standard": TRAINING,
    "dark_background": dataclasses.replace(TRAINING, tone=(0.0, 70.0), coloured_probability=0.0),
    "light_background": dataclasses.replace(TRAINING, tone=(185.0, 255.0), coloured_probability=0.0),
    "white_background": dataclasses.replace(
        TRAINING, tone=(250.0, 255.0), coloured_probability=0.0, textures=("plain",)
    ),
    "coloured_background": dataclasses.replace(TRAINING, coloured_probability=1.0),
    "textured_background": dataclasses.replace(TRAINING, textures=("gradient", "noise", "stripes", "checks")),
    "tiny_objects": dataclasses.replace(TRAINING, small_fraction=(0.10, 0.11), large_probability=0.0),
    "large_objects": dataclasses.replace(TRAINING, large_probability=1.0),
    "low_resolution": dataclasses.replace(TRAINING, long_side=(64, 96)),
    "high_resolution": dataclasses.replace(TRAINING, long_side=(480, 640)),
    "non_square": dataclasses.replace(TRAINING, square_probability=0.0, max_aspect=1.6),
    "jpeg": dataclasses.replace(TRAINING, jpeg_probability=1.0, jpeg_quality=(20, 40)),
    "blur_and_noise": dataclasses.replace(TRAINING, blur_probability=1.0, noise_probability=1.0),
    "hard_edges": dataclasses.replace(TRAINING, anti_alias_probability=0.0),
}

# The same ranges' hardest corner for a 96 px model: the smallest objects, in pictures whose objects
# were 6-30 px when drawn (docs/MODEL-EXPERIMENTS.md, "The three variations under 0.95, by the picture's size").
SMALL_CORNER = dataclasses.replace(TRAINING, small_fraction=(0.10, 0.12), long_side=(64, 256))

SPLIT_ID = {"train": 11, "val": 12, "test": 13}  # apart from shapes.py's 1-3
WILD_ID = 14
CORNER_ID = 15  # the seed of each training image's draw between TRAINING and SMALL_CORNER
SPLIT_SIZES = {"train": 24000, "val": 1000, "test": 1000}
MIN_CONTRAST = 110.0  # RGB distance between the background and every object colour in the scene
TEXTURE_AMPLITUDE = (6.0, 22.0)  # textures stay faint next to an object's contrast


# ---------------------------------------------------------------------------------------- scenes


def image_frame(rng: np.random.Generator, settings: WideSettings) -> tuple[int, int]:
    low, high = settings.long_side
    long = int(round(math.exp(rng.uniform(math.log(low), math.log(high)))))
    if rng.random() < settings.square_probability:
        return long, long
    short = max(64, int(round(long / rng.uniform(1.0, settings.max_aspect))))
    return (long, short) if rng.random() < 0.5 else (short, long)


def generate_wide_scene(rng: np.random.Generator, settings: WideSettings = TRAINING, max_objects: int = 3) -> Scene:
    """1..max_objects objects whose boxes stay inside the image and never touch each other."""
    if not 1 <= max_objects <= MAX_OBJECTS:
        raise ValueError(f"need 1 <= max_objects <= {MAX_OBJECTS}")
    width, height = image_frame(rng, settings)
    long = max(width, height)
    count = int(rng.integers(1, max_objects + 1))
    while True:  # a crowded draw is redrawn, sizes included, so large sets eventually fit
        objects: list[ShapeObject] = []
        for _ in range(count):
            placed = _place(rng, settings, width, height, long, objects)
            if placed is None:
                break
            objects.append(placed)
        identical = count > 1 and len({(o.colour, o.shape, o.size) for o in objects}) == 1
        if len(objects) == count and not identical:
            return Scene(min(width, height), tuple(objects), "", width=width, height=height)


def _place(rng, settings: WideSettings, width, height, long, others) -> ShapeObject | None:
    shape = SHAPES[rng.integers(len(SHAPES))]
    colour = COLOURS[rng.integers(len(COLOURS))]
    size = "large" if rng.random() < settings.large_probability else "small"
    low, high = settings.large_fraction if size == "large" else settings.small_fraction
    extent = round(max(float(rng.uniform(low, high)) * long, settings.min_object_px) / 2, 1)
    border, gap = long / 64, 2.0 * long / 64
    if 2 * (extent + border) >= min(width, height):
        return None
    for _ in range(50):
        cx = round(float(rng.uniform(border + extent, width - border - extent)), 1)
        cy = round(float(rng.uniform(border + extent, height - border - extent)), 1)
        if all(abs(cx - o.cx) >= extent + o.extent + gap or abs(cy - o.cy) >= extent + o.extent + gap for o in others):
            return ShapeObject(shape, colour, size, cx, cy, extent)
    return None


# ---------------------------------------------------------------------------------------- pixels


def render_wide(
    scene: Scene, rng: np.random.Generator, settings: WideSettings = TRAINING
) -> tuple[np.ndarray, bytes | None]:
    """(uint8 [height, width, 3], JPEG file or None): background, objects, then blur, noise and
    JPEG as drawn. When JPEG compression is drawn, the pixels are the file's full-size decode and
    the file is returned too: the model's input is read from it (resize_for_model)."""
    width, height = scene.frame
    long = max(width, height)
    image = _background(rng, settings, width, height, [RGB[o.colour] for o in scene.objects])
    supersample = 4 if rng.random() < settings.anti_alias_probability else 1
    for obj in scene.objects:
        jitter = rng.integers(-COLOUR_JITTER, COLOUR_JITTER + 1, 3)
        fill = np.clip(np.array(RGB[obj.colour]) + jitter, 0, 255).astype(np.float32)
        _paint(image, obj, fill, supersample)
    if rng.random() < settings.blur_probability:
        radius = float(rng.uniform(*settings.blur_fraction)) * long
        pil = Image.fromarray(_to_uint8(image)).filter(ImageFilter.GaussianBlur(radius))
        image = np.asarray(pil, np.float32)
    if rng.random() < settings.noise_probability:
        image = image + rng.normal(0, rng.uniform(*settings.noise_sigma), image.shape).astype(np.float32)
    pixels = _to_uint8(image)
    if rng.random() < settings.jpeg_probability:
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, "JPEG", quality=int(rng.integers(*settings.jpeg_quality, endpoint=True)))
        return np.asarray(Image.open(buffer).convert("RGB"), np.uint8), buffer.getvalue()
    return pixels, None


def _to_uint8(image: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def _background(rng, settings: WideSettings, width: int, height: int, object_colours) -> np.ndarray:
    """A tone (grey or colour) far enough from every object colour, plain or faintly textured."""
    base = None
    for _ in range(100):
        if rng.random() < settings.coloured_probability:
            candidate = rng.uniform(0, 255, 3)
        else:
            candidate = rng.uniform(*settings.tone) + rng.uniform(-8, 8, 3)
        candidate = np.clip(candidate, 0, 255)
        if all(np.linalg.norm(candidate - np.array(c)) >= MIN_CONTRAST for c in object_colours):
            base = candidate
            break
    if base is None:  # every draw was too close to some object: mid grey is far from all of them
        base = np.full(3, 128.0)
    texture = settings.textures[rng.integers(len(settings.textures))]
    image = np.empty((height, width, 3), np.float32)
    image[:] = base
    if texture == "plain":
        return image
    amplitude = rng.uniform(*TEXTURE_AMPLITUDE)
    sign = -1.0 if base.mean() > 128 else 1.0  # textures lean towards mid grey, never clip away
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    if texture == "gradient":
        angle = rng.uniform(0, 2 * math.pi)
        t = xs * math.cos(angle) + ys * math.sin(angle)
        pattern = (t - t.min()) / max(float(t.max() - t.min()), 1.0)
        image += sign * 2 * amplitude * pattern[..., None]
    elif texture == "noise":
        image += rng.normal(0, amplitude / 2, image.shape).astype(np.float32)
    else:
        period = rng.uniform(0.02, 0.08) * max(width, height)
        angle = rng.uniform(0, math.pi)
        u = (xs * math.cos(angle) + ys * math.sin(angle)) / period
        if texture == "stripes":
            pattern = np.floor(u) % 2
        else:
            v = (-xs * math.sin(angle) + ys * math.cos(angle)) / period
            pattern = (np.floor(u) + np.floor(v)) % 2
        image += sign * amplitude * pattern[..., None]
    return image


def _paint(image: np.ndarray, obj: ShapeObject, fill: np.ndarray, supersample: int) -> None:
    """Blends one object into `image` through a coverage mask drawn `supersample` times larger."""
    height, width = image.shape[:2]
    x0, y0 = max(int(math.floor(obj.cx - obj.extent)) - 1, 0), max(int(math.floor(obj.cy - obj.extent)) - 1, 0)
    x1 = min(int(math.ceil(obj.cx + obj.extent)) + 1, width)
    y1 = min(int(math.ceil(obj.cy + obj.extent)) + 1, height)
    mask = Image.new("L", ((x1 - x0) * supersample, (y1 - y0) * supersample), 0)
    s = supersample
    _draw_shape(ImageDraw.Draw(mask), obj.shape, (obj.cx - x0) * s, (obj.cy - y0) * s, obj.extent * s, 255)
    if s > 1:
        mask = mask.reduce(s)
    alpha = np.asarray(mask, np.float32)[..., None] / 255.0
    region = image[y0:y1, x0:x1]
    region += alpha * (fill - region)


# -------------------------------------------------------------------------------------- examples


def resize_for_model(pixels: np.ndarray, encoded: bytes | None, size: int) -> np.ndarray:
    """What the service makes of an upload of this picture: of its JPEG file when it has one
    (decoded at reduced scale, captioning.preprocess), else of a lossless file of its pixels."""
    if encoded is not None:
        return load_image_file(io.BytesIO(encoded), size, Image.MAX_IMAGE_PIXELS)
    return model_input(Image.fromarray(pixels), size)


def check_options(small_corner: float, jpeg_quality: tuple[int, int] | None) -> None:
    if not 0.0 <= small_corner <= 1.0:
        raise ValueError(f"small_corner is a share in [0, 1], not {small_corner}")
    if jpeg_quality is not None and not 1 <= jpeg_quality[0] <= jpeg_quality[1] <= 95:
        raise ValueError(f"jpeg_quality is a range of qualities within 1-95, not {jpeg_quality}")


def make_wide_example(
    split: str,
    index: int,
    variation: str | None = None,
    max_objects: int = 3,
    resize_to: int | None = None,
    small_corner: float = 0.0,
    jpeg_quality: tuple[int, int] | None = None,
) -> CaptionedImage:
    """Example `index` of `split`, or of wild variation `variation` (split then only names it);
    `small_corner` is the chance that a training example is drawn from SMALL_CORNER;
    `jpeg_quality` (lowest, highest) replaces the range a JPEG-compressed example's quality is
    drawn from (the same scenes and the same examples compressed, at other qualities)."""
    check_options(small_corner, jpeg_quality)
    if variation is not None:
        if variation not in VARIATIONS:
            raise ValueError(f"unknown variation {variation!r}; expected one of {tuple(VARIATIONS)}")
        settings = VARIATIONS[variation]
        seed = [WILD_ID, list(VARIATIONS).index(variation), index]
        image_id = f"shapes-wild-{variation}-{index:06d}"
    else:
        if split not in SPLIT_ID:
            raise ValueError(f"unknown split {split!r}; expected one of {tuple(SPLIT_ID)}")
        settings, seed, image_id = TRAINING, [SPLIT_ID[split], index], f"shapes-wide-{split}-{index:06d}"
        if split == "train" and small_corner and np.random.default_rng([CORNER_ID, index]).random() < small_corner:
            settings, image_id = SMALL_CORNER, f"shapes-wide-{split}-small-{index:06d}"
    if jpeg_quality is not None:
        settings = dataclasses.replace(settings, jpeg_quality=tuple(jpeg_quality))
    scene_rng, pixel_rng, caption_rng = np.random.default_rng(seed).spawn(3)
    scene = generate_wide_scene(scene_rng, settings, max_objects)
    pixels, encoded = render_wide(scene, pixel_rng, settings)
    if resize_to is not None:  # stored as the model's input: the file, if any, has been read
        pixels, encoded = resize_for_model(pixels, encoded, resize_to), None
    return CaptionedImage(
        image_id=image_id,
        captions=write_captions(scene, caption_rng),
        split=split,
        pixels=pixels,
        scene=scene,
        encoded=encoded,
    )


def load_wide_split(
    split: str,
    size: int | None = None,
    variation: str | None = None,
    max_objects: int = 3,
    resize_to: int | None = None,
    first: int = 0,
    small_corner: float = 0.0,
    jpeg_quality: tuple[int, int] | None = None,
) -> list[CaptionedImage]:
    """`size` examples (default: SPLIT_SIZES[split]) from index `first` on; `resize_to` stores them
    at the model's input size (training holds thousands in memory), else at their drawn size.
    Every index is its own seed, so `first` past a run's training images draws ones it never saw."""
    check_options(small_corner, jpeg_quality)  # before drawing: a bad option fails even with size 0
    count = SPLIT_SIZES.get(split, 1000) if size is None else size
    return [
        make_wide_example(split, i, variation, max_objects, resize_to, small_corner, jpeg_quality)
        for i in range(first, first + count)
    ]
