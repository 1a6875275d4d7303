"""The one resize from any image to the model's square input, shared by the Captioner (every
upload) and the training data (training.datasets.shapes_wide), so both see the same pixels."""

from __future__ import annotations

from PIL import Image


def resize_to_input(image: Image.Image, size: int) -> Image.Image:
    """Squeezes (no crop, no padding) any RGB image to size x size, bilinear with a box pre-reduce."""
    if image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.BILINEAR, reducing_gap=3.0)
    return image
