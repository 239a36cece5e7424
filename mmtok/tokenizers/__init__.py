"""Visual tokenizers: quantizers, grid (VQ) and 1D (TiTok, PCA-1D) tokenizers, 2D BPE over code grids.

Importing the package registers every tokenizer in ``mmtok.registries.TOKENIZERS`` and every quantizer
in ``QUANTIZERS``::

    from mmtok import registries
    tok = registries.get("tokenizer").create("vq_small_f4")
    enc = tok.encode(images * 2 - 1)          # images in [0, 1] -> model range [-1, 1]
    recon = tok.decode_indices(enc.indices)
"""

from mmtok.tokenizers import pca1d, quantizers, titok, vq  # noqa: F401  (registration side effect)
from mmtok.tokenizers.base import (
    BaseTokenizer,
    TokenizerEncoding,
    TokenizerOutput,
    to_model_range,
    to_unit_range,
)
from mmtok.tokenizers.bpe import BPEVocab, ImageTokenLayout, train_bpe

__all__ = [
    "BaseTokenizer",
    "BPEVocab",
    "ImageTokenLayout",
    "TokenizerEncoding",
    "TokenizerOutput",
    "to_model_range",
    "to_unit_range",
    "train_bpe",
]
