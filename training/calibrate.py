"""`python -m training calibrate`: fit the bundle's confidence calibration on a split with scenes.

    python -m training calibrate --artifacts model_artifacts/default/5 --dataset shapes_wide --split val

Captions the split greedily, grades each caption with the shapes checker (right = entirely true and
complete), fits captioning.calibration.Calibration (Platt scaling of the mean token log-probability)
to those labels, does the same for greedy captions with mirror_view (captioning.mirror) and, for a
model with a scene head, for grounded beam captions (one fit for those that agree with the head's
reading, one for those that do not), writes them all into the bundle's calibration.json and adds it
to the manifest. Fit it on the validation split, never on the split the evaluation reports.
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from captioning.calibration import FILE, expected_calibration_error, fit_calibration
from captioning.decoding import DecodeOptions


def best_captions(captioner, records, options: DecodeOptions = DecodeOptions(), batch_size: int = 32) -> list:
    """The best caption (captioning.decoding.Caption) of each of `records`, greedy by default."""
    from training.evaluate import record_input

    captions = []
    for start in range(0, len(records), batch_size):
        images = [record_input(captioner, r) for r in records[start : start + batch_size]]
        captions += [best[0] for best in captioner.caption(images, options, batch_size)]
    return captions


def raw_confidence(caption) -> float:
    """The decoder's own confidence, before any calibration (a captioner loaded without its fit has only that)."""
    return caption.raw_confidence if caption.raw_confidence is not None else caption.confidence


def grade(texts, records) -> np.ndarray:
    from captioning.scene_checker import check_caption

    if any(r.scene is None for r in records):
        raise ValueError(
            "calibration needs a dataset with scenes (shapes, shapes_wide) to know which captions are right"
        )
    return np.array([check_caption(t, r.scene).correct for t, r in zip(texts, records)], dtype=np.float64)


def calibrate_bundle(artifacts, dataset: str, split: str, limit: int | None, options: dict | None = None) -> dict:
    """Fits the calibration of greedy captions; when the model can mirror, of greedy captions with
    mirror_view; when it has a scene head, of grounded beam captions, apart for those that agree
    with the head's reading and those that do not; all on the same images. Writes calibration.json;
    returns a summary of each fit."""
    import dataclasses

    from captioning.artifacts import add_files, drop_file
    from captioning.captioner import Captioner
    from captioning.grounding import BEAM_SIZE
    from training.datasets.registry import load_dataset

    captioner = Captioner.load(artifacts, fitted_stages=False)  # raw confidences: the old fit plays no part
    records = load_dataset(dataset, split, limit=limit, **(options or {}))
    described = f"{dataset}/{split}, {len(records)} images"
    fits, summary = {}, {}

    def fit(field: str, name: str, captions: list, correct: np.ndarray) -> None:
        raw = np.array([raw_confidence(c) for c in captions])
        fits[field] = fit_calibration(raw, correct, fitted_on=f"{described}, {name}")
        fitted = np.array([fits[field].apply(c) for c in raw])
        summary[name] = {
            "fitted_on": fits[field].fitted_on,
            "slope": fits[field].slope,
            "bias": fits[field].bias,
            "captions": len(captions),
            "accuracy": float(correct.mean()),
            "ece_raw": expected_calibration_error(raw, correct),
            "ece_calibrated_in_sample": expected_calibration_error(fitted, correct),
        }

    decodings = {"greedy": ("greedy", DecodeOptions())}
    if captioner.mirror_permutation is not None:
        decodings["mirror_view"] = ("greedy, mirror_view", DecodeOptions(mirror_view=True))
    for field, (name, decoding) in decodings.items():
        captions = best_captions(captioner, records, decoding)
        fit(field, name, captions, grade([c.text for c in captions], records))
    if captioner.scene_head is not None:
        grounded = DecodeOptions(strategy="beam", beam_size=BEAM_SIZE, grounded=True)
        captions = best_captions(captioner, records, grounded)
        correct = grade([c.text for c in captions], records)
        for field, agrees in (("agreeing", True), ("disagreeing", False)):
            chosen = [i for i, c in enumerate(captions) if c.agrees_with_scene is agrees]
            if chosen:  # a model whose every caption agrees has no second group to fit
                name = f"grounded beam {BEAM_SIZE}, {'agreeing' if agrees else 'not agreeing'} with the scene"
                fit(field, name, [captions[i] for i in chosen], correct[chosen])
    calibration = dataclasses.replace(fits.pop("greedy"), **fits)
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
