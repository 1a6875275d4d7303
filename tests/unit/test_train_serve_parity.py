"""Training, evaluation and the CLI read an image file into exactly the pixels the service makes of
the same bytes uploaded (captioning.preprocess is the one path): no train/serve skew for files made
by other programs: EXIF-rotated photos, transparency, 16-bit PNG, CMYK, large JPEGs (draft
decoding) and large PNGs (early box reduction)."""

from __future__ import annotations

import io
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from app.images import decode_upload
from captioning.preprocess import load_image_file, model_input
from training.data import image_source
from training.datasets.base import CaptionedImage
from training.evaluate import record_input

SIZE = 96


def _saved(image: Image.Image, format: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format, **options)
    return buffer.getvalue()


def _left_red(width: int, height: int, mode: str = "RGB") -> Image.Image:
    image = Image.new("RGB", (width, height), (30, 60, 200))
    image.paste((220, 30, 30), (0, 0, width // 3, height))
    return image.convert(mode)


def _exif_rotated() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 clockwise to display": a phone held upright
    return _saved(_left_red(160, 120), "JPEG", quality=90, exif=exif)


def _hidden_black_rgba() -> bytes:
    pixels = np.zeros((80, 80, 4), np.uint8)  # black where transparent, as many editors save it
    pixels[20:60, 20:60] = (220, 30, 30, 255)
    return _saved(Image.fromarray(pixels, "RGBA"), "PNG")


def _grey_16_bit() -> bytes:
    ramp = np.tile(np.linspace(0, 65535, 100, dtype=np.uint16), (60, 1))
    return _saved(Image.fromarray(ramp), "PNG")  # mode I;16


def _palette_with_transparency() -> bytes:
    image = _left_red(90, 70).convert("P", palette=Image.Palette.ADAPTIVE, colors=4)
    return _saved(image, "PNG", transparency=0)


FILES = {
    "exif-rotated.jpg": _exif_rotated,
    "hidden-black-rgba.png": _hidden_black_rgba,
    "grey-16-bit.png": _grey_16_bit,
    "palette-transparency.png": _palette_with_transparency,
    "cmyk.jpg": lambda: _saved(_left_red(120, 100, "CMYK"), "JPEG", quality=90),
    "large.jpg": lambda: _saved(_left_red(1000, 800), "JPEG", quality=85),  # draft-decoded at 1/4
    "large.png": lambda: _saved(_left_red(900, 700), "PNG"),  # box-reduced before the resize
    "progressive.jpg": lambda: _saved(_left_red(300, 200), "JPEG", quality=80, progressive=True),
}


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("user-images")
    paths = {}
    for name, make in FILES.items():
        paths[name] = folder / name
        paths[name].write_bytes(make())
    return paths


def served(path: Path) -> np.ndarray:
    decoded = decode_upload(path.read_bytes(), max_pixels=40_000_000, min_side=8, draft_size=SIZE)
    return model_input(decoded.image, SIZE)  # what Captioner.prepare does with it


@pytest.mark.parametrize("name", list(FILES))
def test_training_evaluation_and_the_cli_see_the_service_pixels(files, name):
    path = files[name]
    record = CaptionedImage("x", ["a caption"], "train", path=str(path))
    expected = served(path)
    trained = next(iter(image_source([record], SIZE))).numpy()
    evaluated = record_input(SimpleNamespace(config=SimpleNamespace(image_size=SIZE)), record)
    from_cli = load_image_file(path, SIZE, Image.MAX_IMAGE_PIXELS)
    for pixels in (trained, evaluated, from_cli):
        np.testing.assert_array_equal(pixels, expected)


def test_the_shared_path_is_upright_and_composites_on_white(files):
    upright = served(files["exif-rotated.jpg"])  # the red third was on the left; displayed, it is on top
    assert upright[5, SIZE // 2, 0] > 150 and upright[-5, SIZE // 2, 2] > 150
    composited = served(files["hidden-black-rgba.png"])
    assert composited[2, 2].tolist() == [255, 255, 255]  # not the hidden black
    grey = served(files["grey-16-bit.png"])
    assert grey[:, -1].min() > 240  # 16-bit white rescaled, not clipped


def test_an_unreadable_file_is_named(tmp_path):
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(_saved(_left_red(200, 200), "JPEG")[:400])
    with pytest.raises(ValueError, match="cut.jpg: not a readable image"):
        load_image_file(cut, SIZE, Image.MAX_IMAGE_PIXELS)


def test_a_generated_jpeg_picture_is_read_as_its_upload_would_be():
    """The wide renderer's JPEG pictures reach the model as the service reads their file (JPEG
    decoded at reduced scale), in training data and in evaluation alike, not as a resize of their
    full-size decode, which gives other pixels."""
    import dataclasses

    from training.datasets import shapes_wide

    settings = dataclasses.replace(shapes_wide.TRAINING, long_side=(400, 640), jpeg_probability=1.0)
    scene = shapes_wide.generate_wide_scene(np.random.default_rng(5), settings)
    pixels, encoded = shapes_wide.render_wide(scene, np.random.default_rng(6), settings)
    expected = model_input(decode_upload(encoded, max_pixels=40_000_000, min_side=8, draft_size=SIZE).image, SIZE)
    assert not np.array_equal(model_input(Image.fromarray(pixels), SIZE), expected)  # the two differ here

    record = CaptionedImage("x", ["a caption"], "test", pixels=pixels, encoded=encoded)
    evaluated = record_input(SimpleNamespace(config=SimpleNamespace(image_size=SIZE)), record)
    trained = shapes_wide.resize_for_model(pixels, encoded, SIZE)
    for model_pixels in (evaluated, trained):
        np.testing.assert_array_equal(model_pixels, expected)


def test_generated_jpeg_examples_carry_their_file_until_stored_at_the_model_size():
    from training.datasets.shapes_wide import make_wide_example

    drawn = make_wide_example("test", 0, variation="jpeg")
    stored = make_wide_example("test", 0, variation="jpeg", resize_to=SIZE)
    assert drawn.encoded is not None and drawn.encoded[:2] == b"\xff\xd8"
    assert stored.encoded is None and stored.pixels.shape == (SIZE, SIZE, 3)
    evaluated = record_input(SimpleNamespace(config=SimpleNamespace(image_size=SIZE)), drawn)
    np.testing.assert_array_equal(evaluated, stored.pixels)
