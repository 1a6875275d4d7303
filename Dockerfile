# syntax=docker/dockerfile:1
#
# CPU image (default):  docker build -t captioning-service .
# GPU image:            docker build --build-arg EXTRAS=gpu -t captioning-service:gpu .
#   EXTRAS=gpu installs tensorflow[and-cuda] (the project's "gpu" extra); run with --gpus all.

ARG PYTHON_VERSION=3.11

FROM python:${PYTHON_VERSION}-slim AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
ARG EXTRAS=""
WORKDIR /src
RUN python -m venv /opt/venv
# Dependencies first, from the project metadata alone, so code edits reuse this layer.
COPY pyproject.toml README.md ./
RUN mkdir -p captioning training app \
    && touch captioning/__init__.py training/__init__.py app/__init__.py \
    && /opt/venv/bin/pip install --no-cache-dir ".${EXTRAS:+[$EXTRAS]}" \
    && /opt/venv/bin/pip uninstall --yes image-captioner
COPY captioning ./captioning
COPY training ./training
COPY app ./app
RUN /opt/venv/bin/pip install --no-cache-dir --no-deps .

FROM python:${PYTHON_VERSION}-slim AS runtime
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    TF_CPP_MIN_LOG_LEVEL=2 \
    TF_ENABLE_ONEDNN_OPTS=0 \
    HOST=0.0.0.0 \
    PORT=8000 \
    ARTIFACTS_DIR=/srv/model_artifacts/default
RUN groupadd --system --gid 10001 captioner \
    && useradd --system --uid 10001 --gid captioner --create-home --home-dir /home/captioner \
       --shell /usr/sbin/nologin captioner
COPY --from=build /opt/venv /opt/venv
# Owned by root and read-only to the service: a compromised process cannot alter the model.
COPY model_artifacts /srv/model_artifacts
WORKDIR /srv
USER 10001:10001
EXPOSE 8000
# No curl in the slim image: the standard library does the probe; HTTP 503 raises, so exit != 0.
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health/ready' % os.environ.get('PORT', '8000'), timeout=4)"]
# uvicorn stops accepting on SIGTERM, finishes in-flight requests (SHUTDOWN_GRACE_S), then exits.
STOPSIGNAL SIGTERM
ENTRYPOINT ["python", "-m", "app"]
