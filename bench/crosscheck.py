"""Shapes scenes drawn by ANOTHER program, sent through the real service: is the model right?

    python -m bench.crosscheck --artifacts model_artifacts/default/7 --per-variation 60 \\
        --output docs/crosscheck-other-renderer.json

The training data comes from training/datasets/shapes_wide.py; grading the model only on that
renderer's pictures would reward learning its quirks. This script draws scenes its own way:
scikit-image's rasterisers (skimage.draw: disk, polygon, rectangle; hard edges), its own colour
values (web-style named colours, not the renderer's), its own layout (objects on a jittered
grid) and its own backgrounds, with what drawing programs and screenshots add (a 1-px border, a line of
text, a transparent background, CSS's named colours), and sends each one as a PNG or JPEG upload to POST /caption of the
app (in process, the real route and decoder). The caption is graded by the shapes checker against
the scene this script drew, with "small"/"large" as the model card defines them (object width
10-16% / 24-36% of the image's longer side). Needs scikit-image (a dev dependency).
"""

from __future__ import annotations

import argparse
import io
import json
from pathlib import Path

import numpy as np
from PIL import Image

from captioning.grounding import BEAM_SIZE as GROUNDED_BEAM_SIZE

# This program's own idea of the six colours (CSS-like), not the training renderer's RGB table.
COLOURS = {
    "red": (230, 25, 25),
    "green": (20, 170, 40),
    "blue": (25, 70, 235),
    "yellow": (255, 215, 0),
    "purple": (150, 40, 210),
    "orange": (255, 125, 0),
}
SHAPES = ("circle", "square", "triangle", "diamond", "cross")

# name: (width, height, background kind, object width as a share of the longer side per size, format)
VARIATIONS = {
    "dark background, 64 px": (64, 64, "dark", None, "PNG"),
    "dark background, 256 px": (256, 256, "dark", None, "PNG"),
    "dark background, 640x480 JPEG": (640, 480, "dark", None, "JPEG"),
    "large objects (~33% of the side)": (200, 200, "dark", {"large": (0.30, 0.35)}, "PNG"),
    "tiny objects (~11% of the side)": (240, 240, "dark", {"small": (0.105, 0.12)}, "PNG"),
    "white background, 128 px": (128, 128, "white", None, "PNG"),
    "light grey background, 320 px JPEG": (320, 320, "light", None, "JPEG"),
    "coloured background, 300x200": (300, 200, "coloured", None, "PNG"),
    "noisy background, 480x360 JPEG": (480, 360, "noisy", None, "JPEG"),
}
SIZE_SHARE = {"small": (0.11, 0.15), "large": (0.26, 0.33)}
# What drawing programs and screenshots add to a picture (added after the scene is drawn).
VARIATIONS.update(
    {
        "white 256 px, a black 1-px border": (256, 256, "white", None, "PNG"),
        "a screenshot: white 800x600, black 1-px border, a line of text": (800, 600, "white", None, "PNG"),
        "transparent background (RGBA PNG), 256 px": (256, 256, "white", None, "PNG"),
        "CSS named colours (#FF0000, #008000, #0000FF, ...), white 256 px": (256, 256, "white", None, "PNG"),
    }
)
FINISH = {
    "white 256 px, a black 1-px border": "border",
    "a screenshot: white 800x600, black 1-px border, a line of text": "screenshot",
    "transparent background (RGBA PNG), 256 px": "transparent",
}
# The colour names of CSS, SVG and matplotlib: further from the training colours than this program's own.
CSS_COLOURS = {
    "red": (255, 0, 0),
    "green": (0, 128, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "purple": (128, 0, 128),
    "orange": (255, 165, 0),
}
PALETTE = {"CSS named colours (#FF0000, #008000, #0000FF, ...), white 256 px": CSS_COLOURS}


def draw_shape(canvas: np.ndarray, shape: str, cx: float, cy: float, half: float, colour) -> None:
    from skimage import draw

    h, w = canvas.shape[:2]

    def box(top, left, bottom, right):
        rr, cc = draw.rectangle((round(top), round(left)), (round(bottom), round(right)), shape=(h, w))
        return rr.ravel(), cc.ravel()

    if shape == "circle":
        rr, cc = draw.disk((cy, cx), half, shape=(h, w))
    elif shape == "square":
        rr, cc = box(cy - half, cx - half, cy + half, cx + half)
    elif shape == "triangle":
        rr, cc = draw.polygon([cy - half, cy + half, cy + half], [cx, cx + half, cx - half], shape=(h, w))
    elif shape == "diamond":
        rr, cc = draw.polygon([cy - half, cy, cy + half, cy], [cx, cx + half, cx, cx - half], shape=(h, w))
    else:  # cross: two bars a third of the size thick
        bar = half / 3
        rr1, cc1 = box(cy - bar, cx - half, cy + bar, cx + half)
        rr2, cc2 = box(cy - half, cx - bar, cy + half, cx + bar)
        rr, cc = np.concatenate([rr1, rr2]), np.concatenate([cc1, cc2])
    canvas[np.asarray(rr, int), np.asarray(cc, int)] = colour


def background(kind: str, width: int, height: int, rng) -> np.ndarray:
    if kind == "dark":
        tone = rng.uniform(10, 80)
    elif kind == "white":
        tone = 255.0
    elif kind == "light":
        tone = rng.uniform(200, 235)
    elif kind == "noisy":
        tone = rng.uniform(60, 180)
    else:
        # a muted colour: far from every object colour by construction (low saturation, mid value)
        base = rng.uniform(90, 170, 3)
        return np.broadcast_to(base, (height, width, 3)).astype(np.uint8).copy()
    image = np.full((height, width, 3), tone)
    if kind == "noisy":
        image += rng.normal(0, 8, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


def draw_scene(variation: str, rng):
    """A scene on a jittered 2x2 grid of cells (this program's layout), as (pixels, Scene)."""
    from captioning.scenes import Scene, ShapeObject

    width, height, kind, share_override, _ = VARIATIONS[variation]
    shares = {**SIZE_SHARE, **(share_override or {})}
    long = max(width, height)
    pixels = background(kind, width, height, rng)
    count = int(rng.integers(1, 4))
    cells = rng.permutation(4)[:count]
    only = None
    if share_override:  # the variation is about one size: every object has it
        only = next(iter(share_override))
    objects = []
    for cell in cells:
        column, row = cell % 2, cell // 2
        size = only or ("large" if rng.random() < 0.5 else "small")
        half = rng.uniform(*shares[size]) * long / 2
        cell_w, cell_h = width / 2, height / 2
        # a large object may overflow its cell: fall back to fewer objects rather than overlap
        slack_x, slack_y = cell_w / 2 - half - 1, cell_h / 2 - half - 1
        if slack_x < 0 or slack_y < 0:
            continue
        cx = (column + 0.5) * cell_w + rng.uniform(-slack_x, slack_x)
        cy = (row + 0.5) * cell_h + rng.uniform(-slack_y, slack_y)
        shape, colour = SHAPES[rng.integers(5)], list(COLOURS)[rng.integers(6)]
        draw_shape(pixels, shape, cx, cy, half, PALETTE.get(variation, COLOURS)[colour])
        objects.append(ShapeObject(shape, colour, size, round(cx, 1), round(cy, 1), round(half, 1)))
    if not objects:
        return draw_scene(variation, rng)
    return pixels, Scene(min(width, height), tuple(objects), kind, width=width, height=height)


def finish(pixels: np.ndarray, variation: str) -> Image.Image:
    """The drawn scene as the file's picture: a border, a line of text or a transparent background."""
    kind = FINISH.get(variation)
    if kind in ("border", "screenshot"):
        pixels = pixels.copy()
        pixels[[0, -1]] = 0
        pixels[:, [0, -1]] = 0
    image = Image.fromarray(pixels)
    if kind == "screenshot":
        from PIL import ImageDraw

        ImageDraw.Draw(image).text((8, image.height - 16), "Drawn with SketchPad - example.com", fill=(110, 110, 110))
    if kind == "transparent":  # the white background becomes transparent (the objects are never white)
        alpha = np.where((pixels == 255).all(axis=2), 0, 255).astype(np.uint8)
        image = Image.fromarray(np.dstack([pixels, alpha]), "RGBA")
    return image


def encode(image: Image.Image, image_format: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, image_format, **({"quality": 75} if image_format == "JPEG" else {}))
    return buffer.getvalue()


def run(
    artifacts: str, per_variation: int, seed: int = 2024, mirror_view: bool = False, grounded: bool = False
) -> dict:
    from fastapi.testclient import TestClient

    from app.main import create_app
    from app.settings import Settings
    from captioning.scene_checker import check_caption

    rng = np.random.default_rng(seed)
    report = {
        "artifacts": artifacts,
        "per_variation": per_variation,
        "mirror_view": mirror_view,
        "grounded": grounded,
        "variations": {},
    }
    params = {"mirror_view": str(mirror_view).lower()}
    if grounded:  # as docs/MODEL.md measures it: the three best of a beam search, reranked
        params.update(strategy="beam", beam_size=str(GROUNDED_BEAM_SIZE), grounded="true")
    with TestClient(create_app(Settings(artifacts_dir=Path(artifacts), api_key=None))) as client:
        for variation in VARIATIONS:
            right, in_domain, examples = 0, 0, []
            for _ in range(per_variation):
                pixels, scene = draw_scene(variation, rng)
                image_format = VARIATIONS[variation][4]
                response = client.post(
                    "/caption",
                    params=params,
                    files={
                        "image": (
                            "scene",
                            encode(finish(pixels, variation), image_format),
                            f"image/{image_format.lower()}",
                        )
                    },
                )
                response.raise_for_status()
                body = response.json()
                verdict = check_caption(body["caption"], scene)
                right += verdict.correct
                in_domain += bool(body.get("in_domain", True))
                if not verdict.correct and len(examples) < 3:
                    examples.append(
                        {
                            "caption": body["caption"],
                            "scene": [o.describe() for o in scene.objects],
                            "false": verdict.false_facts,
                            "missing": verdict.missing,
                            "error": verdict.error,
                        }
                    )
            report["variations"][variation] = {
                "right": round(right / per_variation, 4),
                "accepted_in_domain": round(in_domain / per_variation, 4),
                "wrong_examples": examples,
            }
            print(f"{variation}: {right}/{per_variation} right, {in_domain} in domain", flush=True)
    return report


def main() -> None:
    from bench.harness import DEFAULT_BUNDLE

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--artifacts", default=str(DEFAULT_BUNDLE))
    parser.add_argument("--per-variation", type=int, default=60)
    parser.add_argument("--mirror-view", action="store_true", help="ask for mirror_view=true")
    parser.add_argument("--grounded", action="store_true", help="ask for grounded=true (strategy=beam, beam_size=3)")
    parser.add_argument("--output", help="write the JSON report here")
    args = parser.parse_args()
    report = run(args.artifacts, args.per_variation, mirror_view=args.mirror_view, grounded=args.grounded)
    if args.output:
        Path(args.output).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
