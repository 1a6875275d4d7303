"""The service's inference engine: decode-step (continuous) batching of concurrent requests.

    engine = create_engine(captioner, settings)
    await engine.start()                       # warms up every batch shape; then engine.ready
    result = await engine.submit(image, options)  # Result(captions, queue_ms, inference_ms)
    await engine.stop(grace_s)                 # admission stops; in-flight requests finish

    engine.check_admission()                   # raises what submit() would (full queue, stopped), cheaply
    await engine.wait_for_client_room(address, timeout_s)  # or ClientOverloaded: the client holds its share

Split as vLLM's V1 engine is: the client (app.engine.engine.EngineClient, the only object the
service touches), the core loop that owns the decode rows (app.engine.core), the encoder stage
(app.engine.encoder, continuous mode), pure batching policy (app.engine.scheduler), the model
runner (app.engine.runner), process tuning (app.engine.os_tuning) and the exceptions
(app.engine.errors, one class per condition).
"""

from __future__ import annotations

from app.engine.client_share import ClientShares
from app.engine.engine import Engine, EngineClient
from app.engine.errors import (
    ClientOverloaded,
    DeadlineExceeded,
    EngineError,
    EngineStopped,
    InferenceError,
    Overloaded,
)
from app.engine.request import Result
from app.engine.scheduler import make_policy

__all__ = [
    "create_engine",
    "client_shares",
    "ClientShares",
    "ClientOverloaded",
    "DeadlineExceeded",
    "Engine",
    "EngineClient",
    "EngineError",
    "EngineStopped",
    "InferenceError",
    "Overloaded",
    "Result",
]


def create_engine(captioner, settings, shares: ClientShares | None = None) -> Engine:
    """An engine for `settings.batching_mode` ("continuous", "static" or "none").

    `settings` is app.settings.Settings, the one place with defaults (see its fields for
    max_encode_batch, encode_ahead, inference_nice and freeze_gc). `shares`: the clients' places,
    when several engines share them (every version of a model); else the engine has its own.
    """
    policy = make_policy(
        settings.batching_mode,
        max_slots=settings.max_batch_size,
        max_queue_delay_s=settings.max_queue_delay_ms / 1000,
        max_encode_batch=settings.max_encode_batch,
        encode_ahead=settings.encode_ahead,
    )
    return Engine(
        captioner,
        policy,
        max_queue_size=settings.max_queue_size,
        shares=shares or client_shares(settings),
        request_timeout_s=settings.request_timeout_s,
        shutdown_grace_s=settings.shutdown_grace_s,
        inference_nice=settings.inference_nice,
        freeze_gc=settings.freeze_gc,
        greedy_steps=settings.greedy_steps_per_call,
    )


def client_shares(settings) -> ClientShares:
    """Each client's places under `settings` (CLIENT_QUEUE_SHARE of MAX_QUEUE_SIZE, plus MAX_BATCH_SIZE)."""
    return ClientShares.for_queue(settings.client_queue_share, settings.max_queue_size, settings.max_batch_size)
