#!/usr/bin/env bash
# Launch `mmtok train` on N processes per node with the DeepSpeed launcher (the line people know).
#   tools/launch.sh 2 configs/toy/fmnist_classifier.yaml deepspeed.config=configs/ds/zero2.json [key=value ...]
# Without a GPU it runs N CPU processes over gloo (DS_ACCELERATOR=cpu). Set LAUNCHER=torchrun for torchrun
# (plain DDP unless deepspeed.enabled=true or deepspeed.config is given). Extra launcher flags: LAUNCH_ARGS.
# Several nodes:
#   DeepSpeed: HOSTFILE=hostfile tools/launch.sh 8 CONFIG ...   (run once, on the first host; "host slots=8" per
#     line, passwordless ssh + pdsh; MASTER_ADDR defaults to this host; env for the nodes goes in ./.deepspeed_env)
#   torchrun:  NNODES=2 NODE_RANK=R MASTER_ADDR=HOST LAUNCHER=torchrun tools/launch.sh 8 CONFIG ...   (run on
#     every node, R = 0 on HOST; MASTER_PORT must then be set to the same value on every node)
#   SLURM:     sbatch tools/slurm.sh CONFIG ...
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: $0 NPROC CONFIG.yaml [key=value ...]" >&2
  exit 2
fi
nproc=$1; config=$2; shift 2
bin=$(dirname "$(readlink -f "$0")")/../.venv/bin
[ -x "$bin/python" ] || bin=$(dirname "$(command -v python)")
if ! command -v nvidia-smi >/dev/null 2>&1; then
  export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
fi
nnodes=${NNODES:-1}
if [ "$nnodes" -gt 1 ] && [ -z "${MASTER_PORT:-}" ]; then
  echo "$0: NNODES=$nnodes needs MASTER_PORT, the same on every node" >&2
  exit 2
fi
port=${MASTER_PORT:-$((29500 + RANDOM % 1000))}
extra=()
for a in "$@"; do
  case $a in deepspeed.config=*) extra+=("deepspeed.enabled=true") ;; esac
done
if [ "${LAUNCHER:-deepspeed}" = torchrun ]; then
  nodes=()
  if [ "$nnodes" -gt 1 ]; then
    nodes=(--nnodes "$nnodes" --node_rank "${NODE_RANK:?set NODE_RANK (0 on MASTER_ADDR)}"
      --master_addr "${MASTER_ADDR:?set MASTER_ADDR to the host of node rank 0}")
  fi
  exec "$bin/torchrun" "${nodes[@]}" --nproc_per_node "$nproc" --master_port "$port" ${LAUNCH_ARGS:-} \
    -m mmtok.train --config "$config" "$@" "${extra[@]}"
fi
hosts=()
if [ -n "${HOSTFILE:-}" ]; then
  hosts=(--hostfile "$HOSTFILE" --master_addr "${MASTER_ADDR:-$(hostname)}")
fi
exec "$bin/deepspeed" "${hosts[@]}" --num_gpus "$nproc" --master_port "$port" ${LAUNCH_ARGS:-} --module mmtok.train \
  --config "$config" "$@" "${extra[@]}"
