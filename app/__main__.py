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
import sys

from pydantic import ValidationError

from app.logging_config import logging_config
from app.settings import Settings
from captioning.artifacts import ArtifactError, verify_bundle

logger = logging.getLogger("app")


def main() -> int:
    try:
        settings = Settings()
    except ValidationError as exc:
        print(f"invalid configuration (environment variables):\n{exc}", file=sys.stderr)
        return 2
    log_config = logging_config(settings.log_level)
    logging.config.dictConfig(log_config)
    # Checksums only, no TensorFlow: a broken or tampered bundle fails in a fraction of a second
    # with one clear line. The lifespan verifies again (and loads) for other entry points.
    try:
        verify_bundle(settings.artifacts_dir)
    except ArtifactError as exc:
        logger.critical("cannot start: %s", exc, extra={"artifacts_dir": str(settings.artifacts_dir)})
        return 1

    import uvicorn

    from app.main import create_app  # imports TensorFlow

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame) -> None:
            # uvicorn defers a SIGTERM until the lifespan start-up (model load and warm-up, tens of
            # seconds) completes; no request has been accepted yet, so there is nothing to drain.
            if not self.started:
                logger.info("stopped during start-up", extra={"signal": signal.Signals(sig).name})
                os._exit(128 + sig)
            super().handle_exit(sig, frame)

    config = uvicorn.Config(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_config=log_config,
        access_log=False,  # app.access logs each request once, with its request ID
        lifespan="on",  # a failing start-up must stop the server, not be ignored
        timeout_graceful_shutdown=math.ceil(settings.shutdown_grace_s),
        server_header=False,
    )
    server = Server(config)
    server.run()
    return 0 if server.started else 3  # as uvicorn.run: 3 when the lifespan start-up failed


if __name__ == "__main__":
    sys.exit(main())
