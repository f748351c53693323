"""Real `fiftyone delegated launch` workers for the delegated-run tests, and video clips
long enough for a run to take a few seconds."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
from bson import ObjectId
from fiftyone.operators.delegated import DelegatedOperationService

from xmem_label.model import read_label_mask

from .conftest import CHAIR

WORKER_TIMEOUT_S = 240
FIFTYONE = str(Path(sys.executable).with_name("fiftyone"))


class Workers:
    """`count` worker processes (each in its own process group, so a test can kill one
    as a crash would), started and ready on entry, stopped on exit."""

    def __init__(self, count: int = 1):
        self.processes: list[subprocess.Popen] = []
        for _ in range(count):
            self.processes.append(
                subprocess.Popen(
                    [FIFTYONE, "delegated", "launch"],
                    # a good neighbour on a 2-core runner; unbuffered, to see it is ready
                    env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1"),
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    text=True,
                    start_new_session=True,
                )
            )
        self.output = ["" for _ in self.processes]

    def __enter__(self) -> Workers:
        for number, process in enumerate(self.processes):
            for line in process.stdout:
                self.output[number] += line
                if "Delegated operation service running" in line:
                    break
            else:
                raise RuntimeError(f"worker did not start:\n{self.output[number]}")
        return self

    def kill(self, number: int) -> None:
        """SIGKILL worker `number`, as an out-of-memory kill or a lost machine would."""
        os.killpg(self.processes[number].pid, signal.SIGKILL)
        self.processes[number].wait()

    def __exit__(self, *exc_info) -> None:
        for number, process in enumerate(self.processes):
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGINT)  # only the groups this test started
            try:
                rest, _ = process.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                rest, _ = process.communicate()
            self.output[number] += rest or ""


def wait_for(op_ids, states=("completed", "failed"), timeout=WORKER_TIMEOUT_S) -> dict:
    """Poll until every operation in `op_ids` is in one of `states`; returns id -> state."""
    op_ids = [ObjectId(str(op_id)) for op_id in op_ids]
    service = DelegatedOperationService()
    deadline = time.monotonic() + timeout
    while True:
        found = {op_id: service.get(op_id).run_state for op_id in op_ids}
        if all(state in states for state in found.values()) or time.monotonic() > deadline:
            return found
        time.sleep(0.2)


def error_message(op_id) -> str | None:
    """The operation's stored `result.error_message` (FiftyOne's document class does not
    load it, so it is read from the stored document)."""
    operation = DelegatedOperationService().get(op_id)
    return ((operation._doc or {}).get("result") or {}).get("error_message")


def long_clip(path: Path, frames: int, size=(480, 320)) -> np.ndarray:
    """Write the chair clip played back and forth for `frames` frames at `size` (mp4v);
    returns the first frame's chair mask at that size."""
    images = [cv2.imread(str(p)) for p in sorted((CHAIR / "frames").glob("*.jpg"))]
    order = list(range(len(images))) + list(range(len(images) - 2, 0, -1))
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 24, size)
    for index in range(frames):
        writer.write(cv2.resize(images[order[index % len(order)]], size))
    writer.release()
    first = read_label_mask(CHAIR / "masks" / "frame_000000.png")
    return cv2.resize(first, size, interpolation=cv2.INTER_NEAREST) == 1
