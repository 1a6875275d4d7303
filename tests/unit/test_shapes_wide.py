"""The wide-domain renderer: deterministic, true captions, and each option draws what it says."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from captioning.scene_checker import check_caption
from captioning.scenes import Scene, ShapeObject, relation_holds
from training.datasets.registry import load_dataset
from training.datasets.shapes import RGB
from training.datasets.shapes_wide import (
    SMALL_CORNER,
    TRAINING,
    VARIATIONS,
    WideSettings,
    generate_wide_scene,
    make_wide_example,
    render_wide,
)

PLAIN = dataclasses.replace(
    TRAINING,
    textures=("plain",),
    blur_probability=0.0,
    noise_probability=0.0,
    jpeg_probability=0.0,
    coloured_probability=0.0,
)


@pytest.fixture(scope="module")
def wild() -> dict[str, list]:
    return {name: [make_wide_example("test", i, name) for i in range(12)] for name in VARIATIONS}


def test_deterministic_and_splits_differ():
    a, b = make_wide_example("val", 3), make_wide_example("val", 3)
    assert np.array_equal(a.pixels, b.pixels) and a.captions == b.captions
    other = make_wide_example("test", 3)
    assert a.pixels.shape != other.pixels.shape or not np.array_equal(a.pixels, other.pixels)
    wild_one = make_wide_example("test", 3, "standard")  # same settings as test, its own seed
    assert wild_one.image_id == "shapes-wild-standard-000003"
    assert wild_one.scene != other.scene


def test_sizes_and_aspect_ratios_cover_64_to_640():
    rng = np.random.default_rng(0)
    frames = [generate_wide_scene(rng).frame for _ in range(300)]
    sides = np.array(frames)
    assert sides.min() >= 64 and sides.max() <= 640 and sides.max() > 450
    ratios = sides.max(1) / sides.min(1)
    assert (ratios == 1).mean() > 0.2 and (ratios > 1.3).mean() > 0.1 and ratios.max() <= 1.61
    assert (sides[:, 0] > sides[:, 1]).any() and (sides[:, 0] < sides[:, 1]).any()


def test_small_and_large_are_relative_to_the_longer_side_and_never_overlap():
    rng = np.random.default_rng(1)
    for _ in range(200):
        scene = generate_wide_scene(rng, max_objects=4)
        width, height = scene.frame
        for obj in scene.objects:
            share = 2 * obj.extent / max(width, height)
            if obj.size == "small":
                assert share <= 0.16 + 1e-3 or 2 * obj.extent <= 6.2
            else:
                assert 0.24 - 1e-3 <= share <= 0.36 + 1e-3
            assert obj.extent <= obj.cx <= width - obj.extent and obj.extent <= obj.cy <= height - obj.extent
        for i, a in enumerate(scene.objects):
            for b in scene.objects[i + 1 :]:
                reach = a.extent + b.extent
                assert abs(a.cx - b.cx) > reach or abs(a.cy - b.cy) > reach


def test_every_reference_caption_is_true(wild):
    for records in wild.values():
        for record in records:
            assert len(record.captions) == 5
            assert all(check_caption(c, record.scene).correct for c in record.captions), record.captions


def test_backgrounds_follow_the_variation(wild):
    def corner(record):  # the image border is background (objects keep a margin)
        return np.concatenate([record.pixels[0], record.pixels[-1]]).astype(float).mean(0)

    assert all(corner(r).mean() < 95 for r in wild["dark_background"])
    assert all(corner(r).mean() > 165 for r in wild["light_background"])
    assert all(corner(r).min() > 235 for r in wild["white_background"])
    spread = [np.ptp(corner(r)) for r in wild["coloured_background"]]
    assert np.mean(np.array(spread) > 40) > 0.5  # most are clearly not grey


def test_objects_are_drawn_in_their_colour_on_any_background():
    obj = ShapeObject("square", "blue", "large", 100.0, 80.0, 30.0)
    scene = Scene(160, (obj,), "", width=200, height=160)
    for tone in ((0.0, 5.0), (250.0, 255.0)):
        pixels = render_wide(scene, np.random.default_rng(0), dataclasses.replace(PLAIN, tone=tone))[0].astype(int)
        assert pixels.shape == (160, 200, 3)
        assert np.abs(pixels[80, 100] - np.array(RGB["blue"])).max() <= 12


def test_hard_edges_have_two_tones_and_anti_aliasing_blends():
    obj = ShapeObject("circle", "red", "large", 40.0, 40.0, 20.0)
    scene = Scene(80, (obj,), "")
    hard = render_wide(scene, np.random.default_rng(0), dataclasses.replace(PLAIN, anti_alias_probability=0.0))[0]
    soft = render_wide(scene, np.random.default_rng(0), dataclasses.replace(PLAIN, anti_alias_probability=1.0))[0]
    # a hard-edged circle on a plain background has only the background and the fill colours
    assert len(np.unique(hard.reshape(-1, 3), axis=0)) == 2
    assert len(np.unique(soft.reshape(-1, 3), axis=0)) > 5


def test_jpeg_blur_and_noise_change_the_pixels():
    scene = generate_wide_scene(np.random.default_rng(3), dataclasses.replace(PLAIN, long_side=(200, 200)))
    clean = render_wide(scene, np.random.default_rng(0), PLAIN)[0].astype(int)
    for change in (
        dict(jpeg_probability=1.0, jpeg_quality=(20, 20)),
        dict(blur_probability=1.0),
        dict(noise_probability=1.0),
    ):
        degraded = render_wide(scene, np.random.default_rng(0), dataclasses.replace(PLAIN, **change))[0].astype(int)
        assert degraded.shape == clean.shape and np.abs(degraded - clean).mean() > 0.3, change


def test_relations_count_in_shares_of_each_axis():
    a = ShapeObject("circle", "red", "small", 20.0, 50.0, 5.0)
    b = ShapeObject("square", "blue", "small", 80.0, 50.0, 5.0)
    assert relation_holds(a, b, "to the left of", 100)
    assert relation_holds(a, b, "to the left of", (100, 50))
    assert not relation_holds(a, b, "to the left of", (1000, 50))  # 6% of a wide image: not obvious


def test_loader_resizes_for_training_and_keeps_drawn_size_for_evaluation():
    train = load_dataset("shapes_wide", "train", limit=4, resize_to="64")
    assert all(r.pixels.shape == (64, 64, 3) for r in train)
    wild = load_dataset("shapes_wide", "test", limit=4, variation="high_resolution")
    assert all(max(r.pixels.shape[:2]) >= 480 for r in wild)
    with pytest.raises(ValueError, match="unknown variation"):
        load_dataset("shapes_wide", "test", limit=1, variation="nope")


def test_first_starts_the_loader_at_an_index_so_a_later_stage_can_draw_unseen_images():
    later = load_dataset("shapes_wide", "train", limit=2, first="24000")
    assert [r.image_id for r in later] == ["shapes-wide-train-024000", "shapes-wide-train-024001"]
    assert np.array_equal(later[1].pixels, make_wide_example("train", 24001).pixels)


def test_small_corner_draws_its_share_of_training_images_from_the_corner_and_leaves_evaluation_alone():
    plain = load_dataset("shapes_wide", "train", limit=40)
    mixed = load_dataset("shapes_wide", "train", limit=40, small_corner="0.5")
    corner = [m for m in mixed if "-small-" in m.image_id]
    assert 10 <= len(corner) <= 30  # about half, decided per index
    for before, after in zip(plain, mixed):
        if "-small-" not in after.image_id:  # the other images are the plain split's, pixel for pixel
            assert after.image_id == before.image_id and np.array_equal(after.pixels, before.pixels)
    for record in corner:
        width, height = record.scene.frame
        assert max(width, height) <= SMALL_CORNER.long_side[1]
        for obj in record.scene.objects:
            if obj.size == "small":
                assert 2 * obj.extent / max(width, height) <= 0.12 + 1e-3 or 2 * obj.extent <= 6.2
        assert check_caption(record.captions[0], record.scene).correct
    for split in ("val", "test"):
        evaluation = load_dataset("shapes_wide", split, limit=6, small_corner="1")
        assert [r.image_id for r in evaluation] == [f"shapes-wide-{split}-{i:06d}" for i in range(6)]
    with pytest.raises(ValueError, match="small_corner"):
        load_dataset("shapes_wide", "train", limit=1, small_corner="1.5")


def test_jpeg_quality_recompresses_the_same_scenes_at_other_qualities():
    """The object reader's fit draws JPEGs down to quality 15 (Makefile); nothing else changes."""
    plain = load_dataset("shapes_wide", "train", limit=12)
    heavy = load_dataset("shapes_wide", "train", limit=12, jpeg_quality="15-15")
    assert [r.scene for r in heavy] == [r.scene for r in plain]
    assert [r.encoded is None for r in heavy] == [r.encoded is None for r in plain]
    compressed = [(p, h) for p, h in zip(plain, heavy) if p.encoded is not None]
    assert compressed, "some of the first 12 training images are JPEG files"
    for before, after in compressed:  # quality 15 keeps less of the same picture: a smaller file
        assert len(after.encoded) < len(before.encoded)
    for bad in ("95-15", "0-40", "15", "low-high"):
        with pytest.raises(ValueError, match="jpeg_quality"):
            load_dataset("shapes_wide", "train", limit=1, jpeg_quality=bad)


def test_settings_are_plain_ranges():
    assert isinstance(VARIATIONS["jpeg"], WideSettings) and VARIATIONS["standard"] is TRAINING
