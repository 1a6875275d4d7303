"""The Dockerfile passes hadolint, the compose file passes `docker compose config`, and both say
what the deployment needs (no Docker engine required)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = (ROOT / "Dockerfile").read_text()


def tool(name: str) -> str:
    """A dev-dependency binary: next to this interpreter (the venv) or on PATH."""
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.exists() else shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed; `pip install -e '.[dev]'` provides it")
    return found


def compose_config(*args: str) -> dict:
    result = subprocess.run([tool("docker-compose"), *args, "config", "--format", "json"], cwd=ROOT,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def instructions(name: str) -> list[str]:
    """Arguments of every `name` instruction, continuation lines joined."""
    joined = re.sub(r"\\\n\s*", " ", DOCKERFILE)
    return [line.split(None, 1)[1] for line in joined.splitlines() if line.upper().startswith(name + " ")]


def test_hadolint_passes():
    result = subprocess.run([tool("hadolint"), "Dockerfile"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_image_is_python_311_slim_and_runs_as_a_non_root_user():
    assert instructions("ARG")[0] == "PYTHON_VERSION=3.11"
    assert all(stage.startswith("python:${PYTHON_VERSION}-slim") for stage in instructions("FROM"))
    user = instructions("USER")[-1]
    assert user.split(":")[0] not in ("0", "root")


def test_model_artifacts_and_the_package_are_installed():
    copies = " ".join(instructions("COPY"))
    for path in ("pyproject.toml", "captioning", "training", "app", "model_artifacts"):
        assert path in copies
    assert any("pip install" in run for run in instructions("RUN"))


def test_healthcheck_probes_readiness_without_curl():
    (healthcheck,) = instructions("HEALTHCHECK")
    assert "/health/ready" in healthcheck and "urllib" in healthcheck
    assert "curl" not in healthcheck and "wget" not in healthcheck
    command = json.loads(healthcheck[healthcheck.index("CMD") + 3 :])
    assert command[:2] == ["python", "-c"]
    compile(command[2], "healthcheck", "exec")  # the one-liner is valid Python


def test_graceful_shutdown_exec_form_and_gpu_variant():
    assert instructions("STOPSIGNAL") == ["SIGTERM"]
    assert json.loads(instructions("ENTRYPOINT")[-1]) == ["python", "-m", "app"]  # exec form: PID 1 gets SIGTERM
    assert any(arg.startswith("EXTRAS") for arg in instructions("ARG"))
    assert "EXTRAS=gpu" in DOCKERFILE


def test_dockerignore_keeps_the_context_small():
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()}
    assert {".venv", ".git", ".pytest_cache", "runs"} <= ignored


def test_compose_config_is_valid_with_service_essentials():
    config = compose_config()
    service = config["services"]["captioner"]
    assert "captioner-gpu" not in config["services"]  # only with --profile gpu
    assert service["ports"][0]["target"] == 8000
    assert service["restart"] == "unless-stopped"
    assert service["environment"]["ARTIFACTS_DIR"] == "/srv/model_artifacts/default"
    assert "/health/ready" in " ".join(service["healthcheck"]["test"])
    (volume,) = service["volumes"]
    assert volume["target"] == "/srv/model_artifacts" and volume["read_only"] is True


def test_compose_gpu_profile_reserves_an_nvidia_device():
    config = compose_config("--profile", "gpu")
    gpu = config["services"]["captioner-gpu"]
    (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert gpu["build"]["args"]["EXTRAS"] == "gpu"
