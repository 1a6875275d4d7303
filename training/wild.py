"""`python -m training evaluate-wild`: the default model's report card on images it was not drawn for.

    python -m training evaluate-wild --artifacts model_artifacts/default/7 --per-variation 200 \\
        --output docs/default-model-wild.json

For the standard test split and every wild variation of the wide shapes dataset
(training/datasets/shapes_wide.py: own seed, one factor pinned to its hard end): grounded accuracy
(greedy captions the shapes checker finds entirely true and complete), the expected calibration
error of the calibrated confidence against that correctness, and the share the domain check
accepts. Then, for images that are not shapes scenes (training/ood_images.py: scikit-image's
photographs, noise, smooth random fields, text, textures), the share the domain check flags.
Images go through training.evaluate.record_input: the service's path for an upload of the same file.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from captioning.calibration import expected_calibration_error
from captioning.decoding import DecodeOptions
from captioning.domain import IN_DOMAIN_SCORE
from captioning.grounding import BEAM_SIZE as GROUNDED_BEAM_SIZE


def score_records(captioner, chunks, options: DecodeOptions = DecodeOptions()) -> tuple[dict, np.ndarray, np.ndarray]:
    """Scores records given as a list, or as an iterator of lists (chunks: a large variation is
    drawn and decoded a chunk at a time, so its pictures are never all in memory)."""
    from training.calibrate import grade
    from training.evaluate import record_input

    chunks = [chunks] if isinstance(chunks, list) else chunks
    correct, confidence, accepted, written, wrong = [], [], [], 0, []
    for records in chunks:
        images = [record_input(captioner, r) for r in records]  # read once, for the captions and the domain check
        captions = [n_best[0] for n_best in captioner.caption(images, options)]
        texts = [c.text for c in captions]
        correct.append(grade(texts, records))
        confidence.append(np.array([c.confidence for c in captions]))
        written += sum(c.written_from_scene for c in captions)
        chunk_accepted = domain_accepted(captioner, images)
        if chunk_accepted is not None:
            accepted.append(chunk_accepted)
        wrong += [
            {"image_id": r.image_id, "caption": t, "references": r.captions[:1]}
            for r, t, ok in zip(records, texts, correct[-1])
            if not ok
        ][: 3 - len(wrong)]
    correct, confidence = np.concatenate(correct), np.concatenate(confidence)
    result = {
        "images": len(correct),
        "grounded_accuracy": round(float(correct.mean()), 4),
        "ece": round(expected_calibration_error(confidence, correct), 4),
        "mean_confidence": round(float(confidence.mean()), 4),
    }
    if options.grounded:  # captions written from the model's reading, not by its decoder
        result["written_from_scene"] = written
    if accepted:
        result["accepted_in_domain"] = round(float(np.concatenate(accepted).mean()), 4)
    result["wrong_examples"] = wrong
    return result, correct, confidence


def wild_chunks(variation: str, count: int, first: int, chunk: int = 1000):
    """`count` pictures of a wild variation from index `first` on, `chunk` at a time."""
    from training.datasets.shapes_wide import load_wide_split

    for start in range(first, first + count, chunk):
        yield load_wide_split("test", min(chunk, first + count - start), variation=variation, first=start)


def domain_accepted(captioner, images) -> np.ndarray | None:
    if captioner.domain is None:
        return None
    scores = []
    for start in range(0, len(images), 64):
        batch = np.stack([captioner.prepare(image) for image in images[start : start + 64]])
        scores.append(captioner.domain_scores(batch))
    return np.concatenate(scores) >= IN_DOMAIN_SCORE


def evaluate_wild(
    artifacts,
    per_variation: int,
    test_images: int,
    ood_per_group: int,
    mirror_view: bool = False,
    grounded: bool = False,
    first: int = 0,
) -> dict:
    from captioning.captioner import Captioner
    from training.datasets.shapes_wide import VARIATIONS, load_wide_split
    from training.ood_images import ood_groups

    captioner = Captioner.load(artifacts)
    options = DecodeOptions(mirror_view=mirror_view)
    if grounded:  # the best of a beam search's candidates by the model's own reading of the scene
        options = DecodeOptions(strategy="beam", beam_size=GROUNDED_BEAM_SIZE, grounded=True, mirror_view=mirror_view)
    try:  # a mirror view without its words, grounded without a scene head: say so before any work
        captioner.check(options)
    except ValueError as exc:
        raise SystemExit(f"error: {exc}") from None
    started = time.perf_counter()
    report: dict = {
        "artifacts": str(artifacts),
        "name": captioner.manifest.get("name"),
        "calibrated": captioner.calibration is not None,
        "decoding": {
            "strategy": options.strategy,
            "beam_size": options.beam_size if grounded else None,
            "mirror_view": mirror_view,
            "grounded": grounded,
            "object_reader": grounded and captioner.object_reader is not None,
        },
        "first_picture": first,
        "variations": {},
    }
    all_correct, all_confidence = [], []
    report["test"], correct, confidence = score_records(captioner, load_wide_split("test", test_images), options)
    print(f"test: {report['test']['grounded_accuracy']}", flush=True)
    for name in VARIATIONS:
        chunks = wild_chunks(name, per_variation, first)
        report["variations"][name], correct, confidence = score_records(captioner, chunks, options)
        all_correct.append(correct)
        all_confidence.append(confidence)
        print(f"{name}: {report['variations'][name]['grounded_accuracy']}", flush=True)
    report["wild_overall"] = {
        "images": int(sum(len(c) for c in all_correct)),
        "grounded_accuracy": round(float(np.concatenate(all_correct).mean()), 4),
        "ece": round(expected_calibration_error(np.concatenate(all_confidence), np.concatenate(all_correct)), 4),
    }
    if captioner.domain is not None:
        flagged = {}
        for group, images in ood_groups(ood_per_group).items():
            if images:
                accepted = domain_accepted(captioner, [image for _, image in images])
                flagged[group] = {
                    "images": len(images),
                    "flagged_out_of_domain": round(float(1 - accepted.mean()), 4),
                    "accepted": [name for (name, _), ok in zip(images, accepted) if ok],
                }
        report["out_of_domain"] = flagged
    report["seconds"] = round(time.perf_counter() - started, 1)
    return report


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "evaluate-wild",
        help="grounded accuracy, calibration and domain check per variation",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--artifacts", required=True, help="artifact bundle directory")
    p.add_argument("--per-variation", type=int, default=200, help="images per wild variation")
    p.add_argument(
        "--first",
        type=int,
        default=0,
        help="index of each wild variation's first picture (every index is its own draw: a run from 10000 "
        "scores pictures no report, fit or choice up to round 42 has seen); the test split is always its "
        "first --test-images pictures",
    )
    p.add_argument("--test-images", type=int, default=1000, help="images of the standard test split")
    p.add_argument("--ood-per-group", type=int, default=40, help="generated images per non-shapes group")
    p.add_argument(
        "--mirror-view",
        action="store_true",
        help="greedy with the mirror view (captioning.mirror) instead of plain greedy",
    )
    p.add_argument(
        "--grounded",
        action="store_true",
        help="grounded decoding (captioning.grounding: a beam of 3 reranked by the model's scene head, its "
        "shapes read again by the bundle's object reader when it has one) "
        "instead of greedy; the bundle needs a scene head",
    )
    p.add_argument("--output", metavar="FILE.json", help="write the report here")
    p.set_defaults(func=run)


def run(args) -> int:
    if args.first < 0 or args.per_variation < 1:
        raise SystemExit("error: --first must be at least 0 and --per-variation at least 1")
    report = evaluate_wild(
        args.artifacts,
        args.per_variation,
        args.test_images,
        args.ood_per_group,
        args.mirror_view,
        args.grounded,
        args.first,
    )
    text = json.dumps(report, indent=2) + "\n"
    if args.output:
        Path(args.output).write_text(text)
        print(f"wrote {args.output}")
    else:
        print(text)
    return 0
