"""The Open Inference Protocol v2 endpoints, driven by the real tritonclient against a real server
(`python -m app` in a subprocess on a free loopback port), JSON and binary tensor data both."""

from __future__ import annotations

import base64
import io
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.http as tritonclient_http
from PIL import Image
from tritonclient.utils import InferenceServerException

ROOT = Path(__file__).resolve().parents[2]
API_KEY = "oip-test-key"


def auth() -> dict:
    # A fresh dict each call: tritonclient adds its own headers to the dict it is given.
    return {"Authorization": f"Bearer {API_KEY}"}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def png(color, size=(40, 40)) -> bytes:
    buffer = io.BytesIO()
    image = Image.new("RGB", size, color)
    image.paste((255 - color[0], color[1], 255 - color[2]), (8, 8, 24, 24))
    image.save(buffer, "PNG")
    return buffer.getvalue()


def with_domain_and_scene_head(bundle: Path, feature_size: int) -> None:
    """The tiny bundle gains what the default model has beyond it: a domain check (here wide open:
    every image in the domain) and a scene head (random, tied to the encoder by the known answer)."""
    from captioning.artifacts import add_files, add_scene_head
    from captioning.domain import STATISTICS, DomainModel
    from captioning.grounding import SceneHead
    from captioning.scenes import SCENE_KINDS

    wide_open = np.full(len(STATISTICS), 1e9)
    pooled = 2 * feature_size
    DomainModel(np.zeros(pooled), np.eye(pooled), 1e9, -wide_open, wide_open).save(bundle / "domain.npz")
    add_files(bundle, ("domain.npz",))
    rng = np.random.default_rng(0)
    classes = 1 + len(SCENE_KINDS)
    add_scene_head(bundle, SceneHead(rng.normal(size=(feature_size, classes)).astype(np.float32), np.zeros(classes)))


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_bundle, tiny_captioner):
    repository = tmp_path_factory.mktemp("repository")
    shutil.copytree(tiny_bundle, repository / "default" / "1")
    with_domain_and_scene_head(repository / "default" / "1", tiny_captioner.feature_size)
    port = free_port()
    env = {
        **os.environ,
        "MODEL_REPOSITORY": str(repository),
        "MODEL_POLL_INTERVAL_S": "0",
        "PORT": str(port),
        "API_KEY": API_KEY,
        "MAX_BATCH_SIZE": "8",
        "MAX_IMAGES_PER_REQUEST": "4",
        "LOG_LEVEL": "WARNING",
        "PYTHONPATH": str(ROOT),
    }
    env.pop("ARTIFACTS_DIR", None)
    process = subprocess.Popen(
        [sys.executable, "-m", "app"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    url = f"127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            if process.poll() is not None:
                pytest.fail(f"the server exited: {process.stderr.read()[-3000:]}")
            try:
                if httpx.get(f"http://{url}/v2/health/ready", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail("the server did not become ready in 180 s")
            time.sleep(0.5)
        yield url
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="module")
def client(server):
    with tritonclient_http.InferenceServerClient(url=server) as triton:
        yield triton


def image_input(images: list[bytes], binary: bool):
    tensor = tritonclient_http.InferInput("image", [len(images)], "BYTES")
    if binary:
        tensor.set_data_from_numpy(np.array(images, dtype=np.object_), binary_data=True)
    else:  # JSON carries each image as its base64 string
        tensor.set_data_from_numpy(
            np.array([base64.b64encode(i).decode() for i in images], dtype=np.object_), binary_data=False
        )
    return tensor


def caption_of(server: str, image: bytes, **params) -> dict:
    response = httpx.post(
        f"http://{server}/caption",
        params=params,
        headers=auth(),
        files={"image": ("i.png", image, "image/png")},
        timeout=30,
    )
    assert response.status_code == 200, response.text
    return response.json()


def test_health_and_metadata(client):
    assert client.is_server_live() and client.is_server_ready()
    assert "binary_tensor_data" in client.get_server_metadata()["extensions"]
    metadata = client.get_model_metadata("default", headers=auth())
    assert metadata["versions"] == ["1"]
    assert metadata["inputs"] == [{"name": "image", "datatype": "BYTES", "shape": [-1]}]
    assert {o["name"]: o["datatype"] for o in metadata["outputs"]} == {
        "caption": "BYTES",
        "captions": "BYTES",
        "scores": "FP32",
        "confidence": "FP32",
        "in_domain": "BOOL",
        "domain_score": "FP32",
        "agrees_with_scene": "BOOL",
        "written_from_scene": "BOOL",
    }
    assert {o["name"]: o["shape"] for o in metadata["outputs"]}["in_domain"] == [-1]  # one per image
    assert client.get_model_metadata("default", "1", headers=auth())["name"] == "default"
    assert client.is_model_ready("default", headers=auth())
    assert client.is_model_ready("default", "1", headers=auth())
    assert not client.is_model_ready("default", "2", headers=auth())
    assert not client.is_model_ready("other", headers=auth())


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_infer_round_trip_matches_the_caption_route(server, client, binary):
    images = [png((200, 40, 40)), png((30, 60, 220))]
    decoding = {"strategy": "beam", "beam_size": 3, "num_captions": 2}
    if not binary:  # and every other /caption parameter passes through `parameters` too
        decoding["mirror_view"] = True
    outputs = [
        tritonclient_http.InferRequestedOutput(name, binary_data=binary)
        for name in ("caption", "captions", "scores", "confidence")
    ]
    result = client.infer(
        "default",
        [image_input(images, binary)],
        outputs=outputs,
        headers=auth(),
        parameters=decoding,
    )
    response = result.get_response()
    assert response["model_name"] == "default" and response["model_version"] == "1"
    captions, scores = result.as_numpy("captions"), result.as_numpy("scores")
    confidence, best = result.as_numpy("confidence"), result.as_numpy("caption")
    assert captions.shape == (2, 2) and scores.dtype == np.float32 and scores.shape == (2, 2)
    assert confidence.shape == (2, 2) and np.all((confidence > 0) & (confidence <= 1))
    for index, image in enumerate(images):  # the same engine and decoding as POST /caption
        expected = caption_of(server, image, **{k: str(v).lower() if v is True else v for k, v in decoding.items()})
        assert expected["model"] == {"name": "default", "version": "1"}
        texts = [c.decode() if isinstance(c, bytes) else c for c in captions[index]]
        assert texts == [c["text"] for c in expected["captions"]]
        assert (best[index].decode() if isinstance(best[index], bytes) else best[index]) == expected["caption"]
        np.testing.assert_allclose(scores[index], [c["log_prob"] for c in expected["captions"]], rtol=1e-4, atol=1e-4)


def test_versioned_path_and_default_outputs_in_binary(client):
    # No outputs named: tritonclient asks for every output in binary (binary_data_output).
    result = client.infer("default", [image_input([png((10, 200, 10))], True)], model_version="1", headers=auth())
    assert result.get_response()["model_version"] == "1"
    assert result.as_numpy("caption").shape == (1,) and result.as_numpy("captions").shape == (1, 1)
    assert result.as_numpy("in_domain").dtype == np.bool_ and result.as_numpy("in_domain").tolist() == [True]
    assert result.as_numpy("domain_score").shape == (1,)
    assert result.as_numpy("agrees_with_scene") is None  # only grounded decoding has them
    assert result.as_numpy("written_from_scene") is None


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_grounded_outputs_match_the_caption_route(server, client, binary):
    images = [png((200, 40, 40)), png((30, 60, 220))]
    decoding = {"strategy": "beam", "beam_size": 3, "num_captions": 3, "grounded": True}
    names = ("captions", "agrees_with_scene", "in_domain", "domain_score", "written_from_scene")
    outputs = [tritonclient_http.InferRequestedOutput(name, binary_data=binary) for name in names]
    result = client.infer(
        "default", [image_input(images, binary)], outputs=outputs, headers=auth(), parameters=decoding
    )
    agrees, captions = result.as_numpy("agrees_with_scene"), result.as_numpy("captions")
    assert agrees.dtype == np.bool_ and agrees.shape == captions.shape == (2, 3)
    for index, image in enumerate(images):
        expected = caption_of(server, image, strategy="beam", beam_size=3, num_captions=3, grounded="true")
        texts = [c.decode() if isinstance(c, bytes) else c for c in captions[index]]
        assert texts == [c["text"] for c in expected["captions"]]
        assert agrees[index].tolist() == [c["agrees_with_scene"] for c in expected["captions"]]
        written = result.as_numpy("written_from_scene")[index].tolist()
        assert written == [c["written_from_scene"] for c in expected["captions"]]
        assert result.as_numpy("in_domain")[index] == expected["in_domain"]
        assert result.as_numpy("domain_score")[index] == pytest.approx(expected["domain_score"], abs=1e-4)
    # Agreement is a fact of grounded decoding: asked for without it, the request is refused unanswered.
    with pytest.raises(InferenceServerException, match="grounded=true") as refused:
        client.infer("default", [image_input(images, binary)], outputs=outputs[:2], headers=auth())
    assert refused.value.status() == "400"
    with pytest.raises(InferenceServerException, match="written_from_scene is answered") as refused:
        client.infer("default", [image_input(images, binary)], outputs=outputs[4:], headers=auth())
    assert refused.value.status() == "400"


def test_errors_have_the_protocol_shape(server, client):
    def refused(**kwargs) -> InferenceServerException:
        with pytest.raises(InferenceServerException) as raised:
            client.infer("default", **{"headers": auth(), **kwargs})
        return raised.value

    good = [image_input([png((1, 2, 3))], True)]
    assert refused(inputs=good, headers={"Authorization": "Bearer wrong"}).status() == "401"
    error = refused(inputs=good, model_version="7")
    assert error.status() == "404" and "not served" in error.message()
    not_an_image = refused(inputs=[image_input([b"this is no image"], True)])
    assert not_an_image.status() == "400"
    assert refused(inputs=good, parameters={"num_captions": 2}).status() == "422"  # greedy gives one
    assert refused(inputs=good, parameters={"beam_width": 2}).status() == "422"  # unknown parameter
    assert refused(inputs=[image_input([png((1, 2, 3))] * 5, True)]).status() == "422"  # MAX_IMAGES_PER_REQUEST
    bad_base64 = tritonclient_http.InferInput("image", [1], "BYTES")
    bad_base64.set_data_from_numpy(np.array(["%%%"], dtype=np.object_), binary_data=False)
    assert "base64" in refused(inputs=[bad_base64]).message()
    # The body is JSON {"error": "..."}, as the protocol says.
    body = httpx.post(
        f"http://{server}/v2/models/default/infer", headers=auth(), content=b"{not json", timeout=10
    ).json()
    assert set(body) == {"error"} and isinstance(body["error"], str)
    # So is a refusal given before the route runs (the key, checked before the body is read).
    keyless = httpx.post(f"http://{server}/v2/models/default/infer", content=b"{}", timeout=10)
    assert keyless.status_code == 401 and set(keyless.json()) == {"error"}


@pytest.mark.parametrize("version", ["%C2%B3", "%D9%A3", "1" * 5000, "-1", "1.0"])
def test_a_version_that_is_not_ascii_digits_is_404_in_the_protocol_shape(server, version):
    """ "³" passes str.isdigit() but not int(), "٣" (Arabic-Indic 3) would read as 3, and int()
    refuses strings of over 4300 digits: each was a 500 or another version."""
    for path in ("", "/ready", "/infer"):
        url = f"http://{server}/v2/models/default/versions/{version}{path}"
        response = httpx.request("POST" if path == "/infer" else "GET", url, headers=auth(), content=b"{}", timeout=10)
        assert response.status_code == 404, (path, response.text[:200])
        assert set(response.json()) == {"error"}


def test_an_output_asked_for_twice_is_refused_before_any_inference(server):
    """Each entry was answered: 200000 copies of `scores` in a 4 MB request made an 84 MB answer."""
    request = {
        "inputs": [
            {"name": "image", "shape": [1], "datatype": "BYTES", "data": [base64.b64encode(png((1, 2, 3))).decode()]}
        ],
        "outputs": [{"name": "scores"}] * 1000,
    }
    response = httpx.post(f"http://{server}/v2/models/default/infer", headers=auth(), json=request, timeout=10)
    assert response.status_code == 400
    assert "more than once" in response.json()["error"]
    request["outputs"] = [{"name": f"unknown-{index}"} for index in range(1000)]
    response = httpx.post(f"http://{server}/v2/models/default/infer", headers=auth(), json=request, timeout=10)
    assert response.status_code == 400 and len(response.text) < 500  # names a few, not all 1000


def test_millions_of_empty_values_are_refused_before_they_are_parsed(server):
    """3.5 million empty strings (or lists, or zero-length binary elements) in a 10 MB body were all
    built as Python objects on the event loop before the count met the shape: seconds of stall."""
    url = f"http://{server}/v2/models/default/infer"
    many = '{"inputs":[{"name":"image","datatype":"BYTES","shape":[1],"data":[' + ",".join(['""'] * 200_000) + "]}]}"
    response = httpx.post(url, headers={**auth(), "Content-Type": "application/json"}, content=many, timeout=10)
    assert response.status_code == 400 and "values" in response.json()["error"]
    header = b'{"inputs":[{"name":"image","datatype":"BYTES","shape":[1],"parameters":{"binary_data_size":%d}}]}'
    binary = b"\0\0\0\0" * 500_000  # half a million zero-length elements
    header %= len(binary)
    started = time.monotonic()
    response = httpx.post(
        url,
        headers={**auth(), "Inference-Header-Content-Length": str(len(header))},
        content=header + binary,
        timeout=10,
    )
    assert response.status_code == 400 and "holds 2 elements" in response.json()["error"]  # counted to 1 past
    assert time.monotonic() - started < 2


@pytest.mark.parametrize("length", [b"+5", b"1_0", "٣".encode(), b"9" * 5000])
def test_the_header_length_must_be_plain_digits(server, length):
    response = httpx.post(
        f"http://{server}/v2/models/default/infer",
        headers={**auth(), "Inference-Header-Content-Length": length},
        content=b'{"inputs": []}' + b"x" * 20,
        timeout=10,
    )
    assert response.status_code == 400 and "must be an integer" in response.json()["error"]
