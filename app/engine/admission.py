"""Refusing work at the door: an ASGI gate that answers 503 before a request body is read.

Past capacity, the engine's queue is full and submit() raises Overloaded at once, but by then the
server has parsed the multipart upload and decoded the image: CPU spent on a request that is
refused. On a small machine that work starves the event loop and the engine, so throughput falls
exactly when load peaks and refusals slow to seconds. The gate decides first:

    app.add_middleware(AdmissionGate, engine_of=lambda app: app.state.engine, path="/caption")

Each request it lets through holds a place in the engine's queue (Engine.reserve) until its
submit() takes it, or until the response is sent (an invalid upload gives it back), so a request
past the gate is never refused for a full queue. A refusal has the service's error shape
({"error": {"code", "message"}, "request_id"}) and a Retry-After header.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable

from app.engine.engine import Engine, EngineStopped, Overloaded, current_reservation


class AdmissionGate:
    """Pure ASGI middleware: POST `path` gets 503 at once while the engine would refuse it."""

    def __init__(self, app, *, engine_of: Callable[[object], Engine | None], path: str = "/caption"):
        self.app = app
        self.engine_of = engine_of
        self.path = path

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and scope["path"] == self.path:
            engine = self.engine_of(scope["app"]) if "app" in scope else None
            if engine is not None:
                try:
                    reservation = engine.reserve()
                except Overloaded as exc:
                    await _refuse(scope, send, "overloaded", "the inference queue is full; retry shortly",
                                  exc.retry_after_s)
                    return
                except EngineStopped:
                    await _refuse(scope, send, "not_ready", "the service is shutting down", 5.0)
                    return
                token = current_reservation.set(reservation)
                try:
                    await self.app(scope, receive, send)
                finally:
                    current_reservation.reset(token)
                    engine.release(reservation)
                return
        await self.app(scope, receive, send)


async def _refuse(scope, send, code: str, message: str, retry_after_s: float) -> None:
    request_id = scope.get("state", {}).get("request_id")
    body = json.dumps({"error": {"code": code, "message": message}, "request_id": request_id}).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"retry-after", str(max(1, math.ceil(retry_after_s))).encode()),
    ]
    await send({"type": "http.response.start", "status": 503, "headers": headers})
    await send({"type": "http.response.body", "body": body})
