"""Process-level tuning that keeps the event loop responsive while the model works (Linux).

- Thread priorities: the model's threads (the engine's and TensorFlow's native pools) run at a
  higher nice value than the event loop, so the loop, which must keep answering (503s included)
  however busy the model is, runs first whenever it is runnable. Linux schedules each thread by
  its own nice value.
- GC freezing: TensorFlow and Keras leave ~300k long-lived objects; a full collection walks them
  all (~0.2 s holding the GIL, stalling every thread). Frozen objects are skipped.
"""

from __future__ import annotations

import gc
import os
import sys
import threading


def lower_model_threads(nice: int) -> None:
    """Renices the calling thread and every native (non-Python) thread of the process, such as
    TensorFlow's pools; Python threads other than the caller (the event loop) keep theirs."""
    if not nice or not sys.platform.startswith("linux"):
        return
    python_threads = {thread.native_id for thread in threading.enumerate()}
    own = threading.get_native_id()
    try:
        thread_ids = [int(tid) for tid in os.listdir("/proc/self/task")]
    except OSError:
        return
    for tid in thread_ids:
        if tid == own or tid not in python_threads:
            renice(tid, nice)


def lower_this_thread(nice: int) -> None:
    """For a model thread started after warm-up (the encoder)."""
    if nice and sys.platform.startswith("linux"):
        renice(threading.get_native_id(), nice)


def renice(tid: int, nice: int) -> None:
    """Raises the thread's nice value to `nice` (never lowers it: that needs privileges)."""
    try:
        os.setpriority(os.PRIO_PROCESS, tid, max(os.getpriority(os.PRIO_PROCESS, tid), nice))
    except OSError:  # the thread ended, or the platform refuses
        pass


def freeze_long_lived_objects() -> None:
    """Moves every object alive now out of the cyclic collector's reach (after warm-up)."""
    gc.collect()
    gc.freeze()
