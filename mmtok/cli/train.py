"""``mmtok train --config a.yaml [--config b.yaml] key=value ...``

The command itself belongs to the training engine (:mod:`mmtok.train.__main__`, also reached as
``python -m mmtok.train`` under launchers); this module only hands it to the ``mmtok`` dispatcher.
"""

from __future__ import annotations

from mmtok.train.__main__ import build_parser, main

__all__ = ["build_parser", "main"]
