"""`python -m training demo-samples`: the few scenes the demo page offers to try (app/static/samples/).

Drawn by the wide-domain renderer from wild variations (so not training images), plus one image
that is not a shapes scene (a smooth random colour field), to show the out-of-domain warning. The
app only serves the files (app/routes/demo.py SAMPLES); regenerate them after a renderer change.
"""

from __future__ import annotations

import argparse
import io
from pathlib import Path

from PIL import Image

SAMPLES_DIR = Path(__file__).resolve().parents[1] / "app" / "static" / "samples"
# file name -> (variation, index): each a clear, varied example
SCENES = {
    "dark.png": ("dark_background", 1),
    "white.png": ("white_background", 2),
    "coloured.png": ("coloured_background", 3),
    "textured.png": ("textured_background", 3),
    "tiny.png": ("tiny_objects", 0),
    "photo-like.jpg": ("jpeg", 5),
}
NOT_A_SCENE = "not-a-scene.png"


def write_samples(directory: Path = SAMPLES_DIR) -> list[Path]:
    from training.datasets.shapes_wide import make_wide_example
    from training.ood_images import smooth_fields

    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, (variation, index) in SCENES.items():
        example = make_wide_example("test", index, variation)
        image = Image.fromarray(example.pixels)
        image.thumbnail((320, 320))  # keep the shipped files small
        path = directory / name
        buffer = io.BytesIO()
        image.save(
            buffer, "JPEG" if name.endswith(".jpg") else "PNG", **({"quality": 60} if name.endswith(".jpg") else {})
        )
        path.write_bytes(buffer.getvalue())
        written.append(path)
    _, field = smooth_fields(1, seed=7)[0]
    image = Image.fromarray(field)
    image.thumbnail((320, 320))
    image.save(directory / NOT_A_SCENE)
    written.append(directory / NOT_A_SCENE)
    return written


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "demo-samples",
        help="write the demo page's sample images (app/static/samples/)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--output", type=Path, default=SAMPLES_DIR)
    p.set_defaults(func=lambda args: print("\n".join(map(str, write_samples(args.output)))) or 0)
