"""FastAPI dependencies: settings, the loaded model and the caption service from app.state, API-key
auth, one file per form field, and POST /caption's image from a form or a raw body."""

from __future__ import annotations

import hmac
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated

from fastapi import Depends, File, Request, UploadFile
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from starlette.datastructures import Headers
from starlette.requests import ClientDisconnect

from app.errors import (
    FORM_MEDIA_TYPES,
    NOT_READY_RETRY_AFTER_S,
    ClientDisconnected,
    DuplicateField,
    MissingImage,
    NotReady,
    Unauthorized,
    UnsupportedMediaType,
    UploadTooLarge,
    body_media_type,
)
from app.middleware import client_address
from app.model_repository import ServedModel
from app.service import Caller, CaptionService, read_upload
from app.settings import Settings

# The dependencies are `async def` although they never await: FastAPI runs a plain `def`
# dependency in a worker thread, a round trip that costs more than the function itself.


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def service_ready(request: Request) -> bool:
    """Artifacts loaded, engine warmed up and running, and not shutting down."""
    state = request.app.state
    engine = getattr(state, "engine", None)
    return bool(engine is not None and engine.ready and not state.stopping)


def caller_of(request: Request) -> Caller:
    """What the caption service needs to know of the request it serves (app.service.Caller)."""
    return Caller(request.state.started_at, request.receive, client_address(request.scope))


@asynccontextmanager
async def leased_default(request: Request) -> AsyncIterator[ServedModel]:
    """The model version a request runs on: the default (highest served) version, leased until the
    response is made, so that a hot swap lets the request finish on this version."""
    models = getattr(request.app.state, "models", None)
    if models is None:
        raise NotReady("the model is not loaded yet", NOT_READY_RETRY_AFTER_S)
    served = models.acquire()
    note_version(request, served)
    try:
        yield served
    finally:
        served.release()


def note_version(request: Request, served: ServedModel) -> None:
    """For the access log: which version answered (during a hot swap, two serve at once)."""
    request.scope.setdefault("state", {})["model_version"] = served.version


async def get_served(request: Request) -> AsyncIterator[ServedModel]:
    async with leased_default(request) as served:
        yield served


async def get_captioner(served: Annotated[ServedModel, Depends(get_served)]):
    return served.captioner


def service_for(request: Request, served: ServedModel) -> CaptionService:
    """The caption service of the leased version. app.state.service is the default version's
    (swapped with it, in the same step); a request that leased a version since replaced, or asked
    for another one, gets a service over that version's captioner and engine."""
    if not service_ready(request):
        reason = "the service is shutting down" if request.app.state.stopping else "the model is warming up"
        raise NotReady(reason, NOT_READY_RETRY_AFTER_S)
    service = request.app.state.service
    if served is request.app.state.models.default:
        return service
    return service.for_model(served.captioner, served.engine)


async def get_service(request: Request) -> AsyncIterator[CaptionService]:
    """The caption service over the leased default version. One dependency, not two: FastAPI's
    per-request cost grows with each node of the dependency tree, and this is the hot route's."""
    async with leased_default(request) as served:
        yield service_for(request, served)


Service = Annotated[CaptionService, Depends(get_service)]


def is_raw_image(media_type: str) -> bool:
    """Content types whose body is the image itself (as Triton's and Azure's image endpoints take)."""
    return media_type.startswith("image/") or media_type == "application/octet-stream"


RAW_UPLOAD_HINT = (
    "send the image as the multipart field `image`, or as the whole body with Content-Type image/png, "
    "image/jpeg, ... (curl: -H 'Content-Type: image/png' --data-binary @FILE)"
)


async def get_image_bytes(
    request: Request,
    settings: Annotated[Settings, Depends(get_settings)],
    image: Annotated[
        UploadFile | None,
        File(description="The image file. Required in a multipart body; absent when the body is the image."),
    ] = None,
) -> bytes:
    """POST /caption's image: the multipart field `image` (exactly one: with two, one would be
    captioned and the other silently ignored), or the whole body when the Content-Type is an image
    type or application/octet-stream, or absent (HTTP libraries send none for raw bytes). A raw body
    skips the multipart parser and its temporary file. Whatever the type, the bytes decide the
    format. Needs no model: a slow body holds no model version's lease."""
    limit = settings.max_upload_bytes
    if image is not None:
        sent = (await request.form()).getlist("image")  # the form FastAPI parsed: Starlette keeps it
        if len(sent) > 1:
            raise DuplicateField(
                f"the form has {len(sent)} `image` fields; send exactly one (use POST /captions for several images)"
            )
        return await read_upload(image, limit)
    media_type = body_media_type(request)
    if not (is_raw_image(media_type) or media_type == ""):
        if media_type in FORM_MEDIA_TYPES:
            if media_type == "multipart/form-data" and not await request.form():
                # The multipart parser keeps only parts that ended: a body cut short (a client or
                # proxy that stopped early) arrives as a form with nothing in it.
                raise MissingImage(
                    "image: Field required; the form holds no complete part: the body is empty or ends "
                    "before its closing boundary (--BOUNDARY--), so the upload may have been cut short"
                )
            if media_type == "application/x-www-form-urlencoded":
                # What curl --data-binary, wget --post-file, urllib and axios send raw bytes as.
                raise MissingImage(
                    "the body is application/x-www-form-urlencoded (the default Content-Type of curl "
                    f"--data-binary, wget --post-file and urllib for raw bytes), not an image: {RAW_UPLOAD_HINT}"
                )
            raise MissingImage(f"image: Field required ({RAW_UPLOAD_HINT})")
        raise UnsupportedMediaType(f"Content-Type {media_type} is not accepted: {RAW_UPLOAD_HINT}")
    try:
        data = await request.body()  # app.middleware's limit stops it early; this is the exact one
    except ClientDisconnect:
        raise ClientDisconnected("the client disconnected while sending the image") from None
    if not data and media_type == "":
        raise MissingImage(f"no image: the body is empty ({RAW_UPLOAD_HINT})")
    if len(data) > limit:
        raise UploadTooLarge(limit)
    return data


ImageBytes = Annotated[bytes, Depends(get_image_bytes)]


def api_key_accepted(headers: Headers, settings: Settings) -> bool:
    """At least one credential offered and every credential offered right: a wrong Authorization
    header is refused even beside a right X-API-Key, so a client (or proxy) sending stale
    credentials finds out instead of passing by accident. Headers only: app.guards calls it before
    the body is read."""
    if settings.api_key is None:
        return True
    expected = settings.api_key.get_secret_value().encode()
    offered: list[str] = []
    if "authorization" in headers:  # even empty: a non-Bearer or blank value is a wrong one
        scheme, _, credentials = headers["authorization"].partition(" ")
        offered.append(credentials.strip() if scheme.lower() == "bearer" else "")
    if headers.get("x-api-key"):
        offered.append(headers["x-api-key"])
    # compare_digest: the time taken must not reveal how much of the key matched.
    return bool(offered) and all(hmac.compare_digest(key.encode(), expected) for key in offered)


_bearer = HTTPBearer(auto_error=False, description="`Authorization: Bearer <API_KEY>`")
_api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="`X-API-Key: <API_KEY>`")


async def require_api_key(
    request: Request,
    settings: Annotated[Settings, Depends(get_settings)],
    bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],  # for the OpenAPI document
    header_key: Annotated[str | None, Depends(_api_key_header)],
) -> None:
    """Installed on /caption(s) and /model only when API_KEY is set (see create_app)."""
    if not api_key_accepted(request.headers, settings):
        raise Unauthorized()
