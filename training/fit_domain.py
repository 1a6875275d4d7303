"""`python -m training fit-domain`: fit the bundle's out-of-domain detector on its training data.

    python -m training fit-domain --artifacts model_artifacts/default/7 --dataset shapes_wide

Encodes training images (the distribution the model learnt) and held-out validation images with the
bundle's own encoder, fits captioning.domain.DomainModel (a Gaussian on pooled encoder features,
its threshold a margin over the validation images' distances), writes domain.npz into the bundle
and adds it to the manifest. Only in-domain images are used: nothing out-of-domain is fitted on,
so the photographs and other images training/ood_images.py reports on are a fair test.
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from captioning.domain import FILE, STATISTICS, fit_domain, image_statistics, pool_features


def pooled_features(captioner, records, frame: int, batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """(pooled encoder features, image statistics) of the records' model inputs."""
    from training.evaluate import record_input

    pooled, statistics = [], []
    for start in range(0, len(records), batch_size):
        images = np.stack([record_input(captioner, r) for r in records[start : start + batch_size]])
        pooled.append(pool_features(captioner.encode(images)))
        statistics.append(image_statistics(images, frame))
    return np.concatenate(pooled), np.concatenate(statistics)


def fit_domain_for_bundle(
    artifacts,
    dataset: str,
    train_limit: int,
    val_limit: int,
    quantile: float,
    margin: float,
    frame: int,
    train_options: dict | None = None,
    val_options: dict | None = None,
) -> dict:
    from captioning.artifacts import add_files, drop_file
    from captioning.captioner import Captioner
    from training.calibrate import record_stage
    from training.datasets.registry import RESIZING_LOADERS, load_dataset

    # Without the bundle's current domain check: it is fitted anew, and may be one fitted to another
    # encoder, which Captioner.load refuses.
    captioner = Captioner.load(artifacts, fitted_stages=False)
    train_options = dict(train_options or {})
    if dataset in RESIZING_LOADERS:
        train_options.setdefault("resize_to", captioner.config.image_size)
    train_records = load_dataset(dataset, "train", limit=train_limit, **train_options)
    val_records = load_dataset(dataset, "val", limit=val_limit, **(val_options or {}))  # generated: drawn size
    train, train_statistics = pooled_features(captioner, train_records, frame)
    val, val_statistics = pooled_features(captioner, val_records, frame)
    model = fit_domain(train, val, train_statistics, quantile=quantile, margin=margin, frame=frame)
    drop_file(artifacts, FILE)  # only now: a run that fails earlier leaves the bundle as it was
    model.save(f"{artifacts}/{FILE}")
    ratio = np.maximum(model.distances(val) / model.threshold, model.statistics_ratio(val_statistics))
    summary = {
        "fitted_on": f"{dataset}/train, {len(train)} images; threshold from {dataset}/val, {len(val)} images",
        "features": int(model.mean.size),
        "threshold": model.threshold,
        "quantile": quantile,
        "margin": margin,
        "frame": frame,
        "statistics": dict(
            zip(STATISTICS, zip(model.statistics_low.tolist(), model.statistics_high.tolist(), strict=False))
        ),
        "val_accepted": float((ratio <= 1).mean()),
    }
    record_stage(add_files(artifacts, (FILE,)), artifacts, "domain", summary)
    return summary


def add_parser(subparsers) -> None:
    from training.config import add_data_flags
    from training.datasets.registry import LOADERS

    p = subparsers.add_parser(
        "fit-domain",
        help="fit the bundle's out-of-domain detector on its training data",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--artifacts", required=True, help="artifact bundle directory (domain.npz is added)")
    p.add_argument("--dataset", choices=sorted(LOADERS), default="shapes_wide")
    add_data_flags(p, "dataset loader option, as for train", val_data=True)
    p.add_argument("--train-limit", type=int, default=8000, help="training images to fit the Gaussian on")
    p.add_argument("--val-limit", type=int, default=1000, help="validation images that set the threshold")
    p.add_argument("--quantile", type=float, default=0.995, help="of the validation distances")
    p.add_argument("--margin", type=float, default=1.5, help="threshold = margin x that quantile")
    p.add_argument(
        "--frame",
        type=int,
        default=3,
        help="pixels at each edge of the model input the image statistics leave out (a thin border, a "
        "screenshot's frame); 3 of 96 is about 3%%",
    )
    p.set_defaults(func=run)


def run(args) -> int:
    from training.config import parse_options

    train_options = parse_options(args.data)
    summary = fit_domain_for_bundle(
        args.artifacts,
        args.dataset,
        args.train_limit,
        args.val_limit,
        args.quantile,
        args.margin,
        args.frame,
        train_options,
        {**train_options, **parse_options(args.val_data)},
    )
    print(json.dumps(summary, indent=2))
    return 0
