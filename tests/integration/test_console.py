"""The console (GET /ui, issue 22) in a real browser against real nodes:
headless Chromium driven by Selenium (tests/integration/console_browser.py).

The page follows a crash and a restart without a reload; the key lookup
shows a key's replicas in preference order, disagreeing after a write one
of them missed and agreeing once repaired; the page logs no error and
loads nothing from another origin; under access control only a sign-in
shows until a right token is given, a wrong one is refused. Screenshots of the healthy, degraded and
lookup states go to test-results/console/ (KVSTORE_CONSOLE_SHOTS moves
them); with KVSTORE_CONSOLE_PICTURE set, the degraded one is also copied
there (`make console-picture` refreshes docs/console.png that way).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from selenium.webdriver.chrome.webdriver import WebDriver
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys

from app import __version__
from app.config import DEFAULT_VNODES
from app.ring import HashRing
from tests.harness.processes import Cluster
from tests.integration.console_browser import (
    chromium,
    foreign_resources,
    mark_page,
    open_console,
    screenshot,
    severe_entries,
    wait_until,
)

DETECT_S = 5.0  # the bound: a SIGKILLed node shows down, and the verdict degraded, within this
SETTLE_S = 20.0  # first load, and recovery after a restart (a node starts, finds its peers, is probed back up)
HTTP_TIMEOUT_S = 5.0


@pytest.fixture(scope="module")
def browser() -> Iterator[WebDriver]:
    """One Chromium for the module: it takes seconds to start."""
    with chromium() as driver:
        yield driver


def _call(url: str, *, method: str = "GET", body: dict[str, str] | None = None, token: str | None = None) -> Any:
    data = json.dumps(body).encode() if body is not None else None
    headers = {"authorization": f"Bearer {token}"} if token else {}
    request = urllib.request.Request(url, data=data, method=method, headers=headers)
    with urllib.request.urlopen(request, timeout=HTTP_TIMEOUT_S) as response:
        return json.loads(response.read())


def _all_up(cluster: Cluster) -> Callable[[dict[str, Any]], dict[str, Any] | None]:
    """The page's state once it says healthy with every member up (else None)."""
    ids = {node.node_id for node in cluster.nodes}
    return lambda state: (
        state if state["verdict"] == "healthy" and state["members"] == dict.fromkeys(ids, "up") else None
    )


def _assert_clean(browser: WebDriver, origin: str) -> None:
    assert severe_entries(browser) == [], "the page logged errors"
    assert foreign_resources(browser, origin) == [], "the page loaded something from another origin"


def test_console_follows_a_crash_and_a_restart_without_a_reload(
    make_cluster: Callable[..., Cluster], browser: WebDriver, record_property: Callable[[str, object], None]
) -> None:
    cluster = make_cluster(3)
    origin = cluster[0].url
    open_console(browser, origin)
    state = wait_until(browser, _all_up(cluster), timeout=SETTLE_S, what="healthy with three members up")
    assert state["versions"] == dict.fromkeys(state["members"], __version__)
    assert state["reasons"] == ["every member is up and ready, and every arc has its 3 replicas reachable"]
    record_property("screenshot_healthy", str(screenshot(browser, "healthy")))
    # The theme follows the system's setting, without a reload.
    background = "return getComputedStyle(document.body).backgroundColor"
    light = browser.execute_script(background)
    browser.execute_cdp_cmd(
        "Emulation.setEmulatedMedia", {"features": [{"name": "prefers-color-scheme", "value": "dark"}]}
    )
    try:
        dark = browser.execute_script(background)
        record_property("screenshot_healthy_dark", str(screenshot(browser, "healthy-dark")))
    finally:
        browser.execute_cdp_cmd("Emulation.setEmulatedMedia", {"features": []})
    assert light != dark, "the page ignores prefers-color-scheme"
    mark_page(browser)

    cluster[2].kill()
    state = wait_until(
        browser,
        lambda s: s["verdict"] == "degraded" and s["members"].get("node3") == "down" and s,
        timeout=DETECT_S,
        what="node3 down and the verdict degraded after SIGKILL",
    )
    assert state["marker"] == "no reload", "the page was reloaded"
    assert state["members"]["node1"] == state["members"]["node2"] == "up"
    assert any(reason.startswith("node3 is down as node1") for reason in state["reasons"]), state["reasons"]
    assert any("fewer than 3 replicas reachable" in reason for reason in state["reasons"]), state["reasons"]
    record_property("screenshot_degraded", str(path := screenshot(browser, "degraded")))
    if picture := os.environ.get("KVSTORE_CONSOLE_PICTURE"):
        shutil.copyfile(path, picture)

    cluster[2].start()
    cluster[2].wait_ready()
    state = wait_until(browser, _all_up(cluster), timeout=SETTLE_S, what="healthy again after the restart")
    assert state["marker"] == "no reload"
    _assert_clean(browser, origin)


def _look_up(browser: WebDriver, key: str) -> None:
    field = browser.find_element(By.ID, "key-input")
    field.clear()
    field.send_keys(key, Keys.ENTER)


def test_key_lookup_shows_replicas_disagreeing_then_agreeing(
    make_cluster: Callable[..., Cluster], browser: WebDriver, record_property: Callable[[str, object], None]
) -> None:
    # Durable nodes: a restarted replica keeps its older copy. Anti-entropy is
    # held off (300 s) so that only the repairs this test makes happen.
    cluster = make_cluster(3, durable=True, args=["--anti-entropy-interval", "300"])
    node1, node2, node3 = cluster.nodes
    key = "console/lookup"
    preference = list(HashRing([n.node_id for n in cluster.nodes], vnodes=DEFAULT_VNODES).owners(key.encode(), 3))
    put = _call(f"{node1.url}/put", method="PUT", body={"key": key, "value": "first"})
    origin = node2.url  # node1 is stopped later; node2 serves the page throughout
    open_console(browser, origin)
    wait_until(browser, _all_up(cluster), timeout=SETTLE_S, what="healthy with three members up")
    _look_up(browser, key)
    state = wait_until(
        browser, lambda s: s["agree"] is True and len(s["replicas"]) == 3 and s, timeout=SETTLE_S, what="3 copies"
    )
    assert [r["node"] for r in state["replicas"]] == preference, "not in preference order"
    assert {(r["state"], r["version"]) for r in state["replicas"]} == {("live", put["version"])}
    # Times are relative ("3 s ago"), with the absolute time on hover.
    times = browser.execute_script(
        "return [...document.querySelectorAll('#lookup time')].map(t => [t.textContent, t.title, t.dateTime])"
    )
    assert len(times) == 3 and all(text.endswith(" ago") and title and iso for text, title, iso in times), times

    # A write node3 misses: node1 coordinates it and keeps node3's copy as a
    # hint; node1 then crashes holding it, and node3 comes back with the old copy.
    node3.kill()
    second = _call(f"{node1.url}/put", method="PUT", body={"key": key, "value": "second"})
    node1.kill()
    node3.start()
    node3.wait_ready()
    state = wait_until(
        browser,
        lambda s: s["agree"] is False and s,
        timeout=SETTLE_S,
        what="the replicas disagreeing after node3 missed a write",
    )
    copies = {r["node"]: r for r in state["replicas"]}
    assert [r["node"] for r in state["replicas"]] == preference
    assert copies["node1"]["state"] == "unreachable"
    assert copies["node2"]["version"] == second["version"]
    assert copies["node3"]["version"] == put["version"]
    record_property("screenshot_lookup", str(screenshot(browser, "lookup")))

    # The console's lookup repaired nothing: node3 still holds the old copy.
    direct = _call(f"{node2.url}/console/key?{urllib.parse.urlencode({'key': key})}")
    assert {c["node_id"]: c["version"] for c in direct["copies"]}["node3"] == put["version"]

    # A quorum read through the normal API repairs node3 (read repair).
    assert _call(f"{node2.url}/get?{urllib.parse.urlencode({'key': key})}")["value"] == "second"
    wait_until(
        browser,
        lambda s: s["agree"] is True and {r["node"]: r["version"] for r in s["replicas"]}["node3"] == second["version"],
        timeout=SETTLE_S,
        what="node2 and node3 agreeing after read repair",
    )
    # node1 comes back with the second write and the hint it held: all three agree.
    node1.start()
    node1.wait_ready()
    wait_until(
        browser,
        lambda s: s["agree"] is True and [r["version"] for r in s["replicas"]] == [second["version"]] * 3,
        timeout=SETTLE_S,
        what="all three replicas agreeing once node1 is back",
    )
    _assert_clean(browser, origin)


def _sign_in(browser: WebDriver, token: str) -> None:
    field = browser.find_element(By.ID, "token-input")
    field.clear()
    field.send_keys(token, Keys.ENTER)


def test_console_under_access_control_asks_for_a_token_once(
    make_cluster: Callable[..., Cluster], browser: WebDriver, tmp_path: Path
) -> None:
    tokens = {"viewer": "console-viewer-token", "writer": "console-writer-token"}
    users = tmp_path / "users.yaml"
    users.write_text(
        "users:\n"
        + "".join(
            f'  {name}: {{token_sha256: "{hashlib.sha256(token.encode()).hexdigest()}", roles: [{name}]}}\n'
            for name, token in tokens.items()
        )
        + 'roles:\n  viewer: [{prefix: "app/", permissions: [read]}]\n'
        + '  writer: [{prefix: "", permissions: [write]}]\n'
    )
    cluster = make_cluster(3, args=["--cluster-token", "console-cluster-token", "--auth-file", str(users)])
    origin = cluster[0].url
    _call(f"{origin}/put", method="PUT", body={"key": "app/k", "value": "v"}, token=tokens["writer"])

    open_console(browser, origin)
    state = wait_until(browser, lambda s: s["login"] and s, timeout=SETTLE_S, what="the sign-in")
    assert not state["console"] and state["members"] == {} and not state["verdict"], "only the sign-in shows"

    _sign_in(browser, "not-a-token")
    state = wait_until(browser, lambda s: "refused" in s["loginError"] and s, timeout=SETTLE_S, what="a refusal")
    assert state["login"] and not state["console"] and state["kept"] == 0, "a wrong token is neither used nor kept"
    screenshot(browser, "sign-in-refused")

    _sign_in(browser, tokens["viewer"])
    state = wait_until(browser, _all_up(cluster), timeout=SETTLE_S, what="the console after signing in")
    assert not state["login"] and state["kept"] == 1
    # The others' views came through: each node fetched its peers' /ring with the viewer's token.
    for node_id, seen in state["others"].items():
        assert all(f"{other}: up" in seen for other in state["members"] if other != node_id), state["others"]

    _look_up(browser, "app/k")
    wait_until(
        browser,
        lambda s: s["agree"] is True and [r["state"] for r in s["replicas"]] == ["live"] * 3,
        timeout=SETTLE_S,
        what="the lookup of a key the viewer may read",
    )
    _look_up(browser, "other/k")
    wait_until(
        browser,
        lambda s: "not allowed to read this key" in browser.find_element(By.ID, "lookup").text,
        timeout=SETTLE_S,
        what="the lookup of a key the viewer may not read refused",
    )

    browser.refresh()  # the token is kept for the tab: no second sign-in
    state = wait_until(browser, _all_up(cluster), timeout=SETTLE_S, what="the console after a reload")
    assert not state["login"]
    # The 401s of the sign-in and the 403 of the refused lookup are the page's expected answers;
    # nothing else may be logged.
    assert [e for e in severe_entries(browser) if " 401 " not in e["message"] and " 403 " not in e["message"]] == []
    assert foreign_resources(browser, origin) == []
