"""Start-up: XLA's persistent compilation cache is switched on only where it can be written."""

from __future__ import annotations

import os

from app.main import configure_compile_cache


def test_the_compilation_cache_is_pointed_at_a_writable_directory(tmp_path, monkeypatch):
    monkeypatch.setenv("TF_XLA_FLAGS", "--tf_xla_auto_jit=0")
    configure_compile_cache(tmp_path / "xla")
    assert os.environ["TF_XLA_FLAGS"] == f"--tf_xla_auto_jit=0 --tf_xla_persistent_cache_directory={tmp_path / 'xla'}"
    assert (tmp_path / "xla").is_dir()


def test_an_unwritable_or_disabled_cache_leaves_xla_alone(tmp_path, monkeypatch):
    monkeypatch.delenv("TF_XLA_FLAGS", raising=False)
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    configure_compile_cache(blocker / "xla")  # cannot be created: XLA would fail every step on it
    configure_compile_cache(None)
    assert "TF_XLA_FLAGS" not in os.environ
