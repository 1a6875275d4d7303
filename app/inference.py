"""What happens between an accepted upload and its captions, kept out of the route function:
decoding in a worker thread, the engine call under the request's deadline, and giving up when the
client goes away (cancelling the engine call frees its slot)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable
from typing import Protocol, TypeVar

import anyio
import numpy as np
from PIL import Image

from app.engine import DeadlineExceeded as EngineDeadlineExceeded
from app.engine import EngineStopped, InferenceError
from app.engine import Overloaded as EngineOverloaded
from app.errors import ApiError, DeadlineExceeded, InferenceFailed, InvalidParameters, NotReady, Overloaded
from app.images import DecodedImage, decode_opened, open_upload
from app.schemas import STRATEGY_ONLY_PARAMETERS, CaptionQuery
from app.settings import Settings
from captioning.decoding import Caption, DecodeOptions

logger = logging.getLogger("app.inference")

# Extra time the engine gets past the deadline to report DeadlineExceeded itself before the
# route stops waiting; only matters if the engine misses a deadline.
ENGINE_GRACE_S = 1.0
SHUTDOWN_RETRY_AFTER_S = 5
# Uploads decoded on the event loop: at most this many bytes (the header is parsed there; Pillow
# reads a PNG's chunks up to the pixel data) and this many pixels (about 1 ms to decode).
INLINE_DECODE_MAX_BYTES = 256 * 1024
INLINE_DECODE_MAX_PIXELS = 256 * 256

T = TypeVar("T")


class EngineResult(Protocol):
    captions: list[Caption]
    queue_ms: float
    inference_ms: float


class InferenceEngine(Protocol):
    """The contract app.engine implements (see app/engine/)."""

    @property
    def ready(self) -> bool: ...

    async def start(self) -> None: ...

    async def submit(self, image: np.ndarray, options: DecodeOptions, deadline_s: float) -> EngineResult: ...

    async def stop(self, grace_s: float) -> None: ...

    # For app.engine.AdmissionGate: hold a queue place from the door to submit(), or raise
    # Overloaded / EngineStopped at once.
    def reserve(self) -> object: ...

    def release(self, reservation: object) -> None: ...


class ClientDisconnected(ApiError):
    # Nobody reads this response; the status only appears in the access log and metrics.
    status_code, code = 499, "client_closed_request"


def decode_options(query: CaptionQuery) -> DecodeOptions:
    """Query parameters -> DecodeOptions; contradictory or impossible combinations raise
    InvalidParameters (422). Only parameters the client actually sent count as given."""
    for name in sorted(query.model_fields_set & STRATEGY_ONLY_PARAMETERS.keys()):
        if STRATEGY_ONLY_PARAMETERS[name] != query.strategy:
            raise InvalidParameters(f"{name} applies to strategy={STRATEGY_ONLY_PARAMETERS[name]} only, "
                                    f"not strategy={query.strategy}")
    try:
        return DecodeOptions(
            strategy=query.strategy,
            beam_size=query.beam_size,
            num_captions=query.num_captions,
            max_length=query.max_length,
            temperature=query.temperature,
            top_k=query.top_k,
            seed=query.seed,
            return_attention=query.attention,
        ).validate()
    except ValueError as exc:
        raise InvalidParameters(str(exc)) from None


async def decode_image(data: bytes, captioner, settings: Settings,
                       limiter: anyio.CapacityLimiter) -> tuple[DecodedImage, np.ndarray]:
    """Validates, decodes and resizes an upload. A small image (the header says how small) is
    decoded on the event loop, because handing it to a worker thread and back costs more CPU than
    decoding it; anything bigger goes to a worker thread, at most `limiter` at a time, so the event
    loop never waits on Pillow for long."""

    def header() -> Image.Image:
        return open_upload(data, max_pixels=settings.max_image_pixels, min_side=settings.min_image_side)

    def decode(image: Image.Image) -> tuple[DecodedImage, np.ndarray]:
        decoded = decode_opened(image, draft_size=captioner.config.image_size)
        return decoded, captioner.prepare(decoded.image)

    if len(data) <= INLINE_DECODE_MAX_BYTES:
        image = header()
        if image.width * image.height <= INLINE_DECODE_MAX_PIXELS:
            return decode(image)
        return await anyio.to_thread.run_sync(decode, image, limiter=limiter)
    return await anyio.to_thread.run_sync(lambda: decode(header()), limiter=limiter)


async def caption_or_give_up(engine: InferenceEngine, pixels: np.ndarray, options: DecodeOptions, *,
                             deadline_s: float, receive) -> EngineResult:
    """Runs engine.submit, mapping engine errors to API errors; cancels it if the client disconnects."""
    if deadline_s <= 0:
        raise DeadlineExceeded("the request deadline passed before inference could start")
    return await run_or_give_up(submit(engine, pixels, options, deadline_s), deadline_s=deadline_s, receive=receive)


async def submit(engine: InferenceEngine, pixels: np.ndarray, options: DecodeOptions,
                 deadline_s: float) -> EngineResult:
    """engine.submit with the engine's errors turned into API errors."""
    try:
        return await engine.submit(pixels, options, deadline_s=deadline_s)
    except EngineOverloaded as exc:
        raise Overloaded("the inference queue is full; retry shortly", getattr(exc, "retry_after_s", 1.0)) from None
    except EngineDeadlineExceeded:
        raise DeadlineExceeded("the request deadline passed while waiting for inference") from None
    except EngineStopped:
        raise NotReady("the service is shutting down", SHUTDOWN_RETRY_AFTER_S) from None
    except InferenceError as exc:
        logger.error("inference failed: %s", exc)
        raise InferenceFailed("the model failed on this request's batch; retrying may succeed") from None


async def run_or_give_up(work: Awaitable[T], *, deadline_s: float, receive) -> T:
    """Awaits `work`, giving up (and cancelling it, which frees its engine slots) when the client
    disconnects or the deadline, plus the engine's grace, passes."""
    task = asyncio.ensure_future(work)
    disconnect = asyncio.ensure_future(_wait_for_disconnect(receive))
    try:
        done, _ = await asyncio.wait({task, disconnect}, timeout=deadline_s + ENGINE_GRACE_S,
                                     return_when=asyncio.FIRST_COMPLETED)
    finally:
        await _cancel(task, disconnect)
    if task in done:
        return task.result()
    if disconnect in done:
        disconnect.exception()  # retrieved, so a failed receive() is not reported as unhandled
        raise ClientDisconnected("the client disconnected before the caption was ready")
    raise DeadlineExceeded("the request deadline passed while waiting for inference")


async def _wait_for_disconnect(receive) -> None:
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
