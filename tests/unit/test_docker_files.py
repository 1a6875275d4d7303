"""The Dockerfile passes hadolint, the compose file passes `docker compose config`, and both say
what the deployment needs (no Docker engine required; deploy/container-test.sh builds and runs them)."""

from __future__ import annotations

import json
import re
import runpy
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib
import yaml

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = (ROOT / "Dockerfile").read_text()


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def tool(name: str) -> str:
    """A dev-dependency binary: next to this interpreter (the venv) or on PATH."""
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.exists() else shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed; `pip install -e '.[dev]'` provides it")
    return found


def compose_config(*args: str) -> dict:
    result = subprocess.run(
        [tool("docker-compose"), *args, "config", "--format", "json"],
        cwd=ROOT,
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def instructions(name: str) -> list[str]:
    """Arguments of every `name` instruction, continuation lines joined."""
    joined = re.sub(r"\\\n\s*", " ", DOCKERFILE)
    return [line.split(None, 1)[1] for line in joined.splitlines() if line.upper().startswith(name + " ")]


def test_hadolint_passes():
    result = subprocess.run(
        [tool("hadolint"), "Dockerfile"], cwd=ROOT, check=False, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_image_is_python_311_slim_and_runs_as_a_non_root_user():
    assert instructions("ARG")[0] == "PYTHON_VERSION=3.11"
    assert all(stage.startswith("python:${PYTHON_VERSION}-slim") for stage in instructions("FROM"))
    user = instructions("USER")[-1]
    assert user.split(":")[0] not in ("0", "root")


def test_dependencies_come_from_the_lock_file_in_their_own_layer_before_the_code():
    runs, copies = " ".join(instructions("RUN")), instructions("COPY")
    assert re.search(r"pip --python /opt/venv/bin/python install .*-r /tmp/requirements-serve.txt", runs)
    assert any(copy.startswith("deploy/requirements-serve.txt ") for copy in copies)
    assert "ARG TF_PACKAGE=tensorflow-cpu" in DOCKERFILE  # CPU build by default
    runtime = copies[next(i for i, copy in enumerate(copies) if "--from=deps /opt/venv" in copy) :]
    # The venv, then the model bundles, then the code: a code edit reuses the dependency layer.
    assert [copy.split()[-1] for copy in runtime] == [
        "/opt/venv",
        "/srv/model_artifacts",
        "/srv/captioning",
        "/srv/app",
    ]
    assert runtime[1] == "--from=models /models /srv/model_artifacts"
    assert "training" not in " ".join(copies)  # serving never imports the training module


def test_lock_file_pins_every_package_within_pyproject_ranges():
    from packaging.requirements import Requirement

    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    lines = [
        line
        for line in (ROOT / "deploy" / "requirements-serve.txt").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    pins = {}
    for line in lines:
        requirement = Requirement(line)
        (specifier,) = requirement.specifier
        assert specifier.operator == "==", line
        pins[canonical(requirement.name)] = specifier.version
    tf_version = re.search(r"^ARG TF_VERSION=(\S+)$", DOCKERFILE, re.MULTILINE).group(1)
    pins["tensorflow"] = tf_version  # installed as tensorflow-cpu (or the GPU build) of this version
    for dependency in pyproject["project"]["dependencies"]:
        requirement = Requirement(dependency)
        name = canonical(requirement.name)
        assert name in pins, f"{name} is not in the lock file"
        assert requirement.specifier.contains(pins[name]), f"{name}=={pins[name]} is outside {requirement.specifier}"


def test_healthcheck_probes_readiness_on_port_without_curl_and_matches_compose():
    (healthcheck,) = instructions("HEALTHCHECK")
    assert "/health/ready" in healthcheck and "urllib" in healthcheck and "PORT" in healthcheck
    assert "curl" not in healthcheck and "wget" not in healthcheck
    command = json.loads(healthcheck[healthcheck.index("CMD") + 3 :])
    assert command[:2] == ["python", "-c"]
    compile(command[2], "healthcheck", "exec")  # the one-liner is valid Python
    assert compose_config()["services"]["captioner"]["healthcheck"]["test"] == ["CMD", *command]


def test_tini_is_pid_1_so_sigterm_is_handled_from_the_start():
    assert instructions("STOPSIGNAL") == ["SIGTERM"]
    assert json.loads(instructions("ENTRYPOINT")[-1]) == ["tini", "--", "python", "-m", "app"]  # exec form
    assert any("tini" in copy for copy in instructions("COPY"))


def test_gpu_variant_is_a_build_argument():
    assert "TF_PACKAGE='tensorflow[and-cuda]'" in DOCKERFILE  # documented in the header
    assert '"${TF_PACKAGE}==${TF_VERSION}"' in DOCKERFILE


def test_dockerignore_allows_only_what_the_image_needs():
    lines = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert lines[0] == "*"  # an allow-list: .git, .venv, runs/, tests/ ... never reach the context
    allowed = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    assert allowed == {
        "app",
        "captioning",
        "model_artifacts",
        "deploy/requirements-serve.txt",
        "deploy/keep_newest_versions.py",
    }


def test_compose_config_is_valid_with_service_essentials():
    config = compose_config()
    service = config["services"]["captioner"]
    assert set(config["services"]) == {"captioner"}  # gpu and monitoring only with their profiles
    (port,) = service["ports"]
    assert port["target"] == 8000
    # API_KEY is empty by default: published on loopback only unless BIND_ADDRESS says otherwise.
    assert port["host_ip"] == "127.0.0.1"
    assert service["restart"] == "unless-stopped"
    assert service["environment"]["MODEL_REPOSITORY"] == "/srv/model_artifacts"
    assert service["environment"]["MODEL_NAME"] == "default"
    artifacts, cache = service["volumes"]
    assert artifacts["target"] == "/srv/model_artifacts" and artifacts["read_only"] is True
    # A named volume on the image's compilation cache, so a recreated container starts warm.
    assert cache["type"] == "volume" and cache["source"] in config["volumes"]
    assert f"COMPILE_CACHE_DIR={cache['target']}" in DOCKERFILE
    # The user owns it; group root with the same rights, for an arbitrary UID in group 0 (OpenShift).
    assert re.search(rf"install -d -o captioner -g 0 -m 0770 {cache['target']}", DOCKERFILE)


def test_compose_stop_grace_covers_both_drains():
    service = compose_config()["services"]["captioner"]
    grace_s = float(service["environment"]["SHUTDOWN_GRACE_S"])
    assert service["stop_grace_period"] == "30s" and 2 * grace_s < 30


def test_compose_gpu_profile_reserves_an_nvidia_device():
    config = compose_config("--profile", "gpu")
    gpu = config["services"]["captioner-gpu"]
    (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert gpu["build"]["args"]["TF_PACKAGE"] == "tensorflow[and-cuda]"
    assert gpu["ports"][0]["host_ip"] == "127.0.0.1"


def test_compose_monitoring_profile_mounts_the_project_config():
    config = compose_config("--profile", "monitoring")
    prometheus, grafana = config["services"]["prometheus"], config["services"]["grafana"]
    assert [volume["source"] for volume in prometheus["volumes"]] == [str(ROOT / "deploy" / "prometheus")]
    assert {volume["source"] for volume in grafana["volumes"]} == {
        str(ROOT / "deploy" / "grafana" / "provisioning"),
        str(ROOT / "deploy" / "grafana" / "dashboards"),
    }
    assert all(port["host_ip"] == "127.0.0.1" for service in (prometheus, grafana) for port in service["ports"])
    scrape = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())["scrape_configs"]
    assert scrape[0]["static_configs"][0]["targets"] == ["captioner:8000"]  # the compose service name


KEEP_NEWEST = ROOT / "deploy" / "keep_newest_versions.py"


def test_image_carries_the_newest_two_versions_of_each_model():
    stages = re.split(r"^FROM ", DOCKERFILE, flags=re.MULTILINE)
    (models,) = [stage for stage in stages if stage.startswith("python:${PYTHON_VERSION}-slim AS models")]
    assert "ARG MODEL_VERSIONS=2" in models
    assert "COPY model_artifacts /models" in models
    assert "COPY deploy/keep_newest_versions.py /tmp/keep_newest_versions.py" in models
    assert 'RUN python /tmp/keep_newest_versions.py /models "${MODEL_VERSIONS}"' in models


def keep_newest(repository: Path, keep: str) -> subprocess.CompletedProcess:
    command = [sys.executable, str(KEEP_NEWEST), str(repository), keep]
    return subprocess.run(command, capture_output=True, text=True, timeout=30)


def listing(repository: Path) -> dict[str, list[str]]:
    return {model.name: sorted(entry.name for entry in model.iterdir()) for model in sorted(repository.iterdir())}


def make_repository(root: Path, models: dict[str, list[str]]) -> Path:
    for model, names in models.items():
        (root / model).mkdir(parents=True)
        for name in names:
            (root / model / name).mkdir()
            (root / model / name / "manifest.json").write_text("{}")
    return root


def test_keep_newest_versions_reads_versions_as_the_service_does(tmp_path):
    from captioning.artifacts import is_version_name, scan_versions

    names = ["1", "2", "9", "10", "007", "7", "0", "12345678901234567890", "11.tmp", ".tmp-12", "3a", "\u00b3"]
    repository = make_repository(
        tmp_path, {"default": names, "shapeworld": ["3"], "empty": [], "dup": ["6", "007", "7"]}
    )
    (repository / "default" / "README").write_text("not a version")
    before = {model.name: sorted(scan_versions(model)) for model in repository.iterdir()}
    assert before["default"] == [1, 2, 7, 9, 10]  # "007" is 7; 0, 20 digits and the rest are no versions

    result = keep_newest(repository, "2")
    assert result.returncode == 0, result.stderr
    after = {model.name: sorted(scan_versions(model)) for model in repository.iterdir()}
    # by number: 10 after 9, and "007" and "7" one version, so the newest two of "dup" are 6 and 7
    assert after == {"default": [9, 10], "shapeworld": [3], "empty": [], "dup": [6, 7]}
    left = set(listing(repository)["default"])
    assert {"007", "7", "1", "2"}.isdisjoint(left)  # both names of version 7 went
    assert {"0", "12345678901234567890", "11.tmp", ".tmp-12", "3a", "\u00b3", "README"} <= left  # not versions

    build_stage_rule = runpy.run_path(str(KEEP_NEWEST))["is_version_name"]  # its copy of the service's rule
    assert [build_stage_rule(name) for name in names] == [is_version_name(name) for name in names]


def test_keep_newest_versions_all_keeps_everything_and_one_keeps_the_newest(tmp_path):
    repository = make_repository(tmp_path, {"default": ["1", "2", "3"]})
    assert keep_newest(repository, "all").returncode == 0
    assert listing(repository) == {"default": ["1", "2", "3"]}
    assert keep_newest(repository, "1").returncode == 0
    assert listing(repository) == {"default": ["3"]}


@pytest.mark.parametrize("keep", ["0", "", "two", "-1", "02", "1.5"])
def test_keep_newest_versions_refuses_a_count_that_is_not_a_positive_integer(tmp_path, keep):
    repository = make_repository(tmp_path, {"default": ["1", "2"]})
    result = keep_newest(repository, keep)
    assert result.returncode == 2 and "positive integer" in result.stderr
    assert listing(repository) == {"default": ["1", "2"]}


def test_keep_newest_versions_refuses_a_repository_that_is_not_there(tmp_path):
    result = keep_newest(tmp_path / "missing", "2")
    assert result.returncode == 2 and "not a directory" in result.stderr
