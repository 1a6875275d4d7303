"""The trained default model, served through the API, describes a known test scene truthfully.

Needs the committed default model (conftest.DEFAULT_BUNDLE, `make train-default`); until that bundle
exists this fails on purpose, saying so, rather than skipping quietly.
"""

from __future__ import annotations

import pytest
import uploads
from conftest import DEFAULT_BUNDLE
from fastapi.testclient import TestClient
from PIL import Image

from app.main import create_app
from app.settings import Settings
from captioning.scene_checker import check_caption
from training.datasets.shapes import make_example

pytestmark = pytest.mark.filterwarnings("ignore:Using `httpx` with `starlette.testclient`")


@pytest.fixture(scope="module")
def client():
    if not (DEFAULT_BUNDLE / "manifest.json").is_file():
        pytest.fail(f"{DEFAULT_BUNDLE} has no trained model yet; create it with `make train-default`")
    with TestClient(create_app(Settings(artifacts_dir=DEFAULT_BUNDLE, api_key=None))) as client:
        yield client


def first_single_object_test_scene() -> int:
    """The known scene: the first test-split example with one object (deterministic)."""
    return next(i for i in range(200) if len(make_example("test", i).scene.objects) == 1)


def test_known_test_scene_gets_a_true_caption(client):
    example = make_example("test", first_single_object_test_scene())
    upload = uploads.encode(Image.fromarray(example.pixels), "PNG")
    response = client.post("/caption", files={"image": ("scene.png", upload, "image/png")})
    assert response.status_code == 200, response.text
    caption = response.json()["caption"]
    verdict = check_caption(caption, example.scene)
    assert verdict.correct, f"{caption!r} for {example.image_id} (reference: {example.captions[0]!r}): {verdict}"
