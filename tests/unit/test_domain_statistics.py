"""captioning.domain.image_statistics is vectorised over the batch, in chunks, and tests colours
with one look-up table; it must give what the plain per-image formulas in the module docstring give."""

import numpy as np
import pytest

from captioning.domain import FOREGROUND_DISTANCE, NAMED_COLOURS, NAMED_DISTANCE, image_statistics


def reference_statistics(image: np.ndarray) -> list[float]:
    """One image, written the obvious way (float64, broadcasts, a 9-shift box filter)."""
    image = image.astype(np.float64)
    ring = np.concatenate(
        [image[:2].reshape(-1, 3), image[-2:].reshape(-1, 3), image[:, :2].reshape(-1, 3), image[:, -2:].reshape(-1, 3)]
    )
    from_background = np.linalg.norm(image - np.median(ring, axis=0), axis=2)
    foreground = from_background > FOREGROUND_DISTANCE
    named = np.linalg.norm(image[..., None, :] - NAMED_COLOURS, axis=3).min(axis=2) < NAMED_DISTANCE
    named_share = named[foreground].mean() if foreground.sum() >= 4 else 1.0
    residual = from_background[~foreground].mean() if (~foreground).any() else 255.0
    step_x = np.abs(np.diff(image, axis=1)).max(axis=2)[:-1, :]
    step_y = np.abs(np.diff(image, axis=0)).max(axis=2)[:, :-1]
    near_named = named[:-1, :-1] | named[1:, :-1] | named[:-1, 1:] | named[1:, 1:]
    stray = (((step_x > 60) | (step_y > 60)) & ~near_named).mean()
    h, w = image.shape[0] - 2, image.shape[1] - 2
    box = sum(image[i : i + h, j : j + w] for i in range(3) for j in range(3)) / 9
    high_frequency = np.abs(image[1:-1, 1:-1] - box).mean()
    return [foreground.mean(), named_share, residual, stray, high_frequency]


def scenes(rng: np.random.Generator, count: int, size: int) -> np.ndarray:
    images = np.empty((count, size, size, 3), np.uint8)
    for index in range(count):
        images[index] = rng.integers(0, 256, 3)  # a plain background of any colour
        for _ in range(rng.integers(0, 4)):
            y, x = rng.integers(0, size - 8, 2)
            side = rng.integers(3, size // 3)
            images[index, y : y + side, x : x + side] = NAMED_COLOURS[rng.integers(0, 6)]
        if index % 3 == 0:
            noise = rng.normal(0, 20, images[index].shape)
            images[index] = np.clip(images[index] + noise, 0, 255).astype(np.uint8)
    return images


@pytest.mark.parametrize("size", [64, 96])
def test_batched_statistics_equal_the_per_image_formulas(size):
    rng = np.random.default_rng(size)
    images = np.concatenate([scenes(rng, 24, size), rng.integers(0, 256, (4, size, size, 3), dtype=np.uint8)])
    expected = np.array([reference_statistics(image) for image in images])
    np.testing.assert_allclose(image_statistics(images), expected, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(image_statistics(images[:1]), expected[:1], rtol=1e-5, atol=1e-4)


def test_float_inputs_are_read_as_pixel_values():
    rng = np.random.default_rng(0)
    images = scenes(rng, 4, 64)
    np.testing.assert_allclose(image_statistics(images.astype(np.float32)), image_statistics(images))


def test_named_colour_table_is_the_distance_test_for_every_colour_near_the_edge():
    """The table is built from a cube around each named colour only: every colour just inside or
    just outside NAMED_DISTANCE of one (the edge the cubes must not cut), and random ones, agree
    with the plain distances."""
    from captioning.domain import _named_colour_table

    rng = np.random.default_rng(0)
    directions = rng.normal(size=(20000, 3))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    radii = NAMED_DISTANCE + rng.uniform(-1.5, 1.5, (20000, 1))
    near_edge = NAMED_COLOURS[rng.integers(0, 6, 20000)] + directions * radii
    colours = np.clip(np.rint(np.concatenate([near_edge, rng.integers(0, 256, (20000, 3))])), 0, 255).astype(np.int64)
    expected = np.linalg.norm(colours[:, None, :] - NAMED_COLOURS, axis=2).min(axis=1) < NAMED_DISTANCE
    looked_up = _named_colour_table()[(colours[:, 0] << 16) | (colours[:, 1] << 8) | colours[:, 2]]
    np.testing.assert_array_equal(looked_up, expected)
    assert 0.1 < expected[:20000].mean() < 0.9  # the edge sample straddles the edge
