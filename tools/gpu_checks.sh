#!/usr/bin/env bash
# The prepared GPU check (run it on a machine with CUDA, e.g. the device tool's; under 8 minutes on one GPU):
# the GPU tests, the CUDA mode of the benchmarks that have one, and a DeepSpeed ZeRO-3 training step on NCCL.
# Figures land in $OUT (default gpu_results/); record them in the README with the card's name.
#   bash tools/gpu_checks.sh
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-gpu_results}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
mkdir -p "$OUT"
status=0
step() { echo "== $1"; shift; "$@" || { echo "!! failed: $*"; status=1; }; }

if ! $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_checks: no CUDA device here; run this on a GPU machine" >&2
  exit 2
fi
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true
$PY -c "import torch; print(torch.__version__, torch.cuda.get_device_name())" | tee "$OUT/device.txt"

# 1. every test marked gpu (bf16 engine run, fp32 quantizer under autocast, pruned cached generation on CUDA)
step "GPU tests" $PY -m pytest -q -p no:cacheprovider -m gpu tests --junitxml "$OUT/pytest_gpu.xml"

# 2. benchmarks with a CUDA mode (the others are CPU benchmarks for now)
step "segmentation heads on CUDA" $PY tools/bench/seg.py --device cuda --repeats 5 --json "$OUT/seg_cuda.json"

# 3. a DeepSpeed ZeRO-3 run of the toy recipe on one GPU (NCCL), bf16
data=$(mktemp -d)
step "Fashion-MNIST shards" $PY -m mmtok.cli.main shards fashion-mnist --out "$data/fmnist" limit=4000
step "DeepSpeed ZeRO-3 step" $PY -m mmtok.cli.main train --config configs/toy/fmnist_classifier.yaml \
  deepspeed.enabled=true deepspeed.config=configs/ds/zero3.json "data.train=$data/fmnist/train-*.tar" \
  "data.val=$data/fmnist/test-*.tar" train.steps=50 train.eval_every=0 output_dir="$OUT/zero3_toy"
rm -rf "$data"
exit $status
