"""Loaders for COCO, Karpathy splits, Flickr8k and plain caption lists, on tiny fixtures."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from PIL import Image

from training.datasets.caption_list import load_caption_list
from training.datasets.coco import load_coco
from training.datasets.errors import DatasetFormatError, DatasetOptionError
from training.datasets.flickr8k import load_flickr8k
from training.datasets.karpathy import load_karpathy
from training.datasets.registry import LOADERS, load_dataset


def write_image(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 4), color=(200, 30, 30)).save(path)


def write_json(path: Path, data: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2), encoding="utf-8")
    return path


def write_lines(path: Path, lines: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def skip_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


# --- COCO -----------------------------------------------------------------------------------


@pytest.fixture
def coco(tmp_path: Path) -> tuple[Path, Path]:
    images_dir = tmp_path / "val2014"
    for name in ("a.jpg", "b.png", "d.jpg"):
        write_image(images_dir / name)
    annotations = write_json(
        tmp_path / "annotations" / "captions_val2014.json",
        {
            "info": {},
            "images": [
                {"id": 10, "file_name": "a.jpg", "width": 4},
                {"id": 20, "file_name": "b.png"},
                {"id": 30, "file_name": "c.jpg"},  # file missing
                {"id": 40, "file_name": "d.jpg"},  # only a blank caption
                {"id": 50, "file_name": "a.jpg"},  # no annotations at all
            ],
            "annotations": [
                {"image_id": 20, "id": 1, "caption": "  A red square.\n"},
                {"image_id": 10, "id": 2, "caption": "First for a."},
                {"image_id": 30, "id": 3, "caption": "Never loaded."},
                {"image_id": 10, "id": 4, "caption": "Second for a."},
                {"image_id": 40, "id": 5, "caption": "   "},
                {"image_id": 10, "id": 6, "caption": ""},
                {"image_id": 40, "id": 7, "caption": "..."},  # no word either: image 40 has no caption
                {"image_id": 20, "id": 8, "caption": " “?!” "},  # dropped, the other kept
            ],
        },
    )
    return annotations, images_dir


def test_coco_groups_captions_per_image_in_order(coco):
    annotations, images_dir = coco
    records = load_coco(annotations, images_dir, "val")
    assert [r.image_id for r in records] == ["10", "20"]
    assert records[0].captions == ["First for a.", "Second for a."]
    assert records[1].captions == ["A red square."]
    assert records[0].path == str(images_dir / "a.jpg")
    assert {r.split for r in records} == {"val"}
    assert all(r.pixels is None for r in records)


def test_coco_skips_missing_images_and_imageless_captions_with_warnings(coco, caplog):
    annotations, images_dir = coco
    with caplog.at_level(logging.WARNING):
        load_coco(annotations, images_dir, "val")
    warnings = skip_warnings(caplog)
    assert len(warnings) == 2
    no_captions, missing = warnings
    assert "skipped 2 of 5 images with no caption that has a word in it" in no_captions
    assert "40" in no_captions and "50" in no_captions
    assert "skipped 1 of 5 images whose image file is missing" in missing
    assert "c.jpg" in missing and "captions_val2014.json" in missing


def test_coco_limit_keeps_the_first_usable_records(coco):
    annotations, images_dir = coco
    assert [r.image_id for r in load_coco(annotations, images_dir, "val", limit=1)] == ["10"]
    assert load_coco(annotations, images_dir, "val", limit=0) == []


def test_coco_malformed_fields_name_file_and_key_path(tmp_path):
    one_image = [{"id": 1, "file_name": "a.jpg"}]
    bad_caption = write_json(
        tmp_path / "captions_bad.json",
        {"images": one_image, "annotations": [{"image_id": 1, "caption": 7}]},
    )
    with pytest.raises(DatasetFormatError, match=r"captions_bad\.json: annotations\[0\]\.caption"):
        load_coco(bad_caption, tmp_path, "train")

    unknown_image = write_json(
        tmp_path / "captions_unknown.json",
        {"images": one_image, "annotations": [{"image_id": 2, "caption": "x"}]},
    )
    unknown_id = r"captions_unknown\.json: annotations\[0\]\.image_id: 2 is not the id of any image"
    with pytest.raises(DatasetFormatError, match=unknown_id):
        load_coco(unknown_image, tmp_path, "train")

    no_images = write_json(tmp_path / "captions_empty.json", {"annotations": []})
    with pytest.raises(DatasetFormatError, match=r"captions_empty\.json: images: missing"):
        load_coco(no_images, tmp_path, "train")


def test_invalid_json_names_file_and_line(tmp_path):
    broken = tmp_path / "captions_broken.json"
    broken.write_text('{\n  "images": [],\n  "annotations": [,]\n}\n', encoding="utf-8")
    with pytest.raises(DatasetFormatError, match=r"captions_broken\.json:3: invalid JSON"):
        load_coco(broken, tmp_path, "train")


def test_unknown_split_is_rejected(coco):
    annotations, images_dir = coco
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        load_coco(annotations, images_dir, "dev")


# --- Karpathy splits ------------------------------------------------------------------------


def karpathy_image(filename, split, captions, *, filepath=None, cocoid=None, imgid=0):
    image = {
        "filename": filename,
        "split": split,
        "sentences": [{"raw": c, "tokens": c.lower().split()} for c in captions],
        "imgid": imgid,
    }
    if filepath is not None:
        image["filepath"] = filepath
    if cocoid is not None:
        image["cocoid"] = cocoid
    return image


@pytest.fixture
def karpathy_coco(tmp_path: Path) -> tuple[Path, Path]:
    root = tmp_path / "coco"
    for relative in ("train2014/t.jpg", "val2014/r.jpg", "val2014/v.jpg", "val2014/s.jpg"):
        write_image(root / relative)
    split_file = write_json(
        tmp_path / "dataset_coco.json",
        {
            "dataset": "coco",
            "images": [
                karpathy_image("t.jpg", "train", ["Train one.", "Train two."], filepath="train2014", cocoid=1),
                karpathy_image("r.jpg", "restval", ["Restval."], filepath="val2014", cocoid=2),
                karpathy_image("v.jpg", "val", ["Val."], filepath="val2014", cocoid=3),
                karpathy_image("s.jpg", "test", [" Test. ", ""], filepath="val2014", cocoid=4),
                karpathy_image("gone.jpg", "test", ["Missing."], filepath="val2014", cocoid=5),
            ],
        },
    )
    return split_file, root


def test_karpathy_restval_counts_as_train(karpathy_coco):
    split_file, root = karpathy_coco
    train = load_karpathy(split_file, root, "train")
    assert [r.image_id for r in train] == ["1", "2"]
    assert train[0].captions == ["Train one.", "Train two."]
    assert train[0].path == str(root / "train2014" / "t.jpg")
    assert train[1].path == str(root / "val2014" / "r.jpg")
    assert {r.split for r in train} == {"train"}

    without_restval = load_karpathy(split_file, root, "train", restval_as_train=False)
    assert [r.image_id for r in without_restval] == ["1"]
    assert [r.image_id for r in load_karpathy(split_file, root, "val")] == ["3"]


def test_karpathy_test_split_skips_missing_image(karpathy_coco, caplog):
    split_file, root = karpathy_coco
    with caplog.at_level(logging.WARNING):
        test = load_karpathy(split_file, root, "test")
    assert [(r.image_id, r.captions) for r in test] == [("4", ["Test."])]
    (warning,) = skip_warnings(caplog)
    assert "skipped 1 of 2 images whose image file is missing" in warning and "gone.jpg" in warning


def test_karpathy_flickr_has_no_filepath_and_uses_file_stem_as_id(tmp_path):
    write_image(tmp_path / "images" / "123_abc.jpg")
    split_file = write_json(
        tmp_path / "dataset_flickr8k.json",
        {"dataset": "flickr8k", "images": [karpathy_image("123_abc.jpg", "train", ["A dog."])]},
    )
    (record,) = load_karpathy(split_file, tmp_path / "images", "train", limit=5)
    assert record.image_id == "123_abc"
    assert record.path == str(tmp_path / "images" / "123_abc.jpg")


def test_karpathy_malformed_entries_name_file_and_key_path(tmp_path):
    bad_sentence = karpathy_image("a.jpg", "test", ["ok"])
    bad_sentence["sentences"].append({"tokens": ["no", "raw"]})
    split_file = write_json(
        tmp_path / "dataset_flickr30k.json",
        {"images": [karpathy_image("b.jpg", "train", ["fine"]), bad_sentence]},
    )
    # Checked even when loading a split the bad entry is not in.
    missing_raw = r"dataset_flickr30k\.json: images\[1\]\.sentences\[1\]\.raw: missing"
    with pytest.raises(DatasetFormatError, match=missing_raw):
        load_karpathy(split_file, tmp_path, "train")

    bad_split = write_json(tmp_path / "dataset_bad_split.json", {"images": [karpathy_image("a.jpg", "dev", ["x"])]})
    unknown_split = r"dataset_bad_split\.json: images\[0\]\.split: 'dev' is not one of"
    with pytest.raises(DatasetFormatError, match=unknown_split):
        load_karpathy(bad_split, tmp_path, "val")


# --- Flickr8k -------------------------------------------------------------------------------


@pytest.fixture
def flickr8k(tmp_path: Path) -> tuple[Path, Path]:
    text_dir = tmp_path / "Flickr8k_text"
    images_dir = tmp_path / "Flicker8k_Dataset"
    for name in ("1_a.jpg", "2_b.jpg", "3_c.jpg", "4_d.jpg"):
        write_image(images_dir / name)
    write_lines(
        text_dir / "Flickr8k.token.txt",
        [
            "1_a.jpg#0\tA dog runs .",
            "2_b.jpg#0\tA cat sits .",
            "1_a.jpg#1\tA brown dog .",
            "3_c.jpg#0\tA bird flies .",
            "",
            "4_d.jpg#0\tA fish swims .",
            "5_e.jpg#0\tNo image file .",
            "2258277193_586949ec62.jpg.1#0\tIn no split list .",
        ],
    )
    write_lines(text_dir / "Flickr_8k.trainImages.txt", ["2_b.jpg", "1_a.jpg", "5_e.jpg"])
    write_lines(text_dir / "Flickr_8k.devImages.txt", ["3_c.jpg"])
    write_lines(text_dir / "Flickr_8k.testImages.txt", ["4_d.jpg"])
    return text_dir, images_dir


def test_flickr8k_splits_with_dev_as_val(flickr8k, caplog):
    text_dir, images_dir = flickr8k
    with caplog.at_level(logging.WARNING):
        train = load_flickr8k(text_dir, images_dir, "train")
    assert [(r.image_id, r.captions) for r in train] == [
        ("2_b", ["A cat sits ."]),
        ("1_a", ["A dog runs .", "A brown dog ."]),
    ]
    assert train[1].path == str(images_dir / "1_a.jpg")
    (warning,) = skip_warnings(caplog)
    assert "skipped 1 of 3 images whose image file is missing" in warning and "5_e.jpg" in warning

    val = load_flickr8k(text_dir, images_dir, "val")
    assert [(r.image_id, r.split) for r in val] == [("3_c", "val")]
    assert [r.image_id for r in load_flickr8k(text_dir, images_dir, "test")] == ["4_d"]
    assert [r.image_id for r in load_flickr8k(text_dir, images_dir, "train", limit=1)] == ["2_b"]


def test_flickr8k_malformed_caption_line_names_file_and_line(flickr8k):
    text_dir, images_dir = flickr8k
    token_file = text_dir / "Flickr8k.token.txt"
    lines = token_file.read_text(encoding="utf-8").splitlines()
    lines[2] = "1_a.jpg#1 A caption after a space, not a tab ."
    write_lines(token_file, lines)
    with pytest.raises(DatasetFormatError, match=r"Flickr8k\.token\.txt:3: expected"):
        load_flickr8k(text_dir, images_dir, "test")


# --- Plain caption lists --------------------------------------------------------------------


def test_jsonl_list_merges_lines_per_image_and_resolves_paths(tmp_path, caplog):
    write_image(tmp_path / "lists" / "images" / "dog.jpg")
    write_image(tmp_path / "cat.png")
    list_file = write_lines(
        tmp_path / "lists" / "captions.jsonl",
        [
            json.dumps({"image": "images/dog.jpg", "caption": "A dog runs."}),
            json.dumps({"image": "../cat.png", "captions": ["A cat sleeps.", " ", "A cat."]}),
            "",
            json.dumps({"image": "images/dog.jpg", "caption": " A brown dog. "}),
            json.dumps({"image": "images/missing.jpg", "caption": "Gone."}),
        ],
    )
    with caplog.at_level(logging.WARNING):
        records = load_caption_list(list_file, "test")
    assert [(r.image_id, r.captions, r.split) for r in records] == [
        ("images/dog.jpg", ["A dog runs.", "A brown dog."], "test"),
        ("../cat.png", ["A cat sleeps.", "A cat."], "test"),
    ]
    assert Path(records[1].path) == tmp_path / "cat.png"
    (warning,) = skip_warnings(caplog)
    assert "skipped 1 of 3 images whose image file is missing" in warning
    assert "missing.jpg" in warning
    # Without a split key the file is whatever split is asked for.
    assert [r.split for r in load_caption_list(list_file, "train", limit=1)] == ["train"]


def test_csv_list_merges_rows_and_filters_by_split_column(tmp_path):
    for name in ("a.jpg", "b.jpg", "c.jpg"):
        write_image(tmp_path / name)
    list_file = write_lines(
        tmp_path / "captions.csv",
        [
            "image,caption,split,source",
            'a.jpg,"A red square, small.",train,x',
            "b.jpg,A blue one.,val,x",
            "a.jpg,Another red one.,train,y",
            "c.jpg,A third.,train,x",
        ],
    )
    train = load_caption_list(list_file, "train")
    assert [(r.image_id, r.captions) for r in train] == [
        ("a.jpg", ["A red square, small.", "Another red one."]),
        ("c.jpg", ["A third."]),
    ]
    assert [r.image_id for r in load_caption_list(list_file, "val")] == ["b.jpg"]
    assert load_caption_list(list_file, "test") == []
    assert [r.image_id for r in load_caption_list(list_file, "train", limit=1)] == ["a.jpg"]


def test_csv_without_split_column_is_the_requested_split(tmp_path):
    write_image(tmp_path / "a.jpg")
    list_file = write_lines(tmp_path / "captions.csv", ["image,caption", "a.jpg,A square."])
    (record,) = load_caption_list(list_file, "val")
    assert (record.split, record.captions) == ("val", ["A square."])
    assert record.path == str(tmp_path / "a.jpg")


@pytest.mark.parametrize(
    ("name", "lines", "message"),
    [
        (
            "bad.jsonl",
            ['{"image": "a.jpg", "caption": "ok"}', '{"image": "a.jpg", "caption": '],
            r"bad\.jsonl:2: invalid JSON",
        ),
        (
            "bad.jsonl",
            ['{"image": "a.jpg", "caption": "ok"}', "", '{"image": "a.jpg"}'],
            r'bad\.jsonl:3: expected exactly one of "caption" and "captions"',
        ),
        (
            "bad.jsonl",
            ['{"image": "a.jpg", "captions": "not a list"}'],
            r'bad\.jsonl:1: "captions" must be a list of strings',
        ),
        (
            "bad.jsonl",
            ['{"image": "a.jpg", "caption": "x", "split": "train"}', '{"image": "b.jpg", "caption": "y"}'],
            r"bad\.jsonl:2: no split, but earlier lines give one",
        ),
        ("bad.jsonl", ['{"image": "a.jpg", "caption": "x", "split": "dev"}'], r"bad\.jsonl:1: unknown split 'dev'"),
        (
            "bad.jsonl",
            ['{"image": "a.jpg", "caption": "x"}', '{"image": "b.jpg", "caption": "y", "split": "val"}'],
            r"bad\.jsonl:2: gives a split, but earlier lines do not",
        ),
        (
            "bad.jsonl",
            [
                '{"image": "a.jpg", "caption": "x", "split": "train"}',
                '{"image": "a.jpg", "caption": "y", "split": "test"}',
            ],
            r"bad\.jsonl:2: 'a.jpg' is in split 'test' here but 'train' on an earlier line",
        ),
        (
            "bad.csv",
            ["image,caption", "a.jpg,fine", "a.jpg,an, unquoted comma"],
            r"bad\.csv:3: expected 2 fields, got 3",
        ),
        (
            "bad.csv",
            ["image,caption,split", "a.jpg,fine,train", "a.jpg,no split"],
            r"bad\.csv:3: expected 3 fields, got fewer",
        ),
        ("bad.csv", ["picture,caption", "a.jpg,fine"], r"bad\.csv:1: header lacks column\(s\) image"),
        ("bad.txt", ["a.jpg,fine"], r"bad\.txt: unknown list format '\.txt'"),
    ],
)
def test_malformed_list_names_file_and_line(tmp_path, name, lines, message):
    list_file = write_lines(tmp_path / name, lines)
    with pytest.raises(DatasetFormatError, match=message):
        load_caption_list(list_file, "train")


# --- Registry -------------------------------------------------------------------------------


def test_load_dataset_dispatches_by_name(coco, karpathy_coco, flickr8k, tmp_path):
    annotations, images_dir = coco
    records = load_dataset("coco", "val", annotations_file=annotations, images_dir=images_dir)
    assert [r.image_id for r in records] == ["10", "20"]

    split_file, root = karpathy_coco
    records = load_dataset("karpathy", "train", split_file=split_file, images_root=root, limit=1)
    assert [r.image_id for r in records] == ["1"]

    text_dir, flickr_images = flickr8k
    assert len(load_dataset("flickr8k", "val", text_dir=text_dir, images_dir=flickr_images)) == 1

    write_image(tmp_path / "x.jpg")
    list_file = write_lines(tmp_path / "list.jsonl", ['{"image": "x.jpg", "caption": "An x."}'])
    (record,) = load_dataset("list", "test", list_file=list_file)
    assert (record.image_id, record.split) == ("x.jpg", "test")


def test_load_dataset_unknown_name_lists_known_names():
    with pytest.raises(ValueError, match="unknown dataset 'mscoco'") as error:
        load_dataset("mscoco", "train")
    for name in LOADERS:
        assert name in str(error.value)


def test_registry_maps_names_to_loader_functions():
    # A subset check, so that adding a dataset (e.g. "shapes") does not break this test.
    expected = {
        "coco": load_coco,
        "karpathy": load_karpathy,
        "flickr8k": load_flickr8k,
        "list": load_caption_list,
    }
    assert {name: LOADERS[name] for name in expected} == expected


def test_misspelt_missing_and_boolean_options_are_named_not_type_errors(karpathy_coco, tmp_path):
    split_file, root = karpathy_coco
    with pytest.raises(DatasetOptionError, match=r"unknown option\(s\) annotation_file.*missing annotations_file"):
        load_dataset("coco", "val", annotation_file="x.json", images_dir=tmp_path)
    with pytest.raises(DatasetOptionError, match="takes --data split_file=..., images_root=..., restval_as_train="):
        load_dataset("karpathy", "train", split_file=split_file)
    with_restval = load_dataset("karpathy", "train", split_file=split_file, images_root=root, restval_as_train="true")
    without = load_dataset("karpathy", "train", split_file=split_file, images_root=root, restval_as_train="false")
    assert len(without) < len(with_restval)  # the text "false" is false, not a truthy string
    with pytest.raises(DatasetOptionError, match="'maybe' is not true or false"):
        load_dataset("karpathy", "train", split_file=split_file, images_root=root, restval_as_train="maybe")


def test_files_that_are_not_readable_images_are_skipped_with_a_warning(tmp_path, caplog):
    write_image(tmp_path / "good.png")
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("not an image")
    lines = [f'{{"image": "{name}", "caption": "a {name}"}}' for name in ("good.png", "empty.jpg", "text.jpg")]
    records = load_dataset("list", "train", list_file=write_lines(tmp_path / "list.jsonl", lines))
    assert [r.image_id for r in records] == ["good.png"]
    (warning,) = skip_warnings(caplog)
    assert "skipped 2 of 3 images whose file is not a readable image" in warning and "empty.jpg" in warning


def test_files_saved_with_a_byte_order_mark_and_crlf_read_as_without(flickr8k, tmp_path):
    # Notepad, PowerShell and Excel start UTF-8 text with a BOM; it used to hide the first image.
    text_dir, images_dir = flickr8k
    for name in ("Flickr8k.token.txt", "Flickr_8k.trainImages.txt"):
        path = text_dir / name
        path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes().replace(b"\n", b"\r\n"))
    assert [r.image_id for r in load_flickr8k(text_dir, images_dir, "train")] == ["2_b", "1_a"]

    write_image(tmp_path / "x.jpg")
    jsonl = tmp_path / "list.jsonl"
    jsonl.write_bytes(b'\xef\xbb\xbf{"image": "x.jpg", "caption": "An x."}\r\n')
    assert [r.captions for r in load_caption_list(jsonl, "train")] == [["An x."]]
    coco = tmp_path / "captions.json"
    coco.write_bytes(b"\xef\xbb\xbf" + json.dumps({"images": [{"id": 1, "file_name": "x.jpg"}], "annotations": [
        {"image_id": 1, "id": 1, "caption": "An x."}]}).encode())  # fmt: skip
    assert len(load_coco(coco, tmp_path, "train")) == 1


def test_text_files_in_another_encoding_are_named_not_a_traceback(flickr8k, tmp_path):
    """A Latin-1 token file, a Latin-1 JSONL list, a CSV saved by Excel as 'Unicode Text'
    (UTF-16): each was a UnicodeDecodeError traceback."""
    text_dir, images_dir = flickr8k
    token_file = text_dir / "Flickr8k.token.txt"
    token_file.write_bytes(token_file.read_bytes() + "9_z.jpg#0\tUn caf\u00e9 .\n".encode("latin-1"))
    with pytest.raises(DatasetFormatError, match=r"Flickr8k\.token\.txt: not UTF-8 text \(perhaps Latin-1"):
        load_flickr8k(text_dir, images_dir, "train")
    write_image(tmp_path / "x.jpg")
    jsonl = tmp_path / "list.jsonl"
    jsonl.write_bytes(json.dumps({"image": "x.jpg", "caption": "Un caf\u00e9."}, ensure_ascii=False).encode("latin-1"))
    with pytest.raises(DatasetFormatError, match=r"list\.jsonl: not UTF-8 text"):
        load_caption_list(jsonl, "train")
    csv_file = tmp_path / "list.csv"
    csv_file.write_bytes("image,caption\nx.jpg,An x.\n".encode("utf-16"))
    with pytest.raises(DatasetFormatError, match=r"list\.csv: UTF-16 text .*save it as UTF-8"):
        load_caption_list(csv_file, "train")


def test_one_file_under_two_image_ids_is_kept_and_named(tmp_path, caplog):
    write_image(tmp_path / "x.jpg")
    coco = write_json(
        tmp_path / "captions.json",
        {
            "images": [{"id": 1, "file_name": "x.jpg"}, {"id": 2, "file_name": "x.jpg"}],
            "annotations": [{"image_id": 1, "id": 1, "caption": "An x."}, {"image_id": 2, "id": 2, "caption": "X."}],
        },
    )
    with caplog.at_level(logging.WARNING):
        assert [r.image_id for r in load_coco(coco, tmp_path, "train")] == ["1", "2"]
    (warning,) = [r.getMessage() for r in caplog.records if "uses too" in r.getMessage()]
    assert "1 images use a file an earlier image of this split uses too" in warning and "2 (" in warning


def test_csv_headers_as_spreadsheets_write_them(tmp_path):
    write_image(tmp_path / "x.jpg")
    csv_file = tmp_path / "list.csv"
    csv_file.write_text('Image , Caption\nx.jpg,"An x, drawn."\n', encoding="utf-8")
    assert [r.captions for r in load_caption_list(csv_file, "train")] == [["An x, drawn."]]
    csv_file.write_text("image;caption\nx.jpg;An x.\n", encoding="utf-8")
    with pytest.raises(DatasetFormatError, match="separated by ';'"):
        load_caption_list(csv_file, "train")


def test_coco_ids_written_as_text_in_one_place_and_numbers_in_the_other_match(tmp_path):
    write_image(tmp_path / "a.jpg")
    annotations = write_json(tmp_path / "captions.json", {
        "images": [{"id": "100000", "file_name": "a.jpg"}],
        "annotations": [{"image_id": 100000, "id": 1, "caption": "An a."}]})  # fmt: skip
    (record,) = load_coco(annotations, tmp_path, "train")
    assert (record.image_id, record.captions) == ("100000", ["An a."])


def test_numeric_options_from_the_command_line_are_read_or_named():
    assert len(load_dataset("shapes", "val", limit=2, image_size="32", max_objects="1")) == 2
    with pytest.raises(DatasetOptionError, match="image_size='big' is not a whole number"):
        load_dataset("shapes", "val", limit=2, image_size="big")
