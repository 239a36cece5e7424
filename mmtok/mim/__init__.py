"""Masked image / video modeling: maskers, MAE and VideoMAE, masked token modeling (MaskGIT).

Importing the package registers every MIM model in ``registries.MIM_MODELS``.
"""

from mmtok.mim.vit import ViTConfig, ViTEncoder, cls_attention

__all__ = ["ViTConfig", "ViTEncoder", "cls_attention"]
