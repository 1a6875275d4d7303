"""The one record type every dataset loader returns.

A dataset is a list of `CaptionedImage`: an image (a file on disk, or pixels held in memory for the
generated shapes dataset) with its reference captions and the split it belongs to.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

SPLITS = ("train", "val", "test")


@dataclass
class CaptionedImage:
    image_id: str
    captions: list[str]
    split: str = "train"
    path: str | None = None  # an image file on disk (COCO, Flickr8k, ...)
    pixels: np.ndarray | None = None  # uint8 [H, W, 3] held in memory (generated datasets)
    scene: Any = field(default=None, repr=False)  # ground truth for the shapes checker
    # With pixels: the file a user would upload for them, when it is compressed (a JPEG of the
    # generated picture). The model's input is read from it, as the service reads an upload: a
    # JPEG upload is decoded at reduced scale, which gives other pixels than resizing `pixels`.
    encoded: bytes | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if (self.path is None) == (self.pixels is None):
            raise ValueError(f"{self.image_id}: exactly one of path and pixels must be given")
        if self.encoded is not None and self.pixels is None:
            raise ValueError(f"{self.image_id}: encoded goes with the pixels it decodes to")
