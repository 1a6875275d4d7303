"""The encoder as a server runs it: the trained encoder rewritten at load time, the bundle untouched.

    encoder = inference_encoder(trained_encoder, "bfloat16")     # or "float32"

- **Batch normalisation folded into the convolution before it.** At inference a BatchNormalization
  layer is a fixed affine map per channel, so a Conv2D (or DepthwiseConv2D) whose only consumer it
  is can absorb it into its kernel and a bias: one pass over each feature map fewer, and TensorFlow
  then runs convolution + bias + ReLU as one oneDNN kernel. In float32 the features equal the
  trained encoder's to about 1e-6 (relative).
- **The backbone's precision.** "bfloat16" runs the backbone's layers in bfloat16 (Keras's
  mixed_bfloat16 policy: the weights stay float32, each layer computes in bfloat16); the encoder
  head, which gives the decoder its features, stays float32. On a CPU with native bfloat16
  (AVX512_BF16 or AMX) oneDNN's bfloat16 convolutions take about half the time of float32 ones;
  elsewhere they are emulated and slower (the service's ENCODER_PRECISION=auto looks:
  app.resources.encoder_precision). TensorFlow runs them through oneDNN only with
  TF_ENABLE_ONEDNN_OPTS on, which `python -m app` sets for bfloat16.

Measured on default/3 (docs/ENGINE-HISTORY.md, round 20): the whole encoder 2.6 ms an image as trained
(float32, oneDNN off) against 1.1-1.2 folded in bfloat16, at batches of 8-32; greedy captions of the
test and wild splits: 3 of 3800 verdicts changed, the domain check's decisions none.

Training, export and evaluation use the trained encoder (Captioner.load without a precision):
a folded encoder has no BatchNormalization layers to train or save.
"""

from __future__ import annotations

import logging
import os

import keras
import numpy as np

from captioning.config import ENCODER_PRECISIONS

logger = logging.getLogger("captioning.inference")

HEAD = "encoder_head"  # captioning.model.build_encoder_head: stays float32 whatever the precision
_FOLDABLE = (keras.layers.Conv2D, keras.layers.DepthwiseConv2D)


class FoldedNorm(keras.layers.Layer):
    """Where a batch normalisation was: its affine map is now in the convolution before it. Takes
    the batch normalisation's call arguments, so the cloned graph calls it as it called that."""

    def call(self, inputs, training=None, mask=None):
        return inputs

    def compute_output_shape(self, input_shape):
        return input_shape


def inference_encoder(encoder: keras.Model, precision: str = "float32") -> keras.Model:
    """A copy of the trained `encoder` with every foldable batch normalisation folded and its
    backbone (every nested model but the head) computing in `precision`."""
    if precision not in ENCODER_PRECISIONS:
        raise ValueError(f"unknown encoder precision {precision!r}; expected one of {ENCODER_PRECISIONS}")
    if precision == "bfloat16" and os.environ.get("TF_ENABLE_ONEDNN_OPTS") == "0":
        logger.warning(
            "encoder precision bfloat16 with TF_ENABLE_ONEDNN_OPTS=0: TensorFlow emulates bfloat16 without "
            "oneDNN, slower than float32; unset TF_ENABLE_ONEDNN_OPTS (python -m app turns it on for bfloat16)"
        )
    folds = _foldable_pairs(encoder)
    policy = "mixed_bfloat16" if precision == "bfloat16" else None

    def clone(layer, dtype=None):
        if isinstance(layer, keras.Model):
            inner = None if layer.name == HEAD else policy
            return keras.models.clone_model(layer, clone_function=lambda sub: clone(sub, inner))
        config = layer.get_config()
        if dtype is not None and not isinstance(layer, keras.layers.InputLayer):
            config["dtype"] = dtype
        if id(layer) in folds.values():  # its batch normalisation is folded into its bias
            config["use_bias"] = True
        if id(layer) in folds:
            return FoldedNorm(name=layer.name, dtype=config.get("dtype"))
        return layer.__class__.from_config(config)

    folded = keras.models.clone_model(encoder, clone_function=clone)
    _copy_weights(encoder, folded, folds)
    return folded


def _foldable_pairs(model: keras.Model) -> dict[int, int]:
    """{id(batch norm): id(convolution)} for each BatchNormalization, at any depth, that reads the
    output of a convolution used once, by it alone, over the last (channels) axis."""
    pairs = {}
    for layer in _all_layers(model):
        if not isinstance(layer, keras.layers.BatchNormalization) or len(layer._inbound_nodes) != 1:
            continue
        parents = layer._inbound_nodes[0].parent_nodes
        if len(parents) != 1:
            continue
        producer = parents[0].operation
        if (
            isinstance(producer, _FOLDABLE)
            and len(producer._inbound_nodes) == 1
            and len(producer._outbound_nodes) == 1
            and layer.axis in (-1, len(producer.output.shape) - 1)
            and producer.activation is keras.activations.linear
        ):
            pairs[id(layer)] = id(producer)
    return pairs


def _all_layers(model: keras.Model):
    for layer in model.layers:
        yield layer
        if isinstance(layer, keras.Model):
            yield from _all_layers(layer)


def _copy_weights(trained: keras.Model, folded: keras.Model, folds: dict[int, int]) -> None:
    """The trained weights into the clone, layer by layer (the clone keeps every name and order),
    each folded convolution's kernel and bias computed from its batch normalisation."""
    norm_of = {conv: norm for norm, conv in folds.items()}
    by_id = {id(layer): layer for layer in _all_layers(trained)}
    for source, target in zip(_all_layers(trained), _all_layers(folded), strict=True):
        if isinstance(source, keras.layers.InputLayer) and isinstance(target, keras.layers.InputLayer):
            continue  # no weights, and a clone's inputs are named anew
        if source.name != target.name:
            raise RuntimeError(f"the clone's layers are out of order: {source.name} against {target.name}")
        if isinstance(source, keras.Model) or id(source) in folds:
            continue  # a nested model's weights come with its layers; a folded norm has none left
        weights = source.get_weights()
        if id(source) in norm_of:
            weights = _fold(source, weights, by_id[norm_of[id(source)]])
        target.set_weights(weights)


def _fold(conv, weights: list[np.ndarray], norm) -> list[np.ndarray]:
    kernel, bias = weights[0], (weights[1] if conv.use_bias else 0.0)
    gamma, beta, mean, variance = _norm_parameters(norm)
    scale = gamma / np.sqrt(variance + norm.epsilon)
    if isinstance(conv, keras.layers.DepthwiseConv2D):  # kernel [h, w, in, multiplier]: out = in * multiplier
        kernel = kernel * scale.reshape(kernel.shape[2], kernel.shape[3])
    else:  # kernel [..., in, out]
        kernel = kernel * scale
    return [kernel.astype(np.float32), ((bias - mean) * scale + beta).astype(np.float32)]


def _norm_parameters(norm) -> tuple[np.ndarray, ...]:
    """(gamma, beta, moving mean, moving variance); gamma 1 and beta 0 where the layer has none."""
    value = keras.ops.convert_to_numpy
    channels = norm.moving_mean.shape[0]
    gamma = value(norm.gamma) if norm.scale else np.ones(channels, np.float32)
    beta = value(norm.beta) if norm.center else np.zeros(channels, np.float32)
    return gamma, beta, value(norm.moving_mean), value(norm.moving_variance)
