"""Process-level tuning that keeps the event loop responsive while the model works (Linux).

- CPUs this process may use: its affinity and, in a container, its cgroup's CPU quota
  (`docker run --cpus`, a Kubernetes CPU limit), which the affinity does not show.
- Thread priorities: the model's threads (the engine's and TensorFlow's native pools) run at a
  higher nice value than the event loop, so the loop, which must keep answering (503s included)
  however busy the model is, runs first whenever it is runnable. Linux schedules each thread by
  its own nice value.
- GC freezing: TensorFlow and Keras leave ~300k long-lived objects; a full collection walks them
  all (~0.2 s holding the GIL, stalling every thread). Frozen objects are skipped.
"""

from __future__ import annotations

import gc
import math
import os
import sys
import threading
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")


def usable_cpus(cgroup_root: Path = CGROUP_ROOT, proc_cgroup: Path = Path("/proc/self/cgroup")) -> int:
    """The CPUs this process can keep busy: its affinity, lowered to its cgroup's CPU quota rounded
    up. A container limited to 2 CPUs on a 64-core node sees 64 in its affinity; sizing threads
    from that has the kernel throttle the quota away in a few milliseconds of each period."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quota = cgroup_cpu_quota(cgroup_root, proc_cgroup)
    return max(1, min(cpus, math.ceil(quota))) if quota is not None else cpus


def cgroup_cpu_quota(cgroup_root: Path = CGROUP_ROOT, proc_cgroup: Path = Path("/proc/self/cgroup")) -> float | None:
    """The tightest CPU quota (quota / period, in CPUs) on this process's cgroup and its ancestors,
    cgroup v2 (`cpu.max`) or v1 (`cpu.cfs_quota_us`); None without one or off Linux. Inside a
    container's cgroup namespace the process's own cgroup is the root of what it sees."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return None
    limits = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # v2: one unified hierarchy
            directories, read = _ancestors(cgroup_root, path), _cpu_max
        elif "cpu" in controllers.split(","):
            base = next((d for d in (cgroup_root / "cpu,cpuacct", cgroup_root / "cpu") if d.is_dir()), None)
            if base is None:
                continue
            directories, read = _ancestors(base, path), _cfs_quota
        else:
            continue
        limits += [limit for limit in map(read, directories) if limit is not None]
    return min(limits) if limits else None


def _ancestors(root: Path, path: str) -> list[Path]:
    parts = [part for part in path.strip("/").split("/") if part and part != ".."]
    return [root.joinpath(*parts[:depth]) for depth in range(len(parts), -1, -1)]


def _cpu_max(directory: Path) -> float | None:
    try:
        quota, period = (directory / "cpu.max").read_text().split()
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        return None


def _cfs_quota(directory: Path) -> float | None:
    try:
        quota = int((directory / "cpu.cfs_quota_us").read_text())
        period = int((directory / "cpu.cfs_period_us").read_text())
        return None if quota <= 0 or period <= 0 else quota / period
    except (OSError, ValueError):
        return None


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
