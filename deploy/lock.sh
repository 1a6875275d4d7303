#!/usr/bin/env bash
# Regenerates deploy/requirements-serve.txt (`make lock`): resolves pyproject.toml's runtime
# dependencies with tensorflow-cpu (the image's default build) for this machine's CPython, which
# should be the image's (3.11, linux/x86_64), and pins every package. TensorFlow itself is left to
# the Dockerfile's TF_PACKAGE/TF_VERSION build arguments.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
TF_VERSION=$(sed -n 's/^ARG TF_VERSION=//p' Dockerfile)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$PYTHON" - "$work/requirements.in" "$TF_VERSION" <<'PY'
import sys, tomllib
deps = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]
with open(sys.argv[1], "w") as out:
    for dep in deps:
        out.write(f"tensorflow-cpu=={sys.argv[2]}\n" if dep.startswith("tensorflow") else dep + "\n")
PY
"$PYTHON" -m pip install --quiet --dry-run --ignore-installed --report "$work/report.json" -r "$work/requirements.in"
"$PYTHON" - "$work/report.json" <<'PY' > deploy/requirements-serve.txt
import json, re, sys
print("""# Serving dependencies of the container image, every package pinned (a lock file).
# Resolved for CPython 3.11 on linux/x86_64 with tensorflow-cpu; the Dockerfile installs this file
# plus "${TF_PACKAGE}==${TF_VERSION}" (tensorflow-cpu by default, tensorflow[and-cuda] for the GPU build).
# Regenerate after changing pyproject.toml's runtime dependencies: `make lock` (see docs/DEPLOY.md).""")
for item in sorted(json.load(open(sys.argv[1]))["install"], key=lambda i: i["metadata"]["name"].lower()):
    name = re.sub(r"[-_.]+", "-", item["metadata"]["name"]).lower()
    if not name.startswith("tensorflow"):
        print(f"{name}{'[standard]' if name == 'uvicorn' else ''}=={item['metadata']['version']}")
PY
echo "wrote deploy/requirements-serve.txt"
