"""mmtok: a multimodal masked-token vision-language toolkit.

Visual tokenizers (VQ, TiTok-style 1D, PCA-style ordered 1D, 2D BPE over codes), masked image and
video modeling, an MLLM that segments by writing masks as text, and training-free visual token
pruning, with one training engine (plain torch or DeepSpeed ZeRO) over WebDataset shards.

Importing ``mmtok`` has no side effects and imports nothing heavy. The one-line entry points of
:mod:`mmtok.api` are reachable from here and load on first use::

    import mmtok
    model = mmtok.load_mllm("runs/quickstart/mllm_fashion_vqa/export")
    print(model.answer(image, "how many items are there ?", prune="dart", keep=64).text)

The main classes live in their packages: ``from mmtok.mllm import MLLM``, ``from mmtok.mim import MAE``,
``from mmtok.tokenizers import BaseTokenizer``.
"""

from __future__ import annotations

from mmtok.lazy import lazy_exports

__version__ = "0.1.0"

_API = ("load_tokenizer", "load_encoder", "load_mllm", "load_image")

__all__ = ["__version__", *_API]
__getattr__, __dir__ = lazy_exports(__name__, dict.fromkeys(_API, "mmtok.api"))
