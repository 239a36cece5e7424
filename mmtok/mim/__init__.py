"""Masked image / video modeling: maskers, MAE and VideoMAE, masked token modeling (MaskGIT).

Importing the package registers every MIM model in ``registries.MIM_MODELS``.
"""

from mmtok.mim.mae import MAE, MAEConfig, MAEOutput
from mmtok.mim.mtm import MTM, MTMConfig, MTMOutput
from mmtok.mim.vit import ViTConfig, ViTEncoder, cls_attention

__all__ = ["MAE", "MAEConfig", "MAEOutput", "MTM", "MTMConfig", "MTMOutput", "ViTConfig", "ViTEncoder", "cls_attention"]
