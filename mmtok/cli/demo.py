"""``mmtok demo``: launch the Gradio demo over the trained models in a folder.

    mmtok demo                          # models under runs/, http://127.0.0.1:7860
    mmtok demo --models runs --port 7861
    mmtok demo --host 0.0.0.0           # reachable from other machines (off by default)
    mmtok demo --device cuda:0          # models on a GPU (default auto: CUDA if available, else CPU)

The demo lives in ``demo/app.py`` at the repository root (not inside the ``mmtok`` package, and not a package
itself so it never shadows another ``demo`` module); it is loaded by path here.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

APP = Path(__file__).resolve().parents[2] / "demo" / "app.py"


def load_app(path: Path = APP) -> ModuleType:
    """Import ``demo/app.py`` by path (as module ``mmtok_demo_app``)."""
    name = "mmtok_demo_app"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)  # type: ignore[union-attr]
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return module


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="mmtok demo", description="Launch the Gradio demo (offline).")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: this machine only)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--models", default="runs", help="folder searched for trained model folders (config.json)")
    p.add_argument(
        "--device", default="auto", help="auto | cpu | cuda | cuda:N where the models run (auto: CUDA if available)"
    )
    args = p.parse_args(argv)
    if not APP.is_file():
        print(f"mmtok demo: {APP} is missing; the Gradio demo is not part of this checkout.", file=sys.stderr)
        return 2
    try:
        import gradio  # noqa: F401
    except ModuleNotFoundError:
        print("mmtok demo: gradio is not installed; run `pip install -e '.[demo]'` (or `make setup`).", file=sys.stderr)
        return 2
    if not Path(args.models).is_dir():
        print(f"mmtok demo: no folder {args.models!r}; the tabs will say how to train models for it.", file=sys.stderr)
    app = load_app()
    try:
        device = app.resolve_device(args.device)  # before any model is found or loaded
    except app.core.DemoError as e:
        print(f"mmtok demo: {e}", file=sys.stderr)
        return 2
    demo = app.build_demo(models_dir=args.models, device=device)
    print(
        f"mmtok demo: serving the models under {args.models} ({app.device_label(device)}) on "
        f"http://{args.host}:{args.port}",
        flush=True,
    )
    app.launch(demo, args.host, args.port, block=True)
    return 0
