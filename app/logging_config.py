"""Structured logging: one JSON object per line on stderr, for the app and for uvicorn.

`python -m app` hands `logging_config(level)` to uvicorn, which applies it before anything logs.
Fields passed with `extra=` become top-level keys, so the access log line is e.g.

    {"time": "...", "level": "INFO", "logger": "app.access", "message": "request",
     "method": "POST", "route": "/caption", "path": "/caption", "status": 200,
     "latency_ms": 41.7, "request_id": "4f1c..."}
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from typing import Any

# Attributes every LogRecord has; anything else on a record came from `extra=`.
_RECORD_ATTRIBUTES = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}
# uvicorn adds a colourised duplicate of its message; it means nothing in JSON.
_DROPPED_EXTRAS = {"color_message"}
# Set on an exception whose traceback the app logged with the request's ID (app.errors).
LOGGED_WITH_REQUEST_ID = "_logged_with_request_id"
# The exception the lifespan raises after logging, as one CRITICAL record, why the service cannot
# start (app.main.StartupError, named here so that this module does not import TensorFlow).
# Starlette hands uvicorn its traceback as text, with no exception attached.
LOGGED_STARTUP_ERROR = "app.main.StartupError"
# How a text traceback joins a chained exception to the one before it (traceback module).
_CAUSE = "The above exception was the direct cause of the following exception:"
_CONTEXT = "During handling of the above exception, another exception occurred:"


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        payload: dict[str, Any] = {
            "time": dt.datetime.fromtimestamp(record.created, dt.timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _RECORD_ATTRIBUTES and key not in _DROPPED_EXTRAS and not key.startswith("_"):
                payload[key] = value
        if record.exc_info:
            payload["exception"] = self.formatException(record.exc_info)
        return json.dumps(payload, default=str)


class DropRepeatedTraceback(logging.Filter):
    """Drops what uvicorn repeats of a failure the app has already logged: its "Exception in ASGI
    application" record for an exception the app's handler logged with the request's ID
    (app.errors; one traceback per failure, the one that can be joined to the access record), and
    the traceback text of a failed start-up whose reason the lifespan logged. Any other exception
    uvicorn reports is kept."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if getattr(exc, LOGGED_WITH_REQUEST_ID, False):
            return False
        return not is_logged_startup_traceback(record.getMessage())


def is_logged_startup_traceback(message: str) -> bool:
    """A traceback as text whose exception is the lifespan's StartupError: in its last part (a
    chained exception comes last), the first line that is neither the header nor a frame reads
    "app.main.StartupError: ..." (its message may run on over more lines)."""
    header = "Traceback (most recent call last):"
    if not message.startswith(header):
        return False
    for separator in (_CAUSE, _CONTEXT):
        message = message.rsplit(separator, 1)[-1]
    lines = (line for line in message.splitlines() if line and line != header and not line[0].isspace())
    return next(lines, "").split(":", 1)[0] == LOGGED_STARTUP_ERROR


def logging_config(level: str = "INFO") -> dict[str, Any]:
    """A logging.config.dictConfig dictionary."""
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"json": {"()": JsonFormatter}},
        "filters": {"repeated_traceback": {"()": DropRepeatedTraceback}},
        "handlers": {"stderr": {"class": "logging.StreamHandler", "formatter": "json", "stream": "ext://sys.stderr"}},
        "root": {"handlers": ["stderr"], "level": level},
        "loggers": {
            # uvicorn's own handlers would print a second, plain-text copy.
            "uvicorn": {"handlers": [], "propagate": True, "level": level},
            "uvicorn.error": {"handlers": [], "propagate": True, "level": level, "filters": ["repeated_traceback"]},
            # app.access replaces uvicorn's access log (one line per request, with request id).
            "uvicorn.access": {"handlers": [], "propagate": False, "level": "WARNING"},
            # TensorFlow's Python logger is chatty at INFO.
            "tensorflow": {"level": "WARNING"},
            "absl": {"level": "WARNING"},
        },
    }
