"""The page at `/`, in headless Chromium (Debian's chromium and chromium-driver, driven by
selenium): it generates with the tiny model, shows the progress with a live preview, and
the result with its parameters and a download that keeps them. The screenshot is kept in
artifacts/ (ignored by git) and in the test's tmp dir."""

from __future__ import annotations

import base64
import io
import os
import shutil

import pytest
from PIL import Image

from tests.helpers import ROOT, Server

CHROMIUM = shutil.which("chromium")
CHROMEDRIVER = shutil.which("chromedriver")

pytestmark = pytest.mark.skipif(
    (CHROMIUM is None or CHROMEDRIVER is None) and not os.environ.get("CI"),
    reason="needs Debian's chromium and chromium-driver (.ci/run installs them)",
)


@pytest.fixture
def browser(tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM or "chromium"
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--window-size=1200,900",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER or "chromedriver"))
    yield driver
    driver.quit()


def test_page_generates_with_progress_and_result(browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    server = Server(tmp_path)
    try:
        browser.get(server.url + "/")
        wait = WebDriverWait(browser, 60, poll_frequency=0.05)
        wait.until(lambda b: len(Select(b.find_element(By.ID, "sampler_name")).options) > 1)
        assert Select(browser.find_element(By.ID, "model")).first_selected_option.text == (
            "tests/fixtures/models/tiny-sd1"
        )
        fields = {
            "prompt": "a lighthouse",
            "width": "64",
            "height": "64",
            "steps": "120",
            "cfg_scale": "7",
            "seed": "21",
        }
        for field, value in fields.items():
            element = browser.find_element(By.ID, field)
            element.clear()
            element.send_keys(value)
        Select(browser.find_element(By.ID, "sampler_name")).select_by_visible_text("Euler a")
        browser.find_element(By.ID, "generate").click()

        # While it runs: the step count, the bar and the preview of the current latent.
        wait.until(lambda b: "Step" in b.find_element(By.ID, "status").text)
        wait.until(
            lambda b: (
                b.find_element(By.ID, "preview")
                .get_attribute("src")
                .startswith("data:image/png;base64,")
            )
        )
        bar = float(browser.find_element(By.ID, "progress").get_attribute("value"))
        assert 0 < bar < 1
        browser.save_screenshot(str(tmp_path / "page-progress.png"))

        wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, "#gallery figure"))
        caption = browser.find_element(By.CSS_SELECTOR, "#gallery figcaption pre").text
        assert caption.startswith("a lighthouse\nSteps: 120, Sampler: Euler a, CFG scale: 7.0")
        assert "Seed: 21" in caption
        link = browser.find_element(By.CSS_SELECTOR, "#gallery figcaption a")
        assert link.get_attribute("download") == "sd-21.png"
        data = base64.b64decode(link.get_attribute("href").partition(",")[2])
        with Image.open(io.BytesIO(data)) as png:
            assert png.info["parameters"] == caption
            assert png.size == (64, 64)
        assert browser.find_element(By.ID, "error").text == ""

        screenshot = tmp_path / "page.png"
        browser.save_screenshot(str(screenshot))
        artifacts = ROOT / "artifacts"
        artifacts.mkdir(exist_ok=True)
        shutil.copy(screenshot, artifacts / "server-page.png")
        shutil.copy(tmp_path / "page-progress.png", artifacts / "server-page-progress.png")
    finally:
        server.stop()
