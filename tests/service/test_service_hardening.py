"""Hostile clients at small scale (issue #11; docs/HARDENING.md): empty captions, duplicate fields,
/captions under overload and past its deadline, the guards (key before the body, upload slots,
body deadline, shutdown grace), the error counter, and the decode memory budget."""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time

import numpy as np
import pytest
import uploads
from PIL import Image
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route

from app.decode_pool import DecodePool
from app.engine import Overloaded, Result
from app.errors import install_exception_handlers
from app.guards import Shutdown, ShutdownGuard, UploadGuard
from app.images import decode_bytes, decode_opened, decode_upload, open_upload
from app.metrics import REGISTRY
from app.settings import Settings
from captioning.decoding import Caption

pytestmark = [pytest.mark.filterwarnings("ignore:Using `httpx` with `starlette.testclient`")]

API_KEY = "hardening-key"


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    with uploads.tiny_service(
        tmp_path_factory, API_KEY, max_batch_size=8, min_image_side=1, request_timeout_s=5
    ) as client:
        yield client


@contextlib.contextmanager
def engine_swapped(app, engine, **settings):
    service = app.state.service
    saved = service.engine, service.settings, app.state.engine
    service.engine, app.state.engine = engine, engine
    service.settings = service.settings.model_copy(update=settings)
    try:
        yield
    finally:
        service.engine, service.settings, app.state.engine = saved


def error_of(response, status: int, code: str) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    assert response.json()["error"]["code"] == code
    return response.json()["error"]


# --- never a 200 without a caption -----------------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [
        uploads.png((0, 0, 0)),
        uploads.png((255, 255, 255)),
        uploads.png((0, 0, 0), size=(1, 1)),
        uploads.one_bit_bmp(),
        uploads.sixteen_bit_png(level=0),
    ],
    ids=["black", "white", "one-pixel", "bilevel", "16-bit-black"],
)
def test_no_empty_caption_with_200(client, data):
    response = client.post("/caption", files={"image": ("a.png", data)})
    if response.status_code == 200:
        assert response.json()["caption"].strip()
        assert all(candidate["text"].strip() for candidate in response.json()["captions"])
    else:
        error_of(response, 422, "no_caption")


class ScriptedEngine:
    """Answers submit() from a script: a caption text, an exception, or a hang."""

    ready = True

    def __init__(self, *answers):
        self.answers = list(answers)

    def check_admission(self, arriving=0):
        pass

    async def wait_for_client_room(self, client, timeout_s):
        return False

    async def submit(self, image, options, deadline_s, client=""):
        answer = self.answers.pop(0)
        if answer == "hang":
            await asyncio.sleep(60)
        if isinstance(answer, Exception):
            raise answer
        return Result([Caption(answer, answer.split(), -1.0, 0.5)], 0.0, 1.0)


def test_an_image_that_still_yields_no_words_gets_a_clear_error(client):
    with engine_swapped(client.app, ScriptedEngine("")):
        error_of(client.post("/caption", files={"image": ("a.png", uploads.png())}), 422, "no_caption")


# --- form and batch semantics ----------------------------------------------------------------------


def test_duplicate_image_fields_are_422_naming_the_field(client):
    files = [("image", ("a.png", uploads.png())), ("image", ("b.png", uploads.png()))]
    error = error_of(client.post("/caption", files=files), 422, "duplicate_field")
    assert "`image`" in error["message"]


def test_captions_all_refused_is_503_with_retry_after(client):
    with engine_swapped(client.app, ScriptedEngine(Overloaded(2.5), Overloaded(2.5))):
        response = client.post("/captions", files=[("images", ("a.png", uploads.png()))] * 2)
    error_of(response, 503, "overloaded")
    assert response.headers["retry-after"] == "3"


def test_captions_deadline_keeps_finished_captions_and_marks_the_rest(client):
    with engine_swapped(client.app, ScriptedEngine("a red circle", "hang"), request_timeout_s=0.3):
        started = time.monotonic()
        response = client.post(
            "/captions", files=[("images", ("a.png", uploads.png())), ("images", ("b.png", uploads.png()))]
        )
    assert time.monotonic() - started < 5
    assert response.status_code == 200, response.text
    first, second = response.json()["results"]
    assert first["ok"] and first["caption"] == "a red circle"
    assert not second["ok"] and second["error"]["code"] == "deadline_exceeded"


def test_captions_with_nothing_captioned_for_load_or_time_is_504_not_an_empty_200(client):
    """A 200 whose every result was deadline_exceeded or overloaded read as success to retry policies."""
    with engine_swapped(client.app, ScriptedEngine(Overloaded(1.0), "hang"), request_timeout_s=0.3):
        response = client.post("/captions", files=[("images", ("a.png", uploads.png()))] * 2)
    error_of(response, 504, "deadline_exceeded")
    # An image refused for its own fault keeps the per-image answer: the client has something to fix.
    with engine_swapped(client.app, ScriptedEngine("hang"), request_timeout_s=0.3):
        response = client.post(
            "/captions", files=[("images", ("a.png", uploads.png())), ("images", ("b.txt", uploads.TEXT))]
        )
    assert response.status_code == 200
    assert [r["error"]["code"] for r in response.json()["results"]] == ["deadline_exceeded", "invalid_image"]


def test_captions_with_one_refused_image_answers_the_others(client):
    with engine_swapped(client.app, ScriptedEngine("a red circle", Overloaded(1.0))):
        response = client.post("/captions", files=[("images", ("a.png", uploads.png()))] * 2)
    assert response.status_code == 200
    assert [result["ok"] for result in response.json()["results"]] == [True, False]
    assert response.json()["results"][1]["error"]["code"] == "overloaded"


# --- the guards, in front of a stand-in app -------------------------------------------------------


def guarded_app(body_reads: list, *, settings: Settings, handler_delay_s: float = 0.0) -> Starlette:
    async def caption(request):
        body_reads.append(len(await request.body()))
        await asyncio.sleep(handler_delay_s)
        return JSONResponse({"caption": "ok"})

    app = Starlette(routes=[Route("/caption", caption, methods=["POST"])])
    install_exception_handlers(app)  # the service's JSON errors, as in create_app
    app.state.engine = None
    app.add_middleware(
        UploadGuard,
        settings=settings,
        engine_of=lambda app: app.state.engine,
        key_accepted=lambda headers: headers.get("x-api-key") == API_KEY,
    )
    return app


def call(app, messages, *, watch_after_body_s: float = 0.0):
    """Calls the ASGI app with scripted body messages (each (delay_s, bytes, more)); returns
    what the scenario needs to run it. After the body, receive() waits like a live connection,
    then reports the disconnect after watch_after_body_s."""
    sent: list[dict] = []
    calls = [0]

    async def receive():
        calls[0] += 1
        if messages:
            delay, body, more = messages.pop(0)
            await asyncio.sleep(delay)
            return {"type": "http.request", "body": body, "more_body": more}
        await asyncio.sleep(watch_after_body_s)
        return {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    scope = {
        "type": "http",
        "method": "POST",
        "path": "/caption",
        "raw_path": b"/caption",
        "query_string": b"",
        "headers": [],
        "app": app,
    }
    return sent, calls, scope, receive, send


def run_call(app, scope_headers, messages, **kwargs):
    """(status, headers, JSON body, receive() calls) of one request."""
    sent, calls, scope, receive, send = call(app, messages, **kwargs)
    scope["headers"] = scope_headers
    asyncio.run(app(scope, receive, send))
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    headers = {k.decode(): v.decode() for k, v in start["headers"]}
    return start["status"], headers, json.loads(body), calls[0]


KEYED = [(b"x-api-key", API_KEY.encode())]


async def sent_messages(app, messages, client: str | None = None) -> list[dict]:
    """What the app sent for one keyed request with scripted body messages, from the client address
    `client` (none: the server knows no address)."""
    sent, _, scope, receive, send = call(app, messages)
    scope["headers"] = KEYED
    if client is not None:
        scope["client"] = (client, 50000)
    await app(scope, receive, send)
    return sent


async def answer_start(app, messages, client: str | None = None) -> dict:
    """The http.response.start message of one such request."""
    return next(m for m in await sent_messages(app, messages, client) if m["type"] == "http.response.start")


async def answer(app, messages, client: str | None = None) -> tuple[int, dict, dict]:
    """(status, JSON body, headers) of one such request."""
    sent = await sent_messages(app, messages, client)
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = json.loads(b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body"))
    return start["status"], body, {k.decode(): v.decode() for k, v in start["headers"]}


def test_a_keyless_upload_is_refused_before_its_body_is_read():
    reads = []
    status, headers, body, receives = run_call(guarded_app(reads, settings=Settings()), [], [(0, b"x" * 100, True)] * 5)
    assert status == 401 and body["error"]["code"] == "unauthorized"
    assert receives == 0 and reads == []


def test_a_trickling_body_gets_408_json():
    reads = []
    settings = Settings(body_timeout_s=0.2, min_upload_bytes_per_s=1000)
    trickle = [(0.1, b"x" * 10, True)] * 50  # 100 bytes/s, far below the minimum
    started = time.monotonic()
    status, _, body, _ = run_call(guarded_app(reads, settings=settings), KEYED, trickle)
    assert status == 408 and body["error"]["code"] == "body_timeout"
    assert time.monotonic() - started < 2 and reads == []


def test_the_body_deadline_ends_with_the_body_so_the_disconnect_watcher_is_not_timed_out():
    """After the last body message, receive() belongs to the server again: a handler (like the
    disconnect watcher) that waits on it longer than BODY_TIMEOUT_S is not answered 408."""
    settings = Settings(body_timeout_s=0.1, min_upload_bytes_per_s=1000)

    async def watcher_route(request):
        await request.body()
        message = await request.receive()  # waits 0.4 s: longer than the body deadline
        return JSONResponse({"watched": message["type"]})

    app = Starlette(routes=[Route("/caption", watcher_route, methods=["POST"])])
    app.state.engine = None
    app.add_middleware(UploadGuard, settings=settings, engine_of=lambda app: None, key_accepted=lambda headers: True)
    status, _, body, _ = run_call(app, KEYED, [(0, b"image", False)], watch_after_body_s=0.4)
    assert status == 200 and body == {"watched": "http.disconnect"}


def test_uploads_past_the_limit_are_refused_at_once_with_retry_after():
    settings = Settings(max_concurrent_uploads=1, body_timeout_s=5)
    reads = []
    app = guarded_app(reads, settings=settings)

    async def scenario():
        results = []

        async def one(messages):
            start = await answer_start(app, messages)
            results.append((start["status"], dict(start["headers"]).get(b"retry-after")))

        slow = asyncio.create_task(one([(0.3, b"x", False)]))
        await asyncio.sleep(0.05)
        await one([(0, b"x", False)])  # refused while the slow one is being read
        await slow
        await one([(0, b"x", False)])  # its slot is back
        return results

    assert asyncio.run(scenario()) == [(503, b"1"), (200, None), (200, None)]


def test_one_client_cannot_hold_every_upload_slot():
    """64 connections that sent a POST's headers and then nothing, reconnecting at each 408, held
    every slot: everyone else got 503 for as long as they kept at it. One address now holds at
    most MAX_UPLOADS_PER_CLIENT slots (429); other clients still get theirs."""
    settings = Settings(max_concurrent_uploads=4, max_uploads_per_client=2, body_timeout_s=5)
    app = guarded_app([], settings=settings)

    async def scenario():
        idle = [asyncio.create_task(answer(app, [(0.4, b"x", False)], client="10.0.0.9")) for _ in range(2)]
        await asyncio.sleep(0.05)
        third = await answer(app, [(0, b"x", False)], client="10.0.0.9")
        other = await answer(app, [(0, b"x", False)], client="10.0.0.7")
        unknown = await answer(app, [(0, b"x", False)])  # no address known (a Unix socket): no per-client count
        held = [await task for task in idle]
        again = await answer(app, [(0, b"x", False)], client="10.0.0.9")  # its slots are back
        return third, other, unknown, held, again

    third, other, unknown, held, again = asyncio.run(scenario())
    assert third[0] == 429 and third[1]["error"]["code"] == "too_many_uploads" and third[2]["retry-after"] == "1"
    assert "MAX_UPLOADS_PER_CLIENT" in third[1]["error"]["message"]
    assert other[0] == unknown[0] == again[0] == 200 and [status for status, *_ in held] == [200, 200]


def test_an_ipv6_client_is_counted_by_its_64():
    """One host holds a whole IPv6 /64 and can take any address in it."""
    from app.middleware import client_address

    def of(address):
        return client_address({"client": (address, 50000)})

    assert of("2001:db8::1") == of("2001:db8::ffff:1") == "2001:db8::/64" != of("2001:db8:0:1::1")
    assert of("10.0.0.9") == "10.0.0.9" and client_address({}) == ""


def test_bodies_are_held_against_the_upload_memory_budget_until_answered():
    """Bodies read and waiting (for decode memory, for the model) used to be bounded by nothing:
    a hundred 9 MB uploads took the server from 0.85 to 2.8 GB. UPLOAD_MEMORY_MB counts each
    body's bytes as they arrive until its answer is sent; past it a POST is refused at the door or
    while its body arrives (503 too_many_uploads); an idle upload holds nothing, and one request
    alone may pass the budget."""
    mb = 2**20
    reads = []
    app = guarded_app(reads, settings=Settings(upload_memory_mb=1, body_timeout_s=5), handler_delay_s=0.3)

    async def scenario():
        results = {}
        idle = asyncio.create_task(answer(app, [(0.2, b"x", False)]))  # sends its byte 0.2 s in
        first = asyncio.create_task(answer(app, [(0, b"x" * (mb * 6 // 10), False)]))  # held 0.3 s once read
        await asyncio.sleep(0.05)
        results["mid_body"] = await answer(app, [(0, b"x" * (mb // 2), True), (0, b"x", False)])  # 0.6 + 0.5 MB
        results["idle"], results["first"] = await idle, await first
        alone = asyncio.create_task(answer(app, [(0, b"x" * (mb * 3 // 2), False)]))  # 1.5 MB, nothing else held
        await asyncio.sleep(0.05)
        results["at_door"] = await answer(app, [(0, b"x", False)])
        results["alone"] = await alone
        results["after"] = await answer(app, [(0, b"x", False)])  # every byte given back
        return results

    results = asyncio.run(scenario())
    assert {name: status for name, (status, *_) in results.items()} == {
        "mid_body": 503,
        "idle": 200,
        "first": 200,
        "at_door": 503,
        "alone": 200,
        "after": 200,
    }
    for name in ("mid_body", "at_door"):
        _, body, headers = results[name]
        assert body["error"]["code"] == "too_many_uploads" and "UPLOAD_MEMORY_MB=1" in body["error"]["message"]
        assert headers["retry-after"] == "1", name
    assert sorted(reads) == [1, 1, mb * 6 // 10, mb * 3 // 2]  # the refused bodies never reached the route


def test_uploads_being_read_count_against_the_room_left_in_the_queue():
    """A request let in at the door takes its queue place only after its upload is read; the
    door counts those still reading, so it refuses at once rather than after a read and a decode
    that the full queue then turns away."""
    from app.engine import Overloaded

    class OnePlaceLeft:  # the real EngineClient's rule, for a queue with one free place
        def check_admission(self, arriving=0):
            if arriving >= 1:
                raise Overloaded(1.0)

        async def wait_for_client_room(self, client, timeout_s):
            return False

    app = guarded_app([], settings=Settings(body_timeout_s=5))
    app.state.engine = OnePlaceLeft()

    async def scenario():
        results = []

        async def one(messages):
            results.append((await answer_start(app, messages))["status"])

        slow = asyncio.create_task(one([(0.3, b"x", False)]))  # takes the last place, slowly
        await asyncio.sleep(0.05)
        await one([(0, b"x", False)])  # refused at the door: the place is spoken for
        await slow
        return results

    assert asyncio.run(scenario()) == [503, 200]


def test_a_client_holding_its_share_of_the_queue_waits_at_the_door_then_gets_429():
    """The door asks the engine with the client's address and a wait of CLIENT_ROOM_WAIT_S, before
    the body is read: a client whose images still hold its CLIENT_QUEUE_SHARE then gets 429, one
    whose room came back is let in (and asked the door's other questions again), another is let in.
    The admin routes never reach the model: the door asks the engine nothing for them."""
    from app.engine import ClientOverloaded
    from app.guards import CLIENT_ROOM_WAIT_S

    class Shares:  # what EngineClient.wait_for_client_room answers, by client
        def __init__(self):
            self.asked, self.admission_checks = [], 0

        def check_admission(self, arriving=0):
            self.admission_checks += 1

        async def wait_for_client_room(self, client, timeout_s):
            self.asked.append((client, timeout_s))
            if client == "10.0.0.9":
                raise ClientOverloaded(2.2, 128)
            return client == "10.0.0.8"  # waited, and its room came back

    reads = []
    app = guarded_app(reads, settings=Settings(body_timeout_s=5))
    app.state.engine = engine = Shares()

    async def scenario():
        addresses = ("10.0.0.9", "10.0.0.8", "10.0.0.7")
        return [await answer(app, [(0, b"x", False)], client=address) for address in addresses]

    (status, body, headers), (waited, _, _), (other, _, _) = asyncio.run(scenario())
    assert (status, body["error"]["code"], headers["retry-after"]) == (429, "too_many_queued", "3")
    assert "CLIENT_QUEUE_SHARE" in body["error"]["message"]
    assert waited == other == 200 and reads == [1, 1]  # the refused client's body was never read
    assert [timeout for _, timeout in engine.asked] == [CLIENT_ROOM_WAIT_S] * 3
    assert engine.admission_checks == 4  # once each, and again for the client that waited
    admin = guarded_app([], settings=Settings(body_timeout_s=5))
    admin.router.routes[0].tags = ["admin"]  # as the service's admin router tags its routes
    admin.state.engine = untouched = Shares()
    reload, _, _ = asyncio.run(answer(admin, [(0, b"x", False)], client="10.0.0.9"))
    assert reload == 200 and untouched.asked == [] and untouched.admission_checks == 0  # a reload never waits


def test_requests_running_past_the_shutdown_grace_get_503_json():
    shutdown = Shutdown()
    reads = []
    app = guarded_app(reads, settings=Settings(), handler_delay_s=5)
    app.add_middleware(ShutdownGuard, shutdown_of=lambda app: shutdown)

    async def scenario():
        shutdown.attach()
        sent, calls, scope, receive, send = call(app, [(0, b"x", False)])
        scope["headers"] = KEYED
        request = asyncio.create_task(app(scope, receive, send))
        await asyncio.sleep(0.05)
        shutdown.begin(0.1)
        started = time.monotonic()
        await asyncio.wait_for(request, 2)
        return sent, time.monotonic() - started

    sent, took = asyncio.run(scenario())
    start = next(m for m in sent if m["type"] == "http.response.start")
    assert start["status"] == 503 and took < 1
    assert dict(start["headers"])[b"retry-after"] == b"5"
    assert b'"not_ready"' in b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")


# --- visibility ------------------------------------------------------------------------------------


def test_errors_are_counted_by_route_and_code_including_refusals_before_routing(client):
    def count(code):
        return REGISTRY.get_sample_value("captioning_http_errors_total", {"route": "/caption", "code": code}) or 0

    before = count("unauthorized")
    response = client.post("/caption", files={"image": ("a.png", uploads.png())}, headers={"X-API-Key": "wrong"})
    assert response.status_code == 401
    assert count("unauthorized") == before + 1


# --- decode memory ---------------------------------------------------------------------------------


def test_decode_cost_is_known_from_the_header_and_weighted_by_bit_depth():
    big16 = uploads.encode(Image.new("I;16", (2000, 1500)), "PNG")
    rgb = uploads.encode(Image.new("RGB", (2000, 1500)), "PNG")
    header16 = open_upload(big16, max_pixels=10**8, min_side=1)
    assert decode_bytes(header16, big16, 32) == 2000 * 1500 * 6  # decoded I;16 plus its 32-bit copy for reduce
    assert decode_bytes(open_upload(rgb, max_pixels=10**8, min_side=1), rgb, 32) == 2000 * 1500 * 4
    baseline = uploads.jpeg(size=(2000, 1500))
    jpeg = open_upload(baseline, max_pixels=10**8, min_side=1)
    assert decode_bytes(jpeg, baseline, 32) == 250 * 188 * 4  # draft mode decodes at 1/8


def test_decode_cost_counts_the_copies_alpha_palettes_and_webp_make():
    """Measured by a review, each decode alone at 6000x6000 (/work/scratch/s44/peak.py repeats it at
    4000x4000 for every format and mode): a WebP took 16 bytes a pixel (libwebp's canvas and
    Pillow's copy of it), LA and RGBA 8 (Image.reduce's premultiplied copy), a palette 9 (its RGBA
    copy too), where 4, 4 and 5 were charged; four 81 kB WebPs at once took the server +1.6 GB."""

    def charged(image: Image.Image, format: str, **options) -> int:
        data = uploads.encode(image, format, **options)
        return decode_bytes(open_upload(data, max_pixels=10**8, min_side=1), data, 32) // (2000 * 1500)

    rgb = Image.new("RGB", (2000, 1500), (30, 120, 200))
    assert charged(rgb, "PNG") == 4
    assert charged(rgb.convert("RGBA"), "PNG") == charged(rgb.convert("LA"), "PNG") == 8
    assert charged(rgb.convert("P"), "PNG") == charged(rgb.convert("P"), "GIF") == 9
    assert charged(rgb, "WEBP") == charged(rgb.convert("RGBA"), "WEBP", lossless=True) == 16


def test_decode_cost_counts_a_keyed_transparent_colour_and_progressive_coefficients():
    """Measured by an audit, 4 at once: a 38 kB grey PNG with tRNS at 6300x6300 took 232 MB each
    (charged 38 MB before), a 482 kB progressive 4:4:4 JPEG at 6000x6000 about 210 MB (2 MB)."""
    keyed = Image.new("L", (2000, 1500))
    keyed.info["transparency"] = 0
    keyed_png = uploads.encode(keyed, "PNG", transparency=0)
    grey = open_upload(keyed_png, max_pixels=10**8, min_side=1)
    assert "transparency" in grey.info
    assert decode_bytes(grey, keyed_png, 32) == 2000 * 1500 * (1 + 5)  # the grey frame, its RGBA copy and a mask
    for subsampling, samples in ((0, 3), (2, 1.5)):  # 4:4:4 and 4:2:0
        data = uploads.encode(uploads.solid(size=(2000, 1500)), "JPEG", progressive=True, subsampling=subsampling)
        jpeg = open_upload(data, max_pixels=10**8, min_side=1)
        assert decode_bytes(jpeg, data, 32) == 250 * 188 * 4 + int(2 * samples * 2000 * 1500)


def test_large_images_are_reduced_before_colour_conversion_and_keep_their_level():
    data = uploads.encode(Image.new("I;16", (1600, 1200), 40000), "PNG")
    decoded = decode_upload(data, max_pixels=10**8, min_side=1, draft_size=32)
    assert (decoded.width, decoded.height) == (1600, 1200)
    assert min(decoded.image.size) < 300  # reduced: no full-size RGB copy was made
    assert uploads.mean_colour(np.asarray(decoded.image)) == (156, 156, 156)


def test_a_decode_keeps_its_budget_until_its_thread_finishes_even_when_cancelled():
    pool = DecodePool(threads=2, budget_bytes=100)
    release = threading.Event()
    order = []

    def blocking(name):
        order.append(f"{name} start")
        if name == "first":
            release.wait(5)
        order.append(f"{name} end")

    async def scenario():
        first = asyncio.create_task(pool.run(100, blocking, "first"))
        await asyncio.sleep(0.05)
        first.cancel()  # the caller gives up; Pillow would not
        second = asyncio.create_task(pool.run(100, blocking, "second"))
        await asyncio.sleep(0.1)
        assert order == ["first start"] and pool.budget.in_use == 100  # second still waits
        release.set()
        await asyncio.wait_for(second, 5)

    asyncio.run(scenario())
    assert order == ["first start", "first end", "second start", "second end"]
    pool.shutdown()


def test_clients_take_turns_for_the_decode_budget_and_a_large_decode_is_not_skipped():
    """One address with a queue of costly decodes used to hold every other client's decode behind
    all of them (first come first served): a 12 MP photo waited 10.5 s behind 8 requests of 16
    40-MP PNGs from one address, against 0.04 s alone. Waiters are now served one client at a time;
    the client whose turn it is waits for its decode to fit, and no smaller one passes it."""
    from app.decode_pool import MemoryBudget

    async def scenario():
        budget, granted, amounts = MemoryBudget(100, holders=8), [], {}

        def wait(owner, name, amount=100):
            async def waiter():
                await budget.acquire(amount, owner)
                granted.append(name)

            amounts[name] = amount
            return asyncio.create_task(waiter())

        async def finish(name):  # the decode granted as `name` ends
            budget.release(amounts[name])
            await asyncio.sleep(0)

        await budget.acquire(100, "flood")
        amounts["running"] = 100
        tasks = [wait("flood", f"flood {i}") for i in range(3)] + [wait("user", "user"), wait("other", "other", 60)]
        leaving = wait("flood", "gave up")
        await asyncio.sleep(0)
        leaving.cancel()  # a waiter that gives up leaves its owner's queue, and the turn goes on
        for name in ("running", "flood 0", "user"):
            await finish(name)
        assert granted == ["flood 0", "user", "other"]  # flood 1 (100) does not fit beside other's 60
        tasks.append(wait("late", "late", 30))  # would fit now, but it is flood's turn
        await asyncio.sleep(0)
        assert granted[-1] == "other"
        await finish("other")
        assert granted[-1] == "flood 1"
        for name in ("flood 1", "late"):
            await finish(name)
        await asyncio.gather(*tasks)
        return granted

    assert asyncio.run(scenario()) == ["flood 0", "user", "other", "flood 1", "late", "flood 2"]


def test_a_requests_waiting_decodes_cancelled_together_leave_nothing_held():
    """A deadline or a disconnect cancels a request's images at once. A review found the budget
    granting the second, already cancelled, waiter while the first unwound: its bytes were never
    given back and every later decode that needed the whole budget waited for ever."""

    async def scenario():
        pool = DecodePool(threads=2, budget_bytes=100)
        other = asyncio.ensure_future(pool.run(60, time.sleep, 0.2, owner="10.0.0.9"))
        await asyncio.sleep(0.01)
        images = [asyncio.ensure_future(pool.run(cost, time.sleep, 0.01, owner="10.0.0.1")) for cost in (50, 30)]
        await asyncio.sleep(0.01)
        for image in images:
            image.cancel()
        outcomes = await asyncio.gather(*images, return_exceptions=True)
        assert all(isinstance(o, asyncio.CancelledError) for o in outcomes), outcomes
        await other
        await asyncio.sleep(0.05)
        assert pool.budget.in_use == 0 and pool.budget.granted == 0
        await asyncio.wait_for(pool.run(100, time.sleep, 0, owner="10.0.0.2"), 5)
        pool.shutdown()

    asyncio.run(scenario())


def test_no_more_decodes_are_granted_than_the_pool_has_threads():
    """Decodes that fit the budget had been granted at once and then queued first come first served
    in the thread pool, behind the turns: 400 cheap decodes from one owner put another's 10 ms
    decode 0.98 s back. A grant is a thread now, so the turns are the only queue."""

    started = []

    def decode(name):
        started.append(name)
        time.sleep(0.005)

    async def scenario():
        pool = DecodePool(threads=2, budget_bytes=2**30)
        flood = [asyncio.ensure_future(pool.run(1, decode, "flood", owner="flood")) for _ in range(200)]
        await asyncio.sleep(0.02)
        assert pool.budget.granted == 2  # the rest wait for their turn, not in the thread pool's queue
        before = len(started)
        await pool.run(1, decode, "user", owner="user")
        return before
        await asyncio.gather(*flood)
        pool.shutdown()

    before = asyncio.run(scenario())
    assert started.index("user") <= before + 3  # after those running and one flood turn, not 190 more


def test_a_jpeg_with_a_scan_per_component_is_charged_its_whole_image_coefficients():
    """A review found the hole the progressive rows closed open for this layout too: a flat
    6000x6000 file of three scans took 209 MB to decode, charged 2 MB."""
    one_scan_data, three_scans_data = uploads.flat_grey_jpeg(512), uploads.flat_grey_jpeg(512, interleaved=False)
    one_scan = open_upload(one_scan_data, max_pixels=10**8, min_side=1)
    three_scans = open_upload(three_scans_data, max_pixels=10**8, min_side=1)
    assert decode_bytes(one_scan, one_scan_data, 32) == 64 * 64 * 4  # draft 1/8, nothing more
    assert decode_bytes(three_scans, three_scans_data, 32) == 64 * 64 * 4 + 2 * 3 * 512 * 512
    assert np.asarray(decode_opened(three_scans, 32).image).std() == 0  # and it decodes (flat)


def test_an_image_that_needs_more_than_the_whole_decode_budget_is_refused(client):
    """It used to decode alone, past the budget: under a container's memory limit (which lowers the
    budget, app.resources) that is how one small PNG of many pixels got the container OOM-killed."""
    service = client.app.state.service
    saved = service.decoder
    service.decoder = DecodePool(threads=1, budget_bytes=2**20)
    try:
        message = error_of(
            client.post("/caption", files={"image": ("big.png", uploads.png(size=(1500, 1000)))}),
            422,
            "image_too_large",
        )["message"]
        assert "1500x1000" in message and "decode memory budget of 1 MiB" in message
        assert client.post("/caption", files={"image": ("small.png", uploads.png(size=(200, 200)))}).status_code == 200
    finally:
        service.decoder = saved


def test_a_small_png_with_compressed_text_has_its_header_read_off_the_event_loop(client, monkeypatch):
    """Small uploads are read on the event loop; a PNG's compressed text inflates as its header is
    read (up to MAX_PNG_TEXT_BYTES): 8 clients sending such 66 kB files had put /health/live's p95
    at 22 ms. Their headers are read in the decode pool's threads, as large uploads' are."""
    import zlib

    from bench.attack import png_chunk, with_chunks

    decoder = client.app.state.service.decoder
    off_loop = []
    original = decoder.run_unbudgeted

    async def counted(function, *args):
        off_loop.append(function)
        return await original(function, *args)

    monkeypatch.setattr(decoder, "run_unbudgeted", counted)
    plain = uploads.png(size=(64, 64))
    with_text = with_chunks(plain, png_chunk(b"zTXt", b"note\0\0" + zlib.compress(bytes(100_000))))
    for data, read_off_loop in ((plain, 0), (with_text, 1)):
        response = client.post("/caption", files={"image": ("a.png", data)})
        assert response.status_code == 200 and len(off_loop) == read_off_loop, response.text
