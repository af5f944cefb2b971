"""The labelling page at `/label` and its routes: items imported from an image folder and an items file, judged in a
real headless Chromium with the keyboard shortcuts and the buttons, stored in SQLite; the routes' refusals (paths,
names, bodies, the API key)."""

import io
import json
import os
import shutil

import httpx
import numpy as np
import pytest
from PIL import Image
from test_serve import KEY, Server

from ttalign.preferences import JudgmentStore
from ttalign.serve.labels import LabelService

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
DRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"


def _items(folder, items_file):
    os.makedirs(folder, exist_ok=True)
    for k in range(10):
        Image.fromarray(np.full((16, 16, 3), 20 * k, dtype=np.uint8)).save(os.path.join(folder, f"{k}.png"))
    items = [
        {"prompt": "a red circle", "images": ["0.png", "1.png"], "systems": ["base", "dpo"]},
        {"prompt": "a blue square", "images": ["2.png", "3.png"], "systems": ["base", "dpo"]},
        {"prompt": "two triangles", "images": ["4.png", "5.png"], "systems": ["dpo", "base"]},
        {"prompt": "a green circle", "images": ["6.png", "7.png", "8.png", "9.png"], "systems": ["a", "b", "c", "d"]},
    ]
    with open(items_file, "w") as f:
        f.write("\n".join(json.dumps(i) for i in items) + "\n")


def test_items_import_once_and_paths_stay_inside_the_folder(tmp_path):
    _items(tmp_path / "images", tmp_path / "items.jsonl")
    db = f"sqlite:///{tmp_path / 'labels.db'}"
    service = LabelService(db, str(tmp_path / "images"), str(tmp_path / "items.jsonl"))
    assert service.import_items(str(tmp_path / "items.jsonl")) == 0  # already imported
    assert len(service._items()) == 4
    (tmp_path / "secret.png").write_bytes(b"x")
    (tmp_path / "bad.jsonl").write_text(json.dumps({"prompt": "p", "images": ["../secret.png", "0.png"]}) + "\n")
    with pytest.raises(ValueError, match="not a file in the images folder"):
        service.import_items(str(tmp_path / "bad.jsonl"))
    (tmp_path / "bad.jsonl").write_text("{not json\n")
    with pytest.raises(ValueError, match="line 1: not JSON"):
        service.import_items(str(tmp_path / "bad.jsonl"))


def test_label_routes_refuse_what_they_should(tmp_path):
    _items(tmp_path / "images", tmp_path / "items.jsonl")
    db = str(tmp_path / "labels.db")
    server = Server(
        "--label-db", db, "--label-images", str(tmp_path / "images"), "--label-items", str(tmp_path / "items.jsonl")
    )
    auth = {"Authorization": f"Bearer {KEY}"}
    try:
        base = server.base
        assert httpx.get(f"{base}/v1/label/next?labeller=ana", timeout=10).status_code == 401  # the key is required
        first = httpx.get(f"{base}/v1/label/next?labeller=ana", headers=auth, timeout=10).json()
        assert first["item"]["prompt"] == "a red circle" and first["progress"] == {"done": 0, "total": 4}
        image = httpx.get(base + first["item"]["images"][1], headers=auth, timeout=10)
        assert image.status_code == 200 and image.headers["content-type"] == "image/png"
        assert np.asarray(Image.open(io.BytesIO(image.content))).mean() == 20
        for url in ("/v1/label/items/1/images/5", "/v1/label/items/99/images/0"):
            assert httpx.get(base + url, headers=auth, timeout=10).status_code == 404
        post = {**auth, "Content-Type": "application/json"}
        bad = [
            {"labeller": "ana", "choice": "middle"},
            {"labeller": "../../etc", "choice": "left"},
            {"labeller": "ana", "choice": "left", "path": "/etc/passwd"},
            {"labeller": "ana", "ranking": [0, 1]},
        ]
        for body in bad:
            r = httpx.post(f"{base}/v1/label/items/1", headers=post, content=json.dumps(body), timeout=10)
            assert r.status_code == 400, body
        r = httpx.post(f"{base}/v1/label/items/1", headers=post, content=b"{", timeout=10)
        assert r.status_code == 400
        judgment = {"labeller": "ana", "choice": "left"}
        r = httpx.post(f"{base}/v1/label/items/1", headers=post, json=judgment, timeout=10)
        assert r.status_code == 200 and r.json()["progress"] == {"done": 1, "total": 4}
    finally:
        server.close()
    assert [(r["labeller"], r["choice"]) for r in JudgmentStore(db).rows()] == [("ana", "left")]


@pytest.mark.skipif(
    not (os.path.exists(CHROMIUM) and os.path.exists(DRIVER)) and os.environ.get("CI") != "true",
    reason="needs Debian's chromium and chromium-driver (.ci/run installs them)",
)
def test_labelling_in_a_browser_with_keys_and_buttons(tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    _items(tmp_path / "images", tmp_path / "items.jsonl")
    db = str(tmp_path / "labels.db")
    server = Server(
        "--label-db",
        db,
        "--label-images",
        str(tmp_path / "images"),
        "--label-items",
        str(tmp_path / "items.jsonl"),
        key=None,
    )
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run"):
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path / 'profile'}")
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    driver.set_window_size(1300, 1000)
    wait = WebDriverWait(driver, 60)

    def prompt_is(text):  # and its images loaded: until then the page takes no pick ("loading")
        wait.until(
            lambda d: d.find_element(By.ID, "prompt").text == text and d.find_element(By.ID, "status").text == "ready"
        )

    try:
        driver.get(server.base + "/label")
        driver.find_element(By.ID, "labeller").send_keys("ana")
        driver.find_element(By.ID, "start").click()
        prompt_is("a red circle")
        assert driver.find_element(By.ID, "progress").text == "0 / 4 judged"
        assert driver.find_element(By.ID, "image-1").get_attribute("src").startswith("blob:")
        body = driver.find_element(By.TAG_NAME, "body")
        body.send_keys("1")  # left
        prompt_is("a blue square")
        driver.find_element(By.ID, "right").click()
        prompt_is("two triangles")
        body.send_keys(Keys.ARROW_DOWN)  # tie
        prompt_is("a green circle")
        assert driver.find_element(By.ID, "pair-buttons").get_attribute("hidden") is not None
        for key in "31":
            body.send_keys(key)
        body.send_keys("u")  # undo the second pick
        driver.find_element(By.ID, "image-3").click()
        for key in "12":
            body.send_keys(key)
        wait.until(lambda d: d.find_element(By.ID, "status").text == "done")
        assert driver.find_element(By.ID, "progress").text == "4 / 4 judged"
        driver.save_screenshot(str(tmp_path / "label.png"))
    finally:
        driver.quit()
        server.close()
    rows = JudgmentStore(db).rows()
    assert [(r["item"]["prompt"], r["choice"], r["ranking"]) for r in rows] == [
        ("a red circle", "left", None),
        ("a blue square", "right", None),
        ("two triangles", "tie", None),
        ("a green circle", None, [2, 3, 0, 1]),
    ]


def test_label_items_from_a_pipeline_feed_the_page(tmp_path, capsys):
    """`ttalign label-items` writes one image per system and prompt (same seed) and an items file the labelling
    service imports; the judgments then compare the systems."""
    from ttalign.cli import main
    from ttalign.preferences import win_rates

    (tmp_path / "prompts.txt").write_text("a red circle\na blue square\n")
    out = tmp_path / "items"
    code = main(
        ["label-items", "--prompts", str(tmp_path / "prompts.txt"), "--model", "tiny", "--steps", "2"]
        + ["--system", "plain", "--system", "best_of_2=best_of_n:n=2,reward=jpeg_compressibility"]
        + ["--out", str(out), "--height", "32", "--width", "32"]
    )
    assert code == 0
    records = [json.loads(line) for line in (out / "items.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in records] == ["a red circle", "a blue square"]
    assert all(sorted(r["systems"]) == ["best_of_2", "plain"] for r in records)
    service = LabelService(f"sqlite:///{tmp_path / 'labels.db'}", str(out), str(out / "items.jsonl"))
    for item in service._items():
        winner = item["systems"].index("best_of_2")
        service.record(item["id"], {"labeller": "ana", "choice": ["left", "right"][winner]})
    rates = win_rates(service.store.judgments(), bootstrap=50)
    assert rates[("best_of_2", "plain")]["wins"] == 2
    assert main(["label-items", "--prompts", str(tmp_path / "prompts.txt"), "--system", "plain", "--out", "x"]) == 2
    assert "two or four systems" in capsys.readouterr().err
