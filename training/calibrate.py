"""`python -m training calibrate`: fit the bundle's confidence calibration on a split with scenes.

    python -m training calibrate --artifacts model_artifacts/default/5 --dataset shapes_wide --split val

Captions the split greedily, grades each caption with the shapes checker (right = entirely true and
complete), fits captioning.calibration.Calibration (Platt scaling of the mean token log-probability)
to those labels, does the same for greedy captions with mirror_view (captioning.mirror), writes both
into the bundle's calibration.json and adds it to the manifest. Fit it on
the validation split, never on the split the evaluation reports.
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from captioning.calibration import FILE, expected_calibration_error, fit_calibration
from captioning.decoding import DecodeOptions


def caption_with_confidence(captioner, records, options: DecodeOptions = DecodeOptions(), batch_size: int = 32):
    """Captions of `records` (greedy by default) -> (texts, raw confidences, calibrated confidences)."""
    from training.evaluate import record_input

    texts, raw, calibrated = [], [], []
    for start in range(0, len(records), batch_size):
        images = [record_input(captioner, r) for r in records[start : start + batch_size]]
        for best in captioner.caption(images, options, batch_size):
            caption = best[0]
            texts.append(caption.text)
            calibrated.append(caption.confidence)
            raw.append(caption.raw_confidence if caption.raw_confidence is not None else caption.confidence)
    return texts, np.array(raw), np.array(calibrated)


def grade(texts, records) -> np.ndarray:
    from captioning.scene_checker import check_caption

    if any(r.scene is None for r in records):
        raise ValueError(
            "calibration needs a dataset with scenes (shapes, shapes_wide) to know which captions are right"
        )
    return np.array([check_caption(t, r.scene).correct for t, r in zip(texts, records)], dtype=np.float64)


def calibrate_bundle(artifacts, dataset: str, split: str, limit: int | None, options: dict | None = None) -> dict:
    """Fits the calibration of greedy captions and, when the model can mirror, of greedy captions
    with mirror_view, on the same images; writes calibration.json; returns a summary of each fit."""
    import dataclasses

    from captioning.artifacts import add_files, drop_file
    from captioning.captioner import Captioner
    from training.datasets.registry import load_dataset

    captioner = Captioner.load(artifacts, fitted_stages=False)  # raw confidences: the old fit plays no part
    records = load_dataset(dataset, split, limit=limit, **(options or {}))
    decodings = {"greedy": DecodeOptions()}
    if captioner.mirror_permutation is not None:
        decodings["greedy, mirror_view"] = DecodeOptions(mirror_view=True)
    fits, summary = {}, {}
    for name, decoding in decodings.items():
        texts, raw, _ = caption_with_confidence(captioner, records, decoding)
        correct = grade(texts, records)
        fits[name] = fit_calibration(raw, correct, fitted_on=f"{dataset}/{split}, {len(records)} images, {name}")
        fitted = np.array([fits[name].apply(c) for c in raw])
        summary[name] = {
            "fitted_on": fits[name].fitted_on,
            "slope": fits[name].slope,
            "bias": fits[name].bias,
            "accuracy": float(correct.mean()),
            "ece_raw": expected_calibration_error(raw, correct),
            "ece_calibrated_in_sample": expected_calibration_error(fitted, correct),
        }
    calibration = dataclasses.replace(fits["greedy"], mirror_view=fits.get("greedy, mirror_view"))
    drop_file(artifacts, FILE)  # only now: a run that fails earlier leaves the bundle as it was
    calibration.save(f"{artifacts}/{FILE}")
    record_stage(add_files(artifacts, (FILE,)), artifacts, "calibration", summary)
    return summary


def record_stage(manifest: dict, artifacts, stage: str, summary: dict) -> None:
    """Notes a post-training stage's results in the manifest (not a checksummed file)."""
    manifest.setdefault("stages", {})[stage] = summary
    with open(f"{artifacts}/manifest.json", "w") as f:
        f.write(json.dumps(manifest, indent=2) + "\n")


SCENE_DATASETS = ("shapes", "shapes_wide")  # the grounded checker needs each image's scene


def add_parser(subparsers) -> None:
    from training.config import add_data_flags
    from training.datasets.base import SPLITS

    p = subparsers.add_parser(
        "calibrate",
        help="fit the bundle's confidence calibration on a split with scenes",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--artifacts", required=True, help="artifact bundle directory (calibration.json is added)")
    p.add_argument(
        "--dataset",
        choices=SCENE_DATASETS,
        default="shapes_wide",
        help="a dataset whose scenes the grounded checker knows: it decides which captions are right",
    )
    p.add_argument("--split", choices=SPLITS, default="val", help="never the split you report")
    p.add_argument("--limit", type=int, default=1000, help="images to fit on")
    add_data_flags(p, "dataset loader option, as for train")
    p.set_defaults(func=run)


def run(args) -> int:
    from training.config import parse_options

    summary = calibrate_bundle(args.artifacts, args.dataset, args.split, args.limit, parse_options(args.data))
    print(json.dumps(summary, indent=2))
    return 0
