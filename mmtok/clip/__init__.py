"""Contrastive image-text pretraining (CLIP) on the fashion scenes, with open_clip's own model and loss.

Radford et al., "Learning Transferable Visual Models From Natural Language Supervision" (arXiv:2103.00020);
reference implementations openai/CLIP and mlfoundations/open_clip (the one used here, as a library). The image
tower can drop half of its patches while training, as FLIP does (Li et al., "Scaling Language-Image Pre-training
via Masking", arXiv:2212.00794; open_clip's ``patch_dropout``).

What mmtok adds around open_clip (the model classes ``open_clip.CLIP`` / ``CLIPVisionCfg`` / ``CLIPTextCfg`` and
``open_clip.loss.ClipLoss`` are used as they are, never re-implemented):

* :mod:`mmtok.clip.captions`: captions written from the scenes' item metadata and a word-level tokenizer;
* :mod:`mmtok.clip.tasks`: the ``clip`` task of ``mmtok train`` and its export as an open_clip hub folder, which
  the MLLM loads as its vision tower (``tower: {name: open_clip, checkpoint: DIR}``);
* :mod:`mmtok.clip.evaluate`: ``mmtok eval clip`` (retrieval recall@1/5, zero-shot Fashion-MNIST).
"""

from __future__ import annotations

from mmtok.lazy import lazy_exports

_LAZY = {
    "caption": "mmtok.clip.captions",
    "CaptionTokenizer": "mmtok.clip.captions",
    "ClipTask": "mmtok.clip.tasks",
    "ClipTaskConfig": "mmtok.clip.tasks",
    "load_clip_folder": "mmtok.clip.tasks",
}

__all__ = list(_LAZY)
__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
