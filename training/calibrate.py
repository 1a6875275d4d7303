"""`python -m training calibrate`: fit the bundle's confidence calibration on a split with scenes.

    python -m training calibrate --artifacts model_artifacts/default/7 --dataset shapes_wide --split val

Captions the split greedily, grades each caption with the shapes checker (right = entirely true and
complete), fits captioning.calibration.Calibration (Platt scaling of the mean token log-probability)
to those labels, does the same for greedy captions with mirror_view (captioning.mirror) and for
the captions of an n-best of 3 by rank: a beam's, a sampler's and, for a model with a scene head,
a grounded beam's by whether each caption agrees with the head's reading. Writes them all into
the bundle's calibration.json and adds it to the manifest. Fit it on the validation split, never on
the split the evaluation reports.
"""

from __future__ import annotations

import argparse
import dataclasses
import json

import numpy as np

from captioning.calibration import (
    ANSWER_KINDS,
    FILE,
    Calibration,
    calibrated_answer,
    expected_calibration_error,
    fit_calibration,
)
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


# A group of captions smaller than this gets no fit of its own (the rank before it serves it; for
# the first, the greedy fit): a Platt fit to one or three captions served every caption of its
# group at 0.995, or backwards. A bigger group with fewer right or wrong captions than
# MIN_GROUP_OUTCOMES, or whose fit would give less confidence to likelier captions, gets its own
# rate of right captions (add-one smoothed) instead.
MIN_GROUP_CAPTIONS = 30
MIN_GROUP_OUTCOMES = 3
# The n-best the rank fits are made on (Calibration.ranked_width): the default beam, and the grounded
# beam the reports use. How often a caption of a given rank is right depends on the width too.
N_BEST = BEAM_SIZE
SAMPLE_SEED = 0  # image i is sampled with seed SAMPLE_SEED + i: repeatable, and no two images alike


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
            "not_fitted": f"under {MIN_GROUP_CAPTIONS} captions; the fit of the rank before serves them",
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


def sampled_n_best(captioner, records, options: DecodeOptions) -> list:
    """n_best_captions for a sampler, each image with a seed of its own (one seed for all would
    draw one random stream for every image: the fits moved with the seed)."""
    from training.evaluate import record_input

    return [
        captioner.caption([record_input(captioner, record)], dataclasses.replace(options, seed=SAMPLE_SEED + i))[0]
        for i, record in enumerate(records)
    ]


def rank_fits(n_best: list, correct: list, kind_of, described: str, name: str) -> tuple[dict, dict]:
    """Fits (fit_subgroup) of an n-best's captions by kind and rank: kind_of(caption) names the
    Calibration.ranks kind a caption belongs to; correct[i][rank] grades n_best[i][rank].
    Returns ({kind: (fit or None by rank)}, summary by group name)."""
    groups: dict[tuple[str, int], tuple[list, list]] = {}
    for captions, right in zip(n_best, correct):
        for rank, caption in enumerate(captions):
            members = groups.setdefault((kind_of(caption), rank), ([], []))
            members[0].append(caption)
            members[1].append(right[rank])
    fits: dict[str, list] = {}
    summary = {}
    for (kind, rank), (captions, right) in sorted(groups.items()):
        group = f"{name}, {kind.replace('_', ' ')}, rank {rank + 1}"
        fit, summary[group] = fit_subgroup(captions, np.array(right, float), f"{described}, {group}")
        ranked = fits.setdefault(kind, [])
        ranked += [None] * (rank + 1 - len(ranked))
        ranked[rank] = fit
    return {kind: tuple(ranked) for kind, ranked in fits.items()}, summary


def grade_n_best(n_best: list, records) -> list[np.ndarray]:
    return [grade([c.text for c in captions], [record] * len(captions)) for captions, record in zip(n_best, records)]


def calibrate_bundle(artifacts, dataset: str, split: str, limit: int | None, options: dict | None = None) -> dict:
    """Fits the calibration of greedy captions; when the model can mirror, of greedy captions with
    mirror_view; of an n-best's captions by rank, for a beam, a sampler and (when the model has a
    scene head) a grounded beam by answer; all on the same images. Writes calibration.json; returns
    a summary of each fit."""
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
    ranks = {}
    beam = DecodeOptions(strategy="beam", beam_size=N_BEST, num_captions=N_BEST)
    sample = DecodeOptions(strategy="sample", num_captions=N_BEST)
    n_bests = [
        (f"beam {N_BEST}", n_best_captions(captioner, records, beam), lambda caption: "beam"),
        (f"{N_BEST} samples", sampled_n_best(captioner, records, sample), lambda caption: "sample"),
    ]
    if captioner.scene_head is not None:
        grounded = dataclasses.replace(beam, grounded=True)
        answer = lambda caption: ANSWER_KINDS[calibrated_answer(caption)]  # noqa: E731
        n_bests.append((f"grounded beam {N_BEST}", n_best_captions(captioner, records, grounded), answer))
    for name, n_best, kind_of in n_bests:
        by_kind, rank_summary = rank_fits(n_best, grade_n_best(n_best, records), kind_of, described, name)
        ranks.update(by_kind)
        summary.update(rank_summary)
    calibration = dataclasses.replace(
        fits["greedy"], mirror_view=fits.get("mirror_view"), ranks=ranks, ranked_width=N_BEST
    )
    drop_file(artifacts, FILE)  # only now: a run that fails earlier leaves the bundle as it was
    calibration.save(f"{artifacts}/{FILE}")
    manifest = add_files(artifacts, (FILE,))
    for stage in manifest.get("stages", {}).values():  # a stage's "calibrate anew" is done now
        stage.pop("calibration", None)
    record_stage(manifest, artifacts, "calibration", summary)
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
