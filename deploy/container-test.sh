#!/usr/bin/env bash
# Builds the serving image with podman and checks it the way users run it (CI step `make container-test`).
#
# On a fresh Debian machine, as root: installs podman, runc, debootstrap (Debian) and podman-compose
# (PyPI; Debian's 1.0.3 cannot run this compose file), builds a local stand-in for the Dockerfile's
# base image (base images cannot be pulled here; the Dockerfile stays the one users build from the
# real python:3.11-slim), builds the image, and checks it: size budget, the model versions it holds,
# a code-only rebuild, health
# through the image's HEALTHCHECK, readiness, a real POST /caption, non-root, JSON-only logs, and
# `podman stop` both while serving and during start-up; then the same through podman-compose with
# the project's docker-compose.yml. Everything it starts is removed on exit.
#
# Cache-friendly: the stand-in base and podman's layer cache persist in podman's storage, so a
# second run reuses them (REBUILD_BASE=1 forces a new stand-in).
set -euo pipefail
cd "$(dirname "$0")/.."

IMAGE=${IMAGE:-localhost/captioning-service:ci}
PYTHON_VERSION=$(sed -n 's/^ARG PYTHON_VERSION=//p' Dockerfile)
BASE_IMAGE="docker.io/library/python:${PYTHON_VERSION}-slim"
SUITE=${SUITE:-bookworm}                # Debian release of the stand-in base (python3 there is 3.11)
MAX_IMAGE_MB=${MAX_IMAGE_MB:-1200}      # the serving image's size budget
READY_TIMEOUT_S=${READY_TIMEOUT_S:-240}
STOP_BUDGET_S=${STOP_BUDGET_S:-5}       # `podman stop` of an idle or starting container ends within this
COMPOSE_PROJECT=captioning-ci
WORK=$(mktemp -d /tmp/container-test.XXXXXX)
PROBE=(python3 deploy/probe.py)

log() { printf '\n=== %s\n' "$*"; }
fail() { printf 'FAIL: %s\n' "$*" >&2; exit 1; }

cleanup() {
  set +e
  podman rm --force --ignore --time 0 captioner-ci captioner-ci-startup >/dev/null 2>&1
  if [[ -x "$WORK/tools/bin/podman-compose" ]]; then
    "$WORK/tools/bin/podman-compose" -p "$COMPOSE_PROJECT" down -v -t 0 >/dev/null 2>&1
  fi
  podman rmi --force "$IMAGE-code-change" >/dev/null 2>&1
  rm -rf "$WORK"
}
trap cleanup EXIT
trap "exit 143" TERM INT

install_tools() {
  log "tools"
  if ! command -v podman >/dev/null || ! command -v runc >/dev/null || ! command -v debootstrap >/dev/null \
     || ! command -v curl >/dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq -o DPkg::Lock::Timeout=600 podman runc debootstrap curl python3-venv >/dev/null
  fi
  python3 -m venv "$WORK/tools"
  "$WORK/tools/bin/pip" install --quiet --disable-pip-version-check podman-compose==1.6.0
  # crun fails on hybrid cgroup hosts, and a container cannot raise its ulimits above the limits it
  # inherits (no CAP_SYS_RESOURCE), while podman's defaults ask for more: use runc, the host's
  # open-files limit, and at most 32768 processes (podman 4.3 starts conmon with that NPROC limit).
  mkdir -p /etc/containers/containers.conf.d
  local nofile nproc
  nofile=$(ulimit -Hn)
  nproc=$(ulimit -Hu)
  [[ "$nofile" == unlimited ]] && nofile=1048576
  [[ "$nproc" == unlimited || "$nproc" -gt 32768 ]] && nproc=32768
  cat > /etc/containers/containers.conf.d/50-captioning-ci.conf <<EOF
# Written by deploy/container-test.sh
[containers]
default_ulimits = ["nofile=${nofile}:${nofile}", "nproc=${nproc}:${nproc}"]

[engine]
runtime = "runc"
EOF
  podman --version
  "$WORK/tools/bin/podman-compose" --version | sed -n 1p
}

# The host's own package index, if it has one (file:// indexes do not exist inside the build).
host_index_url() {
  python3 -c '
import configparser, os
config = configparser.ConfigParser()
config.read(["/etc/pip.conf", "/etc/xdg/pip/pip.conf", os.path.expanduser("~/.config/pip/pip.conf")])
url = os.environ.get("PIP_INDEX_URL") or config.get("global", "index-url", fallback="")
print("" if url.startswith("file:") else url)'
}

# A minimal Debian with Debian's python3 standing in for python:3.11-slim, plus the host's apt,
# pip and CA configuration so apt and pip work inside the build behind a TLS-re-signing proxy.
build_standin_base() {
  if podman image exists "$BASE_IMAGE" && [[ -z "${REBUILD_BASE:-}" ]]; then
    log "stand-in base: reusing $BASE_IMAGE"
    return
  fi
  log "stand-in base: debootstrap $SUITE -> $BASE_IMAGE"
  local start=$SECONDS root="$WORK/rootfs"
  debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates \
    "$SUITE" "$root" >"$WORK/debootstrap.log" 2>&1 || { tail -20 "$WORK/debootstrap.log"; fail "debootstrap"; }
  for name in python python3; do ln -sf /usr/bin/python3 "$root/usr/local/bin/$name"; done
  ln -sf /usr/bin/pip3 "$root/usr/local/bin/pip"
  rm -f "$root"/usr/lib/python3*/EXTERNALLY-MANAGED
  if compgen -G "/usr/local/share/ca-certificates/*" >/dev/null; then
    cp -r /usr/local/share/ca-certificates/. "$root/usr/local/share/ca-certificates/"
  fi
  chroot "$root" update-ca-certificates >/dev/null
  rm -f "$root/etc/apt/sources.list"
  cp -a /etc/apt/sources.list* "$root/etc/apt/" 2>/dev/null || true
  cp -a /etc/apt/apt.conf.d/. "$root/etc/apt/apt.conf.d/"
  local index_url
  index_url=$(host_index_url)
  {
    echo "[global]"
    echo "cert = /etc/ssl/certs/ca-certificates.crt"
    if [[ -n "$index_url" ]]; then echo "index-url = $index_url"; fi
  } > "$root/etc/pip.conf"
  # As in Debian's slim images: no documentation, manual pages or translations.
  rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/archives/*.deb "$root"/usr/share/doc/* \
    "$root"/usr/share/man/* "$root"/usr/share/locale/* "$root"/usr/share/info/*
  tar --numeric-owner -C "$root" -c . | podman import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' --change 'CMD ["python3"]' - "$BASE_IMAGE" >/dev/null
  rm -rf "$root"
  echo "stand-in base built in $((SECONDS - start)) s"
}

build_image() {
  log "build $IMAGE"
  local start=$SECONDS
  podman build --format docker --pull=never -t "$IMAGE" . >"$WORK/build.log" 2>&1 \
    || { tail -40 "$WORK/build.log"; fail "podman build"; }
  echo "built in $((SECONDS - start)) s"
}

report_image() {
  log "image size and layers"
  local bytes
  bytes=$(podman image inspect --format '{{.Size}}' "$IMAGE")
  echo "size: $((bytes / 1000000)) MB (budget ${MAX_IMAGE_MB} MB)"
  podman history --format '{{.Size}}\t{{.CreatedBy}}' "$IMAGE" | cut -c1-150
  ((bytes / 1000000 <= MAX_IMAGE_MB)) || fail "image is $((bytes / 1000000)) MB, over ${MAX_IMAGE_MB} MB"
  # The repository as the image carries it: the newest MODEL_VERSIONS (the Dockerfile's default) of
  # each model, both sides read by the service's own scan_versions, in the image, the repository
  # mounted beside its copy.
  local keep
  keep=$(sed -n 's/^ARG MODEL_VERSIONS=//p' Dockerfile)
  podman run --rm --entrypoint python -v "$PWD/model_artifacts:/repository:ro" "$IMAGE" -c '
import sys
from pathlib import Path
from captioning.artifacts import scan_versions
keep, wrong = sys.argv[1], []
for model in sorted(path for path in Path("/repository").iterdir() if path.is_dir()):
    numbers = sorted(scan_versions(model))
    expected = numbers if keep == "all" else numbers[-int(keep):]
    held = sorted(scan_versions(Path("/srv/model_artifacts") / model.name))
    print(f"model_artifacts/{model.name}: the image holds versions {held}, the newest {keep} are {expected}")
    wrong += [model.name] if held != expected else []
sys.exit(f"the image holds other versions of {wrong}" if wrong else 0)' "$keep" \
    || fail "the image does not hold the newest $keep versions of each model"
  for path in /srv/training /srv/tests /srv/bench /opt/venv/bin/pip; do
    podman run --rm --entrypoint /bin/sh "$IMAGE" -c "test ! -e $path" || fail "$path is in the image"
  done
  podman run --rm --entrypoint python "$IMAGE" -c '
import importlib.util as u, sys
present = [m for m in ("training", "pytest", "tensorboard", "pip", "clang") if u.find_spec(m)]
sys.exit(f"serving image holds {present}" if present else 0)' || fail "the image holds non-serving packages"
}

# A code-only change must reuse every layer but the code's own, and rebuild in seconds.
check_code_only_rebuild() {
  log "code-only rebuild"
  local ctx="$WORK/context" start
  mkdir -p "$ctx/deploy"
  cp -a Dockerfile .dockerignore app captioning model_artifacts "$ctx/"
  cp deploy/requirements-serve.txt deploy/keep_newest_versions.py "$ctx/deploy/"
  echo "# code-only change $(date +%s)" >> "$ctx/app/__init__.py"
  start=$SECONDS
  podman build --format docker --pull=never -t "$IMAGE-code-change" "$ctx" >"$WORK/rebuild.log" 2>&1 \
    || { tail -20 "$WORK/rebuild.log"; fail "rebuild"; }
  local took=$((SECONDS - start))
  python3 - "$IMAGE" "$IMAGE-code-change" "$took" <<'EOF'
import json, subprocess, sys
before, after, took = sys.argv[1], sys.argv[2], int(sys.argv[3])
layers = lambda image: json.loads(subprocess.check_output(["podman", "image", "inspect", image]))[0]["RootFS"]["Layers"]
old, new = layers(before), layers(after)
changed = [i for i, (a, b) in enumerate(zip(old, new)) if a != b]
history = subprocess.check_output(["podman", "history", "--format", "{{.Size}}\t{{.CreatedBy}}", after], text=True)
code_layer = next(line for line in history.splitlines() if not line.startswith("0 B"))
print(f"rebuilt in {took} s; layers changed: {len(changed)} of {len(new)}, the new one: {code_layer[:100]}")
assert len(old) == len(new) and changed == [len(new) - 1], f"more than the code layer changed: {changed}"
assert took <= 60, f"code-only rebuild took {took} s"
EOF
}

free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

# Health through the image's own HEALTHCHECK (no systemd here: `podman healthcheck run` evaluates it).
wait_healthy() {
  local container=$1 start=$SECONDS
  # Exit status 0: the check passed and the status is now "healthy". (Without systemd podman logs
  # that it cannot schedule the periodic checks; that noise goes to $WORK.)
  until podman healthcheck run "$container" >>"$WORK/healthcheck.log" 2>&1; do
    [[ "$(podman inspect --format '{{.State.Running}}' "$container")" == true ]] \
      || { podman logs "$container" | tail -20; fail "$container exited while starting"; }
    ((SECONDS - start < READY_TIMEOUT_S)) || { podman logs "$container" | tail -20; fail "$container not healthy"; }
    sleep 1
  done
  echo "$container $(podman inspect --format '{{.State.Health.Status}}' "$container") after $((SECONDS - start)) s"
}

check_serving() {
  local container=$1 port=$2
  curl -fsS "http://127.0.0.1:$port/health/live" >/dev/null || fail "/health/live"
  curl -fsS "http://127.0.0.1:$port/health/ready" >/dev/null || fail "/health/ready"
  "${PROBE[@]}" caption "http://127.0.0.1:$port/caption" || fail "POST /caption"
  curl -fsS "http://127.0.0.1:$port/metrics" >"$WORK/metrics.txt" || fail "/metrics"
  grep -q '^captioning_http_requests_total{' "$WORK/metrics.txt" || fail "/metrics lacks the request counter"
  local uid
  uid=$(podman exec "$container" id -u)
  [[ "$uid" != 0 ]] || fail "runs as root"
  echo "runs as uid $uid"
  podman logs "$container" 2>&1 | "${PROBE[@]}" json-lines || fail "a log line is not JSON"
  if podman logs "$container" 2>&1 | grep -q '"compilation cache off'; then fail "the compilation cache is off"; fi
}

# Waits for the background compilation of the multi-step programs; prints its seconds.
wait_compiled() {
  local container=$1 start=$SECONDS line
  until line=$(podman logs "$container" 2>&1 | grep '"multi-step greedy programs ready"'); do
    ((SECONDS - start < READY_TIMEOUT_S)) || { podman logs "$container" | tail -20; fail "$container never compiled its programs"; }
    sleep 1
  done
  python3 -c 'import json, sys; print(json.loads(sys.argv[1])["seconds"])' "$line"
}

cache_entries() { podman exec "$1" sh -c 'ls /var/cache/captioning-xla | wc -l'; }

compose_container() {
  podman ps --filter "label=com.docker.compose.project=$COMPOSE_PROJECT" --format '{{.Names}}' | sed -n 1p
}

# `podman stop` must end the container within STOP_BUDGET_S, with SIGTERM's exit status (never
# SIGKILL's 137), given a stop timeout longer than the service's own drain.
stop_within_budget() {
  local container=$1 start=$SECONDS status
  podman stop --time 30 "$container" >/dev/null
  local took=$((SECONDS - start))
  status=$(podman inspect --format '{{.State.ExitCode}}' "$container")
  echo "$container stopped in ${took} s, exit status $status"
  [[ "$status" != 137 ]] || fail "$container was killed (137): SIGTERM was not handled"
  ((took <= STOP_BUDGET_S)) || fail "$container took ${took} s to stop"
}

# After a stop while serving: the service drained and shut down through its own SIGTERM path.
check_graceful_shutdown() {
  podman logs "$1" >"$WORK/shutdown.log" 2>&1
  grep -q '"message": "Application shutdown complete."' "$WORK/shutdown.log" \
    || { tail -5 "$WORK/shutdown.log"; fail "$1 did not shut down gracefully"; }
  echo "$1 shut down gracefully"
}

# Hardened as deploy/k8s/deployment.yaml runs it: read-only root with a writable /tmp and
# compilation cache only (emptyDir volumes there, which the pod's user can write), no
# capabilities, no privilege escalation. Podman gives a tmpfs the image directory's mode and
# root as owner, whatever mode= says; U makes it the container user's.
HARDENED=(--read-only --read-only-tmpfs=false --tmpfs /tmp --tmpfs /var/cache/captioning-xla:rw,U
  --cap-drop ALL --security-opt no-new-privileges)

check_image() {
  log "podman run (read-only root, /tmp writable, no capabilities)"
  local port
  port=$(free_port)
  podman run -d --name captioner-ci "${HARDENED[@]}" -p "127.0.0.1:$port:8000" "$IMAGE" >/dev/null 2>>"$WORK/podman.log"
  wait_healthy captioner-ci
  check_serving captioner-ci "$port"
  podman exec captioner-ci sh -c 'touch /srv/probe' 2>/dev/null && fail "the root filesystem is writable"
  podman stats --no-stream --format 'memory after warm-up and one caption: {{.MemUsage}}' captioner-ci 2>/dev/null
  stop_within_budget captioner-ci
  check_graceful_shutdown captioner-ci
  # While python starts (no handler yet), while TensorFlow is imported, and during the model load
  # and warm-up (uvicorn would defer the signal until warm-up ends; app/__main__.py does not).
  for moment in 0.5 3 loading; do
    log "podman stop during start-up ($moment)"
    podman run -d --name captioner-ci-startup "$IMAGE" >/dev/null 2>>"$WORK/podman.log"
    if [[ "$moment" == loading ]]; then
      local start=$SECONDS
      until podman logs captioner-ci-startup 2>&1 | grep -c '"loading model"' >/dev/null; do
        ((SECONDS - start < READY_TIMEOUT_S)) || fail "no \"loading model\" log line"
        sleep 0.2
      done
      podman logs captioner-ci-startup 2>&1 | grep -c '"ready"' >/dev/null && fail "ready before the stop"
    else
      sleep "$moment"
    fi
    stop_within_budget captioner-ci-startup
    podman rm captioner-ci-startup >/dev/null
  done
}

check_compose() {
  log "podman-compose up -d"
  local port compose="$WORK/tools/bin/podman-compose"
  port=$(free_port)
  export HOST_PORT=$port BUILDAH_FORMAT=docker
  "$compose" -p "$COMPOSE_PROJECT" build captioner >"$WORK/compose-build.log" 2>&1 \
    || { tail -20 "$WORK/compose-build.log"; fail "podman-compose build"; }
  "$compose" -p "$COMPOSE_PROJECT" up -d captioner >"$WORK/compose-up.log" 2>&1 \
    || { tail -20 "$WORK/compose-up.log"; fail "podman-compose up"; }
  local container
  container=$(compose_container)
  [[ -n "$container" ]] || fail "no compose container"
  wait_healthy "$container"
  local published
  published=$(podman port "$container" 8000)
  echo "published on $published"
  [[ "$published" == "127.0.0.1:$port" ]] || fail "compose publishes on $published, not loopback only"
  check_serving "$container" "$port"
  local cold_s entries
  cold_s=$(wait_compiled "$container")
  entries=$(cache_entries "$container")
  stop_within_budget "$container"
  check_graceful_shutdown "$container"
  # A new container (as after an upgrade) on the same xla-cache volume loads every program it
  # compiled: the volume gains no entry.
  log "podman-compose down, then up: a new container on the same compilation cache"
  "$compose" -p "$COMPOSE_PROJECT" down >/dev/null 2>&1
  "$compose" -p "$COMPOSE_PROJECT" up -d captioner >"$WORK/compose-up.log" 2>&1 \
    || { tail -20 "$WORK/compose-up.log"; fail "podman-compose up (again)"; }
  container=$(compose_container)
  wait_healthy "$container"
  "${PROBE[@]}" caption "http://127.0.0.1:$port/caption" || fail "POST /caption (again)"
  local warm_s warm_entries
  warm_s=$(wait_compiled "$container")
  warm_entries=$(cache_entries "$container")
  # TensorFlow writes plain-text lines for each program it loads from the cache: JSON records too.
  podman logs "$container" 2>&1 | "${PROBE[@]}" json-lines || fail "a log line is not JSON (cache loads)"
  echo "multi-step programs: ${cold_s} s in the first container, ${warm_s} s in the second;" \
    "cache entries: $entries, then $warm_entries"
  [[ "$warm_entries" == "$entries" ]] || fail "the second container compiled programs again"
  "$compose" -p "$COMPOSE_PROJECT" down -v -t 30 >/dev/null 2>&1
}

install_tools
build_standin_base
build_image
report_image
check_code_only_rebuild
check_image
check_compose
log "container test passed"
