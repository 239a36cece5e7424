"""Masked image / video modeling: maskers, MAE and VideoMAE, masked token modeling (MaskGIT).

Importing the package registers every MIM model in ``registries.MIM_MODELS``. The conversion helpers for
checkpoints from elsewhere (:mod:`mmtok.mim.convert`: transformers ViTMAE folders, official MAE files) load on
first use: ``from mmtok.mim import load_hf_vitmae``.
"""

from __future__ import annotations

from mmtok.lazy import lazy_exports
from mmtok.mim.mae import MAE, MAEConfig, MAEOutput
from mmtok.mim.masking import MaskOutput
from mmtok.mim.mtm import MTM, MTMConfig, MTMOutput
from mmtok.mim.vit import ViTConfig, ViTEncoder, cls_attention

_CONVERT = ("ConversionError", "convert_mae_checkpoint", "load_hf_vitmae", "mask_from_noise")

__all__ = [
    "MAE",
    "MAEConfig",
    "MAEOutput",
    "MTM",
    "MTMConfig",
    "MTMOutput",
    "MaskOutput",
    "ViTConfig",
    "ViTEncoder",
    "cls_attention",
    *_CONVERT,
]
__getattr__, __dir__ = lazy_exports(__name__, dict.fromkeys(_CONVERT, "mmtok.mim.convert"))
