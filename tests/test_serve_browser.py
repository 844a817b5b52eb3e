"""``kakusan serve`` in a real headless Chromium (Debian's chromium + chromium-driver, driven by selenium): pick a
class, set steps and seed, click Generate, watch the live preview, wait for the image, and check its pixels and
the generation record of the PNG the page offers for download; then drop that PNG on the page and check the
settings come back. Screenshots (mid-generation and after) go to the test artifacts folder."""

from __future__ import annotations

import io
import shutil
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from test_serve import ARTIFACTS, served

CHROMIUM, CHROMEDRIVER = shutil.which("chromium") or "/usr/bin/chromium", shutil.which("chromedriver") or \
    "/usr/bin/chromedriver"


@pytest.fixture
def browser(tmp_path):
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install selenium)")
    if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
        pytest.skip("no Chromium here: apt-get install -y chromium chromium-driver (.ci/run does)")
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
              "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync",
              "--window-size=1400,1100", f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        opts.add_argument(a)
    driver = webdriver.Chrome(options=opts, service=Service(CHROMEDRIVER))
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def wait_for(fn, timeout=60.0, every=0.05, what="a condition"):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            v = fn()
            if v:
                return v
        except Exception:  # noqa: BLE001 - an element not there yet
            pass
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what}")


def set_number(driver, elem_id: str, value) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    box = driver.find_element(By.CSS_SELECTOR, f"#{elem_id} input[type=number]")
    box.send_keys(Keys.CONTROL, "a")
    box.send_keys(str(value), Keys.TAB)


def pick(driver, elem_id: str, option: str) -> None:
    """Choose ``option`` in a Gradio dropdown the way a person does: open it, click the option."""
    from selenium.webdriver.common.by import By

    driver.find_element(By.CSS_SELECTOR, f"#{elem_id} input").click()
    item = wait_for(lambda: driver.find_element(By.CSS_SELECTOR, f'li[role=option][aria-label="{option}"]'), 10,
                    what=f"option {option!r}")
    item.click()


def test_generate_in_a_real_browser(browser, tmp_path):
    from PIL import Image
    from selenium.webdriver.common.by import By

    from kakusan.pipeline import read_png_record

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with served("--preview-every", "4", "--max-steps", "400") as (url, _proc):
        d = browser
        d.get(url)
        wait_for(lambda: d.find_element(By.ID, "generate").is_displayed(), 60, what="the page")
        pick(d, "class", "7")
        pick(d, "sampler", "heun")
        set_number(d, "steps", 160)  # long enough to be seen mid-way
        set_number(d, "seed", 4242)
        set_number(d, "n", 4)
        d.find_element(By.ID, "generate").click()

        def state():
            el = d.find_element(By.ID, "progress-state")
            return int(el.get_attribute("data-done")), int(el.get_attribute("data-total"))

        mid = wait_for(lambda: (lambda s: s if 0.3 * s[1] <= s[0] < s[1] and d.find_elements(
            By.CSS_SELECTOR, "#preview img") else None)(state()), 120, what="the live preview mid-generation")
        d.save_screenshot(str(ARTIFACTS / "serve-mid-generation.png"))
        assert mid[1] == 160 and "s left" in d.find_element(By.ID, "progress").text

        img = wait_for(lambda: d.find_elements(By.CSS_SELECTOR, "#results img"), 300, what="the result image")[0]
        wait_for(lambda: state()[0] == state()[1] == 160, 30, what="the progress at 160 / 160")
        time.sleep(0.5)
        d.save_screenshot(str(ARTIFACTS / "serve-done.png"))

        # the PNG the page shows and offers for download: its pixels and its record
        with urllib.request.urlopen(img.get_attribute("src"), timeout=30) as r:
            data = r.read()
        png = tmp_path / "downloaded.png"
        png.write_bytes(data)
        rec = read_png_record(png)
        assert (rec["seed"], rec["steps"], rec["sampler"], rec["class_label"], rec["n"]) == (4242, 160, "heun", 7, 4)
        arr = np.asarray(Image.open(io.BytesIO(data)).convert("L"), dtype=np.float64)
        assert arr.shape == (8, 8) and arr.std() > 20 and 0 < arr.mean() < 255
        # and on screen: the rendered result is not blank either
        shot = np.asarray(Image.open(io.BytesIO(img.screenshot_as_png)).convert("L"), dtype=np.float64)
        assert shot.std() > 20
        links = d.find_elements(By.CSS_SELECTOR, "#files a")
        assert len(links) == 4 and all(a.get_attribute("href") for a in links)

        # drop the PNG on "restore settings": the controls come back to how it was made
        set_number(d, "seed", 1)
        set_number(d, "steps", 5)
        d.find_element(By.CSS_SELECTOR, "#restore input[type=file]").send_keys(str(png))
        seed_box = d.find_element(By.CSS_SELECTOR, "#seed input")
        wait_for(lambda: seed_box.get_attribute("value") == "4242", 30, what="the restored seed")
        assert d.find_element(By.CSS_SELECTOR, "#steps input[type=number]").get_attribute("value") == "160"
        assert "made with tiny-class" in d.find_element(By.ID, "status").text
