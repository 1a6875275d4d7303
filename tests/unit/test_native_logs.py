"""app.native_logs: what native libraries write to file descriptor 2 reaches the log as JSON."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from app.native_logs import record_for

REPO = Path(__file__).resolve().parents[2]

CACHE_LOAD = (
    "E0000 00:00:1796190297.539107   18245 text_format.cc:378] Error parsing text-format "
    "tensorflow.XlaSerializedCacheEntry: 2:1: Expected identifier, got: 6"
)


def test_a_glog_line_keeps_its_level_source_and_message():
    record = record_for("W0000 00:00:1796190289.113061   18201 cudart_stub.cc:31] Could not find cuda drivers")
    assert (record.levelno, record.source, record.getMessage()) == (
        logging.WARNING,
        "cudart_stub.cc:31",
        "Could not find cuda drivers",
    )
    assert record_for("F1202 05:40:01.000001       7 check.cc:9] Check failed: x").levelno == logging.CRITICAL


def test_known_harmless_errors_and_other_lines():
    assert record_for(CACHE_LOAD).levelno == logging.DEBUG  # every compilation-cache load logs it
    absl_notice = "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR"
    assert record_for(absl_notice).levelno == logging.DEBUG
    no_gpu = "E0000 00:00:1.1   11 cuda_platform.cc:52] failed call to cuInit: INTERNAL: CUDA error: (303)"
    assert record_for(no_gpu).levelno == logging.WARNING  # a CUDA build on a CPU host: it runs on the CPU
    plain = record_for("Segmentation fault in something")
    assert plain.levelno == logging.WARNING and plain.getMessage() == "Segmentation fault in something"


# A process that routes its descriptor 2 as `python -m app` does, then writes as TensorFlow would
# (straight to the descriptor), as Python's logging does, and as a bare print to sys.stderr does.
WRITER = """
import logging, os, sys
from app.logging_config import logging_config
from app.native_logs import route_native_output
import logging.config
route_native_output("INFO")
logging.config.dictConfig(logging_config("INFO"))
os.write(2, b"I0000 00:00:1.000001   11 port.cc:153] oneDNN custom operations are on\\n")
os.write(2, CACHE_LOAD.encode() + b"\\n")
logging.getLogger("app").info("from python", extra={"answer": 42})
print("a bare line", file=sys.stderr)
os.write(2, b"\\xff not utf-8\\n")
if sys.argv[1] == "abort":
    os.write(2, b"F0000 00:00:1.000002   11 check.cc:9] Check failed: fatal\\n")
    os.abort()
"""


def run_writer(ending: str) -> tuple[int, list[dict]]:
    script = f"CACHE_LOAD = {CACHE_LOAD!r}\n{WRITER}"
    result = subprocess.run(
        [sys.executable, "-c", script, ending], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    return result.returncode, [json.loads(line) for line in lines]  # every line must be JSON


@pytest.mark.parametrize("ending", ["exit", "abort"])
def test_every_line_on_stderr_is_json_and_nothing_is_lost(ending):
    returncode, records = run_writer(ending)
    by_message = {record["message"]: record for record in records}
    assert by_message["oneDNN custom operations are on"]["level"] == "INFO"
    assert by_message["oneDNN custom operations are on"]["logger"] == "native"
    assert by_message["from python"]["logger"] == "app" and by_message["from python"]["answer"] == 42
    assert by_message["a bare line"]["level"] == "WARNING"
    assert any("not utf-8" in message for message in by_message)
    assert not any("XlaSerializedCacheEntry" in message for message in by_message)  # DEBUG: below INFO
    if ending == "abort":
        # The line a fatal check writes just before the abort: the child outlives the process.
        assert returncode != 0
        assert by_message["Check failed: fatal"]["level"] == "CRITICAL"
    else:
        assert returncode == 0


KILLED_CHILD = """
import logging, logging.config, os, signal, sys, threading
from app import native_logs
from app.logging_config import logging_config
native_logs.route_native_output("INFO")
logging.config.dictConfig(logging_config("INFO"))
(watchdog,) = [t for t in threading.enumerate() if t.name == "native-log-watchdog"]
os.kill(native_logs._route[0].pid, signal.SIGKILL)
watchdog.join(20)  # it has given descriptor 2 back and logged why
logging.getLogger("app").info("after the kill")
os.write(2, b"I0000 00:00:1.000001   11 port.cc:153] a native line after the kill\\n")
"""


def test_when_the_forwarder_dies_the_server_logs_to_stderr_directly():
    result = subprocess.run([sys.executable, "-c", KILLED_CHILD], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    records = [json.loads(line) for line in lines if line.startswith("{")]
    messages = [record["message"] for record in records]
    assert messages[-2].startswith("the native log forwarder exited with code -9")
    assert messages[-1] == "after the kill"  # the server's own records still reach the log, as JSON
    assert lines[-1].endswith("a native line after the kill")  # native lines: plain text again
