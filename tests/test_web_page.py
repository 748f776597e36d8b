"""The web page served at /v1/app, in a real headless Chromium (Debian's chromium and
chromium-driver, driven by Selenium) against a real `bentoml serve`: enter an API key, pick a
model by species, upload the real openfield video, watch the NDJSON progress reach 100 %, play
the labelled video in the page, download the h5 through its signed link. Writes a screenshot."""

from __future__ import annotations

import importlib.util
import shutil

import httpx
import pytest

from conftest import OPENFIELD_FRAMES, OPENFIELD_VIDEO
from test_service import KEYS, assert_error, key_env, start_server

CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM and DRIVER and importlib.util.find_spec("selenium")),
                                reason="needs Debian's chromium and chromium-driver and selenium (see .ci/run)")


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for a in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1000,1400",
              "--autoplay-policy=no-user-gesture-required"):
        opts.add_argument(a)
    driver = webdriver.Chrome(service=Service(DRIVER), options=opts)
    yield driver
    driver.quit()


def test_page_runs_a_job_plays_the_video_and_downloads(browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    srv = start_server(tmp_path / "data", key_env(workers=1, threads=2))
    try:
        browser.get(f"{srv.url}/v1/app")
        wait = WebDriverWait(browser, 60)
        # a wrong key: the API's message is shown
        browser.find_element(By.ID, "key").send_keys("wrong-key")
        browser.find_element(By.ID, "connect").click()
        wait.until(lambda d: "invalid API key" in d.find_element(By.ID, "error").text)
        key = browser.find_element(By.ID, "key")
        key.clear()
        key.send_keys(KEYS["alice"])
        browser.find_element(By.ID, "connect").click()
        wait.until(lambda d: len(Select(d.find_element(By.ID, "model")).options) > 0)
        Select(browser.find_element(By.ID, "species")).select_by_visible_text("mouse")
        model = Select(browser.find_element(By.ID, "model"))
        model.select_by_value(next(o.get_attribute("value") for o in model.options
                                   if o.get_attribute("value").startswith("posezoo_mouse@")))
        browser.find_element(By.ID, "file").send_keys(str(OPENFIELD_VIDEO))
        browser.find_element(By.ID, "submit").click()
        seen = set()

        def finished(d):
            seen.add(d.find_element(By.ID, "progress").get_attribute("value"))
            return d.find_element(By.ID, "status").get_attribute("data-status") in ("succeeded", "failed")

        WebDriverWait(browser, 600, poll_frequency=0.2).until(finished)
        assert browser.find_element(By.ID, "status").text == "succeeded", browser.find_element(By.ID, "error").text
        assert browser.find_element(By.ID, "progress").get_attribute("value") == "100"
        assert "100 %" in browser.find_element(By.ID, "progress-text").text and len(seen) > 2
        # the labelled video plays in the page (H.264 through the signed link, Range requests)
        wait.until(lambda d: d.execute_script("return document.getElementById('video').readyState") >= 2)
        duration = browser.execute_script("return document.getElementById('video').duration")
        assert duration == pytest.approx(OPENFIELD_FRAMES / 30.0, abs=0.2)
        browser.execute_script("const v = document.getElementById('video'); v.muted = true; v.play();")
        wait.until(lambda d: d.execute_script("return document.getElementById('video').currentTime") > 0.2)
        # the download link returns the h5, with no API key; a tampered link is refused
        href = browser.find_element(By.CSS_SELECTOR, "#downloads a[data-kind=h5]").get_attribute("href")
        r = httpx.get(href)
        assert r.status_code == 200 and r.content[:8] == b"\x89HDF\r\n\x1a\n"
        part = httpx.get(href.replace("/h5?", "/video?"), headers={"Range": "bytes=0-99"})
        assert_error(part, 403, "forbidden", "invalid or has expired")
        video_href = browser.find_element(By.CSS_SELECTOR, "#downloads a[data-kind=video]").get_attribute("href")
        ranged = httpx.get(video_href, headers={"Range": "bytes=0-99"})
        assert ranged.status_code == 206 and len(ranged.content) == 100
        shot = tmp_path / "posezoo_app.png"
        browser.save_screenshot(str(shot))
        assert shot.stat().st_size > 10_000
        print(f"screenshot: {shot}")
    finally:
        srv.stop()
