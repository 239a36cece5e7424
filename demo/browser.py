"""Drive the demo in Debian's headless Chromium through Selenium (the browser test and the screenshot tool).

Only the system's ``/usr/bin/chromium`` and ``/usr/bin/chromedriver`` are used (``apt-get install chromium
chromium-driver``). The driver path is given to Selenium's ``ChromeService``, which makes Selenium skip its
Selenium Manager (the component that would otherwise look for, and download, a browser and a driver), and
Chromium runs with its background networking off, so a run never touches the network.
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
CHROME_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-dev-shm-usage",  # small /dev/shm in containers crashes tabs otherwise
)


def missing_browser() -> str:
    """Why the headless browser cannot run here ("" when it can)."""
    for path, pkg in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if not os.access(path, os.X_OK):
            return f"{path} is missing (Debian package {pkg}; `make setup` installs it)"
    try:
        import selenium  # noqa: F401
    except ModuleNotFoundError:
        return "selenium is not installed (pip install -e '.[dev]')"
    return ""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Browser:
    """A headless Chromium session with its own throw-away profile folder.

    Args:
        width, height: Window size (screenshots have this size).
        profile_dir: ``--user-data-dir``; a temporary folder (removed on close) when None.
    """

    def __init__(self, width: int = 1400, height: int = 1100, profile_dir: str | os.PathLike | None = None):
        from selenium import webdriver

        reason = missing_browser()
        if reason:
            raise RuntimeError(f"headless browser unavailable: {reason}")
        self._own_profile = profile_dir is None
        self.profile_dir = Path(profile_dir or tempfile.mkdtemp(prefix="mmtok-chromium-"))
        options = webdriver.ChromeOptions()
        options.binary_location = CHROMIUM
        for flag in CHROME_FLAGS:
            options.add_argument(flag)
        options.add_argument(f"--user-data-dir={self.profile_dir}")
        options.add_argument(f"--window-size={width},{height}")
        service = webdriver.ChromeService(executable_path=CHROMEDRIVER)
        self.driver = webdriver.Chrome(service=service, options=options)
        self.driver.set_page_load_timeout(60)

    def open(self, url: str, ready_text: str = "mmtok demo", timeout: float = 60) -> None:
        """Load ``url`` and wait until the Gradio app has rendered ``ready_text``."""
        self.driver.get(url)
        self.wait(lambda d: ready_text in d.find_element("tag name", "body").text, timeout, f"page text {ready_text!r}")

    def wait(self, condition: Callable[[Any], Any], timeout: float = 60, what: str = "condition") -> Any:
        """Poll ``condition(driver)`` until it returns something truthy (exceptions count as not yet)."""
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            try:
                value = condition(self.driver)
                if value:
                    return value
            except Exception as e:  # element not there yet, stale after a re-render, ...
                last = e
            time.sleep(0.25)
        raise TimeoutError(
            f"timed out after {timeout:.0f} s waiting for {what}" + (f" (last error: {last})" if last else "")
        )

    def css(self, selector: str) -> list[Any]:
        return self.driver.find_elements("css selector", selector)

    def click_tab(self, title: str, timeout: float = 30) -> None:
        """Click the tab button whose text is ``title``."""

        def find(d):
            for b in d.find_elements("css selector", "button[role='tab']"):
                if b.text.strip() == title and b.is_displayed():
                    return b
            return None

        self.wait(find, timeout, f"tab {title!r}").click()
        self.wait(
            lambda d: any(
                b.get_attribute("aria-selected") == "true" and b.text.strip() == title
                for b in d.find_elements("css selector", "button[role='tab']")
            ),
            timeout,
            f"tab {title!r} selected",
        )

    def click(self, elem_id: str, timeout: float = 30) -> None:
        """Click the button with Gradio ``elem_id``."""
        self.wait(
            lambda d: (lambda e: e if e.is_displayed() and e.is_enabled() else None)(d.find_element("id", elem_id)),
            timeout,
            f"#{elem_id}",
        ).click()

    def image_src(self, elem_id: str) -> str:
        """The ``src`` of the image shown by the ``gr.Image`` with ``elem_id`` ("" when empty)."""
        imgs = self.css(f"#{elem_id} img")
        for img in imgs:
            loaded = self.driver.execute_script("return arguments[0].complete && arguments[0].naturalWidth", img)
            if loaded and img.get_attribute("src"):
                return img.get_attribute("src")
        return ""

    def wait_image(self, elem_id: str, timeout: float = 120, previous: str = "") -> str:
        """Wait until ``#elem_id`` shows a loaded image different from ``previous``; returns its ``src``."""
        return self.wait(
            lambda d: (lambda s: s if s and s != previous else "")(self.image_src(elem_id)),
            timeout,
            f"an image in #{elem_id}",
        )

    def text(self, elem_id: str) -> str:
        els = self.css(f"#{elem_id}")
        return els[0].text if els else ""

    def wait_text(self, elem_id: str, needle: str, timeout: float = 120) -> str:
        """Wait until the text of ``#elem_id`` contains ``needle``; returns the text."""
        return self.wait(
            lambda d: (lambda t: t if needle in t else "")(self.text(elem_id)), timeout, f"{needle!r} in #{elem_id}"
        )

    def screenshot(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.driver.save_screenshot(str(path))
        return path

    def close(self) -> None:
        try:
            self.driver.quit()
        finally:
            if self._own_profile:
                shutil.rmtree(self.profile_dir, ignore_errors=True)

    def __enter__(self) -> Browser:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
