"""A real browser for the console's tests: Debian's headless Chromium
(`chromium`, `chromium-driver`; `make tools` installs them) driven by
Selenium, with both paths given so Selenium never downloads anything. A
missing browser fails the test that needs it, never skips it.

Also the page's stable hooks read in one script each (the page redraws
every 2 s, so element handles go stale; a script reads a consistent
snapshot), bounded waits, the checks that the page logged no error and
loaded nothing from another origin, and where screenshots go.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal, TypeVar

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.chrome.webdriver import WebDriver

T = TypeVar("T")

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
WINDOW = "1400,1500"  # wide enough for the member table, tall enough for the whole page in one screenshot
ARGUMENTS = (
    "--headless=new",
    "--no-sandbox",  # the tests run as root, where Chromium's sandbox cannot start
    "--disable-gpu",
    "--disable-dev-shm-usage",
    # No traffic of its own: the resource check sees only what the page loads.
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    f"--window-size={WINDOW}",
)
PAGE_LOAD_TIMEOUT_S = 20.0
REPO = Path(__file__).resolve().parents[2]
# Screenshots land here (git-ignored); KVSTORE_CONSOLE_SHOTS moves them (CI keeps the directory as an artifact).
SHOTS = Path(os.environ.get("KVSTORE_CONSOLE_SHOTS") or REPO / "test-results" / "console")

READ_PAGE = """
const verdict = document.querySelector('#verdict');
const lookup = document.querySelector('#lookup');
return {
  verdict: verdict ? verdict.dataset.verdict : null,
  reasons: [...document.querySelectorAll('#reasons li')].map(li => li.textContent),
  members: Object.fromEntries([...document.querySelectorAll('#members tr[data-node-id]')]
    .map(row => [row.dataset.nodeId, row.dataset.state])),
  versions: Object.fromEntries([...document.querySelectorAll('#members tr[data-node-id]')]
    .map(row => [row.dataset.nodeId, row.cells[1].textContent])),
  others: Object.fromEntries([...document.querySelectorAll('#members tr[data-node-id]')]
    .map(row => [row.dataset.nodeId, row.cells[3].textContent])),
  kept: sessionStorage.length,
  login: !document.querySelector('#login').hidden,
  console: !document.querySelector('#console').hidden,
  loginError: document.querySelector('#login-error').textContent,
  agree: lookup && lookup.dataset.agree !== undefined ? lookup.dataset.agree === 'true' : null,
  replicas: [...document.querySelectorAll('#lookup [data-replica]')].map(item => ({
    node: item.dataset.replica, state: item.dataset.state, version: item.dataset.version})),
  marker: window.kvstoreTestMarker || null,
};
"""


@contextmanager
def chromium() -> Iterator[WebDriver]:
    """One headless Chromium with a fresh profile, quit and removed afterwards."""
    for path, package in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        assert path.exists(), f"{path} is missing: run `make tools` (apt-get install {package})"
    profile = tempfile.mkdtemp(prefix="kvstore-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for argument in (*ARGUMENTS, f"--user-data-dir={profile}"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(str(CHROMEDRIVER)))
    try:
        driver.set_page_load_timeout(PAGE_LOAD_TIMEOUT_S)
        driver.set_script_timeout(PAGE_LOAD_TIMEOUT_S)
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def page(driver: WebDriver) -> dict[str, Any]:
    """The page's hooks, read at one instant."""
    state: dict[str, Any] = driver.execute_script(READ_PAGE)
    return state


def wait_until(
    driver: WebDriver, check: Callable[[dict[str, Any]], T | Literal[False] | None], *, timeout: float, what: str
) -> T:
    """Poll the page's hooks until check(page) is truthy; fail after timeout with the last state seen."""
    deadline = time.monotonic() + timeout
    while True:
        state = page(driver)
        result = check(state)
        if result:
            return result
        if time.monotonic() >= deadline:
            raise AssertionError(f"not within {timeout:g} s: {what}; the page shows {state}")
        time.sleep(0.1)


def open_console(driver: WebDriver, url: str) -> None:
    driver.get(url + "/ui")
    driver.get_log("browser")  # start this test's log empty (reading the log clears it)


def mark_page(driver: WebDriver) -> None:
    """A value that survives only as long as this very page: a reload would drop it."""
    driver.execute_script("window.kvstoreTestMarker = 'no reload';")


def severe_entries(driver: WebDriver, *, expected: str | None = None) -> list[dict[str, Any]]:
    """The console's SEVERE entries since the last read, but those containing `expected`."""
    return [
        entry
        for entry in driver.get_log("browser")
        if entry["level"] == "SEVERE" and (expected is None or expected not in entry["message"])
    ]


def foreign_resources(driver: WebDriver, origin: str) -> list[str]:
    """Every resource the page loaded that did not come from origin (the node's own)."""
    names: list[str] = driver.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    return [name for name in names if not name.startswith(origin + "/")]


def screenshot(driver: WebDriver, name: str) -> Path:
    """Save the page as SHOTS/name.png and say where (pytest -rA or -s shows it)."""
    SHOTS.mkdir(parents=True, exist_ok=True)
    path = SHOTS / f"{name}.png"
    driver.execute_script("window.scrollTo(0, 0);")
    assert driver.save_screenshot(str(path)), f"could not write {path}"
    print(f"console screenshot: {path}")
    return path
