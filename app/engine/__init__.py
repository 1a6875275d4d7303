"""The service's inference engine: decode-step (continuous) batching of concurrent requests.

    engine = create_engine(captioner, settings)
    await engine.start()                       # warms up every batch shape; then engine.ready
    result = await engine.submit(image, options)  # Result(captions, queue_ms, inference_ms)
    await engine.stop(grace_s)                 # admission stops; in-flight requests finish

    app.add_middleware(AdmissionGate, engine_of=lambda app: app.state.engine)  # 503 before the body is read

Split as vLLM's V1 engine is: the client (app.engine.engine.EngineClient, the only object the
service touches), the core loop that owns the decode rows (app.engine.core), the encoder stage
(app.engine.encoder, continuous mode), pure batching policy (app.engine.scheduler), the model
runner (app.engine.runner), process tuning (app.engine.os_tuning) and the exceptions
(app.engine.errors, one class per condition).
"""

from __future__ import annotations

from app.engine.admission import AdmissionGate
from app.engine.engine import Engine, EngineClient
from app.engine.errors import DeadlineExceeded, EngineError, EngineStopped, InferenceError, Overloaded
from app.engine.request import Result
from app.engine.scheduler import make_policy

__all__ = [
    "AdmissionGate",
    "create_engine",
    "DeadlineExceeded",
    "Engine",
    "EngineClient",
    "EngineError",
    "EngineStopped",
    "InferenceError",
    "Overloaded",
    "Result",
]


def create_engine(captioner, settings) -> Engine:
    """An engine for `settings.batching_mode` ("continuous", "static" or "none").

    Reads the settings below with getattr, so any object with some of them (a SimpleNamespace in a
    test) works; max_encode_batch (default 16, images per encoder call in continuous mode) is
    optional tuning, not service configuration.
    inference_nice (default 0: leave priorities alone): the model's threads run at this nice value,
    below the event loop. Measured: beside a CPU-bound neighbour at nice 0, model threads at nice
    10 lose most of their share to it (1 client: 7 vs 36 captions/s), so the default is 0.
    encode_ahead (default True): continuous mode encodes in a thread of its own, else inline.
    freeze_gc (default True): after warm-up, the objects the model left are frozen out of Python's
    cyclic garbage collector, whose full passes over them would pause the whole process.
    """
    policy = make_policy(
        getattr(settings, "batching_mode", "continuous"),
        max_slots=getattr(settings, "max_batch_size", 64),
        max_queue_delay_s=getattr(settings, "max_queue_delay_ms", 5.0) / 1000,
        max_encode_batch=getattr(settings, "max_encode_batch", 16),
        encode_ahead=getattr(settings, "encode_ahead", True),
    )
    return Engine(
        captioner,
        policy,
        max_queue_size=getattr(settings, "max_queue_size", 256),
        request_timeout_s=getattr(settings, "request_timeout_s", 30.0),
        shutdown_grace_s=getattr(settings, "shutdown_grace_s", 10.0),
        inference_nice=getattr(settings, "inference_nice", 0),
        freeze_gc=getattr(settings, "freeze_gc", True),
    )
