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

    def __post_init__(self) -> None:
        if (self.path is None) == (self.pixels is None):
            raise ValueError(f"{self.image_id}: exactly one of path and pixels must be given")
