"""What happens to an upload: its bytes read (`read_upload`), then in one object: validate -> decode -> submit -> shape.

    service = CaptionService(settings, captioner, engine, DecodePool(...))   # built by the lifespan
    fields = await service.caption(data, options, caller_of(request))       # app.dependencies.caller_of
    results = await service.caption_many([data, ...], options, caller_of(request))

Routes get it through `app.dependencies.Service` and stay thin; any route family (multipart
uploads here, raw bytes from another protocol) hands it image bytes and DecodeOptions. It raises
ApiError subclasses for bad input and the engine's own errors (Overloaded, DeadlineExceeded, ...),
which app.errors turns into responses.

Memory: an upload is decoded under a byte budget weighted by its pixels (app.decode_pool); a small
one on the event loop, where handing it to a thread would cost more than decoding it. A queue place
in the engine is taken only at submit(), after the upload is read and decoded.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import numpy as np
from fastapi import UploadFile

from app.decode_pool import DecodePool
from app.engine import DeadlineExceeded, EngineError, EngineStopped, Overloaded
from app.errors import (
    ApiError,
    ClientDisconnected,
    ImageTooLarge,
    InvalidParameters,
    NoCaption,
    OutOfDomain,
    UploadTooLarge,
    as_api_error,
)
from app.images import DecodedImage, decode_bytes, decode_opened, open_upload
from app.schemas import (
    STRATEGY_ONLY_PARAMETERS,
    AttentionGrid,
    CaptionCandidate,
    CaptionFields,
    CaptionQuery,
    ImageInfo,
    ModelRef,
    Timing,
    WordAttention,
)
from app.settings import Settings
from captioning.decoding import DecodeOptions
from captioning.domain import IN_DOMAIN_SCORE

logger = logging.getLogger("app.service")

# Extra time the engine gets past the deadline to report DeadlineExceeded itself before the
# service stops waiting; only matters if the engine (or a decode) misses the deadline.
ENGINE_GRACE_S = 1.0
# Uploads decoded on the event loop: at most this many bytes (the header is parsed there; Pillow
# reads a PNG's chunks up to the pixel data) and this many pixels (about 1 ms to decode).
INLINE_DECODE_MAX_BYTES = 256 * 1024
INLINE_DECODE_MAX_PIXELS = 256 * 256
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

Receive = Callable[[], Awaitable[dict]]


@dataclass(frozen=True)
class Caller:
    """Who asked, for the service's bookkeeping: when the request began (its deadline counts from
    then), its ASGI receive channel (to notice the client leaving) and the client's address (its
    turn for the decode budget, app.decode_pool, and in the engine's queue)."""

    started_at: float
    receive: Receive | None = None
    client: str = ""


@dataclass(frozen=True)
class Prepared:
    """An upload decoded and resized to the model's input."""

    decoded: DecodedImage
    pixels: np.ndarray  # uint8 [S, S, 3]
    decode_ms: float


def decode_options(query: CaptionQuery) -> DecodeOptions:
    """Query parameters -> DecodeOptions; contradictory or impossible combinations raise
    InvalidParameters (422). Only parameters the client actually sent count as given."""
    for name in sorted(query.model_fields_set & STRATEGY_ONLY_PARAMETERS.keys()):
        if STRATEGY_ONLY_PARAMETERS[name] != query.strategy:
            raise InvalidParameters(
                f"{name} applies to strategy={STRATEGY_ONLY_PARAMETERS[name]} only, not strategy={query.strategy}"
            )
    strategy_parameters = {name: getattr(query, name) for name in STRATEGY_ONLY_PARAMETERS}
    try:
        return DecodeOptions(
            strategy=query.strategy,
            num_captions=query.num_captions,
            max_length=query.max_length,
            return_attention=query.attention,
            mirror_view=query.mirror_view,
            grounded=query.grounded,
            # Absent: DecodeOptions' defaults (the schema declares none, see CaptionQuery).
            **{name: value for name, value in strategy_parameters.items() if value is not None},
        ).validate()
    except ValueError as exc:
        raise InvalidParameters(str(exc)) from None


async def read_upload(upload: UploadFile, max_bytes: int) -> bytes:
    """A multipart file's bytes. The body limit (app.middleware) allows for multipart framing; this
    is the file itself."""
    if upload.size is not None and upload.size > max_bytes:
        raise UploadTooLarge(max_bytes)
    return await upload.read()


class CaptionService:
    def __init__(self, settings: Settings, captioner, engine, decoder: DecodePool):
        self.settings = settings
        self.captioner = captioner
        self.engine = engine
        self.decoder = decoder

    def for_model(self, captioner, engine) -> CaptionService:
        """The same service over another model version (the decode pool is shared)."""
        return CaptionService(self.settings, captioner, engine, self.decoder)

    @property
    def model(self) -> ModelRef:
        manifest = self.captioner.manifest
        return ModelRef(name=str(manifest.get("name", "unknown")), version=str(manifest.get("version", "unknown")))

    # --- the steps ------------------------------------------------------------------------------

    async def prepare(self, data: bytes, client: str = "") -> Prepared:
        """Validates, decodes and resizes image bytes (ApiError on bad input). The header decides
        the cost; the pixels are decoded under the memory budget, in a worker unless tiny, taking
        turns with other clients' decodes (`client`: the address app.middleware.client_address gives)."""
        started = time.perf_counter()
        settings, size = self.settings, self.captioner.config.image_size

        def header():
            return open_upload(
                data,
                max_pixels=settings.max_image_pixels,
                min_side=settings.min_image_side,
                max_jpeg_scans=settings.max_jpeg_scans,
                max_tiff_strips=settings.max_tiff_strips,
                max_tiff_tags=settings.max_tiff_tags,
            )

        def decode(image) -> tuple[DecodedImage, np.ndarray]:
            decoded = decode_opened(image, draft_size=size)
            return decoded, self.captioner.prepare(decoded.image)

        # Compressed text in a small PNG inflates to up to MAX_PNG_TEXT_BYTES when the header is read:
        # milliseconds each, not for the event loop (8 clients sending such files: /health/live p95
        # 22 ms read on the loop).
        small = len(data) <= INLINE_DECODE_MAX_BYTES and not (
            data.startswith(PNG_SIGNATURE) and (b"zTXt" in data or b"iTXt" in data)
        )
        image = header() if small else await self.decoder.run_unbudgeted(header)
        if small and image.width * image.height <= INLINE_DECODE_MAX_PIXELS:
            decoded, pixels = decode(image)
        else:
            cost, budget = decode_bytes(image, data, size), self.decoder.budget.capacity
            if cost > budget:
                raise ImageTooLarge(
                    f"decoding this {image.width}x{image.height} image takes about {-(-cost // 2**20)} MiB, more "
                    f"than the decode memory budget of {budget // 2**20} MiB (DECODE_MEMORY_MB, lower under a "
                    "container memory limit): send a smaller image"
                )
            decoded, pixels = await self.decoder.run(cost, decode, image, owner=client)
        return Prepared(decoded, pixels, (time.perf_counter() - started) * 1000)

    async def infer(self, prepared: Prepared, options: DecodeOptions, caller: Caller) -> CaptionFields:
        """Submits a prepared image to the engine within the request's deadline and shapes the answer."""
        remaining_s = caller.started_at + self.settings.request_timeout_s - time.perf_counter()
        if remaining_s <= 0:
            raise DeadlineExceeded("the request deadline passed before inference could start")
        result = await self.engine.submit(prepared.pixels, options, deadline_s=remaining_s, client=caller.client)
        score = result.domain_score  # from the engine's own encoder pass
        if score is not None and score < IN_DOMAIN_SCORE and self.settings.out_of_domain == "reject":
            raise OutOfDomain(
                f"the image does not look like what this model was trained on (domain_score {score:.3f} < "
                f"{IN_DOMAIN_SCORE}); OUT_OF_DOMAIN=caption captions it anyway"
            )
        fields = self._shape(result, prepared, options, caller.started_at)
        if not fields.caption:
            raise NoCaption("the model produced no words for this image")
        return fields

    # --- whole requests ------------------------------------------------------------------------

    async def caption(self, data: bytes, options: DecodeOptions, caller: Caller | None = None) -> CaptionFields:
        """One image; raises its error. Gives up when the client disconnects (`caller.receive`)."""
        caller = caller or Caller(time.perf_counter())
        self._check_model_supports(options)
        (outcome,) = await self._run_all([self._caption_one(data, options, caller)], caller)
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    async def caption_many(
        self,
        images: list[bytes],
        options: DecodeOptions,
        caller: Caller | None = None,
    ) -> list[CaptionFields | ApiError]:
        """Several images, each decoded and submitted on its own (the engine batches them with each
        other and with other requests), each with its own outcome, in order. When the deadline
        passes, the captions already finished are kept and the rest are `deadline_exceeded`. If
        every image was refused for load or shutdown, that refusal is raised for the whole request;
        if none was captioned and each was refused or ran out of time, the deadline is."""
        caller = caller or Caller(time.perf_counter())
        self._check_model_supports(options)
        outcomes = await self._run_all([self._caption_one(data, options, caller) for data in images], caller)
        refused = [o for o in outcomes if isinstance(o, (Overloaded, EngineStopped))]
        if outcomes and len(refused) == len(outcomes):
            raise refused[0]
        if outcomes and all(isinstance(o, (Overloaded, EngineStopped, DeadlineExceeded)) for o in outcomes):
            # No image was captioned and none for a fault of its own: the request's answer is the
            # deadline's 504, as /caption's would be (a 200 with nothing in it read as success).
            raise next(o for o in outcomes if isinstance(o, DeadlineExceeded))
        results: list[CaptionFields | ApiError] = []
        for index, outcome in enumerate(outcomes):
            if isinstance(outcome, BaseException) and not isinstance(outcome, (ApiError, EngineError)):
                logger.error("captioning image %d failed", index, exc_info=outcome)
            results.append(outcome if isinstance(outcome, CaptionFields) else as_api_error(outcome))
        return results

    def _check_model_supports(self, options: DecodeOptions) -> None:
        try:
            self.captioner.check(options)
        except ValueError as exc:
            raise InvalidParameters(str(exc)) from None

    async def _caption_one(self, data: bytes, options: DecodeOptions, caller: Caller) -> CaptionFields:
        return await self.infer(await self.prepare(data, caller.client), options, caller)

    async def _run_all(
        self, works: list[Awaitable[CaptionFields]], caller: Caller
    ) -> list[CaptionFields | BaseException]:
        """Runs the works concurrently until all finish, the deadline (plus the engine's grace)
        passes, or the client disconnects. Unfinished works are cancelled and waited for (which
        frees their engine slots); each outcome is retrieved, so none is logged as unhandled."""
        tasks = [asyncio.ensure_future(work) for work in works]
        receive = caller.receive
        disconnect = asyncio.ensure_future(_wait_for_disconnect(receive)) if receive else None
        try:
            pending = set(tasks)
            give_up_at = caller.started_at + self.settings.request_timeout_s + ENGINE_GRACE_S
            while pending:
                timeout = give_up_at - time.perf_counter()
                if timeout <= 0:
                    break
                watched = pending | {disconnect} if disconnect else pending
                done, _ = await asyncio.wait(watched, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
                if disconnect in done:
                    disconnect.exception()  # retrieved, so a failed receive() is not reported as unhandled
                    raise ClientDisconnected("the client disconnected before the caption was ready")
                pending -= done
        finally:
            await _cancel(*tasks, *([disconnect] if disconnect else []))
            # Retrieved here too, for when the client left: a task that had failed (an invalid
            # image) would otherwise be logged as "Task exception was never retrieved".
            outcomes = [_outcome(task) for task in tasks]
        return outcomes

    def _shape(self, result, prepared: Prepared, options: DecodeOptions, started_at: float) -> CaptionFields:
        grid = None
        if options.return_attention:
            height, width = self.captioner.grid_shape
            grid = AttentionGrid(height=height, width=width)
        decoded, score = prepared.decoded, result.domain_score
        return CaptionFields(
            caption=result.captions[0].text if result.captions else "",
            captions=[_candidate(caption) for caption in result.captions],
            attention_grid=grid,
            in_domain=None if score is None else score >= IN_DOMAIN_SCORE,
            domain_score=None if score is None else round(score, 4),
            model=self.model,
            image=ImageInfo(width=decoded.width, height=decoded.height, format=decoded.format),
            timing_ms=Timing(
                decode=round(prepared.decode_ms, 2),
                queue=round(result.queue_ms, 2),
                inference=round(result.inference_ms, 2),
                total=round((time.perf_counter() - started_at) * 1000, 2),
            ),
        )


def _outcome(task: asyncio.Future) -> CaptionFields | BaseException:
    if task.cancelled():
        return DeadlineExceeded("the request deadline passed before this image was captioned")
    return task.exception() or task.result()


def _candidate(caption) -> CaptionCandidate:
    words = None
    if caption.attention is not None:
        words = [
            WordAttention(word=word, attention=weights)
            for word, weights in zip(caption.tokens, caption.attention, strict=True)
        ]
    return CaptionCandidate(
        text=caption.text,
        confidence=caption.confidence,
        log_prob=caption.log_prob,
        words=words,
        agrees_with_scene=caption.agrees_with_scene,
        written_from_scene=caption.written_from_scene if caption.agrees_with_scene is not None else None,
    )


async def _wait_for_disconnect(receive: Receive) -> None:
    # The body has been read already, so the next message the server sends is the disconnect.
    while (await receive())["type"] != "http.disconnect":
        pass


async def _cancel(*tasks: asyncio.Future) -> None:
    """Cancels what is still running and waits for it to unwind (the engine frees the slot)."""
    pending = [task for task in tasks if not task.done()]
    for task in pending:
        task.cancel()
    if pending:
        # asyncio.wait, unlike awaiting each task, lets a cancellation of *this* task through.
        await asyncio.wait(pending)
