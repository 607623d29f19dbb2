"""The report in a real headless browser (Debian's chromium and chromium-driver, driven by
selenium): hostile captions run no script and break no layout, the console stays clean, and
every image decodes. Skipped, with the reason, where the browser or its driver is missing."""

from __future__ import annotations

import re
import shutil

import pytest
from test_report import HOSTILE, scored, write  # noqa: F401  (the module's fixture)

BROWSER = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--window-size=1280,2000",
)


@pytest.fixture
def driver(tmp_path):
    """A fresh headless chromium with its own profile directory."""
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed")
    if not BROWSER or not DRIVER:
        pytest.skip(
            "chromium or chromedriver not found: apt-get install chromium chromium-driver "
            "(make test does so when run as root)"
        )
    options = webdriver.ChromeOptions()
    options.binary_location = BROWSER
    for flag in FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path / 'profile'}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    from selenium.webdriver.chrome.service import Service

    browser = webdriver.Chrome(service=Service(DRIVER), options=options)
    yield browser
    browser.quit()


def test_hostile_captions_are_text_in_a_real_browser(scored, driver, tmp_path):  # noqa: F811
    out = write(scored, tmp_path / "report.html")
    text = out.read_text()
    driver.get(out.as_uri())
    assert driver.execute_script("return document.readyState") == "complete"
    # no caption ran: the title is the page's own, the scripts' flag was never set
    assert driver.title == "mmcurate report"
    assert driver.execute_script("return typeof window.pwned") == "undefined"
    assert driver.execute_script("return document.scripts.length") == 0
    # the captions are shown as text, whole, in the cards that hold them
    shown = driver.execute_script(
        "return Array.from(document.querySelectorAll('.card .cap')).map(e => e.textContent)"
    )
    assert len(shown) == text.count("class='cap'") and len(shown) >= 40
    assert {c for c in shown} <= set(HOSTILE) and set(HOSTILE) <= set(shown)
    # layout: every table has the rows the page wrote; every card sits in a card row
    counts = driver.execute_script(
        "return Array.from(document.querySelectorAll('table')).map(t => t.rows.length)"
    )
    written = [t.count("<tr>") for t in re.findall(r"<table.*?</table>", text, re.S)]
    assert counts == written and len(counts) >= 6
    assert driver.execute_script(
        "return Array.from(document.querySelectorAll('.card')).every("
        "c => c.parentElement.classList.contains('cards'))"
    )
    assert driver.execute_script("return document.querySelectorAll('.card').length") == text.count(
        "<div class='card "
    )
    # every image (histograms and thumbnails) decoded
    images = driver.execute_script(
        "return Array.from(document.images).map(i => i.complete && i.naturalWidth > 0)"
    )
    assert len(images) >= 44 and all(images)
    errors = [e for e in driver.get_log("browser") if e["level"] in ("SEVERE", "WARNING")]
    assert errors == []
    driver.save_screenshot(str(tmp_path / "report.png"))
    assert (tmp_path / "report.png").stat().st_size > 10_000
