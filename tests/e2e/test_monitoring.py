"""deploy/prometheus and deploy/grafana: promtool checks and rule unit tests, then the real
Prometheus server (Debian's `prometheus` package, which .ci/run installs) scraping the real service
and evaluating the project's rules, and the dashboard's every query run against both."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from app.metrics import REGISTRY

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS_DIR = ROOT / "deploy" / "prometheus"
RULE_FILES = sorted((PROMETHEUS_DIR / "rules").glob("*.yml"))
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "captioning.json"
START_TIMEOUT_S = 180
# Names a query may use besides the service's metrics and the recording rules: Prometheus' own.
PROMETHEUS_METRICS = {"up"}
# kube-state-metrics series, used only by the Kubernetes alerts.
KUBE_STATE_METRICS = {"kube_pod_container_status_ready", "kube_pod_container_status_restarts_total"}
PROMQL_WORDS = {
    "sum",
    "by",
    "rate",
    "max",
    "min",
    "avg",
    "and",
    "or",
    "unless",
    "on",
    "without",
    "le",
    "histogram_quantile",
    "resets",
    "increase",
    "changes",
    "max_over_time",
    "bool",
    "offset",
}


def binary(name: str) -> str:
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed: `apt-get install prometheus` (.ci/run installs it)")
    return found


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=ROOT, check=False, capture_output=True, text=True, timeout=120)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def exported_names(families) -> set[str]:
    """Every series name the families can produce (a counter `x` is exported as `x_total`, ...)."""
    suffixes = {
        "counter": ["_total", "_created"],
        "histogram": ["_bucket", "_sum", "_count", "_created"],
        "gauge": [""],
        "summary": ["_sum", "_count", "_created", ""],
    }
    names = set()
    for family in families:
        names |= {family.name + suffix for suffix in suffixes.get(family.type, [""])}
        names |= {sample.name for sample in family.samples}
    return names


def recorded_names() -> set[str]:
    return {
        rule["record"]
        for path in RULE_FILES
        for group in yaml.safe_load(path.read_text())["groups"]
        for rule in group["rules"]
        if "record" in rule
    }


def metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression: identifiers outside {...} and [...] that are not PromQL words,
    label names (before a comparison in a by/on clause) or template variables."""
    stripped = re.sub(r"\{[^}]*\}|\[[^\]]*\]|\"[^\"]*\"|\$\w+", " ", expr)
    stripped = re.sub(r"\b(by|on|without)\s*\([^)]*\)", " ", stripped)
    return {word for word in re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", stripped) if word not in PROMQL_WORDS}


def rule_expressions() -> list[str]:
    return [
        rule["expr"]
        for path in RULE_FILES
        for group in yaml.safe_load(path.read_text())["groups"]
        for rule in group["rules"]
    ]


def dashboard_expressions() -> list[str]:
    import json

    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    assert len(exprs) >= 10 and all(panel["targets"] for panel in dashboard["panels"])
    return exprs


def as_instant_query(expr: str) -> str:
    """A dashboard query with Grafana's variables filled in, as Prometheus' API takes it."""
    return expr.replace("$__rate_interval", "1m").replace('=~"$job"', '=~".*"')


# --- static checks (promtool) -------------------------------------------------------------------


def test_promtool_checks_rules_and_config():
    result = run(binary("promtool"), "check", "rules", *map(str, RULE_FILES))
    assert result.returncode == 0, result.stdout + result.stderr
    result = run(binary("promtool"), "check", "config", str(PROMETHEUS_DIR / "prometheus.yml"))
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_rule_unit_tests_pass():
    result = run(binary("promtool"), "test", "rules", str(PROMETHEUS_DIR / "tests" / "rules_test.yml"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_rules_name_only_exported_or_recorded_metrics():
    known = exported_names(REGISTRY.collect()) | recorded_names() | PROMETHEUS_METRICS | KUBE_STATE_METRICS
    for expr in rule_expressions():
        names = metric_names(expr)
        assert names, expr
        assert names <= known, f"{sorted(names - known)} in {expr!r}"


# --- the real service and the real Prometheus -----------------------------------------------------


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    port = free_port()
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "HOST": "127.0.0.1",
        "PORT": str(port),
        "ARTIFACTS_DIR": str(ROOT / "model_artifacts" / "default"),
        "API_KEY": "",
        "TF_CPP_MIN_LOG_LEVEL": "3",
        "TF_ENABLE_ONEDNN_OPTS": "0",
        "SHUTDOWN_GRACE_S": "2",
    }
    log_path = tmp_path_factory.mktemp("monitoring") / "service.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "app"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(
            lambda: httpx.get(f"{url}/health/ready", timeout=2).status_code == 200, START_TIMEOUT_S, process, log_path
        )
        caption(url)
        yield url, port
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


@pytest.fixture(scope="module")
def prometheus(service, tmp_path_factory):
    """The project's prometheus.yml and rules, scraping the live service every second."""
    _, service_port = service
    directory = tmp_path_factory.mktemp("prometheus")
    config = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
    config["rule_files"] = [str(PROMETHEUS_DIR / name) for name in config["rule_files"]]
    (job,) = config["scrape_configs"]
    job["static_configs"] = [{"targets": [f"127.0.0.1:{service_port}"]}]
    (directory / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    log_path = directory / "prometheus.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [
                binary("prometheus"),
                f"--config.file={directory / 'prometheus.yml'}",
                f"--storage.tsdb.path={directory / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: httpx.get(f"{url}/-/ready", timeout=2).status_code == 200, 60, process, log_path)
        yield url, job["job_name"]
    finally:
        process.terminate()
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


def caption(url: str, count: int = 3) -> None:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), (200, 30, 30)).save(buffer, format="PNG")
    for _ in range(count):
        response = httpx.post(
            f"{url}/caption", files={"image": ("probe.png", buffer.getvalue(), "image/png")}, timeout=60
        )
        assert response.status_code == 200, response.text


def wait_until(condition, timeout_s: float, process: subprocess.Popen | None = None, log_path: Path | None = None):
    deadline = time.monotonic() + timeout_s
    while True:
        if process is not None and process.poll() is not None:
            pytest.fail(f"process exited with {process.returncode}:\n{log_path.read_text()[-3000:]}")
        try:
            if condition():
                return
        except (httpx.TransportError, LookupError):
            pass
        if time.monotonic() > deadline:
            detail = log_path.read_text()[-3000:] if log_path else ""
            pytest.fail(f"condition not met within {timeout_s} s\n{detail}")
        time.sleep(0.5)


def query(prometheus_url: str, expr: str) -> list[dict]:
    response = httpx.get(f"{prometheus_url}/api/v1/query", params={"query": expr}, timeout=10)
    body = response.json()
    assert response.status_code == 200 and body["status"] == "success", f"{expr}: {body}"
    return body["data"]["result"]


def test_prometheus_scrapes_the_service_and_evaluates_the_rules(service, prometheus):
    url, job = prometheus
    wait_until(lambda: [float(s["value"][1]) for s in query(url, f'up{{job="{job}"}}')] == [1.0], 60)
    # Captions after the first scrape: the next scrape sees the counter grow, and the recording rule's
    # rate over the two is positive.
    caption(service[0])
    wait_until(lambda: float(query(url, 'sum(captioning:http_requests:rate5m{status="200"})')[0]["value"][1]) > 0, 60)
    (series,) = query(url, "captioning:engine_queue:saturation")
    assert series["metric"]["job"] == job
    # Idle: an empty queue. Waited for, not read once: the rule's latest evaluation can still hold a
    # scrape taken while the caption was queued (a CI run on a loaded machine read 1/256 so).
    wait_until(lambda: float(query(url, "captioning:engine_queue:saturation")[0]["value"][1]) == 0.0, 60)
    (ratio,) = query(url, "captioning:http_errors:ratio_rate5m")
    assert float(ratio["value"][1]) == 0.0  # three successes, no 5xx
    rules = httpx.get(f"{url}/api/v1/rules", timeout=10).json()["data"]["groups"]
    evaluated = [rule for group in rules for rule in group["rules"]]
    assert len(evaluated) == len(rule_expressions())
    assert all(rule["health"] == "ok" for rule in evaluated), [r for r in evaluated if r["health"] != "ok"]


def test_dashboard_queries_name_metrics_the_service_exports(service):
    url, _ = service
    families = list(text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=10).text))
    known = exported_names(families) | recorded_names() | PROMETHEUS_METRICS
    for expr in dashboard_expressions():
        names = metric_names(expr)
        assert names, expr
        assert names <= known, f"{sorted(names - known)} in {expr!r}"


def test_dashboard_queries_run_in_prometheus(prometheus):
    url, _ = prometheus
    wait_until(lambda: query(url, "captioning:http_request_duration_seconds:p50_5m"), 60)
    with_data = [expr for expr in dashboard_expressions() if query(url, as_instant_query(expr))]
    # The traffic, latency and engine panels have data after three captions.
    for needle in (
        "captioning_http_requests_total",
        "p50_5m",
        "captioning_engine_queue_depth",
        "captioning_engine_inference_seconds_bucket",
        "up{",
    ):
        assert any(needle in expr for expr in with_data), needle
