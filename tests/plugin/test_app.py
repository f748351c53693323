"""Browser check: the FiftyOne App, in headless Chromium, shows propagated masks on a video.

The masks are made through the App server's own endpoint for generator operators, which
streams the run's progress, reload and notification messages back.
The keyframe is the clip's last frame, so the frame the App opens on (frame 1) carries a mask
the engine propagated backwards. Two screenshots of the sample's modal, with and without the
propagated field, must differ where the mask is drawn. XMEM_LABEL_SAVE_SCREENSHOT=1 also saves
the first one as docs/images/fiftyone.png (the plugin README's picture).

The annotation loop's review view: the saved frames view "suggest frames to review" makes
opens in the App on its first frame (rank 1), which draws that frame's propagated labels and
the review label (rank and reasons). No picture of it is saved: in headless Chromium the
player is still seeking when the screenshot is taken, so the labels of the suggested frame
are drawn over the video's first frame.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
import urllib.request

import cv2
import fiftyone as fo  # noqa: I001  (conftest has set the environment)
import numpy as np
import pytest
from PIL import Image

from .conftest import PLUGIN_NAME, REPO, run_operator

pytestmark = pytest.mark.browser

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
WINDOW = (1400, 900)


def screenshot(url: str, path) -> np.ndarray:
    subprocess.run(
        [
            CHROMIUM,
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--hide-scrollbars",
            f"--window-size={WINDOW[0]},{WINDOW[1]}",
            "--virtual-time-budget=20000",
            f"--screenshot={path}",
            url,
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    return np.asarray(Image.open(path).convert("RGB")).astype(np.int16)


def post(url: str, endpoint: str, dataset: fo.Dataset, **params) -> str:
    """POST to the App server's operator endpoint as the App does, for "propagate masks"."""
    body = json.dumps(
        {
            "operator_uri": f"{PLUGIN_NAME}/propagate_masks",
            "dataset_name": dataset.name,
            "view": [],
            "params": params,
            "target": "inputs",
        }
    ).encode()
    request = urllib.request.Request(
        f"{url.rstrip('/')}/operators/{endpoint}",
        data=body,
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=120) as response:
        return response.read().decode()


def execute_through_app(url: str, dataset: fo.Dataset, **params) -> list[dict]:
    """Run "propagate masks" as the App does (a generator operator: streamed JSON lines)."""
    lines = post(url, "execute/generator", dataset, **params).splitlines()
    return [json.loads(line) for line in lines if line]


def show(session: fo.Session, view, sample_id: str) -> None:
    """Point the App at `view` with `sample_id` open, once the session's client has connected
    to the App server (a busy machine can take seconds)."""
    deadline = time.monotonic() + 60
    while True:
        try:
            session.view = view
            session.sample_id = sample_id
            return
        except RuntimeError:  # "Client is not connected"
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


@pytest.mark.skipif(CHROMIUM is None, reason="needs chromium (apt-get install chromium)")
def test_app_shows_propagated_masks(dataset, tmp_path):
    sample = dataset.first()
    dataset.set_values(
        "frames.last", {sample.id: {8: sample.frames[8].truth.copy()}}, key_field="id"
    )
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    session = fo.launch_app(dataset, remote=True, address="127.0.0.1", port=port, auto=False)
    try:
        form = json.loads(post(session.url, "resolve-type", dataset))  # the App's input form
        fields = form["type"]["properties"]
        assert {"prompt_field", "label_field", "engine", "delegate"} <= set(fields)
        assert fields["label_field"]["default"] == "xmem"
        messages = execute_through_app(
            session.url, dataset, prompt_field="last", label_field="xmem"
        )
        dataset.reload()
        assert dataset.first().frames[1].xmem.detections[0].keyframe is False
        # A pair of screenshots, again (at most twice more) when their difference is not one
        # compact region: one of them showed a page still loading, once, on a loaded machine.
        for _ in range(3):
            show(session, dataset.select_fields("frames.xmem"), sample.id)  # modal on frame 1
            with_masks = screenshot(session.url, tmp_path / "masks.png")
            show(session, dataset.select_fields(), sample.id)
            without = screenshot(session.url, tmp_path / "plain.png")
            changed = drawn_on_player(with_masks, without)
            if one_compact_region(changed):
                break
    finally:
        session.close()

    triggered = [m["body"]["operator_uri"] for m in messages]
    assert triggered[0] == "set_progress" and triggered[-2:] == ["reload_dataset", "notify"]

    rows, cols = np.nonzero(changed)
    assert changed.sum() > 2000, "no mask drawn on the video"
    # one compact region, the mask and its box (the chair is top left of the frame)
    assert one_compact_region(changed)
    assert cols.max() < changed.shape[1] / 2
    if os.environ.get("XMEM_LABEL_SAVE_SCREENSHOT"):
        shutil.copy(tmp_path / "masks.png", REPO / "docs" / "images" / "fiftyone.png")


def one_compact_region(changed: np.ndarray) -> bool:
    """Whether the changed pixels fit a box of at most 15 % of the player."""
    rows, cols = np.nonzero(changed)
    return (
        rows.size > 0
        and (rows.max() - rows.min()) * (cols.max() - cols.min()) < 0.15 * changed.size
    )


def drawn_on_player(shot: np.ndarray, plain: np.ndarray) -> np.ndarray:
    """Where two screenshots of the modal differ in its player part (the sidebars list
    fields), minus thin lines and edges (the frame lands a fraction of a pixel apart)."""
    player = (slice(60, 780), slice(30, 1050))
    changed = (np.abs(shot - plain).sum(axis=2)[player] > 60).astype(np.uint8)
    return cv2.morphologyEx(changed, cv2.MORPH_OPEN, np.ones((5, 5), np.uint8))


@pytest.mark.skipif(CHROMIUM is None, reason="needs chromium (apt-get install chromium)")
def test_app_opens_the_suggested_frames_view(dataset, tmp_path, monkeypatch):
    monkeypatch.setenv("XMEM_LABEL_FIFTYONE_CACHE", str(tmp_path / "cache"))
    sample = dataset.first()
    dataset.set_values("frames.gt", {sample.id: {8: sample.frames[8].truth.copy()}}, key_field="id")
    corrected = run_operator(
        f"{PLUGIN_NAME}/propagate_corrections",
        dataset,
        prompt_field="gt",
        label_field="xmem",
        engine="flow",
    )
    assert corrected.error is None, corrected.error
    suggested = run_operator(f"{PLUGIN_NAME}/suggest_frames", dataset, label_field="xmem", count=3)
    assert suggested.error is None, suggested.error
    review = dataset.load_saved_view("xmem review")
    assert review.values("xmem_review.rank") == [1, 2, 3]
    first = review.first()
    assert first.xmem_review.label.startswith("#1: ") and first.xmem.detections
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    session = fo.launch_app(dataset, remote=True, address="127.0.0.1", port=port, auto=False)
    shown = review.exclude_fields(["gt", "truth"])  # the propagated labels and the review only
    try:
        show(session, shown, first.id)  # the modal on the rank-1 frame
        shot = screenshot(session.url, tmp_path / "review.png")
        show(session, shown.exclude_fields(["xmem", "xmem_review"]), first.id)
        plain = screenshot(session.url, tmp_path / "plain.png")
    finally:
        session.close()
    changed = drawn_on_player(shot, plain)
    assert changed.sum() > 2000, "no label drawn on the frame"
