"""The one browser check: headless Chromium shows a propagated mask on a frame nobody drew.

A keyframe on frame 0 is propagated by "Retrieve predictions"; the annotation is then removed
so that opening the task pre-labels it with the prediction, and the pager is moved to frame 6.
The mask colour (magenta, absent from the clip) must cover a good part of the chair there.
Set XMEM_LABEL_SCREENSHOT=<path> to keep the screenshot (backend/screenshot.png was made so).
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from .test_label_studio_e2e import FRAMES, HEIGHT, WIDTH, brush, chair

webdriver = pytest.importorskip("selenium.webdriver")
from selenium.webdriver.chrome.options import Options  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
CONFIG = """<View>
  <Image name="image" valueList="$frames"/>
  <BrushLabels name="mask" toName="image"><Label value="Chair" background="#FF00FF"/></BrushLabels>
</View>"""
NEXT_FRAME = ".lsf-pagination__btn_arrow-right:not(.lsf-pagination__btn_arrow-right-double)"
SHOWN_FRAME = 5  # 0-based; the pager then reads "6 of 8"


def magenta_pixels(image: np.ndarray) -> int:
    red, green, blue = (image[:, :, channel].astype(int) for channel in range(3))
    return int(((red - green > 60) & (blue - green > 60)).sum())


@pytest.mark.skipif(not (CHROMIUM.exists() and CHROMEDRIVER.exists()),
                    reason="chromium and chromedriver are not installed")
def test_browser_shows_a_propagated_mask_on_a_frame_nobody_drew(label_studio, backend, tmp_path):
    project_id = label_studio.project("browser", CONFIG)
    folder = label_studio.media_folder(project_id, "chair")
    for path in FRAMES:
        shutil.copy(path, folder / path.name)
    urls = [label_studio.url_of(folder / path.name) for path in FRAMES]
    label_studio.api("POST", f"/api/projects/{project_id}/import", json=[{"frames": urls}])
    (task,) = label_studio.tasks(project_id)
    annotation = label_studio.api("POST", f"/api/tasks/{task['id']}/annotations",
                                  json={"result": [brush(0, "Chair", chair(0))]})
    label_studio.connect(project_id, backend)
    label_studio.retrieve_predictions(project_id, [task["id"]])
    (prediction,) = label_studio.predictions(task["id"])
    assert any(r["item_index"] == SHOWN_FRAME for r in prediction["result"])
    label_studio.api("DELETE", f"/api/annotations/{annotation['id']}")
    label_studio.api("PATCH", f"/api/projects/{project_id}", json={
        "show_collab_predictions": True, "model_version": prediction["model_version"]})

    options = Options()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--window-size=1400,1000"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    try:
        driver.get(f"{label_studio.url}/user/login/")
        driver.find_element(By.NAME, "email").send_keys("e2e@example.com")
        driver.find_element(By.NAME, "password").send_keys("e2e-password-123")
        driver.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
        _wait(lambda: "/user/login" not in driver.current_url, "login")
        driver.get(f"{label_studio.url}/projects/{project_id}/data?task={task['id']}")
        next_frame = _wait(lambda: driver.find_element(By.CSS_SELECTOR, NEXT_FRAME), "the pager")
        for _ in range(SHOWN_FRAME):
            next_frame.click()
            time.sleep(0.3)
        indicator = driver.find_element(By.CSS_SELECTOR, ".lsf-pagination__page-indicator").text
        assert indicator.split()[0] == str(SHOWN_FRAME + 1), indicator
        time.sleep(2)  # let the canvas draw the masks
        image_element = driver.find_element(By.CSS_SELECTOR, ".lsf-object img")
        rect = image_element.rect
        shot = tmp_path / "browser.png"
        driver.save_screenshot(str(shot))
    finally:
        driver.quit()

    screenshot = np.asarray(Image.open(shot).convert("RGB"))
    x0, y0 = int(rect["x"]), int(rect["y"])
    shown = screenshot[y0:y0 + int(rect["height"]), x0:x0 + int(rect["width"])]
    scale = (rect["width"] / WIDTH) * (rect["height"] / HEIGHT)
    chair_on_screen = chair(SHOWN_FRAME).sum() * scale
    assert magenta_pixels(shown) > 0.3 * chair_on_screen, (magenta_pixels(shown), chair_on_screen)
    if os.environ.get("XMEM_LABEL_SCREENSHOT"):
        shutil.copy(shot, os.environ["XMEM_LABEL_SCREENSHOT"])


def _wait(condition, what: str, seconds: float = 60):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            value = condition()
            if value:
                return value
        except Exception:  # the element is not there yet
            pass
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")
