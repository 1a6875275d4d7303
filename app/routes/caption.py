"""POST /caption: an uploaded image in, captions out."""

from __future__ import annotations

import time
from typing import Annotated

from fastapi import APIRouter, Depends, File, Query, Request, UploadFile

from app.dependencies import get_captioner, get_engine, get_settings
from app.errors import UploadTooLarge, error_responses
from app.inference import InferenceEngine, caption_or_give_up, decode_in_worker, decode_options
from app.schemas import CaptionCandidate, CaptionQuery, CaptionResponse, ImageInfo, ModelRef, Timing
from app.settings import Settings

router = APIRouter(tags=["captioning"])


@router.post(
    "/caption",
    response_model=CaptionResponse,
    responses=error_responses(400, 413, 415, 422, 500, 503, 504),
    summary="Caption an image",
    description="Upload one image as the multipart field `image`. The format is judged from the bytes "
    "(JPEG, PNG, WebP, GIF, BMP, TIFF); animations use their first frame; EXIF orientation is applied.",
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
    data = await image.read()

    decode_started = time.perf_counter()
    decoded, pixels = await decode_in_worker(data, captioner, settings, request.app.state.decode_limiter)
    decode_ms = (time.perf_counter() - decode_started) * 1000

    remaining_s = started + settings.request_timeout_s - time.perf_counter()
    result = await caption_or_give_up(engine, pixels, options, deadline_s=remaining_s, receive=request.receive)

    manifest = captioner.manifest
    return CaptionResponse(
        caption=result.captions[0].text,
        captions=[CaptionCandidate(text=c.text, confidence=c.confidence, log_prob=c.log_prob)
                  for c in result.captions],
        model=ModelRef(name=str(manifest.get("name", "unknown")), version=str(manifest.get("version", "unknown"))),
        image=ImageInfo(width=decoded.width, height=decoded.height, format=decoded.format),
        timing_ms=Timing(
            decode=round(decode_ms, 2),
            queue=round(result.queue_ms, 2),
            inference=round(result.inference_ms, 2),
            total=round((time.perf_counter() - started) * 1000, 2),
        ),
        request_id=request.state.request_id,
    )
