"""`python -m app`: serve with uvicorn using the environment's settings.

Exit codes: 2 invalid configuration, 1 unusable model bundle (both before TensorFlow is even
imported), 3 any other start-up failure (uvicorn's code when the lifespan raises).
"""

from __future__ import annotations

import logging
import logging.config
import math
import os
import signal
import socket
import sys
import typing

# numpy's BLAS (the engine's out-of-domain distance, a [B, 512] x [512, 512] product per encoded
# batch) must not start a second thread pool beside TensorFlow's: on 2 cores its spinning threads
# made that product 10x slower (3.9 ms against 0.38 ms single-threaded at 32 images). Read once,
# when numpy is first imported, so it is set before anything below imports it.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

from pydantic import ValidationError  # noqa: E402

from app.logging_config import logging_config  # noqa: E402
from app.model_repository import precheck  # noqa: E402
from app.native_logs import close as close_native_output  # noqa: E402
from app.native_logs import route_native_output  # noqa: E402
from app.resources import encoder_precision, onednn_flag  # noqa: E402
from app.settings import LogLevel, Settings, misspelt_settings  # noqa: E402
from captioning.artifacts import ArtifactError  # noqa: E402

logger = logging.getLogger("app")

STARTUP_FAILURE = 3  # uvicorn's exit code when the lifespan fails
# uvicorn cancels what still runs this long after the app's own grace has answered it.
UVICORN_BACKSTOP_S = 3.0


def main() -> int:
    try:
        settings = Settings()
    except ValidationError as exc:
        # One JSON record like every other line, so a log collector keeps it whole.
        level = os.environ.get("LOG_LEVEL", "INFO").upper()
        logging.config.dictConfig(logging_config(level if level in typing.get_args(LogLevel) else "INFO"))
        problems = [
            # the variable as it is set, its value, and what is wrong with it
            f"{'_'.join(str(part) for part in error['loc']).upper() or '?'}={error.get('input')!r}: {error['msg']}"
            for error in exc.errors()
        ]
        logger.critical("cannot start: invalid configuration: %s", "; ".join(problems), extra={"problems": problems})
        return 2
    route_native_output(settings.log_level)  # TensorFlow's own lines become JSON records too
    log_config = logging_config(settings.log_level)
    logging.config.dictConfig(log_config)
    for variable, setting in misspelt_settings(os.environ):
        logger.warning("%s is not a setting and is ignored; did you mean %s?", variable, setting)
    # TensorFlow reads this once, on import (below): bfloat16 convolutions need oneDNN, float32 is
    # served as it was trained and evaluated (oneDNN off). A GPU is only known after the import;
    # there `auto` serves float32 and oneDNN does not matter.
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", onednn_flag(encoder_precision(settings.encoder_precision)))
    # SIGHUP's default action ends the process at once, dropping every request in flight; operators
    # and supervisors send it expecting a reload (nginx) or nothing. The model repository reloads by
    # its poll or POST /admin/reload; a stop is SIGTERM (drains) or SIGINT.
    signal.signal(
        signal.SIGHUP,
        lambda *_: logger.warning(
            "SIGHUP ignored: SIGTERM stops the service (after in-flight requests); POST /admin/reload "
            "or the repository poll loads new model versions"
        ),
    )
    # Checksums only, no TensorFlow: a broken or tampered bundle fails in a fraction of a second
    # with one clear line. The lifespan verifies again (and loads) for other entry points.
    try:
        precheck(settings)
    except (ArtifactError, ValueError, OSError) as exc:  # OSError: a repository it may not read
        logger.critical("cannot start: %s", exc)
        return 1

    # The port is checked before the model is loaded and warmed (seconds): a port in use is a
    # configuration mistake, better told at once. (uvicorn binds it again once start-up is done.)
    try:
        with socket.socket(socket.AF_INET6 if ":" in settings.host else socket.AF_INET) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((settings.host, settings.port))
    except OSError as exc:
        logger.critical("cannot start: %s:%d cannot be bound (%s)", settings.host, settings.port, exc.strerror or exc)
        return STARTUP_FAILURE

    import uvicorn

    from app.http_protocol import hardened_protocol
    from app.main import create_app  # imports TensorFlow

    app = create_app(settings)

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            # uvicorn defers a SIGTERM until the lifespan start-up (model load and warm-up, tens of
            # seconds) completes; no request has been accepted yet, so there is nothing to drain.
            if not self.started:
                logger.info("stopped during start-up", extra={"signal": signal.Signals(sig).name})
                close_native_output()  # os._exit skips atexit: write the last lines first
                os._exit(128 + sig)
            # The app owns the grace: requests still running when it ends get its 503 JSON. uvicorn's
            # own limit comes a little later, as a backstop (its answer would be a plain-text 500).
            app.state.shutdown.begin(settings.shutdown_grace_s)
            super().handle_exit(sig, frame)

    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_config=log_config,
        access_log=False,  # app.access logs each request once, with its request ID
        lifespan="on",  # a failing start-up must stop the server, not be ignored
        timeout_graceful_shutdown=math.ceil(settings.shutdown_grace_s + UVICORN_BACKSTOP_S),
        server_header=False,
        timeout_keep_alive=settings.keep_alive_s,
        # httptools, as uvicorn[standard] would pick, with deadlines and limits per connection
        http=hardened_protocol(
            settings.header_timeout_s,
            settings.max_header_bytes,
            settings.max_pipelined_requests,
            settings.send_timeout_s,
        ),
    )
    server = Server(config)
    try:
        server.run()
    except KeyboardInterrupt:
        pass
    return 0 if server.started else STARTUP_FAILURE


if __name__ == "__main__":
    sys.exit(main())
