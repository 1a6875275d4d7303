"""`python -m app`: serve with uvicorn using the environment's settings.

Exit codes: 2 invalid configuration, 1 unusable model bundle (both before TensorFlow is even
imported), 3 any other start-up failure (uvicorn's code when the lifespan raises).
"""

from __future__ import annotations

import logging
import logging.config
import math
import sys

from pydantic import ValidationError

from app.logging_config import logging_config
from app.settings import Settings
from app.model_repository import precheck
from captioning.artifacts import ArtifactError

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
        precheck(settings)
    except (ArtifactError, ValueError) as exc:
        logger.critical("cannot start: %s", exc)
        return 1

    import uvicorn

    from app.main import create_app  # imports TensorFlow

    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_config=log_config,
        access_log=False,  # app.access logs each request once, with its request ID
        lifespan="on",  # a failing start-up must stop the server, not be ignored
        timeout_graceful_shutdown=math.ceil(settings.shutdown_grace_s),
        server_header=False,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
