"""Launch commands for several nodes: one ``torchrun`` per node under SLURM, and DeepSpeed hostfiles.

torchrun (``torch.distributed.run``, https://pytorch.org/docs/stable/elastic/run.html) starts the processes of
one node; with ``--nnodes N --node_rank R --master_addr HOST --master_port PORT`` the N torchruns of a job
meet at HOST:PORT and number their processes node by node (static rendezvous). Under SLURM every value comes
from the job's environment: ``SLURM_NNODES``, ``SLURM_NODEID`` (0 on the first node of the allocation) and
the first host of ``SLURM_JOB_NODELIST`` (the shell script asks ``scontrol show hostnames`` for it and exports
``MASTER_ADDR``; without ``scontrol`` this module expands the compressed list itself, e.g. ``node[01-03,07]``).
``tools/slurm.sh`` is the sbatch script: ``srun`` runs ``python -m mmtok.train.launch slurm -- ARGS`` once per
node, which composes the command with :func:`slurm_torchrun_command` and replaces itself with torchrun.

Why static rather than c10d rendezvous: the rank of every process is then a pure function of the node index
and the local rank, so the data split (shards by rank) and the per-rank positions saved in a checkpoint belong
to the same processes after a requeue. The port is derived from the job id (or ``MASTER_PORT``), so two jobs
that share a first node do not collide.

The DeepSpeed launcher does the same over ssh from one node with a hostfile (``host slots=GPUS`` per line):
:func:`hostfile_text` writes one from the SLURM node list (``python -m mmtok.train.launch hostfile``).
"""

from __future__ import annotations

import argparse
import itertools
import os
import re
import shlex
import sys
from collections.abc import Mapping, Sequence

DEFAULT_PORT_BASE = 20000  # MASTER_PORT = base + job id modulo the span (clear of 29500, torchrun's default)
PORT_SPAN = 20000
_BRACKET = re.compile(r"\[([^\[\]]*)\]")


class LaunchError(ValueError):
    """The environment does not describe a launch that can work (the message says what to set)."""


def expand_nodelist(nodelist: str) -> list[str]:
    """Host names of a SLURM node list, in order (what ``scontrol show hostnames`` prints).

    Args:
        nodelist: e.g. ``"node[01-03,07],gpu-a1"`` or ``"rack[1-2]-n[1-2]"``. Numeric ranges keep their zero
            padding (``01-03`` -> ``01, 02, 03``); several bracket groups in one name expand as a product.

    Returns:
        ``["node01", "node02", "node03", "node07", "gpu-a1"]``; duplicates are kept as SLURM would not list them.

    Raises:
        LaunchError: unbalanced brackets, an empty entry or a descending range.
    """
    hosts: list[str] = []
    for name in _split_top_level(nodelist.strip()):
        if not name:
            raise LaunchError(f"empty host name in the node list {nodelist!r}")
        parts = _BRACKET.split(name)  # literal, group, literal, group, ..., literal
        if "[" in "".join(parts[::2]) or "]" in "".join(parts[::2]):
            raise LaunchError(f"unbalanced brackets in the node list entry {name!r}")
        choices = [[p] if i % 2 == 0 else _expand_group(p, name) for i, p in enumerate(parts)]
        hosts.extend("".join(combo) for combo in itertools.product(*choices))
    if not hosts:
        raise LaunchError("the node list is empty")
    return hosts


def _split_top_level(text: str) -> list[str]:
    """Split on commas outside brackets (``a[1,2],b`` -> ``a[1,2]``, ``b``)."""
    out, depth, cur = [], 0, []
    for ch in text:
        depth += ch == "["
        depth -= ch == "]"
        if depth < 0:
            raise LaunchError(f"unbalanced brackets in the node list {text!r}")
        if ch == "," and depth == 0:
            out.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    if depth:
        raise LaunchError(f"unbalanced brackets in the node list {text!r}")
    out.append("".join(cur))
    return out


def _expand_group(group: str, name: str) -> list[str]:
    """``"01-03,07"`` -> ``["01", "02", "03", "07"]`` (zero padding of the lower bound kept)."""
    out = []
    for item in group.split(","):
        lo, sep, hi = item.partition("-")
        if not lo.isdigit() or (sep and not hi.isdigit()):
            raise LaunchError(f"cannot read the range {item!r} in the node list entry {name!r}")
        if not sep:
            out.append(lo)
            continue
        if int(hi) < int(lo):
            raise LaunchError(f"descending range {item!r} in the node list entry {name!r}")
        out.extend(str(i).zfill(len(lo)) for i in range(int(lo), int(hi) + 1))
    return out


def _int_env(env: Mapping[str, str], *names: str) -> int | None:
    for name in names:
        value = env.get(name, "").strip()
        if value:
            try:
                return int(value)
            except ValueError as e:
                raise LaunchError(f"{name}={value!r} is not an integer") from e
    return None


def gpus_per_node(env: Mapping[str, str]) -> int | None:
    """GPUs SLURM gave this node: ``SLURM_GPUS_ON_NODE``, else ``SLURM_GPUS_PER_NODE`` (``4``, ``a100:4``)."""
    on_node = _int_env(env, "SLURM_GPUS_ON_NODE")
    if on_node is not None:
        return on_node
    per_node = env.get("SLURM_GPUS_PER_NODE", "").strip()
    if per_node:
        last = per_node.split(",")[0].split("(")[0].split(":")[-1]  # "gpu:a100:4(IDX:0-3)" -> "4"
        if last.isdigit():
            return int(last)
    return None


def master_addr(env: Mapping[str, str]) -> str:
    """``MASTER_ADDR`` if set (non-empty), else the first host of ``SLURM_JOB_NODELIST`` / ``SLURM_NODELIST``."""
    addr = env.get("MASTER_ADDR", "").strip()
    if addr:
        return addr
    nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if not nodelist:
        raise LaunchError("neither MASTER_ADDR nor SLURM_JOB_NODELIST is set: run inside a SLURM job (sbatch/srun)")
    return expand_nodelist(nodelist)[0]


def master_port(env: Mapping[str, str]) -> int:
    """``MASTER_PORT`` if set, else a port derived from ``SLURM_JOB_ID`` (the same on every node of a job)."""
    port = _int_env(env, "MASTER_PORT")
    if port is not None:
        return port
    job = _int_env(env, "SLURM_JOB_ID", "SLURM_JOBID")
    if job is None:
        raise LaunchError("neither MASTER_PORT nor SLURM_JOB_ID is set: run inside a SLURM job or set MASTER_PORT")
    return DEFAULT_PORT_BASE + job % PORT_SPAN


def with_deepspeed_switch(train_args: Sequence[str]) -> list[str]:
    """``train_args`` plus ``deepspeed.enabled=true`` when they name a ``deepspeed.config`` but no switch."""
    args = list(train_args)
    if any(a.startswith("deepspeed.config=") for a in args) and not any(
        a.startswith("deepspeed.enabled=") for a in args
    ):
        args.append("deepspeed.enabled=true")
    return args


def slurm_torchrun_command(
    env: Mapping[str, str],
    train_args: Sequence[str] = (),
    *,
    nproc_per_node: int | None = None,
    python: str | None = None,
) -> list[str]:
    """The torchrun command one SLURM task (one per node) runs to start this node's training processes.

    Args:
        env: The task's environment (``os.environ`` under ``srun``): ``SLURM_NNODES`` (or
            ``SLURM_JOB_NUM_NODES``), ``SLURM_NODEID``, ``SLURM_JOB_NODELIST`` or ``MASTER_ADDR``,
            ``SLURM_JOB_ID`` or ``MASTER_PORT``; optionally ``NPROC_PER_NODE`` / ``SLURM_GPUS_ON_NODE`` /
            ``SLURM_GPUS_PER_NODE``.
        train_args: What follows ``mmtok train``: ``--config FILE`` and ``key=value`` overrides.
        nproc_per_node: Processes per node; default ``NPROC_PER_NODE``, else the node's GPUs, else 1.
        python: The interpreter (default: this one), so the nodes run the job's virtual environment.

    Returns:
        ``[python, "-m", "torch.distributed.run", "--nnodes", N, "--nproc_per_node", P, "--node_rank", R,
        "--master_addr", HOST, "--master_port", PORT, "-m", "mmtok.train", *train_args]`` (plus
        ``deepspeed.enabled=true`` when a ``deepspeed.config`` is given).

    Raises:
        LaunchError: a variable is missing or inconsistent (node id outside the node count, ...).
    """
    nnodes = _int_env(env, "SLURM_NNODES", "SLURM_JOB_NUM_NODES")
    node_rank = _int_env(env, "SLURM_NODEID")
    if nnodes is None or node_rank is None:
        raise LaunchError(
            "SLURM_NNODES and SLURM_NODEID must be set: start this with srun inside an sbatch job (tools/slurm.sh)"
        )
    if not 0 <= node_rank < nnodes:
        raise LaunchError(f"SLURM_NODEID={node_rank} is outside the job's {nnodes} nodes")
    nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if nodelist and len(expand_nodelist(nodelist)) != nnodes:
        raise LaunchError(
            f"SLURM_JOB_NODELIST={nodelist!r} names {len(expand_nodelist(nodelist))} hosts but SLURM_NNODES={nnodes}"
        )
    nproc = nproc_per_node or _int_env(env, "NPROC_PER_NODE") or gpus_per_node(env) or 1
    if nproc < 1:
        raise LaunchError(f"processes per node must be >= 1, got {nproc}")
    return [
        python or sys.executable,
        "-m",
        "torch.distributed.run",  # = torchrun, with this interpreter
        "--nnodes",
        str(nnodes),
        "--nproc_per_node",
        str(nproc),
        "--node_rank",
        str(node_rank),
        "--master_addr",
        master_addr(env),
        "--master_port",
        str(master_port(env)),
        "-m",
        "mmtok.train",
        *with_deepspeed_switch(train_args),
    ]


def hostfile_text(env: Mapping[str, str], slots: int | None = None) -> str:
    """A DeepSpeed hostfile (``host slots=N`` per line) for the nodes of ``SLURM_JOB_NODELIST``.

    Args:
        env: Needs ``SLURM_JOB_NODELIST`` (or ``SLURM_NODELIST``).
        slots: GPUs per host; default the node's GPUs from the environment, else 1.
    """
    nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if not nodelist:
        raise LaunchError("SLURM_JOB_NODELIST is not set: run inside a SLURM job, or write the hostfile by hand")
    n = slots or gpus_per_node(env) or 1
    return "".join(f"{host} slots={n}\n" for host in expand_nodelist(nodelist))


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m mmtok.train.launch slurm [--nproc-per-node N] [--dry-run] -- ARGS`` or ``... hostfile``."""
    p = argparse.ArgumentParser(prog="python -m mmtok.train.launch", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("slurm", help="run this node's torchrun (one srun task per node)")
    s.add_argument("--nproc-per-node", type=int, default=None)
    s.add_argument("--dry-run", action="store_true", help="print the command instead of running it")
    s.add_argument("train_args", nargs=argparse.REMAINDER, help="-- then the mmtok train arguments")
    h = sub.add_parser("hostfile", help="print a DeepSpeed hostfile for this SLURM job")
    h.add_argument("--slots", type=int, default=None)
    args = p.parse_args(argv)
    try:
        if args.command == "hostfile":
            sys.stdout.write(hostfile_text(os.environ, args.slots))
            return 0
        train_args = args.train_args[1:] if args.train_args[:1] == ["--"] else args.train_args
        cmd = slurm_torchrun_command(os.environ, train_args, nproc_per_node=args.nproc_per_node)
    except LaunchError as e:
        print(f"mmtok launch: {e}", file=sys.stderr)
        return 2
    if args.dry_run:
        print(shlex.join(cmd))
        return 0
    print("mmtok launch: " + shlex.join(cmd), file=sys.stderr, flush=True)  # the job log shows what ran
    os.execv(cmd[0], cmd)  # torchrun takes this task's place: signals from srun reach it directly
    return 0  # pragma: no cover - execv does not return


if __name__ == "__main__":
    sys.exit(main())
