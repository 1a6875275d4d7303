"""Load any dataset by name, as a list of `CaptionedImage`.

    load_dataset("coco", "val", annotations_file="annotations/captions_val2014.json",
                 images_dir="val2014")
    load_dataset("karpathy", "test", split_file="dataset_coco.json", images_root="coco")
    load_dataset("flickr8k", "val", text_dir="Flickr8k_text", images_dir="Flicker8k_Dataset")
    load_dataset("list", "train", list_file="my_captions.jsonl", limit=100)

Names and the options each loader takes (besides `split` and `limit`):

    "coco"      annotations_file  a captions_<split>2014.json style file (COCO files are per split,
                                  so the file is taken to be `split`)
                images_dir        the folder holding its images
    "karpathy"  split_file        dataset_coco.json / dataset_flickr8k.json / dataset_flickr30k.json
                images_root       the folder "filepath"/"filename" are relative to
                restval_as_train  True (default): "restval" images count as "train";
                                  False: they are in no split
    "flickr8k"  text_dir          the folder with Flickr8k.token.txt and Flickr_8k.*Images.txt
                                  ("dev" is the "val" split)
                images_dir        the folder holding the .jpg files
    "shapes"    image_size, max_objects   the embedded generated dataset (no files needed)
    "shapes_wide"  variation, max_objects, resize_to   the same grammar drawn wide (any background,
                                  64-640 px, JPEG, ...; training/datasets/shapes_wide.py);
                                  `variation=NAME` gives a wild evaluation set; `first=N`
                                  starts at example N (past 24000: images no run trained on);
                                  `small_corner=SHARE` draws that share of the train split
                                  from the small-object corner (validation and test: never);
                                  `jpeg_quality=LOW-HIGH` draws JPEG qualities from that range
    "list"      list_file         a .jsonl/.ndjson or .csv caption list; without a split column
                                  the whole file is `split`

`split` is one of "train", "val", "test"; `limit` keeps the first `limit` usable records. Each
module's docstring shows its file format. Malformed files raise `DatasetFormatError` naming the file
and line (or JSON key path); images with no captions or a missing file are skipped with a warning.

To add a dataset, add an entry to LOADERS: a function taking `split` and `limit` as keyword
arguments, plus its own options, and returning list[CaptionedImage].
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from training.datasets.base import CaptionedImage
from training.datasets.caption_list import load_caption_list
from training.datasets.coco import load_coco
from training.datasets.errors import DatasetFormatError, DatasetOptionError
from training.datasets.flickr8k import load_flickr8k
from training.datasets.karpathy import load_karpathy
from training.datasets.shapes import load_split as _load_shapes_split
from training.datasets.shapes_wide import load_wide_split

__all__ = ["LOADERS", "DatasetFormatError", "DatasetOptionError", "load_dataset"]

DatasetLoader = Callable[..., list[CaptionedImage]]


def load_shapes(
    split: str, *, limit: int | None = None, image_size: int | str = 64, max_objects: int | str = 3
) -> list[CaptionedImage]:
    """The embedded shapes dataset (options may arrive as strings from the command line)."""
    return _load_shapes_split(split, size=limit, image_size=int(image_size), max_objects=int(max_objects))


def load_shapes_wide(
    split: str,
    *,
    limit: int | None = None,
    variation: str | None = None,
    max_objects: int | str = 3,
    resize_to: int | str | None = None,
    first: int | str = 0,
    small_corner: float | str = 0.0,
    jpeg_quality: str | tuple[int, int] | None = None,
) -> list[CaptionedImage]:
    """The wide-domain shapes dataset; training passes resize_to=<model input size> itself.
    `jpeg_quality` comes as "LOW-HIGH" from the command line."""
    if isinstance(jpeg_quality, str):
        try:
            low, high = (int(part) for part in jpeg_quality.split("-"))
        except ValueError:
            raise DatasetOptionError(f"jpeg_quality is LOW-HIGH (e.g. 15-95), not {jpeg_quality!r}") from None
        jpeg_quality = (low, high)
    return load_wide_split(
        split,
        size=limit,
        variation=variation or None,
        max_objects=int(max_objects),
        resize_to=int(resize_to) if resize_to else None,
        first=int(first),
        small_corner=float(small_corner),
        jpeg_quality=jpeg_quality,
    )


# Loaders that can store images at the model's input size; `train` asks them to (resize_to).
RESIZING_LOADERS = ("shapes_wide",)
# Loaders that draw their images, each split from its own seeds: their splits never share an image.
GENERATED_LOADERS = ("shapes", "shapes_wide")

LOADERS: dict[str, DatasetLoader] = {
    "shapes": load_shapes,
    "shapes_wide": load_shapes_wide,
    "coco": load_coco,
    "karpathy": load_karpathy,
    "flickr8k": load_flickr8k,
    "list": load_caption_list,
}


def load_dataset(name: str, split: str, *, limit: int | None = None, **options: Any) -> list[CaptionedImage]:
    """Load `split` of the dataset called `name`; `options` go to its loader (see above)."""
    loader = LOADERS.get(name)
    if loader is None:
        raise DatasetOptionError(f"unknown dataset {name!r}; known datasets: {', '.join(sorted(LOADERS))}")
    return loader(split=split, limit=limit, **checked_options(name, loader, options))


def checked_options(name: str, loader: DatasetLoader, options: dict[str, Any]) -> dict[str, Any]:
    """The options, checked against what the loader takes (a misspelt or missing one is named, not
    a TypeError), booleans and numbers read from the command line's text ("false" is not true)."""
    takes = {key: p for key, p in inspect.signature(loader).parameters.items() if key not in ("split", "limit")}
    unknown = [key for key in options if key not in takes]
    needed = [key for key, p in takes.items() if p.default is inspect.Parameter.empty and key not in options]
    if unknown or needed:
        problems = [f"unknown option(s) {', '.join(unknown)}"] if unknown else []
        problems += [f"missing {', '.join(needed)}"] if needed else []
        raise DatasetOptionError(
            f"dataset {name!r}: {'; '.join(problems)} (it takes --data {', '.join(f'{key}=...' for key in takes)};"
            " the number of images is --train-limit / --val-limit)"
        )
    return {key: _typed(name, key, value, takes[key].default) for key, value in options.items()}


def _typed(name: str, key: str, value: Any, default: Any) -> Any:
    """A command-line string as the type of the option's default (bool, int); other values as given."""
    if not isinstance(value, str):
        return value
    if isinstance(default, bool):
        try:
            return read_boolean(value.strip())
        except ValueError:
            raise DatasetOptionError(f"dataset {name!r}: {key}={value!r} is not true or false") from None
    if isinstance(default, int):
        try:
            return int(value)
        except ValueError:
            raise DatasetOptionError(f"dataset {name!r}: {key}={value!r} is not a whole number") from None
    return value


def read_boolean(text: str) -> bool:
    """The command line's words for true and false (also --flags of TrainConfig); ValueError otherwise."""
    if text.lower() in ("true", "1", "yes", "on"):
        return True
    if text.lower() in ("false", "0", "no", "off"):
        return False
    raise ValueError(f"expected true or false, not {text!r}")
