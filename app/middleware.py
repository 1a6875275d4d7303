"""Pure ASGI middleware (no BaseHTTPMiddleware, so request bodies stream through untouched).

RequestContextMiddleware: request ID, the access log line and the HTTP metrics.
UploadLimitMiddleware: refuses oversized bodies from Content-Length or while streaming.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import re
import time
import uuid

from starlette.datastructures import Headers, MutableHeaders
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.errors import UploadTooLarge, error_response
from app.http_protocol import ANSWERED_BELOW_APP
from app.metrics import HTTP_ERRORS, HTTP_IN_FLIGHT, HTTP_REQUEST_SECONDS, HTTP_REQUESTS

access_logger = logging.getLogger("app.access")

# The methods a label may name; the parser accepts 34 (PROPFIND, MKCOL, ...), and a scan sending
# each to each route made series that never expire.
METHOD_LABELS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"})


def method_label(method: str) -> str:
    return method if method in METHOD_LABELS else "other"


REQUEST_ID_HEADER = "X-Request-ID"
# Client-chosen IDs are echoed into logs and headers, so only a safe, bounded alphabet is taken.
_ACCEPTABLE_REQUEST_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")
# Label for requests that matched no route, so scanners cannot create unbounded label values.
UNMATCHED_ROUTE = "unmatched"
# Status logged when the client went away before the answer (nginx's convention).
CLIENT_CLOSED_REQUEST = 499


def request_state(scope: Scope) -> dict:
    """The per-request state dict that Starlette exposes as request.state."""
    return scope.setdefault("state", {})


def route_label(scope: Scope) -> str:
    """The route template; for an answer given before routing ran (a guard's 503 or 401), the
    template of the route the path matches, so those count under their route too."""
    route = scope.get("route") or matched_route(scope)
    return getattr(route, "path", UNMATCHED_ROUTE)


def matched_route(scope: Scope):
    """The route that will handle `scope` (before routing has run), or None."""
    for route in _routes(getattr(scope.get("app"), "router", None)):
        if route.matches(scope)[0] == Match.FULL:
            return route
    return None


def _routes(router):
    # FastAPI (0.16x) keeps an included router whole, as one entry; its routes are inside (the
    # app includes routers without a prefix, so their paths are the full templates).
    for route in getattr(router, "routes", ()):
        inner = getattr(route, "original_router", None)
        if inner is not None:
            yield from _routes(inner)
        else:
            yield route


def client_address(scope: Scope) -> str:
    """The client's address as uvicorn gives it: the peer's, or the one a trusted proxy forwarded
    (FORWARDED_ALLOW_IPS); for IPv6 its /64, which one host (one subscriber) holds whole. Empty
    when the server knows none (a Unix socket)."""
    client = scope.get("client")
    if not client:
        return ""
    address = str(client[0])
    if ":" in address:
        with contextlib.suppress(ValueError):
            return str(ipaddress.ip_network(f"{address}/64", strict=False))
    return address


class RequestContextMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        incoming = Headers(scope=scope).get(REQUEST_ID_HEADER, "")
        request_id = incoming if _ACCEPTABLE_REQUEST_ID.fullmatch(incoming) else uuid.uuid4().hex
        state = request_state(scope)
        state["request_id"] = request_id
        state["started_at"] = started
        status = 500  # what the client gets if the app raises before responding

        async def send_with_request_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                MutableHeaders(scope=message)[REQUEST_ID_HEADER] = request_id
            await send(message)

        HTTP_IN_FLIGHT.inc()
        try:
            await self.app(scope, receive, send_with_request_id)
        except Exception:
            # A bug: Starlette's outermost middleware answers 500 (app.errors) after this record.
            state.setdefault("error_code", "internal_error")
            raise
        finally:
            HTTP_IN_FLIGHT.dec()
            if ANSWERED_BELOW_APP in state:  # the connection's framing broke: the protocol answered
                status, state["error_code"] = state[ANSWERED_BELOW_APP]
            elapsed = time.perf_counter() - started
            route = route_label(scope)
            labels = {"route": route, "method": method_label(scope["method"]), "status": str(status)}
            HTTP_REQUESTS.labels(**labels).inc()
            if status >= 400:
                HTTP_ERRORS.labels(route=route, code=state.get("error_code", "unknown")).inc()
            HTTP_REQUEST_SECONDS.labels(**labels).observe(elapsed)
            fields = {
                "method": scope["method"],
                "route": route,
                "path": scope["path"],
                "status": status,
                "latency_ms": round(elapsed * 1000, 2),
                "request_id": request_id,
            }
            client = client_address(scope)
            if client:  # who sent it, as the per-client limits see it (behind a proxy: FORWARDED_ALLOW_IPS)
                fields["client"] = client
            for key in ("model_version", "image_errors"):  # set by the routes (app.dependencies, /captions)
                if key in state:
                    fields[key] = state[key]
            if status >= 400:  # why, as the error counter has it: the logs alone can tell refusals apart
                fields["error_code"] = state.get("error_code", "unknown")
            access_logger.info("request", extra=fields)


class UploadLimitMiddleware:
    """Caps the request body at `max_upload_bytes` plus `framing_allowance` bytes of multipart
    boundaries and part headers (the route checks the file itself against the exact limit).

    The check sits in `receive`, so it runs before the multipart parser sees (or spools to disk)
    a single byte: a Content-Length over the limit is refused at the first read, and a body that
    streams past the limit (chunked, or lying about its length) is refused at the chunk that
    crosses it. The rest of the body is never read. Routes that never read a body are unaffected.
    """

    def __init__(self, app: ASGIApp, max_upload_bytes: int, framing_allowance: int = 16 * 1024) -> None:
        self.app = app
        self.max_upload_bytes = max_upload_bytes
        self.max_body_bytes = max_upload_bytes + framing_allowance

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.max_body_bytes
        declared = _content_length(scope)
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            if declared is not None and declared > limit:
                raise UploadTooLarge(self.max_upload_bytes)
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise UploadTooLarge(self.max_upload_bytes)
            return message

        # Normally the app's exception handlers turn UploadTooLarge into the JSON 413; the
        # exception only arrives here if something read the body outside a route.
        await call_answering(
            self.app,
            scope,
            limited_receive,
            send,
            UploadTooLarge,
            lambda exc: error_response(Request(scope), 413, "upload_too_large", str(exc.detail)),
        )


async def call_answering(
    app: ASGIApp,
    scope: Scope,
    receive: Receive,
    send: Send,
    error: type[Exception] | tuple[type[Exception], ...],
    answer,
) -> None:
    """Runs `app`; an `error` it raises before starting a response is answered with `answer(exc)`
    (a Starlette response), one raised after that is re-raised (the response cannot change)."""
    response_started = False

    async def tracking_send(message: Message) -> None:
        nonlocal response_started
        response_started = response_started or message["type"] == "http.response.start"
        await send(message)

    try:
        await app(scope, receive, tracking_send)
    except error as exc:
        if response_started:
            raise
        await answer(exc)(scope, receive, send)


def _content_length(scope: Scope) -> int | None:
    value = Headers(scope=scope).get("content-length")
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


class JsonCORSMiddleware(CORSMiddleware):
    """Starlette's CORS handling, with a refused preflight answered as every other error is: a JSON
    body with its code and request ID (Starlette's is plain text), still with the CORS headers it
    computed. The preflight is answered here, before any guard; added inside RequestContextMiddleware,
    it is logged and counted like any request."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = Headers(scope=scope) if scope["type"] == "http" else None
        if (
            headers is None
            or scope["method"] != "OPTIONS"
            or "origin" not in headers
            or "access-control-request-method" not in headers
        ):
            await super().__call__(scope, receive, send)
            return
        response = self.preflight_response(request_headers=headers)
        if response.status_code >= 400:
            refused = response.body.decode().removeprefix("Disallowed CORS ")
            kept = {k: v for k, v in response.headers.items() if k.lower() not in ("content-type", "content-length")}
            response = error_response(
                Request(scope),
                response.status_code,
                "cors_refused",
                f"CORS preflight refused ({refused} not allowed): the origins allowed are those in CORS_ORIGINS, "
                "the methods GET, POST and HEAD",
                kept,
            )
        await response(scope, receive, send)
