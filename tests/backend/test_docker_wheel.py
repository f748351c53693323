"""The backend image's package, without a Docker engine: the files backend/Dockerfile copies
(read from its COPY lines) are built into a wheel exactly as `pip install ".[studio]"` in the
image does, the wheel is installed into a fresh venv (dependencies from this venv's
site-packages, listed after the venv's own in a .pth file), and
`xmem-label serve` from that venv answers /health and /setup (which reads manifest.yml)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import requests

from .conftest import free_port, stop, wait_for

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.e2e  # builds a wheel, makes a venv, starts a server
CONFIG = (
    '<View><Image name="image" valueList="$frames"/><BrushLabels name="mask" '
    'toName="image"><Label value="Chair"/></BrushLabels></View>'
)


def copied_paths() -> list[str]:
    """What the Dockerfile's COPY lines take from the build context."""
    paths = []
    for line in (ROOT / "backend" / "Dockerfile").read_text().splitlines():
        match = re.match(r"COPY\s+(.+)\s+\S+$", line)
        if match:
            paths += match.group(1).split()
    return paths


def test_the_image_file_set_builds_a_wheel_that_serves(tmp_path):
    context = tmp_path / "context"
    for name in copied_paths():
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(
                source,
                context / name,
                symlinks=True,
                ignore=shutil.ignore_patterns("__pycache__", "*.png"),
            )
        else:
            context.mkdir(exist_ok=True)
            shutil.copy(source, context / name)
    wheels = tmp_path / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(wheels), str(context)],
        check=True,
        timeout=300,
    )
    (wheel,) = wheels.glob("xmem_label-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        manifest = archive.read("xmem_label/model/manifest.yml").decode()
    assert "label_studio_backend:" in manifest  # a real file, not a dangling link

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    (site_packages,) = venv.glob("lib/python*/site-packages")
    dependencies = next(p for p in sys.path if p.endswith("site-packages"))
    (site_packages / "dependencies.pth").write_text(dependencies + "\n")
    subprocess.run(
        [venv / "bin" / "pip", "install", "-q", "--no-deps", str(wheel)], check=True, timeout=300
    )
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BASIC_AUTH", "LABEL_"))}
    env.update(MODEL_DIR=str(tmp_path / "state"), OMP_NUM_THREADS="1", PYTHONPATH="")
    log = tmp_path / "serve.log"
    with open(log, "w") as out:
        process = subprocess.Popen(
            [venv / "bin" / "xmem-label", "serve", "--port", str(port), "--engine", "flow"],
            env=env,
            cwd=tmp_path,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(f"{url}/health", process, 120, log)
        reply = requests.post(f"{url}/setup", json={"project": "1.0", "schema": CONFIG}, timeout=30)
        assert reply.status_code == 200, reply.text
        assert reply.json()["model_version"].startswith("xmem-label-0.1.0-flow-")
        where = subprocess.run(
            [venv / "bin" / "python", "-c", "import xmem_label.model as m; print(m.__file__)"],
            capture_output=True,
            text=True,
            check=True,
            cwd=tmp_path,
            env=env,
        ).stdout
        assert str(venv) in where  # the wheel's copy, not this checkout's
    finally:
        stop(process)
    assert "no credentials set" in log.read_text()
