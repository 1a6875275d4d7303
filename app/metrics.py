"""Every Prometheus metric the service exports, in one place.

All metrics live in ``REGISTRY``, a dedicated ``CollectorRegistry`` created once
per process, rather than in prometheus_client's global default registry. That
keeps /metrics free of the default process/platform collectors' surprises and
makes the set of exported series exactly what is declared here. Metric objects
are module-level singletons: the HTTP layer and the batching engine
(``app.engine``) import them by name, and several apps built in one process (as
the tests do) simply share them — counters keep counting across apps, which is
what a per-process registry means.

Names the engine imports: QUEUE_DEPTH, ACTIVE_SLOTS, PROGRAMS_COMPILING, BATCH_SIZE, ENCODE_SECONDS,
STEP_SECONDS, QUEUE_WAIT_SECONDS, REJECTIONS (label ``reason``),
INFERENCE_SECONDS.
"""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

REGISTRY = CollectorRegistry(auto_describe=True)

_NAMESPACE = "captioning"

# Latency buckets spanning a fast cached request up to the request deadline.
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# Per-step / per-encode timings are much shorter than a whole request.
_FAST_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)

# --- HTTP layer -------------------------------------------------------------

HTTP_REQUESTS = Counter(
    "http_requests",
    "HTTP requests handled, by route template, method and status code.",
    labelnames=("route", "method", "status"),
    namespace=_NAMESPACE,
    registry=REGISTRY,
)

HTTP_ERRORS = Counter(
    "http_errors",
    "Error responses by route template and error code (the `error.code` of the JSON body).",
    labelnames=("route", "code"),
    namespace=_NAMESPACE,
    registry=REGISTRY,
)

HTTP_REQUEST_SECONDS = Histogram(
    "http_request_duration_seconds",
    "Wall time from request start to response end, by route template, method and status.",
    labelnames=("route", "method", "status"),
    buckets=_LATENCY_BUCKETS,
    namespace=_NAMESPACE,
    registry=REGISTRY,
)

HTTP_IN_FLIGHT = Gauge(
    "http_requests_in_flight",
    "HTTP requests currently being handled.",
    namespace=_NAMESPACE,
    registry=REGISTRY,
)

# --- Inference engine -------------------------------------------------------

QUEUE_DEPTH = Gauge(
    "engine_queue_depth",
    "Requests admitted and not yet decoding: queued, being encoded, or encoded and waiting for a decode slot "
    "(every version the process serves; what MAX_QUEUE_SIZE bounds per version).",
    namespace=_NAMESPACE,
    registry=REGISTRY,
)

ACTIVE_SLOTS = Gauge(
    "engine_active_slots",
    "Decode slots currently occupied by an in-progress caption.",
    namespace=_NAMESPACE,
    registry=REGISTRY,
)

CLIENT_SHARE_WAITING = Gauge(
    "engine_client_share_waiting",
    "Images of requests already let in that wait outside the queue for one of their client's places "
    "(CLIENT_QUEUE_SHARE): a client address holds its share.",
    namespace=_NAMESPACE,
    registry=REGISTRY,
)

PROGRAMS_COMPILING = Gauge(
    "engine_programs_compiling",
    "Engines still compiling their multi-step decode programs in the background after readiness "
    "(they serve meanwhile, one token per call where a program is missing); 0 once every engine is warm.",
    namespace=_NAMESPACE,
    registry=REGISTRY,
)

BATCH_SIZE = Histogram(
    "engine_batch_size",
    "Rows (caption sequences) per decoder step.",
    buckets=_BATCH_BUCKETS,
    namespace=_NAMESPACE,
    registry=REGISTRY,
)

ENCODE_SECONDS = Histogram(
    "engine_encode_seconds",
    "Time spent running the image encoder on one batch.",
    buckets=_FAST_BUCKETS,
    namespace=_NAMESPACE,
    registry=REGISTRY,
)

STEP_SECONDS = Histogram(
    "engine_step_seconds",
    "Time spent on one decoder step for the active batch.",
    buckets=_FAST_BUCKETS,
    namespace=_NAMESPACE,
    registry=REGISTRY,
)

QUEUE_WAIT_SECONDS = Histogram(
    "engine_queue_wait_seconds",
    "Time a request waited in the admission queue before inference started.",
    buckets=_LATENCY_BUCKETS,
    namespace=_NAMESPACE,
    registry=REGISTRY,
)

REJECTIONS = Counter(
    "engine_rejections",
    "Requests the engine refused or dropped, by reason (overloaded, client_share, deadline, stopped, cancelled).",
    labelnames=("reason",),
    namespace=_NAMESPACE,
    registry=REGISTRY,
)

INFERENCE_SECONDS = Histogram(
    "engine_inference_seconds",
    "Time from the start of inference on a request to its captions being ready.",
    buckets=_LATENCY_BUCKETS,
    namespace=_NAMESPACE,
    registry=REGISTRY,
)

# --- Model repository (app.model_repository): every series names the model and version ----------

MODEL_SERVED = Gauge(
    "model_served",
    "1 for each model version currently served (the highest answers unversioned requests).",
    labelnames=("model", "version"),
    namespace=_NAMESPACE,
    registry=REGISTRY,
)

MODEL_REFUSED = Gauge(
    "model_refused",
    "1 for each model version in the repository that was refused (verification, loading or warm-up "
    "failed) and is not tried again until its files change; the versions before it keep serving.",
    labelnames=("model", "version"),
    namespace=_NAMESPACE,
    registry=REGISTRY,
)

MODEL_REQUESTS = Counter(
    "model_requests",
    "Images submitted to a model version's engine, by outcome: ok, error (the model or engine failed), "
    "cancelled (the client left), refused (overloaded or stopping) or deadline.",
    labelnames=("model", "version", "outcome"),
    namespace=_NAMESPACE,
    registry=REGISTRY,
)

MODEL_REQUEST_SECONDS = Histogram(
    "model_request_duration_seconds",
    "Engine time (queue and inference) of an image that got its captions, by model version.",
    labelnames=("model", "version"),
    buckets=_LATENCY_BUCKETS,
    namespace=_NAMESPACE,
    registry=REGISTRY,
)

MODEL_LOADS = Counter(
    "model_loads",
    "Model version loads, by result: loaded, or refused (verification, loading or warm-up failed).",
    labelnames=("model", "version", "result"),
    namespace=_NAMESPACE,
    registry=REGISTRY,
)

MODEL_LOAD_SECONDS = Gauge(
    "model_load_seconds",
    "Seconds the last load of a model version took, by phase (load: verify and read; warmup).",
    labelnames=("model", "version", "phase"),
    namespace=_NAMESPACE,
    registry=REGISTRY,
)


def render_latest() -> tuple[bytes, str]:
    """Return the exposition-format payload and its content type."""
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST
