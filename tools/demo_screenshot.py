"""Screenshot every tab of the Gradio demo in headless Chromium (after running each tab once), then exit.

    python tools/demo_screenshot.py --models runs --out runs/demo_screenshots

Starts the demo on 127.0.0.1 (a free port), opens it in Debian's headless Chromium (``/usr/bin/chromium``
with ``/usr/bin/chromedriver``; never downloaded), and for each tab that has a model presses its button,
waits for the outputs, and saves ``<out>/<n>_<tab>.png``. A tab without a model is captured as it is (it
shows the training command). Exit status 0 when every screenshot was written, 2 when no browser is installed.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # `mmtok` from this checkout even when it is not installed

from mmtok.cli.demo import load_app  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="runs", help="folder with trained model folders")
    p.add_argument("--out", default="runs/demo_screenshots", help="folder for the PNG files")
    p.add_argument("--width", type=int, default=1400)
    p.add_argument("--height", type=int, default=1100)
    p.add_argument("--timeout", type=float, default=300, help="seconds to wait for one tab's outputs")
    args = p.parse_args()

    app = load_app()
    browser_mod = app.load_sibling("browser")
    reason = browser_mod.missing_browser()
    if reason:
        print(f"demo_screenshot: cannot take screenshots: {reason}", file=sys.stderr)
        return 2
    core = app.core
    demo = app.build_demo(models_dir=args.models)
    found = demo.mmtok_app.models
    port = browser_mod.free_port()
    app.launch(demo, "127.0.0.1", port, block=False, quiet=True)
    out = Path(args.out)
    shots: list[Path] = []
    t0 = time.time()
    try:
        with browser_mod.Browser(args.width, args.height) as b:
            b.open(f"http://127.0.0.1:{port}/")
            # (tab title, kind, button, an output image that appears when the tab has run, file name)
            tabs = [
                ("Tokenizer", core.TOKENIZER, "tok-run", "tok-recon", "1_tokenizer.png"),
                ("Masked modeling", core.MIM, "mim-run", "mim-recon", "2_masked_modeling.png"),
                ("MLLM + pruning", core.MLLM_KIND, "mllm-run", "mllm-overlay", "3_mllm_pruning.png"),
                ("Segment", core.SEG, "seg-run", "seg-overlay", "4_segment.png"),
            ]
            for title, kind, button, output, name in tabs:
                b.click_tab(title)
                if found[kind]:
                    b.click(button)
                    b.wait_image(output, timeout=args.timeout)
                    time.sleep(0.5)  # let the markdown next to the images settle
                    b.driver.execute_script("window.scrollTo(0, 0)")  # pressing the button scrolled the page
                shots.append(b.screenshot(out / name))
                print(f"{title}: {shots[-1]}", flush=True)
    finally:
        demo.close()
    print(f"{len(shots)} screenshots in {out} ({time.time() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
