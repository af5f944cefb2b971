"""The playground page at `/`, driven in a real headless Chromium (Debian's chromium and chromium-driver)."""

import os
import shutil

import pytest
from test_serve import Server

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
DRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"


# skipped only off CI, where a browser may be missing; CI (`CI=true`, where .ci/run installs them) runs it or fails
@pytest.mark.skipif(
    not (os.path.exists(CHROMIUM) and os.path.exists(DRIVER)) and os.environ.get("CI") != "true",
    reason="needs Debian's chromium and chromium-driver (.ci/run installs them; `apt-get install chromium "
    "chromium-driver` here)",
)
def test_playground_shows_plain_and_aligned_side_by_side(tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    server = Server("--allow", "best_of_n", "--allow", "seed_search", "--reward", "shapes_soft", key=None)
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    driver.set_window_size(1100, 1300)
    try:
        driver.get(server.base + "/")
        wait = WebDriverWait(driver, 120)
        wait.until(lambda d: len(Select(d.find_element(By.ID, "method")).options) == 2)
        assert [o.text for o in Select(driver.find_element(By.ID, "method")).options] == ["best_of_n", "seed_search"]
        Select(driver.find_element(By.ID, "method")).select_by_visible_text("best_of_n")
        settable = driver.find_element(By.ID, "settable").text
        assert "n: integer 1-16" in settable and "reward: shapes_soft" in settable
        driver.find_element(By.ID, "options").send_keys("n=3,reward=shapes_soft")
        driver.find_element(By.ID, "go").click()
        wait.until(lambda d: d.find_element(By.ID, "status").text == "done")
        for side in ("plain", "aligned"):
            src = driver.find_element(By.ID, f"{side}-img").get_attribute("src")
            assert src.startswith("data:image/png;base64,") and len(src) > 200
        plain = driver.find_element(By.ID, "plain-meta").text
        aligned = driver.find_element(By.ID, "aligned-meta").text
        assert "seed 0" in plain and "NFE 25" in plain and "reward" not in plain
        assert "reward 0." in aligned and "NFE 75" in aligned  # three candidates of 25 steps
        driver.save_screenshot(str(tmp_path / "playground.png"))
        # a refused method shows the server's error message on the page
        Select(driver.find_element(By.ID, "method")).select_by_visible_text("seed_search")
        driver.find_element(By.ID, "options").clear()
        driver.find_element(By.ID, "options").send_keys("n=1000,reward=shapes_soft")
        driver.find_element(By.ID, "go").click()
        wait.until(lambda d: d.find_element(By.ID, "status").text == "done")
        assert "must be between 1 and 16, got 1000" in driver.find_element(By.ID, "aligned-meta").text
    finally:
        driver.quit()
        server.close()
