"""Failures an operator must read in the logs: an unexpected error (a bug) is a JSON 500 whose one
traceback carries the request's ID; a configuration the service refuses is one JSON record."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import traceback

from fastapi import FastAPI
from fastapi.testclient import TestClient

from app.errors import install_exception_handlers
from app.logging_config import LOGGED_STARTUP_ERROR, DropRepeatedTraceback, logging_config
from app.main import StartupError
from app.middleware import RequestContextMiddleware


def failing_app() -> FastAPI:
    app = FastAPI()
    install_exception_handlers(app)
    app.add_middleware(RequestContextMiddleware)

    @app.get("/fails")
    def fails():
        raise RuntimeError("a bug")

    return app


def test_an_unexpected_error_is_a_json_500_logged_once_with_the_request_id(caplog):
    with TestClient(failing_app(), raise_server_exceptions=False) as client, caplog.at_level(logging.INFO):
        response = client.get("/fails", headers={"X-Request-ID": "trace-me-1"})

    assert response.status_code == 500
    assert response.json() == {
        "error": {"code": "internal_error", "message": "the server failed to handle the request"},
        "request_id": "trace-me-1",
    }
    (access,) = [r for r in caplog.records if r.name == "app.access"]
    assert (access.status, access.error_code, access.request_id) == (500, "internal_error", "trace-me-1")
    (record,) = [r for r in caplog.records if r.name == "app.errors"]
    assert record.request_id == "trace-me-1" and record.path == "/fails"
    assert record.exc_info[0] is RuntimeError
    # uvicorn then reports the same exception, re-raised by Starlette, without the ID: the service's
    # logging configuration drops it.
    uvicorn_error = logging_config()["loggers"]["uvicorn.error"]
    assert [logging_config()["filters"][name]["()"] for name in uvicorn_error["filters"]] == [DropRepeatedTraceback]
    repeated = logging.LogRecord(
        "uvicorn.error", logging.ERROR, "", 0, "Exception in ASGI application", (), record.exc_info
    )
    assert not DropRepeatedTraceback().filter(repeated)


def test_an_exception_the_app_did_not_log_keeps_uvicorns_traceback():
    try:
        raise ValueError("raised outside the app's handlers")
    except ValueError:
        record = logging.LogRecord(
            "uvicorn.error", logging.ERROR, "", 0, "Exception in ASGI application", (), sys.exc_info()
        )
    assert DropRepeatedTraceback().filter(record)


def text_traceback(exc: BaseException) -> str:
    """What Starlette hands uvicorn when the lifespan fails: the traceback as text."""
    return "".join(traceback.format_exception(exc))


def uvicorn_says(message: str) -> logging.LogRecord:
    return logging.LogRecord("uvicorn.error", logging.ERROR, "", 0, message, (), None)


def test_a_failed_startup_the_lifespan_logged_is_not_repeated_as_a_traceback():
    assert f"{StartupError.__module__}.{StartupError.__qualname__}" == LOGGED_STARTUP_ERROR
    try:
        try:
            raise KeyError("inner")
        except KeyError as inner:
            raise StartupError("cannot load the model bundle: a: b\nsecond line") from inner
    except StartupError as exc:
        chained = text_traceback(exc)
    assert "During handling" not in chained and "direct cause" in chained  # the chained form
    assert not DropRepeatedTraceback().filter(uvicorn_says(chained))
    # uvicorn's own line after it stays, and so does the traceback of any other start-up failure:
    assert DropRepeatedTraceback().filter(uvicorn_says("Application startup failed. Exiting."))
    try:
        try:
            raise StartupError("cannot start") from None
        except StartupError as exc:
            assert not DropRepeatedTraceback().filter(uvicorn_says(text_traceback(exc)))
            raise RuntimeError("a bug while handling it")  # noqa: B904 (the implicit chain is the case)
    except RuntimeError as exc:
        assert "During handling" in text_traceback(exc)
        assert DropRepeatedTraceback().filter(uvicorn_says(text_traceback(exc)))
    assert DropRepeatedTraceback().filter(uvicorn_says(text_traceback(ValueError("app.main.StartupError: no"))))


def test_invalid_configuration_is_one_json_record_naming_each_variable():
    env = {**os.environ, "MAX_QUEUE_SIZE": "0", "PORT": "eighty", "LOG_LEVEL": "warning"}
    done = subprocess.run([sys.executable, "-m", "app"], env=env, capture_output=True, text=True, timeout=60)

    assert done.returncode == 2
    (line,) = done.stderr.splitlines()
    record = json.loads(line)
    assert record["level"] == "CRITICAL" and record["message"].startswith("cannot start: invalid configuration")
    assert sorted(problem.split("=")[0] for problem in record["problems"]) == ["MAX_QUEUE_SIZE", "PORT"]
