#!/usr/bin/env bash
# Launch `mmtok train` on N processes of this machine with the DeepSpeed launcher (the line people know).
#   tools/launch.sh 2 configs/toy/fmnist_classifier.yaml deepspeed.config=configs/ds/zero2.json [key=value ...]
# Without a GPU it runs N CPU processes over gloo (DS_ACCELERATOR=cpu). Set LAUNCHER=torchrun for torchrun
# (plain DDP unless deepspeed.enabled=true or deepspeed.config is given). Extra launcher flags: LAUNCH_ARGS.
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
port=${MASTER_PORT:-$((29500 + RANDOM % 1000))}
extra=()
for a in "$@"; do
  case $a in deepspeed.config=*) extra+=("deepspeed.enabled=true") ;; esac
done
if [ "${LAUNCHER:-deepspeed}" = torchrun ]; then
  exec "$bin/torchrun" --nproc_per_node "$nproc" --master_port "$port" ${LAUNCH_ARGS:-} -m mmtok.train \
    --config "$config" "$@" "${extra[@]}"
fi
exec "$bin/deepspeed" --num_gpus "$nproc" --master_port "$port" ${LAUNCH_ARGS:-} --module mmtok.train \
  --config "$config" "$@" "${extra[@]}"
