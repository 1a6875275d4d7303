"""POST /caption: an uploaded image in, captions out. POST /captions: several images, one result each."""

from __future__ import annotations

import re
from collections import Counter
from typing import Annotated
from urllib.parse import unquote

from fastapi import APIRouter, File, Query, Request, UploadFile

from app.dependencies import ImageBytes, Service, caller_of
from app.errors import ApiError, InvalidParameters, TooManyImages, error_responses
from app.schemas import BatchCaptionResponse, CaptionQuery, CaptionResponse, ErrorDetail, ImageCaptioned, ImageFailed
from app.service import decode_options, read_upload

router = APIRouter(tags=["captioning"])

RAW_IMAGE_SCHEMA = {
    "type": "string",
    "contentMediaType": "application/octet-stream",
    "description": "The image itself (any accepted format).",
}

FORMATS_NOTE = (
    "The format is judged from the bytes (JPEG, PNG, WebP, GIF, BMP, TIFF); animations use their "
    "first frame; EXIF orientation is applied."
)
DOMAIN_NOTE = (
    "`in_domain` and `domain_score` say whether the image looks like the model's training images; with "
    "OUT_OF_DOMAIN=reject an out-of-domain image gets 422 `out_of_domain` instead of captions."
)
PARAMETERS_NOTE = (
    "Invalid combinations of decoding parameters get 422 `invalid_parameters`: num_captions > 1 "
    "with greedy, num_captions > beam_size, beam_size without strategy=beam, and temperature, "
    "top_k or seed without strategy=sample."
)


@router.post(
    "/caption",
    response_model=CaptionResponse,
    response_model_exclude_none=True,  # the attention fields appear only when asked for
    responses=error_responses(400, 408, 413, 415, 422, 429, 500, 503, 504),
    summary="Caption an image",
    description=(
        "Upload one image: as the multipart field `image` (exactly one), or as the whole body with an image "
        "Content-Type (`image/png`, `image/jpeg`, ..., `application/octet-stream`, or none). "
        f"{FORMATS_NOTE} "
        f"{PARAMETERS_NOTE} {DOMAIN_NOTE}"
    ),
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                # Beside FastAPI's $ref (OpenAPI 3.1 allows siblings): a form must carry `image`,
                # which the parameter cannot say since a raw body leaves it out.
                "multipart/form-data": {"schema": {"required": ["image"]}},
                "image/*": {"schema": RAW_IMAGE_SCHEMA},
                "application/octet-stream": {"schema": RAW_IMAGE_SCHEMA},
            },
        }
    },
)
async def create_caption(
    request: Request,
    data: ImageBytes,
    query: Annotated[CaptionQuery, Query()],
    service: Service,
) -> CaptionResponse:
    check_once_each(request)
    options = decode_options(query)
    fields = await service.caption(data, options, caller_of(request))
    return CaptionResponse(**dict(fields), request_id=request.state.request_id)


@router.post(
    "/captions",
    response_model=BatchCaptionResponse,
    response_model_exclude_none=True,
    responses=error_responses(400, 408, 413, 415, 422, 429, 503, 504),
    summary="Caption several images",
    description="Upload images as the repeated multipart field `images` (at least one, at most "
    "MAX_IMAGES_PER_REQUEST). MAX_UPLOAD_BYTES applies to each file and, with 16 KiB for the multipart framing, "
    "to the whole body: a body over it is refused whole (413) while it streams in. Each image gets one result, "
    "in upload order: its captions, or its own error (the codes of POST /caption) without failing the others; when the "
    "request's deadline passes, the captions already finished are returned and the rest are marked "
    "`deadline_exceeded`. If every image is refused for load, the answer is 503 with Retry-After; if no image "
    f"was captioned and each was refused or ran out of time, 504. {FORMATS_NOTE} "
    f"{PARAMETERS_NOTE}",
)
async def create_captions(
    request: Request,
    images: Annotated[list[UploadFile], File(min_length=1, description="The image files (at least one).")],
    query: Annotated[CaptionQuery, Query()],
    service: Service,
) -> BatchCaptionResponse:
    check_once_each(request)
    options = decode_options(query)
    limit = service.settings.max_images_per_request
    if len(images) > limit:
        raise TooManyImages(f"{len(images)} images sent; the limit is {limit} per request")
    data = [await read_upload(upload, service.settings.max_upload_bytes) for upload in images]
    outcomes = await service.caption_many(data, options, caller_of(request))
    results = [
        _image_result(index, part_filename(upload), outcome)
        for index, (upload, outcome) in enumerate(zip(images, outcomes, strict=True))
    ]
    failed = Counter(result.error.code for result in results if isinstance(result, ImageFailed))
    if failed:  # for the access log: a 200 whose images failed is otherwise invisible there
        request.state.image_errors = dict(failed)
    return BatchCaptionResponse(results=results, request_id=request.state.request_id)


def check_once_each(request: Request) -> None:
    """Refuses query parameters given more than once (FastAPI would keep the last value without a word)."""
    params = request.query_params
    repeated = sorted({name for name in params if len(params.getlist(name)) > 1})
    if repeated:
        raise InvalidParameters(f"given more than once: {', '.join(repeated)} (send each parameter once)")


# RFC 6266 / 5987: filename*=UTF-8''%C3%BC.png beside filename (aiohttp sends the plain one
# percent-encoded too). Starlette reads only the plain one.
EXTENDED_FILENAME = re.compile(r"""(?:^|;)\s*filename\*\s*=\s*([\w.-]+)'[^']*'([^;\s]+)""", re.IGNORECASE)


def part_filename(upload: UploadFile) -> str | None:
    """The part's file name, from filename* where the client sent one (it wins over filename)."""
    extended = EXTENDED_FILENAME.search(upload.headers.get("content-disposition", ""))
    if extended:
        charset, encoded = extended.groups()
        try:
            return unquote(encoded, encoding=charset, errors="strict")
        except (LookupError, UnicodeDecodeError):
            pass
    return upload.filename


def _image_result(index: int, filename: str | None, outcome) -> ImageCaptioned | ImageFailed:
    if isinstance(outcome, ApiError):
        error = ErrorDetail(code=outcome.code, message=outcome.message)
        return ImageFailed(index=index, filename=filename, error=error)
    return ImageCaptioned(**dict(outcome), index=index, filename=filename)
