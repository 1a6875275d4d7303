"""The shapes dataset is deterministic, its captions are varied and true, and the checker catches lies."""

from __future__ import annotations

import re

import numpy as np
import pytest
from PIL import Image

from captioning.scene_checker import check_caption, grounded_accuracy, parse_caption
from captioning.scenes import COLOURS, SHAPES, SIZES, Scene, ShapeObject, relation_holds
from training.datasets.shapes import SPLIT_SIZES, generate_scene, load_split, make_example, render, write_captions

SAMPLE = 300


@pytest.fixture(scope="module")
def samples() -> dict[str, list]:
    return {split: load_split(split, SAMPLE) for split in SPLIT_SIZES}


def scene_of(*objects: ShapeObject) -> Scene:
    return Scene(64, objects, "solid")


RED_CIRCLE = ShapeObject("circle", "red", "small", 12.0, 32.0, 5.5)
BLUE_SQUARE = ShapeObject("square", "blue", "large", 48.0, 32.0, 10.0)
TWO_THINGS = scene_of(RED_CIRCLE, BLUE_SQUARE)


# ------------------------------------------------------------------------------------ generation


def test_same_split_and_index_give_the_same_example():
    first, again = make_example("val", 7), make_example("val", 7)
    assert first.image_id == "shapes-val-000007" and first.split == "val"
    assert np.array_equal(first.pixels, again.pixels)
    assert first.captions == again.captions and first.scene == again.scene


def test_splits_differ_and_are_prefix_consistent(samples):
    train, val, test = (samples[s][:20] for s in ("train", "val", "test"))
    for a, b in [(train, val), (train, test), (val, test)]:
        assert not any(np.array_equal(x.pixels, y.pixels) for x, y in zip(a, b))
    short = load_split("test", 5)
    assert [x.captions for x in short] == [x.captions for x in test[:5]]
    assert all(np.array_equal(x.pixels, y.pixels) for x, y in zip(short, test))


def test_pixels_are_rgb_uint8_and_image_size_is_configurable():
    example = make_example("train", 3, image_size=96, max_objects=4)
    assert example.pixels.shape == (96, 96, 3) and example.pixels.dtype == np.uint8
    assert example.scene.image_size == 96


def test_objects_inside_the_image_and_never_overlapping():
    rng = np.random.default_rng(0)
    for _ in range(300):
        scene = generate_scene(rng, 64, 1, 4)
        assert 1 <= len(scene.objects) <= 4
        for obj in scene.objects:
            assert obj.shape in SHAPES and obj.colour in COLOURS and obj.size in SIZES
            assert obj.cx - obj.extent >= 0 and obj.cx + obj.extent <= 64
            assert obj.cy - obj.extent >= 0 and obj.cy + obj.extent <= 64
        for i, a in enumerate(scene.objects):
            for b in scene.objects[i + 1 :]:
                reach = a.extent + b.extent
                assert abs(a.cx - b.cx) > reach or abs(a.cy - b.cy) > reach


def test_objects_are_drawn_in_their_colour():
    scene = scene_of(RED_CIRCLE, BLUE_SQUARE)
    pixels = render(scene, np.random.default_rng(0)).astype(int)
    red, blue = pixels[32, 12], pixels[32, 48]
    assert red[0] > 200 and red[1] < 60 and red[2] < 60
    assert blue[2] > 220 and blue[0] < 70


def test_save_a_grid_to_look_at(samples):
    tiles = [x.pixels for x in samples["train"][:16]]
    rows = [np.concatenate(tiles[r * 4 : (r + 1) * 4], axis=1) for r in range(4)]
    Image.fromarray(np.concatenate(rows, axis=0)).save("/tmp/shapes_grid.png")


# -------------------------------------------------------------------------------------- captions


def test_every_image_has_five_distinct_captions(samples):
    for examples in samples.values():
        for example in examples:
            assert len(example.captions) == 5 == len(set(example.captions))


def test_reference_captions_are_judged_correct(samples):
    for examples in samples.values():
        for example in examples:
            for caption in example.captions:
                verdict = check_caption(caption, example.scene)
                assert verdict.correct, (example.image_id, caption, verdict)


def test_captions_have_variety(samples):
    text = "\n".join(c for examples in samples.values() for x in examples for c in x.captions)
    for pattern in [
        r"^there is ",
        r"^there are ",
        r"\btwo \w+ \w+s\b",
        r"\bcrosses\b",
        r"\bone ",
        r"\ban orange\b",
        r"\bsmall\b",
        r"\blarge\b",
        r", ",
        r" and there (is|are) ",
        *(rf" is {rel} " for rel in ("to the left of", "to the right of", "above", "below")),
    ]:
        assert re.search(pattern, text, re.MULTILINE), pattern
    relational = sum(" is to the " in c or " is above " in c or " is below " in c for c in text.splitlines())
    assert 0.03 < relational / len(text.splitlines()) < 0.5  # some, not most (RELATION_PROBABILITY)


def test_single_object_scene_still_gets_five_captions():
    captions = write_captions(scene_of(RED_CIRCLE), np.random.default_rng(1))
    assert len(set(captions)) == 5 and all("red circle" in c for c in captions)


def test_relations_are_written_only_when_obvious():
    near = ShapeObject("square", "blue", "small", 24.0, 32.0, 5.0)  # 12 px right of the circle
    assert relation_holds(RED_CIRCLE, near, "to the left of", 64, strict=True)
    assert not relation_holds(
        RED_CIRCLE, ShapeObject("square", "blue", "small", 20.0, 20.0, 5.0), "to the left of", 64, strict=True
    )  # 8 px: too close to write
    assert relation_holds(
        RED_CIRCLE, ShapeObject("square", "blue", "small", 20.0, 20.0, 5.0), "to the left of", 64, strict=False
    )  # but true enough to accept


# --------------------------------------------------------------------------------------- checker


def test_checker_accepts_true_captions_with_or_without_punctuation():
    for caption in [
        "a red circle and a blue square",
        "There is a small red circle, and a large blue square.",
        "a red circle is to the left of a blue square",
        "a large blue square is to the right of a red circle",
        "one blue square and one red circle",
    ]:
        assert check_caption(caption, TWO_THINGS).correct, caption
    three = scene_of(RED_CIRCLE, BLUE_SQUARE, ShapeObject("cross", "green", "small", 30.0, 55.0, 5.0))
    assert check_caption("a red circle, a blue square and a green cross", three).correct
    assert check_caption("a red circle a blue square and a green cross", three).correct


@pytest.mark.parametrize(
    "caption, expected",
    [
        ("a green circle and a blue square", ["no green circle"]),
        ("a red triangle and a blue square", ["no red triangle"]),
        ("two red circles and a blue square", ["count of red circles is 1, not 2"]),
        ("a large red circle and a blue square", ["no large red circle"]),
        ("a red circle is to the right of a blue square", ["red circle is not to the right of blue square"]),
        ("a red circle is above a blue square", ["red circle is not above blue square"]),
        ("a red circle, a blue square and a yellow diamond", ["no yellow diamond"]),
    ],
)
def test_checker_reports_false_facts(caption, expected):
    verdict = check_caption(caption, TWO_THINGS)
    assert verdict.parsed and not verdict.correct
    assert verdict.false_facts == expected


def test_checker_reports_missing_objects():
    verdict = check_caption("there is a blue square", TWO_THINGS)
    assert verdict.parsed and verdict.false_facts == [] and verdict.missing == ["small red circle"]
    assert not verdict.correct
    two_circles = scene_of(RED_CIRCLE, ShapeObject("circle", "red", "large", 40.0, 12.0, 9.0))
    assert check_caption("two red circles", two_circles).correct
    assert check_caption("a large red circle", two_circles).missing == ["small red circle"]
    assert check_caption("a red circle", two_circles).missing in (["small red circle"], ["large red circle"])


@pytest.mark.parametrize(
    "caption",
    [
        "",
        "red circle",
        "a red",
        "a red circle blue square",
        "there is two red circles",
        "there are a red circle",
        "a orange circle",
        "an red circle",
        "a red circles",
        "two red circle",
        "a red circle is a blue square",
        "a red circle and",
        "a red circle is near a blue square",
        "a red circle and a blue square a green cross",
        "the red circle <unk> and a blue square",
    ],
)
def test_checker_rejects_unparseable_text(caption):
    verdict = check_caption(caption, TWO_THINGS)
    assert not verdict.parsed and not verdict.correct and verdict.error


def test_parse_structure():
    parsed = parse_caption("a small red circle is below an orange cross and there are two blue squares")
    assert [(p.count, p.size, p.colour, p.shape) for p in parsed.phrases] == [
        (1, "small", "red", "circle"),
        (1, None, "orange", "cross"),
        (2, None, "blue", "square"),
    ]
    assert parsed.relation == (0, "below", 1)


def test_grounded_accuracy():
    captions = ["a red circle and a blue square", "a blue square", "nonsense"]
    assert grounded_accuracy(captions, [TWO_THINGS] * 3) == pytest.approx(1 / 3)
    with pytest.raises(ValueError):
        grounded_accuracy(captions, [TWO_THINGS])
