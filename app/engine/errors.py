"""What the engine raises: one class per condition, defined here only.

The service maps each to its HTTP answer (Overloaded: 503 + Retry-After, ClientOverloaded: 429 +
Retry-After, DeadlineExceeded: 504, EngineStopped: 503, InferenceError: 500-class error JSON);
ValueError means an invalid image or options (the caller's fault)."""

from __future__ import annotations


class EngineError(Exception):
    pass


class Overloaded(EngineError):
    """The admission queue is full; retry after `retry_after_s` seconds."""

    def __init__(self, retry_after_s: float):
        super().__init__(f"the inference queue is full; retry in {retry_after_s:.1f} s")
        self.retry_after_s = retry_after_s


class ClientOverloaded(Overloaded):
    """This client's images already hold its share of the queue (by the client's address:
    app.engine.client_share); retry after `retry_after_s` seconds."""

    def __init__(self, retry_after_s: float, limit: int):
        EngineError.__init__(
            self,
            f"this client has {limit} images in the engine, its share of the queue; retry in {retry_after_s:.1f} s",
        )
        self.retry_after_s = retry_after_s
        self.limit = limit


class DeadlineExceeded(EngineError):
    """The request's deadline passed before its captions were ready. When it passed while the request
    still waited for the model (a backlog, as with Overloaded), `retry_after_s` is the engine's
    estimate of that backlog; otherwise None."""

    def __init__(self, message: str = "", retry_after_s: float | None = None):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class EngineStopped(EngineError):
    """The engine is not running: not started yet, or shutting down."""


class InferenceError(EngineError):
    """The model failed on the batch that held this request (other batches are unaffected)."""
