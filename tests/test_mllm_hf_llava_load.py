"""Loading a transformers LLaVA folder never unpickles: a folder with only ``pytorch_model.bin`` is refused with
a message that names the file and a conversion command, and that command (run here) makes a loadable folder."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from mmtok.hub import CheckpointError
from mmtok.mllm.modeling import MLLM

IMAGE_TOKEN = 60


def _save_tiny_llava(folder) -> None:
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    vision = CLIPVisionConfig(
        image_size=16, patch_size=8, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2
    )
    text = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        vocab_size=64,
        max_position_embeddings=64,
        pad_token_id=0,
        eos_token_id=2,
    )
    cfg = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=IMAGE_TOKEN,
        image_seq_length=4,
        vision_feature_layer=-2,
    )
    torch.manual_seed(0)
    LlavaForConditionalGeneration(cfg).save_pretrained(folder)


def _logits(model: MLLM) -> torch.Tensor:
    ids = torch.tensor([[5, 6] + [IMAGE_TOKEN] * 4 + [7, 8, 9]])
    with torch.no_grad():
        return model.eval()(ids, pixel_values=torch.linspace(-1, 1, 3 * 16 * 16).reshape(1, 3, 16, 16)).logits


def test_pickled_only_folder_is_refused_and_the_suggested_conversion_works(tmp_path):
    safe = tmp_path / "safe"
    _save_tiny_llava(safe)
    assert (safe / "model.safetensors").is_file()
    reference = _logits(MLLM.from_pretrained(safe))

    # The same model as the only weights file a folder holds: pytorch_model.bin (a pickle).
    binned = tmp_path / "binned"
    shutil.copytree(safe, binned)
    torch.save(load_file(str(binned / "model.safetensors")), binned / "pytorch_model.bin")
    (binned / "model.safetensors").unlink()
    (binned / "training_args.bin").write_bytes(b"not weights")  # trainer leftovers are not named as weights
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin.*safetensors only.*weights_only=True") as e:
        MLLM.from_pretrained(binned)
    message = str(e.value)
    assert "training_args" not in message

    # The message's one-liner, run by the user on a file they trust, gives a folder that loads identically.
    code = re.search(r'python -c "(.*)"$', message).group(1)
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
    assert (binned / "model.safetensors").is_file()
    torch.testing.assert_close(_logits(MLLM.from_pretrained(binned)), reference, rtol=0, atol=0)


def test_sharded_pickles_get_the_transformers_route(tmp_path):
    folder = tmp_path / "sharded"
    _save_tiny_llava(folder)
    (folder / "model.safetensors").unlink()
    for name in ("pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin"):
        (folder / name).write_bytes(b"\x80\x04N.")  # never opened: refused by name
    (folder / "pytorch_model.bin.index.json").write_text("{}")
    with pytest.raises(CheckpointError, match=r"pytorch_model-00001-of-00002\.bin.*save_pretrained"):
        MLLM.from_pretrained(folder)
    for p in folder.glob("pytorch_model*"):
        p.unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        MLLM.from_pretrained(folder)
