"""In-process tests of every endpoint and every error, against one app (with its lifespan) on a
tiny random-weights bundle. The engine is the real one; a few tests swap in a stand-in to make it
report overload, a missed deadline or a shutdown on demand."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import shutil
import time

import pytest
import uploads
from fastapi.testclient import TestClient

from app.engine import ClientOverloaded, EngineStopped, InferenceError
from app.engine import DeadlineExceeded as EngineDeadlineExceeded
from app.engine import Overloaded as EngineOverloaded
from app.errors import ClientDisconnected
from app.logging_config import JsonFormatter
from app.main import StartupError, create_app
from app.service import Caller
from app.settings import Settings

pytestmark = [
    pytest.mark.filterwarnings("ignore:Using `httpx` with `starlette.testclient`"),
    pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning"),
]

API_KEY = "in-process-test-key"
MAX_UPLOAD_BYTES = 200_000


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return uploads.build_tiny_bundle(tmp_path_factory.mktemp("artifacts") / "tiny")


@pytest.fixture(scope="module")
def settings(bundle) -> Settings:
    return Settings(
        artifacts_dir=bundle,
        api_key=API_KEY,
        max_upload_bytes=MAX_UPLOAD_BYTES,
        max_image_pixels=4_000_000,
        request_timeout_s=20,
        max_batch_size=16,
    )


@pytest.fixture(scope="module")
def client(settings):
    with TestClient(create_app(settings), headers={"X-API-Key": API_KEY}) as client:
        yield client


@contextlib.contextmanager
def swapped_state(app, **values):
    """Temporarily replaces app.state attributes (monkeypatch would delete them on undo, as
    Starlette's State keeps them outside __dict__)."""
    saved = {name: getattr(app.state, name) for name in values}
    for name, value in values.items():
        setattr(app.state, name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(app.state, name, value)


@contextlib.contextmanager
def stand_in_engine(app, engine):
    """Swaps the engine under both the door check and the caption service."""
    service, saved = app.state.service, app.state.service.engine
    service.engine = engine
    try:
        with swapped_state(app, engine=engine):
            yield
    finally:
        service.engine = saved


def post_image(client, data: bytes, params=None, **kwargs):
    return client.post(
        "/caption", files={"image": ("upload.bin", data, "application/octet-stream")}, params=params, **kwargs
    )


def assert_error(response, status: int, code: str):
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert set(body) == {"error", "request_id"} and set(body["error"]) == {"code", "message"}
    assert body["error"]["code"] == code
    assert body["error"]["message"]
    assert body["request_id"] == response.headers["x-request-id"]
    return body


# --- health -------------------------------------------------------------------------------------


def test_health_live_and_ready(client):
    assert client.get("/health/live").json() == {"status": "alive"}
    assert client.get("/health/ready").json() == {"status": "ready"}
    for path in ("/health/live", "/health/ready"):  # load balancers that probe with HEAD
        response = client.head(path)
        assert response.status_code == 200 and response.content == b""


def test_a_text_field_where_the_image_belongs_is_named_plainly(client):
    response = client.post("/caption", data={"image": "hello"}, headers={"X-API-Key": API_KEY})
    message = assert_error(response, 422, "validation_error")["error"]["message"]
    assert message.startswith("image: must be a file (a form part with a filename), not a text field")
    assert "curl: -F image=@photo.png" in message


def test_form_mistakes_of_real_clients_get_messages_that_say_what_to_change(client):
    key = {"X-API-Key": API_KEY}
    # An image sent without a filename (requests' (None, data), form-data's append(name, buffer)):
    # over Starlette's 1 MB cap for text parts it was "Part exceeded maximum size of 1024KB." (the
    # handler directly: this app's upload limit is under 1 MB).
    import asyncio

    from starlette.exceptions import HTTPException
    from starlette.requests import Request

    handler = client.app.exception_handlers[HTTPException]
    request = Request({"type": "http", "method": "POST", "path": "/caption", "headers": [], "query_string": b""})
    answer = asyncio.run(handler(request, HTTPException(400, "Part exceeded maximum size of 1024KB.")))
    assert answer.status_code == 422 and b"without a filename is a text field" in answer.body
    full = HTTPException(400, "There was an error parsing the body")
    full.__cause__ = OSError(28, "No space left on device")
    answer = asyncio.run(handler(request, full))
    assert answer.status_code == 507 and b"insufficient_storage" in answer.body
    # Content-Type set by hand for a FormData, without the boundary the library would add.
    bare = client.post("/caption", content=b"--x\r\n", headers={**key, "Content-Type": "multipart/form-data"})
    assert "let the HTTP library set" in assert_error(bare, 400, "bad_request")["error"]["message"]
    # A hand-built body with LF line ends.
    part = b'--XyZ\nContent-Disposition: form-data; name="image"; filename="a.png"\n\n' + uploads.png() + b"\n--XyZ--\n"
    lf = client.post("/caption", content=part, headers={**key, "Content-Type": "multipart/form-data; boundary=XyZ"})
    assert "CRLF" in assert_error(lf, 400, "bad_request")["error"]["message"]


def test_the_form_parsers_own_limits_are_named_in_their_errors(client):
    """Limits of the multipart parser that were neither settings nor explained: a form of more
    files than MAX_IMAGES_PER_REQUEST stops at the parser (not after spooling a thousand files),
    text fields past that count are named as such, and a part with too many header lines no longer
    gets the advice to fix line ends that were right."""
    most = client.app.state.settings.max_images_per_request
    png = uploads.png()

    def form(parts: list[bytes]) -> bytes:
        return b"".join(parts) + b"--XyZ--\r\n"

    def part(name: str, data: bytes, filename: str | None = "a.png", extra: bytes = b"") -> bytes:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        return f"--XyZ\r\nContent-Disposition: {disposition}\r\n".encode() + extra + b"\r\n" + data + b"\r\n"

    headers = {"Content-Type": "multipart/form-data; boundary=XyZ"}
    files = client.post("/captions", content=form([part("images", png)] * (most + 1)), headers=headers)
    assert f"more than {most} files" in assert_error(files, 422, "too_many_images")["error"]["message"]
    fields = form([part(f"note{i}", b"x", None) for i in range(most + 1)] + [part("image", png)])
    message = assert_error(client.post("/caption", content=fields, headers=headers), 400, "bad_request")
    assert f"more than {most} text fields" in message["error"]["message"]
    nine_headers = form([part("image", png, extra=b"X-Note: a\r\n" * 8)])
    message = assert_error(client.post("/caption", content=nine_headers, headers=headers), 400, "bad_request")
    assert "at most 8 header lines" in message["error"]["message"]
    assert (
        client.post(
            "/caption", content=form([part("image", png, extra=b"X-Note: a\r\n" * 6)]), headers=headers
        ).status_code
        == 200
    )


def test_the_demo_files_are_sent_whole_whatever_the_range_header_says(client):
    """Starlette's FileResponse answered a malformed or unsatisfiable Range in plain text (400, 416)."""
    page = client.get("/").content
    for path, whole in (("/", page), ("/static/app.js", None), ("/static/samples/dark.png", None)):
        whole = whole if whole is not None else client.get(path).content
        for value in ("bytes=x", "bytes=5-1", "items=0-1", "bytes=99999999-", "bytes=0-9"):
            answer = client.get(path, headers={"Range": value})
            assert answer.status_code == 200 and answer.content == whole, (path, value)
        # A browser revalidating what it holds gets 304 (FileResponse's validators, kept by an ETag).
        tag = client.get(path).headers["etag"]
        assert client.get(path, headers={"If-None-Match": f'W/"x", {tag}'}).status_code == 304
        assert client.get(path, headers={"If-None-Match": '"other"'}).content == whole


def test_a_form_cut_before_its_closing_boundary_is_named_as_such(client):
    part = b'--XyZ\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n\r\n' + uploads.png()
    headers = {"Content-Type": "multipart/form-data; boundary=XyZ", "X-API-Key": API_KEY}
    cut = client.post("/caption", content=part + b"\r\n", headers=headers)
    assert "closing boundary" in assert_error(cut, 422, "validation_error")["error"]["message"]
    # A complete form without the field keeps the plain hint.
    other = client.post("/caption", content=part.replace(b'"image"', b'"photo"') + b"\r\n--XyZ--\r\n", headers=headers)
    message = assert_error(other, 422, "validation_error")["error"]["message"]
    assert message.startswith("image: Field required (send the image as the multipart field")


def test_an_unknown_query_parameter_is_refused_not_ignored(client):
    """A typo (num_caption for num_captions) used to be ignored: one caption came back, not three."""
    response = post_image(client, uploads.png(), params={"strategy": "beam", "num_caption": 3})
    message = assert_error(response, 422, "validation_error")["error"]["message"]
    assert message.startswith("query.num_caption: unknown parameter")


def test_captions_with_a_body_that_is_not_a_form_is_415_naming_the_field(client):
    """It was 422 'images: Field required', with no word about the body's type."""
    for content_type, body in (("application/json", b'{"images": []}'), ("image/png", uploads.png())):
        response = client.post("/captions", content=body, headers={"Content-Type": content_type, "X-API-Key": API_KEY})
        message = assert_error(response, 415, "unsupported_media_type")["error"]["message"]
        assert content_type in message and "`images`" in message
    # A form without the field is still the 422 of a missing field.
    form = client.post("/captions", files={"photo": ("a.png", uploads.png())}, headers={"X-API-Key": API_KEY})
    assert_error(form, 422, "validation_error")


def test_a_parameter_given_twice_is_refused_not_resolved_silently(client):
    response = post_image(client, uploads.png(), params=[("strategy", "beam"), ("strategy", "sample")])
    assert "given more than once: strategy" in assert_error(response, 422, "invalid_parameters")["error"]["message"]


def test_a_trailing_slash_is_a_json_404_not_an_empty_redirect(client):
    response = client.post("/caption/", files={"image": ("a.png", uploads.png())}, headers={"Host": "evil.example"})
    assert_error(response, 404, "not_found")


def test_ready_is_503_before_start_up_but_live_is_200(settings):
    not_started = TestClient(create_app(settings))  # no `with`: the lifespan never runs
    assert not_started.get("/health/live").status_code == 200
    response = not_started.get("/health/ready")
    assert_error(response, 503, "not_ready")
    assert int(response.headers["retry-after"]) > 0
    assert_error(post_image(not_started, uploads.png(), headers={"X-API-Key": API_KEY}), 503, "not_ready")


def test_ready_is_503_while_shutting_down(client):
    with swapped_state(client.app, stopping=True):
        assert "shutting down" in assert_error(client.get("/health/ready"), 503, "not_ready")["error"]["message"]
        assert_error(post_image(client, uploads.png()), 503, "not_ready")


# --- captioning -----------------------------------------------------------------------------------


def test_caption_png(client):
    response = post_image(client, uploads.png(size=(32, 24)))
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["caption"] == body["captions"][0]["text"] and body["caption"]
    (best,) = body["captions"]  # greedy: one entry
    assert 0.0 <= best["confidence"] <= 1.0 and best["log_prob"] <= 0.0
    assert body["model"] == {"name": "tiny-test-captioner", "version": "0.0.1"}
    assert body["image"] == {"width": 32, "height": 24, "format": "PNG"}
    assert set(body["timing_ms"]) == {"decode", "queue", "inference", "total"}
    assert body["timing_ms"]["total"] >= body["timing_ms"]["inference"] > 0
    assert body["request_id"] == response.headers["x-request-id"] and len(body["request_id"]) == 32


@pytest.mark.parametrize(
    ("data", "expected_image"),
    [
        (uploads.jpeg(size=(40, 30)), {"width": 40, "height": 30, "format": "JPEG"}),
        (uploads.rgba_png_with_hidden_black(), {"width": 16, "height": 16, "format": "PNG"}),
        (uploads.cmyk_jpeg(), {"width": 24, "height": 24, "format": "JPEG"}),
        (uploads.animated_gif(), {"width": 16, "height": 16, "format": "GIF"}),
        (uploads.exif_rotated_jpeg(orientation=6), {"width": 20, "height": 40, "format": "JPEG"}),
        (uploads.webp(), {"width": 16, "height": 16, "format": "WEBP"}),
        (uploads.sixteen_bit_png(), {"width": 16, "height": 16, "format": "PNG"}),
        (uploads.one_bit_bmp(), {"width": 16, "height": 16, "format": "BMP"}),
        (uploads.grey_tiff(), {"width": 16, "height": 16, "format": "TIFF"}),
    ],
    ids=["jpeg", "rgba", "cmyk", "animated-gif", "exif-rotated", "webp", "16-bit", "1-bit", "tiff"],
)
def test_caption_accepts_every_allowed_format_and_mode(client, data, expected_image):
    response = post_image(client, data)
    assert response.status_code == 200, response.text
    assert response.json()["image"] == expected_image


def test_client_content_type_is_ignored(client):
    response = client.post("/caption", files={"image": ("photo.jpg", uploads.png(), "image/jpeg")})
    assert response.json()["image"]["format"] == "PNG"


@pytest.mark.parametrize("content_type", ["image/png", "image/jpeg", "application/octet-stream", "image/png; q=1"])
def test_raw_body_upload_gives_the_same_answer_as_multipart(client, content_type):
    data = uploads.png(size=(32, 24))
    raw = client.post("/caption", content=data, headers={"Content-Type": content_type}, params={"max_length": 5})
    form = post_image(client, data, params={"max_length": 5})
    assert raw.status_code == 200, raw.text
    assert raw.json()["image"] == {"width": 32, "height": 24, "format": "PNG"}  # the bytes decide the format
    assert raw.json()["captions"] == form.json()["captions"]


def test_raw_body_errors_are_the_multipart_ones(client):
    raw = {"Content-Type": "image/png"}
    assert_error(client.post("/caption", content=b"not an image", headers=raw), 400, "invalid_image")
    assert_error(client.post("/caption", content=b"", headers=raw), 400, "invalid_image")
    assert_error(client.post("/caption", content=uploads.png(size=(7, 7)), headers=raw), 422, "image_too_small")
    assert_error(client.post("/caption", content=uploads.SVG, headers=raw), 415, "unsupported_image_format")
    # over the limit by less than the multipart framing allowance: the exact limit still holds
    too_big = uploads.png() + b"\0" * MAX_UPLOAD_BYTES
    body = assert_error(client.post("/caption", content=too_big, headers=raw), 413, "upload_too_large")
    assert str(MAX_UPLOAD_BYTES) in body["error"]["message"]


def test_a_body_without_content_type_is_the_image(client):
    """HTTP libraries send raw bytes without a Content-Type (requests' data=, httpx's content=)."""
    response = client.post("/caption", content=uploads.png(size=(32, 24)))
    assert response.status_code == 200, response.text
    assert response.json()["image"]["format"] == "PNG"


def test_a_form_encoded_image_gets_a_hint(client):
    """curl --data-binary without -H sends application/x-www-form-urlencoded."""
    headers = {"Content-Type": "application/x-www-form-urlencoded"}
    body = assert_error(client.post("/caption", content=b"abc", headers=headers), 422, "validation_error")
    assert "Content-Type: image/png" in body["error"]["message"]
    assert "curl --data-binary" in body["error"]["message"] and "Field required" not in body["error"]["message"]


def test_a_client_leaving_during_a_raw_body_is_not_a_server_error(settings):
    from starlette.requests import Request

    from app.dependencies import get_image_bytes

    messages = [{"type": "http.request", "body": b"\x89PNG", "more_body": True}, {"type": "http.disconnect"}]

    async def receive():
        return messages.pop(0)

    scope = {"type": "http", "method": "POST", "path": "/caption", "headers": [(b"content-type", b"image/png")]}
    with pytest.raises(ClientDisconnected):
        asyncio.run(get_image_bytes(Request(scope, receive), settings, None))


def leave_mid_body(client, path: str, content_type: bytes, body_start: bytes) -> list[dict]:
    """Drives the app as a client that sends the start of a 1000-byte body and disconnects; the
    ASGI messages the app sent back."""
    messages = [{"type": "http.request", "body": body_start, "more_body": True}, {"type": "http.disconnect"}]
    sent = []

    async def receive():
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    headers = [(b"host", b"x"), (b"content-type", content_type), (b"content-length", b"1000")]
    headers.append((b"x-api-key", API_KEY.encode()))
    scope = {"type": "http", "http_version": "1.1", "method": "POST", "path": path}
    scope.update(headers=headers, query_string=b"", scheme="http", server=("x", 80), client=("c", 1), root_path="")
    scope["app"] = client.app
    client.portal.call(client.app, scope, receive, send)
    return sent


def test_a_client_leaving_during_an_inference_protocol_body_is_499_not_500(client):
    """It was an unhandled ClientDisconnect: a 500, an ERROR traceback, and a 5xx alert fed by clients."""
    sent = leave_mid_body(client, "/v2/models/default/infer", b"application/json", b'{"inputs": [')
    assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 499


@pytest.mark.parametrize("path", ["/caption", "/captions"])
def test_a_client_leaving_during_a_form_is_499_not_400(client, path):
    """FastAPI parses the form before the route and made the disconnect a 400 bad_request: the
    logs and the error counter blamed the client's request for the client leaving."""
    head = b'--XX\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\nContent-Type: image/png\r\n\r\n'
    sent = leave_mid_body(client, path, b"multipart/form-data; boundary=XX", head + b"\x89PNG")
    assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 499
    assert json.loads(sent[1]["body"])["error"]["code"] == "client_closed_request"


def test_body_of_another_type_is_415(client):
    for content_type in ("application/json", "text/plain"):
        response = client.post("/caption", content=b'{"image": "x"}', headers={"Content-Type": content_type})
        body = assert_error(response, 415, "unsupported_media_type")
        assert "multipart field `image`" in body["error"]["message"] and "image/png" in body["error"]["message"]


def test_max_length_caps_the_caption(client):
    response = post_image(client, uploads.png(), params={"max_length": 2})
    assert response.status_code == 200
    assert len(response.json()["caption"].split()) == 2  # the tiny model never ends early


def test_beam_search_returns_n_best_captions(client):
    body = post_image(client, uploads.png(), params={"strategy": "beam", "beam_size": 4, "num_captions": 3}).json()
    assert len(body["captions"]) == 3
    assert body["caption"] == body["captions"][0]["text"]


def test_contradictory_combinations_are_refused(client):
    # The full rule set is tested in test_service_decoding.py.
    assert_error(post_image(client, uploads.png(), params={"num_captions": 3}), 422, "invalid_parameters")
    params = {"strategy": "beam", "beam_size": 1, "num_captions": 2}
    assert_error(post_image(client, uploads.png(), params=params), 422, "invalid_parameters")
    sampled = post_image(client, uploads.png(), params={"strategy": "sample", "num_captions": 2}).json()
    assert len(sampled["captions"]) == 2


def test_request_id_is_taken_from_the_header_when_sane(client):
    response = client.get("/health/live", headers={"X-Request-ID": "trace-123.abc"})
    assert response.headers["x-request-id"] == "trace-123.abc"
    body = post_image(client, uploads.png(), headers={"X-Request-ID": "caption-req-1"}).json()
    assert body["request_id"] == "caption-req-1"
    unsafe = client.get("/health/live", headers={"X-Request-ID": "bad id\twith spaces" + "x" * 200})
    assert unsafe.headers["x-request-id"] != "bad id\twith spaces" and len(unsafe.headers["x-request-id"]) == 32


# --- errors ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [b"", uploads.TEXT, uploads.corrupt_png(), uploads.truncated_jpeg()],
    ids=["zero-bytes", "text", "corrupt", "truncated"],
)
def test_undecodable_upload_is_400(client, data):
    assert_error(post_image(client, data), 400, "invalid_image")


@pytest.mark.parametrize("data", [uploads.ico(), uploads.SVG], ids=["ico", "svg"])
def test_format_outside_the_allow_list_is_415(client, data):
    body = assert_error(post_image(client, data), 415, "unsupported_image_format")
    assert "JPEG, PNG, WebP, GIF, BMP, TIFF" in body["error"]["message"]


def test_missing_field_is_422(client):
    assert_error(
        client.post("/caption", files={"other": ("a.png", uploads.png(), "image/png")}), 422, "validation_error"
    )
    assert_error(client.post("/caption"), 422, "validation_error")


@pytest.mark.parametrize(
    "params",
    [{"max_length": 0}, {"max_length": "long"}, {"strategy": "best"}, {"num_captions": 11}, {"beam_size": -1}],
)
def test_bad_parameters_are_422(client, params):
    body = assert_error(post_image(client, uploads.png(), params=params), 422, "validation_error")
    assert next(iter(params)) in body["error"]["message"]


def test_decompression_bomb_is_422_from_the_header(client):
    body = assert_error(post_image(client, uploads.png_header_only(5000, 5000)), 422, "image_too_large")
    assert "4000000" in body["error"]["message"]
    assert_error(post_image(client, uploads.bomb_png()), 422, "image_too_large")


def test_tiny_image_is_422(client):
    assert_error(post_image(client, uploads.png(size=(7, 7))), 422, "image_too_small")


def test_upload_over_the_limit_is_413_from_content_length(client):
    body = assert_error(post_image(client, b"\0" * (MAX_UPLOAD_BYTES + 20_000)), 413, "upload_too_large")
    assert str(MAX_UPLOAD_BYTES) in body["error"]["message"]


def test_upload_over_the_limit_is_413_while_streaming(client):
    boundary = "test-boundary"
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n'
        "Content-Type: image/png\r\n\r\n"
    ).encode()
    sent = []

    def body():  # no Content-Length: the server only learns the size by counting
        yield head
        for _ in range(100):
            sent.append(1)
            yield b"\0" * 16_384

    response = client.post(
        "/caption", content=body(), headers={"Content-Type": f"multipart/form-data; boundary={boundary}"}
    )
    assert_error(response, 413, "upload_too_large")


def test_file_just_over_the_limit_is_413_even_within_the_framing_allowance(client):
    assert_error(post_image(client, uploads.png() + b"\0" * MAX_UPLOAD_BYTES), 413, "upload_too_large")


def test_unknown_route_and_method_use_the_error_shape(client):
    assert_error(client.get("/nope"), 404, "not_found")
    response = client.get("/caption")
    assert (
        assert_error(response, 405, "method_not_allowed")["error"]["message"]
        == "GET is not allowed on /caption; use POST"
    )
    assert response.headers["allow"] == "POST"


class StandInEngine:
    """Raises whatever a test needs from submit(); ready like a running engine, with room in its
    queue (the admission gate lets requests through)."""

    ready = True

    def __init__(self, error: Exception):
        self.error = error
        self.clients: list[str] = []

    def check_admission(self, arriving=0):
        pass

    async def wait_for_client_room(self, client, timeout_s):
        return False

    async def submit(self, image, options, deadline_s, client=""):
        self.clients.append(client)
        raise self.error


@pytest.mark.parametrize(
    ("error", "status", "code", "retry_after"),
    [
        (EngineOverloaded(2.2), 503, "overloaded", "3"),  # whole seconds, rounded up
        (ClientOverloaded(2.2, 128), 429, "too_many_queued", "3"),  # this client's share of the queue
        (EngineDeadlineExceeded("late"), 504, "deadline_exceeded", None),
        (EngineDeadlineExceeded("late, in the queue", 4.1), 504, "deadline_exceeded", "5"),
        (EngineStopped("stopping"), 503, "not_ready", "5"),
        (InferenceError("boom"), 500, "inference_failed", None),
    ],
)
def test_engine_errors_map_to_statuses(client, error, status, code, retry_after):
    with stand_in_engine(client.app, StandInEngine(error)):
        response = post_image(client, uploads.png())
    assert_error(response, status, code)
    assert response.headers.get("retry-after") == retry_after


@pytest.mark.parametrize(
    ("error", "status"),
    [
        (EngineOverloaded(2.2), 503),
        (ClientOverloaded(2.2, 8), 429),
        (EngineDeadlineExceeded("late"), 504),
        (InferenceError("boom"), 500),
    ],
)
def test_engine_errors_on_the_inference_protocol_have_its_error_shape(client, error, status):
    """tritonclient shows the protocol's {"error": "message"} string; the engine's errors escaped the
    OIP routes' handling and came back in /caption's shape (a dict where it expects the message)."""
    import base64

    name = client.get("/v2/models/default").json()["name"]
    image = {"name": "image", "shape": [1], "datatype": "BYTES", "data": [base64.b64encode(uploads.png()).decode()]}
    with stand_in_engine(client.app, StandInEngine(error)):
        response = client.post(f"/v2/models/{name}/infer", json={"inputs": [image]})
    assert response.status_code == status, response.json()
    assert isinstance(response.json()["error"], str) and set(response.json()) == {"error"}


def test_a_shape_of_huge_dimensions_is_refused_with_a_short_message(client):
    """The product of three 2000-digit dimensions has more digits than Python prints (a 500 before);
    the count stops once it passes the limit, and the message shows no such number."""
    import base64

    data = [base64.b64encode(uploads.png()).decode()]
    huge = int("9" * 2000)
    for shape, status in (([huge, huge, huge], 422), ([2**62, 2**62], 422), ([2] * 500, 422), ([3, 0, huge], 400)):
        image = {"name": "image", "shape": shape, "datatype": "BYTES", "data": data}
        response = client.post("/v2/models/default/infer", json={"inputs": [image]})
        assert response.status_code == status, response.json()
        message = response.json()["error"]
        assert len(message) < 200 and "999" not in message, message


def test_every_route_hands_the_engine_the_clients_address_for_its_turn(client):
    """The engine's queue and the decode budget take turns by client address: /caption, /captions
    and the inference protocol all say whose request it is (TestClient's address is "testclient")."""
    import base64

    engine = StandInEngine(EngineOverloaded(1.0))
    image = {"name": "image", "shape": [1], "datatype": "BYTES", "data": [base64.b64encode(uploads.png()).decode()]}
    with stand_in_engine(client.app, engine):
        post_image(client, uploads.png())
        client.post("/captions", files=[("images", ("a.png", uploads.png(), "image/png"))])
        client.post("/v2/models/default/infer", json={"inputs": [image]})
    assert engine.clients == ["testclient"] * 3


def test_a_compressed_body_is_415_naming_the_coding_in_each_routes_shape(client):
    """Read as it was, a gzipped PNG was "not a recognisable image" and tritonclient's compressed
    JSON "Invalid JSON": the header was ignored."""
    import gzip

    squeezed = gzip.compress(uploads.png())
    response = client.post(
        "/caption", content=squeezed, headers={"Content-Type": "image/png", "Content-Encoding": "gzip"}
    )
    assert "Content-Encoding gzip" in assert_error(response, 415, "unsupported_content_encoding")["error"]["message"]
    response = client.post(
        "/v2/models/default/infer", content=gzip.compress(b"{}"), headers={"Content-Encoding": "gzip"}
    )
    assert response.status_code == 415 and "Content-Encoding gzip" in response.json()["error"]
    plain = client.post(
        "/caption", content=uploads.png(), headers={"Content-Type": "image/png", "Content-Encoding": "identity"}
    )
    assert plain.status_code == 200


def test_inference_protocol_base64_as_encoders_and_browsers_write_it(client):
    """GNU base64 without -w0 and MIME encoders wrap lines; FileReader.readAsDataURL() adds a data URL
    prefix: both were refused as "not valid base64"."""
    import base64

    data = uploads.png()
    plain = base64.b64encode(data).decode()

    def infer(text):
        image = {"name": "image", "shape": [1], "datatype": "BYTES", "data": [text]}
        return client.post("/v2/models/default/infer", json={"inputs": [image]})

    expected = infer(plain).json()["outputs"]
    assert infer(base64.encodebytes(data).decode()).json()["outputs"] == expected  # wrapped at 76
    assert infer("data:image/png;base64," + plain).json()["outputs"] == expected
    refused = infer(base64.urlsafe_b64encode(b"\xfb\xff" + data).decode())
    assert refused.status_code == 400 and "standard alphabet" in refused.json()["error"]


def test_inference_protocol_parameters_must_have_their_json_type(client):
    import base64

    image = {"name": "image", "shape": [1], "datatype": "BYTES", "data": [base64.b64encode(uploads.png()).decode()]}

    def infer(parameters):
        return client.post("/v2/models/default/infer", json={"inputs": [image], "parameters": parameters})

    for wrong in ({"strategy": "sample", "seed": True}, {"strategy": "beam", "beam_size": "3"}, {"max_length": 1.0}):
        assert infer(wrong).status_code == 422, wrong
    assert infer({"strategy": "sample", "temperature": 2, "seed": 7}).status_code == 200  # an int for a float
    nan = client.post(
        "/caption", params={"strategy": "sample", "temperature": "nan"}, files={"image": ("a.png", uploads.png())}
    )
    assert "finite" in assert_error(nan, 422, "validation_error")["error"]["message"]


def test_inference_protocol_outputs_are_those_the_model_has(client):
    """The tiny model has neither a domain check nor a scene head: its metadata lists the four
    caption outputs, a request naming none gets those, and naming another is refused unanswered."""
    import base64

    outputs = client.get("/v2/models/default").json()["outputs"]
    assert [o["name"] for o in outputs] == ["caption", "captions", "scores", "confidence"]
    image = {"name": "image", "shape": [1], "datatype": "BYTES", "data": [base64.b64encode(uploads.png()).decode()]}
    answer = client.post("/v2/models/default/infer", json={"inputs": [image]}).json()
    assert [o["name"] for o in answer["outputs"]] == ["caption", "captions", "scores", "confidence"]
    for name in ("in_domain", "agrees_with_scene", "written_from_scene"):
        refused = client.post("/v2/models/default/infer", json={"inputs": [image], "outputs": [{"name": name}]})
        assert refused.status_code == 400 and "unknown outputs" in refused.json()["error"]


def test_inference_protocol_tensors_of_images_with_fewer_captions_are_padded():
    """Per-image and per-caption outputs side by side, for two images with 2 and 1 captions, in
    JSON and in the binary layout (BOOL one byte per element)."""
    import struct
    from types import SimpleNamespace

    import numpy as np

    from app.routes.oip import HEADER_LENGTH, InferenceRequest, RequestOutput, inference_response, serialize_bytes
    from captioning.decoding import Caption

    def fields(captions, in_domain, score):
        return SimpleNamespace(captions=captions, in_domain=in_domain, domain_score=score)

    a = Caption("a", [], -1.0, 0.9, agrees_with_scene=True)
    b = Caption("b", [], -2.0, 0.5, agrees_with_scene=False)
    c = Caption("c", [], None, 0.7, agrees_with_scene=True, written_from_scene=True)
    results = [fields([a, b], True, 0.8), fields([c], False, 0.2)]
    model = SimpleNamespace(name="m", version=1)
    names = ["caption", "agrees_with_scene", "in_domain", "domain_score", "scores", "written_from_scene"]
    request = InferenceRequest(inputs=[], outputs=[RequestOutput(name=n) for n in names])
    body = json.loads(inference_response(model, request, request.outputs, results).body)
    tensors = {o["name"]: o for o in body["outputs"]}
    assert tensors["caption"]["shape"] == [2] and tensors["caption"]["data"] == ["a", "c"]
    assert tensors["agrees_with_scene"] == {"name": "agrees_with_scene", "datatype": "BOOL", "shape": [2, 2],
                                            "data": [True, False, True, False]}  # fmt: skip
    assert tensors["in_domain"]["data"] == [True, False] and tensors["in_domain"]["shape"] == [2]
    assert tensors["domain_score"]["data"] == pytest.approx([0.8, 0.2])
    assert tensors["scores"]["data"] == [-1.0, -2.0, None, None]  # written, then padding: NaN, null in JSON
    assert tensors["written_from_scene"]["data"] == [False, False, True, False]  # tells the two apart

    binary = InferenceRequest(inputs=[], outputs=request.outputs, parameters={"binary_data_output": True})
    response = inference_response(model, binary, binary.outputs, results)
    header_length = int(response.headers[HEADER_LENGTH])
    header, data = json.loads(response.body[:header_length]), response.body[header_length:]
    sizes = [o["parameters"]["binary_data_size"] for o in header["outputs"]]
    chunks = dict(zip(names, (data[sum(sizes[:i]) : sum(sizes[: i + 1])] for i in range(len(sizes)))))
    assert chunks["caption"] == serialize_bytes(["a", "c"])
    assert chunks["agrees_with_scene"] == bytes([1, 0, 1, 0]) and chunks["in_domain"] == bytes([1, 0])
    assert chunks["written_from_scene"] == bytes([0, 0, 1, 0])
    assert struct.unpack("<2f", chunks["domain_score"]) == pytest.approx((0.8, 0.2))
    scores = struct.unpack("<4f", chunks["scores"])
    assert scores[:2] == (-1.0, -2.0) and np.isnan(scores[2]) and np.isnan(scores[3])


def test_unknown_inference_protocol_paths_and_methods_have_its_error_shape(client):
    for response in (client.get("/v2/repository/index"), client.get("/v2/models/x/config"), client.put("/v2")):
        assert response.status_code in (404, 405)
        assert set(response.json()) == {"error"} and isinstance(response.json()["error"], str)
    assert client.get("/v2x").json()["error"]["code"] == "not_found"  # not the protocol's path


def test_a_full_queue_is_refused_at_the_door_with_the_service_error_shape(client):
    """app.guards.UploadGuard answers before the upload is read: nothing reaches the engine."""

    class FullEngine(StandInEngine):
        def check_admission(self, arriving=0):
            raise EngineOverloaded(1.5)

        async def wait_for_client_room(self, client, timeout_s):
            return False

    engine = FullEngine(AssertionError("submit must not be reached"))
    with stand_in_engine(client.app, engine):
        response = post_image(client, uploads.png(), headers={"X-Request-ID": "full-queue-1"})
    body = assert_error(response, 503, "overloaded")
    assert body["request_id"] == "full-queue-1" and response.headers["retry-after"] == "2"


def test_deadline_already_spent_is_504(client):
    impatient = client.app.state.settings.model_copy(update={"request_timeout_s": 1e-9})
    service = client.app.state.service
    saved, service.settings = service.settings, impatient
    try:
        assert_error(post_image(client, uploads.png()), 504, "deadline_exceeded")
    finally:
        service.settings = saved


def service_with(engine, **settings_overrides):
    """A CaptionService around a stand-in engine, for the give-up paths."""
    from app.service import CaptionService

    settings = Settings(**{"request_timeout_s": 10, **settings_overrides})
    return CaptionService(settings, captioner=None, engine=engine, decoder=None)


def test_client_disconnect_cancels_the_engine_call():
    cancelled = asyncio.Event()

    async def slow_work():
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    async def receive():
        await asyncio.sleep(0.05)
        return {"type": "http.disconnect"}

    async def scenario():
        service = service_with(engine=None)
        with pytest.raises(ClientDisconnected):
            await service._run_all([slow_work()], Caller(time.perf_counter(), receive))
        assert cancelled.is_set()

    asyncio.run(scenario())


def test_work_that_misses_its_deadline_is_abandoned_and_marked():
    async def stuck():
        await asyncio.sleep(30)

    async def quick():
        return "done"

    async def never_disconnects():
        await asyncio.sleep(60)
        return {"type": "http.disconnect"}

    async def scenario():
        service = service_with(engine=None, request_timeout_s=0.01)
        started = time.perf_counter()
        outcomes = await service._run_all([quick(), stuck()], Caller(started, never_disconnects))
        assert time.perf_counter() - started < 3  # the deadline plus the engine's grace
        return outcomes

    finished, late = asyncio.run(asyncio.wait_for(scenario(), 5))
    assert finished == "done" and isinstance(late, EngineDeadlineExceeded)


# --- auth ------------------------------------------------------------------------------------------


def test_api_key_is_required_for_caption_and_model(client):
    for response in (
        client.post("/caption", files={"image": ("a.png", uploads.png())}, headers={"X-API-Key": ""}),
        client.get("/model", headers={"X-API-Key": "wrong"}),
    ):
        assert_error(response, 401, "unauthorized")
        assert response.headers["www-authenticate"] == "Bearer"
    bearer = {"X-API-Key": "", "Authorization": f"Bearer {API_KEY}"}
    assert client.get("/model", headers=bearer).status_code == 200
    # Every credential offered must be right: a wrong one is refused even beside a right one.
    assert_error(client.get("/model", headers={"Authorization": "Bearer stale"}), 401, "unauthorized")
    assert_error(client.get("/model", headers={"Authorization": f"Basic {API_KEY}"}), 401, "unauthorized")


def test_health_and_metrics_need_no_key(settings, client):
    for path in ("/health/live", "/health/ready", "/metrics"):
        assert client.get(path, headers={"X-API-Key": ""}).status_code == 200


# --- model, metrics, docs, logs -------------------------------------------------------------------


def test_model_metadata_comes_from_the_manifest(client):
    info = client.get("/model").json()
    assert info["name"] == "tiny-test-captioner" and info["version"] == "0.0.1"
    assert info["backbone"] == "small_cnn" and info["image_size"] == 32
    assert info["vocabulary_size"] > 4 and info["max_caption_words"] == 10
    assert info["dataset"]["name"] == "shapes"
    assert info["metrics"] == {"test": {"exact_match": 0.0}}
    assert "build_tiny_bundle" in info["training_command"]
    assert info["feature_grid"] == [4, 4]
    assert info["mirror_view"] is True  # its vocabulary has "left" and "right"
    assert "tensorflow" in info["libraries"]


def test_metrics_exposes_http_and_engine_series(client):
    post_image(client, uploads.png())
    response = client.get("/metrics")
    assert response.headers["content-type"].startswith("text/plain")
    text = response.text
    assert 'captioning_http_requests_total{method="POST",route="/caption",status="200"}' in text
    assert "captioning_http_request_duration_seconds_bucket{" in text
    for name in (
        "engine_queue_depth",
        "engine_active_slots",
        "engine_programs_compiling",
        "engine_batch_size",
        "engine_encode_seconds",
        "engine_step_seconds",
        "engine_queue_wait_seconds",
        "engine_inference_seconds",
        "engine_rejections_total",
    ):
        assert f"captioning_{name}" in text


def test_openapi_documents_every_error_and_hides_metrics(client):
    schema = client.get("/openapi.json").json()
    assert "/metrics" not in schema["paths"]
    caption = schema["paths"]["/caption"]["post"]
    for status in ("400", "401", "413", "415", "422", "500", "503", "504"):
        content = caption["responses"][status]["content"]["application/json"]["schema"]
        assert content == {"$ref": "#/components/schemas/ErrorResponse"}
    assert "Retry-After" in caption["responses"]["503"]["headers"]
    assert set(caption["requestBody"]["content"]) == {"multipart/form-data", "image/*", "application/octet-stream"}
    assert caption["requestBody"]["content"]["multipart/form-data"]["schema"]["required"] == ["image"]
    assert "HTTPValidationError" not in schema["components"]["schemas"]
    assert set(schema["components"]["securitySchemes"]) == {"HTTPBearer", "APIKeyHeader"}
    assert client.get("/docs").status_code == 200


def test_without_api_key_the_schema_has_no_security(settings):
    schema = create_app(settings.model_copy(update={"api_key": None})).openapi()
    assert "securitySchemes" not in schema.get("components", {})
    assert "401" not in schema["paths"]["/caption"]["post"]["responses"]


def test_each_request_logs_one_structured_line(client, caplog):
    with caplog.at_level(logging.INFO, logger="app.access"):
        response = post_image(client, uploads.png(), headers={"X-Request-ID": "log-check-1"})
    (record,) = [r for r in caplog.records if r.name == "app.access"]
    line = json.loads(JsonFormatter().format(record))
    assert line["route"] == "/caption" and line["status"] == 200 and line["method"] == "POST"
    assert line["request_id"] == "log-check-1" == response.headers["x-request-id"]
    assert line["latency_ms"] > 0 and line["level"] == "INFO" and "error_code" not in line
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="app.access"):
        post_image(client, b"not an image")
    (record,) = [r for r in caplog.records if r.name == "app.access"]
    line = json.loads(JsonFormatter().format(record))
    assert line["error_code"] == "invalid_image"  # why, in the log alone
    assert line["model_version"] == 1  # which version answered (two serve during a hot swap)


def test_inference_protocol_errors_are_counted_and_logged_by_code(client, caplog):
    """They were all `unknown`: the protocol's error shape was made without the request."""
    from app.metrics import REGISTRY

    route = "/v2/models/{model_name}/infer"

    def count(code):
        return REGISTRY.get_sample_value("captioning_http_errors_total", {"route": route, "code": code}) or 0

    before = {
        code: count(code) for code in ("unauthorized", "bad_request", "not_found", "unsupported_content_encoding")
    }
    client.post("/v2/models/default/infer", json={}, headers={"X-API-Key": "wrong"})
    client.post("/v2/models/default/infer", content=b"{not json")
    client.post("/v2/models/nope/infer", json={})
    client.post("/v2/models/default/infer", content=b"x", headers={"Content-Encoding": "br"})
    assert {code: count(code) - before[code] for code in before} == dict.fromkeys(before, 1)


def test_unusual_methods_share_one_metrics_label(client):
    """A scan with every method the parser accepts made a series per method and route, for ever."""
    from app.metrics import REGISTRY

    for method in ("PROPFIND", "MKCOL", "LOCK"):
        client.request(method, "/caption")
    families = {
        sample.labels["method"]
        for metric in REGISTRY.collect()
        for sample in metric.samples
        if "method" in sample.labels
    }
    assert "other" in families and not {"PROPFIND", "MKCOL", "LOCK"} & families


# --- start-up ----------------------------------------------------------------------------------------


def test_tampered_bundle_stops_start_up_with_a_clear_message(bundle, tmp_path, settings):
    tampered = shutil.copytree(bundle, tmp_path / "tampered")
    (tampered / "vocab.json").write_text((tampered / "vocab.json").read_text().replace("circle", "square"))
    tampered_app = create_app(settings.model_copy(update={"artifacts_dir": tampered}))
    with pytest.raises(StartupError, match="vocab.json does not match its sha256"), TestClient(tampered_app):
        pass
    missing_app = create_app(settings.model_copy(update={"artifacts_dir": tmp_path / "missing"}))
    with pytest.raises(StartupError, match="not found"), TestClient(missing_app):
        pass


def test_startup_prepares_the_routes_without_a_logged_or_counted_request(settings, caplog, monkeypatch):
    """app.main.build_routes walks an unmatched path through the router before readiness, so that
    FastAPI prepares its routes then, not on the first user's request; the walk must not show up
    as a request in the access log or the metrics."""
    import fastapi.routing
    from prometheus_client import REGISTRY

    labels = {"method": "GET", "route": "unmatched", "status": "404"}
    before = REGISTRY.get_sample_value("captioning_http_requests_total", labels) or 0.0
    with caplog.at_level(logging.INFO, logger="app.access"), TestClient(create_app(settings)) as fresh:
        # FastAPI 0.16x's lazy route preparation (the private function is named here on purpose:
        # if FastAPI stops preparing routes lazily, this test says build_routes may go).
        prepared = []
        original = fastapi.routing._populate_api_route_state
        monkeypatch.setattr(
            fastapi.routing, "_populate_api_route_state", lambda *a, **k: prepared.append(1) or original(*a, **k)
        )
        assert fresh.get("/health/ready").status_code == 200
        assert fresh.get("/model", headers={"X-API-Key": API_KEY}).status_code == 200
        assert prepared == []  # done at start-up
    assert (REGISTRY.get_sample_value("captioning_http_requests_total", labels) or 0.0) == before
    logged = [r.path for r in caplog.records if r.name == "app.access"]
    assert logged == ["/health/ready", "/model"]  # the two requests, and nothing from start-up


def test_the_ready_record_names_the_device_the_model_runs_on(settings, caplog):
    """An operator can tell from the log whether a GPU host really uses its GPU."""
    with caplog.at_level(logging.INFO, logger="app.main"), TestClient(create_app(settings)):
        pass
    (ready,) = [r for r in caplog.records if r.name == "app.main" and r.getMessage() == "ready"]
    import tensorflow as tf

    assert ready.device == ("GPU:0" if tf.config.list_logical_devices("GPU") else "CPU")


def test_cors_is_off_by_default_and_answers_the_origins_it_is_given(settings):
    """A web front end on another origin: its preflight (with the key header) was 405 and its answers
    had no Access-Control-Allow-Origin, so the browser threw them away."""
    preflight = {
        "Origin": "https://app.example.com",
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "x-api-key",
    }
    with TestClient(create_app(settings)) as plain:
        assert plain.options("/caption", headers=preflight).status_code == 405
    allowed = settings.model_copy(update={"cors_origins": "https://app.example.com, https://other.example"})
    with TestClient(create_app(allowed)) as client:
        answer = client.options("/caption", headers=preflight)
        assert answer.status_code == 200
        assert answer.headers["access-control-allow-origin"] == "https://app.example.com"
        refused = client.post("/caption", content=b"x", headers={"Origin": "https://app.example.com"})
        assert (
            refused.status_code == 401 and refused.headers["access-control-allow-origin"] == "https://app.example.com"
        )
        evil = client.options("/caption", headers={**preflight, "Origin": "https://evil.example"})
        assert "access-control-allow-origin" not in evil.headers
        # Refused in the service's JSON shape (Starlette's own is plain text), with a request ID, and counted.
        error = assert_error(evil, 400, "cors_refused")["error"]
        assert "origin not allowed" in error["message"] and evil.headers["x-request-id"] == evil.json()["request_id"]
        put = client.options("/caption", headers={**preflight, "Access-Control-Request-Method": "PUT"})
        assert "method not allowed" in assert_error(put, 400, "cors_refused")["error"]["message"]
        from app.metrics import REGISTRY
        from app.middleware import UNMATCHED_ROUTE  # no route takes OPTIONS

        labels = {"route": UNMATCHED_ROUTE, "code": "cors_refused"}
        assert REGISTRY.get_sample_value("captioning_http_errors_total", labels) >= 2
