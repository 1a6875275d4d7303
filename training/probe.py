"""`python -m training probe-features`: do a bundle's image features still say what each object is?

    python -m training probe-features --artifacts model_artifacts/default/7 --train 12000 \\
        --per-variation 600 --output probe.json

When captions name the wrong shape, this tells whether the shape was lost in the encoder or in the
decoder. A probe is told where each object of a wide shapes scene is and reads only the features the
decoder attends to: the window of the encoder's grid around the object's centre, through one hidden
layer to a shape head and a colour head. It trains on training-split scenes, the encoder frozen,
then scores the test split and chosen wild variations beside the bundle's own greedy captions of
the same inputs. Where the captioner and the probe miss the same scenes, the features are the
limit; a probe is a lower bound on what features hold (docs/MODEL-EXPERIMENTS.md, "What the encoder's features
hold").
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from captioning.scenes import COLOURS, SHAPES, centre_cell
from training.datasets.shapes_wide import VARIATIONS

DEFAULT_VARIATIONS = ("standard", "tiny_objects", "low_resolution", "jpeg")


def object_windows(features: np.ndarray, scenes, radius: int = 1):
    """features [B, G*G, D] of B scenes -> per object: its (2r+1)^2*D window of the G x G grid
    around the cell holding its centre (zeros beyond the edge), its shape and colour indices, and
    the index of its scene."""
    count, cells, depth = features.shape
    grid = int(round(np.sqrt(cells)))
    if grid * grid != cells:
        raise ValueError(f"features of {cells} positions are not a square grid")
    width = 2 * radius + 1
    padded = np.zeros((count, grid + 2 * radius, grid + 2 * radius, depth), np.float32)
    padded[:, radius : radius + grid, radius : radius + grid] = features.reshape(count, grid, grid, depth)
    windows, shapes, colours, scene_of = [], [], [], []
    for index, scene in enumerate(scenes):
        for obj in scene.objects:
            row, column = centre_cell(obj, scene.frame, grid)
            windows.append(padded[index, row : row + width, column : column + width].reshape(-1))
            shapes.append(SHAPES.index(obj.shape))
            colours.append(COLOURS.index(obj.colour))
            scene_of.append(index)
    return np.stack(windows), np.array(shapes), np.array(colours), np.array(scene_of)


def fit_probe(windows: np.ndarray, shapes: np.ndarray, colours: np.ndarray, epochs: int = 12, seed: int = 1234):
    """A standardising layer, one hidden layer of 256 and two heads (shape, colour logits)."""
    import keras

    keras.utils.set_random_seed(seed)
    inputs = keras.Input((windows.shape[1],))
    standardise = keras.layers.Normalization()
    standardise.adapt(windows)
    hidden = keras.layers.Dense(256, activation="relu")(standardise(inputs))
    probe = keras.Model(
        inputs, [keras.layers.Dense(len(SHAPES))(hidden), keras.layers.Dense(len(COLOURS))(hidden)], name="probe"
    )
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    probe.compile(keras.optimizers.Adam(1e-3), loss=[loss, loss])
    probe.fit(windows, [shapes, colours], batch_size=128, epochs=epochs, verbose=0)
    return probe


def score_set(captioner, probe, records) -> dict:
    """The probe's reading of each object and scene beside the captioner's verdict per scene."""
    from training.calibrate import grade

    images = np.stack([record.pixels for record in records])
    scenes = [record.scene for record in records]
    windows, shapes, colours, scene_of = object_windows(captioner.encode(images), scenes)
    shape_logits, colour_logits = probe.predict(windows, batch_size=512, verbose=0)
    shape_right = shape_logits.argmax(1) == shapes
    colour_right = colour_logits.argmax(1) == colours
    read = np.ones(len(records), bool)
    np.logical_and.at(read, scene_of, shape_right & colour_right)
    captions = [captions[0].text for captions in captioner.caption(images)]
    right = grade(captions, records).astype(bool)
    return {
        "images": len(records),
        "objects": len(shapes),
        "probe_shape": round(float(shape_right.mean()), 4),
        "probe_colour": round(float(colour_right.mean()), 4),
        "probe_scenes_read": round(float(read.mean()), 4),
        "captioner": round(float(right.mean()), 4),
        "captioner_wrong": int((~right).sum()),
        "captioner_wrong_probe_misreads": int((~right & ~read).sum()),
    }


def probe_features(bundle, train: int, per_variation: int, test_images: int, variations, epochs: int = 12) -> dict:
    from captioning.captioner import Captioner
    from training.datasets.shapes_wide import make_wide_example

    captioner = Captioner.load(bundle)
    size = captioner.config.image_size
    # resize_to gives exactly the service's input for each picture (shapes_wide.resize_for_model);
    # the pictures go straight into one array, so that they are held once.
    pictures, scenes = np.empty((train, size, size, 3), np.uint8), []
    for i in range(train):
        record = make_wide_example("train", i, resize_to=size)
        pictures[i] = record.pixels
        scenes.append(record.scene)
    windows, shapes, colours, _ = object_windows(captioner.encode(pictures), scenes)
    del pictures
    probe = fit_probe(windows, shapes, colours, epochs)
    report = {"artifacts": str(bundle), "probe_trained_on": f"shapes_wide/train, {train} images, {len(shapes)} objects"}
    test = [make_wide_example("test", i, resize_to=size) for i in range(test_images)]
    report["test"] = score_set(captioner, probe, test)
    for variation in variations:
        records = [make_wide_example("test", i, variation, resize_to=size) for i in range(per_variation)]
        report[variation] = score_set(captioner, probe, records)
    return report


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "probe-features",
        help="can each object's shape and colour be read from the encoder's features?",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--artifacts", required=True, help="artifact bundle directory")
    p.add_argument("--train", type=int, default=12000, help="training-split scenes the probe learns from")
    p.add_argument("--per-variation", type=int, default=600, help="images per wild variation")
    p.add_argument("--test-images", type=int, default=1000, help="images of the standard test split")
    p.add_argument(
        "--variations", nargs="+", default=list(DEFAULT_VARIATIONS), choices=list(VARIATIONS), help="wild variations"
    )
    p.add_argument("--epochs", type=int, default=12, help="probe training epochs")
    p.add_argument("--output", metavar="FILE.json", help="write the report here")
    p.set_defaults(func=run)


def run(args) -> int:
    report = probe_features(
        args.artifacts, args.train, args.per_variation, args.test_images, args.variations, args.epochs
    )
    print(f"{'set':<22}{'probe: shape':>13}{'colour':>8}{'scenes read':>13}{'captioner':>11}{'wrong, both':>13}")
    for name, row in report.items():
        if isinstance(row, dict):
            print(
                f"{name:<22}{row['probe_shape']:>13.3f}{row['probe_colour']:>8.3f}{row['probe_scenes_read']:>13.3f}"
                f"{row['captioner']:>11.3f}{row['captioner_wrong_probe_misreads']:>6d} of {row['captioner_wrong']}"
            )
    if args.output:
        Path(args.output).write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.output}")
    return 0
