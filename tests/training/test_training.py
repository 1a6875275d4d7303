"""A tiny training run on the shapes dataset: the loss goes down and the bundle loads."""

import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np

from captioning.artifacts import verify_bundle
from captioning.captioner import Captioner
from training.__main__ import main, onednn_setting


def test_tiny_training_run_lowers_loss_and_writes_a_loadable_bundle(tmp_path):
    bundle, run_dir = tmp_path / "bundle", tmp_path / "run"
    status = main(
        [
            "train",
            "--preset",
            "tiny",
            "--epochs",
            "4",
            "--train-limit",
            "48",
            "--val-limit",
            "8",
            "--output",
            str(bundle),
            "--run-dir",
            str(run_dir),
            "--verbose",
            "0",
        ]
    )
    assert status == 0
    history = json.loads((run_dir / "history.json").read_text())
    losses = history["history"]["loss"]
    assert len(losses) == 4 and all(b < a for a, b in zip(losses, losses[1:])), losses
    assert losses[-1] < losses[0] * 0.85, losses
    assert (run_dir / "best.weights.h5").is_file() and any((run_dir / "logs").iterdir())

    manifest = verify_bundle(bundle)
    assert manifest["training"]["command"].startswith("python -m training train --preset tiny")
    assert manifest["training"]["dataset"] == {
        "name": "shapes",
        "train_images": 48,
        "val_images": 8,
        "train_captions": 240,
    }
    captioner = Captioner.load(bundle)
    assert captioner.config.backbone == "small_cnn" and len(captioner.tokenizer) == captioner.config.vocab_size
    image = np.zeros((64, 64, 3), np.uint8)
    (caption,) = captioner.caption([image])[0]
    assert set(caption.tokens) <= set(captioner.tokenizer.words)


def test_max_steps_stops_early(tmp_path):
    status = main(
        [
            "train",
            "--preset",
            "tiny",
            "--max-steps",
            "2",
            "--train-limit",
            "64",
            "--val-limit",
            "8",
            "--output",
            str(tmp_path / "b"),
            "--run-dir",
            str(tmp_path / "r"),
            "--verbose",
            "0",
        ]
    )
    assert status == 0
    history = json.loads((tmp_path / "r" / "history.json").read_text())
    assert history["epochs_run"] == 1


def test_only_the_commands_that_train_a_cnn_turn_onednn_on():
    # It must be chosen before TensorFlow is imported: a training step is 1.25-1.8x faster with
    # oneDNN on this project's CPU, the inference-sized calls of the other commands slower.
    assert onednn_setting(["train", "--preset", "default", "--output", "b"]) == "1"
    assert onednn_setting(["fit-object-reader", "--artifacts", "b"]) == "1"
    for argv in (["evaluate-wild", "--artifacts", "b"], ["finetune-scst"], ["--help"], []):
        assert onednn_setting(argv) == "0", argv


def test_python_m_training_train_sets_onednn_before_tensorflow_loads(tmp_path):
    # The module-level line, not only the rule: its own command line decides, in a fresh process.
    env = {k: v for k, v in os.environ.items() if k != "TF_ENABLE_ONEDNN_OPTS"}
    probe = "import sys; sys.argv = ['training'] + sys.argv[1:]; import os, training.__main__; "
    probe += "print(os.environ['TF_ENABLE_ONEDNN_OPTS'], 'tensorflow' in sys.modules)"
    for command, expected in (("train", "1 False"), ("evaluate", "0 False")):
        result = subprocess.run(
            [sys.executable, "-c", probe, command], env=env, capture_output=True, text=True, check=True, cwd=tmp_path
        )
        assert result.stdout.split("\n")[0] == expected, result


def test_values_no_run_can_use_are_refused_in_one_line_before_any_work(capsys):
    """Each failed deep in Keras or TensorFlow with a traceback, or trained nonsense and wrote a bundle
    (--learning-rate -1 trained by gradient ascent; --vocab-size 2 made every word <unk>)."""
    import pytest

    common = ["train", "--preset", "tiny", "--output", "never-written"]
    for flags, named in (
        (["--epochs", "0"], "--epochs must be at least 1, not 0"),
        (["--batch-size", "0"], "--batch-size must be at least 1"),
        (["--train-limit", "-1"], "--train-limit must be at least 0"),
        (["--max-length", "1"], "--max-length must be at least 3"),
        (["--image-size", "0"], "--image-size must be at least 8"),
        (["--captions-per-image", "0"], "--captions-per-image must be at least 1"),
        (["--dropout", "1.5"], "--dropout must be in [0, 1)"),
        (["--learning-rate", "-1"], "--learning-rate must be above 0"),
        (["--vocab-size", "2"], "--vocab-size must be at least 5"),
        (["--patience", "-1"], "--patience must be at least 0"),
        (["--backbone", "nope"], "--backbone: unknown backbone 'nope'"),
        (["--max-steps", "0"], "--max-steps must be at least 1"),
        (["--epochs", "0", "--dropout", "2"], "--epochs must be at least 1, not 0; --dropout must be in [0, 1)"),
    ):
        with pytest.raises(SystemExit, match=f"^error: .*{re.escape(named)}"):
            main([*common, *flags])
    assert not os.path.exists("never-written")


def test_a_run_starts_its_backbone_from_another_bundle_of_the_same_design(tiny_bundle, tmp_path):
    """--weights model_artifacts/<name>/<version> (the ShapeWorld preset starts from the default
    model's): the verified bundle's trained backbone, not a random one; the source is recorded."""
    import dataclasses

    import pytest

    from captioning.artifacts import load_models
    from captioning.config import ModelConfig
    from training.config import TrainConfig, backbone_layer, build_models

    source = ModelConfig.load(tiny_bundle / "config.json")
    settings = {f.name: getattr(source, f.name) for f in dataclasses.fields(TrainConfig) if hasattr(source, f.name)}
    settings.pop("vocab_size")
    config = TrainConfig(**{**settings, "weights": str(tiny_bundle), "trainable_backbone": True})
    model_config, encoder, _ = build_models(config, 30)
    _, trained, _ = load_models(tiny_bundle)
    for started, saved in zip(backbone_layer(encoder).get_weights(), backbone_layer(trained).get_weights()):
        np.testing.assert_array_equal(started, saved)
    assert model_config.weights == str(tiny_bundle)  # into the new bundle's config.json
    with pytest.raises(SystemExit, match="holds a .* at 32 px; this run builds a .* at 96 px"):
        build_models(dataclasses.replace(config, image_size=96), 30)
    tampered = tmp_path / "tampered"
    shutil.copytree(tiny_bundle, tampered)
    (tampered / "encoder.keras").write_bytes((tampered / "encoder.keras").read_bytes()[:-10])
    with pytest.raises(SystemExit, match="--weights .*tampered"):
        build_models(dataclasses.replace(config, weights=str(tampered)), 30)
    with pytest.raises(SystemExit, match="--weights .*nowhere: no such weights file or model bundle"):
        build_models(dataclasses.replace(config, weights=str(tmp_path / "nowhere")), 30)
