"""Every benchmark module imports against the current code (they run rarely, so a rename elsewhere
would otherwise break them silently)."""

import importlib
import pkgutil

import pytest

import bench

MODULES = sorted(info.name for info in pkgutil.iter_modules(bench.__path__))


def test_the_benchmarks_are_all_found():
    assert {"load_test", "attack", "harness", "model_swap", "peers", "cpu_profile", "http_floor"} <= set(MODULES)


@pytest.mark.parametrize("name", MODULES)
def test_benchmark_module_imports(name):
    importlib.import_module(f"bench.{name}")


@pytest.mark.parametrize("decode", [False, True])
def test_the_http_floor_server_answers_an_upload_like_the_service(decode):
    """bench.http_floor's model-less server: the same multipart field, a JSON answer; with decode,
    the PNG is really decoded and resized to the model's input."""
    import io

    from fastapi.testclient import TestClient
    from PIL import Image

    from bench.http_floor import create_floor_app

    png = io.BytesIO()
    Image.new("RGB", (64, 48), "red").save(png, "PNG")
    client = TestClient(create_floor_app(decode, image_size=96))
    response = client.post("/caption", files={"image": ("a.png", png.getvalue(), "image/png")})
    assert response.status_code == 200 and response.json()["captions"][0]["text"]
    assert response.json()["width" if decode else "bytes"] == (96 if decode else len(png.getvalue()))
    assert client.post("/caption").status_code == 422  # no image: FastAPI's own validation
    assert client.get("/health/ready").status_code == 200
