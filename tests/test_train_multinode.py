"""Several nodes on one machine, and the SLURM launch recipe.

Two "nodes" are two torchrun processes on 127.0.0.1 (``--nnodes 2 --nproc_per_node 1 --node_rank R
--rdzv_endpoint 127.0.0.1:PORT``, gloo): the toy recipe under DDP and under DeepSpeed ZeRO-2 trains past one
epoch with ``train.log_keys=true``, and the keys the ranks logged for epoch 0 are every training sample exactly
once (split over nodes x processes x DataLoader workers: 2 x 1 x 2 = 4 consumers reading one shard each, and
2 x 1 x 3 = 6 consumers splitting 4 shards sample by sample). DeepSpeed's launcher with a two-host hostfile
runs as two nodes with ``--no_ssh --node_rank R`` (the pdsh/ssh fan-out from one host needs real hosts).
``tools/slurm.sh`` runs end to end with an
``srun`` stand-in that starts its command once per node with the variables SLURM sets; the command composition
(:func:`mmtok.train.launch.slurm_torchrun_command`) is tested against SLURM environments directly.
"""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from launching import child_env, free_port

from mmtok.train import checkpoint as ckpt
from mmtok.train.launch import (
    LaunchError,
    expand_nodelist,
    gpus_per_node,
    hostfile_text,
    slurm_torchrun_command,
)

REPO = Path(__file__).resolve().parents[1]
TOY = REPO / "configs" / "toy" / "fmnist_classifier.yaml"
BIN = Path(sys.executable).parent


# -- command composition (no processes) ---------------------------------------------------------------------
@pytest.mark.parametrize(
    ("nodelist", "hosts"),
    [
        ("node[01-03,07]", ["node01", "node02", "node03", "node07"]),
        ("gpu-a1", ["gpu-a1"]),
        ("a[1-2],b7,c[009-011]", ["a1", "a2", "b7", "c009", "c010", "c011"]),
        ("rack[1-2]-n[1,3]", ["rack1-n1", "rack1-n3", "rack2-n1", "rack2-n3"]),
        ("n[8-10]", ["n8", "n9", "n10"]),
    ],
)
def test_expand_nodelist(nodelist, hosts):
    assert expand_nodelist(nodelist) == hosts


@pytest.mark.parametrize("bad", ["node[01-03", "node01]", "node[3-1]", "node[a-b]", "a,,b", ""])
def test_expand_nodelist_rejects(bad):
    with pytest.raises(LaunchError):
        expand_nodelist(bad)


def _slurm_env(**extra: str) -> dict[str, str]:
    env = {"SLURM_JOB_ID": "4242", "SLURM_NNODES": "3", "SLURM_NODEID": "2", "SLURM_JOB_NODELIST": "node[01-02,07]"}
    return env | extra


def test_slurm_torchrun_command_from_environment():
    cmd = slurm_torchrun_command(
        _slurm_env(SLURM_GPUS_ON_NODE="4"), ["--config", "c.yaml", "deepspeed.config=configs/ds/zero2.json"]
    )
    flags = dict(zip(cmd[3:13:2], cmd[4:14:2]))
    assert cmd[:3] == [sys.executable, "-m", "torch.distributed.run"]
    assert flags == {
        "--nnodes": "3",
        "--nproc_per_node": "4",
        "--node_rank": "2",
        "--master_addr": "node01",  # the first host of the allocation, on every node
        "--master_port": str(20000 + 4242),
    }
    assert cmd[13:] == [
        "-m",
        "mmtok.train",
        "--config",
        "c.yaml",
        "deepspeed.config=configs/ds/zero2.json",
        "deepspeed.enabled=true",
    ]


def test_slurm_torchrun_command_precedence():
    env = _slurm_env(
        MASTER_ADDR="10.0.0.5", MASTER_PORT="30000", SLURM_GPUS_PER_NODE="a100:8", SLURM_NODEID="0", NPROC_PER_NODE=""
    )
    cmd = slurm_torchrun_command(env, ["deepspeed.config=x.json", "deepspeed.enabled=false"], python="/py")
    flags = dict(zip(cmd[3:13:2], cmd[4:14:2]))
    assert cmd[0] == "/py" and flags["--master_addr"] == "10.0.0.5" and flags["--master_port"] == "30000"
    assert flags["--nproc_per_node"] == "8" and flags["--node_rank"] == "0"
    assert cmd[-2:] == ["deepspeed.config=x.json", "deepspeed.enabled=false"]  # an explicit switch is kept
    assert slurm_torchrun_command(env | {"NPROC_PER_NODE": "2"})[6] == "2"
    assert slurm_torchrun_command(env, nproc_per_node=3)[6] == "3"
    no_gpus = {k: v for k, v in env.items() if "GPUS" not in k}
    assert slurm_torchrun_command(no_gpus)[6] == "1"
    assert gpus_per_node({"SLURM_GPUS_PER_NODE": "gpu:h100:4(IDX:0-3)"}) == 4


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"SLURM_NODEID": None}, "SLURM_NNODES and SLURM_NODEID"),
        ({"SLURM_NODEID": "3"}, "outside the job's 3 nodes"),
        ({"SLURM_NNODES": "2", "SLURM_NODEID": "1"}, "names 3 hosts but SLURM_NNODES=2"),
        ({"SLURM_JOB_ID": None}, "MASTER_PORT nor SLURM_JOB_ID"),
        ({"SLURM_JOB_NODELIST": None}, "MASTER_ADDR nor SLURM_JOB_NODELIST"),
        ({"SLURM_NNODES": "three"}, "not an integer"),
    ],
)
def test_slurm_torchrun_command_errors(change, match):
    env = _slurm_env()
    for k, v in change.items():
        if v is None:
            env.pop(k)
        else:
            env[k] = v
    with pytest.raises(LaunchError, match=match):
        slurm_torchrun_command(env)


def test_hostfile_and_cli_dry_run():
    assert hostfile_text(_slurm_env(), slots=8) == "node01 slots=8\nnode02 slots=8\nnode07 slots=8\n"
    env = {**os.environ, **_slurm_env(SLURM_GPUS_ON_NODE="2")}
    res = subprocess.run(
        [sys.executable, "-m", "mmtok.train.launch", "slurm", "--dry-run", "--", "--config", "c.yaml", "a=1"],
        env=env,
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.split()[-4:] == ["mmtok.train", "--config", "c.yaml", "a=1"]
    assert "--node_rank 2" in res.stdout and "--master_addr node01" in res.stdout
    env.pop("SLURM_NODEID")
    res = subprocess.run(
        [sys.executable, "-m", "mmtok.train.launch", "slurm", "--", "--config", "c.yaml"],
        env=env,
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
    )
    assert res.returncode == 2 and "SLURM_NODEID" in res.stderr


# -- two nodes on this machine ------------------------------------------------------------------------------
def _train_args(shards: Path, out: Path, steps: int, workers: int) -> list[str]:
    return [
        "--config",
        str(TOY),
        f"data.train={shards}/train-*.tar",
        f"data.val={shards}/test-*.tar",
        f"output_dir={out}",
        "data.batch_size=16",
        f"data.num_workers={workers}",
        "data.shuffle_buffer=64",
        "task.width=8",
        f"train.steps={steps}",
        "train.eval_every=0",
        "train.eval_batches=2",
        "train.progress=false",
        "train.device=cpu",
        "train.log_every=4",
        "train.log_keys=true",
    ]


def _run_nodes(cmds: list[list[str]]) -> None:
    """Start one command per node at once and wait for all; every node must succeed."""
    procs = [
        subprocess.Popen(cmd, env=child_env(), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for cmd in cmds
    ]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=400)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for rank, (p, log) in enumerate(zip(procs, logs)):
        assert p.returncode == 0, f"node {rank}:\n{log[-4000:]}"


def _two_nodes(args: list[str]) -> None:
    """Node 0 and node 1 as two torchruns meeting at 127.0.0.1 (static rendezvous, gloo)."""
    port = free_port()
    rdzv = ["--nnodes", "2", "--nproc_per_node", "1", "--rdzv_endpoint", f"127.0.0.1:{port}"]
    _run_nodes([[str(BIN / "torchrun"), *rdzv, "--node_rank", str(r), "-m", "mmtok.train", *args] for r in (0, 1)])


def _shard_keys(shards: Path) -> list[str]:
    keys = []
    for shard in sorted(shards.glob("train-*.tar")):
        with tarfile.open(shard) as tf:
            keys += sorted({m.name.split(".", 1)[0] for m in tf.getmembers() if m.isfile()})
    return keys


def _logged_keys(out: Path, epoch: int) -> collections.Counter:
    """Keys every rank logged for ``epoch``; also checks that each rank logged whole epochs in order."""
    seen: collections.Counter = collections.Counter()
    files = sorted((out / "keys").glob("rank-*.jsonl"))
    assert [f.name for f in files] == ["rank-00000.jsonl", "rank-00001.jsonl"]
    for f in files:
        lines = [json.loads(line) for line in f.read_text().splitlines()]
        assert [d["epoch"] for d in lines] == sorted(d["epoch"] for d in lines)
        assert lines[-1]["epoch"] > epoch, f"{f.name}: the run ended inside epoch {epoch}; train longer"
        for d in lines:
            if d["epoch"] == epoch:
                seen.update(d["keys"])
    return seen


def _assert_one_epoch_exactly(shards: Path, out: Path) -> None:
    expected = _shard_keys(shards)
    assert len(expected) == 480
    seen = _logged_keys(out, epoch=0)
    repeated = [k for k, n in seen.items() if n > 1]
    missing = sorted(set(expected) - set(seen))
    assert not repeated, f"{len(repeated)} samples seen twice in epoch 0, e.g. {repeated[:5]}"
    assert not missing, f"{len(missing)} samples never seen in epoch 0, e.g. {missing[:5]}"
    assert set(seen) == set(expected)


@pytest.mark.slow
def test_two_nodes_ddp_split_is_disjoint_and_complete(fmnist_shards, tmp_path):
    # 2 nodes x 1 process x 2 workers = 4 consumers for 4 shards; 8 batches (7 x 16 + 8) per consumer,
    # so an epoch is 16 steps per rank.
    out = tmp_path / "ddp"
    _two_nodes(_train_args(fmnist_shards, out, steps=18, workers=2))
    env = json.loads((out / "env.json").read_text())
    assert env["backend"] == "ddp" and env["world_size"] == 2
    state = ckpt.read_state(ckpt.find_latest(out / "checkpoints"))
    assert state["world_size"] == 2 and [r["data"]["rank"] for r in state["ranks"]] == [0, 1]
    _assert_one_epoch_exactly(fmnist_shards, out)


@pytest.mark.slow
@pytest.mark.deepspeed
def test_two_nodes_deepspeed_zero2_sample_level_split(fmnist_shards, tmp_path):
    pytest.importorskip("deepspeed")
    # 2 nodes x 1 process x 3 workers = 6 consumers for 4 shards: each consumer keeps every 6th sample of
    # every shard (80 samples, 5 batches), so an epoch is 15 steps per rank.
    out = tmp_path / "zero2"
    _two_nodes(
        [
            *_train_args(fmnist_shards, out, steps=16, workers=3),
            f"deepspeed.config={REPO}/configs/ds/zero2.json",
            "deepspeed.enabled=true",
        ]
    )
    env = json.loads((out / "env.json").read_text())
    assert env["backend"] == "deepspeed" and env["world_size"] == 2
    assert json.loads((out / "ds_config.json").read_text())["zero_optimization"]["stage"] == 2
    _assert_one_epoch_exactly(fmnist_shards, out)


@pytest.mark.slow
def test_slurm_script_runs_two_nodes(fmnist_shards, tmp_path):
    """tools/slurm.sh under an ``srun`` stand-in that starts the command once per node, as SLURM does, with
    the per-node variables set; no ``scontrol`` on PATH, so launch.py expands the node list itself."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    srun = bin_dir / "srun"
    srun.write_text(
        "#!/usr/bin/env bash\n"
        "# stand-in for srun --ntasks-per-node=1: one task per node of the allocation, SLURM_NODEID set\n"
        'while [ "${1#-}" != "$1" ]; do shift; done\n'
        'for node in $(seq 0 $((SLURM_NNODES - 1))); do SLURM_NODEID=$node SLURM_PROCID=$node "$@" & done\n'
        "status=0; for job in $(jobs -p); do wait $job || status=1; done; exit $status\n"
    )
    srun.chmod(0o755)
    out = tmp_path / "slurm"
    env = child_env()
    env.update(
        PATH=f"{bin_dir}:/usr/bin:/bin",
        PYTHON=sys.executable,
        SLURM_JOB_ID=str(free_port()),  # the port is derived from the job id
        SLURM_NNODES="2",
        SLURM_JOB_NODELIST="localhost,127.0.0.1",
        SLURM_SUBMIT_DIR=str(REPO),
        NPROC_PER_NODE="1",
    )
    env["MASTER_PORT"] = str(free_port())
    args = _train_args(fmnist_shards, out, steps=3, workers=0)
    res = subprocess.run(
        ["bash", str(REPO / "tools" / "slurm.sh"), args[1], *args[2:]],
        env=env,
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=400,
    )
    assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]
    assert res.stderr.count("--master_addr localhost") == 2  # both nodes meet at the first host
    assert "--node_rank 0" in res.stderr and "--node_rank 1" in res.stderr
    env_json = json.loads((out / "env.json").read_text())
    assert env_json["world_size"] == 2 and env_json["backend"] == "ddp"
    assert json.loads((out / "run_summary.json").read_text())["steps"] == 3


@pytest.mark.slow
@pytest.mark.deepspeed
def test_deepspeed_hostfile_two_nodes_without_ssh(fmnist_shards, tmp_path):
    """DeepSpeed's launcher with a hostfile of two hosts; ``--no_ssh --node_rank R`` starts each node's part
    where it runs (here both on this machine) instead of over pdsh/ssh from the first host."""
    pytest.importorskip("deepspeed")
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=1\n127.0.0.1 slots=1\n")
    out = tmp_path / "ds_hostfile"
    port = str(free_port())
    args = [
        *_train_args(fmnist_shards, out, steps=3, workers=0),
        f"deepspeed.config={REPO}/configs/ds/zero2.json",
        "deepspeed.enabled=true",
    ]
    launcher = [str(BIN / "deepspeed"), "--hostfile", str(hostfile), "--no_ssh", "--master_addr", "127.0.0.1"]
    launcher += ["--master_port", port]
    _run_nodes([[*launcher, "--node_rank", str(r), "--module", "mmtok.train", *args] for r in (0, 1)])
    env = json.loads((out / "env.json").read_text())
    assert env["backend"] == "deepspeed" and env["world_size"] == 2
    keys = [f.name for f in sorted((out / "keys").glob("rank-*.jsonl"))]
    assert keys == ["rank-00000.jsonl", "rank-00001.jsonl"]  # one process on each "node"
