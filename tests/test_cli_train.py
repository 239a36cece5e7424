"""`mmtok train` and `mmtok list` as a user meets them: bad input is one line and exit status 2, written
before anything touches the disk; a wall-clock budget ends a run cleanly; kinds are named as the README
names them.

The commands run in-process through ``mmtok.cli.main.main``, the function behind the ``mmtok`` script.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from mmtok import registries
from mmtok.cli.main import main as mmtok
from mmtok.registry import Registry

BASE = ["task.name=toy_classifier", "task.width=8", "data.train=shards/train-*.tar", "train.progress=false"]


def _bad_inputs(tmp: Path) -> dict[str, tuple[list[str], str]]:
    """``id -> (arguments after "train", text the error must contain)``; files they need are made here."""
    (tmp / "a_file").write_text("not a folder\n")
    (tmp / "list.yaml").write_text("- task\n- data\n")
    (tmp / "ds16.json").write_text('{"train_micro_batch_size_per_gpu": 16, "zero_optimization": {"stage": 2}}')
    (tmp / "ds_bad.json").write_text('{"zero_optimization": ')
    (tmp / "ds3.json").write_text('{"zero_optimization": {"stage": 3}}')
    run = f"output_dir={tmp / 'run'}"
    return {
        "negative_batch": ([*BASE, run, "data.batch_size=-4"], "data.batch_size must be >= 1"),
        "zero_steps": ([*BASE, run, "train.steps=0"], "train.steps must be >= 1"),
        "negative_lr": ([*BASE, run, "optim.lr=-0.001"], "optim.lr must be"),
        "bad_precision": ([*BASE, run, "train.precision=fp8"], "train.precision must be one of"),
        "cuda_without_gpu": ([*BASE, run, "train.device=cuda"], "CUDA is not available"),
        "output_is_a_file": ([*BASE, f"output_dir={tmp / 'a_file'}"], "is a file, not a folder"),
        "output_below_a_file": ([*BASE, f"output_dir={tmp / 'a_file' / 'run'}"], "which is a file"),
        "yaml_top_level_list": (["--config", str(tmp / "list.yaml"), *BASE, run], "list.yaml: the top level"),
        "negative_shuffle_buffer": ([*BASE, run, "data.shuffle_buffer=-1"], "data.shuffle_buffer must be >= 0"),
        "negative_workers": ([*BASE, run, "data.num_workers=-1"], "data.num_workers must be >= 0"),
        "unknown_image_mode": ([*BASE, run, "data.image_mode=CMYK"], "data.image_mode must be one of"),
        "missing_ds_config_ds_off": ([*BASE, run, f"deepspeed.config={tmp / 'nope.json'}"], "nope.json does not exist"),
        "missing_ds_config_ds_on": (
            [*BASE, run, f"deepspeed.config={tmp / 'nope.json'}", "deepspeed.enabled=true", "train.device=cpu"],
            "nope.json does not exist",
        ),
        "ds_config_not_json": ([*BASE, run, f"deepspeed.config={tmp / 'ds_bad.json'}"], "is not valid JSON"),
        "ds_config_contradicts_run": (
            [*BASE, run, f"deepspeed.config={tmp / 'ds16.json'}", "deepspeed.enabled=true", "data.batch_size=8"],
            "train_micro_batch_size_per_gpu=16",
        ),
        "negative_budget": ([*BASE, run, "train.max_seconds=-5"], "train.max_seconds must be >= 0"),
        "ema_decay_one": ([*BASE, run, "train.ema_decay=1.0"], "train.ema_decay must be in [0, 1)"),
        "ema_under_zero3": (
            [*BASE, run, f"deepspeed.config={tmp / 'ds3.json'}", "deepspeed.enabled=true", "train.ema_decay=0.99"],
            "ZeRO-3 partitions",
        ),
        "misspelled_key": ([*BASE, run, "train.stepz=3"], "'steps'"),
    }


CASES = [
    "negative_batch",
    "zero_steps",
    "negative_lr",
    "bad_precision",
    "cuda_without_gpu",
    "output_is_a_file",
    "output_below_a_file",
    "yaml_top_level_list",
    "negative_shuffle_buffer",
    "negative_workers",
    "unknown_image_mode",
    "missing_ds_config_ds_off",
    "missing_ds_config_ds_on",
    "ds_config_not_json",
    "ds_config_contradicts_run",
    "negative_budget",
    "ema_decay_one",
    "ema_under_zero3",
    "misspelled_key",
]


@pytest.mark.parametrize("case", CASES)
def test_train_rejects_bad_input_in_one_line_before_writing(case, tmp_path, monkeypatch, capsys):
    if case == "cuda_without_gpu" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    monkeypatch.chdir(tmp_path)
    args, expected = _bad_inputs(tmp_path)[case]
    before = sorted(p.name for p in tmp_path.iterdir())
    assert mmtok(["train", *args]) == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("mmtok train: "), err
    assert expected in lines[0]
    assert "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no run folder, nothing else either
    assert (tmp_path / "a_file").read_text() == "not a folder\n"
    assert not torch.distributed.is_initialized()  # rejected before any process group


def test_misspelled_key_is_suggested_once(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert mmtok(["train", *BASE, "train.stepz=3"]) == 2
    assert capsys.readouterr().err.lower().count("did you mean") == 1


@pytest.fixture(scope="module")
def toy_shards(tmp_path_factory):
    from mmtok.data.sources.fashion_mnist import FashionMNISTShardsConfig, build_fashion_mnist

    if not os.path.isdir("/usr/share/datasets/fashion-mnist"):
        pytest.fail("Fashion-MNIST is missing: run `make setup` (Debian package dataset-fashion-mnist)")
    out = tmp_path_factory.mktemp("fmnist")
    build_fashion_mnist(FashionMNISTShardsConfig(out=str(out), limit=64, maxcount=32))
    return out


def test_train_budget_through_the_cli(toy_shards, tmp_path, monkeypatch, capsys, caplog):
    # No output_dir: the command picks runs/<task name> under the current folder and says so.
    monkeypatch.chdir(tmp_path)
    args = [
        "train",
        "task.name=toy_classifier",
        f"data.train={toy_shards}/train-*.tar",
        f"data.val={toy_shards}/test-*.tar",
        "data.batch_size=8",
        "data.num_workers=0",
        "data.shuffle_buffer=16",
        "task.width=8",
        "train.steps=500",
        "train.max_seconds=1e-6",  # spent during the first step
        "train.reference_steps=400",  # the recipe's figures came from 400 steps: 1 step warns
        "train.eval_batches=2",
        "train.progress=false",
        "train.tensorboard=false",
        "train.device=cpu",
    ]
    assert mmtok(args) == 0
    captured = capsys.readouterr()
    assert "writing to runs/toy_classifier" in captured.err
    run = tmp_path / "runs" / "toy_classifier"
    summary = json.loads((run / "run_summary.json").read_text())
    assert summary["stopped_by"] == "max_seconds" and summary["steps"] == 1 and summary["planned_steps"] == 500
    assert summary["eval"] and (run / "export" / "model.safetensors").is_file()
    assert json.loads(captured.out)["stopped_by"] == "max_seconds"
    assert summary["reference_steps"] == 400
    warned = [r.getMessage() for r in caplog.records if "published figures" in r.getMessage()]
    assert len(warned) == 1 and "made 1 steps" in warned[0] and "train.steps=400" in warned[0]


# -- mmtok list ------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["tokenizers", "tokenizer", "seg-formats", "seg_formats", "Vision-Towers", "tasks"])
def test_list_accepts_readme_kind_names(kind, capsys):
    assert mmtok(["list", kind]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == kind.lower().replace("_", "-").rstrip("s") + "s:"
    assert len(out) > 1 and all(line.startswith("  ") for line in out[1:])


def test_list_unknown_kind_is_one_line(capsys):
    assert mmtok(["list", "tokenizr"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Did you mean 'tokenizers'?" in err


def test_list_leaves_out_empty_kinds(monkeypatch, capsys):
    monkeypatch.setitem(registries._BY_KIND, "gadget", Registry("gadget"))  # a kind nothing fills
    assert mmtok(["list"]) == 0
    out = capsys.readouterr().out.splitlines()
    headers = [i for i, line in enumerate(out) if not line.startswith("  ")]
    assert "gadgets:" not in out and "tokenizers:" in out
    assert all(j + 1 < len(out) and out[j + 1].startswith("  ") for j in headers)  # every kind shown has entries
    assert mmtok(["list", "gadgets"]) == 0
    assert capsys.readouterr().out.strip() == "gadgets: none registered in this installation"
