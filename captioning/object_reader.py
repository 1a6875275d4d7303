"""The object reader: grounded decoding's second look at each object, in the picture's pixels.

The scene head (captioning.grounding) reads the encoder's 12x12 grid, where an object of 10 px is
one or two cells: it finds the objects well, but their shapes are what the encoder kept of them,
and in small, low-resolution or JPEG pictures that is where it errs (docs/MODEL.md). The reader
goes back to the model's input: a window around each object the head found, resampled to
CROP x CROP, goes to a small CNN that names its shape. The reading keeps the head's objects,
colours, sizes and places and takes the reader's shapes, and grounded reranking then orders the
beam by that reading.

It reads pixels, not the encoder's features, so it is not tied to one encoder: it is fitted after
training (`python -m training fit-object-reader`), ships as object_reader.keras, verified by the
manifest like every file and loaded in Keras's safe mode. The windows are cut by `crop_windows`
in training and in serving alike.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import numpy as np
import tensorflow as tf

from captioning.artifacts import OBJECT_READER_FILE as FILE  # noqa: F401  (the bundle's file)
from captioning.grounding import MOST_OBJECTS_READ
from captioning.scenes import SHAPES, Scene

CROP = 32  # the reader's input side
# The window cut around an object, as a share of the input's side, by the size the head read: a
# small object is 10-16% of the picture's longer side, a large one 24-36% (training.datasets.shapes_wide),
# so a window holds a square picture's object whole with a margin. A picture squeezed square
# stretches its objects along its shorter side (up to 1.6x), and then the window can cut an edge
# off (6% of small and 17% of large objects over the training distribution): training cuts the
# same windows, so the reader learnt to name such cut objects too.
WINDOW = {"small": 0.21, "large": 0.42}
WIDTHS = (16, 32, 64)  # channels of the reader's three stages


def build_reader() -> tf.keras.Model:
    """uint8-range crops [B, CROP, CROP, 3] -> shape logits [B, len(SHAPES)]."""
    import keras
    from keras import layers

    crops = keras.Input((CROP, CROP, 3), name="crop")
    x = layers.Rescaling(1 / 255.0)(crops)
    for stage, width in enumerate(WIDTHS):
        for _ in range(2):
            x = layers.Conv2D(width, 3, padding="same", use_bias=False)(x)
            x = layers.BatchNormalization()(x)
            x = layers.ReLU()(x)
        if stage < len(WIDTHS) - 1:
            x = layers.MaxPooling2D()(x)
    x = layers.GlobalAveragePooling2D()(x)
    x = layers.Dense(128, activation="relu")(x)
    return keras.Model(crops, layers.Dense(len(SHAPES), name="shape")(x), name="object_reader")


def window_boxes(
    centres: np.ndarray, sizes: Sequence[str], side: int, scales: Sequence[float] | None = None
) -> np.ndarray:
    """Object centres [K, 2] as (x, y) in input pixels (0 at the picture's edge, so pixel i spans
    [i, i + 1)) and their size words -> boxes [K, 4] as tf.image.crop_and_resize takes them:
    (y1, x1, y2, x2), where 0 and 1 are the centres of the first and the last pixel. `scales`
    (training's jitter) multiply each window's side; serving cuts them as WINDOW says."""
    half = np.array([WINDOW[size] * side / 2 for size in sizes], np.float32)
    if scales is not None:
        half *= np.asarray(scales, np.float32)
    centre = np.asarray(centres, np.float32).reshape(-1, 2) - 0.5  # a pixel's index at its centre
    x, y, scale = centre[:, 0], centre[:, 1], side - 1
    return np.stack([(y - half) / scale, (x - half) / scale, (y + half) / scale, (x + half) / scale], axis=1)


def crop_windows(images, boxes, image_of_box) -> tf.Tensor:
    """uint8 images [B, S, S, 3], boxes [K, 4] (window_boxes), the image of each box [K] ->
    crops [K, CROP, CROP, 3], float in the uint8 range, bilinear; outside the picture is black.
    One op, run eagerly: in a tf.function, graph optimisation logs a warning for it (it has no
    cost model) on the first call of every trace."""
    boxes, image_of_box = tf.convert_to_tensor(boxes, tf.float32), tf.convert_to_tensor(image_of_box, tf.int32)
    # uint8 in, float32 out: no float copy of the whole batch of images (training passes thousands)
    return tf.image.crop_and_resize(tf.convert_to_tensor(images, tf.uint8), boxes, image_of_box, (CROP, CROP))


class ObjectReader:
    """A fitted reader (build_reader's model) and the reading it refines."""

    def __init__(self, model):
        """ValueError for a model that is not a reader of this grammar. One probe call checks what
        it gives and traces it, so that no request pays for the trace."""
        inputs = [tuple(tensor.shape[1:]) for tensor in model.inputs]
        outputs = [tuple(tensor.shape[1:]) for tensor in model.outputs]
        if inputs != [(CROP, CROP, 3)] or outputs != [(len(SHAPES),)]:
            raise ValueError(
                f"an object reader maps {CROP}x{CROP} crops to {len(SHAPES)} shapes; this model takes "
                f"{inputs} and gives {outputs}"
            )
        self._shapes = tf.function(
            lambda crops: tf.argmax(model(crops, training=False), axis=-1, output_type=tf.int32),
            input_signature=[tf.TensorSpec([None, CROP, CROP, 3], tf.float32)],
        )
        probe = self.shapes(np.zeros((2, CROP, CROP, 3), np.float32))
        if probe.shape != (2,):
            raise ValueError(f"an object reader names one shape per crop; this one gave {probe.shape} for 2")

    def shapes(self, crops: np.ndarray | tf.Tensor) -> np.ndarray:
        """Crops [K, CROP, CROP, 3] -> the index in SHAPES of each one's shape [K]."""
        return self._shapes(tf.convert_to_tensor(crops, tf.float32)).numpy()

    def refine(self, images: np.ndarray, scenes: Sequence[Scene], grid_shape: tuple[int, int]) -> list[Scene]:
        """The scene head's readings (captioning.grounding.read_scene, a unit per grid cell) of
        uint8 images [B, S, S, 3], each object's shape read again from its window of the picture;
        one reader call for the batch. A reading that no caption can agree with (more objects than
        rerank checks) is left as it is."""
        side = images.shape[1]
        rows, columns = grid_shape
        picked = [i for i, scene in enumerate(scenes) if 0 < len(scene.objects) <= MOST_OBJECTS_READ]
        objects = [(i, obj) for i in picked for obj in scenes[i].objects]
        if not objects:
            return list(scenes)
        centres = [(obj.cx * side / columns, obj.cy * side / rows) for _, obj in objects]
        boxes = window_boxes(np.array(centres), [obj.size for _, obj in objects], side)
        image_of_box = np.array([i for i, _ in objects], np.int32)
        shapes = iter(self.shapes(crop_windows(images, boxes, image_of_box)))
        refined = list(scenes)
        for i in picked:
            reread = tuple(replace(obj, shape=SHAPES[next(shapes)]) for obj in scenes[i].objects)
            refined[i] = replace(scenes[i], objects=reread)
        return refined
