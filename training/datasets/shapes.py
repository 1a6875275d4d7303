"""The embedded synthetic "shapes" dataset: coloured shapes on plain backgrounds, with true captions.

It exists so the captioner can be trained and *graded* without downloading anything: every image
comes with its ground-truth `Scene`, and `captioning.scene_checker` can tell whether any caption of the
grammar below is true and complete for that scene.

Everything is deterministic. Example `index` of `split` is drawn from its own RNG, seeded by
`[SPLIT_ID[split], index]`, so splits never share a seed and example i is the same whatever
number of examples is asked for.

Caption grammar (lower case; commas are cosmetic and vanish after standardisation):
    NP       := ("a"|"an"|"one"|"two"|"three"|"four") [size] colour shape[s]
    LIST     := NP | NP ("," NP)* "and" NP
    caption  := [("there is"|"there are")] LIST
              | NP "is" REL NP [("and there is"|"and there are") LIST]
    REL      := "to the left of" | "to the right of" | "above" | "below"
Objects are grouped into one phrase per colour and shape, with a count; a size is said only when the
whole group shares it. The two phrases of a relation each single out one object.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw

from captioning.scenes import (
    COLOURS,
    MAX_OBJECTS,
    RELATIONS,
    SHAPES,
    SIZES,
    Scene,
    ShapeObject,
    noun_phrase,
    relation_holds,
)
from training.datasets.base import CaptionedImage

BACKGROUNDS = ("solid", "gradient", "noise")

# Far apart in hue so a small net tells them apart at 64x64, and all bright against the
# dark-to-mid grey backgrounds.
RGB = {
    "red": (225, 35, 35),
    "green": (40, 200, 60),
    "blue": (45, 95, 245),
    "yellow": (245, 225, 40),
    "purple": (170, 60, 220),
    "orange": (255, 140, 20),
}

# Half-size ranges in pixels at 64x64 (small: 10-12 px across, large: 18-22 px); they scale
# with the image size. The gap between the two keeps "small" and "large" unambiguous.
HALF_SIZE_AT_64 = {"small": (5.0, 6.0), "large": (9.0, 11.0)}
COLOUR_JITTER = 10  # per channel, small enough that a colour stays its name
NOISE_SIGMA = 6.0

SPLIT_ID = {"train": 1, "val": 2, "test": 3}
SPLIT_SIZES = {"train": 12000, "val": 500, "test": 1000}

# Share of captions using the relation form, when a scene allows one. "is" takes all of that
# share at one token while list wordings split theirs over several ("and", "a", "one", ...), so a
# larger share makes the relation the single most likely continuation and greedy decoding states
# one for most scenes (80% at 0.25). Relations stay in the data as variety, not as the norm.
RELATION_PROBABILITY = 0.1
SIZE_PROBABILITY = 0.3  # share of captions that mention sizes
THERE_IS_PROBABILITY = 0.5
ONE_PROBABILITY = 0.25  # "one red circle" instead of "a red circle"

# ---------------------------------------------------------------------------------------- scenes


def generate_scene(rng: np.random.Generator, image_size: int = 64, min_objects: int = 1, max_objects: int = 3) -> Scene:
    """Sample 1-4 objects whose boxes stay inside the image and never touch each other."""
    if not 1 <= min_objects <= max_objects <= MAX_OBJECTS:
        raise ValueError(f"need 1 <= min_objects <= max_objects <= {MAX_OBJECTS}")
    scale = image_size / 64
    gap = 2.0 * scale
    background = BACKGROUNDS[rng.integers(len(BACKGROUNDS))]
    count = int(rng.integers(min_objects, max_objects + 1))
    while True:  # rejection sampling; a crowded draw is simply redrawn
        objects: list[ShapeObject] = []
        for _ in range(count):
            placed = _place_object(rng, image_size, scale, gap, objects)
            if placed is None:
                break
            objects.append(placed)
        # several identical objects and nothing else ("two small red circles") have only four
        # captions in the grammar, one short of the five every image needs; redraw them too
        identical = count > 1 and len({(o.colour, o.shape, o.size) for o in objects}) == 1
        if len(objects) == count and not identical:
            return Scene(image_size, tuple(objects), background)


def _place_object(rng, image_size, scale, gap, others) -> ShapeObject | None:
    shape = SHAPES[rng.integers(len(SHAPES))]
    colour = COLOURS[rng.integers(len(COLOURS))]
    size = SIZES[rng.integers(len(SIZES))]
    low, high = HALF_SIZE_AT_64[size]
    extent = round(float(rng.uniform(low, high)) * scale, 1)
    border = 1.0 * scale
    for _ in range(50):
        cx, cy = (round(float(v), 1) for v in rng.uniform(border + extent, image_size - border - extent, 2))
        if all(_apart(cx, cy, extent, other, gap) for other in others):
            return ShapeObject(shape, colour, size, cx, cy, extent)
    return None


def _apart(cx, cy, extent, other: ShapeObject, gap) -> bool:
    """Two boxes are separated by `gap` if they are along at least one axis."""
    reach = extent + other.extent + gap
    return abs(cx - other.cx) >= reach or abs(cy - other.cy) >= reach


# ---------------------------------------------------------------------------------------- pixels


def render(scene: Scene, rng: np.random.Generator) -> np.ndarray:
    """Draw the scene at twice the size and box-downsample, which anti-aliases the edges."""
    size = scene.image_size
    background = _background(scene.background, size, rng)
    canvas = Image.fromarray(background.repeat(2, axis=0).repeat(2, axis=1))
    draw = ImageDraw.Draw(canvas)
    for obj in scene.objects:
        jitter = rng.integers(-COLOUR_JITTER, COLOUR_JITTER + 1, 3)
        fill = tuple(int(c) for c in np.clip(np.array(RGB[obj.colour]) + jitter, 0, 255))
        _draw_shape(draw, obj.shape, 2 * obj.cx, 2 * obj.cy, 2 * obj.extent, fill)
    return np.asarray(canvas.reduce(2), dtype=np.uint8)


def _background(kind: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """Dark-to-mid, nearly grey tones, so every object colour stands out."""

    def tone():
        return rng.uniform(15, 95) + rng.uniform(-12, 12, 3)

    if kind == "gradient":
        angle = rng.uniform(0, 2 * math.pi)
        ys, xs = np.mgrid[0:size, 0:size] / max(size - 1, 1)
        t = xs * math.cos(angle) + ys * math.sin(angle)
        t = (t - t.min()) / (t.max() - t.min())
        start, end = tone(), tone()
        image = start + t[..., None] * (end - start)
    else:
        image = np.broadcast_to(tone(), (size, size, 3)).copy()
        if kind == "noise":
            image += rng.normal(0, NOISE_SIGMA, image.shape)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, e: float, fill) -> None:
    box = (cx - e, cy - e, cx + e, cy + e)
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - e), (cx + e, cy + e), (cx - e, cy + e)], fill=fill)
    elif shape == "diamond":
        draw.polygon([(cx, cy - e), (cx + e, cy), (cx, cy + e), (cx - e, cy)], fill=fill)
    elif shape == "cross":
        arm = 0.36 * e  # half the bar thickness
        draw.rectangle((cx - e, cy - arm, cx + e, cy + arm), fill=fill)
        draw.rectangle((cx - arm, cy - e, cx + arm, cy + e), fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")


# -------------------------------------------------------------------------------------- captions


def join_list(phrases: list[str]) -> str:
    if len(phrases) == 1:
        return phrases[0]
    return ", ".join(phrases[:-1]) + " and " + phrases[-1]


def write_captions(scene: Scene, rng: np.random.Generator, n: int = 5) -> list[str]:
    """`n` different captions, each true of the scene and naming every object in it."""
    captions: list[str] = []
    pairs = _relation_candidates(scene)
    for _ in range(1000):
        caption = _write_caption(scene, rng, pairs)
        if caption not in captions:
            captions.append(caption)
            if len(captions) == n:
                return captions
    raise RuntimeError(f"could not write {n} distinct captions for {scene}")


def _write_caption(scene: Scene, rng: np.random.Generator, pairs: list) -> str:
    with_sizes = rng.random() < SIZE_PROBABILITY
    if pairs and rng.random() < RELATION_PROBABILITY:
        a, rel, b = pairs[rng.integers(len(pairs))]
        head = f"{_singular(scene, a, with_sizes)} is {rel} {_singular(scene, b, with_sizes)}"
        rest = [obj for obj in scene.objects if obj is not a and obj is not b]
        if not rest:
            return head
        # a leftover object sharing colour and shape with a related one is told apart by its size
        named = {(a.colour, a.shape), (b.colour, b.shape)}
        return f"{head} and {_list_caption(rest, rng, with_sizes, named, there=True)}"
    return _list_caption(list(scene.objects), rng, with_sizes, set(), there=rng.random() < THERE_IS_PROBABILITY)


def _list_caption(objects, rng, with_sizes: bool, force_size_for: set, there: bool) -> str:
    """One phrase per colour and shape, in random order; when sizes are on, a group of mixed sizes
    splits into one phrase per size ("a small red circle and a large red circle")."""
    groups: dict[tuple[str, str], list[ShapeObject]] = {}
    for obj in objects:
        groups.setdefault((obj.colour, obj.shape), []).append(obj)
    phrase_groups: list[tuple[list[ShapeObject], str | None]] = []
    for kind, members in groups.items():
        sizes = sorted({obj.size for obj in members})
        if len(sizes) == 1:
            phrase_groups.append((members, sizes[0] if with_sizes or kind in force_size_for else None))
        elif with_sizes:
            phrase_groups += [([obj for obj in members if obj.size == size], size) for size in sizes]
        else:
            phrase_groups.append((members, None))
    order = rng.permutation(len(phrase_groups))
    phrases = []
    for i in order:
        members, size = phrase_groups[i]
        one = len(members) == 1 and rng.random() < ONE_PROBABILITY
        phrases.append(noun_phrase(len(members), members[0].colour, members[0].shape, size, one))
    text = join_list(phrases)
    if there:
        verb = "is" if len(phrase_groups[order[0]][0]) == 1 else "are"
        text = f"there {verb} {text}"
    return text


def _relation_candidates(scene: Scene) -> list[tuple[ShapeObject, str, ShapeObject]]:
    """Every (a, rel, b) that clearly holds between two objects a singular phrase can single out."""
    nameable = [obj for obj in scene.objects if _needs_size(scene, obj) is not None]
    return [
        (a, rel, b)
        for a in nameable
        for b in nameable
        if a is not b
        for rel in RELATIONS
        if relation_holds(a, b, rel, scene.frame, strict=True)
    ]


def _needs_size(scene: Scene, obj: ShapeObject) -> bool | None:
    """False if colour and shape single the object out, True if size is also needed, None if nothing does."""
    same_kind = [o for o in scene.objects if (o.colour, o.shape) == (obj.colour, obj.shape)]
    if len(same_kind) == 1:
        return False
    if sum(o.size == obj.size for o in same_kind) == 1:
        return True
    return None


def _singular(scene: Scene, obj: ShapeObject, with_sizes: bool) -> str:
    size = obj.size if with_sizes or _needs_size(scene, obj) else None
    return noun_phrase(1, obj.colour, obj.shape, size)


# -------------------------------------------------------------------------------------- examples


def make_example(split: str, index: int, image_size: int = 64, max_objects: int = 3) -> CaptionedImage:
    """Example `index` of `split`; separate RNG streams for layout, pixels and words keep a change
    to the renderer from changing the captions."""
    if split not in SPLIT_ID:
        raise ValueError(f"unknown split {split!r}; expected one of {tuple(SPLIT_ID)}")
    scene_rng, pixel_rng, caption_rng = np.random.default_rng([SPLIT_ID[split], index]).spawn(3)
    scene = generate_scene(scene_rng, image_size, 1, max_objects)
    return CaptionedImage(
        image_id=f"shapes-{split}-{index:06d}",
        captions=write_captions(scene, caption_rng),
        split=split,
        pixels=render(scene, pixel_rng),
        scene=scene,
    )


def load_split(split: str, size: int | None = None, image_size: int = 64, max_objects: int = 3) -> list[CaptionedImage]:
    """The first `size` examples of `split` (default: SPLIT_SIZES[split])."""
    count = SPLIT_SIZES[split] if size is None else size
    return [make_example(split, i, image_size, max_objects) for i in range(count)]
