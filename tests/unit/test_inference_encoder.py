"""The encoder as the service runs it (captioning.inference): batch normalisation folded into the
convolutions, the backbone optionally in bfloat16, the trained encoder left as it was."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from app.resources import encoder_precision
from captioning.config import ModelConfig
from captioning.inference import FoldedNorm, inference_encoder
from captioning.model import build_encoder


def count(model: keras.Model, kind: type) -> int:
    total = 0
    for layer in model.layers:
        total += count(layer, kind) if isinstance(layer, keras.Model) else isinstance(layer, kind)
    return total


def with_trained_statistics(model: keras.Model, seed: int = 0) -> keras.Model:
    """Every batch normalisation given statistics and scales far from their initial 0 / 1, so that
    folding them is not an identity that any mistake would pass."""
    rng = np.random.default_rng(seed)
    for layer in model._flatten_layers():
        if isinstance(layer, keras.layers.BatchNormalization):
            channels = layer.moving_mean.shape[0]
            layer.set_weights(
                [
                    rng.uniform(0.5, 2.0, channels),  # gamma
                    rng.normal(0, 0.5, channels),  # beta
                    rng.normal(0, 0.5, channels),  # moving mean
                    rng.uniform(0.2, 3.0, channels),  # moving variance
                ]
            )
    return model


@pytest.fixture(scope="module", params=["small_cnn", "small_cnn_deep", "small_cnn_fullres"])
def backbone(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def encoder(backbone):
    keras.utils.set_random_seed(3)
    return with_trained_statistics(build_encoder(ModelConfig(backbone=backbone, image_size=32, attention_dim=16)))


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(1).integers(0, 256, (4, 32, 32, 3)).astype(np.float32)


def test_folding_gives_the_trained_features_without_a_batch_norm(encoder, backbone, images):
    expected = np.asarray(encoder(images, training=False))
    folded = inference_encoder(encoder, "float32")
    norms = {"small_cnn": 6, "small_cnn_deep": 8, "small_cnn_fullres": 7}[backbone]  # one per convolution
    assert count(encoder, keras.layers.BatchNormalization) == norms
    assert count(folded, keras.layers.BatchNormalization) == 0 and count(folded, FoldedNorm) == norms
    np.testing.assert_allclose(np.asarray(folded(images, training=False)), expected, rtol=1e-4, atol=1e-5)
    # The trained encoder is left as it was (training and export still need its batch norms).
    np.testing.assert_array_equal(np.asarray(encoder(images, training=False)), expected)


def test_depthwise_convolutions_fold_too():
    keras.utils.set_random_seed(5)
    model = with_trained_statistics(
        keras.applications.MobileNetV2(input_shape=(32, 32, 3), alpha=0.35, weights=None, include_top=False), seed=5
    )
    pictures = np.random.default_rng(2).uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
    folded = inference_encoder(model, "float32")
    assert count(model, keras.layers.DepthwiseConv2D) > 0
    assert count(folded, keras.layers.BatchNormalization) == 0
    expected = np.asarray(model(pictures, training=False))
    np.testing.assert_allclose(np.asarray(folded(pictures, training=False)), expected, rtol=1e-3, atol=1e-4)


def test_a_convolution_read_twice_keeps_its_batch_norm():
    """Folding changes the convolution's own output, so a second reader of it would see the change."""
    inputs = keras.Input((8, 8, 3))
    conv = keras.layers.Conv2D(4, 3, padding="same", use_bias=False, name="conv")(inputs)
    normed = keras.layers.BatchNormalization(name="norm")(conv)
    model = with_trained_statistics(keras.Model(inputs, keras.layers.Add()([normed, conv])))
    pictures = np.random.default_rng(0).normal(size=(2, 8, 8, 3)).astype(np.float32)
    folded = inference_encoder(model, "float32")
    assert count(folded, keras.layers.BatchNormalization) == 1
    np.testing.assert_allclose(
        np.asarray(folded(pictures, training=False)), np.asarray(model(pictures, training=False)), rtol=1e-5
    )


def test_bfloat16_runs_the_backbone_in_bfloat16_and_the_head_in_float32(encoder, backbone, images):
    expected = np.asarray(encoder(images, training=False))
    half = inference_encoder(encoder, "bfloat16")
    convolutions, head = half.get_layer(backbone), half.get_layer("encoder_head")
    assert {layer.compute_dtype for layer in convolutions.layers[1:]} == {"bfloat16"}
    assert {layer.compute_dtype for layer in head.layers} == {"float32"}
    assert {w.dtype for w in half.weights} == {"float32"}  # bfloat16 arithmetic, float32 weights
    features = half(images, training=False)
    assert features.dtype == "float32"
    scale = np.abs(expected).max()
    assert np.abs(np.asarray(features) - expected).max() < 0.03 * scale  # bfloat16 keeps ~3 digits


def test_unknown_precisions_are_refused(encoder):
    with pytest.raises(ValueError, match="float16"):
        inference_encoder(encoder, "float16")
    with pytest.raises(ValueError, match="float16"):
        encoder_precision("float16")


@pytest.mark.parametrize(
    ("flags", "gpu", "expected"),
    [
        ("fpu sse2 avx2 avx512f avx512_bf16 avx512_vnni", False, "bfloat16"),
        ("fpu sse2 avx2 amx_bf16 amx_tile", False, "bfloat16"),
        ("fpu sse2 avx2 avx512f", False, "float32"),  # bfloat16 would be emulated: slower
        ("fpu sse2 avx2 avx512f avx512_bf16", True, "float32"),  # not measured on a GPU
    ],
)
def test_auto_picks_bfloat16_only_where_the_cpu_has_it(tmp_path, flags, gpu, expected):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nmodel name\t: a CPU\nflags\t\t: {flags}\n\nprocessor\t: 1\n")
    assert encoder_precision("auto", gpu=gpu, cpuinfo=cpuinfo, environ={}) == expected
    assert encoder_precision("float32", cpuinfo=cpuinfo) == "float32"
    assert encoder_precision("bfloat16", gpu=True, cpuinfo=cpuinfo) == "bfloat16"  # asked for: given
    assert encoder_precision("auto", cpuinfo=tmp_path / "missing", environ={}) == "float32"
    # oneDNN turned off by hand: bfloat16 would be emulated, slower than float32.
    assert encoder_precision("auto", cpuinfo=cpuinfo, environ={"TF_ENABLE_ONEDNN_OPTS": "0"}) == "float32"


def test_bfloat16_without_onednn_is_warned_about_wherever_the_encoder_is_loaded(encoder, monkeypatch, caplog):
    """The service, a benchmark or a script: bfloat16 with oneDNN turned off is emulated, slower than float32."""
    monkeypatch.setenv("TF_ENABLE_ONEDNN_OPTS", "0")
    with caplog.at_level("WARNING", logger="captioning.inference"):
        inference_encoder(encoder, "bfloat16")
    assert any("emulates bfloat16" in record.getMessage() for record in caplog.records)
    caplog.clear()
    monkeypatch.setenv("TF_ENABLE_ONEDNN_OPTS", "1")
    with caplog.at_level("WARNING", logger="captioning.inference"):
        inference_encoder(encoder, "bfloat16")
        inference_encoder(encoder, "float32")
    assert not caplog.records
