"""``tunelab ui`` in a real browser: headless Chromium (Debian's chromium + chromium-driver, driven by selenium)
against a live ``tunelab ui`` on loopback. Fill the train form for the tiny model, start, watch the loss curve
gain points, stop, resume to completion; compare two runs; chat with a streamed reply beside the base model;
a ``../`` path refused. Screenshots go to ``test-artifacts/ui/`` (``docs/img/`` holds two of them).

Skipped, with the reason, only where chromium, chromedriver or selenium is missing (``make setup`` installs them).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

import warm

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = Path(os.environ.get("TUNELAB_TEST_ARTIFACTS", REPO / "test-artifacts")) / "ui"

pytestmark = pytest.mark.slow


def _browser_or_skip():
    pytest.importorskip("gradio", reason="the [ui] extra (gradio) is not installed: pip install 'tunelab[ui]'")
    pytest.importorskip("selenium", reason="selenium is not installed: pip install 'tunelab[dev]'")
    chromium = next((shutil.which(n) for n in ("chromium", "chromium-browser") if shutil.which(n)), None)
    driver = shutil.which("chromedriver")
    if not chromium or not driver:
        pytest.skip("chromium / chromedriver not found: `make setup` installs them (apt-get install chromium "
                    "chromium-driver)")
    return chromium, driver


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _write_data(ws: Path) -> None:
    rows = [{"instruction": f"Add {a} and {b}.", "input": "", "output": f"{a} + {b} = {a + b}."}
            for a in range(8) for b in range(8)]
    (ws / "alpaca.json").write_text(json.dumps(rows))
    (ws.parent / "secret.json").write_text(json.dumps(rows[:2]))


# a session fixture: pytest-xdist's worksteal hands a worker this module's tests with others between them, and a
# module fixture was set up again after each gap (3 times in one run, 13-30 s each)
@pytest.fixture(scope="session")
def ui(tmp_path_factory):
    chromium, driver_path = _browser_or_skip()
    from selenium import webdriver

    ws = tmp_path_factory.mktemp("ui") / "ws"
    ws.mkdir()
    _write_data(ws)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO / "src")}
    # two runs to compare, trained by the CLI (the UI reads any run directory); not the Train tab's run: pytest-xdist
    # may give the compare test to another worker, with its own workspace
    for name, lr in (("a", "1.0e-4"), ("b", "1.0e-3")):
        (ws / f"{name}.yaml").write_text(f"run: {{name: cli-{name}}}\nmodel: {{path: tiny-random-llama}}\n"
                                         "data: {train: [{path: alpaca.json}], max_length: 64}\n"
                                         f"method: {{name: lora, r: 4}}\ntrain: {{max_steps: 4, lr: {lr}, precision: fp32}}\n")
    trained = [warm.start(["train", f"{name}.yaml"], cwd=ws, env=env) for name in "ab"]
    port = _free_port()
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    # the server's output, kept as an artifact: one file a pytest-xdist worker (each worker starts its own server)
    log_path = ARTIFACTS / f"server-{os.environ.get('PYTEST_XDIST_WORKER', 'main')}.log"
    log = open(log_path, "w")  # noqa: SIM115
    server = subprocess.Popen([sys.executable, "-m", "tunelab.cli", "ui", "--workspace", str(ws), "--port", str(port)],
                              env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
    options = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1000", "--lang=en"):
        options.add_argument(arg)
    options.binary_location = chromium
    browser = webdriver.Chrome(options=options, service=webdriver.ChromeService(driver_path))
    try:
        for proc in trained:
            _, err = proc.communicate(timeout=600)  # (and its output folder removed)
            assert proc.returncode == 0, err[-2000:]
        _wait(lambda: f"tunelab ui: http://127.0.0.1:{port}/" in log_path.read_text(), 300, "the server")
        browser.get(f"http://127.0.0.1:{port}/en/")
        _wait(lambda: browser.find_elements("id", "f-model-path"), 120, "the page")
        yield browser, ws
    finally:
        browser.quit()
        server.terminate()
        server.wait(timeout=60)
        log.close()
        for job in ws.glob("runs/*/ui-job.json"):  # a run a failed test left running (its command names this ws)
            with contextlib.suppress(OSError, ValueError, KeyError):
                pid = json.loads(job.read_text())["pid"]
                if str(ws).encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                    os.kill(pid, signal.SIGKILL)


def _wait(check, timeout: float, what: str, every: float = 0.25, show=None):
    end = time.time() + timeout
    while time.time() < end:
        value = check()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}" + (f"; the page shows: {show()}" if show else ""))


def _box(browser, elem_id: str):
    return browser.find_element("css selector", f"#{elem_id} textarea, #{elem_id} input")


def _type(browser, elem_id: str, text: str) -> None:
    from selenium.webdriver.common.keys import Keys

    box = _box(browser, elem_id)
    box.send_keys(Keys.CONTROL, "a")
    box.send_keys(Keys.DELETE)
    box.send_keys(text)
    box.send_keys(Keys.TAB)


def _value(browser, elem_id: str) -> str:
    return _box(browser, elem_id).get_attribute("value") or ""


def _click(browser, elem_id: str) -> None:
    browser.execute_script("arguments[0].scrollIntoView({block: 'center'}); arguments[0].click();",
                           browser.find_element("id", elem_id))


def _tab(browser, name: str) -> None:
    buttons = _wait(lambda: [b for b in browser.find_elements("css selector", "button[role=tab]")
                             if b.text.strip() == name], 60, f"the {name} tab")
    buttons[0].click()


def _shot(browser, name: str, element_id: str | None = None) -> Path:
    path = ARTIFACTS / name
    if element_id:
        browser.execute_script("arguments[0].scrollIntoView({block: 'start'});", browser.find_element("id", element_id))
        time.sleep(0.3)
    browser.save_screenshot(str(path))
    return path


def test_a_path_outside_the_workspace_is_refused(ui):
    browser, ws = ui
    _tab(browser, "Train")  # each test picks its tab: the browser is per session, in whatever state the last left it
    _type(browser, "f-data-train", "[{path: ../secret.json}]")
    shown = _wait(lambda: "contains '..'" in _value(browser, "problems") and _value(browser, "problems"), 120,
                  "the problem line")
    assert shown.startswith("data.train.0.path: '../secret.json' contains '..'. Use a path under the workspace")
    _type(browser, "f-data-train", f"[{{path: {ws.parent / 'secret.json'}}}]")
    _wait(lambda: "is outside the workspace" in _value(browser, "problems"), 120, "the outside-workspace line")


def test_train_start_watch_stop_resume(ui):
    browser, ws = ui
    _tab(browser, "Train")
    for elem_id, text in (("f-run-name", "ui-a"), ("f-model-path", "tiny-random-llama"),
                          ("f-data-train", "[{path: alpaca.json}]"), ("f-data-max_length", "64"),
                          ("f-train-max_steps", "60"), ("f-train-lr", "0.002"), ("f-train-batch_size", "16"),
                          ("f-train-grad_accum", "2")):  # 32 rows a step (0.22 s here): slow enough to stop part-way
        _type(browser, elem_id, text)
    _wait(lambda: _value(browser, "problems") == "no problems", 120, "the form to validate",
          show=lambda: _value(browser, "problems"))
    yaml_text = browser.find_element("id", "config-yaml").text
    assert "tiny-random-llama" in yaml_text and "max_steps: 60" in yaml_text
    _click(browser, "btn-start")
    points = lambda: int(_value(browser, "progress").rsplit("·", 1)[-1].split()[0] or 0)  # "... · N loss points"  # noqa: E731
    _wait(lambda: "running" in _value(browser, "progress") and points() >= 1, 300, "loss points while running")
    first = points()
    _wait(lambda: points() > first, 120, "the curve to gain points")
    _shot(browser, "train-live.png", "progress")  # the tick that counted the points drew them
    _click(browser, "btn-stop")
    _wait(lambda: _value(browser, "progress").startswith("stopped"), 180, "the run to stop",
          show=lambda: _value(browser, "progress"))
    stopped_at = int(_value(browser, "progress").split("step ")[1].split("/")[0])
    assert 0 < stopped_at < 60 and (ws / "runs" / "ui-a" / "checkpoints").is_dir()
    _click(browser, "btn-resume")
    _wait(lambda: _value(browser, "progress").startswith("finished"), 300, "the resumed run to finish",
          show=lambda: _value(browser, "progress"))
    assert "step 60/60" in _value(browser, "progress") and points() == 60
    assert f"resumed from runs/ui-a/checkpoints/step-{stopped_at:06d}" in (ws / "runs" / "ui-a" / "train.log").read_text()
    assert (ws / "configs" / "ui-a.yaml").is_file() and (ws / "runs" / "ui-a" / "final").is_dir()


def test_runs_tab_compares_two_runs(ui):
    browser, ws = ui
    _tab(browser, "Runs")
    _click(browser, "btn-runs-refresh")
    _wait(lambda: "cli-b" in browser.find_element("id", "runs-table").text, 60, "the runs table")
    for name in ("runs/cli-a", "runs/cli-b"):
        label = _wait(lambda n=name: [x for x in browser.find_elements("css selector", "#runs-pick label")
                                      if x.text.strip() == n], 60, name)
        label[0].click()
    compare = _wait(lambda: (t := browser.find_element("id", "runs-compare").text) and "runs/cli-b" in t
                    and "runs/cli-a" in t and t, 60, "the comparison table")
    assert "final loss" in compare
    _wait(lambda: browser.find_elements("css selector", "#runs-overlay canvas, #runs-overlay svg"), 60, "the overlay")
    _shot(browser, "runs-compare.png", "runs-pick")


def test_chat_streams_a_reply_beside_the_base_model(ui):
    from selenium.webdriver.common.keys import Keys

    browser, ws = ui
    _tab(browser, "Chat")
    box = _box(browser, "chat-run")
    box.send_keys(Keys.CONTROL, "a")  # the dropdown shows the first run when the runs existed as the app was built
    box.send_keys(Keys.DELETE)
    box.send_keys("runs/cli-b")
    box.send_keys(Keys.ENTER)
    browser.find_element("css selector", "#chat-compare-base input").click()
    _wait(lambda: browser.find_elements("id", "chat-base"), 60, "the base model's pane")
    # record every text the tuned pane's reply shows: a streamed reply shows several, growing
    browser.execute_script("""
        window.__seen = [];
        const pane = document.getElementById('chat-tuned');
        new MutationObserver(() => {
            const bots = pane.querySelectorAll('.bot, [data-testid="bot"]');
            const last = bots.length ? bots[bots.length - 1].innerText : '';
            if (last && window.__seen[window.__seen.length - 1] !== last) window.__seen.push(last);
        }).observe(pane, {subtree: true, childList: true, characterData: true});""")
    _type(browser, "chat-temperature", "1")  # sampled: the tiny random model's greedy reply is only newlines
    _type(browser, "chat-message", "Add 2 and 3.")
    _click(browser, "btn-send")
    bot = lambda pane: [e.text for e in browser.find_elements("css selector", f"#{pane} .bot, #{pane} [data-testid=bot]")  # noqa: E731
                        if e.text.strip()]
    _wait(lambda: bot("chat-tuned") and bot("chat-base"), 180, "replies from the tuned and the base model",
          show=lambda: _shot(browser, "chat-failed.png"))
    time.sleep(1.0)
    seen = browser.execute_script("return window.__seen")
    assert len(seen) >= 2, seen  # more than one partial text: the reply streamed in
    assert "Add 2 and 3." in browser.find_element("id", "chat-tuned").text
    _shot(browser, "chat-side-by-side.png", "chat-run")


def test_the_chinese_page_and_the_language_switch(ui):
    browser, _ = ui
    url = browser.current_url
    href = browser.find_element("link text", "中文").get_attribute("href")  # Gradio opens links in a new tab
    assert href.endswith("/zh/")
    browser.get(href)
    try:
        _wait(lambda: browser.find_elements("id", "btn-start") and "开始训练" in browser.find_element("id", "btn-start").text,
              120, "the Chinese labels")
        assert {"训练", "实验记录", "对话", "数据", "评估", "导出"} <= {b.text.strip() for b in browser.find_elements(
            "css selector", "button[role=tab]")}
    finally:  # the English page again, loaded, for the tests this worker runs next (the browser is per session)
        browser.get(url)
        _wait(lambda: browser.find_elements("id", "f-model-path"), 120, "the English page")
