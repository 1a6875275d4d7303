"""A restart finds the engine's compiled programs in XLA's persistent compilation cache, even when
the first start compiled them while serving (each start is its own process: the cache keys
programs by names TensorFlow numbers per process)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

# One start of the engine's model runner: the warm-up before readiness, then decoder steps on the
# main thread (as requests would run them) while the background thread compiles the multi-step
# greedy programs, until it has compiled every one.
START = """
import logging
import sys
import numpy as np
from app.engine.runner import ModelRunner
from captioning.captioner import Captioner

class Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.records = []

    def emit(self, record):
        self.records.append(record)

logs = Records()
logging.getLogger("app.engine").addHandler(logs)
logging.getLogger("app.engine").setLevel(logging.INFO)
captioner = Captioner.load(sys.argv[1])
runner = ModelRunner(captioner, 8, greedy_steps=4)
runner.warmup()
size = captioner.config.image_size
while runner.warmup_thread.is_alive():
    slots, _, _ = runner.encode(np.zeros((1, size, size, 3), np.uint8))
    runner.place(0, np.array(slots), np.ones(1, np.int32))
    runner.step(1)
    runner.free(slots)
runner.warmup_thread.join()
assert runner.greedy_buckets == set(runner.features.buckets()), runner.greedy_buckets
# The line deploy/container-test.sh waits for, and operators read a cold or warm start from.
(ready,) = [r for r in logs.records if r.getMessage() == "multi-step greedy programs ready"]
assert ready.buckets == len(runner.features.buckets()) and ready.seconds >= 0
"""


def start_once(bundle: Path, cache: Path) -> set[str]:
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "TF_XLA_FLAGS": f"--tf_xla_persistent_cache_directory={cache}",
        "TF_CPP_MIN_LOG_LEVEL": "3",
    }
    subprocess.run([sys.executable, "-c", START, str(bundle)], env=env, check=True, timeout=300)
    return {path.name for path in cache.iterdir()}


def test_a_restart_compiles_nothing_the_last_start_compiled_while_serving(tiny_bundle, tmp_path):
    cache = tmp_path / "xla"
    cache.mkdir()
    first = start_once(tiny_bundle, cache)
    assert first, "the first start wrote no compiled program to the cache"
    second = start_once(tiny_bundle, cache)
    assert second - first == set(), f"the restart compiled {len(second - first)} programs again"
