"""The live playground in a real headless browser: Debian's Chromium driven by Selenium
against a real uvicorn server running models/tiny (a trained code model) in float32.

The page must show the same text the API gives for the same request at temperature 0, and
must have drawn the steps (MASK slots, drafts with their verdicts, counters). Without a
browser the tests skip with the reason, except where BLOCKDIFF_REQUIRE_BROWSER=1 (CI sets it
in .ci/run after installing chromium): there a missing browser is a failure.
Set BLOCKDIFF_UPDATE_SCREENSHOT=1 to refresh docs/playground.png from the race test.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import openai
import pytest

from blockdiff.engine.llm import LLM
from support.server import one_torch_thread, serving

pytestmark = pytest.mark.slow  # processes, servers or a browser: `make test` only

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
PROMPT = "def fibonacci(n):"
PANES_JS = """return [...document.querySelectorAll('.pane')].map(p => ({
  mode: p.querySelector('.pane-mode').textContent, state: p.dataset.state,
  text: p.querySelector('.output').textContent, error: p.querySelector('.pane-error').textContent,
  steps: +p.dataset.steps, masks: +p.dataset.masks, accepted: +p.dataset.accepted, rejected: +p.dataset.rejected,
  nfe: p.querySelector('.c-nfe').textContent, tpf: p.querySelector('.c-tpf').textContent,
  tps: p.querySelector('.c-tps').textContent, badge: p.querySelector('.badge').textContent,
  bonus: p.querySelectorAll('.slot.bonus').length}));"""


def browser_missing() -> str | None:
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (it is in the dev extras: pip install -e '.[dev]')"
    for path in (CHROMIUM, CHROMEDRIVER):
        if not os.path.exists(path):
            return f"{path} is missing (apt-get install chromium chromium-driver)"
    return None


@pytest.fixture(scope="module")
def server():
    with one_torch_thread():
        llm = LLM(str(ROOT / "models" / "tiny"), dtype="float32")  # float32: spec modes equal ar exactly
        with serving(llm, model="tiny", block_length=8) as srv:
            yield srv


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def driver():
    reason = browser_missing()
    if reason:
        if os.environ.get("BLOCKDIFF_REQUIRE_BROWSER") == "1":
            pytest.fail(f"BLOCKDIFF_REQUIRE_BROWSER=1 but {reason}")
        pytest.skip(reason)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="blockdiff-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--no-first-run", f"--user-data-dir={profile}", "--window-size=1400,1050"]:
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # to catch script errors
    drv = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield drv
    drv.quit()
    shutil.rmtree(profile, ignore_errors=True)


def generate(driver, server, *, mode, block_length, threshold=0.9, max_tokens=40, chat=False, race=False,
             prompt=PROMPT) -> list[dict]:
    """Fill the form as a user would, press Generate, and wait for every pane to finish."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    driver.get(server.url + "/")
    WebDriverWait(driver, 20).until(lambda d: d.execute_script("return document.body.dataset.ready === '1'"))
    box = driver.find_element(By.ID, "prompt")
    box.clear()
    box.send_keys(prompt)
    Select(driver.find_element(By.ID, "mode")).select_by_value(mode)
    for field, value in [("block-length", block_length), ("threshold", threshold), ("max-tokens", max_tokens)]:
        element = driver.find_element(By.ID, field)
        element.clear()
        element.send_keys(str(value))
    for field, wanted in [("chat", chat), ("race", race)]:
        if driver.find_element(By.ID, field).is_selected() != wanted:
            driver.find_element(By.ID, field).click()
    driver.find_element(By.ID, "run").click()
    WebDriverWait(driver, 90, poll_frequency=0.1).until(
        lambda d: (p := d.execute_script(PANES_JS)) and all(x["state"] in ("done", "failed") for x in p)
        and d.find_element(By.ID, "run").is_enabled())
    panes = driver.execute_script(PANES_JS)
    assert all(p["state"] == "done" for p in panes), [p["error"] for p in panes]
    errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    assert not errors, errors
    return panes


def api_text(client, *, mode, block_length, threshold=0.9, max_tokens=40, chat=False, prompt=PROMPT) -> str:
    kw = dict(model="tiny", max_tokens=max_tokens, temperature=0,
              extra_body={"mode": mode, "block_length": block_length, "threshold": threshold})
    if chat:
        return client.chat.completions.create(messages=[{"role": "user", "content": prompt}], **kw) \
            .choices[0].message.content
    return client.completions.create(prompt=prompt, **kw).choices[0].text


def screenshot(driver, path: Path) -> None:
    driver.save_screenshot(str(path))
    assert path.stat().st_size > 10_000


def assert_counters(pane: dict) -> None:
    assert int(pane["nfe"]) > 0 and float(pane["tpf"]) > 0 and float(pane["tps"]) > 0, pane
    assert pane["steps"] > 0 and pane["text"], pane


def test_the_page_and_its_files_are_served_and_self_contained(server):
    """Runs without a browser too: the page, its scripts and styles, and nothing from a CDN."""
    import httpx
    page = httpx.get(server.url + "/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert "blockdiff playground" in page.text
    static = Path(__file__).resolve().parents[1] / "blockdiff" / "server" / "static"
    for path in static.iterdir():
        r = httpx.get(f"{server.url}/static/{path.name}")
        assert r.status_code == 200 and r.text == path.read_text(), path.name
        assert "http://" not in r.text and "https://" not in r.text, path.name  # offline: no CDN


def test_diffusion_draws_masked_slots_and_gives_the_api_text(driver, server, client, tmp_path):
    panes = generate(driver, server, mode="diffusion", block_length=8, max_tokens=40)
    assert len(panes) == 1 and panes[0]["mode"] == "diffusion"
    assert panes[0]["text"] == api_text(client, mode="diffusion", block_length=8, max_tokens=40)
    assert_counters(panes[0])
    assert panes[0]["masks"] > 0  # denoising passes were drawn with MASK slots
    screenshot(driver, tmp_path / "diffusion.png")


def test_quad_spec_chat_draws_accepted_and_rejected_drafts(driver, server, client, tmp_path):
    panes = generate(driver, server, mode="quad_spec", block_length=6, max_tokens=32, chat=True)
    assert panes[0]["text"] == api_text(client, mode="quad_spec", block_length=6, max_tokens=32, chat=True)
    assert_counters(panes[0])
    assert panes[0]["accepted"] + panes[0]["rejected"] > 0 and panes[0]["bonus"] > 0
    screenshot(driver, tmp_path / "quad_spec.png")


def test_race_against_ar_runs_two_streams_side_by_side(driver, server, client, tmp_path):
    panes = generate(driver, server, mode="linear_spec", block_length=8, max_tokens=48, race=True)
    assert [p["mode"] for p in panes] == ["ar", "linear_spec"]
    expected = api_text(client, mode="linear_spec", block_length=8, max_tokens=48)
    assert expected == api_text(client, mode="ar", block_length=8, max_tokens=48)  # lossless in float32
    for pane in panes:
        assert pane["text"] == expected
        assert_counters(pane)
    assert panes[1]["accepted"] + panes[1]["rejected"] > 0
    assert sorted(bool(p["badge"]) for p in panes) == [True, True]  # ranked: first, and +seconds
    screenshot(driver, tmp_path / "race.png")
    if os.environ.get("BLOCKDIFF_UPDATE_SCREENSHOT") == "1":
        driver.set_window_size(1400, 1250)  # room for both panes' text
        screenshot(driver, ROOT / "docs" / "playground.png")
