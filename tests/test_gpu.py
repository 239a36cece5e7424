"""The CUDA paths: bf16 autocast in the engine, fp32 quantization under autocast, pruning on the GPU.

Skipped without a CUDA device (conftest marks them); run with `pytest -m gpu` on a GPU machine.
"""

from __future__ import annotations

import pytest
import torch

from mmtok import registries
from mmtok.train.config import load_run_config

pytestmark = pytest.mark.gpu


class _Batches:
    def __init__(self, n: int = 64, batch_size: int = 16):
        g = torch.Generator().manual_seed(0)
        self.images = torch.rand(n, 1, 28, 28, generator=g)
        self.labels = torch.randint(0, 10, (n,), generator=g)
        self.batch_size = batch_size

    def __iter__(self):
        for i in range(0, len(self.labels), self.batch_size):
            yield {"image": self.images[i : i + self.batch_size], "label": self.labels[i : i + self.batch_size]}


def test_engine_trains_with_bf16_autocast_on_cuda(tmp_path):
    from mmtok.train.engine import train

    cfg = load_run_config(
        [],
        [
            "task.name=toy_classifier",
            f"output_dir={tmp_path}",
            "train.steps=8",
            "train.device=cuda",
            "train.progress=false",
            "data.batch_size=16",
        ],
    )
    summary = train(cfg, train_data=_Batches())
    env = (tmp_path / "env.json").read_text()
    assert '"precision": "bf16"' in env and '"device": "cuda' in env
    assert summary["steps"] == 8 and torch.isfinite(torch.tensor(summary["train"]["loss"]))


def test_quantizer_stays_fp32_under_autocast():
    tok = registries.get("tokenizer").create("vq_tiny_f4").cuda().eval()
    x = torch.rand(4, 1, 32, 32, device="cuda") * 2 - 1
    with torch.autocast("cuda", dtype=torch.bfloat16):
        enc = tok.encode(x)
    assert enc.latents.dtype == torch.float32
    torch.testing.assert_close(tok.decode_indices(enc.indices).float(), tok.decode(enc.latents).float())


@pytest.mark.parametrize("method", ["cls_attention", "dart", "fastv"])
def test_pruned_generation_on_cuda_matches_recomputation(method):
    torch.manual_seed(0)
    model = registries.get("mllm").create("llava_tiny_qwen2", image_token_id=120).cuda().eval()
    img = model.config.image_token_id
    ids = torch.tensor([[5, 6, img, 7, 8, 9], [0, 5, img, 7, 8, 10]], device="cuda")
    att = torch.tensor([[1, 1, 1, 1, 1, 1], [0, 1, 1, 1, 1, 1]], device="cuda")
    images = torch.rand(2, 3, model.tower.image_size, model.tower.image_size, device="cuda")
    extra = {} if method == "cls_attention" else {"layer": 1}  # the tiny LLM has 2 layers
    pruner = registries.get("pruner").create(method, num_keep=8, **extra)
    with torch.no_grad():
        cached = model.generate(ids, images, att, pruner=pruner, max_new_tokens=5, min_new_tokens=5)
        plain = model.generate(ids, images, att, pruner=pruner, max_new_tokens=5, min_new_tokens=5, use_cache=False)
    assert torch.equal(cached.sequences, plain.sequences)
    assert cached.image_keep.shape == (2, 8)
