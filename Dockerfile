# syntax=docker/dockerfile:1
#
# CPU image (default):  docker build -t captioning-service .
# GPU image:            docker build --build-arg TF_PACKAGE='tensorflow[and-cuda]' -t captioning-service:gpu .
#   (run it with --gpus all). Sizes, layers, the stop timeout and Kubernetes: docs/DEPLOY.md.
#
# Layers, largest and least often rebuilt first: tini, the pinned dependencies (rebuilt only when
# deploy/requirements-serve.txt or a build argument changes), the model bundles (the newest two
# versions of each model: --build-arg MODEL_VERSIONS=all for every one), then the code
# (captioning/ and app/ only, a few hundred KB): a code change rebuilds and ships in seconds.

ARG PYTHON_VERSION=3.11

FROM python:${PYTHON_VERSION}-slim AS deps
ARG TF_PACKAGE=tensorflow-cpu
ARG TF_VERSION=2.21.0
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# tini is PID 1 and forwards SIGTERM from the first instant: python as PID 1 ignores SIGTERM until
# uvicorn installs its handler, seconds later. binutils' strip is for the build only. Their versions
# do not matter, so they are not pinned.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends tini binutils \
    && rm -rf /var/lib/apt/lists/*
COPY deploy/requirements-serve.txt /tmp/requirements-serve.txt
# A venv without pip (the base image's pip installs into it), then drop what serving never loads:
# TensorFlow's C++ headers, libclang (a TensorFlow build-time dependency), setuptools, wheel, and
# the native libraries' static symbol tables (~265 MB; the dynamic symbols stay). Left alone:
# auditwheel-patched libraries (*.libs/, strip breaks their program headers) and NVIDIA's CUDA
# libraries of the GPU build.
RUN python -m venv --without-pip /opt/venv \
    && pip --python /opt/venv/bin/python install --no-cache-dir \
       -r /tmp/requirements-serve.txt "${TF_PACKAGE}==${TF_VERSION}" \
    && pip --python /opt/venv/bin/python uninstall --yes libclang setuptools wheel \
    && site="$(/opt/venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" \
    && rm -rf "${site}/tensorflow/include" \
    && find "${site}" -type f -name '*.so*' -not -path '*.libs/*' -not -path "${site}/nvidia/*" \
       -exec strip --strip-unneeded {} +

# The model repository as the image carries it: the newest MODEL_VERSIONS versions of each model
# (the one served and the one before it, to roll back to by a pin), not every version committed;
# "all" keeps them all. A repository mounted over /srv/model_artifacts (compose does) replaces it.
FROM python:${PYTHON_VERSION}-slim AS models
ARG MODEL_VERSIONS=2
COPY model_artifacts /models
COPY deploy/keep_newest_versions.py /tmp/keep_newest_versions.py
RUN python /tmp/keep_newest_versions.py /models "${MODEL_VERSIONS}"

FROM python:${PYTHON_VERSION}-slim AS runtime
# No TF_ENABLE_ONEDNN_OPTS: `python -m app` sets it from ENCODER_PRECISION (oneDNN for bfloat16).
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONPATH=/srv \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    TF_CPP_MIN_LOG_LEVEL=2 \
    HOST=0.0.0.0 \
    PORT=8000 \
    MODEL_REPOSITORY=/srv/model_artifacts \
    MODEL_NAME=default \
    COMPILE_CACHE_DIR=/var/cache/captioning-xla
# The compilation cache's directory is the service user's, so a volume mounted on it (compose's
# xla-cache) starts with that owner and a new container loads its compiled programs instead of
# compiling them under load (docs/DEPLOY.md). Without a volume it lives and dies with the container.
# Group root with the owner's rights: OpenShift runs images as an arbitrary UID in group 0.
RUN groupadd --system --gid 10001 captioner \
    && useradd --system --uid 10001 --gid captioner --create-home --home-dir /home/captioner \
       --shell /usr/sbin/nologin captioner \
    && install -d -o captioner -g 0 -m 0770 /var/cache/captioning-xla
COPY --from=deps /usr/bin/tini-static /usr/bin/tini
COPY --from=deps /opt/venv /opt/venv
# Owned by root and read-only to the service: a compromised process cannot alter the model or code.
COPY --from=models /models /srv/model_artifacts
COPY captioning /srv/captioning
COPY app /srv/app
WORKDIR /srv
USER 10001:10001
EXPOSE 8000
# The one health check (docker-compose.yml repeats it verbatim): no curl in the slim image, so the
# standard library probes readiness on $PORT; HTTP 503 raises, so the exit status is non-zero.
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health/ready' % os.environ.get('PORT', '8000'), timeout=4)"]
# On SIGTERM uvicorn stops accepting, finishes in-flight requests (SHUTDOWN_GRACE_S), then exits.
# `docker stop` waits only 10 s by default: use --stop-timeout/-t 30 (docs/DEPLOY.md).
STOPSIGNAL SIGTERM
ENTRYPOINT ["tini", "--", "python", "-m", "app"]
