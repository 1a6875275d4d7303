"""Pure ASGI guards against clients that cost the service without earning it (docs/HARDENING.md).

UploadGuard, on every request to a route that takes a body (POST), before a byte of it is read:
  1. the API key, from the headers (401), so a keyless client never holds a queue place or a reader;
     then a Content-Encoding other than identity (415), which this service does not decode;
  2. the engine's door check (503 overloaded / not_ready), so a full queue refuses before parsing;
     then, for a client whose images hold its share of the queue (CLIENT_QUEUE_SHARE), a wait of up
     to CLIENT_ROOM_WAIT_S for one of them to be answered, else 429 too_many_queued (the admin
     routes, which never reach the model, skip both, so a reload works while the queue is full);
  3. an upload slot: at most MAX_CONCURRENT_UPLOADS bodies are read at once, the excess gets 503 +
     Retry-After at once, and at most MAX_UPLOADS_PER_CLIENT of them from one client address (429),
     so that one client's idle uploads cannot hold every slot; a slot is held until the body is complete;
  4. a body deadline: BODY_TIMEOUT_S plus the bytes received so far at MIN_UPLOAD_BYTES_PER_S
     (like Apache's mod_reqtimeout), answered 408. Once the body is complete, receive() is the
     server's own again: the disconnect watcher that keeps calling it is never timed out;
  5. a memory budget for bodies: the bytes received are held until the answer is sent (the body
     waits for decode memory and for the model), and all requests together hold at most
     UPLOAD_MEMORY_MB. Past it a POST is refused at the door, or while its body arrives, with 503
     too_many_uploads; one request alone may hold more (MAX_UPLOAD_BYTES bounds it). Counting the
     bytes that arrived, not the declared length, means an idle upload holds no memory.

ShutdownGuard: requests still running when the shutdown grace ends get a 503 JSON answer with
Retry-After (the server's own would be a plain-text 500); see Shutdown and app.__main__.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Callable

from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.errors import (
    NOT_READY_RETRY_AFTER_S,
    BodyTimeout,
    NotReady,
    TooManyClientUploads,
    TooManyUploads,
    Unauthorized,
    UnsupportedContentEncoding,
    UploadMemoryFull,
    api_error_response,
    as_api_error,
    error_response,
)
from app.middleware import call_answering, client_address, matched_route

logger = logging.getLogger("app.guards")

BODY_METHODS = {"POST", "PUT", "PATCH"}
# Retry-After for an upload refused because MAX_CONCURRENT_UPLOADS bodies are being read.
UPLOADS_RETRY_AFTER_S = 1
# How long a client holding its share of the queue waits at the door for room before its 429: a
# client that resends at once is answered once a second a connection, not hundreds of times (the
# event loop's time, taken from every other client), and room that comes back soon lets it in.
CLIENT_ROOM_WAIT_S = 1.0


class UploadGuard:
    def __init__(
        self,
        app: ASGIApp,
        *,
        settings,
        engine_of: Callable[[object], object | None],
        key_accepted: Callable[[Headers], bool],
    ):
        self.app = app
        self.settings = settings
        self.engine_of = engine_of
        self.key_accepted = key_accepted
        self.uploads = 0  # bodies being read now (event loop only)
        self.uploads_by_client: Counter[str] = Counter()  # the same, by client address
        self.body_bytes = 0  # body bytes received by requests not yet answered
        self.body_budget = settings.upload_memory_mb * 2**20  # UPLOAD_MEMORY_MB, for all of them

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        route = matched_route(scope) if scope["type"] == "http" and scope["method"] in BODY_METHODS else None
        if route is None:
            await self.app(scope, receive, send)
            return
        client = client_address(scope)
        # The admin routes never reach the model: a reload must work while the queue is full.
        engine = None if "admin" in getattr(route, "tags", ()) else self.engine_of(scope["app"])
        refusal = self._refusal(scope, client, engine)
        if refusal is None and engine is not None:
            try:
                if await engine.wait_for_client_room(client, CLIENT_ROOM_WAIT_S):
                    refusal = self._refusal(scope, client, engine)  # time passed: ask again
            except Exception as exc:  # the engine's ClientOverloaded
                refusal = as_api_error(exc)
        if refusal is not None:
            # In the route family's own shape (app.errors.error_response: OIP's under /v2).
            await api_error_response(Request(scope), refusal)(scope, receive, send)
            return
        self.uploads += 1
        self.uploads_by_client[client] += 1
        holding = True

        def done_reading() -> None:
            nonlocal holding
            if holding:
                holding = False
                self.uploads -= 1
                self.uploads_by_client[client] -= 1
                if not self.uploads_by_client[client]:
                    del self.uploads_by_client[client]

        settings = self.settings
        started = time.monotonic()
        received = 0  # this request's body bytes, counted in self.body_bytes until it is answered

        async def timed_receive() -> Message:
            nonlocal received
            if not holding:
                return await receive()
            allowed_s = settings.body_timeout_s + received / settings.min_upload_bytes_per_s
            remaining = started + allowed_s - time.monotonic()
            try:
                if remaining <= 0:
                    raise TimeoutError
                message = await asyncio.wait_for(receive(), remaining)
            except TimeoutError:
                done_reading()
                raise BodyTimeout(
                    f"the request body did not arrive in time ({received} bytes received; allowed: "
                    f"{settings.body_timeout_s:g} s plus {settings.min_upload_bytes_per_s} bytes/s)"
                ) from None
            if message["type"] == "http.request":
                arrived = len(message.get("body", b""))
                others = self.body_bytes - received
                if others and self.body_bytes + arrived > self.body_budget:
                    done_reading()
                    raise UploadMemoryFull(self._memory_full(), UPLOADS_RETRY_AFTER_S)
                received += arrived
                self.body_bytes += arrived
                if not message.get("more_body", False):
                    done_reading()
            else:  # http.disconnect
                done_reading()
            return message

        try:
            # Normally the app's handlers answer these; this is for reads outside a route.
            await call_answering(
                self.app,
                scope,
                timed_receive,
                send,
                (BodyTimeout, UploadMemoryFull),
                lambda exc: error_response(
                    Request(scope), exc.status_code, exc.code, str(exc.detail), dict(exc.headers or {})
                ),
            )
        finally:
            done_reading()
            self.body_bytes -= received

    def _refusal(self, scope: Scope, client: str, engine):
        headers = Headers(scope=scope)
        if not self.key_accepted(headers):
            return Unauthorized()
        coding = ", ".join(headers.getlist("content-encoding")).strip().lower()
        if coding not in ("", "identity"):
            # Read as it is, a gzipped image is "not an image" and gzipped JSON "invalid JSON".
            return UnsupportedContentEncoding(
                f"Content-Encoding {coding} is not decoded by this service: send the body uncompressed "
                "(RFC 9110 section 15.5.16)"
            )
        if engine is not None:
            try:
                # Approximate by design: a /captions upload counts once but may take several places,
                # and uploads for other versions count against the default version's queue.
                engine.check_admission(arriving=self.uploads)
            except Exception as exc:  # the engine's Overloaded / EngineStopped
                return as_api_error(exc)
        if self.uploads >= self.settings.max_concurrent_uploads:
            return TooManyUploads(
                f"{self.uploads} uploads are being read, the limit; retry shortly", UPLOADS_RETRY_AFTER_S
            )
        per_client = self.settings.max_uploads_per_client
        if per_client and client and self.uploads_by_client[client] >= per_client:
            return TooManyClientUploads(
                f"this client has {per_client} uploads being read, the limit per client "
                "(MAX_UPLOADS_PER_CLIENT); retry when one is complete",
                UPLOADS_RETRY_AFTER_S,
            )
        if self.body_bytes >= self.body_budget:
            return TooManyUploads(self._memory_full(), UPLOADS_RETRY_AFTER_S)
        return None

    def _memory_full(self) -> str:
        return (
            f"requests being served hold {self.body_bytes / 2**20:.0f} MiB of uploads, the limit "
            f"(UPLOAD_MEMORY_MB={self.settings.upload_memory_mb}); retry shortly"
        )


class Shutdown:
    """The shutdown grace: begin() (from the signal handler, any thread) makes `over` fire
    `grace_s` later on the event loop the app runs on."""

    def __init__(self):
        self.over = asyncio.Event()
        self.loop: asyncio.AbstractEventLoop | None = None
        self.began = False
        self.on_begin: list[Callable[[], None]] = []

    def attach(self) -> None:
        """Called on the app's event loop (the lifespan)."""
        self.loop = asyncio.get_running_loop()
        self.over = asyncio.Event()

    def begin(self, grace_s: float) -> None:
        if self.began or self.loop is None:
            return
        self.began = True

        def start() -> None:
            for callback in self.on_begin:
                callback()
            self.loop.call_later(grace_s, self.over.set)

        self.loop.call_soon_threadsafe(start)


class ShutdownGuard:
    def __init__(self, app: ASGIApp, *, shutdown_of: Callable[[object], Shutdown]):
        self.app = app
        self.shutdown_of = shutdown_of

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        shutdown = self.shutdown_of(scope["app"])
        if scope["type"] != "http" or shutdown.loop is not asyncio.get_running_loop():  # no lifespan ran
            await self.app(scope, receive, send)
            return
        over = shutdown.over
        response_started = False

        async def tracking_send(message: Message) -> None:
            nonlocal response_started
            response_started = response_started or message["type"] == "http.response.start"
            await send(message)

        handling = asyncio.ensure_future(self.app(scope, receive, tracking_send))
        stop = asyncio.ensure_future(over.wait())
        try:
            await asyncio.wait({handling, stop}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not handling.done() and not stop.done():  # this task itself was cancelled
                handling.cancel()
            stop.cancel()
        if handling.done():
            handling.result()
            return
        handling.cancel()
        await asyncio.wait({handling})
        if not handling.cancelled() and handling.exception() is not None:
            logger.error("request failed while being stopped", exc_info=handling.exception())
        if not response_started:
            error = NotReady("the service stopped before this request finished; retry", NOT_READY_RETRY_AFTER_S)
            await api_error_response(Request(scope), error)(scope, receive, send)
