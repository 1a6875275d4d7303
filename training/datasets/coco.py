"""COCO captions: one annotations JSON per split, plus the folder holding that split's images.

    annotations/captions_val2014.json
        {
          "images": [{"id": 391895, "file_name": "COCO_val2014_000000391895.jpg", ...}, ...],
          "annotations": [
            {"image_id": 391895, "id": 770337, "caption": "A man riding a bike."}, ...
          ],
          ...
        }
    val2014/COCO_val2014_000000391895.jpg

COCO files are per split, so the caller says which split the file is. Records come in the order of
"images"; each record's captions come in the order of "annotations"; `image_id` is the COCO id as
text and `path` is `images_dir / file_name`. Other keys ("info", "licenses", image sizes, ...) are
ignored.
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


def load_coco(
    annotations_file: str | os.PathLike,
    images_dir: str | os.PathLike,
    split: str,
    *,
    limit: int | None = None,
) -> list[CaptionedImage]:
    """Load a COCO captions file as `split`.

    annotations_file: e.g. `annotations/captions_val2014.json`.
    images_dir: the folder holding the file's images, e.g. `val2014/`.
    split: the split these records belong to ("train", "val" or "test").
    limit: at most this many records (the first usable ones, in file order).
    """
    check_split(split)
    check_limit(limit)
    annotations_file = Path(annotations_file)
    images_dir = Path(images_dir)
    data = read_json(annotations_file)
    images = json_field(data, "images", list, annotations_file)
    annotations = json_field(data, "annotations", list, annotations_file)

    candidates: dict[str, ImageCandidate] = {}
    for index, image in enumerate(images):
        where = f"images[{index}]"
        raw_id = json_field(image, "id", (int, str), annotations_file, where)
        coco_id = str(raw_id)  # 7 and "7" are one id (files written by other tools mix them)
        file_name = json_field(image, "file_name", str, annotations_file, where)
        if coco_id in candidates:
            raise DatasetFormatError(f"{annotations_file}: {where}.id: duplicate id {raw_id!r}")
        candidates[coco_id] = ImageCandidate(coco_id, images_dir / file_name, captions=[])

    for index, annotation in enumerate(annotations):
        where = f"annotations[{index}]"
        raw_id = json_field(annotation, "image_id", (int, str), annotations_file, where)
        coco_id = str(raw_id)
        caption = json_field(annotation, "caption", str, annotations_file, where)
        if coco_id not in candidates:
            raise DatasetFormatError(f"{annotations_file}: {where}.image_id: {raw_id!r} is not the id of any image")
        candidates[coco_id].captions.append(caption)

    return usable_records(candidates.values(), split, limit=limit, source=f"coco {annotations_file.name}")
