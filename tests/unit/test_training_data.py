"""The tf.data pipeline's mirroring: a flipped image gets captions with "left" and "right" swapped."""

from __future__ import annotations

import numpy as np
import pytest

from captioning.tokenizer import Tokenizer
from training.data import make_dataset
from training.datasets.base import CaptionedImage

CAPTIONS = ["a red circle is to the left of a blue square", "a blue square is to the right of a red circle"]


def records(count: int) -> list[CaptionedImage]:
    pixels = np.zeros((8, 8, 3), np.uint8)
    pixels[:, :2] = 255  # a white band on the left: a mirrored image has it on the right
    return [CaptionedImage(f"i{i}", list(CAPTIONS), "train", pixels=pixels.copy()) for i in range(count)]


def test_mirrored_images_get_mirrored_captions_and_the_rest_stay():
    tokenizer = Tokenizer.build(CAPTIONS)
    data = records(64)
    kept = mirrored = 0
    dataset = make_dataset(data, tokenizer, image_size=8, max_length=16, batch_size=8, captions_per_image=2, flip=True)
    for (images, _), caption_out in dataset:
        for image, tokens in zip(images.numpy(), caption_out.numpy()):
            texts = sorted(" ".join(tokenizer.decode(t)) for t in tokens)
            if image[0, 0, 0] == 255:  # as drawn
                assert texts == sorted(CAPTIONS)
                kept += 1
            else:
                assert image[0, -1, 0] == 255
                assert texts == sorted(c.replace("left", "LEFT").replace("right", "left").replace("LEFT", "right")
                                       for c in CAPTIONS)  # fmt: skip
                mirrored += 1
    assert kept + mirrored == 64 and 12 <= mirrored <= 52  # about half, not all or none


def test_without_flip_nothing_is_mirrored():
    tokenizer = Tokenizer.build(CAPTIONS)
    dataset = make_dataset(records(16), tokenizer, image_size=8, max_length=16, batch_size=16, captions_per_image=2)
    (images, _), _ = next(iter(dataset))
    assert (images.numpy()[:, 0, 0, 0] == 255).all()


def test_cached_features_cannot_be_mirrored():
    with pytest.raises(ValueError, match="mirrored"):
        make_dataset(records(2), Tokenizer.build(CAPTIONS), image_size=8, max_length=16, batch_size=2,
                     features=object(), flip=True)  # fmt: skip


def test_a_vocabulary_with_half_a_pair_cannot_mirror():
    tokenizer = Tokenizer.build(["a red circle is to the left of a blue square"])
    with pytest.raises(ValueError, match="only one of 'left' and 'right'"):
        make_dataset(records(2), tokenizer, image_size=8, max_length=16, batch_size=2, flip=True)
    make_dataset(records(2), tokenizer, image_size=8, max_length=16, batch_size=2)  # without flip: fine


def test_flip_and_a_features_cache_are_refused_before_any_work(tmp_path):
    from training.__main__ import main

    with pytest.raises(SystemExit, match="cannot be mirrored"):
        main(
            [
                "train",
                "--preset",
                "tiny",
                "--flip",
                "true",
                "--features-cache",
                str(tmp_path),
                "--output",
                str(tmp_path),
            ]
        )


def test_the_same_seed_chooses_the_same_captions_and_mirrors_and_each_epoch_others():
    """Captions chosen (of 1-5 per image) and mirrors drawn in parallel: two pipelines with one seed
    give the same examples, epoch by epoch (they differed from run to run), and epochs differ."""
    words = ["red", "blue", "green", "cyan", "gray"]
    captions = [f"a {word} circle is to the left of a square" for word in words]
    tokenizer = Tokenizer.build(captions + ["a square is to the right of a circle"])
    data = [
        CaptionedImage(f"i{i}", captions[: 1 + i % 5], "train", pixels=np.full((8, 8, 3), i, np.uint8))
        for i in range(48)
    ]

    def epochs(seed: int) -> list[np.ndarray]:
        dataset = make_dataset(
            data, tokenizer, image_size=8, max_length=16, batch_size=8, captions_per_image=3, flip=True, seed=seed
        )
        return [
            np.concatenate(
                [np.concatenate([i.numpy().reshape(8, -1), c.numpy().reshape(8, -1)], 1) for (i, _), c in dataset]
            )
            for _ in range(2)
        ]

    first, again, other = epochs(seed=3), epochs(seed=3), epochs(seed=4)
    assert all((a == b).all() for a, b in zip(first, again))
    assert not (first[0] == first[1]).all() and not (first[0] == other[0]).all()
