"""FastAPI dependencies: settings, the loaded model and engine from app.state, and API-key auth."""

from __future__ import annotations

import hmac
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from app.errors import NotReady, Unauthorized
from app.inference import InferenceEngine
from app.model_repository import ServedModel
from app.settings import Settings

# Seconds a client should wait before asking a service that is starting or stopping again.
NOT_READY_RETRY_AFTER_S = 5


# The dependencies are `async def` although they never await: FastAPI runs a plain `def`
# dependency in a worker thread, a round trip that costs more than the function itself.


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def service_ready(request: Request) -> bool:
    """Artifacts loaded, engine warmed up and running, and not shutting down."""
    state = request.app.state
    engine = getattr(state, "engine", None)
    return bool(engine is not None and engine.ready and not state.stopping)


async def get_served(request: Request) -> AsyncIterator[ServedModel]:
    """The model version this request runs on: the default (highest served) version, leased
    until the response is made, so that a hot swap lets the request finish on this version.
    get_captioner and get_engine share it (FastAPI resolves it once per request)."""
    models = getattr(request.app.state, "models", None)
    if models is None:
        raise NotReady("the model is not loaded yet", NOT_READY_RETRY_AFTER_S)
    served = models.acquire()
    try:
        yield served
    finally:
        served.release()


async def get_captioner(served: Annotated[ServedModel, Depends(get_served)]):
    return served.captioner


async def get_engine(request: Request, served: Annotated[ServedModel, Depends(get_served)]) -> InferenceEngine:
    if not service_ready(request):
        reason = "the service is shutting down" if request.app.state.stopping else "the model is warming up"
        raise NotReady(reason, NOT_READY_RETRY_AFTER_S)
    # app.state.engine is the default version's engine (swapped with it, in the same step); a
    # request that leased a version since replaced keeps that version's engine.
    if served is request.app.state.models.default:
        return request.app.state.engine
    return served.engine


_bearer = HTTPBearer(auto_error=False, description="`Authorization: Bearer <API_KEY>`")
_api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="`X-API-Key: <API_KEY>`")


async def require_api_key(
    request: Request,
    settings: Annotated[Settings, Depends(get_settings)],
    bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    header_key: Annotated[str | None, Depends(_api_key_header)],
) -> None:
    """Installed on /caption and /model only when API_KEY is set (see create_app).

    At least one credential must be offered and every credential offered must be right: a wrong
    Authorization header is refused even beside a right X-API-Key, so a client (or proxy) sending
    stale credentials finds out instead of passing by accident."""
    if settings.api_key is None:
        return
    expected = settings.api_key.get_secret_value().encode()
    offered: list[str] = []
    if "authorization" in request.headers:  # even empty: a non-Bearer or blank value is a wrong one
        offered.append(bearer.credentials if bearer else "")
    if header_key:
        offered.append(header_key)
    # compare_digest: the time taken must not reveal how much of the key matched.
    if not offered or not all(hmac.compare_digest(key.encode(), expected) for key in offered):
        raise Unauthorized()
