"""Every benchmark module imports against the current code (they run rarely, so a rename elsewhere
would otherwise break them silently)."""

import importlib
import pkgutil

import pytest

import bench

MODULES = sorted(info.name for info in pkgutil.iter_modules(bench.__path__))


def test_the_benchmarks_are_all_found():
    assert {"load_test", "attack", "harness", "model_swap", "peers", "cpu_profile"} <= set(MODULES)


@pytest.mark.parametrize("name", MODULES)
def test_benchmark_module_imports(name):
    importlib.import_module(f"bench.{name}")
