"""A real headless Chromium for the dashboard tests (the `browser` fixture), and waits on the page."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile

import pytest

from harness.waiting import wait_for

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
CHROME_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-dev-shm-usage", "--window-size=1440,1200", "--hide-scrollbars"]  # fmt: skip


@contextlib.contextmanager
def chromium():
    """A selenium driver of headless Chromium with a fresh profile; skips the test where it cannot run."""
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install -e '.[dev]')")
    from selenium.webdriver.chrome.service import Service

    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        pytest.skip("Chromium or chromedriver is not installed (apt-get install chromium chromium-driver)")
    profile = tempfile.mkdtemp(prefix="modtrack-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in [*CHROME_FLAGS, f"--user-data-dir={profile}"]:
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    try:
        driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    except Exception as exc:  # a container without what Chromium needs to start
        shutil.rmtree(profile, ignore_errors=True)
        pytest.skip(f"Chromium cannot start here: {exc}")
    try:
        driver.set_page_load_timeout(30)
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def wait_js(driver, script: str, timeout: float = 60.0, what: str = ""):
    """Poll a JS expression until it is truthy; its value (fails at the deadline)."""
    return wait_for(lambda: driver.execute_script("return " + script), timeout, what or script, interval=0.25)


def console_errors(driver) -> list[dict]:
    return [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
