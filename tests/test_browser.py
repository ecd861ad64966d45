"""The demo page in headless Chromium (Debian's chromium + chromium-driver, driven by Selenium).

Starts `fedrec serve` with the tiny config on a free port, builds a history through the search box,
asks for recommendations, checks the ranked list and each top pick's facts beside its sentence, toggles the trained soft
prompt and saves screenshots under runs/test-artifacts/ (or $FEDREC_ARTIFACT_DIR).
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest
from conftest import REPO, _free_port, running_server

pytestmark = pytest.mark.browser
CHROMIUM, DRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


def _missing(message: str) -> None:
    if os.environ.get("CI") in ("true", "1"):
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="module")
def server(demo_overrides: list[str], cache_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    port = _free_port()
    command = [sys.executable, "-m", "pipeline.cli", "serve", "--config", str(REPO / "configs" / "tiny.yaml"), "--port", str(port)]
    for override in demo_overrides:
        command += ["--set", override]
    env = {**os.environ, "FEDREC_CACHE_DIR": str(cache_dir), "HF_HUB_OFFLINE": "1"}
    url = f"http://127.0.0.1:{port}"
    with running_server("fedrec serve", command, f"{url}/api/status", tmp_path_factory.mktemp("serve") / "serve.log", env,
                        timeout=180, cwd=REPO):
        yield url


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory):
    if not (shutil.which(CHROMIUM) and shutil.which(DRIVER)):
        _missing("Debian's chromium and chromium-driver are not installed (apt-get install chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync", "--window-size=1366,900",
                 f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def _artifacts() -> Path:
    folder = Path(os.environ.get("FEDREC_ARTIFACT_DIR", REPO / "runs" / "test-artifacts"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def test_build_a_history_recommend_and_toggle_the_soft_prompt(server: str, browser) -> None:  # noqa: ANN001
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(browser, 120)
    browser.get(server)
    wait.until(lambda d: "soft prompt from round 1" in d.find_element(By.ID, "status").text)
    for query in ("toy story", "star wars"):
        box = browser.find_element(By.ID, "search")
        box.clear()
        box.send_keys(query)
        first = wait.until(ec.element_to_be_clickable((By.CSS_SELECTOR, "#search-results li[data-item]")))
        title = first.text
        first.click()
        wait.until(lambda d, t=title: t in d.find_element(By.ID, "history").text)
    assert len(browser.find_elements(By.CSS_SELECTOR, "#history li")) == 2

    browser.find_element(By.ID, "recommend").click()
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#ranked li")) == 10)
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#explanation article.why")) == 3)
    ranked_titles = [li.text.split("\n")[0] for li in browser.find_elements(By.CSS_SELECTOR, "#ranked li")]
    for rank, card in enumerate(browser.find_elements(By.CSS_SELECTOR, "#explanation article.why"), start=1):
        pick, sentence = card.find_element(By.CSS_SELECTOR, "h3 .pick").text, card.find_element(By.CSS_SELECTOR, ".sentence").text
        assert pick.startswith(f"#{rank} ") and ranked_titles[rank - 1].startswith(pick.split(" ", 1)[1])
        near = [b.text for b in card.find_elements(By.CSS_SELECTOR, ".facts li.near b")]
        assert near and all(title in sentence for title in near), "the facts shown are the ones the sentence states"
        assert "trained tower space" in card.find_element(By.CSS_SELECTOR, ".facts").text
        assert card.find_element(By.CSS_SELECTOR, ".facts li.movement").text.startswith("ranking: ")
        assert card.find_element(By.CSS_SELECTOR, ".source").text == "template"
    assert len(browser.find_elements(By.CSS_SELECTOR, "#candidates li")) == 20
    assert "zero-shot prompt" in browser.find_element(By.ID, "ranking-mode").text
    assert browser.find_element(By.ID, "profile").text.strip()
    assert browser.find_element(By.ID, "error").get_attribute("hidden") is not None
    zero_shot = [li.text for li in browser.find_elements(By.CSS_SELECTOR, "#ranked li")]
    browser.save_screenshot(str(_artifacts() / "demo-zero-shot.png"))

    toggle = browser.find_element(By.ID, "soft-prompt")
    assert toggle.is_enabled()
    toggle.click()
    browser.find_element(By.ID, "recommend").click()
    wait.until(lambda d: "trained soft prompt" in d.find_element(By.ID, "ranking-mode").text)
    trained = [li.text for li in browser.find_elements(By.CSS_SELECTOR, "#ranked li")]
    assert len(trained) == 10 and trained != zero_shot
    assert browser.find_elements(By.CSS_SELECTOR, "#curve circle"), "the run panel draws the metric-vs-round curve"
    path = _artifacts() / "demo-soft-prompt.png"
    browser.save_screenshot(str(path))
    assert path.stat().st_size > 10_000


def test_a_bad_request_shows_its_message(server: str, browser) -> None:  # noqa: ANN001
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(server)
    WebDriverWait(browser, 60).until(lambda d: d.find_element(By.ID, "status").text != "loading…")
    browser.find_element(By.ID, "recommend").click()  # empty history
    WebDriverWait(browser, 30).until(lambda d: "history" in d.find_element(By.ID, "error").text)
