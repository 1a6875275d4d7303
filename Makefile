# One command each: `make serve` serves the default model, `make test` runs the test suite.
# Both create .venv and install what they need on a fresh machine.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
export TF_ENABLE_ONEDNN_OPTS := 0
export TF_CPP_MIN_LOG_LEVEL := 2

.PHONY: install install-dev serve test train-default evaluate-default train-shapeworld bench bench-peers clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(VENV)/.runtime: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e .
	touch $@

$(VENV)/.dev: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $@ $(VENV)/.runtime

install: $(VENV)/.runtime
install-dev: $(VENV)/.dev

serve: $(VENV)/.runtime
	$(BIN)/python -m app

test: $(VENV)/.dev
	$(BIN)/python -m pytest

# Reproduces the committed default model, evaluates it on the test split and records the metrics.
train-default: $(VENV)/.dev
	$(BIN)/python -m training train --preset default --output model_artifacts/default --fresh \
		--evaluate-split test

evaluate-default: $(VENV)/.dev
	$(BIN)/python -m training evaluate --artifacts model_artifacts/default --dataset shapes --split test \
		--output docs/default-model-metrics.json --gallery docs/default-model-gallery.html --update-manifest

# The external ShapeWorld benchmark (needs ../shared/datasets/shapeworld).
SHAPEWORLD ?= ../shared/datasets/shapeworld
train-shapeworld: $(VENV)/.dev
	$(BIN)/python -m training train --preset shapeworld --dataset coco \
		--data annotations_file=$(SHAPEWORLD)/train/captions_train.json --data images_dir=$(SHAPEWORLD)/train/images \
		--val-data annotations_file=$(SHAPEWORLD)/val/captions_val.json --val-data images_dir=$(SHAPEWORLD)/val/images \
		--output model_artifacts/shapeworld --run-dir runs/shapeworld --evaluate-split val

bench: $(VENV)/.dev
	$(BIN)/python -m bench.load_test

# This service against LitServe and PyTriton (optional; their own virtualenv, as PyTriton 0.7.0
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
