"""Decoding through the API: strategy parameters and the combinations refused with 422, the
attention payload, POST /captions with per-image results, and engine results equal to offline
ones. In process, one app on the tiny random bundle (its captions always run to max_length)."""

from __future__ import annotations

import pytest
import uploads

from app.images import decode_upload
from captioning.decoding import DecodeOptions

pytestmark = pytest.mark.filterwarnings("ignore:Using `httpx` with `starlette.testclient`")

API_KEY = "decoding-test-key"
MAX_IMAGES = 4


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    with uploads.tiny_service(
        tmp_path_factory, API_KEY, max_batch_size=16, max_images_per_request=MAX_IMAGES, request_timeout_s=20
    ) as client:
        yield client


def caption(client, data=None, **params):
    files = {"image": ("scene.png", data or uploads.png(), "image/png")}
    return client.post("/caption", files=files, params=params)


def caption_many(client, named_images, **params):
    files = [("images", (name, data, "application/octet-stream")) for name, data in named_images]
    return client.post("/captions", files=files, params=params)


def offline(client, data: bytes, options: DecodeOptions):
    """What the offline Captioner says for the same upload, decoded the way the service decodes it."""
    captioner = client.app.state.captioner
    decoded = decode_upload(data, max_pixels=10**7, min_side=1, draft_size=captioner.config.image_size)
    pixels = captioner.prepare(decoded.image)
    return captioner.caption([pixels], options)[0]


def assert_same(api_captions, offline_captions):
    assert [c["text"] for c in api_captions] == [c.text for c in offline_captions]
    assert [c["log_prob"] for c in api_captions] == pytest.approx([c.log_prob for c in offline_captions], abs=1e-4)
    assert [c["confidence"] for c in api_captions] == pytest.approx([c.confidence for c in offline_captions], abs=1e-5)


def assert_422(response, code: str, fragment: str):
    assert response.status_code == 422, response.text
    body = response.json()
    assert set(body) == {"error", "request_id"} and body["error"]["code"] == code
    assert fragment in body["error"]["message"]


# --- strategies ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("params", "options"),
    [
        ({}, DecodeOptions()),
        (
            {"strategy": "beam", "beam_size": 4, "num_captions": 3},
            DecodeOptions(strategy="beam", beam_size=4, num_captions=3),
        ),
        ({"strategy": "beam", "beam_size": 1}, DecodeOptions(strategy="beam", beam_size=1)),
        (
            {"strategy": "sample", "num_captions": 3, "seed": 5, "temperature": 0.7, "top_k": 4},
            DecodeOptions(strategy="sample", num_captions=3, seed=5, temperature=0.7, top_k=4),
        ),
        ({"strategy": "greedy", "max_length": 3}, DecodeOptions(max_length=3)),
        ({"mirror_view": "true"}, DecodeOptions(mirror_view=True)),
        (
            {"strategy": "beam", "beam_size": 3, "num_captions": 2, "mirror_view": "true"},
            DecodeOptions(strategy="beam", beam_size=3, num_captions=2, mirror_view=True),
        ),
    ],
    ids=["greedy", "beam-n-best", "beam-1", "sample-seeded", "greedy-short", "mirror", "mirror-beam"],
)
def test_engine_results_equal_offline_results(client, params, options):
    data = uploads.png(colour=(40, 160, 90), size=(30, 20))
    response = caption(client, data, **params)
    assert response.status_code == 200, response.text
    body = response.json()
    assert_same(body["captions"], offline(client, data, options))
    assert body["caption"] == body["captions"][0]["text"]


@pytest.mark.parametrize("size", [(40, 30), (257, 256), (600, 450)], ids=["inline", "just-over", "worker"])
def test_small_images_decode_on_the_loop_and_large_ones_in_a_worker_alike(client, size):
    """Uploads up to INLINE_DECODE_MAX_PIXELS decode on the event loop, larger ones in a worker
    thread; either way the captions are the offline ones and the reported size is the upload's."""
    from app.service import INLINE_DECODE_MAX_PIXELS

    assert (size[0] * size[1] <= INLINE_DECODE_MAX_PIXELS) == (size == (40, 30))
    data = uploads.encode(uploads.half_and_half(size), "PNG")
    response = caption(client, data)
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["image"]["width"], body["image"]["height"]) == size
    assert_same(body["captions"], offline(client, data, DecodeOptions()))


def test_beam_size_one_equals_greedy_and_beam_scores_at_least_as_well(client):
    greedy = caption(client).json()["captions"]
    assert caption(client, strategy="beam", beam_size=1).json()["captions"] == greedy
    n_best = caption(client, strategy="beam", beam_size=5, num_captions=5).json()["captions"]
    confidences = [c["confidence"] for c in n_best]
    assert confidences == sorted(confidences, reverse=True) and confidences[0] >= greedy[0]["confidence"]


def test_sampling_with_a_seed_repeats(client):
    params = {"strategy": "sample", "num_captions": 4, "seed": 123}
    first = caption(client, **params).json()["captions"]
    assert caption(client, **params).json()["captions"] == first
    assert caption(client, **{**params, "seed": 124}).json()["captions"] != first


@pytest.mark.parametrize(
    ("params", "fragment"),
    [
        ({"num_captions": 2}, "greedy decoding gives one caption"),
        ({"strategy": "beam", "beam_size": 2, "num_captions": 3}, "num_captions cannot exceed beam_size"),
        ({"strategy": "beam", "num_captions": 4}, "num_captions cannot exceed beam_size"),  # default beam is 3
        ({"beam_size": 4}, "beam_size applies to strategy=beam only"),
        ({"strategy": "sample", "beam_size": 4}, "beam_size applies to strategy=beam only"),
        ({"temperature": 0.5}, "temperature applies to strategy=sample only"),
        ({"strategy": "beam", "top_k": 3}, "top_k applies to strategy=sample only"),
        ({"strategy": "beam", "seed": 1}, "seed applies to strategy=sample only"),
    ],
)
def test_contradictory_or_impossible_combinations_are_422(client, params, fragment):
    assert_422(caption(client, **params), "invalid_parameters", fragment)
    assert_422(caption_many(client, [("a.png", uploads.png())], **params), "invalid_parameters", fragment)


@pytest.mark.parametrize(
    "params",
    [{"beam_size": 0}, {"beam_size": 11}, {"temperature": 0}, {"top_k": 0}, {"seed": -1}, {"attention": "maybe"}],
)
def test_out_of_range_values_are_schema_errors(client, params):
    assert_422(caption(client, strategy="sample", **params), "validation_error", next(iter(params)))


# --- attention -------------------------------------------------------------------------------------


def test_attention_gives_each_word_its_weights_over_the_grid(client):
    height, width = client.app.state.captioner.grid_shape
    body = caption(client, strategy="beam", beam_size=3, num_captions=2, attention="true").json()
    assert body["attention_grid"] == {"height": height, "width": width}
    for candidate in body["captions"]:
        assert " ".join(w["word"] for w in candidate["words"]) == candidate["text"]
        for word in candidate["words"]:
            assert len(word["attention"]) == height * width
            assert sum(word["attention"]) == pytest.approx(1.0, abs=1e-3)
            assert min(word["attention"]) >= 0.0


def test_without_attention_the_response_is_unchanged(client):
    body = caption(client, strategy="beam", num_captions=2).json()
    assert set(body) == {"caption", "captions", "model", "image", "timing_ms", "request_id"}
    assert all(set(candidate) == {"text", "confidence", "log_prob"} for candidate in body["captions"])


# --- POST /captions -----------------------------------------------------------------------------------


def test_each_image_gets_its_own_result_in_order(client):
    red, blue = uploads.png(colour=uploads.RED), uploads.jpeg(colour=uploads.BLUE, size=(40, 40))
    response = caption_many(
        client,
        [("red.png", red), ("notes.txt", uploads.TEXT), ("blue.jpg", blue), ("tiny.png", uploads.png(size=(4, 4)))],
        strategy="beam",
        beam_size=3,
        num_captions=2,
        attention="true",
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["request_id"] == response.headers["x-request-id"]
    results = body["results"]
    assert [(r["index"], r["filename"], r["ok"]) for r in results] == [
        (0, "red.png", True),
        (1, "notes.txt", False),
        (2, "blue.jpg", True),
        (3, "tiny.png", False),
    ]
    assert results[1]["error"]["code"] == "invalid_image" and results[3]["error"]["code"] == "image_too_small"
    assert set(results[1]) == {"index", "filename", "ok", "error"}
    beam = DecodeOptions(strategy="beam", beam_size=3, num_captions=2)
    for result, data in ((results[0], red), (results[2], blue)):
        assert_same(result["captions"], offline(client, data, beam))
        assert result["attention_grid"] and all(c["words"] for c in result["captions"])
        assert result["image"]["format"] in ("PNG", "JPEG") and result["timing_ms"]["total"] > 0


def test_a_model_that_cannot_word_a_mirrored_caption_refuses_the_mirror_view(client, monkeypatch):
    """A vocabulary with "left" but not "right" (captioning.mirror.mirror_permutation fails and the
    Captioner keeps None): 422 for /caption and /captions, and /model says so for the demo page."""
    monkeypatch.setattr(client.app.state.captioner, "mirror_permutation", None)
    assert_422(caption(client, mirror_view="true"), "invalid_parameters", "mirror_view")
    assert_422(caption_many(client, [("a.png", uploads.png())], mirror_view="true"), "invalid_parameters", "mirror")
    assert caption(client).status_code == 200
    assert client.get("/model").json()["mirror_view"] is False


def test_whole_request_errors_keep_the_error_shape(client):
    too_many = [(f"{i}.png", uploads.png()) for i in range(MAX_IMAGES + 1)]
    assert_422(caption_many(client, too_many), "too_many_images", f"limit is {MAX_IMAGES}")
    assert_422(client.post("/captions", data={"note": "no files"}), "validation_error", "images")
    unauthorised = client.post("/captions", files=[("images", ("a.png", uploads.png()))], headers={"X-API-Key": ""})
    assert unauthorised.status_code == 401 and unauthorised.json()["error"]["code"] == "unauthorized"
    # The byte limit covers the whole body: two files each under it, together over it.
    half = uploads.png() + b"\0" * 120_000
    oversized = caption_many(client, [("a.png", half), ("b.png", half)])
    assert oversized.status_code == 413 and oversized.json()["error"]["code"] == "upload_too_large"


def test_openapi_documents_the_parameters_and_the_batch_endpoint(client):
    schema = client.get("/openapi.json").json()
    caption_parameters = {p["name"] for p in schema["paths"]["/caption"]["post"]["parameters"]}
    assert caption_parameters == {
        "strategy",
        "beam_size",
        "num_captions",
        "max_length",
        "temperature",
        "top_k",
        "seed",
        "attention",
        "mirror_view",
        "grounded",
    }
    assert {p["name"] for p in schema["paths"]["/captions"]["post"]["parameters"]} == caption_parameters
    assert "422" in schema["paths"]["/captions"]["post"]["responses"]
    assert "/" not in schema["paths"]


def test_a_request_with_every_default_the_schema_declares_is_accepted_whatever_the_strategy(client):
    """Swagger UI's "Try it out" and generated SDKs (openapi-python-client) send each parameter's
    declared default: a declared beam_size=3 went out with strategy=greedy and was refused."""
    parameters = client.get("/openapi.json").json()["paths"]["/caption"]["post"]["parameters"]
    defaults = {p["name"]: p["schema"]["default"] for p in parameters if "default" in p["schema"]}
    assert not {"beam_size", "temperature", "top_k", "seed"} & defaults.keys()
    for strategy in ("greedy", "beam", "sample"):
        sent = {**defaults, "strategy": strategy}
        response = client.post("/caption", params=sent, files={"image": ("a.png", uploads.png())})
        assert response.status_code == 200, (sent, response.json())


def test_the_schema_marks_files_and_raw_bodies_binary_for_sdk_generators(client):
    """openapi-python-client and openapi-typescript read `format: binary`, not `contentMediaType`,
    as a file: without it they sent the image as a text part."""
    schema = client.get("/openapi.json").json()
    form = schema["components"]["schemas"]["Body_create_caption_caption_post"]["properties"]["image"]["anyOf"][0]
    many = schema["components"]["schemas"]["Body_create_captions_captions_post"]["properties"]["images"]["items"]
    raw = schema["paths"]["/caption"]["post"]["requestBody"]["content"]["application/octet-stream"]["schema"]
    for node in (form, many, raw):
        assert node["type"] == "string" and node["format"] == "binary", node


def test_a_utf8_file_name_sent_as_filename_star_comes_back_decoded(client):
    """aiohttp sends filename="%C3%BC..." and filename*=utf-8''%C3%BC...: the plain one came back
    percent-encoded, so results could not be matched to files by name."""
    body = (
        b'--B\r\nContent-Disposition: form-data; name="images"; filename="%C3%BCn%C3%AF.png"; '
        b"filename*=utf-8''%C3%BCn%C3%AF%20%281%29.png\r\nContent-Type: image/png\r\n\r\n"
        + uploads.png()
        + b'\r\n--B\r\nContent-Disposition: form-data; name="images"; filename="plain.png"\r\n\r\n'
        + uploads.png()
        + b"\r\n--B--\r\n"
    )
    response = client.post("/captions", content=body, headers={"Content-Type": "multipart/form-data; boundary=B"})
    assert [r["filename"] for r in response.json()["results"]] == ["ünï (1).png", "plain.png"]


def test_the_access_record_of_a_batch_names_its_failed_images(client, caplog):
    """A 200 whose images failed left no trace of them in the log."""
    import logging

    with caplog.at_level(logging.INFO, logger="app.access"):
        caption_many(client, [("a.png", uploads.png()), ("b.txt", uploads.TEXT), ("c.txt", uploads.TEXT)])
    (record,) = [r for r in caplog.records if r.name == "app.access"]
    assert record.status == 200 and record.image_errors == {"invalid_image": 2}
