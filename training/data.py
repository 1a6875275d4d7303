"""tf.data input pipelines: images with K of their captions, teacher-forcing pairs, prefetched.

Each element is one image with K captions: ((image [S, S, 3] uint8, caption inputs [K, T-1]),
caption targets [K, T-1]). The model encodes the image once and trains on all K captions, so every
reference caption is used without paying for the image K times.

With `flip`, half the images are mirrored left to right and the words that name a side swap in
their captions (captioning.mirror.MIRRORED_WORDS), so every caption stays true: twice the scenes for a small dataset.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf
from PIL import Image

from captioning.mirror import mirror_ids
from captioning.preprocess import load_image_file
from captioning.scenes import scene_cells
from captioning.tokenizer import Tokenizer
from training.datasets.base import CaptionedImage

AUTOTUNE = tf.data.AUTOTUNE


def caption_matrix(records: list[CaptionedImage], tokenizer: Tokenizer, max_length: int):
    """All captions as token ids [N, C, T] (C: most captions of any image) and counts [N]."""
    most = max(len(r.captions) for r in records)
    tokens = np.zeros((len(records), most, max_length), dtype=np.int32)
    counts = np.zeros(len(records), dtype=np.int32)
    for i, record in enumerate(records):
        tokens[i, : len(record.captions)] = tokenizer.encode_batch(record.captions, max_length)
        counts[i] = len(record.captions)
    return tokens, counts


# The random choices of an example are drawn from seeds it carries (stateless ops), not from the
# op's own generator: the examples are made in parallel, and which of them took which draw depended
# on the threads' timing, so two runs of one command chose different captions.
def _choose_captions(tokens, count, captions_per_image: int, seed):
    """K distinct captions when the image has at least K, else all of them and random repeats."""
    distinct = tf.random.experimental.stateless_shuffle(tf.range(count), seed=seed)
    repeats = tf.random.stateless_uniform([captions_per_image], seed + [0, 1], 0, count, dtype=tf.int32)
    chosen = tf.gather(tokens, tf.concat([distinct, repeats], 0)[:captions_per_image])
    return chosen[:, :-1], chosen[:, 1:]


def _maybe_mirror(image, caption_tokens, pairs: tuple[tuple[int, int], ...], seed):
    """With probability 1/2: the image flipped left-right and each pair's words swapped."""
    swapped = caption_tokens
    for a, b in pairs:
        swapped = tf.where(caption_tokens == a, b, tf.where(caption_tokens == b, a, swapped))
    mirror = tf.random.stateless_uniform([], seed + [0, 2]) < 0.5
    return (
        tf.cond(mirror, lambda: tf.image.flip_left_right(image), lambda: image),
        tf.cond(mirror, lambda: swapped, lambda: caption_tokens),
    )


def _load_image_file(path, image_size: int):
    # Pillow, through the service's own path (captioning.preprocess), not tf.io.decode_image: that
    # ignores EXIF orientation, keeps the hidden pixels of transparent images, decodes JPEG with
    # another IDCT and resizes with another filter, so the model would train on other pixels than
    # it is served.
    def load(file_path) -> np.ndarray:  # bytes, or a 0-d array of them when called eagerly
        return load_image_file(np.asarray(file_path).item().decode(), image_size, Image.MAX_IMAGE_PIXELS)

    image = tf.numpy_function(load, [path], tf.uint8, stateful=False)
    image.set_shape((image_size, image_size, 3))
    return image


def image_source(records: list[CaptionedImage], image_size: int) -> tf.data.Dataset:
    """Pixels for every record, in order: held in memory, or decoded from files in parallel."""
    if any(r.encoded is not None for r in records):  # its pixels are not what the service would read
        raise ValueError("records that carry their JPEG file are read by record_input; store them at the model's size")
    if all(r.pixels is not None for r in records):
        return tf.data.Dataset.from_tensor_slices(np.stack([r.pixels for r in records]))
    paths = tf.data.Dataset.from_tensor_slices([str(r.path) for r in records])
    return paths.map(lambda p: _load_image_file(p, image_size), num_parallel_calls=AUTOTUNE)


def scene_targets(records: list[CaptionedImage], grid: int) -> np.ndarray:
    """Each record's objects, cell by cell of the encoder's grid x grid feature map ([records,
    grid * grid] labels, captioning.scenes.scene_cells): the targets of the training
    model's scene head. Only datasets that know their scenes have them."""
    if any(record.scene is None for record in records):
        raise ValueError("the scene loss needs a dataset that knows each image's objects (shapes, shapes_wide)")
    return np.stack([scene_cells(record.scene, grid) for record in records])


IMAGE_CACHE_BYTES = 2 << 30  # decoded training images are kept in memory up to this size


def make_dataset(
    records: list[CaptionedImage],
    tokenizer: Tokenizer,
    *,
    image_size: int,
    max_length: int,
    batch_size: int,
    captions_per_image: int = 5,
    shuffle: bool = True,
    seed: int = 0,
    features=None,
    flip: bool = False,
    scene_labels: np.ndarray | None = None,
    options: tf.data.Options | None = None,
) -> tf.data.Dataset:
    """Batches of ((images or cached features, caption inputs), caption targets); with
    `scene_labels` ([records, N], scene_targets()) the inputs also carry each image's cell labels.

    `features` (a training.features.CachedFeatures for these records) replaces the images with
    cached backbone features: the pipeline then carries each record's cache location, shuffles
    those, and reads the features only when a batch is assembled, so the shuffle buffer stays small.
    """
    if flip and scene_labels is not None:
        raise ValueError("flip and scene labels cannot be combined (the labels are not mirrored)")
    if flip and features is not None:
        raise ValueError("flip needs images: cached features cannot be mirrored")
    pairs = mirror_ids(tokenizer) if flip else ()
    tokens, counts = caption_matrix(records, tokenizer, max_length)
    scenes = () if scene_labels is None else (np.asarray(scene_labels, np.int32),)
    captions = tf.data.Dataset.from_tensor_slices((tokens, counts, *scenes))
    if features is None:
        source, load = image_source(records, image_size), None
    else:
        source, load = tf.data.Dataset.from_tensor_slices(features.locations), features.load
    ds = tf.data.Dataset.zip(source, captions)
    if shuffle:
        # Decoded image files are cached before shuffling (when they fit), so files are read once.
        decoded_bytes = len(records) * image_size * image_size * 3
        if features is None and records[0].path is not None and decoded_bytes <= IMAGE_CACHE_BYTES:
            ds = ds.cache()
        ds = ds.shuffle(min(len(records), 10000), seed=seed, reshuffle_each_iteration=True)
    # A seed for each example, in order: the same sequence for the same `seed`, another each epoch.
    ds = tf.data.Dataset.zip(ds, tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True))

    def to_example(item, example_seed):
        source_item, caption_data = item
        inputs = source_item if load is None else load(source_item)
        caption_tokens, count, *scene = caption_data
        example_seed = tf.stack([example_seed, tf.constant(0, tf.int64)])
        if flip:
            inputs, caption_tokens = _maybe_mirror(inputs, caption_tokens, pairs, example_seed)
        caption_in, caption_out = _choose_captions(caption_tokens, count, captions_per_image, example_seed)
        return (inputs, caption_in, *scene), caption_out

    ds = ds.map(to_example, num_parallel_calls=AUTOTUNE, deterministic=True)
    ds = ds.batch(batch_size).prefetch(AUTOTUNE)
    return ds.with_options(options) if options is not None else ds
