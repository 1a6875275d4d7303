"""The application factory and its lifespan.

    create_app(settings) -> FastAPI      (uvicorn --factory app.main:create_app also works)

Start-up loads and verifies the model bundle (a broken or tampered bundle raises, and uvicorn
exits non-zero), then starts the inference engine, which warms up every batch shape. Shut-down
marks the service not ready, then lets the engine finish in-flight work within SHUTDOWN_GRACE_S.
"""

from __future__ import annotations

import logging
import os
import tempfile
from contextlib import asynccontextmanager
from pathlib import Path
from typing import AsyncIterator

import anyio
from fastapi import Depends, FastAPI

from app.dependencies import require_api_key
from app.engine import AdmissionGate, create_engine
from app.errors import error_responses, install_exception_handlers
from app.middleware import RequestContextMiddleware, UploadLimitMiddleware
from app.routes import caption, demo, health, metrics, model
from app.settings import Settings
from captioning.artifacts import ArtifactError
from captioning.captioner import Captioner

logger = logging.getLogger("app.main")

DESCRIPTION = """Captions images with an attention captioner.

Every error has the shape `{"error": {"code", "message"}, "request_id"}`. Send `X-Request-ID` to
choose the request ID; it is echoed in the response header and body.
"""


class StartupError(RuntimeError):
    """The service cannot start; the message says why."""


def configure_inference_threads(threads: int) -> None:
    """Sets TensorFlow's intra-op thread count: `threads`, or with 0 one fewer than the CPUs this
    process may use, so that the model never competes with the event loop for the last core.
    Only possible before TensorFlow runs its first op; later (a second app in one process) the
    count already set stays, with a warning."""
    import tensorflow as tf

    if threads == 0:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        threads = max(1, cpus - 1)
    try:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
    except RuntimeError:
        current = tf.config.threading.get_intra_op_parallelism_threads()
        if current != threads:
            logger.warning("TensorFlow is already running with %s intra-op threads; %d not applied",
                           current or "default", threads)


def configure_compile_cache(directory: Path | None) -> None:
    """Points XLA's persistent compilation cache at `directory`, so a restart loads the compiled
    decoder step of every batch shape instead of compiling it again (warm-up: ~25 s -> ~4 s on a
    2-core machine). Must run before the first compilation; a directory that cannot be written
    is skipped with a warning (XLA would fail every step on it). Entries are keyed by the
    compiled program, so another model or version never picks up a stale one."""
    if directory is None:
        return
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
    app.state.decode_limiter = anyio.CapacityLimiter(settings.decode_concurrency)
    logger.info("loading model", extra={"artifacts_dir": str(settings.artifacts_dir)})
    try:
        captioner = await anyio.to_thread.run_sync(Captioner.load, settings.artifacts_dir)
    except ArtifactError as exc:
        logger.critical("cannot start: %s", exc, extra={"artifacts_dir": str(settings.artifacts_dir)})
        raise StartupError(f"cannot load the model bundle: {exc}") from None
    engine = create_engine(captioner, settings)
    await engine.start()
    app.state.captioner, app.state.engine = captioner, engine
    logger.info(
        "ready",
        extra={"model": captioner.manifest.get("name"), "version": captioner.manifest.get("version"),
               "batching_mode": settings.batching_mode, "max_batch_size": settings.max_batch_size},
    )
    try:
        yield
    finally:
        app.state.stopping = True  # readiness fails from here on
        logger.info("stopping", extra={"grace_s": settings.shutdown_grace_s})
        await engine.stop(settings.shutdown_grace_s)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    app = FastAPI(title="Image captioning service", version="0.1.0", description=DESCRIPTION,
                  lifespan=lifespan)
    app.state.settings = settings
    app.state.captioner = None
    app.state.engine = None
    app.state.stopping = False

    install_exception_handlers(app)
    app.include_router(health.router)
    app.include_router(metrics.router)
    app.include_router(demo.router)  # the page is public; the API calls it makes need the key
    # With API_KEY set, /caption and /model require it (and the schema says so); without it, the
    # schema shows no security requirement at all.
    protected = {}
    if settings.api_key:
        protected = {"dependencies": [Depends(require_api_key)], "responses": error_responses(401)}
    app.include_router(caption.router, **protected)
    app.include_router(model.router, **protected)

    # Added last = outermost: the request ID exists before anything else runs. The gate is the
    # innermost: its 503s carry the request ID and are logged and counted like any response.
    app.add_middleware(AdmissionGate, engine_of=lambda app: app.state.engine, path="/caption")
    app.add_middleware(UploadLimitMiddleware, max_upload_bytes=settings.max_upload_bytes)
    app.add_middleware(RequestContextMiddleware)
    return app
