"""`python -m training evaluate`: caption a dataset split with an artifact bundle and score the captions.

    python -m training evaluate --artifacts model_artifacts/default/1 --dataset shapes --split test \\
        --output metrics.json --gallery gallery.html
    python -m training evaluate --artifacts BUNDLE --dataset coco --split val --limit 500 \\
        --annotations-file annotations/captions_val2014.json --images-dir val2014

Reported, for the model's best caption per image:
  - BLEU-1..4, METEOR, ROUGE-L and CIDEr against all of the image's references (training.metrics);
  - the same metrics leave-one-out: each reference in turn scored against the others, the human
    line to beat ("reference"), and the model scored against those same reduced reference sets
    ("model_leave_one_out"), so that model and humans are compared with equally many references;
  - on the shapes dataset, where every image has its true scene, the grounded accuracy: the share
    of generated captions that the shapes checker finds entirely true and complete (and the same
    share for the reference captions, which should be 1.0).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import inspect
import io
import json
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from captioning.decoding import STRATEGIES, DecodeOptions
from captioning.preprocess import load_image_file, open_upright
from training.datasets.base import SPLITS, CaptionedImage
from training.gallery import THUMBNAIL_SIDE, GalleryRow, write_gallery
from training.metrics import CaptionScorer, leave_one_out_metrics

DEFAULT_BATCH_SIZE = 32
DEFAULT_GALLERY_SIZE = 60
NUM_SAMPLES = 5  # per-image results kept in the report

# Command-line flags for the dataset loaders' file options (see training/datasets/registry.py).
DATASET_PATH_FLAGS = {
    "annotations_file": "COCO: a captions_<split>2014.json style file",
    "images_dir": "COCO, Flickr8k: the folder holding the images",
    "split_file": "Karpathy: dataset_coco.json / dataset_flickr8k.json / dataset_flickr30k.json",
    "images_root": "Karpathy: the folder the file's image paths are relative to",
    "text_dir": "Flickr8k: the folder with Flickr8k.token.txt and the split lists",
    "list_file": "list: a .jsonl/.ndjson/.csv caption list",
}

METRIC_LABELS = {
    "bleu_1": "BLEU-1",
    "bleu_2": "BLEU-2",
    "bleu_3": "BLEU-3",
    "bleu_4": "BLEU-4",
    "meteor": "METEOR",
    "rouge_l": "ROUGE-L",
    "cider": "CIDEr",
    "grounded_accuracy": "grounded accuracy",
}


# ------------------------------------------------------------------------------------- evaluation


def record_input(captioner, record: CaptionedImage) -> np.ndarray:
    """The model's input for a record: its file (on disk, or the JPEG a generated picture is held
    as) read exactly as the service reads the same bytes uploaded (captioning.preprocess), or its
    pixels as from a lossless upload, so what is measured is what is served."""
    if record.encoded is not None:
        return load_image_file(io.BytesIO(record.encoded), captioner.config.image_size, Image.MAX_IMAGE_PIXELS)
    if record.pixels is not None:
        return captioner.prepare(record.pixels)
    return load_image_file(record.path, captioner.config.image_size, Image.MAX_IMAGE_PIXELS)


def display_image(record: CaptionedImage) -> np.ndarray | Image.Image:
    """The record's picture for the gallery: upright, transparency on white, brought down towards
    the gallery's thumbnail side."""
    if record.pixels is not None:
        return record.pixels
    return open_upright(record.path, THUMBNAIL_SIDE, Image.MAX_IMAGE_PIXELS)


def generate_captions(
    captioner,
    records: list[CaptionedImage],
    options: DecodeOptions,
    batch_size: int = DEFAULT_BATCH_SIZE,
    progress: bool = True,
) -> list[str]:
    """The best caption for each record; images are read a batch at a time, not all held at once."""
    report_progress = _progress_reporter(len(records)) if progress else None
    captions: list[str] = []
    for start in range(0, len(records), batch_size):
        images = [record_input(captioner, r) for r in records[start : start + batch_size]]
        captions.extend(best[0].text if best else "" for best in captioner.caption(images, options, batch_size))
        if report_progress is not None:
            report_progress(len(captions))
    return captions


def _progress_reporter(total: int):
    """A Keras progress bar on a terminal; in a log, a plain line at every tenth of the way."""
    if sys.stdout.isatty():
        import keras

        return keras.utils.Progbar(total, unit_name="image").update
    started, next_report = time.perf_counter(), 0

    def report(done: int) -> None:
        nonlocal next_report
        if done >= next_report or done == total:
            print(f"captioned {done}/{total} images in {time.perf_counter() - started:.0f} s", flush=True)
            next_report = done + max(1, total // 10)

    return report


def evaluate(
    captioner,
    records: list[CaptionedImage],
    options: DecodeOptions = DecodeOptions(),
    batch_size: int = DEFAULT_BATCH_SIZE,
    *,
    meteor: bool = True,
    progress: bool = True,
    num_samples: int = NUM_SAMPLES,
    scorer: CaptionScorer | None = None,
) -> dict:
    """Captions `records` and scores the captions; see the module docstring for what is measured.

    `scorer`: one already started (its METEOR process loading while the caller loads the model);
    otherwise one is started here (`meteor` says whether with METEOR) and closed before returning.
    Returns {"metrics", "reference", "model_leave_one_out", "grounded_accuracy", "num_images",
    "decode", "seconds", "samples", "images"}: "images" holds every image's result (its id, caption,
    references and, on shapes, the checker's verdict); "samples" the first `num_samples` of them.
    """
    from captioning.buckets import BATCH_BUCKETS

    options.validate()
    if not records:
        raise ValueError("no images to evaluate")
    if not 1 <= batch_size <= BATCH_BUCKETS[-1]:
        raise ValueError(f"batch_size must be between 1 and {BATCH_BUCKETS[-1]}")
    # Scored by position, so duplicate image ids in a dataset file cannot merge two images.
    references = {i: list(record.captions) for i, record in enumerate(records)}

    own_scorer = scorer is None
    scorer = CaptionScorer(meteor) if own_scorer else scorer  # METEOR's JVM loads while the model captions
    try:
        started = time.perf_counter()
        generated = generate_captions(captioner, records, options, batch_size, progress)
        captioning_seconds = time.perf_counter() - started
        candidates = dict(enumerate(generated))
        started = time.perf_counter()
        metrics = scorer.score(candidates, references)
        human_line = leave_one_out_metrics(references, scorer=scorer)
        model_leave_one_out = leave_one_out_metrics(references, candidates, scorer=scorer)
        scoring_seconds = time.perf_counter() - started
    finally:
        if own_scorer:
            scorer.close()

    images = [
        {"image_id": r.image_id, "generated": g, "references": list(r.captions)} for r, g in zip(records, generated)
    ]
    grounded_accuracy = None
    if all(record.scene is not None for record in records):
        grounded_accuracy = _grade_with_checker(records, images)
        if human_line is not None:
            human_line["grounded_accuracy"] = _reference_grounded_accuracy(records)

    return {
        "metrics": metrics,
        "reference": human_line,
        "model_leave_one_out": model_leave_one_out,
        "grounded_accuracy": grounded_accuracy,
        "num_images": len(records),
        "decode": dataclasses.asdict(options),
        "seconds": {"captioning": round(captioning_seconds, 2), "scoring": round(scoring_seconds, 2)},
        "samples": images[:num_samples],
        "images": images,
    }


def _grade_with_checker(records: list[CaptionedImage], images: list[dict]) -> float:
    """Adds the checker's verdict to each image's result; returns the share judged correct."""
    from captioning.scene_checker import check_caption

    for record, image in zip(records, images):
        verdict = check_caption(image["generated"], record.scene)
        image.update(
            correct=verdict.correct,
            false_facts=list(verdict.false_facts),
            missing=list(verdict.missing),
            parse_error=verdict.error,
        )
    return sum(image["correct"] for image in images) / len(images)


def _reference_grounded_accuracy(records: list[CaptionedImage]) -> float:
    """The share of reference captions the checker accepts: 1.0 unless the dataset or checker is off."""
    from captioning.scene_checker import check_caption

    verdicts = [check_caption(caption, r.scene).correct for r in records for caption in r.captions]
    return sum(verdicts) / len(verdicts)


# ----------------------------------------------------------------------------------------- report


def build_report(
    result: dict, *, dataset: str, split: str, artifacts: str | Path | None = None, manifest: dict | None = None
) -> dict:
    """The JSON file's content: the model's metrics at the top level, the comparisons beside them."""
    manifest = manifest or {}
    return {
        "dataset": dataset,
        "split": split,
        "num_images": result["num_images"],
        "model": {
            "artifacts": str(artifacts) if artifacts else None,
            "name": manifest.get("name"),
            "version": manifest.get("version"),
        },
        **result["metrics"],
        "grounded_accuracy": result["grounded_accuracy"],
        "reference": result["reference"],
        "model_leave_one_out": result["model_leave_one_out"],
        "decode": result["decode"],
        "seconds": result["seconds"],
        "evaluated": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "samples": result["samples"],
    }


def format_table(report: dict) -> str:
    """Model against the leave-one-out human line, one metric a row."""
    decode = report["decode"]
    strategy = decode["strategy"] + (f" (beam {decode['beam_size']})" if decode["strategy"] == "beam" else "")
    human, model_loo = report["reference"] or {}, report["model_leave_one_out"] or {}
    columns = ("model", "model, LOO refs", "human, LOO refs")
    lines = [
        f"{report['dataset']} {report['split']}: {report['num_images']} images, {strategy} decoding",
        f"{'':<18}" + "".join(f"{c:>17}" for c in columns),
    ]
    for name, label in METRIC_LABELS.items():
        if name == "grounded_accuracy" and report["grounded_accuracy"] is None:
            continue
        values = (report.get(name), model_loo.get(name), human.get(name))
        lines.append(f"{label:<18}" + "".join(f"{_cell(v):>17}" for v in values))
    if human:
        coverage = (
            ""
            if human["num_images"] == report["num_images"]
            else (f" (on the {human['num_images']} images with two or more references)")
        )
        lines.append(
            f"LOO: in each of {human['rounds']} rounds one reference per image is held out; the human line "
            f"scores it against the rest, the model is scored against the same rest{coverage}."
        )
    else:
        lines.append("No leave-one-out line: no image has two references.")
    if report.get("meteor") is None:
        lines.append("METEOR skipped (no Java runtime, or --no-meteor).")
    return "\n".join(lines)


def _cell(value) -> str:
    return "-" if value is None else f"{value:.3f}"


def gallery_rows(records: list[CaptionedImage], result: dict, limit: int) -> list[GalleryRow]:
    rows = []
    for record, image in zip(records[:limit], result["images"]):
        rows.append(
            GalleryRow(
                image_id=record.image_id,
                image=display_image(record),
                generated=image["generated"],
                references=image["references"],
                correct=image.get("correct"),
                false_facts=image.get("false_facts", []),
                missing=image.get("missing", []),
                parse_error=image.get("parse_error", ""),
            )
        )
    return rows


def record_in_manifest(artifacts: str | Path, report: dict) -> None:
    """Stores the report (without samples) under "<dataset>/<split>", keeping other evaluations."""
    from captioning.artifacts import update_metrics, verify_bundle

    existing = verify_bundle(artifacts).get("metrics") or {}
    entry = {key: value for key, value in report.items() if key != "samples"}
    update_metrics(artifacts, {**existing, f"{report['dataset']}/{report['split']}": entry})


def evaluate_bundle(
    artifacts: str | Path,
    dataset: str,
    split: str,
    data_options: dict | None = None,
    *,
    limit: int | None = None,
    options: DecodeOptions = DecodeOptions(),
    batch_size: int = DEFAULT_BATCH_SIZE,
    meteor: bool = True,
    output: str | Path | None = None,
    gallery: str | Path | None = None,
    gallery_size: int = DEFAULT_GALLERY_SIZE,
    update_manifest: bool = False,
    progress: bool = True,
) -> dict:
    """Loads the bundle and the split, evaluates, prints the table; writes what is asked for.

    Returns the report (the --output JSON's content)."""
    from captioning.captioner import Captioner
    from training.datasets.registry import load_dataset

    with CaptionScorer(meteor) as scorer:  # first, so METEOR's JVM loads while the model and data do
        captioner = Captioner.load(artifacts)
        records = load_dataset(dataset, split, limit=limit, **(data_options or {}))
        if not records:
            raise ValueError(f"dataset {dataset!r} has no usable {split} images")
        print(f"evaluating {artifacts} on {dataset} {split}: {len(records)} images", flush=True)
        result = evaluate(captioner, records, options, batch_size, progress=progress, scorer=scorer)
    report = build_report(result, dataset=dataset, split=split, artifacts=artifacts, manifest=captioner.manifest)
    print(format_table(report))
    if output:
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        Path(output).write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {output}")
    if gallery:
        summary = {
            METRIC_LABELS[name]: report[name]
            for name in ("bleu_4", "cider", "grounded_accuracy")
            if report[name] is not None
        }
        write_gallery(
            gallery,
            gallery_rows(records, result, gallery_size),
            title=f"{captioner.manifest.get('name', artifacts)} on {dataset} {split}",
            summary=summary,
        )
        print(f"wrote {gallery}")
    if update_manifest:
        record_in_manifest(artifacts, report)
        print(f"recorded the metrics in {Path(artifacts) / 'manifest.json'}")
    return report


# ------------------------------------------------------------------------------------ command line


def add_parser(subparsers) -> None:
    from training.config import add_data_flags
    from training.datasets.registry import LOADERS

    p = subparsers.add_parser(
        "evaluate",
        help="score a bundle's captions on a dataset split",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--artifacts", required=True, help="artifact bundle directory")
    p.add_argument("--dataset", choices=sorted(LOADERS), default="shapes", help="default: shapes")
    p.add_argument("--split", choices=SPLITS, default="test", help="default: test")
    p.add_argument("--limit", type=int, help="evaluate the first N images of the split")
    data = p.add_argument_group("dataset files")
    for option, description in DATASET_PATH_FLAGS.items():
        data.add_argument("--" + option.replace("_", "-"), dest=option, metavar="PATH", help=description)
    add_data_flags(data, "any other loader option, as for `train` (e.g. max_objects=4 for shapes)")
    decoding = p.add_argument_group("decoding")
    decoding.add_argument("--strategy", choices=STRATEGIES, default="greedy", help="default: greedy")
    decoding.add_argument("--beam-size", type=int, default=DecodeOptions.beam_size)
    decoding.add_argument("--length-penalty", type=float, default=DecodeOptions.length_penalty)
    decoding.add_argument("--max-length", type=int, help="most words per caption (default: as trained)")
    decoding.add_argument("--temperature", type=float, default=DecodeOptions.temperature, help="sample only")
    decoding.add_argument("--top-k", type=int, default=DecodeOptions.top_k, help="sample only")
    decoding.add_argument("--seed", type=int, help="sample only")
    decoding.add_argument(
        "--mirror-view", action="store_true", help="decode each image with its left-right mirror (captioning.mirror)"
    )
    decoding.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE, help="decode slots per step")
    out = p.add_argument_group("output")
    out.add_argument("--output", metavar="FILE.json", help="write the metrics here")
    out.add_argument("--gallery", metavar="FILE.html", help="write a page of images with their captions")
    out.add_argument("--gallery-size", type=int, default=DEFAULT_GALLERY_SIZE, help="images on the page")
    out.add_argument("--update-manifest", action="store_true", help="record the metrics in the bundle's manifest.json")
    out.add_argument("--no-meteor", action="store_true", help="skip METEOR (its Java start-up takes ~15 s)")
    out.add_argument("--no-progress", action="store_true", help="no progress bar while captioning")
    p.set_defaults(func=run)


def loader_options(args: argparse.Namespace) -> dict:
    """The dataset options given as path flags and --data pairs; exits naming any the loader lacks."""
    from training.config import parse_options
    from training.datasets.registry import LOADERS

    options = {name: getattr(args, name) for name in DATASET_PATH_FLAGS if getattr(args, name) is not None}
    options.update(parse_options(args.data))
    parameters = inspect.signature(LOADERS[args.dataset]).parameters.values()
    missing = [
        p.name
        for p in parameters
        if p.default is p.empty
        and p.name not in ("split", "limit")
        and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
        and p.name not in options
    ]
    if missing:
        flags = " and ".join("--" + name.replace("_", "-") for name in missing)
        raise SystemExit(f"evaluate: dataset {args.dataset!r} needs {flags}")
    return options


def run(args: argparse.Namespace) -> int:
    from captioning.artifacts import ArtifactError

    options = DecodeOptions(
        strategy=args.strategy,
        beam_size=args.beam_size,
        length_penalty=args.length_penalty,
        max_length=args.max_length,
        temperature=args.temperature,
        top_k=args.top_k,
        seed=args.seed,
        mirror_view=args.mirror_view,
    )
    try:
        options.validate()
        evaluate_bundle(
            args.artifacts,
            args.dataset,
            args.split,
            loader_options(args),
            limit=args.limit,
            options=options,
            batch_size=args.batch_size,
            meteor=not args.no_meteor,
            output=args.output,
            gallery=args.gallery,
            gallery_size=args.gallery_size,
            update_manifest=args.update_manifest,
            progress=not args.no_progress,
        )
    except (ArtifactError, ValueError) as error:  # DatasetFormatError is a ValueError
        print(f"evaluate: {error}", file=sys.stderr)
        return 1
    return 0
