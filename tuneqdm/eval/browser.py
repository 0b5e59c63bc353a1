"""Open a report in headless Chromium: console errors, broken images and a screenshot of the top of the page.

Uses Playwright driving a Chromium already on the machine (Debian's ``chromium``, or ``TUNEQDM_CHROMIUM``); neither is
a dependency of tuneqdm, only of ``tuneqdm report --screenshot`` and of the tests that check the page.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from ..errors import TuneQDMError
from ..files import first_line

# Chromium in a sandbox without network: no background fetches, no GPU, no first-run UI
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run", "--disable-quic"]
BROKEN_IMAGES = "Array.from(document.images).filter(i => !i.complete || i.naturalWidth === 0).length"


def chromium_executable() -> str | None:
    """``TUNEQDM_CHROMIUM``, else a chromium on PATH, else None (Playwright's own download, if any)."""
    return os.environ.get("TUNEQDM_CHROMIUM") or next(
        (p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)


def open_in_chromium(page: Path, screenshot: Path | None = None, width: int = 1400, height: int = 1600) -> list[str]:
    """Load ``page`` and return its problems (console errors, uncaught exceptions, broken images); optionally save a
    ``width`` x ``height`` screenshot of its top."""
    try:
        from playwright.sync_api import Error, sync_playwright
    except ImportError:
        raise TuneQDMError("the browser check needs Playwright and Chromium: pip install playwright, "
                           "then apt install chromium (or set TUNEQDM_CHROMIUM to a Chromium binary)") from None
    problems: list[str] = []
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium_executable(), args=ARGS)
            try:
                tab = browser.new_page(viewport={"width": width, "height": height})
                tab.on("console", lambda m: problems.append(f"console {m.type}: {m.text}")
                       if m.type in ("error", "warning") else None)
                tab.on("pageerror", lambda e: problems.append(f"page error: {e}"))
                tab.goto(Path(page).resolve().as_uri(), wait_until="load")
                broken = tab.evaluate(BROKEN_IMAGES)
                if broken:
                    problems.append(f"{broken} image(s) failed to load")
                if screenshot is not None:
                    tab.screenshot(path=str(screenshot))
            finally:
                browser.close()
    except Error as e:
        raise TuneQDMError(f"Chromium could not open {page}: {first_line(e, None)} (set TUNEQDM_CHROMIUM to a Chromium binary)") \
            from None
    return problems
