"""mmtok: a multimodal masked-token vision-language toolkit.

Visual tokenizers (VQ, TiTok-style 1D, PCA-style ordered 1D, 2D BPE over codes), masked image and
video modeling, an MLLM that segments by writing masks as text, and training-free visual token
pruning, with one training engine (plain torch or DeepSpeed ZeRO) over WebDataset shards.

Importing ``mmtok`` has no side effects and imports nothing heavy; use the subpackages.
"""

__version__ = "0.1.0"
