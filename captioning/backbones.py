"""Image backbones by name, each with its own input preprocessing.

Every backbone takes uint8-range RGB pixels [B, S, S, 3] (as float) and returns a feature grid
[B, h, w, C]. The preprocessing is a layer inside the saved encoder, so callers only resize.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import keras
from keras import layers, ops


@keras.saving.register_keras_serializable(package="captioning")
class ImagePreprocess(layers.Layer):
    """Maps 0-255 RGB to what a backbone was trained on.

    modes: "unit" -> [0, 1]; "tf" -> [-1, 1]; "caffe" -> BGR minus the ImageNet mean;
    "raw" -> unchanged (the backbone rescales internally, as EfficientNet and MobileNetV3 do).
    """

    MODES = ("unit", "tf", "caffe", "raw")

    def __init__(self, mode: str, **kwargs):
        super().__init__(**kwargs)
        if mode not in self.MODES:
            raise ValueError(f"unknown preprocessing mode {mode!r}; expected one of {self.MODES}")
        self.mode = mode

    def call(self, images):
        images = ops.cast(images, "float32")
        if self.mode == "unit":
            return images / 255.0
        if self.mode == "tf":
            return images / 127.5 - 1.0
        if self.mode == "caffe":
            bgr = images[..., ::-1]
            return bgr - ops.convert_to_tensor([103.939, 116.779, 123.68], dtype="float32")
        return images

    def get_config(self):
        return {**super().get_config(), "mode": self.mode}


@keras.saving.register_keras_serializable(package="captioning")
class AddCoordinates(layers.Layer):
    """Appends x and y coordinate channels in [-1, 1] (CoordConv), so the features know where
    they are: spatial relations ("left of", "above") depend on it."""

    def call(self, images):
        shape = ops.shape(images)
        batch, height, width = shape[0], shape[1], shape[2]
        ys = ops.linspace(-1.0, 1.0, height)
        xs = ops.linspace(-1.0, 1.0, width)
        grid_y = ops.broadcast_to(ops.reshape(ys, (1, -1, 1, 1)), (batch, height, width, 1))
        grid_x = ops.broadcast_to(ops.reshape(xs, (1, 1, -1, 1)), (batch, height, width, 1))
        return ops.concatenate([images, ops.cast(grid_x, images.dtype), ops.cast(grid_y, images.dtype)], axis=-1)


def _small_cnn(image_size: int, weights: str | None, deep: bool = False, full_res_stem: bool = False) -> keras.Model:
    """Three stages, each a stride-2 conv then a 3x3 conv: an S x S image gives an (S/8) x (S/8)
    grid of 128 channels. Small enough to train from scratch on two CPU cores.

    `deep` (the `small_cnn_deep` backbone) adds a second 3x3 conv to the last two stages: about
    1.5x the multiply-adds and 1.17x the training step. Three runs of the default recipe with it
    scored within the spread of `small_cnn`'s, so it did not replace it (docs/MODEL-EXPERIMENTS.md).

    `full_res_stem` (the `small_cnn_fullres` backbone, the default preset's) puts a 16-channel 3x3
    conv at the input's resolution before the first stride-2 one, so a 10 px object is seen whole
    before it is subsampled: docs/MODEL-EXPERIMENTS.md ("Why default/4") for what it changes."""
    name = "small_cnn_deep" if deep else "small_cnn_fullres" if full_res_stem else "small_cnn"
    if weights == "imagenet":
        raise ValueError(f"{name} has no ImageNet weights; use weights=None or a local weights file")
    inputs = keras.Input((image_size, image_size, 3))
    x = AddCoordinates(name="coordinates")(inputs)
    if full_res_stem:
        x = layers.Conv2D(16, 3, padding="same", use_bias=False, name="stem_conv")(x)
        x = layers.BatchNormalization(name="stem_conv_bn")(x)
        x = layers.ReLU(name="stem_conv_relu")(x)
    for i, filters in enumerate((32, 64, 128)):
        kinds = ("down", "conv", "conv2") if deep and i > 0 else ("down", "conv")
        for kind in kinds:
            strides = 2 if kind == "down" else 1
            x = layers.Conv2D(filters, 3, strides=strides, padding="same", use_bias=False, name=f"stage{i}_{kind}")(x)
            x = layers.BatchNormalization(name=f"stage{i}_{kind}_bn")(x)
            x = layers.ReLU(name=f"stage{i}_{kind}_relu")(x)
    model = keras.Model(inputs, x, name=name)
    if weights is not None:
        model.load_weights(weights)
    return model


def _keras_application(constructor: Callable, **extra) -> Callable[[int, str | None], keras.Model]:
    def build(image_size: int, weights: str | None) -> keras.Model:
        if weights not in (None, "imagenet") and not Path(weights).is_file():
            raise FileNotFoundError(f"backbone weights file not found: {weights}")
        return constructor(include_top=False, weights=weights, input_shape=(image_size, image_size, 3), **extra)

    return build


@dataclass(frozen=True)
class Backbone:
    build: Callable[[int, str | None], keras.Model]
    preprocessing: str  # an ImagePreprocess mode
    default_image_size: int


BACKBONES: dict[str, Backbone] = {
    "small_cnn": Backbone(_small_cnn, "unit", 64),
    "small_cnn_deep": Backbone(functools.partial(_small_cnn, deep=True), "unit", 64),
    "small_cnn_fullres": Backbone(functools.partial(_small_cnn, full_res_stem=True), "unit", 64),
    "inception_resnet_v2": Backbone(_keras_application(keras.applications.InceptionResNetV2), "tf", 299),
    "efficientnet_b0": Backbone(_keras_application(keras.applications.EfficientNetB0), "raw", 224),
    "mobilenet_v3_small": Backbone(
        _keras_application(keras.applications.MobileNetV3Small, include_preprocessing=True), "raw", 224
    ),
    "resnet50": Backbone(_keras_application(keras.applications.ResNet50), "caffe", 224),
}


def get_backbone(name: str) -> Backbone:
    try:
        return BACKBONES[name]
    except KeyError:
        raise ValueError(f"unknown backbone {name!r}; choose from {sorted(BACKBONES)}") from None
