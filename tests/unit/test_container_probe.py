"""deploy/probe.py, the standard-library helper deploy/container-test.sh checks the container with."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "deploy"))
import probe  # noqa: E402 - deploy/ is not a package; the path is set just above


def test_png_is_a_valid_image_pillow_decodes():
    image = Image.open(io.BytesIO(probe.png()))
    image.load()
    assert (image.format, image.mode, image.size) == ("PNG", "RGB", (64, 48))
    assert image.getpixel((32, 24)) == (220, 30, 30) and image.getpixel((0, 0)) == (30, 60, 200)


def json_lines(text: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "deploy" / "probe.py"), "json-lines"],
        input=text,
        check=False,
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_json_lines_accepts_json_objects_and_rejects_anything_else():
    assert json_lines('{"level": "INFO"}\n\n{"level": "ERROR"}\n').returncode == 0
    plain = json_lines('{"level": "INFO"}\nW0000 00:00 cuda_dnn.cc:1] Unable to register cuDNN factory\n')
    assert plain.returncode == 1 and "line 2" in plain.stderr
    assert json_lines("[1, 2]\n").returncode == 1
    assert json_lines("").returncode == 1  # no log at all is a failure too
