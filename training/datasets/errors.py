"""Bad data in dataset files, handled the same way by every loader.

Malformed input (a line that does not parse, a field that is missing or of the wrong type) means
the file must be fixed, so it raises `DatasetFormatError`, whose message names the file and the
line number (text files) or the record's key path (JSON files), e.g.

    data/Flickr8k.token.txt:17: expected "<image>#<n><TAB><caption>"
    data/dataset_coco.json: images[4].sentences[0].raw: missing

Well-formed records that cannot be used are normal in real datasets (a partial image download,
captions that are all blank), so `usable_records` skips them and logs one warning line per kind of
problem, with the count and a few examples.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from PIL import Image

from captioning.preprocess import DECODE_ERRORS, PILLOW_FORMATS
from captioning.tokenizer import standardize
from training.datasets.base import SPLITS, CaptionedImage

logger = logging.getLogger("training.datasets")

EXAMPLES_PER_WARNING = 3

_TYPE_NAMES = {str: "a string", int: "an integer", list: "a list", dict: "an object"}


class DatasetFormatError(ValueError):
    """A dataset file is malformed; the message names the file and the line or key path."""


class DatasetOptionError(ValueError):
    """A dataset named or configured wrongly (unknown name, misspelt or missing option)."""


def check_split(split: str) -> None:
    """Reject a split the project does not know (a caller error, not a data error)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of: {', '.join(SPLITS)}")


def check_limit(limit: int | None) -> None:
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be None or >= 0, got {limit}")


@contextlib.contextmanager
def text_file(path: Path, **options) -> Iterator[TextIO]:
    """A dataset's text file opened as UTF-8 (a byte-order mark, as Notepad, PowerShell and
    spreadsheets write, is skipped); text in another encoding is a DatasetFormatError naming the file."""
    with open(path, encoding="utf-8-sig", **options) as file:
        try:
            yield file
        except UnicodeDecodeError:
            raise DatasetFormatError(f"{path}: {_not_utf8(path)}") from None


def _not_utf8(path: Path) -> str:
    with open(path, "rb") as file:
        head = file.read(2)
    if head in (b"\xff\xfe", b"\xfe\xff"):
        return "UTF-16 text (what Excel saves as 'Unicode Text'): save it as UTF-8"
    return "not UTF-8 text (perhaps Latin-1 or Windows-1252): save it as UTF-8"


def read_json(path: Path) -> Any:
    """Parse a JSON file, turning decode errors into `DatasetFormatError` with the line number."""
    try:
        with open(path, encoding="utf-8-sig") as file:  # a byte-order mark, as some editors write
            return json.load(file)
    except json.JSONDecodeError as error:
        raise DatasetFormatError(f"{path}:{error.lineno}: invalid JSON: {error.msg} (column {error.colno})") from None
    except UnicodeDecodeError:
        raise DatasetFormatError(f"{path}: {_not_utf8(path)}") from None


def json_field(
    record: Any,
    key: str,
    expected: type | tuple[type, ...],
    file: Path,
    where: str = "",
    *,
    required: bool = True,
) -> Any:
    """`record[key]`, checked to be present (unless not `required`) and of the `expected` type.

    `where` is the record's key path inside `file` (e.g. "annotations[12]"), used in errors.
    Returns None for an absent optional field.
    """
    if not isinstance(record, dict):
        raise DatasetFormatError(f"{file}: {where or 'top level'}: expected an object")
    key_path = f"{where}.{key}" if where else key
    if key not in record:
        if required:
            raise DatasetFormatError(f"{file}: {key_path}: missing")
        return None
    value = record[key]
    expected_types = expected if isinstance(expected, tuple) else (expected,)
    is_bool_posing_as_int = isinstance(value, bool) and bool not in expected_types
    if not isinstance(value, expected_types) or is_bool_posing_as_int:
        wanted = " or ".join(_TYPE_NAMES.get(t, t.__name__) for t in expected_types)
        raise DatasetFormatError(f"{file}: {key_path}: expected {wanted}, got {value!r:.60}")
    return value


@dataclass
class ImageCandidate:
    """An image a dataset file lists, before the checks that decide whether it becomes a record."""

    image_id: str
    path: Path
    captions: list[str]


def usable_records(
    candidates: Iterable[ImageCandidate], split: str, *, limit: int | None, source: str
) -> list[CaptionedImage]:
    """Turn candidates into records, in order, stopping once `limit` records are collected.

    Captions are stripped, and blank ones or ones without a word (only punctuation) dropped; a
    candidate left with no caption, whose image file does not exist, or whose file is not an image
    Pillow can open (from its header: an empty file, a text file, a format Pillow lacks, more pixels
    than Pillow's decompression-bomb limit) is skipped. Each kind of skip is logged as one warning
    naming `source`, as are images whose file an earlier one uses (kept). A file whose header reads
    but whose pixels do not (cut short) stops training with its name when it is decoded. With a
    limit, only the candidates looked at before reaching it are checked and counted.
    """
    records: list[CaptionedImage] = []
    paths_seen: set[Path] = set()
    repeated_files: list[str] = []
    without_captions: list[str] = []
    missing_images: list[str] = []
    unreadable_images: list[str] = []
    examined = 0
    for candidate in candidates:
        if limit is not None and len(records) >= limit:
            break
        examined += 1
        # A caption of punctuation alone ('...', '?!') has no word: the model would learn <end>.
        captions = [caption.strip() for caption in candidate.captions if standardize(caption)]
        if not captions:
            without_captions.append(candidate.image_id)
        elif not candidate.path.is_file():
            missing_images.append(str(candidate.path))
        elif (problem := image_header_problem(candidate.path)) is not None:
            unreadable_images.append(f"{candidate.path} ({problem})")
        else:
            if candidate.path in paths_seen:
                repeated_files.append(f"{candidate.image_id} ({candidate.path})")
            paths_seen.add(candidate.path)
            records.append(
                CaptionedImage(
                    image_id=candidate.image_id,
                    captions=captions,
                    split=split,
                    path=str(candidate.path),
                )
            )
    _warn_skipped(source, split, examined, "with no caption that has a word in it", without_captions)
    _warn_skipped(source, split, examined, "whose image file is missing", missing_images)
    _warn_skipped(source, split, examined, "whose file is not a readable image", unreadable_images)
    if repeated_files:  # kept, since a dataset may mean it, but a split counts each such file twice
        logger.warning(
            "%s (%s): %d images use a file an earlier image of this split uses too (kept, each trained on as "
            "an image of its own), e.g. %s",
            source,
            split,
            len(repeated_files),
            ", ".join(repeated_files[:EXAMPLES_PER_WARNING]),
        )
    return records


def image_header_problem(path: Path) -> str | None:
    """Why the file cannot be an image the model reads, judged from its header alone (cheap:
    Pillow opens lazily); None when it looks fine."""
    try:
        with Image.open(path, formats=PILLOW_FORMATS) as image:
            if image.width * image.height > Image.MAX_IMAGE_PIXELS:
                return f"{image.width}x{image.height} is more than {Image.MAX_IMAGE_PIXELS} pixels"
    except (*DECODE_ERRORS, Image.DecompressionBombError) as exc:
        return str(exc).strip() or type(exc).__name__
    return None


def _warn_skipped(source: str, split: str, examined: int, reason: str, skipped: list[str]) -> None:
    if not skipped:
        return
    examples = ", ".join(skipped[:EXAMPLES_PER_WARNING])
    more = ", ..." if len(skipped) > EXAMPLES_PER_WARNING else ""
    logger.warning(
        "%s (%s): skipped %d of %d images %s, e.g. %s%s",
        source,
        split,
        len(skipped),
        examined,
        reason,
        examples,
        more,
    )
