"""What this process may use: CPUs and memory, as its affinity and its container's cgroup allow
(`docker run --cpus/--memory`, Kubernetes limits). Neither limit shows in os.cpu_count() or in the
affinity: sized from the node, a 2-CPU pod on a 64-core node runs 63 TensorFlow threads and is
throttled most of each period, and a 512 MiB container is killed by a decode sized for 2 GiB.

cgroup v2 (`cpu.max`, `memory.max`) and v1 (`cpu.cfs_quota_us`, `memory.limit_in_bytes`); the
tightest limit on the process's cgroup and its ancestors counts. Inside a container's cgroup
namespace the process's own cgroup is the root of what it sees.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path

from captioning.config import ENCODER_PRECISIONS

CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_CGROUP = Path("/proc/self/cgroup")
UNLIMITED_V1 = 2**60  # cgroup v1 writes "no limit" as a page-rounded 2**63 - 1


def usable_cpus(cgroup_root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_CGROUP) -> int:
    """The CPUs this process can keep busy: its affinity, lowered to its CPU quota rounded up."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quota = cgroup_cpu_quota(cgroup_root, proc_cgroup)
    return max(1, min(cpus, math.ceil(quota))) if quota is not None else cpus


def cgroup_cpu_quota(cgroup_root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_CGROUP) -> float | None:
    """The tightest CPU quota in CPUs (quota / period); None without one or off Linux."""
    return _tightest(cgroup_root, proc_cgroup, "cpu", _cpu_max, _cfs_quota)


def cgroup_memory_limit(cgroup_root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_CGROUP) -> int | None:
    """The tightest memory limit in bytes; None without one or off Linux."""
    return _tightest(cgroup_root, proc_cgroup, "memory", _memory_max, _memory_limit_v1)


def resident_bytes() -> int | None:
    """This process's anonymous resident memory (Linux), None elsewhere: what a memory limit must
    hold. File-backed pages (TensorFlow's libraries, about 380 MB of the RSS) can be dropped and
    read again under pressure, so they are left out."""
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return None
    found = re.search(r"RssAnon:\s+(\d+)", status) or re.search(r"VmRSS:\s+(\d+)", status)
    return int(found.group(1)) * 1024 if found else None


def _tightest(root: Path, proc_cgroup: Path, controller: str, read_v2: Callable, read_v1: Callable):
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return None
    limits = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # v2: one unified hierarchy
            directories, read = _ancestors(root, path), read_v2
        elif controller in controllers.split(","):
            names = {"cpu": ("cpu,cpuacct", "cpu"), "memory": ("memory",)}[controller]
            base = next((root / name for name in names if (root / name).is_dir()), None)
            if base is None:
                continue
            directories, read = _ancestors(base, path), read_v1
        else:
            continue
        limits += [limit for limit in map(read, directories) if limit is not None]
    return min(limits) if limits else None


def _ancestors(root: Path, path: str) -> list[Path]:
    parts = [part for part in path.strip("/").split("/") if part and part != ".."]
    return [root.joinpath(*parts[:depth]) for depth in range(len(parts), -1, -1)]


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _cpu_max(directory: Path) -> float | None:
    value = _read(directory / "cpu.max")
    try:
        quota, period = value.split()
        return None if quota == "max" else int(quota) / int(period)
    except (AttributeError, ValueError):
        return None


def _cfs_quota(directory: Path) -> float | None:
    quota, period = _read(directory / "cpu.cfs_quota_us"), _read(directory / "cpu.cfs_period_us")
    try:
        quota, period = int(quota), int(period)
    except (TypeError, ValueError):
        return None
    return None if quota <= 0 or period <= 0 else quota / period


def _memory_max(directory: Path) -> int | None:
    value = _read(directory / "memory.max")
    return int(value) if value is not None and value.isdigit() else None


def _memory_limit_v1(directory: Path) -> int | None:
    value = _read(directory / "memory.limit_in_bytes")
    return int(value) if value is not None and value.isdigit() and int(value) < UNLIMITED_V1 else None


MIN_DECODE_BUDGET = 32 * 2**20  # room for ordinary uploads (a 12-megapixel photo draft-decodes in ~5 MB)


def decode_budget(configured: int, limit: int | None, resident: int | None) -> int:
    """DECODE_MEMORY_MB, lowered to fit under a memory limit: what the limit leaves once the process's
    anonymous memory as it is now (the model loaded and warmed up) is counted twice, once more for serving (the
    engine's batches, a second version loaded during a hot swap). Never under MIN_DECODE_BUDGET."""
    if limit is None or resident is None:
        return configured
    return max(MIN_DECODE_BUDGET, min(configured, limit - 2 * resident))


# --- the encoder's arithmetic (captioning.inference) ------------------------------------------------

PROC_CPUINFO = Path("/proc/cpuinfo")


def native_bfloat16(cpuinfo: Path = PROC_CPUINFO) -> bool:
    """Whether this machine's CPU computes bfloat16 natively (Linux's flags avx512_bf16 or amx_bf16)."""
    text = _read(cpuinfo) or ""
    for line in text.splitlines():
        if line.startswith("flags"):
            return bool(set(line.partition(":")[2].split()) & {"avx512_bf16", "amx_bf16"})
    return False


def encoder_precision(
    setting: str, gpu: bool = False, cpuinfo: Path = PROC_CPUINFO, environ: Mapping[str, str] = os.environ
) -> str:
    """ENCODER_PRECISION resolved: "auto" is bfloat16 on a CPU with native bfloat16, with no GPU (not
    measured on one) and oneDNN not turned off (TF_ENABLE_ONEDNN_OPTS=0: bfloat16 would be emulated,
    slower than float32), else float32; the others are what they say."""
    if setting in ENCODER_PRECISIONS:
        return setting
    if setting != "auto":
        raise ValueError(f"unknown encoder precision {setting!r}; expected auto or one of {ENCODER_PRECISIONS}")
    onednn_off = environ.get("TF_ENABLE_ONEDNN_OPTS") == "0"
    return "bfloat16" if not gpu and not onednn_off and native_bfloat16(cpuinfo) else "float32"


def onednn_flag(precision: str) -> str:
    """TF_ENABLE_ONEDNN_OPTS for an encoder precision: oneDNN runs bfloat16 convolutions natively;
    float32 is served as it was trained and evaluated, without it."""
    return "1" if precision == "bfloat16" else "0"
