"""The scene loss: an auxiliary task that asks each cell of the encoder's grid what object it shows."""

import json

import keras
import numpy as np
import pytest
import tensorflow as tf

from captioning.config import ModelConfig
from captioning.decoding import DecodeOptions
from captioning.model import CaptionTrainingModel, build_decoder, build_encoder, masked_loss
from captioning.scenes import SCENE_KINDS, Scene, ShapeObject, scene_cells
from captioning.tokenizer import Tokenizer
from training.__main__ import main
from training.data import make_dataset, scene_targets
from training.datasets.shapes import load_split


def test_scene_cells_label_the_cells_each_object_covers():
    scene = Scene(
        64,
        (
            ShapeObject("cross", "blue", "large", cx=20, cy=40, extent=9),  # covers x 11-29, y 31-49
            ShapeObject("circle", "red", "small", cx=50, cy=10, extent=1),  # smaller than a cell
        ),
        "solid",
        width=64,
        height=128,  # a tall image, squeezed to a square: rows are 16 px of it, columns 8
    )
    cells = scene_cells(scene, 8).reshape(8, 8)
    cross, circle = (1 + SCENE_KINDS.index(kind) for kind in [("large", "blue", "cross"), ("small", "red", "circle")])
    # cell centres: x = 4, 12, ..., 60; y = 8, 24, 40, ..., 120
    expected = np.zeros((8, 8), np.int32)
    expected[2, 1:4] = cross  # the centres at y 40 and x 12, 20, 28
    expected[0, 6] = circle  # its own centre's cell: y 10 -> row 0, x 50 -> column 6
    np.testing.assert_array_equal(cells, expected)
    assert len(SCENE_KINDS) == 60


def test_the_pipeline_carries_each_images_cell_labels_beside_its_captions():
    records = load_split("train", 6)
    tokenizer = Tokenizer.build(c for r in records for c in r.captions)
    targets = scene_targets(records, 8)
    ds = make_dataset(
        records, tokenizer, image_size=64, max_length=24, batch_size=6, shuffle=False, scene_labels=targets
    )
    (images, caption_in, labels), _ = next(iter(ds))
    assert images.shape == (6, 64, 64, 3) and caption_in.shape == (6, 5, 23) and labels.shape == (6, 64)
    np.testing.assert_array_equal(labels.numpy(), targets)
    for record, row in zip(records, targets):  # every object labels at least its own cell
        assert len(set(row) - {0}) == len({(o.size, o.colour, o.shape) for o in record.scene.objects})
    with pytest.raises(ValueError, match="flip"):
        make_dataset(records, tokenizer, image_size=64, max_length=24, batch_size=6, flip=True, scene_labels=targets)


def test_the_scene_loss_is_added_to_the_caption_loss_and_training_lowers_it():
    config = ModelConfig(image_size=32, attention_dim=16, embedding_dim=8, vocab_size=20)
    encoder = build_encoder(config)
    decoder = build_decoder(config, encoder.output.shape[1])
    trainer = CaptionTrainingModel(encoder, decoder, scene_classes=3, scene_loss_weight=0.5)
    rng = np.random.default_rng(0)
    images = tf.constant(rng.integers(0, 255, (8, 32, 32, 3)), tf.uint8)
    tokens = tf.constant(rng.integers(1, 20, (8, 2, 6)), tf.int32)
    labels = tf.constant(rng.integers(0, 3, (8, 16)), tf.int32)  # a 4x4 grid

    logits = trainer([images, tokens, labels])
    (added,) = trainer.losses
    cell_logits = trainer.scene_head(encoder(images))
    cell_loss = tf.nn.sparse_softmax_cross_entropy_with_logits(labels, cell_logits).numpy()
    on_object = labels.numpy() > 0
    # Object cells and background cells weigh alike, however few the objects' cells are.
    expected = 0.5 * (cell_loss[on_object].mean() + cell_loss[~on_object].mean())
    np.testing.assert_allclose(added.numpy(), expected, rtol=1e-5)
    assert logits.shape == (8, 2, 6, 20)
    with pytest.raises(ValueError, match="scene labels"):
        trainer([images, tokens])

    trainer.compile(optimizer=keras.optimizers.Adam(1e-2), loss=masked_loss)
    history = trainer.fit((images, tokens, labels), tokens, epochs=30, batch_size=8, verbose=0).history
    assert history["scene_loss"][-1] < 0.5 * history["scene_loss"][0], history["scene_loss"]
    # The head is the training model's: the encoder that is saved does not have it.
    assert "scene_head" not in [layer.name for layer in encoder.layers]


def test_a_training_run_with_the_scene_loss_logs_both_losses(tmp_path):
    status = main(
        [
            "train",
            "--preset",
            "tiny",
            "--epochs",
            "1",
            "--train-limit",
            "32",
            "--val-limit",
            "8",
            "--scene-loss-weight",
            "0.5",
            "--verbose",
            "0",
        ]
        + ["--output", str(tmp_path / "bundle"), "--run-dir", str(tmp_path / "run")]
    )
    assert status == 0
    record = json.loads((tmp_path / "run" / "history.json").read_text())
    history = record["history"]
    assert {"loss", "masked_loss", "scene_loss", "val_masked_loss", "val_scene_loss"} <= history.keys()
    np.testing.assert_allclose(
        history["loss"][0], history["masked_loss"][0] + 0.5 * history["scene_loss"][0], rtol=0.05
    )
    assert record["settings"]["scene_loss_weight"] == 0.5
    # The trained cell classifier ships with the model, for grounded decoding.
    from captioning.captioner import Captioner

    captioner = Captioner.load(tmp_path / "bundle")
    assert captioner.scene_head is not None and captioner.scene_head.feature_size == captioner.feature_size
    options = DecodeOptions(strategy="beam", beam_size=2, grounded=True)
    (caption,) = captioner.caption([np.zeros((64, 64, 3), np.uint8)], options)[0]
    assert caption.agrees_with_scene in (True, False)


def test_a_dataset_without_scenes_cannot_have_the_scene_loss(tmp_path):
    captions = tmp_path / "captions.jsonl"
    for name in ("a.png", "b.png"):
        keras.utils.save_img(tmp_path / name, np.zeros((16, 16, 3), np.uint8))
    captions.write_text('{"image": "a.png", "caption": "a black square"}\n{"image": "b.png", "caption": "black"}\n')
    with pytest.raises(SystemExit, match="knows each image's objects"):
        main(
            [
                "train",
                "--preset",
                "tiny",
                "--dataset",
                "list",
                "--scene-loss-weight",
                "0.5",
                "--epochs",
                "1",
                "--verbose",
                "0",
            ]
            + ["--data", f"list_file={captions}", "--output", str(tmp_path / "b"), "--run-dir", str(tmp_path / "r")]
        )
