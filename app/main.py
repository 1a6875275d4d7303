"""The application factory and its lifespan.

    create_app(settings) -> FastAPI      (uvicorn --factory app.main:create_app also works)

Start-up loads and verifies the served model's versions (app.model_repository: a broken or
tampered bundle raises, and uvicorn exits non-zero), each with its inference engine, which warms
up every batch shape, and builds the CaptionService the routes use; then the repository is polled
for new versions (MODEL_POLL_INTERVAL_S). Shut-down: from the signal (app.__main__ calls
app.state.shutdown.begin) the service is not ready; requests still running SHUTDOWN_GRACE_S later
get 503 JSON (app.guards.ShutdownGuard); then the engines stop.
"""

from __future__ import annotations

import asyncio
import logging
import os
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import Depends, FastAPI

from app import resources
from app.decode_pool import DecodePool, limit_malloc_arenas
from app.dependencies import api_key_accepted, require_api_key
from app.errors import error_responses, install_exception_handlers
from app.guards import Shutdown, ShutdownGuard, UploadGuard
from app.images import limit_png_text
from app.middleware import JsonCORSMiddleware, RequestContextMiddleware, UploadLimitMiddleware
from app.model_repository import ModelManager
from app.routes import admin, caption, demo, health, metrics, model, oip
from app.routes.oip import HEADER_LENGTH
from app.service import CaptionService
from app.settings import Settings
from captioning.artifacts import ArtifactError

logger = logging.getLogger("app.main")

DESCRIPTION = """Captions images with an attention captioner.

Every error has the shape `{"error": {"code", "message"}, "request_id"}`. Send `X-Request-ID` to
choose the request ID; it is echoed in the response header and body.
"""


class StartupError(RuntimeError):
    """The service cannot start; the message says why."""


def configure_inference_threads(threads: int) -> None:
    """Sets TensorFlow's intra-op thread count: `threads`, or with 0 one fewer than the CPUs this
    process may use (its affinity and its container's CPU quota), so that the model never competes
    with the event loop for the last core.
    Only possible before TensorFlow runs its first op; later (a second app in one process) the
    count already set stays, with a warning."""
    import tensorflow as tf

    if threads == 0:
        threads = max(1, resources.usable_cpus() - 1)
    try:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
    except RuntimeError:
        current = tf.config.threading.get_intra_op_parallelism_threads()
        if current != threads:
            logger.warning(
                "TensorFlow is already running with %s intra-op threads; %d not applied", current or "default", threads
            )


def tf_intra_op_threads() -> int:
    import tensorflow as tf

    return tf.config.threading.get_intra_op_parallelism_threads()


def configure_compile_cache(directory: Path | None) -> None:
    """Points XLA's persistent compilation cache at `directory`, so a restart loads the compiled
    decoder step of every batch shape instead of compiling it again (warm-up: ~25 s -> ~4 s on a
    2-core machine). Must run before the first compilation; a directory that cannot be written
    is skipped with a warning (XLA would fail every step on it). Entries are keyed by the
    compiled program, so another model or version never picks up a stale one."""
    if directory is None:
        return
    directory = directory.expanduser()
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory):
            pass
    except OSError as exc:
        logger.warning("compilation cache off: %s is not writable (%s)", directory, exc)
        return
    flags = os.environ.get("TF_XLA_FLAGS", "")
    if "tf_xla_persistent_cache_directory" not in flags:
        os.environ["TF_XLA_FLAGS"] = f"{flags} --tf_xla_persistent_cache_directory={directory}".strip()


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: Settings = app.state.settings
    configure_inference_threads(settings.inference_threads)
    configure_compile_cache(settings.compile_cache_dir)
    limit_malloc_arenas(settings.malloc_arenas)
    limit_png_text(settings.max_png_text_bytes)
    shutdown: Shutdown = app.state.shutdown
    shutdown.attach()
    shutdown.on_begin.append(lambda: setattr(app.state, "stopping", True))  # readiness fails from the signal on
    models = ModelManager(settings, state=app.state)
    logger.info(
        "loading model",
        extra={
            "model": models.name,
            "policy": str(models.policy),
            "path": str(models.source.bundle or models.source.model_dir),
        },
    )
    try:
        await models.start()  # verifies, loads and warms up; sets app.state.captioner / engine
    except ArtifactError as exc:
        logger.critical("cannot start: %s", exc)
        raise StartupError(f"cannot load the model bundle: {exc}") from None
    memory_limit, resident = resources.cgroup_memory_limit(), resources.resident_bytes()
    budget = resources.decode_budget(settings.decode_memory_mb * 2**20, memory_limit, resident)
    if budget < settings.decode_memory_mb * 2**20:
        logger.warning(
            "DECODE_MEMORY_MB lowered to fit the memory limit: uploads that need more to decode are refused",
            extra={
                "memory_limit_mb": memory_limit // 2**20,
                "resident_mb": resident // 2**20,
                "decode_memory_mb": budget // 2**20,
                "configured_mb": settings.decode_memory_mb,
            },
        )
    decoder = DecodePool(settings.decode_concurrency, budget)
    app.state.models = models
    # The default version's service; ModelManager swaps it with the version (app.dependencies.service_for).
    app.state.service = CaptionService(settings, app.state.captioner, app.state.engine, decoder)
    await build_routes(app)
    captioner = models.default.captioner
    from captioning.captioner import inference_device  # TensorFlow is loaded by now

    logger.info(
        "ready",
        extra={
            "model": captioner.manifest.get("name"),
            "version": captioner.manifest.get("version"),
            "batching_mode": settings.batching_mode,
            "max_batch_size": settings.max_batch_size,
            # A GPU host that says "CPU" here has a driver or CUDA problem (TensorFlow's own line
            # about it is the `native` logger's "failed call to cuInit").
            "device": inference_device(),
            "inference_threads": tf_intra_op_threads(),
            "encoder_precision": captioner.encoder_precision,
            "decode_memory_mb": budget // 2**20,
            "memory_limit_mb": memory_limit // 2**20 if memory_limit is not None else None,
        },
    )
    poller = None
    if models.source.reloadable and settings.model_poll_interval_s > 0:
        poller = asyncio.get_running_loop().create_task(models.poll(settings.model_poll_interval_s))
    try:
        yield
    finally:
        app.state.stopping = True  # readiness fails from here on
        logger.info("stopping", extra={"grace_s": settings.shutdown_grace_s})
        if poller is not None:
            poller.cancel()
        await models.stop(settings.shutdown_grace_s)
        decoder.shutdown()


async def build_routes(app: FastAPI) -> None:
    """FastAPI (0.16x) prepares an included router's routes (dependency trees, pydantic adapters) on
    the first request that walks past them, about 25 ms the first user would wait. One request for
    a path no route matches walks past all of them; it goes to the router alone, so no middleware
    logs or counts it."""
    path = "/.build-routes"
    scope = {
        "type": "http",
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [],
    }

    async def receive() -> dict:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict) -> None:
        pass

    await app.router(scope, receive, send)


def mark_binary_strings(app: FastAPI) -> None:
    """Adds `format: binary` beside each `contentMediaType: application/octet-stream` of the OpenAPI
    document (FastAPI's 3.1 form of a file): OpenAPI 3.1 allows both, and SDK generators
    (openapi-python-client, openapi-typescript) read only the first as a file; without it they
    type the image as text and send it as a text part."""
    build = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            _add_binary_format(build())
        return app.openapi_schema

    app.openapi = openapi


def _add_binary_format(node) -> None:
    if isinstance(node, dict):
        if node.get("type") == "string" and node.get("contentMediaType") == "application/octet-stream":
            node.setdefault("format", "binary")
        for value in node.values():
            _add_binary_format(value)
    elif isinstance(node, list):
        for value in node:
            _add_binary_format(value)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    app = FastAPI(
        title="Image captioning service",
        version="0.1.0",
        description=DESCRIPTION,
        lifespan=lifespan,
        # A path with a trailing slash is a 404 JSON like any unknown path, not an empty 307 whose
        # Location is built from the client's Host header.
        redirect_slashes=False,
        # The multipart parser's counts, before it spools a part to disk: a form holds image files only.
        form_limits={"max_files": settings.max_images_per_request, "max_fields": settings.max_images_per_request},
    )
    app.state.settings = settings
    app.state.captioner = None
    app.state.engine = None
    app.state.models = None
    app.state.service = None
    app.state.stopping = False
    app.state.shutdown = Shutdown()

    install_exception_handlers(app)
    mark_binary_strings(app)
    app.include_router(health.router)
    app.include_router(metrics.router)
    app.include_router(demo.router)  # the page is public; the API calls it makes need the key
    # With API_KEY set, /caption(s) and /model require it (and the schema says so); without it, the
    # schema shows no security requirement at all. UploadGuard checks it again from the headers
    # before a body is read.
    protected = {}
    if settings.api_key:
        protected = {"dependencies": [Depends(require_api_key)], "responses": error_responses(401)}
    app.include_router(caption.router, **protected)
    app.include_router(model.router, **protected)
    app.include_router(oip.public_router)
    app.include_router(oip.router, **oip.protected(protected))
    app.include_router(admin.router, **protected)

    # Added last = outermost: the request ID exists before anything else runs, so every refusal
    # below carries it and is logged and counted like any response.
    app.add_middleware(UploadLimitMiddleware, max_upload_bytes=settings.max_upload_bytes)
    app.add_middleware(
        UploadGuard,
        settings=settings,
        engine_of=lambda app: app.state.engine,
        key_accepted=lambda headers: api_key_accepted(headers, settings),
    )
    app.add_middleware(ShutdownGuard, shutdown_of=lambda app: app.state.shutdown)
    origins = [origin.strip() for origin in (settings.cors_origins or "").split(",") if origin.strip()]
    if origins:
        # Outside the guards: a preflight is answered before any of them, and every answer (refusals
        # included) carries the headers a browser needs to show it to the page. Inside the request
        # context, so preflights are logged and counted too.
        app.add_middleware(
            JsonCORSMiddleware,
            allow_origins=origins,
            allow_methods=["GET", "POST", "HEAD"],
            allow_headers=["Authorization", "X-API-Key", "X-Request-ID", "Content-Type", HEADER_LENGTH],
            expose_headers=["X-Request-ID", "Retry-After"],
            max_age=600,
        )
    app.add_middleware(RequestContextMiddleware)
    return app
