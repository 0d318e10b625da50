"""The operator page and the API docs in a real headless browser (Debian's Chromium), offline.

The page is driven as a person would use it: pick the product, upload images, read the
verdicts off the page. Nothing may be fetched from outside the server.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path

import httpx
import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service as ChromeService
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support import expected_conditions as ready
from selenium.webdriver.support.ui import Select, WebDriverWait

from service.app import create_app
from service.settings import Settings
from tests.images import part_image, with_defect
from tests.service_harness import png, serving, wait_until

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None or CHROMEDRIVER is None,
    reason="no chromium/chromedriver (make test installs Debian's packages)",
)
WAIT_S = 120  # a busy machine's inference included


@pytest.fixture(scope="module")
def base_url(tiny_model_dir: Path) -> Iterator[str]:
    with serving(create_app(Settings(model_dir=tiny_model_dir))) as url:
        yield url


@pytest.fixture(scope="module")
def browser() -> Iterator[webdriver.Chrome]:
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(flag)
    options.add_argument("--window-size=1200,1400")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # Selenium Manager would look for a browser download otherwise.
    driver = webdriver.Chrome(options=options, service=ChromeService(CHROMEDRIVER))
    try:
        yield driver
    finally:
        driver.quit()


def _fetched_from_elsewhere(browser: webdriver.Chrome, base_url: str) -> list[str]:
    """What the page loaded from another origin; a load the page's Content-Security-Policy
    refused (the browser logs it) was not fetched."""
    urls = browser.execute_script(
        "return performance.getEntriesByType('resource').map(e => e.name);"
    )
    log = [e["message"] for e in browser.get_log("browser")]
    refusals = [m for m in log if "Content Security Policy" in m and "blocked" in m]
    return [
        url
        for url in urls
        if not url.startswith((base_url, "data:", "blob:"))
        and not any(f"'{url}'" in refusal for refusal in refusals)
    ]


def test_upload_images_and_read_the_verdicts(
    base_url: str, browser: webdriver.Chrome, tmp_path: Path
) -> None:
    good, damaged = tmp_path / "good.png", tmp_path / "damaged.png"
    part_image(301).save(good)
    with_defect(part_image(401)).save(damaged)
    browser.get(base_url + "/")
    wait = WebDriverWait(browser, WAIT_S)
    wait.until(ready.text_to_be_present_in_element((By.ID, "products"), "widget"))
    cells = [td.text for td in browser.find_elements(By.CSS_SELECTOR, "#products tbody td")]
    assert cells[0] == "widget" and cells[-1] == "1"  # one live worker
    assert int(cells[-2]) > 0  # the model's memory of normal patches
    Select(browser.find_element(By.ID, "product")).select_by_value("widget")

    browser.find_element(By.ID, "files").send_keys(f"{good}\n{damaged}")
    wait.until(lambda b: len(b.find_elements(By.CSS_SELECTOR, "#results .result")) == 2)
    results = browser.find_elements(By.CSS_SELECTOR, "#results .result")
    # Newest first: the damaged part, then the good one.
    verdicts = {
        r.find_element(By.CLASS_NAME, "muted").text: r.find_element(By.CLASS_NAME, "verdict").text
        for r in results
    }
    assert verdicts == {"damaged.png": "ANOMALOUS", "good.png": "normal"}
    for result in results:
        assert "threshold 0.5" in result.find_element(By.CLASS_NAME, "score").text
        assert result.find_element(By.CLASS_NAME, "step").text.startswith("denoise step")
        assert "inference" in result.find_element(By.CLASS_NAME, "timings").text
        heatmap = result.find_element(By.TAG_NAME, "img")
        assert browser.execute_script("return arguments[0].naturalWidth", heatmap) == 64
    browser.save_screenshot(str(tmp_path / "operator.png"))
    assert _fetched_from_elsewhere(browser, base_url) == []


def test_a_refusal_is_shown_with_its_reason(
    base_url: str, browser: webdriver.Chrome, tmp_path: Path
) -> None:
    text = tmp_path / "notes.png"
    text.write_bytes(b"this is not an image")
    browser.get(base_url + "/")
    wait = WebDriverWait(browser, WAIT_S)
    wait.until(ready.text_to_be_present_in_element((By.ID, "products"), "widget"))
    browser.find_element(By.ID, "files").send_keys(str(text))
    wait.until(ready.presence_of_element_located((By.CSS_SELECTOR, "#results .failed")))
    shown = browser.find_element(By.CSS_SELECTOR, "#results .failed").text
    assert "HTTP 415" in shown and "not a PNG" in shown


def _flagged(base_url: str, part_id: str) -> str:
    """Inspects a damaged part with this id; its record's id once the record is written."""
    answer = httpx.post(
        f"{base_url}/inspect/widget",
        content=png(with_defect(part_image(500 + sum(map(ord, part_id))))),
        headers={"Content-Type": "image/png", "X-Part-Id": part_id},
        timeout=WAIT_S,
    )
    assert answer.status_code == 200 and answer.json()["is_anomalous"], answer.text
    record_id = answer.json()["inspection_id"]
    written = f"{base_url}/inspections/{record_id}"
    wait_until(lambda: httpx.get(written).status_code == 200, "the record", WAIT_S)
    return record_id


def _card(browser: webdriver.Chrome, part_id: str) -> WebElement | None:
    # Found in one step: the list may be redrawn between two of Selenium's calls.
    return browser.execute_script(
        "return [...document.querySelectorAll('#review .flagged')]"
        ".find(c => c.querySelector('.facts').textContent.includes(arguments[0])) || null",
        f"part {part_id} ",
    )


def _set(browser: webdriver.Chrome, element_id: str, value: str | bool) -> None:
    """Sets a filter as a person would leave it, firing its change event."""
    field = "checked" if isinstance(value, bool) else "value"
    browser.execute_script(
        f"const e = document.getElementById(arguments[0]); e.{field} = arguments[1];"
        "e.dispatchEvent(new Event('change'));",
        element_id,
        value,
    )


def test_review_flagged_parts_with_one_click(base_url: str, browser: webdriver.Chrome) -> None:
    first, second = _flagged(base_url, "SN-R1"), _flagged(base_url, "SN-R2")
    browser.get(base_url + "/")
    wait = WebDriverWait(browser, WAIT_S)
    wait.until(lambda b: _card(b, "SN-R1") is not None and _card(b, "SN-R2") is not None)
    card = _card(browser, "SN-R1")
    assert card is not None
    # The part's image and its heatmap, as thumbnails loaded from the record.
    images = card.find_elements(By.TAG_NAME, "img")
    assert [i.get_attribute("alt") for i in images] == ["image", "heatmap"]
    wait.until(
        lambda b: all(b.execute_script("return arguments[0].naturalWidth", i) > 0 for i in images)
    )
    assert card.find_element(By.CLASS_NAME, "label").text == "not reviewed"

    # Without a reviewer's name nothing is stored, and the page says what to do.
    card.find_element(By.XPATH, ".//button[text()='false alarm']").click()
    wait.until(ready.text_to_be_present_in_element((By.ID, "review-status"), "your name"))
    assert httpx.get(f"{base_url}/inspections/{first}").json()["review_label"] is None

    browser.find_element(By.ID, "reviewer").send_keys("Ada")
    card.find_element(By.XPATH, ".//button[text()='false alarm']").click()
    wait.until(lambda b: card.find_element(By.CLASS_NAME, "label").text == "false alarm (Ada)")
    record = httpx.get(f"{base_url}/inspections/{first}").json()
    assert (record["review_label"], record["reviewed_by"]) == ("false_alarm", "Ada")

    # Reviewed parts leave the list of open ones; the other stays.
    browser.find_element(By.ID, "review-refresh").click()
    wait.until(lambda b: _card(b, "SN-R1") is None and _card(b, "SN-R2") is not None)
    _set(browser, "review-open", False)
    wait.until(lambda b: _card(b, "SN-R1") is not None)

    # Filters: by product, and by day (none tomorrow).
    _set(browser, "review-product", "widget")
    wait.until(lambda b: _card(b, "SN-R2") is not None)
    tomorrow = (datetime.now() + timedelta(days=1)).strftime("%Y-%m-%d")
    _set(browser, "review-day", tomorrow)
    wait.until(ready.text_to_be_present_in_element((By.ID, "review-status"), "no flagged part"))
    _set(browser, "review-day", datetime.now().strftime("%Y-%m-%d"))
    wait.until(lambda b: _card(b, "SN-R2") is not None)
    assert httpx.get(f"{base_url}/inspections/{second}").json()["review_label"] is None
    assert _fetched_from_elsewhere(browser, base_url) == []


@pytest.mark.parametrize(("path", "marker"), [("/docs", ".swagger-ui .info"), ("/redoc", "h1")])
def test_the_api_docs_render_from_the_servers_own_files(
    base_url: str, browser: webdriver.Chrome, path: str, marker: str
) -> None:
    browser.get(base_url + path)
    title = WebDriverWait(browser, WAIT_S).until(
        ready.visibility_of_element_located((By.CSS_SELECTOR, marker))
    )
    assert "glad-inspect" in title.text
    assert _fetched_from_elsewhere(browser, base_url) == []
