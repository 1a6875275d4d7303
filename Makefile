# One command each: `make serve` serves the default model, `make test` runs the test suite.
# Both create .venv and install what they need on a fresh machine.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
export TF_CPP_MIN_LOG_LEVEL := 2

.PHONY: install install-dev serve test test-fast lint train-default evaluate-default evaluate-default-large train-shapeworld scst-shapeworld bench bench-attack bench-soak bench-peers container-test lock clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# The HTTP stack (uvicorn with its parser, event loop and WebSocket library, Starlette, FastAPI) at
# the container's locked versions (deploy/requirements-serve.txt): app/http_protocol.py subclasses
# uvicorn's protocol, so the tests must run on what ships. The rest floats, so that other Pythons
# than the image's 3.11 still resolve. (pip takes no extras in a constraints file.)
HTTP_STACK := uvicorn|httptools|h11|uvloop|websockets|starlette|fastapi|python-multipart
$(VENV)/constraints.txt: deploy/requirements-serve.txt | $(BIN)/python
	grep -E '^($(HTTP_STACK))(\[|==)' $< | sed 's/\[[a-z,]*\]//' > $@

$(VENV)/.runtime: pyproject.toml $(VENV)/constraints.txt | $(BIN)/python
	$(BIN)/pip install --quiet -c $(VENV)/constraints.txt -e .
	touch $@

$(VENV)/.dev: pyproject.toml $(VENV)/constraints.txt | $(BIN)/python
	$(BIN)/pip install --quiet -c $(VENV)/constraints.txt -e ".[dev]"
	touch $@ $(VENV)/.runtime

install: $(VENV)/.runtime
install-dev: $(VENV)/.dev

serve: $(VENV)/.runtime
	$(BIN)/python -m app

# Two worker processes (pytest-xdist): on this project's 2-core machine the suite took 280 and 324 s
# so, against 437 s in one process, measured one after another. `pytest -n 0` runs it in one process.
test: $(VENV)/.dev
	$(BIN)/python -m pytest -n 2

# The layers one at a time: unit (model core, engine, policies, manifests; under a minute), training,
# service (the app in-process), e2e (real servers, Chromium, Prometheus, fresh processes).
test-fast: $(VENV)/.dev
	$(BIN)/python -m pytest tests/unit

# Style and layering: ruff (lint + format) and the import contracts in pyproject.toml.
lint: $(VENV)/.dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports --no-cache

# Reproduces the committed default model (docs/MODEL.md): teacher-forced training on the wide-domain
# shapes data, self-critical fine-tuning, confidence calibration and the out-of-domain detector,
# then the evaluation. DEFAULT_BUNDLE is the one place the Makefile names it.
DEFAULT_BUNDLE ?= model_artifacts/default/7
train-default: $(VENV)/.dev
	$(BIN)/python -m training train --preset default --data small_corner=0.5 --output runs/default/trained \
		--run-dir runs/default --fresh
	$(BIN)/python -m training finetune-scst --artifacts runs/default/trained --output $(DEFAULT_BUNDLE) \
		--dataset shapes_wide --train-limit 8000 --grounded-weight 1.0 --data small_corner=0.5
	$(BIN)/python -m training fit-object-reader --artifacts $(DEFAULT_BUNDLE) --data small_corner=0.5 \
		--data jpeg_quality=15-95
	$(BIN)/python -m training calibrate --artifacts $(DEFAULT_BUNDLE) --dataset shapes_wide --split val
	$(BIN)/python -m training fit-domain --artifacts $(DEFAULT_BUNDLE) --dataset shapes_wide
	$(MAKE) evaluate-default

evaluate-default: $(VENV)/.dev
	$(BIN)/python -m training evaluate --artifacts $(DEFAULT_BUNDLE) --dataset shapes_wide --split test \
		--output docs/default-model-metrics.json --gallery docs/default-model-gallery.html --update-manifest
	$(BIN)/python -m training evaluate-wild --artifacts $(DEFAULT_BUNDLE) --output docs/default-model-wild.json
	$(BIN)/python -m training evaluate-wild --artifacts $(DEFAULT_BUNDLE) --grounded \
		--output docs/default-model-wild-grounded.json

# The grounded report on 5000 pictures a variation no run, fit or choice has seen (wild indices
# 10000-14999): the precise figure for each variation (+-0.6 points); about 20 minutes.
evaluate-default-large: $(VENV)/.dev
	$(BIN)/python -m training evaluate-wild --artifacts $(DEFAULT_BUNDLE) --grounded \
		--per-variation 5000 --first 10000 --output docs/default-model-wild-grounded-5000.json

# The external ShapeWorld benchmark (needs ../shared/datasets/shapeworld).
SHAPEWORLD ?= ../shared/datasets/shapeworld
train-shapeworld: $(VENV)/.dev
	$(BIN)/python -m training train --preset shapeworld --dataset coco \
		--data annotations_file=$(SHAPEWORLD)/train/captions_train.json --data images_dir=$(SHAPEWORLD)/train/images \
		--val-data annotations_file=$(SHAPEWORLD)/val/captions_val.json --val-data images_dir=$(SHAPEWORLD)/val/images \
		--output model_artifacts/shapeworld/7 --run-dir runs/shapeworld --evaluate-split val

# Self-critical fine-tuning of the ShapeWorld bundle for CIDEr-D (docs/MODEL.md), then its evaluation.
scst-shapeworld: $(VENV)/.dev
	$(BIN)/python -m training finetune-scst --artifacts model_artifacts/shapeworld/7 --output model_artifacts/shapeworld/8 \
		--dataset coco --data annotations_file=$(SHAPEWORLD)/train/captions_train.json \
		--data images_dir=$(SHAPEWORLD)/train/images --steps 600 --batch-size 32 --learning-rate 5e-5 --only-better
	$(BIN)/python -m training evaluate --artifacts model_artifacts/shapeworld/8 --dataset coco --split val \
		--annotations-file $(SHAPEWORLD)/val/captions_val.json --images-dir $(SHAPEWORLD)/val/images \
		--output runs/shapeworld-scst-val.json --update-manifest

bench: $(VENV)/.dev
	$(BIN)/python -m bench.load_test

# Builds the serving image with podman and runs it and the compose stack (root, Debian; docs/DEPLOY.md).
container-test:
	bash deploy/container-test.sh

# Re-pins the image's dependencies (deploy/requirements-serve.txt) after a pyproject.toml change.
lock: $(VENV)/.dev
	PYTHON=$(BIN)/python bash deploy/lock.sh

# Hostile clients against the real server (docs/HARDENING.md); writes bench/ATTACK.md.
bench-attack: $(VENV)/.dev
	$(BIN)/python -m bench.attack --write bench/ATTACK.md

# A long run of mixed traffic (users, bad requests, vanishing clients): memory, descriptors,
# answers (docs/HARDENING.md); writes bench/SOAK.md.
bench-soak: $(VENV)/.dev
	$(BIN)/python -m bench.soak --minutes 15 --write bench/SOAK.md

# This service against LitServe, PyTriton and Ray Serve (optional; their own virtualenv, as PyTriton 0.7.0
# needs numpy<2). Writes bench/PEERS.md.
PEERS_VENV := bench/.peers-venv
$(PEERS_VENV)/.installed: bench/peers-requirements.txt
	$(PYTHON) -m venv $(PEERS_VENV)
	$(PEERS_VENV)/bin/pip install --quiet -r bench/peers-requirements.txt
	touch $@

bench-peers: $(VENV)/.dev $(PEERS_VENV)/.installed
	$(BIN)/python -m bench.peers --peers-python $(PEERS_VENV)/bin/python

clean:
	rm -rf $(VENV) runs .pytest_cache
