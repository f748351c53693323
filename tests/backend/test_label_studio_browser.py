"""Headless Chromium against the real Label Studio UI.

1. A person paints a stroke on frame 1 and submits: the webhook propagates it and the
   prediction (stored through the API) returns the stroke exactly as the browser encoded it.
2. A propagated mask shows on a frame nobody drew: a keyframe on frame 0 is propagated (by
   the annotation webhook), the annotation is removed so that opening the task pre-labels it
   with the prediction, and the pager is moved to frame 6; the mask colour (magenta, absent from
   the clip) must cover a good part of the chair there. Set XMEM_LABEL_SCREENSHOT=<path> to
   keep the screenshot (docs/images/label-studio.png was made so).
3. The frames to check next show in the labeling screen: with the recommended config's
   read-only `xmem_status` TextArea, the prediction's suggestions are on the page, with their
   reasons (XMEM_LABEL_SUGGESTIONS_SCREENSHOT=<path> keeps the screenshot;
   docs/images/label-studio-suggestions.png was made so).
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from xmem_label.backend.rle import rle_to_mask

from .test_label_studio_e2e import (
    HEIGHT,
    WIDTH,
    brush,
    chair,
    clip_urls,
    wait_for_prediction,
)

webdriver = pytest.importorskip("selenium.webdriver")
from selenium.webdriver.chrome.options import Options  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.action_chains import ActionChains  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402

pytestmark = pytest.mark.browser

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
CONFIG = """<View>
  <Image name="image" valueList="$frames"/>
  <BrushLabels name="mask" toName="image"><Label value="Chair" background="#FF00FF"/></BrushLabels>
</View>"""
STATUS_CONFIG = CONFIG.replace(
    "</View>", '  <TextArea name="xmem_status" toName="image" rows="5" readonly="true"/>\n</View>'
)
NEXT_FRAME = ".lsf-pagination__btn_arrow-right:not(.lsf-pagination__btn_arrow-right-double)"
SHOWN_FRAME = 5  # 0-based; the pager then reads "6 of 8"


def magenta_pixels(image: np.ndarray) -> int:
    red, green, blue = (image[:, :, channel].astype(int) for channel in range(3))
    return int(((red - green > 60) & (blue - green > 60)).sum())


@pytest.fixture(scope="module")
def browser(label_studio):
    """A logged-in headless Chromium."""
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        pytest.skip("chromium and chromedriver are not installed")
    options = Options()
    options.binary_location = str(CHROMIUM)
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--window-size=1400,1000",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    try:
        driver.get(f"{label_studio.url}/user/login/")
        driver.find_element(By.NAME, "email").send_keys("e2e@example.com")
        driver.find_element(By.NAME, "password").send_keys("e2e-password-123")
        driver.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
        _wait(lambda: "/user/login" not in driver.current_url, "login")
        yield driver
    finally:
        driver.quit()


def new_task(label_studio, backend, config: str = CONFIG) -> tuple[int, int]:
    project_id = label_studio.project("browser", config)
    label_studio.api(
        "POST",
        f"/api/projects/{project_id}/import",
        json=[{"frames": clip_urls(label_studio, project_id)}],
    )
    (task,) = label_studio.tasks(project_id)
    label_studio.connect(project_id, backend)
    return project_id, task["id"]


def prelabelled_task(label_studio, backend, config: str) -> tuple[int, int, dict]:
    """A task whose keyframe on frame 0 the annotation webhook propagated, the annotation then
    removed, so that opening the task pre-labels it with the stored prediction."""
    project_id, task_id = new_task(label_studio, backend, config)
    annotation = label_studio.api(
        "POST", f"/api/tasks/{task_id}/annotations", json={"result": [brush(0, "Chair", chair(0))]}
    )
    prediction = wait_for_prediction(label_studio, task_id)
    label_studio.api("DELETE", f"/api/annotations/{annotation['id']}")
    label_studio.api(
        "PATCH",
        f"/api/projects/{project_id}",
        json={"show_collab_predictions": True, "model_version": prediction["model_version"]},
    )
    return project_id, task_id, prediction


def test_a_stroke_painted_in_the_browser_is_propagated_on_submit(label_studio, backend, browser):
    project_id, task_id = new_task(label_studio, backend)
    browser.get(f"{label_studio.url}/projects/{project_id}/data?task={task_id}")
    stage = _wait(lambda: browser.find_element(By.CSS_SELECTOR, ".konvajs-content"), "the image")
    image = _wait(lambda: browser.find_element(By.CSS_SELECTOR, ".lsf-object img"), "the frame")
    time.sleep(1)
    ActionChains(browser).send_keys("1").perform()  # the label's hotkey selects the brush

    def at(fx: float, fy: float) -> tuple[int, int]:  # offsets from the stage's centre
        frame, canvas = image.rect, stage.rect
        return (
            int(frame["x"] + fx * frame["width"] - canvas["x"] - canvas["width"] / 2),
            int(frame["y"] + fy * frame["height"] - canvas["y"] - canvas["height"] / 2),
        )

    stroke = ActionChains(browser).move_to_element_with_offset(stage, *at(0.40, 0.10))
    stroke.click_and_hold()
    for fy in (0.12, 0.15, 0.20, 0.25, 0.30):
        stroke.move_to_element_with_offset(stage, *at(0.40, fy)).pause(0.05)
    stroke.release().perform()
    time.sleep(0.5)
    browser.find_element(By.XPATH, "//button[contains(., 'Submit')]").click()

    prediction = wait_for_prediction(label_studio, task_id)  # webhook -> job -> API
    (annotation,) = label_studio.api("GET", f"/api/tasks/{task_id}")["annotations"]
    (painted,) = annotation["result"]
    assert painted["origin"] == "manual" and painted["original_width"] == WIDTH
    returned = next(r for r in prediction["result"] if r["item_index"] == 0)
    assert returned["value"]["rle"] == painted["value"]["rle"]  # exactly as painted
    assert rle_to_mask(painted["value"]["rle"], WIDTH, HEIGHT).sum() > 20
    assert len({r["item_index"] for r in prediction["result"]}) > 1


def test_browser_shows_a_propagated_mask_on_a_frame_nobody_drew(
    label_studio, backend, browser, tmp_path
):
    project_id, task_id, prediction = prelabelled_task(label_studio, backend, CONFIG)
    assert any(r["item_index"] == SHOWN_FRAME for r in prediction["result"])

    browser.get(f"{label_studio.url}/projects/{project_id}/data?task={task_id}")
    next_frame = _wait(lambda: browser.find_element(By.CSS_SELECTOR, NEXT_FRAME), "the pager")
    for _ in range(SHOWN_FRAME):
        next_frame.click()
        time.sleep(0.3)
    indicator = browser.find_element(By.CSS_SELECTOR, ".lsf-pagination__page-indicator").text
    assert indicator.split()[0] == str(SHOWN_FRAME + 1), indicator
    time.sleep(2)  # let the canvas draw the masks
    rect = browser.find_element(By.CSS_SELECTOR, ".lsf-object img").rect
    shot = tmp_path / "browser.png"
    browser.save_screenshot(str(shot))

    screenshot = np.asarray(Image.open(shot).convert("RGB"))
    x0, y0 = int(rect["x"]), int(rect["y"])
    shown = screenshot[y0 : y0 + int(rect["height"]), x0 : x0 + int(rect["width"])]
    scale = (rect["width"] / WIDTH) * (rect["height"] / HEIGHT)
    chair_on_screen = chair(SHOWN_FRAME).sum() * scale
    assert magenta_pixels(shown) > 0.3 * chair_on_screen, (magenta_pixels(shown), chair_on_screen)
    if os.environ.get("XMEM_LABEL_SCREENSHOT"):
        shutil.copy(shot, os.environ["XMEM_LABEL_SCREENSHOT"])


def test_the_frames_to_check_next_show_in_the_labeling_screen(
    label_studio, backend, browser, tmp_path
):
    project_id, task_id, prediction = prelabelled_task(label_studio, backend, STATUS_CONFIG)
    (status,) = [r for r in prediction["result"] if r["type"] == "textarea"]
    lines = status["value"]["text"]
    assert len(lines) == 5 and all(line.startswith("check frame ") for line in lines)

    browser.get(f"{label_studio.url}/projects/{project_id}/data?task={task_id}")
    _wait(lambda: browser.find_element(By.CSS_SELECTOR, ".lsf-object img"), "the frame")
    page = _wait(
        lambda: (text := browser.find_element(By.TAG_NAME, "body").text) and lines[0] in text
        and text, "the suggestions on the page"
    )  # fmt: skip
    assert all(line in page for line in lines)
    shown = browser.find_element(By.XPATH, f"//*[contains(text(), '{lines[0][:14]}')]")
    browser.execute_script("arguments[0].scrollIntoView({block: 'center'})", shown)
    time.sleep(0.5)
    shot = tmp_path / "suggestions.png"
    browser.save_screenshot(str(shot))
    if os.environ.get("XMEM_LABEL_SUGGESTIONS_SCREENSHOT"):
        shutil.copy(shot, os.environ["XMEM_LABEL_SUGGESTIONS_SCREENSHOT"])


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
