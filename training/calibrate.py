"""`python -m training calibrate`: fit the bundle's confidence calibration on a split with scenes.

    python -m training calibrate --artifacts model_artifacts/default/5 --dataset shapes_wide --split val

Captions the split greedily, grades each caption with the shapes checker (right = entirely true and
complete), fits captioning.calibration.Calibration (Platt scaling of the mean token log-probability)
to those labels, does the same for greedy captions with mirror_view (captioning.mirror), for the
captions below the first of a beam's and a sampler's n-best, and, for a model with a scene head,
for grounded beam captions (by whether each agrees with the head's reading, the first caption and
those below it apart), writes them all into the bundle's calibration.json and adds it to the
manifest. Fit it on the validation split, never on the split the evaluation reports.
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from captioning.calibration import FILE, Calibration, expected_calibration_error, fit_calibration
from captioning.decoding import DecodeOptions
from captioning.grounding import BEAM_SIZE


def n_best_captions(captioner, records, options: DecodeOptions = DecodeOptions(), batch_size: int = 32) -> list:
    """The captions (captioning.decoding.Caption, best first) of each of `records`, greedy by default."""
    from training.evaluate import record_input

    captions = []
    for start in range(0, len(records), batch_size):
        images = [record_input(captioner, r) for r in records[start : start + batch_size]]
        captions += captioner.caption(images, options, batch_size)
    return captions


def best_captions(captioner, records, options: DecodeOptions = DecodeOptions(), batch_size: int = 32) -> list:
    """The best caption of each of `records`."""
    return [captions[0] for captions in n_best_captions(captioner, records, options, batch_size)]


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


# A group of captions smaller than this gets no fit of its own (the greedy fit serves it): a Platt
# fit to one or three captions served every caption of its group at 0.995, or backwards. A bigger
# group with fewer right or wrong captions than MIN_GROUP_OUTCOMES, or whose fit would give less
# confidence to likelier captions, gets its own rate of right captions (add-one smoothed) instead.
MIN_GROUP_CAPTIONS = 30
MIN_GROUP_OUTCOMES = 3
N_BEST = 3  # the n-best the fits below the first caption are made on (a beam of 3, 3 samples)
SAMPLE_SEED = 0


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


def fit_subgroup(captions: list, correct: np.ndarray, fitted_on: str) -> tuple[Calibration | None, dict]:
    """fit_group for one of the groups a decoding splits into, within MIN_GROUP_CAPTIONS and
    MIN_GROUP_OUTCOMES; None where the group is too small to fit."""
    count, right = len(captions), int(correct.sum())
    if count < MIN_GROUP_CAPTIONS:
        return None, {
            "captions": count,
            "right": right,
            "not_fitted": f"under {MIN_GROUP_CAPTIONS} captions; the greedy fit serves them",
        }
    why = f"under {MIN_GROUP_OUTCOMES} right or wrong captions"
    if min(right, count - right) >= MIN_GROUP_OUTCOMES:
        fit, summary = fit_group(captions, correct, fitted_on)
        if fit.slope > 0:
            return fit, summary
        why = f"the fit fell with the log-probability (slope {fit.slope:.3f})"
    rate = (right + 1) / (count + 2)
    fit = Calibration(0.0, float(np.log(rate / (1 - rate))), f"{fitted_on}, its rate of right captions")
    return fit, {"fitted_on": fit.fitted_on, "captions": count, "right": right, "rate": rate, "why_a_rate": why}


# The groups an n-best's captions are fitted in, by Calibration field: what each holds.
GROUPS = {
    "beam_lower": f"beam {N_BEST}, captions below the first",
    "sample_lower": f"{N_BEST} samples, captions below the first",
    "agreeing": f"grounded beam {BEAM_SIZE}, first caption, agreeing with the scene",
    "disagreeing": f"grounded beam {BEAM_SIZE}, first caption, not agreeing with the scene",
    "agreeing_lower": f"grounded beam {BEAM_SIZE}, captions below the first, agreeing with the scene",
    "disagreeing_lower": f"grounded beam {BEAM_SIZE}, captions below the first, not agreeing with the scene",
}


def below_first(field: str):
    """The grouping of an n-best whose captions below the first form group `field`."""
    return lambda rank, caption: field if rank > 0 else None


def grounded_group(rank: int, caption) -> str:
    answer = "agreeing" if caption.agrees_with_scene else "disagreeing"
    return answer if rank == 0 else f"{answer}_lower"


def group_fits(n_best: list, correct: list, group_of, fields: tuple, described: str) -> tuple[dict, dict]:
    """Fits (fit_subgroup) for the `fields` of GROUPS that group_of(rank, caption) sorts an
    n-best's captions into (None: in no group); correct[i][rank] grades n_best[i][rank].
    Returns (fits by field, summary by group)."""
    members = {field: ([], []) for field in fields}
    for captions, right in zip(n_best, correct):
        for rank, caption in enumerate(captions):
            field = group_of(rank, caption)
            if field is not None:
                members[field][0].append(caption)
                members[field][1].append(right[rank])
    fits, summary = {}, {}
    for field, (captions, right) in members.items():
        name = GROUPS[field]
        fit, summary[name] = fit_subgroup(captions, np.array(right, float), f"{described}, {name}")
        if fit is not None:
            fits[field] = fit
    return fits, summary


def grade_n_best(n_best: list, records) -> list[np.ndarray]:
    return [grade([c.text for c in captions], [record] * len(captions)) for captions, record in zip(n_best, records)]


def calibrate_bundle(artifacts, dataset: str, split: str, limit: int | None, options: dict | None = None) -> dict:
    """Fits the calibration of greedy captions; when the model can mirror, of greedy captions with
    mirror_view; of the captions below the first of a beam's and a sampler's n-best; when the model
    has a scene head, of grounded beam captions by their answer, the first and those below apart;
    all on the same images. Writes calibration.json; returns a summary of each fit."""
    import dataclasses

    from captioning.artifacts import add_files, drop_file
    from captioning.captioner import Captioner
    from training.datasets.registry import load_dataset

    captioner = Captioner.load(artifacts, fitted_stages=False)  # raw confidences: the old fit plays no part
    records = load_dataset(dataset, split, limit=limit, **(options or {}))
    described = f"{dataset}/{split}, {len(records)} images"
    firsts = {"greedy": ("greedy", DecodeOptions())}
    if captioner.mirror_permutation is not None:
        firsts["mirror_view"] = ("greedy, mirror_view", DecodeOptions(mirror_view=True))
    fits, summary = {}, {}
    for field, (name, decoding) in firsts.items():
        captions = best_captions(captioner, records, decoding)
        correct = grade([c.text for c in captions], records)
        fits[field], summary[name] = fit_group(captions, correct, f"{described}, {name}")
    beam = DecodeOptions(strategy="beam", beam_size=N_BEST, num_captions=N_BEST)
    sample = DecodeOptions(strategy="sample", num_captions=N_BEST, seed=SAMPLE_SEED)
    n_bests = [
        (beam, below_first("beam_lower"), ("beam_lower",)),
        (sample, below_first("sample_lower"), ("sample_lower",)),
    ]
    if captioner.scene_head is not None:
        grounded = DecodeOptions(strategy="beam", beam_size=BEAM_SIZE, num_captions=BEAM_SIZE, grounded=True)
        n_bests.append((grounded, grounded_group, ("agreeing", "disagreeing", "agreeing_lower", "disagreeing_lower")))
    for decoding, group_of, fields in n_bests:
        n_best = n_best_captions(captioner, records, decoding)
        group, group_summary = group_fits(n_best, grade_n_best(n_best, records), group_of, fields, described)
        fits.update(group)
        summary.update(group_summary)
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
