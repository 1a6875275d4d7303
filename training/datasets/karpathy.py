"""Karpathy splits: `dataset_coco.json`, `dataset_flickr8k.json` or `dataset_flickr30k.json`.

    {
      "dataset": "coco",
      "images": [
        {
          "filepath": "val2014",                      # COCO only; absent for Flickr
          "filename": "COCO_val2014_000000391895.jpg",
          "split": "test",                            # train, restval, val or test
          "sentences": [{"raw": "A man riding a bike.", "tokens": ["a", "man", ...]}, ...],
          "imgid": 0,
          "cocoid": 391895                            # COCO only
        },
        ...
      ]
    }

The image is `images_root / filepath / filename` (`images_root / filename` without "filepath"), so
for COCO `images_root` is the folder holding `train2014/` and `val2014/`, and for Flickr it is the
image folder itself. Captions are the "raw" sentences, in order; "tokens" are ignored.

`image_id` is the COCO id as text when "cocoid" is present (matching the COCO loader), else the
file name without its extension (matching the Flickr8k loader).

"restval" (COCO val2014 images that Karpathy kept out of val and test) counts as "train", as in
the usual setup; pass `restval_as_train=False` to leave those images out of every split.
"""

from __future__ import annotations

import os
from pathlib import Path

from training.datasets.base import CaptionedImage
from training.datasets.errors import (
    DatasetFormatError,
    ImageCandidate,
    check_limit,
    check_split,
    json_field,
    read_json,
    usable_records,
)

KARPATHY_SPLITS = ("train", "restval", "val", "test")


def load_karpathy(
    split_file: str | os.PathLike,
    images_root: str | os.PathLike,
    split: str,
    *,
    restval_as_train: bool = True,
    limit: int | None = None,
) -> list[CaptionedImage]:
    """Load one split of a Karpathy split file.

    split_file: e.g. `dataset_coco.json`.
    images_root: the folder that "filepath"/"filename" are relative to.
    split: "train", "val" or "test".
    restval_as_train: include "restval" images in "train" (default) or in no split.
    limit: at most this many records (the first usable ones, in file order).
    """
    check_split(split)
    check_limit(limit)
    split_file = Path(split_file)
    images_root = Path(images_root)
    wanted_splits = {split}
    if split == "train" and restval_as_train:
        wanted_splits.add("restval")

    data = read_json(split_file)
    images = json_field(data, "images", list, split_file)
    candidates: list[ImageCandidate] = []
    seen_ids: set[str] = set()
    for index, image in enumerate(images):
        # Every entry is checked, whatever its split, so a malformed file fails for every split.
        where = f"images[{index}]"
        filename = json_field(image, "filename", str, split_file, where)
        filepath = json_field(image, "filepath", str, split_file, where, required=False)
        cocoid = json_field(image, "cocoid", (int, str), split_file, where, required=False)
        image_split = json_field(image, "split", str, split_file, where)
        if image_split not in KARPATHY_SPLITS:
            raise DatasetFormatError(
                f"{split_file}: {where}.split: {image_split!r} is not one of {', '.join(KARPATHY_SPLITS)}"
            )
        sentences = json_field(image, "sentences", list, split_file, where)
        captions = [
            json_field(sentence, "raw", str, split_file, f"{where}.sentences[{number}]")
            for number, sentence in enumerate(sentences)
        ]
        image_id = str(cocoid) if cocoid is not None else Path(filename).stem
        if image_id in seen_ids:
            raise DatasetFormatError(f"{split_file}: {where}: duplicate image {image_id!r}")
        seen_ids.add(image_id)
        if image_split in wanted_splits:
            folder = images_root / filepath if filepath else images_root
            candidates.append(ImageCandidate(image_id, folder / filename, captions))

    return usable_records(candidates, split, limit=limit, source=f"karpathy {split_file.name}")
