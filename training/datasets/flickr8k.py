"""Flickr8k: the caption file and split lists of `Flickr8k_text/`, plus the image folder.

    Flickr8k_text/Flickr8k.token.txt          one caption per line, five per image:
        1000268201_693b08cb0e.jpg#0<TAB>A child in a pink dress is climbing up a set of stairs .
        1000268201_693b08cb0e.jpg#1<TAB>A girl going into a wooden building .
    Flickr8k_text/Flickr_8k.trainImages.txt   one image file name per line: the "train" split
    Flickr8k_text/Flickr_8k.devImages.txt     the "val" split
    Flickr8k_text/Flickr_8k.testImages.txt    the "test" split
    Flicker8k_Dataset/1000268201_693b08cb0e.jpg   (the official archive spells it "Flicker")

Records come in the order of the split list; each record's captions come in the order of the
caption file. `image_id` is the file name without its extension. Caption lines for images in no
split list (the official file has one, "2258277193_586949ec62.jpg.1#0") are ignored.
"""

from __future__ import annotations

import os
import re
from collections import defaultdict
from pathlib import Path

from training.datasets.base import CaptionedImage
from training.datasets.errors import (
    DatasetFormatError,
    ImageCandidate,
    check_limit,
    check_split,
    text_file,
    usable_records,
)

CAPTIONS_FILE = "Flickr8k.token.txt"
SPLIT_LIST_FILES = {
    "train": "Flickr_8k.trainImages.txt",
    "val": "Flickr_8k.devImages.txt",
    "test": "Flickr_8k.testImages.txt",
}

_CAPTION_KEY = re.compile(r"(?P<image>.+)#(?P<number>\d+)")


def load_flickr8k(
    text_dir: str | os.PathLike,
    images_dir: str | os.PathLike,
    split: str,
    *,
    limit: int | None = None,
) -> list[CaptionedImage]:
    """Load one Flickr8k split.

    text_dir: the folder holding `Flickr8k.token.txt` and the three `Flickr_8k.*Images.txt` lists.
    images_dir: the folder holding the `.jpg` files.
    split: "train", "val" (the "dev" list) or "test".
    limit: at most this many records (the first usable ones, in split-list order).
    """
    check_split(split)
    check_limit(limit)
    text_dir = Path(text_dir)
    images_dir = Path(images_dir)
    captions_by_image = _read_captions(text_dir / CAPTIONS_FILE)
    candidates = [
        ImageCandidate(Path(name).stem, images_dir / name, captions_by_image.get(name, []))
        for name in _read_split_list(text_dir / SPLIT_LIST_FILES[split])
    ]
    return usable_records(candidates, split, limit=limit, source=f"flickr8k {text_dir}")


def _read_captions(path: Path) -> dict[str, list[str]]:
    captions_by_image: dict[str, list[str]] = defaultdict(list)
    with text_file(path) as file:
        for line_number, line in enumerate(file, start=1):
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            key, tab, caption = line.partition("\t")
            match = _CAPTION_KEY.fullmatch(key.strip())
            if not tab or match is None:
                raise DatasetFormatError(
                    f'{path}:{line_number}: expected "<image>#<n><TAB><caption>", got {line!r:.80}'
                )
            captions_by_image[match["image"]].append(caption)
    return captions_by_image


def _read_split_list(path: Path) -> list[str]:
    names: list[str] = []
    seen: set[str] = set()
    with text_file(path) as file:
        for line_number, line in enumerate(file, start=1):
            name = line.strip()
            if not name:
                continue
            if "\t" in name or "#" in name:
                raise DatasetFormatError(f"{path}:{line_number}: expected one image file name, got {name!r:.80}")
            if name in seen:
                raise DatasetFormatError(f"{path}:{line_number}: {name!r} is listed twice")
            seen.add(name)
            names.append(name)
    return names
