"""The feature probe (training/probe.py): the window it reads for each object, and the command."""

import json

import numpy as np

from captioning.scenes import COLOURS, SHAPES, Scene, ShapeObject
from training.__main__ import main
from training.probe import fit_probe, object_windows


def test_each_object_reads_the_window_around_its_cell_with_zeros_beyond_the_edge():
    grid, depth = 4, 2
    features = np.arange(grid * grid * depth, dtype=np.float32).reshape(1, grid * grid, depth) + 1
    cells = features.reshape(grid, grid, depth)
    # a 40x80 (width x height) frame: an object at x=15 (column 1 of 4), y=75 (row 3, the last)
    corner = ShapeObject("cross", "purple", "small", cx=15.0, cy=75.0, extent=3.0)
    centre = ShapeObject("circle", "red", "large", cx=25.0, cy=30.0, extent=5.0)  # column 2, row 1
    scene = Scene(40, (corner, centre), "", width=40, height=80)

    windows, shapes, colours, scene_of = object_windows(features, [scene])

    assert windows.shape == (2, 9 * depth)
    corner_window = windows[0].reshape(3, 3, depth)
    np.testing.assert_array_equal(corner_window[:2], cells[2:4, 0:3])  # rows 2-3, columns 0-2
    np.testing.assert_array_equal(corner_window[2], 0)  # below the last row: padding
    np.testing.assert_array_equal(windows[1].reshape(3, 3, depth), cells[0:3, 1:4])
    assert shapes.tolist() == [SHAPES.index("cross"), SHAPES.index("circle")]
    assert colours.tolist() == [COLOURS.index("purple"), COLOURS.index("red")]
    assert scene_of.tolist() == [0, 0]


def test_the_probe_learns_what_the_windows_say():
    rng = np.random.default_rng(0)
    shapes = rng.integers(len(SHAPES), size=600)
    colours = rng.integers(len(COLOURS), size=600)
    windows = rng.normal(0.0, 0.3, size=(600, 40)).astype(np.float32)
    windows[np.arange(600), shapes] += 2.0  # the shape in the first five values, the colour in the next six
    windows[np.arange(600), len(SHAPES) + colours] += 2.0

    shape_logits, colour_logits = fit_probe(windows, shapes, colours, epochs=20).predict(windows, verbose=0)

    assert (shape_logits.argmax(1) == shapes).mean() > 0.98
    assert (colour_logits.argmax(1) == colours).mean() > 0.98


def test_the_command_scores_the_probe_beside_the_captioner(tiny_bundle, tmp_path):
    output = tmp_path / "probe.json"
    flags = ["--train", "24", "--test-images", "6", "--per-variation", "5", "--variations", "tiny_objects"]
    command = ["probe-features", "--artifacts", str(tiny_bundle), *flags, "--epochs", "1", "--output", str(output)]
    assert main(command) == 0

    report = json.loads(output.read_text())
    assert set(report) == {"artifacts", "probe_trained_on", "test", "tiny_objects"}
    for name, images in (("test", 6), ("tiny_objects", 5)):
        row = report[name]
        assert row["images"] == images and images <= row["objects"] <= 3 * images
        for key in ("probe_shape", "probe_colour", "probe_scenes_read", "captioner"):
            assert 0.0 <= row[key] <= 1.0
        assert row["captioner_wrong"] == round(images * (1 - row["captioner"]))
        assert 0 <= row["captioner_wrong_probe_misreads"] <= row["captioner_wrong"]
