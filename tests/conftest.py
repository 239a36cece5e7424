"""Shared test fixtures. Tests run on the CPU with tiny configs; GPU tests skip without CUDA."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

FMNIST_DIR = "/usr/share/datasets/fashion-mnist"


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    yield


@pytest.fixture
def fmnist_dir():
    if not os.path.isdir(FMNIST_DIR):
        pytest.fail(f"{FMNIST_DIR} is missing: run `make setup` (installs the Debian package dataset-fashion-mnist)")
    return FMNIST_DIR
