"""`python -m training export`: the SavedModel loads in a fresh process (no project code) and its
in-graph decoding + greedy loop gives the service's captions for the same image bytes."""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from app.images import decode_upload
from captioning.decoding import DecodeOptions

ROOT = Path(__file__).resolve().parents[2]

# Runs with the project off the path: only TensorFlow reads the SavedModel, as TF Serving would.
LOAD_AND_CAPTION = """
import base64, json, sys
import tensorflow as tf
images = [base64.b64decode(line) for line in sys.stdin.read().split()]
serve = tf.saved_model.load(sys.argv[1]).signatures["serving_default"]
out = serve(image_bytes=tf.constant(images))
print(json.dumps({"caption": [c.decode() for c in out["caption"].numpy()],
                  "log_prob": out["log_prob"].numpy().tolist(), "confidence": out["confidence"].numpy().tolist()}))
"""


def encoded(array: np.ndarray, mode: str | None = None) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array, mode).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_bundle):
    output = tmp_path_factory.mktemp("export") / "captioner" / "1"
    command = [sys.executable, "-m", "training", "export", "--artifacts", str(tiny_bundle), "--output", str(output)]
    result = subprocess.run(
        command,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (output / "saved_model.pb").is_file()
    assert json.loads((output / "assets.extra" / "manifest.json").read_text())["name"] == "tiny-random"
    return output


def test_export_captions_like_the_service_in_a_fresh_process(exported, tiny_captioner, tmp_path):
    rng = np.random.default_rng(3)
    images = [encoded(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(4)]
    rgba = rng.integers(0, 256, (32, 32, 4), dtype=np.uint8)
    images.append(encoded(rgba, "RGBA"))  # transparency composited on white, as the service does
    images.append(encoded(rng.integers(0, 256, (32, 32), dtype=np.uint8), "L"))  # grey
    stdin = "\n".join(base64.b64encode(image).decode() for image in images)
    result = subprocess.run(
        [sys.executable, "-c", LOAD_AND_CAPTION, str(exported)],
        input=stdin,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    served = json.loads(result.stdout.strip().splitlines()[-1])

    # The service's path: its upload decoding, then the Captioner the engine drives.
    pixels = [tiny_captioner.prepare(decode_upload(image, max_pixels=10**7, min_side=8).image) for image in images]
    expected = [captions[0] for captions in tiny_captioner.caption(pixels, DecodeOptions())]
    assert served["caption"] == [caption.text for caption in expected]
    assert len({caption for caption in served["caption"]}) > 1 and all(served["caption"])  # a real comparison
    np.testing.assert_allclose(served["log_prob"], [c.log_prob for c in expected], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(served["confidence"], [c.confidence for c in expected], rtol=1e-4, atol=1e-4)


def test_export_never_deletes_what_is_not_an_earlier_export(tmp_path, tiny_bundle):
    from captioning.artifacts import ArtifactError
    from training.export import export

    models = tmp_path / "models"
    (models / "1").mkdir(parents=True)
    (models / "README.md").write_text("my notes")
    with pytest.raises(ArtifactError, match="is not an earlier export"):
        export(tiny_bundle, models)  # a typo for models/2: it used to rmtree models/
    assert (models / "README.md").read_text() == "my notes" and (models / "1").is_dir()
    with pytest.raises(ArtifactError, match="the bundle itself or inside it"):
        export(tiny_bundle, tiny_bundle)
    with pytest.raises(ArtifactError, match="the bundle itself or inside it"):
        export(tiny_bundle, tiny_bundle / "exported")


def test_a_calibrated_bundle_exports_the_services_calibrated_confidence(tmp_path, tiny_bundle):
    import shutil

    import tensorflow as tf

    from captioning.artifacts import add_files
    from captioning.calibration import Calibration
    from captioning.captioner import Captioner
    from training.export import export

    bundle = shutil.copytree(tiny_bundle, tmp_path / "calibrated")
    Calibration(4.0, 1.5, "test").save(bundle / "calibration.json")
    add_files(bundle, ("calibration.json",))
    captioner = Captioner.load(bundle)
    images = [encoded(np.random.default_rng(i).integers(0, 256, (32, 32, 3), dtype=np.uint8)) for i in range(3)]
    serve = tf.saved_model.load(str(export(bundle, tmp_path / "exported" / "1"))).signatures["serving_default"]
    exported = serve(image_bytes=tf.constant(images))["confidence"].numpy()
    pixels = [captioner.prepare(decode_upload(image, max_pixels=10**7, min_side=8).image) for image in images]
    expected = [captions[0] for captions in captioner.caption(pixels, DecodeOptions())]
    assert all(c.raw_confidence is not None and c.confidence != c.raw_confidence for c in expected)
    np.testing.assert_allclose(exported, [c.confidence for c in expected], rtol=1e-4, atol=1e-4)
