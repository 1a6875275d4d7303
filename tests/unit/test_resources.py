"""The CPU count the service sizes TensorFlow's threads from: affinity lowered to the container's
CPU quota, read from cgroup trees written here the way the kernel lays them out."""

from __future__ import annotations

import os

import pytest

from app.resources import MIN_DECODE_BUDGET, cgroup_cpu_quota, cgroup_memory_limit, decode_budget, usable_cpus


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_cgroup_v2_quota_of_the_namespaced_root_as_docker_run_cpus_sets_it(tmp_path):
    write(tmp_path / "proc", "0::/\n")
    write(tmp_path / "cg" / "cpu.max", "150000 100000\n")  # docker run --cpus=1.5
    assert cgroup_cpu_quota(tmp_path / "cg", tmp_path / "proc") == 1.5


def test_cgroup_v2_tightest_limit_on_the_path_wins_and_max_means_none(tmp_path):
    write(tmp_path / "proc", "0::/kubepods.slice/pod1/container2\n")
    write(tmp_path / "cg" / "cpu.max", "max 100000\n")
    write(tmp_path / "cg" / "kubepods.slice" / "pod1" / "cpu.max", "50000 100000\n")  # the pod's limit
    write(tmp_path / "cg" / "kubepods.slice" / "pod1" / "container2" / "cpu.max", "max 100000\n")
    assert cgroup_cpu_quota(tmp_path / "cg", tmp_path / "proc") == 0.5


def test_cgroup_v1_cfs_quota_and_unlimited(tmp_path):
    write(tmp_path / "proc", "12:memory:/docker/abc\n4:cpu,cpuacct:/docker/abc\n")
    base = tmp_path / "cg" / "cpu,cpuacct"
    write(base / "cpu.cfs_quota_us", "-1\n")
    write(base / "cpu.cfs_period_us", "100000\n")
    write(base / "docker" / "abc" / "cpu.cfs_quota_us", "200000\n")
    write(base / "docker" / "abc" / "cpu.cfs_period_us", "100000\n")
    assert cgroup_cpu_quota(tmp_path / "cg", tmp_path / "proc") == 2.0
    write(base / "docker" / "abc" / "cpu.cfs_quota_us", "-1\n")
    assert cgroup_cpu_quota(tmp_path / "cg", tmp_path / "proc") is None


def test_no_cgroup_information_means_no_quota(tmp_path):
    assert cgroup_cpu_quota(tmp_path / "cg", tmp_path / "missing") is None
    write(tmp_path / "proc", "0::/\n")  # a cgroup, but no cpu controller files
    assert cgroup_cpu_quota(tmp_path / "cg", tmp_path / "proc") is None


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity"), reason="affinity is Linux-only")
def test_usable_cpus_is_the_quota_rounded_up_never_more_than_the_affinity(tmp_path):
    affinity = len(os.sched_getaffinity(0))
    write(tmp_path / "proc", "0::/\n")
    write(tmp_path / "cg" / "cpu.max", "50000 100000\n")
    assert usable_cpus(tmp_path / "cg", tmp_path / "proc") == 1
    write(tmp_path / "cg" / "cpu.max", f"{(affinity + 7) * 100000} 100000\n")
    assert usable_cpus(tmp_path / "cg", tmp_path / "proc") == affinity
    write(tmp_path / "cg" / "cpu.max", "max 100000\n")
    assert usable_cpus(tmp_path / "cg", tmp_path / "proc") == affinity


def test_memory_limit_v2_v1_and_none(tmp_path):
    write(tmp_path / "proc", "0::/\n")
    write(tmp_path / "cg" / "memory.max", "536870912\n")  # docker run --memory=512m
    assert cgroup_memory_limit(tmp_path / "cg", tmp_path / "proc") == 512 * 2**20
    write(tmp_path / "cg" / "memory.max", "max\n")
    assert cgroup_memory_limit(tmp_path / "cg", tmp_path / "proc") is None
    write(tmp_path / "proc1", "9:memory:/docker/abc\n")
    write(tmp_path / "cg1" / "memory" / "memory.limit_in_bytes", "9223372036854771712\n")  # v1's "no limit"
    write(tmp_path / "cg1" / "memory" / "docker" / "abc" / "memory.limit_in_bytes", "1073741824\n")
    assert cgroup_memory_limit(tmp_path / "cg1", tmp_path / "proc1") == 2**30
    write(tmp_path / "cg1" / "memory" / "docker" / "abc" / "memory.limit_in_bytes", "9223372036854771712\n")
    assert cgroup_memory_limit(tmp_path / "cg1", tmp_path / "proc1") is None


def test_the_decode_budget_fits_under_a_memory_limit_and_never_grows():
    mib = 2**20
    assert decode_budget(512 * mib, None, 400 * mib) == 512 * mib  # no limit: as configured
    assert decode_budget(512 * mib, 2048 * mib, 420 * mib) == 512 * mib  # the Kubernetes manifests' 2 GiB
    assert decode_budget(512 * mib, 1024 * mib, 412 * mib) == 200 * mib  # 1 GiB: 1024 - 2 x 412
    assert decode_budget(512 * mib, 512 * mib, 412 * mib) == MIN_DECODE_BUDGET  # what is left is less than nothing
