#!/usr/bin/env bash
# The prepared GPU check (run it on a machine with CUDA, e.g. the device tool's; under 8 minutes on one GPU):
# the GPU tests, the CUDA mode of the benchmarks that have one (segmentation heads, recipe training speed,
# visual-token pruning at LLaVA-1.5-7B's shape), and a DeepSpeed ZeRO-3 training step on NCCL.
# Figures land in $OUT (default gpu_results/); record them in the README with the card's name.
#   bash tools/gpu_checks.sh
#   STEPS="recipes prune" bash tools/gpu_checks.sh     # a subset: tests seg zero3 recipes prune (default: all)
#
# A GPU machine that lacks some of mmtok's dependencies (or Fashion-MNIST): prepare them here first,
#   bash tools/gpu_checks.sh --prepare [PYTHON_VERSION]     # e.g. 3.12, the GPU machine's Python
# which puts wheels for the missing packages (DeepSpeed built here as a pure-Python wheel) and the Fashion-MNIST
# files into .whl/ (git-ignored); carry .whl there and the run installs them into /tmp/site first.
set -uo pipefail
cd "$(dirname "$0")/.."
if [[ "${1:-}" == "--prepare" ]]; then
  pyver=${2:-3.12}
  here=${PY:-.venv/bin/python}
  mkdir -p .whl/fmnist
  plats=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
  # not in a stock CUDA/PyTorch image (which has torch, timm, transformers, peft, numpy, scikit-*, pytest, ...)
  for pkg in webdataset==1.0.2 braceexpand omegaconf==2.4.0 open_clip_torch==3.3.0 ftfy wcwidth \
    vector-quantize-pytorch==1.32.0 einx torch-einops-utils frozendict loguru hjson pydantic pydantic_core \
    annotated-types typing-inspection typing_extensions pycocotools; do
    $here -m pip download -q --no-deps --only-binary=:all: --python-version "$pyver" --implementation cp \
      "${plats[@]}" -d .whl "$pkg" || exit 1
  done
  ls .whl/deepspeed-*.whl > /dev/null 2>&1 ||
    DS_BUILD_OPS=0 $here -m pip wheel -q --no-deps --no-build-isolation "deepspeed==$($here -c \
      'import deepspeed; print(deepspeed.__version__)')" -w .whl || exit 1
  cp -n /usr/share/datasets/fashion-mnist/*.gz .whl/fmnist/
  du -sh .whl
  exit 0
fi
PY=${PY:-.venv/bin/python}
[[ -x "$PY" ]] || PY=python3
OUT=${OUT:-gpu_results}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
mkdir -p "$OUT"
status=0
STEPS=${STEPS:-tests seg zero3 recipes prune}
want() { [[ " $STEPS " == *" $1 "* ]]; }
step() {
  echo "== $1"
  shift
  local t0=$SECONDS
  "$@" || { echo "!! failed: $*"; status=1; }
  echo "   ($((SECONDS - t0)) s)"
}

if ! $PY -c "import deepspeed, webdataset, omegaconf, open_clip, vector_quantize_pytorch" 2> /dev/null &&
  ls .whl/*.whl > /dev/null 2>&1; then  # carried wheels (see --prepare)
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl ||
    exit 1
  export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
if [[ ! -d /usr/share/datasets/fashion-mnist && -d .whl/fmnist ]]; then
  mkdir -p /usr/share/datasets/fashion-mnist && cp .whl/fmnist/*.gz /usr/share/datasets/fashion-mnist/
fi
if ! $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_checks: no CUDA device here; run this on a GPU machine" >&2
  exit 2
fi
$PY -c "import torch; print(torch.__version__, torch.cuda.get_device_name())" | tee "$OUT/device.txt"
nvidia-smi >> "$OUT/device.txt" 2>&1 || true

# 1. every test marked gpu (bf16 engine run, fp32 quantizer under autocast, pruned cached generation on CUDA)
want tests && step "GPU tests" $PY -m pytest -q -p no:cacheprovider -m gpu tests --junitxml "$OUT/pytest_gpu.xml"

# 2. benchmarks with a CUDA mode (the others are CPU benchmarks for now; pruning runs last, in 5.)
want seg && step "segmentation heads on CUDA" $PY tools/bench/seg.py --device cuda --repeats 5 --json "$OUT/seg_cuda.json"

# 3. a DeepSpeed ZeRO-3 run of the toy recipe on one GPU (NCCL), bf16
if want zero3; then
  data=$(mktemp -d)
  step "Fashion-MNIST shards" $PY -m mmtok.cli.main shards fashion-mnist --out "$data/fmnist" limit=4000
  step "DeepSpeed ZeRO-3 step" $PY -m mmtok.cli.main train --config configs/toy/fmnist_classifier.yaml \
    deepspeed.enabled=true deepspeed.config=configs/ds/zero3.json "data.train=$data/fmnist/train-*.tar" \
    "data.val=$data/fmnist/test-*.tar" train.steps=50 train.eval_every=0 output_dir="$data/zero3_toy"
  cp "$data/zero3_toy/metrics.jsonl" "$OUT/zero3_metrics.jsonl" 2> /dev/null
  rm -rf "$data"
fi

# 4. the recipes' training speed on this card (20 s of training each, small shards built here)
want recipes && step "recipe training speed on CUDA" timeout 420 $PY tools/bench/recipes.py --device cuda --seconds 20 \
  --json "$OUT/recipes_cuda.json"

# 5. the longest: pruning at 7B shape (bounded, so a slow card still leaves the figures above)
want prune && step "visual-token pruning at LLaVA-1.5-7B shape on CUDA" timeout 300 $PY tools/bench/prune.py --device cuda \
  --preset llava7b --batches 1 8 --keeps 576 192 64 --methods none random cls_attention fastv dart pitome --repeats 3 \
  --new-tokens 16 --tower-merge --json "$OUT/prune_cuda.json"
exit $status
