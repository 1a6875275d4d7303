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

from captioning.calibration import FILE, Calibration, expected_calibration_error, fit_calibration
from captioning.decoding import DecodeOptions
from captioning.grounding import BEAM_SIZE


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


# A group of grounded captions smaller than this, or with fewer right or wrong captions, or whose
# fit would give less confidence to a likelier caption, gets no fit of its own (the greedy fit
# serves it): a Platt fit to one or three captions served every caption at 0.995, or backwards.
MIN_GROUP_CAPTIONS = 30
MIN_GROUP_OUTCOMES = 3


def fit_group(captions: list, correct: np.ndarray, fitted_on: str) -> tuple[Calibration, dict]:
    """A Platt fit of `captions` (their raw confidences) to their correctness, and its summary."""
    raw = np.array([raw_confidence(c) for c in captions])
    fit = fit_calibration(raw, correct, fitted_on=fitted_on)
    fitted = np.array([fit.apply(c) for c in raw])
    return fit, {
        "fitted_on": fit.fitted_on,
        "slope": fit.slope,
        "bias": fit.bias,
        "captions": len(captions),
        "accuracy": float(correct.mean()),
        "ece_raw": expected_calibration_error(raw, correct),
        "ece_calibrated_in_sample": expected_calibration_error(fitted, correct),
    }


def grounded_fits(captions: list, correct: np.ndarray, described: str) -> tuple[dict, dict]:
    """Grounded captions' fits by their answer (Calibration.agreeing and .disagreeing), each where
    its group is big and mixed enough; returns (fits by field, summary by group name)."""
    fits, summary = {}, {}
    for field, agrees in (("agreeing", True), ("disagreeing", False)):
        name = f"grounded beam {BEAM_SIZE}, {'agreeing' if agrees else 'not agreeing'} with the scene"
        chosen = np.array([c.agrees_with_scene is agrees for c in captions], bool)
        right = int(correct[chosen].sum())
        if chosen.sum() < MIN_GROUP_CAPTIONS or min(right, chosen.sum() - right) < MIN_GROUP_OUTCOMES:
            summary[name] = {
                "captions": int(chosen.sum()),
                "right": right,
                "not_fitted": f"under {MIN_GROUP_CAPTIONS} captions or under {MIN_GROUP_OUTCOMES} right or wrong; "
                "the greedy fit serves these captions",
            }
            continue
        fit, summary[name] = fit_group([c for c, keep in zip(captions, chosen) if keep], correct[chosen],
                                       f"{described}, {name}")  # fmt: skip
        if fit.slope <= 0:
            summary[name]["not_fitted"] = "the fit gives less confidence to likelier captions; the greedy fit serves"
            continue
        fits[field] = fit
    return fits, summary


def calibrate_bundle(artifacts, dataset: str, split: str, limit: int | None, options: dict | None = None) -> dict:
    """Fits the calibration of greedy captions; when the model can mirror, of greedy captions with
    mirror_view; when it has a scene head, of the best grounded beam caption of each image, apart
    for those that agree with the head's reading and those that do not (grounded_fits); all on the
    same images. Writes calibration.json; returns a summary of each fit."""
    import dataclasses

    from captioning.artifacts import add_files, drop_file
    from captioning.captioner import Captioner
    from training.datasets.registry import load_dataset

    captioner = Captioner.load(artifacts, fitted_stages=False)  # raw confidences: the old fit plays no part
    records = load_dataset(dataset, split, limit=limit, **(options or {}))
    described = f"{dataset}/{split}, {len(records)} images"
    decodings = {"greedy": ("greedy", DecodeOptions())}
    if captioner.mirror_permutation is not None:
        decodings["mirror_view"] = ("greedy, mirror_view", DecodeOptions(mirror_view=True))
    fits, summary = {}, {}
    for field, (name, decoding) in decodings.items():
        captions = best_captions(captioner, records, decoding)
        correct = grade([c.text for c in captions], records)
        fits[field], summary[name] = fit_group(captions, correct, f"{described}, {name}")
    if captioner.scene_head is not None:
        captions = best_captions(captioner, records, DecodeOptions(strategy="beam", beam_size=BEAM_SIZE, grounded=True))
        grounded, summary_grounded = grounded_fits(captions, grade([c.text for c in captions], records), described)
        fits.update(grounded)
        summary.update(summary_grounded)
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
