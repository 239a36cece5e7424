"""Shared test fixtures. Tests run on the CPU with tiny configs; GPU tests skip without CUDA."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

# Hypothesis keeps its example database and caches (charmap, constants) under $HYPOTHESIS_STORAGE_DIRECTORY, else
# ./.hypothesis: point it at a temporary folder (removed at exit) before any test imports hypothesis, so the suite
# writes nothing into the repo. An explicit setting from the environment is respected.
if "HYPOTHESIS_STORAGE_DIRECTORY" not in os.environ:
    _HYPOTHESIS_DIR = tempfile.mkdtemp(prefix="mmtok-hypothesis-")
    os.environ["HYPOTHESIS_STORAGE_DIRECTORY"] = _HYPOTHESIS_DIR
    atexit.register(shutil.rmtree, _HYPOTHESIS_DIR, ignore_errors=True)

import pytest  # noqa: E402 - after the environment above
import torch  # noqa: E402

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


@pytest.fixture(scope="session")
def fmnist_shards(tmp_path_factory):
    """Fashion-MNIST shards of the first 480 images per split, 120 per shard (4 training shards: whole shards for
    2 processes x 2 workers). Shared by the engine tests, which only read it (their runs write elsewhere)."""
    from mmtok.data.sources.fashion_mnist import FashionMNISTShardsConfig, build_fashion_mnist

    if not os.path.isdir(FMNIST_DIR):
        pytest.fail(f"{FMNIST_DIR} is missing: run `make setup` (installs the Debian package dataset-fashion-mnist)")
    out = tmp_path_factory.mktemp("fmnist_480")
    build_fashion_mnist(FashionMNISTShardsConfig(out=str(out), limit=480, maxcount=120))
    return out


@pytest.fixture(scope="session")
def seg_scenes(tmp_path_factory):
    """fashion-scenes shards, 32 px canvases (32 train / 8 val / 8 test, 8 per shard), read-only for the tests."""
    from mmtok.data.sources.scenes import FashionScenesConfig, build_fashion_scenes

    out = tmp_path_factory.mktemp("scenes32")
    build_fashion_scenes(FashionScenesConfig(out=str(out), train=32, val=8, test=8, canvas=32, maxcount=8))
    return out
