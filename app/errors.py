"""Service errors and the exception handlers that turn every failure into one JSON shape:

    {"error": {"code": "...", "message": "..."}, "request_id": "..."}

Routes and helpers raise an `ApiError` subclass; the inference engine raises its own errors
(app.engine: Overloaded, DeadlineExceeded, EngineStopped, InferenceError), which `as_api_error`
maps to statuses here, so HTTP stays out of the engine. FastAPI's own validation errors,
Starlette's HTTP exceptions (404, 405, ...) and anything unexpected go through the same renderer.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import math
import tempfile
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request, params
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from python_multipart.multipart import DEFAULT_MAX_HEADER_COUNT, DEFAULT_MAX_HEADER_SIZE
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from app.engine import ClientOverloaded, DeadlineExceeded, EngineError, EngineStopped, InferenceError, Overloaded
from app.logging_config import LOGGED_WITH_REQUEST_ID
from app.schemas import ErrorResponse

logger = logging.getLogger("app.errors")

# Seconds a client should wait before asking a service that is starting or stopping again.
NOT_READY_RETRY_AFTER_S = 5


class ApiError(Exception):
    status_code = 500
    code = "internal_error"

    def __init__(
        self,
        message: str,
        *,
        headers: dict[str, str] | None = None,
        status_code: int | None = None,
        code: str | None = None,
    ):
        super().__init__(message)
        self.message = message
        self.headers = headers or {}
        self.status_code = status_code or self.status_code
        self.code = code or self.code


class InvalidImage(ApiError):
    status_code, code = 400, "invalid_image"


class Unauthorized(ApiError):
    status_code, code = 401, "unauthorized"

    def __init__(self, message: str = "a valid API key is required (Authorization: Bearer or X-API-Key)"):
        super().__init__(message, headers={"WWW-Authenticate": "Bearer"})


class UnsupportedImageFormat(ApiError):
    status_code, code = 415, "unsupported_image_format"


class ImageTooLarge(ApiError):
    status_code, code = 422, "image_too_large"


class ImageTooComplex(ApiError):
    status_code, code = 422, "image_too_complex"


class ImageTooSmall(ApiError):
    status_code, code = 422, "image_too_small"


class InvalidParameters(ApiError):
    status_code, code = 422, "invalid_parameters"


class TooManyImages(ApiError):
    status_code, code = 422, "too_many_images"


class DuplicateField(ApiError):
    status_code, code = 422, "duplicate_field"


class MissingImage(ApiError):
    """A form without the image field (the same code FastAPI's own validation gives a missing field)."""

    status_code, code = 422, "validation_error"


class UnsupportedMediaType(ApiError):
    """A body that is neither a multipart form nor an image type."""

    status_code, code = 415, "unsupported_media_type"


class UnsupportedContentEncoding(ApiError):
    """A compressed request body (Content-Encoding: gzip, deflate, br, ...)."""

    status_code, code = 415, "unsupported_content_encoding"


class NoCaption(ApiError):
    """The model produced no word for this image, even with min_length (say, only <pad> tokens)."""

    status_code, code = 422, "no_caption"


class OutOfDomain(ApiError):
    status_code, code = 422, "out_of_domain"


def retry_after(seconds: float) -> dict[str, str]:
    return {"Retry-After": str(max(1, math.ceil(seconds)))}


class _RetryLater(ApiError):
    status_code = 503

    def __init__(self, message: str, retry_after_s: float):
        super().__init__(message, headers=retry_after(retry_after_s))


class NotReady(_RetryLater):
    code = "not_ready"


class TooManyUploads(_RetryLater):
    code = "too_many_uploads"


class TooManyClientUploads(ApiError):
    """One client address has MAX_UPLOADS_PER_CLIENT bodies being read already."""

    status_code, code = 429, "too_many_uploads"

    def __init__(self, message: str, retry_after_s: float):
        super().__init__(message, headers=retry_after(retry_after_s))


class ClientDisconnected(ApiError):
    # Nobody reads this response; the status only appears in the access log and metrics.
    status_code, code = 499, "client_closed_request"


def as_api_error(exc: BaseException) -> ApiError:
    """The HTTP error for any failure: an ApiError as it is, an engine error by kind, anything
    else (a bug) as a 500."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, ClientOverloaded):  # before Overloaded, its base
        return ApiError(
            f"this client has {exc.limit} images waiting or being captioned, its share of the inference queue "
            "(CLIENT_QUEUE_SHARE); retry when some are answered",
            status_code=429,
            code="too_many_queued",
            headers=retry_after(exc.retry_after_s),
        )
    if isinstance(exc, Overloaded):
        return ApiError(
            "the inference queue is full; retry shortly",
            status_code=503,
            code="overloaded",
            headers=retry_after(exc.retry_after_s),
        )
    if isinstance(exc, DeadlineExceeded):
        return ApiError(
            str(exc) or "the request deadline passed while waiting for inference",
            status_code=504,
            code="deadline_exceeded",
            headers=None if exc.retry_after_s is None else retry_after(exc.retry_after_s),
        )
    if isinstance(exc, EngineStopped):
        return NotReady("the service is shutting down", NOT_READY_RETRY_AFTER_S)
    if isinstance(exc, InferenceError):
        return ApiError("the model failed on this request's batch; retrying may succeed", code="inference_failed")
    return ApiError("the server failed to handle the request")


class UploadTooLarge(StarletteHTTPException):
    """Raised from inside the request body stream (see app.middleware.UploadLimitMiddleware).

    It must be an HTTPException: FastAPI re-raises those from body parsing as they are, while any
    other exception there becomes a generic 400.
    """

    def __init__(self, limit_bytes: int):
        super().__init__(413, f"the upload is larger than the limit of {limit_bytes} bytes")


class BodyTimeout(StarletteHTTPException):
    """Raised from inside the request body stream (see app.guards.UploadGuard), like UploadTooLarge."""

    code = "body_timeout"

    def __init__(self, message: str):
        super().__init__(408, message)


class UploadMemoryFull(StarletteHTTPException):
    """Raised from inside the request body stream when the bodies held would pass UPLOAD_MEMORY_MB
    (app.guards.UploadGuard): answered 503 too_many_uploads, as at the door."""

    code = TooManyUploads.code

    def __init__(self, message: str, retry_after_s: float):
        super().__init__(503, message, headers=retry_after(retry_after_s))


# Codes for errors FastAPI/Starlette raise themselves.
_HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    408: "body_timeout",
    413: "upload_too_large",
    415: "unsupported_media_type",
    422: "validation_error",
    429: "too_many_requests",
    503: "unavailable",
}


def request_id_of(request: Request) -> str | None:
    return request.scope.get("state", {}).get("request_id")


# The Open Inference Protocol's routes (app.routes.oip) answer errors in its own shape,
# {"error": "message"}: tritonclient and KServe clients show that string to their users.
OIP_PREFIX = "/v2"


def error_response(
    request: Request, status_code: int, code: str, message: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    request.scope.setdefault("state", {})["error_code"] = code  # for the error counter (app.middleware)
    path = request.scope.get("path", "")
    if path == OIP_PREFIX or path.startswith(OIP_PREFIX + "/"):
        # Also what escapes the OIP routes' own handling: the engine's errors (a full queue, a
        # deadline), an unknown /v2 path or method.
        return JSONResponse({"error": message}, status_code=status_code, headers=headers)
    body = ErrorResponse(error={"code": code, "message": message}, request_id=request_id_of(request))
    return JSONResponse(body.model_dump(), status_code=status_code, headers=headers)


def api_error_response(request: Request, error: ApiError) -> JSONResponse:
    return error_response(request, error.status_code, error.code, error.message, error.headers)


def _describe_validation_errors(errors: list[dict[str, Any]]) -> str:
    parts = []
    for error in errors[:5]:
        where = ".".join(str(part) for part in error.get("loc", ()) if part not in ("body",)) or "request"
        message = error.get("msg", "invalid")
        if "Expected UploadFile" in message:  # FastAPI's words for a text field where a file belongs
            message = f"must be a file (a form part with a filename), not a text field: {FILE_PART_HINT}"
        elif error.get("type") == "extra_forbidden":
            message = "unknown parameter (see the operation's parameters in /openapi.json)"
        parts.append(f"{where}: {message}")
    more = len(errors) - len(parts)
    return "; ".join(parts) + (f" (and {more} more)" if more > 0 else "")


async def _api_error(request: Request, exc: Exception) -> JSONResponse:
    return api_error_response(request, as_api_error(exc))


FILE_PART_HINT = (
    "send the image as a file part, with a filename (requests: files={'image': ('photo.png', data)}; "
    "form-data: append('image', buffer, 'photo.png'); curl: -F image=@photo.png)"
)
# Starlette's words for a broken form, and what the client should do about it.
_FORM_PROBLEMS = {
    "Missing boundary in multipart.": "the multipart Content-Type has no boundary: let the HTTP library set "
    "the Content-Type of a form, which adds it (with fetch or axios and FormData, set no Content-Type)",
    "Invalid multipart data.": "the multipart body is not valid: its lines must end with CRLF (\\r\\n), its "
    "parts start with --BOUNDARY, as the Content-Type's boundary says, and each part has at most "
    f"{DEFAULT_MAX_HEADER_COUNT} header lines of at most {DEFAULT_MAX_HEADER_SIZE} bytes",
}


async def _http_exception(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    code = getattr(exc, "code", None) or _HTTP_CODES.get(exc.status_code, "http_error")
    message = exc.detail if isinstance(exc.detail, str) else HTTPStatus(exc.status_code).phrase
    cause = exc.__cause__
    if isinstance(cause, ClientDisconnect):
        # FastAPI parses a form (or a JSON body) before the route runs and turns a client that left
        # mid-body into a 400: here it is logged and counted as what it is, as the raw-body and /v2 paths do.
        return api_error_response(request, ClientDisconnected("the client disconnected while sending the request body"))
    if isinstance(cause, OSError) and cause.errno in (errno.ENOSPC, errno.EDQUOT):
        # Form files over 1 MB are spooled to the temporary directory (Starlette): a full /tmp is
        # the server's problem, not a malformed body.
        logger.error("no space left for an upload's temporary file: %s", cause, extra={"tmp": tempfile.gettempdir()})
        return error_response(
            request, 507, "insufficient_storage", "the server has no room for the upload now; retry later"
        )
    allowed = next((value for name, value in (exc.headers or {}).items() if name.lower() == "allow"), None)
    if exc.status_code == 405 and allowed:
        message = f"{request.method} is not allowed on {request.url.path}; use {allowed}"
    elif exc.status_code == 400 and message in _FORM_PROBLEMS:
        message = _FORM_PROBLEMS[message]
    elif exc.status_code == 400 and message.startswith(("Too many files.", "Too many fields.")):
        # The parser's counts (app.main's form_limits): a form carries image files and nothing else.
        most = request.app.state.settings.max_images_per_request
        if message.startswith("Too many files."):
            limit = f"the limit is {most} (MAX_IMAGES_PER_REQUEST)"
            if request.url.path == "/caption":  # its form holds one image; /captions takes many
                limit = f"POST /caption takes one image (POST /captions up to {most}, MAX_IMAGES_PER_REQUEST)"
            return api_error_response(request, TooManyImages(f"the form has more than {most} files; {limit}"))
        return error_response(
            request,
            400,
            "bad_request",
            f"the form has more than {most} text fields (MAX_IMAGES_PER_REQUEST); it needs none: {FILE_PART_HINT}",
        )
    elif exc.status_code == 400 and message.startswith("Part exceeded maximum size"):
        # A part without a filename is a text field, which Starlette caps at 1 MB: here, an image
        # sent without a filename (as requests' (None, data) and form-data's append(name, buffer) do).
        return error_response(
            request, 422, "validation_error", f"a form part without a filename is a text field: {FILE_PART_HINT}"
        )
    return error_response(request, exc.status_code, code, message, dict(exc.headers or {}))


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = list(exc.errors())
    media_type = body_media_type(request)
    form_fields = _form_fields(getattr(request.scope.get("route"), "dependant", None))
    missing_parts = [
        e["loc"][-1]
        for e in errors
        if e.get("type") == "missing" and e["loc"][:1] == ("body",) and e["loc"][-1] in form_fields
    ]
    if missing_parts and media_type not in FORM_MEDIA_TYPES:
        # A form's parts are missing because the body is not a form at all (JSON, a raw image): say that.
        parts = ", ".join(f"`{part}`" for part in missing_parts)
        error = UnsupportedMediaType(
            f"Content-Type {media_type or '(none)'} is not accepted here: send a multipart form with {parts}"
        )
        return api_error_response(request, error)
    return error_response(request, 422, "validation_error", _describe_validation_errors(errors))


FORM_MEDIA_TYPES = ("multipart/form-data", "application/x-www-form-urlencoded")


def body_media_type(request: Request) -> str:
    """The request body's media type, lower case, without parameters ("" when none is given)."""
    return request.headers.get("content-type", "").partition(";")[0].strip().lower()


def _form_fields(dependant) -> set[str]:
    """The names of the form (and file) fields a route and its dependencies read."""
    if dependant is None:
        return set()
    names = {field.alias for field in dependant.body_params if isinstance(field.field_info, params.Form)}
    for sub in dependant.dependencies:
        names |= _form_fields(sub)
    return names


async def _unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    # Starlette's ServerErrorMiddleware calls this, then re-raises, and uvicorn logs the traceback
    # without the request's ID; logged here with it, uvicorn's copy is dropped
    # (app.logging_config.DropRepeatedTraceback).
    path = request.scope.get("path", "")
    logger.error(
        "unhandled error while handling %s %s",
        request.method,
        path,
        exc_info=exc,
        extra={"request_id": request_id_of(request), "path": path},
    )
    with contextlib.suppress(AttributeError, TypeError):  # an exception type without a __dict__
        setattr(exc, LOGGED_WITH_REQUEST_ID, True)
    return error_response(
        request,
        500,
        "internal_error",
        "the server failed to handle the request",
        {"X-Request-ID": request_id_of(request) or ""},
    )


def install_exception_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(EngineError, _api_error)
    app.add_exception_handler(StarletteHTTPException, _http_exception)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(Exception, _unexpected_error)


def error_responses(*status_codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses=` entries documenting errors with the shared shape."""
    documented: dict[int | str, dict[str, Any]] = {}
    for status in status_codes:
        entry: dict[str, Any] = {"model": ErrorResponse, "description": _ERROR_DESCRIPTIONS[status]}
        if status in (503, 504):
            entry["headers"] = {
                "Retry-After": {
                    "description": "Seconds to wait before retrying (on a 504: only when the request waited "
                    "for the model the whole time, behind a backlog).",
                    "schema": {"type": "integer"},
                }
            }
        if status == 401:
            entry["headers"] = {"WWW-Authenticate": {"description": "Bearer", "schema": {"type": "string"}}}
        documented[status] = entry
    return documented


_ERROR_DESCRIPTIONS = {
    400: "The body is not valid multipart data, or the image is not decodable (corrupt, truncated, empty, "
    "not an image).",
    401: "Missing or wrong API key (checked from the headers, before the body is read).",
    408: "The body did not arrive within BODY_TIMEOUT_S plus its size at MIN_UPLOAD_BYTES_PER_S.",
    403: "The endpoint is disabled (the admin endpoints need API_KEY set).",
    404: "No such model, or the version is not served.",
    409: "The reload was refused; nothing changed.",
    413: "The upload is larger than MAX_UPLOAD_BYTES.",
    415: "The image format is not one of JPEG, PNG, WebP, GIF, BMP, TIFF (`unsupported_image_format`), or the "
    "Content-Type is neither multipart/form-data nor an image type (`unsupported_media_type`), or the body is "
    "compressed (`unsupported_content_encoding`: send it without Content-Encoding).",
    422: "Missing or repeated field, invalid parameter or combination, too many images, image dimensions out of "
    "range, a JPEG with more than MAX_JPEG_SCANS scans, a TIFF with more than MAX_TIFF_STRIPS strips or tiles "
    "or MAX_TIFF_TAGS directory entries, or a PNG whose text chunks inflate past MAX_PNG_TEXT_BYTES "
    "(`image_too_complex`), or no caption for the image (`no_caption`).",
    429: "This client address has MAX_UPLOADS_PER_CLIENT request bodies being read already "
    "(`too_many_uploads`), or images in the engine up to its share of the queue (`too_many_queued`, "
    "CLIENT_QUEUE_SHARE); retry after Retry-After seconds.",
    500: "Unexpected server error.",
    503: "Not ready yet, shutting down, overloaded, or too many uploads (MAX_CONCURRENT_UPLOADS bodies being read, "
    "or UPLOAD_MEMORY_MB of bodies held); retry after Retry-After seconds.",
    504: "The request's deadline (REQUEST_TIMEOUT_S) passed; with Retry-After when it passed in the queue.",
    507: "No room in the temporary directory for the upload (form files over 1 MB are spooled there).",
}
