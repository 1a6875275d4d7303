"""A plain list of captioned images: JSON Lines (`.jsonl`, `.ndjson`) or CSV (`.csv`).

    captions.jsonl                                   one JSON object per line
        {"image": "images/dog.jpg", "caption": "A dog runs on the grass."}
        {"image": "images/dog.jpg", "caption": "A brown dog outside."}
        {"image": "images/cat.png", "captions": ["A cat sleeps.", "A cat on a sofa."]}

    captions.csv                                     a header row, then one caption per row
        image,caption
        images/dog.jpg,A dog runs on the grass.
        images/dog.jpg,"A brown dog, outside."

Each JSON line has "image" and either "caption" (a string) or "captions" (a list of strings); a CSV
file has the columns "image" and "caption" (extra columns are ignored). Lines or rows for the same
image merge into one record, captions in file order; records come in the order each image first
appears. Relative image paths resolve against the list file's folder; `image_id` is the image path
as first written in the file. Blank lines are skipped.

Splits: without a "split" key/column the file *is* the split the caller asks for, so every record
is returned whatever `split` is. With one, every line or row must name its split ("train", "val" or
"test"), all lines of an image must agree, and only the records of the requested split are
returned. A file where only some lines give a split is rejected, since the others would silently
land in every split.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from training.datasets.base import SPLITS, CaptionedImage
from training.datasets.errors import (
    DatasetFormatError,
    ImageCandidate,
    check_limit,
    check_split,
    text_file,
    usable_records,
)

JSONL_SUFFIXES = (".jsonl", ".ndjson")
CSV_SUFFIXES = (".csv",)
REQUIRED_CSV_COLUMNS = ("image", "caption")


@dataclass
class _ListEntry:
    """One line (JSONL) or row (CSV) of a list file."""

    line_number: int
    image: str
    captions: list[str]
    split: str | None


def load_caption_list(
    list_file: str | os.PathLike,
    split: str,
    *,
    limit: int | None = None,
) -> list[CaptionedImage]:
    """Load a JSONL or CSV caption list (chosen by the file's suffix).

    list_file: the `.jsonl`/`.ndjson`/`.csv` file; relative image paths resolve against its folder.
    split: "train", "val" or "test"; selects records when the file has a split column, and is
        the split of every record when it does not.
    limit: at most this many records (the first usable ones, in file order).
    """
    check_split(split)
    check_limit(limit)
    list_file = Path(list_file)
    suffix = list_file.suffix.lower()
    if suffix in JSONL_SUFFIXES:
        entries = _read_jsonl(list_file)
    elif suffix in CSV_SUFFIXES:
        entries = _read_csv(list_file)
    else:
        known = ", ".join(JSONL_SUFFIXES + CSV_SUFFIXES)
        raise DatasetFormatError(f"{list_file}: unknown list format {suffix!r}; expected {known}")
    candidates = _merge_by_image(list_file, entries, split)
    return usable_records(candidates, split, limit=limit, source=f"list {list_file.name}")


def _merge_by_image(list_file: Path, entries: Iterator[_ListEntry], split: str) -> list[ImageCandidate]:
    base_dir = list_file.parent
    candidates: dict[Path, ImageCandidate] = {}
    split_of_image: dict[Path, str | None] = {}
    file_has_splits: bool | None = None
    for entry in entries:
        where = f"{list_file}:{entry.line_number}"
        if file_has_splits is None:
            file_has_splits = entry.split is not None
        elif file_has_splits and entry.split is None:
            raise DatasetFormatError(f"{where}: no split, but earlier lines give one")
        elif not file_has_splits and entry.split is not None:
            raise DatasetFormatError(f"{where}: gives a split, but earlier lines do not")
        if entry.split is not None and entry.split not in SPLITS:
            raise DatasetFormatError(f"{where}: unknown split {entry.split!r}; expected one of {', '.join(SPLITS)}")
        path = Path(os.path.normpath(base_dir / entry.image))
        if path not in candidates:
            candidates[path] = ImageCandidate(entry.image, path, captions=[])
            split_of_image[path] = entry.split
        elif split_of_image[path] != entry.split:
            raise DatasetFormatError(
                f"{where}: {entry.image!r} is in split {entry.split!r} here but "
                f"{split_of_image[path]!r} on an earlier line"
            )
        candidates[path].captions.extend(entry.captions)
    return [
        candidate
        for path, candidate in candidates.items()
        if split_of_image[path] is None or split_of_image[path] == split
    ]


def _read_jsonl(path: Path) -> Iterator[_ListEntry]:
    with text_file(path) as file:
        for line_number, line in enumerate(file, start=1):
            if not line.strip():
                continue
            where = f"{path}:{line_number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise DatasetFormatError(f"{where}: invalid JSON: {error.msg}") from None
            if not isinstance(record, dict):
                raise DatasetFormatError(f"{where}: expected a JSON object, got {line.strip()!r:.80}")
            yield _ListEntry(
                line_number,
                _jsonl_image(record, where),
                _jsonl_captions(record, where),
                _jsonl_split(record, where),
            )


def _jsonl_image(record: dict, where: str) -> str:
    image = record.get("image")
    if not isinstance(image, str) or not image.strip():
        raise DatasetFormatError(f'{where}: "image" must be a non-empty string, got {image!r:.60}')
    return image.strip()


def _jsonl_captions(record: dict, where: str) -> list[str]:
    if ("caption" in record) == ("captions" in record):
        raise DatasetFormatError(f'{where}: expected exactly one of "caption" and "captions"')
    if "caption" in record:
        caption = record["caption"]
        if not isinstance(caption, str):
            raise DatasetFormatError(f'{where}: "caption" must be a string, got {caption!r:.60}')
        return [caption]
    captions = record["captions"]
    if not isinstance(captions, list) or not all(isinstance(c, str) for c in captions):
        raise DatasetFormatError(f'{where}: "captions" must be a list of strings, got {captions!r:.60}')
    return captions


def _jsonl_split(record: dict, where: str) -> str | None:
    split = record.get("split")
    if split is not None and not isinstance(split, str):
        raise DatasetFormatError(f'{where}: "split" must be a string, got {split!r:.60}')
    return split


def _read_csv(path: Path) -> Iterator[_ListEntry]:
    with text_file(path, newline="") as file:
        reader = csv.DictReader(file)
        if reader.fieldnames is None:
            raise DatasetFormatError(f"{path}:1: empty file, expected a header row")
        # "Image", " caption ": header names as spreadsheets write them
        columns = reader.fieldnames = [column.strip().lower() for column in reader.fieldnames]
        absent = [column for column in REQUIRED_CSV_COLUMNS if column not in columns]
        if absent:
            hint = "; the fields seem separated by ';' (save as comma-separated)" if ";" in ",".join(columns) else ""
            raise DatasetFormatError(
                f"{path}:1: header lacks column(s) {', '.join(absent)}; got {', '.join(columns)}{hint}"
            )
        has_split_column = "split" in columns
        try:
            for row in reader:
                where = f"{path}:{reader.line_num}"
                if None in row:  # DictReader files surplus fields under the key None
                    raise DatasetFormatError(
                        f"{where}: expected {len(columns)} fields, got "
                        f"{len(columns) + len(row[None])} (quote captions that contain commas)"
                    )
                if None in row.values():  # and fills absent fields with None
                    raise DatasetFormatError(f"{where}: expected {len(columns)} fields, got fewer")
                image = row["image"].strip()
                if not image:
                    raise DatasetFormatError(f"{where}: empty image cell")
                split = row["split"].strip() if has_split_column else None
                if has_split_column and not split:
                    raise DatasetFormatError(f"{where}: empty split cell")
                yield _ListEntry(reader.line_num, image, [row["caption"]], split)
        except csv.Error as error:
            raise DatasetFormatError(f"{path}:{reader.line_num}: {error}") from None
