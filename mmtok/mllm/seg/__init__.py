"""Text-as-mask segmentation with an MLLM: mask formats, heads, metrics, tasks, evaluation.

Importing this package registers the formats (``SEG_FORMATS``) and heads (``SEG_HEADS``).
"""

from importlib import import_module

for _name in ("formats", "heads"):
    try:
        import_module(f"{__name__}.{_name}")
    except ModuleNotFoundError as _e:  # a part still being written: the rest keeps working
        if _e.name != f"{__name__}.{_name}":
            raise
