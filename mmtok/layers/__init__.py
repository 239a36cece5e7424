"""Shared building blocks (position embeddings, patch embeds) used by MIM, tokenizers and the MLLM.

The API here is stable: other packages import it.
"""

from mmtok.layers.patch_embed import PatchEmbed, patchify, unpatchify
from mmtok.layers.pos_embed import grid_pos_embed, sincos_1d, sincos_2d, sincos_3d

__all__ = ["PatchEmbed", "grid_pos_embed", "patchify", "sincos_1d", "sincos_2d", "sincos_3d", "unpatchify"]
