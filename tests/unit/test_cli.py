"""`python -m captioning caption IMG ...`: text and JSON output, bad files and bad options."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from captioning.__main__ import main
from captioning.decoding import DecodeOptions

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[Path]:
    directory = tmp_path_factory.mktemp("cli-images")
    paths = []
    for i, size in enumerate([(40, 30), (32, 32)]):
        pixels = np.random.default_rng(i).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        path = directory / f"picture-{i}.png"
        Image.fromarray(pixels).save(path)
        paths.append(path)
    return paths


def test_module_entry_point_writes_one_json_object_per_image(tiny_bundle, images, tmp_path):
    missing = tmp_path / "missing.png"
    command = [
        sys.executable,
        "-m",
        "captioning",
        "caption",
        str(images[0]),
        str(missing),
        str(images[1]),
        "--artifacts",
        str(tiny_bundle),
        "--strategy",
        "beam",
        "--beam-size",
        "3",
        "--num-captions",
        "2",
        "--attention",
        "--json",
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "3"}
    result = subprocess.run(command, check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1, result.stderr[-2000:]  # one file failed, the others were captioned
    assert f"{missing}: error:" in result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [line["image"] for line in lines] == [str(images[0]), str(images[1])]
    for line in lines:
        assert len(line["captions"]) == 2
        best, second = line["captions"]
        assert best["confidence"] >= second["confidence"]
        assert best["text"] == " ".join(best["tokens"]) and len(best["attention"]) == len(best["tokens"])


@pytest.mark.parametrize("flags", [[], ["--mirror-view"]], ids=["plain", "mirror-view"])
def test_text_output_matches_the_library(tiny_bundle, tiny_captioner, images, capsys, flags):
    assert main(["caption", str(images[0]), "--artifacts", str(tiny_bundle), *flags]) == 0
    (line,) = capsys.readouterr().out.splitlines()
    path, confidence, text = line.split("\t")
    with Image.open(images[0]) as image:
        (expected,) = tiny_captioner.caption([image], DecodeOptions(mirror_view=bool(flags)))[0]
    assert (path, text) == (str(images[0]), expected.text)
    assert float(confidence) == pytest.approx(expected.confidence, abs=1e-3)


@pytest.mark.parametrize(
    "options",
    [
        ["--num-captions", "2"],
        ["--strategy", "beam", "--beam-size", "2", "--num-captions", "3"],
        ["--strategy", "sample", "--temperature", "0"],
        ["--grounded"],  # greedy has no candidates to rerank
    ],
)
def test_invalid_options_exit_2_before_loading_anything(images, options, capsys):
    assert main(["caption", str(images[0]), "--artifacts", "/nonexistent", *options]) == 2
    assert capsys.readouterr().err.startswith("error: ")


def test_grounded_decoding_needs_a_model_with_a_scene_head(tiny_bundle, images, capsys):
    flags = ["--strategy", "beam", "--grounded"]
    assert main(["caption", str(images[0]), "--artifacts", str(tiny_bundle), *flags]) == 2
    assert "no scene head" in capsys.readouterr().err


def test_missing_bundle_exits_2(images, capsys):
    assert main(["caption", str(images[0]), "--artifacts", "/nonexistent/bundle"]) == 2
    assert "error:" in capsys.readouterr().err


def test_a_model_directory_means_its_highest_version_as_the_service_serves(tiny_bundle, tmp_path):
    from captioning.__main__ import DEFAULT_ARTIFACTS
    from captioning.artifacts import bundle_path

    model = tmp_path / "default"
    for version in ("1", "2", "10", ".staging-11"):
        (model / version).mkdir(parents=True)
    assert bundle_path(str(model)) == model / "10"  # numerically highest, a staging copy ignored
    assert bundle_path(str(tiny_bundle)) == Path(tiny_bundle)  # a bundle is itself
    # The default is the served model, not one pinned version of it.
    assert bundle_path(str(ROOT / DEFAULT_ARTIFACTS)) == max(
        (p for p in (ROOT / DEFAULT_ARTIFACTS).iterdir() if p.name.isdigit()), key=lambda p: int(p.name)
    )
