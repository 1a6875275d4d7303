"""Service errors and the exception handlers that turn every failure into one JSON shape:

    {"error": {"code": "...", "message": "..."}, "request_id": "..."}

Routes and helpers raise an `ApiError` subclass; FastAPI's own validation errors, Starlette's
HTTP exceptions (404, 405, ...) and anything unexpected go through the same renderer.
"""

from __future__ import annotations

import math
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.schemas import ErrorResponse

class ApiError(Exception):
    status_code = 500
    code = "internal_error"

    def __init__(self, message: str, *, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.message = message
        self.headers = headers or {}


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


class ImageTooSmall(ApiError):
    status_code, code = 422, "image_too_small"


class InvalidParameters(ApiError):
    status_code, code = 422, "invalid_parameters"


class TooManyImages(ApiError):
    status_code, code = 422, "too_many_images"


class _RetryLater(ApiError):
    status_code = 503

    def __init__(self, message: str, retry_after_s: float):
        super().__init__(message, headers={"Retry-After": str(max(1, math.ceil(retry_after_s)))})


class NotReady(_RetryLater):
    code = "not_ready"


class Overloaded(_RetryLater):
    code = "overloaded"


class DeadlineExceeded(ApiError):
    status_code, code = 504, "deadline_exceeded"


class InferenceFailed(ApiError):
    status_code, code = 500, "inference_failed"


class UploadTooLarge(StarletteHTTPException):
    """Raised from inside the request body stream (see app.middleware.UploadLimitMiddleware).

    It must be an HTTPException: FastAPI re-raises those from body parsing as they are, while any
    other exception there becomes a generic 400.
    """

    def __init__(self, limit_bytes: int):
        super().__init__(413, f"the upload is larger than the limit of {limit_bytes} bytes")


# Codes for errors FastAPI/Starlette raise themselves.
_HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    413: "upload_too_large",
    415: "unsupported_media_type",
    422: "validation_error",
    429: "too_many_requests",
    503: "unavailable",
}


def request_id_of(request: Request) -> str | None:
    return request.scope.get("state", {}).get("request_id")


def error_response(request: Request, status_code: int, code: str, message: str,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    body = ErrorResponse(error={"code": code, "message": message}, request_id=request_id_of(request))
    return JSONResponse(body.model_dump(), status_code=status_code, headers=headers)


def _describe_validation_errors(errors: list[dict[str, Any]]) -> str:
    parts = []
    for error in errors[:5]:
        where = ".".join(str(part) for part in error.get("loc", ()) if part not in ("body",)) or "request"
        parts.append(f"{where}: {error.get('msg', 'invalid')}")
    more = len(errors) - len(parts)
    return "; ".join(parts) + (f" (and {more} more)" if more > 0 else "")


async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
    return error_response(request, exc.status_code, exc.code, exc.message, exc.headers)


async def _http_exception(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    code = _HTTP_CODES.get(exc.status_code, "http_error")
    message = exc.detail if isinstance(exc.detail, str) else HTTPStatus(exc.status_code).phrase
    return error_response(request, exc.status_code, code, message, dict(exc.headers or {}))


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    return error_response(request, 422, "validation_error", _describe_validation_errors(list(exc.errors())))


async def _unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    # Starlette's ServerErrorMiddleware calls this, then re-raises so the server logs the traceback.
    return error_response(request, 500, "internal_error", "the server failed to handle the request",
                          {"X-Request-ID": request_id_of(request) or ""})


def install_exception_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(StarletteHTTPException, _http_exception)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(Exception, _unexpected_error)


def error_responses(*status_codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses=` entries documenting errors with the shared shape."""
    documented: dict[int | str, dict[str, Any]] = {}
    for status in status_codes:
        entry: dict[str, Any] = {"model": ErrorResponse, "description": _ERROR_DESCRIPTIONS[status]}
        if status == 503:
            entry["headers"] = {
                "Retry-After": {"description": "Seconds to wait before retrying.", "schema": {"type": "integer"}}
            }
        if status == 401:
            entry["headers"] = {"WWW-Authenticate": {"description": "Bearer", "schema": {"type": "string"}}}
        documented[status] = entry
    return documented


_ERROR_DESCRIPTIONS = {
    400: "The body is not a decodable image (corrupt, truncated, empty, not an image).",
    401: "Missing or wrong API key.",
    403: "The endpoint is disabled (the admin endpoints need API_KEY set).",
    404: "No such model, or the version is not served.",
    409: "The reload was refused; nothing changed.",
    413: "The upload is larger than MAX_UPLOAD_BYTES.",
    415: "The image format is not one of JPEG, PNG, WebP, GIF, BMP, TIFF.",
    422: "Missing field, invalid parameter or combination, too many images, or image dimensions out of range.",
    500: "Unexpected server error.",
    503: "Not ready yet, shutting down, or overloaded; retry after Retry-After seconds.",
    504: "The request's deadline (REQUEST_TIMEOUT_S) passed.",
}
