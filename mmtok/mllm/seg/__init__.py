"""Segmentation with an MLLM: mask formats, heads, metrics, refinement, tasks, evaluation.

Importing this package registers the formats (``SEG_FORMATS``) and heads (``SEG_HEADS``); the ``mllm_seg`` task
registers from :mod:`mmtok.mllm.seg.tasks`.
"""

from mmtok.mllm.seg import formats, heads  # noqa: F401  (registration)
