"""Caption metrics, the leave-one-out human line, `evaluate`, the gallery and the evaluate command.

A randomly initialised model stands in for a trained one: these tests check the plumbing and the
report's shape, not the scores a real model reaches. METEOR starts a JVM (~15 s), so only one test
uses it (where Java is installed); the others score without it.
"""

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from training.metrics import (
    METRIC_NAMES,
    CaptionScorer,
    caption_metrics,
    leave_one_out_metrics,
    leave_one_out_rounds,
)

REPO_ROOT = Path(__file__).resolve().parents[2]

# Distinct captions, so CIDEr's document frequencies can tell the images apart.
TOY_CAPTIONS = [
    "a red circle above a blue square",
    "two green crosses and a yellow triangle",
    "there is a small purple diamond",
    "an orange square to the left of a red cross",
    "three blue circles and one large green square",
]
TOY_REFERENCES = {i: [caption] for i, caption in enumerate(TOY_CAPTIONS)}
REPORT_METRICS = ("bleu_1", "bleu_2", "bleu_3", "bleu_4", "meteor", "rouge_l", "cider")


# ------------------------------------------------------------------------------------------ metrics


def test_identical_captions_score_high():
    scores = caption_metrics({i: c for i, c in enumerate(TOY_CAPTIONS)}, TOY_REFERENCES, meteor=False)
    assert set(scores) == set(METRIC_NAMES)
    assert scores["bleu_4"] == pytest.approx(1.0, abs=1e-6)
    assert scores["rouge_l"] == pytest.approx(1.0)
    assert scores["cider"] > 5
    assert scores["meteor"] is None


def test_disjoint_captions_score_near_zero():
    candidates = {i: "zebra giraffe walrus penguin" for i in TOY_REFERENCES}
    scores = caption_metrics(candidates, TOY_REFERENCES, meteor=False)
    for name in ("bleu_1", "bleu_4", "rouge_l", "cider"):
        assert scores[name] == pytest.approx(0.0, abs=1e-6), name


def test_text_is_standardised_like_the_tokenizer():
    candidates = {i: c.upper().replace(" a ", " a, ") + "." for i, c in enumerate(TOY_CAPTIONS)}
    assert caption_metrics(candidates, TOY_REFERENCES, meteor=False)["bleu_4"] == pytest.approx(1.0, abs=1e-6)


def test_mismatched_images_are_an_error():
    with pytest.raises(ValueError, match="same images"):
        caption_metrics({0: "a red circle"}, {1: ["a red circle"]}, meteor=False)
    with pytest.raises(ValueError, match="no reference"):
        caption_metrics({0: "a red circle"}, {0: []}, meteor=False)


def test_meteor_is_skipped_with_a_warning_without_java(monkeypatch, caplog):
    monkeypatch.setattr("training.metrics.shutil.which", lambda name: None)
    with caplog.at_level(logging.WARNING, logger="training.metrics"):
        scores = caption_metrics({i: c for i, c in enumerate(TOY_CAPTIONS)}, TOY_REFERENCES)
    assert scores["meteor"] is None
    assert "METEOR is skipped" in caplog.text


@pytest.mark.parametrize(
    "program", ["import sys; sys.stdin.read()", "import time; time.sleep(60)"], ids=["exits-on-eof", "ignores-eof"]
)
def test_closing_the_scorer_ends_the_meteor_process(monkeypatch, program):
    """A stand-in process: one that exits when its input closes (as METEOR's JVM does), one that must be killed."""
    process = subprocess.Popen(
        [sys.executable, "-c", program], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    monkeypatch.setattr("training.metrics._start_meteor", lambda: SimpleNamespace(meteor_p=process))
    monkeypatch.setattr("training.metrics.METEOR_SHUTDOWN_SECONDS", 0.5)
    with CaptionScorer() as scorer:
        assert scorer.has_meteor
    assert process.poll() is not None and not scorer.has_meteor


def test_leave_one_out_rounds_share_images_and_keep_extra_references():
    references = {
        "five": ["r0", "r1", "r2", "r3", "r4"],
        "six": ["s0", "s1", "s2", "s3", "s4", "s5"],
        "one": ["only"],  # nothing to score it against: left out
    }
    rounds = leave_one_out_rounds(references)
    assert len(rounds) == 5
    for k, (held_out, others) in enumerate(rounds):
        assert set(held_out) == set(others) == {"five", "six"}
        assert held_out["five"] == f"r{k}" and f"r{k}" not in others["five"]
        assert len(others["five"]) == 4 and len(others["six"]) == 5


def test_leave_one_out_metrics_average_the_rounds():
    # Every image's references agree word for word, so each held-out one matches the rest exactly.
    references = {i: [caption] * 5 for i, caption in enumerate(TOY_CAPTIONS)}
    human = leave_one_out_metrics(references, meteor=False)
    assert human["bleu_4"] == pytest.approx(1.0, abs=1e-6)
    assert human["rounds"] == 5 and human["num_images"] == len(TOY_CAPTIONS)
    model = leave_one_out_metrics(references, {i: "zebra giraffe" for i in references}, meteor=False)
    assert model["bleu_1"] == pytest.approx(0.0, abs=1e-6)
    assert leave_one_out_metrics({0: ["just one"]}, meteor=False) is None


# ------------------------------------------------------------------------------------------ gallery


def test_gallery_is_self_contained_and_escaped(tmp_path):
    from training.gallery import GalleryRow, write_gallery

    pixels = np.zeros((8, 8, 3), np.uint8)
    rows = [
        GalleryRow(
            "img-<1>",
            pixels,
            "<script>alert(1)</script>",
            ["a & b"],
            correct=False,
            false_facts=["no red circle"],
            missing=["a blue square"],
        ),
        GalleryRow("img-2", pixels, "a red circle", ["a red circle"], correct=True),
        GalleryRow("img-3", pixels, "", ["a photo"]),
    ]
    page = write_gallery(tmp_path / "g.html", rows, title="T", summary={"BLEU-4": 0.5}).read_text()
    assert "<script>" not in page and "&lt;script&gt;" in page
    assert "a &amp; b" in page and "img-&lt;1&gt;" in page
    assert page.count("data:image/png;base64,") == 3 and "image-rendering: pixelated" in page
    assert "false: no red circle" in page and "missing: a blue square" in page
    assert "(empty caption)" in page and "0.500" in page
    assert 'src="http' not in page  # nothing fetched from elsewhere


# --------------------------------------------------------------------------------------- evaluation


@pytest.fixture(scope="module")
def shapes_bundle(tmp_path_factory):
    """A random-weight bundle whose vocabulary comes from shapes captions."""
    from conftest import make_tiny_bundle

    from training.datasets.shapes import load_split

    captions = [c for record in load_split("train", size=20) for c in record.captions]
    path = tmp_path_factory.mktemp("evaluate") / "bundle"
    return make_tiny_bundle(path, captions=captions, seed=3, image_size=64, name="shapes-random", training={})


def test_evaluate_returns_every_part_of_the_report(shapes_bundle):
    from captioning.captioner import Captioner
    from captioning.decoding import DecodeOptions
    from training.datasets.shapes import load_split
    from training.evaluate import evaluate

    records = load_split("test", size=6)
    result = evaluate(
        Captioner.load(shapes_bundle),
        records,
        DecodeOptions(strategy="beam", beam_size=2),
        batch_size=4,
        meteor=False,
        progress=False,
        num_samples=3,
    )
    assert set(result) >= {
        "metrics",
        "reference",
        "model_leave_one_out",
        "grounded_accuracy",
        "num_images",
        "decode",
        "samples",
        "images",
        "seconds",
    }
    assert set(result["metrics"]) == set(METRIC_NAMES)
    assert result["num_images"] == 6 and len(result["images"]) == 6 and len(result["samples"]) == 3
    assert result["decode"]["strategy"] == "beam"
    assert 0.0 <= result["grounded_accuracy"] <= 1.0
    assert result["reference"]["grounded_accuracy"] == 1.0  # the dataset's own captions are true
    assert result["reference"]["rounds"] == 5
    # Humans agree with each other far better than a random model agrees with them.
    assert result["reference"]["bleu_1"] > result["metrics"]["bleu_1"]
    sample = result["samples"][0]
    assert sample["image_id"] == records[0].image_id and sample["references"] == records[0].captions
    assert isinstance(sample["generated"], str) and isinstance(sample["correct"], bool)


def test_evaluate_bundle_writes_json_gallery_and_manifest(shapes_bundle, tmp_path, capsys):
    from captioning.artifacts import verify_bundle
    from training.evaluate import evaluate_bundle

    output, gallery = tmp_path / "out" / "metrics.json", tmp_path / "gallery.html"
    evaluate_bundle(
        shapes_bundle,
        "shapes",
        "test",
        {"max_objects": "2"},
        limit=5,
        meteor=True,
        output=output,
        gallery=gallery,
        gallery_size=3,
        update_manifest=True,
        progress=False,
    )
    report = json.loads(output.read_text())
    for key in REPORT_METRICS + ("grounded_accuracy", "reference", "model_leave_one_out", "num_images", "samples"):
        assert key in report, key
    if shutil.which("java"):  # the one test that runs METEOR's JVM
        assert 0.0 <= report["meteor"] <= 1.0 and 0.0 <= report["reference"]["meteor"] <= 1.0
    else:
        assert report["meteor"] is None
    assert report["num_images"] == 5 and report["model"]["name"] == "shapes-random"
    assert report["reference"]["cider"] > report["cider"]
    assert gallery.read_text().count("data:image/png;base64,") == 3
    recorded = verify_bundle(shapes_bundle)["metrics"]["shapes/test"]  # the bundle still verifies
    assert recorded["bleu_4"] == report["bleu_4"] and "samples" not in recorded
    table = capsys.readouterr().out
    assert "BLEU-4" in table and "CIDEr" in table and "grounded accuracy" in table and "human" in table


def test_evaluate_command_names_missing_dataset_files(shapes_bundle):
    from training.__main__ import main

    with pytest.raises(SystemExit, match="--annotations-file and --images-dir"):
        main(["evaluate", "--artifacts", str(shapes_bundle), "--dataset", "coco"])


def test_evaluate_command_end_to_end(shapes_bundle, tmp_path):
    output = tmp_path / "metrics.json"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "TF_CPP_MIN_LOG_LEVEL": "3"}
    completed = subprocess.run(
        [
            sys.executable,
            "-m",
            "training",
            "evaluate",
            "--artifacts",
            str(shapes_bundle),
            "--dataset",
            "shapes",
            "--split",
            "test",
            "--limit",
            "4",
            "--no-meteor",
            "--output",
            str(output),
        ],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert completed.returncode == 0, completed.stderr[-2000:]
    report = json.loads(output.read_text())
    assert report["num_images"] == 4 and "bleu_4" in report and "cider" in report
    assert "captioned 4/4 images" in completed.stdout
