#!/usr/bin/env bash
# Train on several nodes under SLURM: one srun task per node, each running torchrun for that node's GPUs.
#   sbatch tools/slurm.sh CONFIG.yaml [key=value ...]
#   sbatch --nodes 4 --gpus-per-node 8 tools/slurm.sh configs/mllm/llava_stage2_lora.yaml \
#       deepspeed.config=configs/ds/zero2.json output_dir=runs/llava_lora
# The rendezvous is the first host of the allocation (scontrol show hostnames "$SLURM_JOB_NODELIST"), on a port
# derived from the job id; the torchrun command is composed by mmtok/train/launch.py (slurm_torchrun_command).
# A requeued or resubmitted job resumes from the newest checkpoint in output_dir (--resume auto), also with
# another number of nodes or GPUs: see "Scaling out" in the README.
# Environment: PYTHON (default .venv/bin/python of the submit folder), NPROC_PER_NODE (default: GPUs of the node),
# MASTER_PORT (default: from the job id).
#SBATCH --job-name=mmtok
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --time=24:00:00
#SBATCH --requeue
#SBATCH --output=slurm-%x-%j.out
set -euo pipefail
if [ $# -lt 1 ]; then
  echo "usage: sbatch $0 CONFIG.yaml [key=value ...]" >&2
  exit 2
fi
config=$1; shift
cd "${SLURM_SUBMIT_DIR:-$(pwd)}"
python=${PYTHON:-.venv/bin/python}
[ -x "$python" ] || python=$(command -v python3)
if [ -z "${MASTER_ADDR:-}" ] && command -v scontrol >/dev/null 2>&1; then
  MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
fi
# Without scontrol, launch.py expands SLURM_JOB_NODELIST itself (node[01-03,07] -> node01 ...).
export MASTER_ADDR=${MASTER_ADDR:-}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}
# One task per node; --kill-on-bad-exit ends every node when one fails instead of leaving them in a collective.
exec srun --ntasks-per-node=1 --kill-on-bad-exit=1 "$python" -m mmtok.train.launch slurm -- \
  --config "$config" --resume auto "$@"
