"""The status page in a real browser (Debian's Chromium, driven by Selenium)
against a real ``vramctl up`` with stand-in models (process runtime,
simulated GPU): it loads with no console error, shows every model and the
active one, shows the steps of a switch live and its end within 1 s of the
worker's own record, empties the bar when the GPU is freed, and, with a
token set, says why an action without it is refused.

Nothing downloads a browser: ``/usr/bin/chromium`` and
``/usr/bin/chromedriver`` come from ``.ci/setup-infra.sh``. A screenshot of
each state is saved under the test's ``tmp_path`` (``screenshots/``);
``VRAMCTL_UPDATE_SCREENSHOT=1`` also copies the switched state to
``docs/status-page.png`` for the README.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from selenium import webdriver
from selenium.common.exceptions import StaleElementReferenceException
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver

from tests.support.live_up import LiveUp, free_port, standin

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
ROOT = Path(__file__).resolve().parents[2]
TOKEN = "page-test-token-5e1f"
SLEEP_API = {"path": "/sleep", "wakePath": "/wake_up", "statePath": "/is_sleeping"}


def page_config(**gpu: Any) -> dict[str, Any]:
    """llm sleeps when it gives the GPU away (its residue stays on the bar), sdxl stops, tts is light."""
    llm = standin(free_port(), vram=9000, STANDIN_SLEEP_SECONDS="0.1", STANDIN_WAKE_SECONDS="0.1", STANDIN_RESIDUE_MIB="600")
    llm["switchStrategy"] = "sleep"
    llm["sleep"] = {"level": 2, "maxResidueMiB": 1024, **SLEEP_API}
    return {
        "runtime": "process",
        "gpuProbe": {"kind": "simulated", "totalMiB": 16000, "releaseDelaySeconds": 0.05},
        "gpus": [
            {
                "gpu": 0,
                "activeModel": "llm",
                "models": {"llm": llm, "sdxl": standin(free_port(), vram=6000), "tts": standin(free_port(), cls="light", vram=2000)},
                **gpu,
            }
        ],
    }


class TokenUp(LiveUp):
    """``vramctl up`` with a bearer token: every action needs it."""

    def argv(self) -> list[str]:
        return [*super().argv(), "--token", TOKEN]


@pytest.fixture
def shots(tmp_path: Path) -> Path:
    d = tmp_path / "screenshots"
    d.mkdir()
    return d


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[WebDriver]:
    for path in (CHROMIUM, CHROMEDRIVER):
        assert os.access(path, os.X_OK), f"{path} is missing: run .ci/setup-infra.sh (Debian's chromium and chromium-driver)"
    opts = Options()
    opts.binary_location = CHROMIUM
    profile = tmp_path / "chromium-profile"
    for arg in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
        "--window-size=1100,1500",
    ):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    try:
        yield driver
    finally:
        driver.quit()  # ends chromedriver and every Chromium process it started



def start(live: list[LiveUp], tmp: Path, cls: type[LiveUp] = LiveUp, cfg: dict[str, Any] | None = None) -> LiveUp:
    up = cls(tmp, cfg or page_config())
    live.append(up)
    up.start()
    return up


def until(pred: Callable[[], Any], timeout: float = 20.0, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"not within {timeout}s: {what}")


def console_errors(driver: WebDriver) -> list[dict[str, Any]]:
    return [e for e in driver.get_log("browser") if e.get("level") == "SEVERE"]


def progress(up: LiveUp) -> list[dict[str, Any]]:
    with urllib.request.urlopen(up.url + "/status?since=0", timeout=10) as r:
        return json.loads(r.read())["progress"]  # type: ignore[no-any-return]


def rows(driver: WebDriver) -> dict[str, dict[str, str]]:
    out: dict[str, dict[str, str]] = driver.execute_script(
        "const o = {}; for (const r of document.querySelectorAll('tr[data-model]'))"
        " o[r.dataset.model] = {state: r.dataset.state, active: r.dataset.active}; return o;"
    )
    return out


def seen_steps(driver: WebDriver) -> list[dict[str, Any]]:
    """The log's progress lines, oldest first: {seq, step}."""
    out: list[dict[str, Any]] = driver.execute_script(
        "return [...document.querySelectorAll('#log li[data-kind=progress]')].reverse()"
        ".map(li => ({seq: Number(li.dataset.seq), step: li.dataset.step}));"
    )
    return out


def text(driver: WebDriver, css: str) -> str:
    """The text of the first element matching ``css`` now ("" when none): read in one go, as the page re-renders."""
    out: str = driver.execute_script("const e = document.querySelector(arguments[0]); return e ? e.innerText : '';", css)
    return out


def attrs(driver: WebDriver, css: str, name: str) -> list[str | None]:
    """Attribute ``name`` of every element matching ``css`` now, read in one go."""
    out: list[str | None] = driver.execute_script(
        "return [...document.querySelectorAll(arguments[0])].map(e => e.getAttribute(arguments[1]));", css, name
    )
    return out


def click(driver: WebDriver, css: str) -> None:
    """A real click on ``css``, found again if the page re-rendered it in between."""
    for _ in range(20):
        try:
            driver.find_element(By.CSS_SELECTOR, css).click()
            return
        except StaleElementReferenceException:
            time.sleep(0.05)
    raise AssertionError(f"{css} kept being re-rendered")


def open_page(driver: WebDriver, up: LiveUp, models: tuple[str, ...] = ("llm", "sdxl", "tts")) -> None:
    driver.get(up.url + "/")
    until(lambda: driver.find_element(By.ID, "connection").get_attribute("data-live") == "true", what="the event stream is live")
    until(lambda: set(rows(driver)) == set(models), what="every model shown")


def test_the_page_shows_a_switch_live_and_a_freed_gpu(live: list[LiveUp], tmp_path: Path, browser: WebDriver, shots: Path) -> None:
    up = start(live, tmp_path)
    open_page(browser, up)
    assert console_errors(browser) == []
    assert attrs(browser, "[data-active-model]", "data-active-model")[0] == "llm"
    assert rows(browser)["llm"] == {"state": "running", "active": "true"}
    assert browser.find_element(By.CSS_SELECTOR, ".bar [data-model=llm]")
    browser.save_screenshot(str(shots / "1-loaded.png"))

    # The click; then the page is watched every 20 ms: when each step appears, and when sdxl is awake.
    first_seen: dict[int, float] = {}
    before = max(p["seq"] for p in progress(up))
    click(browser, "button[data-action=switch][data-model=sdxl]")

    def awake() -> float | None:
        r = rows(browser)  # before the steps: a state on the page implies the steps that led to it
        now = time.time()
        for p in seen_steps(browser):
            first_seen.setdefault(p["seq"], now)
        return now if r["sdxl"] == {"state": "running", "active": "true"} and r["llm"]["state"] == "asleep" else None

    awake_at = until(awake, what="sdxl awake and llm asleep on the page")
    worker = [p for p in progress(up) if p["seq"] > before]
    steps = [p["step"] for p in worker]
    for step in ("requested", "switch-started", "sleeping", "starting", "healthy", "switch-success"):
        assert step in steps, f"{step} missing from the worker's steps {steps}"
    done = next(p for p in worker if p["step"] == "switch-success")
    assert awake_at - done["time"] < 1.0, f"the page showed sdxl awake {awake_at - done['time']:.2f}s after the worker's record"
    # Live: every step of the switch was on the page within 1 s of the worker's record, in the worker's order.
    for p in worker:
        assert p["seq"] in first_seen, f"step {p['step']} never shown"
        assert first_seen[p["seq"]] - p["time"] < 1.0, f"step {p['step']} shown {first_seen[p['seq']] - p['time']:.2f}s late"
    shown = [s["seq"] for s in seen_steps(browser)]
    assert [p["seq"] for p in worker] == [s for s in shown if s in {p["seq"] for p in worker}]
    until(lambda: browser.find_elements(By.CSS_SELECTOR, ".bar [data-model=llm].seg-residue"), what="llm's residue on the bar")
    until(lambda: browser.find_elements(By.CSS_SELECTOR, "table.switches tbody tr[data-outcome=success]"), what="the switch listed")
    switch_row = text(browser, "table.switches tbody tr")
    assert "llm" in switch_row and "sdxl" in switch_row and "warm" not in switch_row  # sdxl started cold
    browser.save_screenshot(str(shots / "2-switched.png"))
    if os.environ.get("VRAMCTL_UPDATE_SCREENSHOT") == "1":
        shutil.copyfile(shots / "2-switched.png", ROOT / "docs" / "status-page.png")
    assert console_errors(browser) == []

    click(browser, "button[data-action=free]")
    until(
        lambda: (
            not browser.find_elements(By.CSS_SELECTOR, ".bar [data-model]")
            and attrs(browser, "[data-active-model]", "data-active-model")[0] == ""
        ),
        what="an empty bar",
    )
    assert up.gpu()["activeModel"] is None
    browser.save_screenshot(str(shots / "3-freed.png"))
    assert console_errors(browser) == []

    browser.set_window_size(390, 844)  # a phone: nothing wider than the screen
    until(lambda: browser.execute_script("return document.documentElement.scrollWidth <= window.innerWidth"), what="no sideways scroll")
    browser.save_screenshot(str(shots / "4-phone.png"))


def test_an_action_without_the_token_is_refused_and_the_page_says_why(
    live: list[LiveUp], tmp_path: Path, browser: WebDriver, shots: Path
) -> None:
    up = start(live, tmp_path, TokenUp)
    open_page(browser, up)
    click(browser, "button[data-action=switch][data-model=sdxl]")
    error = until(
        lambda: browser.find_element(By.ID, "error").is_displayed() and browser.find_element(By.ID, "error").text, what="an error"
    )
    assert "401" in error and "token" in error
    assert browser.find_element(By.ID, "token-form").is_displayed()
    assert browser.switch_to.active_element.get_attribute("id") == "token"  # focus goes where the fix is
    browser.save_screenshot(str(shots / "5-token-refused.png"))
    time.sleep(0.5)
    assert up.gpu()["activeModel"] == "llm" and up.gpu()["desiredGeneration"] == 1  # nothing was done

    browser.find_element(By.ID, "token").send_keys(TOKEN)
    click(browser, "#token-form button[type=submit]")
    assert TOKEN not in browser.current_url
    assert browser.execute_script("return sessionStorage.getItem('vramctl.token')") == TOKEN
    click(browser, "button[data-action=switch][data-model=sdxl]")
    up.wait(lambda g: g["activeModel"] == "sdxl" and g["phase"] == "Ready", timeout=20)
    until(lambda: rows(browser)["sdxl"]["active"] == "true", what="sdxl active on the page")
    # The only console error is the refused request itself.
    errors = console_errors(browser)
    assert errors and all("401" in e["message"] for e in errors), errors


def test_the_page_is_served_with_a_policy_that_allows_this_origin_only(live: list[LiveUp], tmp_path: Path) -> None:
    up = start(live, tmp_path)
    with urllib.request.urlopen(up.url + "/", timeout=10) as r:
        html = r.read().decode()
        csp = r.headers["Content-Security-Policy"]
    assert "default-src 'self'" in csp and "script-src 'self'" in csp and "unsafe-inline" not in csp
    assert "<script>" not in html and "style=" not in html and "http://" not in html and "https://" not in html
    for name in ("app.js", "app.css"):
        with urllib.request.urlopen(f"{up.url}/static/{name}", timeout=10) as r:
            body = r.read().decode()
            assert r.headers["Content-Security-Policy"] == csp
        assert "http://" not in body and "https://" not in body and "innerHTML" not in body and "eval(" not in body


def test_put_to_sleep_keeps_a_residue_and_frees_the_rest(live: list[LiveUp], tmp_path: Path, browser: WebDriver, shots: Path) -> None:
    up = start(live, tmp_path)
    assert up.post({"model": "sdxl", "sleep": True})[0] == 400  # sleep frees the GPU: never with a model
    open_page(browser, up)
    click(browser, "button[data-action=sleep]")
    until(lambda: rows(browser)["llm"] == {"state": "asleep", "active": "false"}, what="llm asleep on the page")
    until(
        lambda: (
            attrs(browser, ".bar [data-model]", "data-model") == ["llm"] and browser.find_elements(By.CSS_SELECTOR, ".bar .seg-residue")
        ),
        what="only llm's residue on the bar",
    )
    g = up.gpu()
    assert g["activeModel"] is None and g["asleepModels"] == ["llm"]
    assert "asleep" in text(browser, "tr[data-model=llm] .state")
    browser.save_screenshot(str(shots / "6-asleep.png"))
    assert console_errors(browser) == []


def _hold(up: LiveUp, model: str, out: list[dict[str, Any]]) -> None:
    req = urllib.request.Request(
        up.url + "/holds", data=json.dumps({"model": model, "ttlSeconds": 60}).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=60) as r:
        out.append(json.loads(r.read()))


def test_holds_and_the_queue_with_waiting_times_and_a_hold_cancelled(
    live: list[LiveUp], tmp_path: Path, browser: WebDriver, shots: Path
) -> None:
    # Holds switch the GPU (onDemand); a switch waits up to 30 s for the holds on the running model.
    up = start(live, tmp_path, cfg=page_config(switching={"mode": "onDemand"}, queue={"drainTimeoutSeconds": 30, "maxServeSeconds": 30}))
    held: list[dict[str, Any]] = []
    _hold(up, "llm", held)  # granted at once: llm is active
    open_page(browser, up)
    until(lambda: browser.find_elements(By.CSS_SELECTOR, "[data-hold-model=llm] button[data-action=cancel-hold]"), what="llm's hold")
    waiter = threading.Thread(target=_hold, args=(up, "sdxl", held), daemon=True)
    waiter.start()  # waits: llm is held
    waiting = until(lambda: text(browser, "[data-waiting-model=sdxl]"), what="sdxl waiting")
    assert "1 waiting, for" in waiting
    time.sleep(1.2)
    until(
        lambda: re.search(r"for [1-9]\d* s", text(browser, "[data-waiting-model=sdxl]")),
        what="the wait counted",
    )
    browser.save_screenshot(str(shots / "7-queue.png"))
    click(browser, "[data-hold-model=llm] button[data-action=cancel-hold]")
    waiter.join(30)
    assert [h["model"] for h in held] == ["llm", "sdxl"]  # the cancel let the waiting demand through
    until(lambda: rows(browser)["sdxl"]["active"] == "true", what="sdxl active")
    until(
        lambda: (
            browser.find_elements(By.CSS_SELECTOR, "[data-hold-model=sdxl]")
            and not browser.find_elements(By.CSS_SELECTOR, "[data-hold-model=llm]")
        )
    )
    assert console_errors(browser) == []


def test_read_only_where_the_desired_state_comes_from_model_deployments(tmp_path: Path, browser: WebDriver, shots: Path) -> None:
    """The operator's face (``switch_refusal``), built in this process as ``vramctl operator`` builds it."""
    from vramctl.app import build
    from vramctl.spec.models import load_config
    from vramctl.web.page import status_page
    from vramctl.web.server import FaceOptions, serve

    refusal = "desired state comes from ModelDeployment resources here: kubectl patch md ..."
    harness = LiveUp(tmp_path, page_config())  # its config, state and instance; its model records for the clean-up
    built = build(load_config(str(harness.config_path)), harness.state_path, instance=harness.instance)
    options = FaceOptions(
        api=("127.0.0.1", harness.port), switch_refusal=refusal, api_routes=(status_page(built.supervisor, refusal=refusal),)
    )
    face = serve(built.supervisor, options)
    try:
        face.start()
        built.supervisor.start()
        harness.wait(lambda g: g["phase"] == "Ready")
        open_page(browser, harness)
        notice = browser.find_element(By.ID, "readonly")
        assert notice.is_displayed() and notice.text.startswith("Read-only: desired state comes from ModelDeployment")
        disabled = attrs(browser, "button[data-action]", "disabled")
        assert disabled and all(d is not None for d in disabled)
        browser.save_screenshot(str(shots / "8-read-only.png"))
        assert console_errors(browser) == []
    finally:
        face.stop()
        built.supervisor.stop()
        harness.kill_models()


def test_a_failed_model_shows_why_with_its_last_log_lines(live: list[LiveUp], tmp_path: Path, browser: WebDriver, shots: Path) -> None:
    cfg = page_config()
    bad = standin(free_port(), vram=6000, STANDIN_LOAD_SECONDS="5", STANDIN_CRASH_AFTER_SECONDS="0.3", STANDIN_EXIT_CODE="3")
    cfg["gpus"][0]["models"]["broken"] = bad
    up = start(live, tmp_path, cfg=cfg)
    open_page(browser, up, ("broken", "llm", "sdxl", "tts"))
    click(browser, "button[data-action=switch][data-model=broken]")
    reason = until(
        lambda: "last log lines" in (t := text(browser, "tr[data-model=broken] .reason")) and t,
        what="broken's failure and its log on the page",
    )
    assert "exit code 3" in reason and "standin: loading" in reason
    assert attrs(browser, "[data-phase]", "data-phase")[0] == "Failed"
    browser.save_screenshot(str(shots / "9-failed.png"))
    assert console_errors(browser) == []
