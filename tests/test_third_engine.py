"""The proof that adding an engine touches no file of xmem-label: a toy engine in a package of
its own (tests/conftest.py's `toy_engine_path`: a module and an `xmem_label.engines` entry
point) works through the command line and the Label Studio backend as soon as it is on the
path. The FiftyOne side is tests/plugin/test_third_engine.py."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from xmem_label.backend.app import create_app
from xmem_label.backend.model import Runtime
from xmem_label.backend.rle import rle_to_mask
from xmem_label.model import WeightsError, read_label_mask
from xmem_label.model.engine import EngineSpec, engine_spec

from .backend.test_app import config, keyframe_task, make_settings

CHAIR = Path(__file__).parent / "data" / "vos" / "chair"
SCRIPT = Path(sys.executable).with_name("xmem-label")


def test_the_command_line_propagates_with_the_toy_engine(toy_engine_path, tmp_path):
    env = dict(os.environ, PYTHONPATH=str(toy_engine_path), OMP_NUM_THREADS="1")
    keyframe = CHAIR / "masks" / "frame_000000.png"
    out = tmp_path / "out"
    done = subprocess.run(
        [
            SCRIPT,
            "propagate",
            CHAIR / "frames",
            "--mask",
            f"0={keyframe}",
            "--out",
            out,
            "--engine",
            "toy",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    masks = sorted(out.glob("*.png"))
    assert len(masks) == 8
    first = read_label_mask(keyframe)
    assert all(np.array_equal(np.asarray(Image.open(m)), first) for m in masks)  # kept as is
    refused = subprocess.run(
        [
            SCRIPT,
            "propagate",
            CHAIR / "frames",
            "--mask",
            f"0={keyframe}",
            "--out",
            tmp_path / "other",
            "--engine",
            "toy",
            "--size",
            "320",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert refused.returncode == 2
    assert "--size apply to the xmem engine only; the toy engine" in refused.stderr
    listed = subprocess.run(
        [SCRIPT, "serve", "--help"], env=env, capture_output=True, text=True, timeout=120
    )
    assert "toy" in listed.stdout


def test_the_backend_predicts_with_the_toy_engine(toy_engine, tmp_path):
    settings = dataclasses.replace(make_settings(tmp_path), engine="toy")
    runtime = Runtime(settings).start()
    try:
        client = create_app(runtime).test_client()
        setup = client.post("/setup", json={"project": "1.0", "schema": config("mask", "C")})
        assert setup.json["model_version"].startswith("xmem-label-0.1.0-toy-no-weights-")
        reply = client.post(
            "/predict",
            json={
                "tasks": [keyframe_task(3, "mask", "C")],
                "project": "1.0",
                "label_config": config("mask", "C"),
            },
        )
        assert reply.status_code == 200, reply.json
        (prediction,) = reply.json["results"]
        first = read_label_mask(CHAIR / "masks" / "frame_000000.png") == 1
        masks = [rle_to_mask(r["value"]["rle"], 240, 160) for r in prediction["result"]]
        assert len(masks) == 8 and all(np.array_equal(m > 0, first) for m in masks)
    finally:
        runtime.runner.stop()


def toy_weights_not_here(weights: str | None, *, download: bool) -> Path:
    raise WeightsError(f"toy weights {weights or 'toy.pth'} are not here (download={download})")


def test_an_engine_with_weights_finds_them_itself():
    """Whether an engine can run here without a download is its own `find_weights` hook's
    answer (what "auto" asks); model/engine.py knows no engine's checkpoints."""
    toy = EngineSpec(
        "toy-with-weights",
        "toy engine that needs weights",
        "xmem_label.model.baselines:CopyFirstMaskEngine",
        find_weights="tests.test_third_engine:toy_weights_not_here",
    )
    assert toy.needs_weights and not engine_spec("flow").needs_weights
    assert toy.missing("mine.pth") == "toy weights mine.pth are not here (download=False)"
    assert engine_spec("flow").missing() is None
