"""``mmtok demo``: launch the Gradio demo (binds 127.0.0.1 unless --host says otherwise)."""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="mmtok demo", description="Launch the Gradio demo.")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--models", default="runs", help="folder with trained models to show")
    args = p.parse_args(argv)
    app = Path(__file__).resolve().parents[2] / "demo" / "app.py"
    if not app.is_file():
        print("mmtok demo: the Gradio demo is not built yet in this version of mmtok.", file=sys.stderr)
        return 2
    spec = importlib.util.spec_from_file_location("mmtok_demo_app", app)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    demo = module.build_demo(models_dir=args.models)
    demo.launch(server_name=args.host, server_port=args.port)
    return 0
