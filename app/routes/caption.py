"""POST /caption: an uploaded image in, captions out. POST /captions: several images, one result each."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Annotated

import anyio
import numpy as np
from fastapi import APIRouter, Depends, File, Query, Request, UploadFile

from app.dependencies import get_captioner, get_engine, get_settings
from app.errors import ApiError, DeadlineExceeded, OutOfDomain, TooManyImages, UploadTooLarge, error_responses
from app.images import DecodedImage
from app.inference import InferenceEngine, caption_or_give_up, decode_image, decode_options, run_or_give_up, submit
from app.schemas import (
    AttentionGrid,
    BatchCaptionResponse,
    CaptionCandidate,
    CaptionFields,
    CaptionQuery,
    CaptionResponse,
    ErrorDetail,
    ImageCaptioned,
    ImageFailed,
    ImageInfo,
    ModelRef,
    Timing,
    WordAttention,
)
from app.settings import Settings
from captioning.decoding import DecodeOptions
from captioning.domain import IN_DOMAIN_SCORE

logger = logging.getLogger("app.routes.caption")
router = APIRouter(tags=["captioning"])

FORMATS_NOTE = ("The format is judged from the bytes (JPEG, PNG, WebP, GIF, BMP, TIFF); animations use their "
                "first frame; EXIF orientation is applied.")
DOMAIN_NOTE = ("`in_domain` and `domain_score` say whether the image looks like the model's training images; with "
               "OUT_OF_DOMAIN=reject an out-of-domain image gets 422 `out_of_domain` instead of captions.")
PARAMETERS_NOTE = ("Invalid combinations of decoding parameters get 422 `invalid_parameters`: num_captions > 1 "
                   "with greedy, num_captions > beam_size, beam_size without strategy=beam, and temperature, "
                   "top_k or seed without strategy=sample.")


@router.post(
    "/caption",
    response_model=CaptionResponse,
    response_model_exclude_none=True,  # the attention fields appear only when asked for
    responses=error_responses(400, 413, 415, 422, 500, 503, 504),
    summary="Caption an image",
    description=f"Upload one image as the multipart field `image`. {FORMATS_NOTE} {PARAMETERS_NOTE} {DOMAIN_NOTE}",
)
async def create_caption(
    request: Request,
    image: Annotated[UploadFile, File(description="The image file.")],
    query: Annotated[CaptionQuery, Query()],
    settings: Annotated[Settings, Depends(get_settings)],
    engine: Annotated[InferenceEngine, Depends(get_engine)],
    captioner: Annotated[object, Depends(get_captioner)],
) -> CaptionResponse:
    started = request.state.started_at
    options = decode_options(query)
    # The body limit in UploadLimitMiddleware allows for multipart framing; this is the file itself.
    if image.size is not None and image.size > settings.max_upload_bytes:
        raise UploadTooLarge(settings.max_upload_bytes)
    decoded, pixels, decode_ms = await _read_and_decode(request, image, settings, captioner)
    domain = await check_domain(captioner, pixels, settings)

    remaining_s = started + settings.request_timeout_s - time.perf_counter()
    result = await caption_or_give_up(engine, pixels, options, deadline_s=remaining_s, receive=request.receive)
    fields = caption_fields(result, options, captioner, decoded, decode_ms, started, domain)
    return CaptionResponse(**dict(fields), request_id=request.state.request_id)


@router.post(
    "/captions",
    response_model=BatchCaptionResponse,
    response_model_exclude_none=True,
    responses=error_responses(413, 422, 503, 504),
    summary="Caption several images",
    description="Upload images as the repeated multipart field `images` (at most MAX_IMAGES_PER_REQUEST; the "
    "upload limit applies to the whole body). Each image gets one result, in upload order: its captions, or "
    f"its own error (the codes of POST /caption) without failing the others. {FORMATS_NOTE} {PARAMETERS_NOTE}",
)
async def create_captions(
    request: Request,
    images: Annotated[list[UploadFile], File(description="The image files.")],
    query: Annotated[CaptionQuery, Query()],
    settings: Annotated[Settings, Depends(get_settings)],
    engine: Annotated[InferenceEngine, Depends(get_engine)],
    captioner: Annotated[object, Depends(get_captioner)],
) -> BatchCaptionResponse:
    options = decode_options(query)
    if len(images) > settings.max_images_per_request:
        raise TooManyImages(f"{len(images)} images sent; the limit is {settings.max_images_per_request} per request")
    deadline_s = request.state.started_at + settings.request_timeout_s - time.perf_counter()
    # Every image is decoded and submitted on its own, so the engine batches them with each other
    # and with other requests; one image's failure is its own result.
    outcomes = await run_or_give_up(
        asyncio.gather(*(_caption_upload(request, upload, options, settings, engine, captioner) for upload in images),
                       return_exceptions=True),
        deadline_s=deadline_s, receive=request.receive,
    )
    results = [_image_result(index, upload.filename, outcome)
               for index, (upload, outcome) in enumerate(zip(images, outcomes, strict=True))]
    return BatchCaptionResponse(results=results, request_id=request.state.request_id)


async def _caption_upload(request: Request, upload: UploadFile, options: DecodeOptions, settings: Settings,
                          engine: InferenceEngine, captioner) -> CaptionFields:
    started = request.state.started_at
    decoded, pixels, decode_ms = await _read_and_decode(request, upload, settings, captioner)
    domain = await check_domain(captioner, pixels, settings)
    remaining_s = started + settings.request_timeout_s - time.perf_counter()
    if remaining_s <= 0:
        raise DeadlineExceeded("the request deadline passed before inference could start")
    result = await submit(engine, pixels, options, remaining_s)
    return caption_fields(result, options, captioner, decoded, decode_ms, started, domain)


async def _read_and_decode(request: Request, upload: UploadFile, settings: Settings,
                           captioner) -> tuple[DecodedImage, np.ndarray, float]:
    """The upload's bytes -> (decoded image, model input, decoding time in ms)."""
    data = await upload.read()
    decode_started = time.perf_counter()
    decoded, pixels = await decode_image(data, captioner, settings, request.app.state.decode_limiter)
    return decoded, pixels, (time.perf_counter() - decode_started) * 1000


async def check_domain(captioner, pixels: np.ndarray, settings: Settings) -> float | None:
    """The image's domain score (captioning.domain), or None when the model has no domain check;
    raises OutOfDomain when the setting refuses out-of-domain images. One extra encoder pass, run
    in a worker thread."""
    if getattr(captioner, "domain", None) is None:
        return None
    score = float((await anyio.to_thread.run_sync(captioner.domain_scores, pixels[None]))[0])
    if score < IN_DOMAIN_SCORE and settings.out_of_domain == "reject":
        raise OutOfDomain(f"the image does not look like what this model was trained on (domain_score "
                          f"{score:.3f} < {IN_DOMAIN_SCORE}); OUT_OF_DOMAIN=caption captions it anyway")
    return score


def _image_result(index: int, filename: str | None,
                  outcome: CaptionFields | BaseException) -> ImageCaptioned | ImageFailed:
    if isinstance(outcome, CaptionFields):
        return ImageCaptioned(**dict(outcome), index=index, filename=filename)
    if isinstance(outcome, ApiError):
        error = ErrorDetail(code=outcome.code, message=outcome.message)
    else:  # a bug: logged with its traceback, reported like a 500 in this image's slot
        logger.error("captioning image %d failed", index, exc_info=outcome)
        error = ErrorDetail(code="internal_error", message="the server failed to caption this image")
    return ImageFailed(index=index, filename=filename, error=error)


def caption_fields(result, options: DecodeOptions, captioner, decoded, decode_ms: float,
                   started: float, domain_score: float | None = None) -> CaptionFields:
    """An engine result -> the response fields of one captioned image."""
    manifest = captioner.manifest
    grid = None
    if options.return_attention:
        height, width = captioner.grid_shape
        grid = AttentionGrid(height=height, width=width)
    return CaptionFields(
        caption=result.captions[0].text,
        captions=[_candidate(caption) for caption in result.captions],
        attention_grid=grid,
        in_domain=None if domain_score is None else domain_score >= IN_DOMAIN_SCORE,
        domain_score=None if domain_score is None else round(domain_score, 4),
        model=ModelRef(name=str(manifest.get("name", "unknown")), version=str(manifest.get("version", "unknown"))),
        image=ImageInfo(width=decoded.width, height=decoded.height, format=decoded.format),
        timing_ms=Timing(
            decode=round(decode_ms, 2),
            queue=round(result.queue_ms, 2),
            inference=round(result.inference_ms, 2),
            total=round((time.perf_counter() - started) * 1000, 2),
        ),
    )


def _candidate(caption) -> CaptionCandidate:
    words = None
    if caption.attention is not None:
        words = [WordAttention(word=word, attention=weights)
                 for word, weights in zip(caption.tokens, caption.attention, strict=True)]
    return CaptionCandidate(text=caption.text, confidence=caption.confidence, log_prob=caption.log_prob, words=words)
