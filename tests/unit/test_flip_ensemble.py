"""bench.flip_ensemble: greedy decoding of an image together with its mirror."""

import numpy as np

from bench.flip_ensemble import flip_ensemble_captions, mirror_permutation
from captioning.tokenizer import Tokenizer


def test_the_mirror_swaps_left_and_right_and_nothing_else():
    tokenizer = Tokenizer.build(["a circle to the left of a square", "a square to the right of a circle"])
    permutation = mirror_permutation(tokenizer)
    left, right = tokenizer.ids["left"], tokenizer.ids["right"]
    assert permutation[left] == right and permutation[right] == left
    unchanged = np.delete(np.arange(len(tokenizer)), [left, right])
    np.testing.assert_array_equal(permutation[unchanged], unchanged)


def test_a_mirror_symmetric_image_gets_its_greedy_caption(tiny_captioner):
    """Both views are the same image, and the tiny vocabulary has no side words: the average of
    two equal distributions is that distribution, so the answer is plain greedy decoding's."""
    half = np.random.default_rng(4).integers(0, 255, (3, 32, 16, 3), dtype=np.uint8)
    images = np.concatenate([half, half[:, :, ::-1]], axis=2)
    greedy = [best[0].text for best in tiny_captioner.caption(list(images))]
    assert flip_ensemble_captions(tiny_captioner, images) == greedy


def test_an_image_and_its_mirror_get_the_same_ensemble_caption(tiny_captioner):
    images = np.random.default_rng(5).integers(0, 255, (4, 32, 32, 3), dtype=np.uint8)
    assert flip_ensemble_captions(tiny_captioner, images) == flip_ensemble_captions(
        tiny_captioner, np.ascontiguousarray(images[:, :, ::-1])
    )
