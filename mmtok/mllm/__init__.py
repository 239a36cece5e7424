"""The MLLM (vision tower + projector + HF causal LM), visual-token pruning and text-as-mask segmentation.

``from mmtok.mllm.modeling import MLLM`` (kept lazy so ``import mmtok.mllm`` stays cheap).
"""
