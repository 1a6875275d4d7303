"""`python -m training fit-object-reader`: fit grounded decoding's object reader for a bundle.

    python -m training fit-object-reader --artifacts model_artifacts/default/7 --data small_corner=0.5 \
        --data jpeg_quality=15-95

Draws training scenes of a generated dataset (shapes_wide) as the model sees them (its
input side, by the service's path), cuts a window around every object with captioning.object_reader's
crop_windows, its centre and side jittered by about what the scene head's reading misses them by,
and fits the reader to name each one's shape. It reads pixels, not features, so it does not depend
on the bundle's encoder; it needs a bundle with a scene head, whose objects it reads again.
Validation: shape accuracy on the validation split's objects, windows at their true places.

Writes object_reader.keras into the bundle and adds it to the manifest. The bundle's grounded
confidence fits were made with the reading before it, so an existing calibration is removed:
run `python -m training calibrate` next (`make train-default` does).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

JITTER = 0.03  # of the input's side, each way: the scene head's centres are cell means (8 px cells at 96)
WINDOW_SCALE = (0.85, 1.15)  # the window's side, times its nominal one


def object_windows(records, side: int, rng: np.random.Generator | None, copies: int = 1):
    """Model inputs [B, S, S, 3] of records with scenes, and for each object (`copies` times, each
    jittered with rng; none without) its window box [K, 4], image index [K] and shape index [K]."""
    from captioning.object_reader import window_boxes
    from captioning.scenes import SHAPES

    images, centres, sizes, image_of_box, shapes, scales = [], [], [], [], [], []
    for index, record in enumerate(records):
        if record.scene is None:
            raise ValueError(f"{record.image_id} has no scene: the object reader needs a dataset with scenes")
        images.append(np.asarray(record.pixels, np.uint8))
        width, height = record.scene.frame
        for obj in record.scene.objects:
            for _ in range(copies):
                shift = rng.uniform(-JITTER, JITTER, 2) * side if rng is not None else np.zeros(2)
                centres.append((obj.cx * side / width + shift[0], obj.cy * side / height + shift[1]))
                scales.append(rng.uniform(*WINDOW_SCALE) if rng is not None else 1.0)
                sizes.append(obj.size)
                image_of_box.append(index)
                shapes.append(SHAPES.index(obj.shape))
    boxes = window_boxes(np.array(centres), sizes, side, scales)
    return np.stack(images), boxes, np.array(image_of_box, np.int32), np.array(shapes, np.int32)


def crops_of(images, boxes, image_of_box, batch: int = 4096) -> np.ndarray:
    from captioning.object_reader import crop_windows

    return np.concatenate(
        [
            crop_windows(images, boxes[start : start + batch], image_of_box[start : start + batch]).numpy()
            for start in range(0, len(boxes), batch)
        ]
    )


def fit_object_reader(
    artifacts,
    dataset: str = "shapes_wide",
    scenes: int = 16000,
    epochs: int = 6,
    batch_size: int = 128,
    learning_rate: float = 2e-3,
    val_limit: int = 1000,
    seed: int = 0,
    train_options: dict | None = None,
) -> dict:
    import keras

    from captioning.artifacts import add_files, drop_file, load_models, verify_bundle
    from captioning.calibration import FILE as CALIBRATION_FILE
    from captioning.object_reader import FILE, build_reader
    from training.calibrate import record_stage
    from training.datasets.registry import RESIZING_LOADERS, load_dataset

    manifest = verify_bundle(artifacts)
    if "scene_head.npz" not in manifest["files"]:
        raise ValueError(f"{artifacts}: the bundle has no scene head, whose objects the reader reads again")
    side = load_models(artifacts)[0].image_size
    if dataset not in RESIZING_LOADERS:
        raise ValueError(
            f"{dataset}: the object reader needs a generated dataset with scenes ({sorted(RESIZING_LOADERS)})"
        )
    started = time.perf_counter()
    rng = np.random.default_rng(seed)
    train = load_dataset(dataset, "train", limit=scenes, resize_to=side, **(train_options or {}))
    x, y = _crops_and_shapes(train, side, rng, copies=2)
    val = load_dataset(dataset, "val", limit=val_limit, resize_to=side)
    val_x, val_y = _crops_and_shapes(val, side, None)
    drawn = time.perf_counter() - started

    keras.utils.set_random_seed(seed)
    reader = build_reader()
    steps = epochs * -(-len(x) // batch_size)
    optimizer = keras.optimizers.Adam(keras.optimizers.schedules.CosineDecay(learning_rate, steps))
    reader.compile(optimizer, keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    history = reader.fit(x, y, batch_size=batch_size, epochs=epochs, validation_data=(val_x, val_y), verbose=2)
    drop_file(artifacts, FILE)  # only now: a run that fails earlier leaves the bundle as it was
    reader.save(f"{artifacts}/{FILE}")
    summary = {
        "fitted_on": f"{dataset}/train, {len(train)} scenes, {len(x)} windows (2 per object, jittered)",
        "options": train_options or {},
        "image_size": side,
        "epochs": epochs,
        "val_shape_accuracy": round(float(history.history["val_accuracy"][-1]), 4),
        "val_objects": int(len(val_y)),
        "seconds": {"data": round(drawn, 1), "total": round(time.perf_counter() - started, 1)},
    }
    if CALIBRATION_FILE in manifest["files"]:
        drop_file(artifacts, CALIBRATION_FILE)
        summary["calibration"] = "removed: its grounded fits were made with the reading before; calibrate anew"
    record_stage(add_files(artifacts, (FILE,)), artifacts, "object_reader", summary)
    return summary


def _crops_and_shapes(records, side: int, rng, copies: int = 1) -> tuple[np.ndarray, np.ndarray]:
    images, boxes, image_of_box, shapes = object_windows(records, side, rng, copies)
    return crops_of(images, boxes, image_of_box), shapes


def add_parser(subparsers) -> None:
    from training.config import add_data_flags
    from training.datasets.registry import RESIZING_LOADERS

    p = subparsers.add_parser(
        "fit-object-reader",
        help="fit grounded decoding's object reader (object_reader.keras) for a bundle with a scene head",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--artifacts", required=True, help="artifact bundle directory (object_reader.keras is added)")
    p.add_argument("--dataset", choices=RESIZING_LOADERS, default="shapes_wide", help="a generated dataset with scenes")
    add_data_flags(p, "dataset loader option, as for train")
    p.add_argument("--scenes", type=int, default=16000, help="training scenes to cut windows from")
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run)


def run(args) -> int:
    from training.config import parse_options

    summary = fit_object_reader(
        args.artifacts,
        args.dataset,
        scenes=args.scenes,
        epochs=args.epochs,
        seed=args.seed,
        train_options=parse_options(args.data),
    )
    print(json.dumps(summary, indent=2))
    return 0
