"""A SIGTERM while `python -m app` is still loading or warming up the model stops it at once; a SIGHUP
is ignored.

uvicorn defers signals until its lifespan start-up has finished, which made `podman stop` during
the warm-up (8-50 s) wait that long. deploy/container-test.sh checks the image the same way."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_sigterm_during_model_load_exits_within_seconds(tmp_path):
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "HOST": "127.0.0.1",
        "PORT": str(free_port()),
        "ARTIFACTS_DIR": str(ROOT / "model_artifacts" / "default"),
        "TF_CPP_MIN_LOG_LEVEL": "3",
        "TF_ENABLE_ONEDNN_OPTS": "0",
    }
    log_path = tmp_path / "server.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "app"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT
        )
    try:
        deadline = time.monotonic() + 120
        while '"loading model"' not in log_path.read_text():  # the lifespan start-up is under way
            assert process.poll() is None and time.monotonic() < deadline, log_path.read_text()[-2000:]
            time.sleep(0.05)
        # A SIGHUP (a supervisor's "reload", `docker kill -s HUP`) is logged and ignored: its default
        # action ended the process at once, dropping every request in flight.
        process.send_signal(signal.SIGHUP)
        while '"SIGHUP ignored' not in log_path.read_text():
            assert process.poll() is None and time.monotonic() < deadline, log_path.read_text()[-2000:]
            time.sleep(0.05)
        stopped_at = time.monotonic()
        process.send_signal(signal.SIGTERM)
        returncode = process.wait(timeout=10)
        took = time.monotonic() - stopped_at
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
    log = log_path.read_text()
    assert '"ready"' not in log  # stopped before warm-up finished, not after
    assert '"stopped during start-up"' in log
    assert returncode == 128 + signal.SIGTERM
    assert took < 5, f"took {took:.1f} s"
