"""The annotation loop through a real Label Studio (issue 16): save a correction, wait for the
new prediction, R rounds, with ground truth as the annotator.

    python -m benchmarks.label_studio_loop [--clip ../shared/data/vos/blackswan] [--frames 100]
                                           [--rounds 3] [--repeat 1] [--job-threads 1]
                                           [--media http] [--ls-bin PATH]

A real Label Studio 1.23.2 and a real `xmem-label serve --engine flow --job-threads 1`
(credentials, connected by `xmem-label connect`, webhook on): one job at a time on all cores, like
the engine alone it is compared with (the server's default for the flow engine runs a job per core
at once, each on one torch thread: see `--job-threads`); it fetches the frames over HTTP, or reads
them where Label Studio keeps them with `--media local`. The task is `--frames` frames of the clip
played forward and backward, at its 854x480. Round 0 saves an annotation with the ground truth of
the first and last frames (the backend has no passes for the task yet: a from-scratch prediction);
round 1 corrects the middle frame; later rounds correct the first frame the prediction's
`xmem_status` suggests. Per round: J&F of the stored prediction; the time from saving the
annotation to the stored prediction (to Label Studio's `created_at` of the prediction, so the
benchmark's polling is not counted); the same keyframes through a bare Session in this process (the
engine alone: round 0 from scratch, then one incremental run per correction); the backend job's
download time and whole time (the backend's /metrics: the rest of save -> stored is Label Studio
and HTTP); and how many frames outside the corrected segment changed (must be none). With `--repeat
N`, N tasks of the same frames go through the rounds one after another (each from scratch, in a
folder of its own in the backend's pass cache), then the per-round medians.

`--first-mask 300` then times a 300-frame task with a keyframe on its first frame: from the save
to the backend's first batch (10 frames) and to its whole prediction.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import re
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import requests
import torch

from xmem_label.backend.formats import is_first_batch
from xmem_label.backend.rle import rle_to_mask
from xmem_label.model import Session, load_engine
from xmem_label.model.effort import TruthClip
from xmem_label.model.evaluation import boundary_accuracy, region_similarity

from .annotation_loop import ping_pong
from .common import painted_region
from .label_studio import (
    BACKEND_AUTH,
    DEFAULT_CLIP,
    TOKEN,
    add_label_studio_options,
    backend_environment,
    connect,
    free_port,
    start_label_studio,
    stop,
    wait_up,
    xmem_label_command,
)

CONFIG = """<View>
  <Image name="image" valueList="$frames"/>
  <BrushLabels name="mask" toName="image"><Label value="Object"/></BrushLabels>
  <TextArea name="xmem_status" toName="image" rows="5" readonly="true"/>
</View>"""
SUGGESTED = re.compile(r"check frame (\d+):")


def regions_for(truth: dict[int, np.ndarray], frames: list[int]) -> list[dict]:
    """The person's say on `frames`: the ground truth's object, painted by hand."""
    masks = {frame: truth[frame] > 0 for frame in frames}
    return [painted_region(mask, "Object", frame) for frame, mask in masks.items() if mask.any()]


def predicted_masks(prediction: dict, length: int, shape: tuple[int, int]) -> list[np.ndarray]:
    masks = [np.zeros(shape, bool) for _ in range(length)]
    for region in prediction["result"]:
        if region["type"] == "brushlabels":
            height, width = shape
            masks[region["item_index"]] |= rle_to_mask(region["value"]["rle"], width, height)
    return masks


def jf(masks: list[np.ndarray], truth: dict[int, np.ndarray], keyframes: list[int]) -> float:
    scores = [
        (region_similarity(masks[i], truth[i] > 0) + boundary_accuracy(masks[i], truth[i] > 0)) / 2
        for i in truth
        if i not in keyframes[:2]
    ]
    return float(np.mean(scores))


def run(args: argparse.Namespace, work: Path) -> None:
    clip = TruthClip(args.clip)
    cycle = [clip.truth[i] for i in sorted(clip.truth)]
    cycle += cycle[-2:0:-1]
    truth = {i: cycle[i % len(cycle)] for i in range(args.frames)}
    ls_process = backend = None
    try:
        ls_process, url, media = start_label_studio(args.ls_bin, work)
        http = requests.Session()
        http.headers["Authorization"] = f"Token {TOKEN}"

        def api(method: str, path: str, **kwargs):
            reply = http.request(method, url + path, timeout=300, **kwargs)
            reply.raise_for_status()
            return reply.json() if reply.content else None

        project = api("POST", "/api/projects", json={"title": "loop", "label_config": CONFIG})
        folder = media / "loop"
        folder.mkdir(parents=True)
        frames_dir = ping_pong(args.clip, args.frames, folder)
        api("POST", "/api/storages/localfiles",
            json={"project": project["id"], "path": str(frames_dir), "title": "clip"})  # fmt: skip
        urls = [
            f"/data/local-files/?d={path.relative_to(media).as_posix()}"
            for path in sorted(frames_dir.iterdir())
        ]
        port = free_port()
        document_root = media if args.media == "local" else None
        backend = subprocess_backend(url, work, port, args.job_threads, document_root)
        backend_url = f"http://127.0.0.1:{port}"
        wait_up(f"{backend_url}/health", 120)
        connect(project["id"], backend_url, url, TOKEN)
        while not requests.get(f"{backend_url}/health", timeout=5).json()["engine_loaded"]:
            time.sleep(0.2)

        shape = truth[0].shape
        print(f"{args.frames} frames {shape[1]}x{shape[0]} of {args.clip.name}, engine flow, "
              f"{args.repeat} task(s), media over {args.media}, backend --job-threads "
              f"{args.job_threads} ({torch.get_num_threads()} torch threads here)")  # fmt: skip
        print(f"{'task':>4} {'round':>5} {'frame':>6} {'J&F':>6} {'save->pred s':>13} "
              f"{'engine s':>9} {'overhead':>9} {'job s':>6} {'download s':>11} "
              f"{'changed outside':>16}")  # fmt: skip
        rows: list[list[Row]] = []
        for repeat in range(args.repeat):
            api("POST", f"/api/projects/{project['id']}/import", json=[{"frames": urls}])
            task = max(api("GET", "/api/tasks", params={"project": project["id"]})["tasks"],
                       key=lambda t: t["id"])  # fmt: skip
            rows.append(loop(args, api, task, frames_dir, truth, backend_url, repeat, len(rows)))
        if args.repeat > 1:
            print(f"medians of {args.repeat} tasks:")
            for round_rows in zip(*rows, strict=True):
                saved = float(np.median([r.saved_to_prediction for r in round_rows]))
                engine = float(np.median([r.engine_seconds for r in round_rows]))
                overhead = float(np.median([r.overhead for r in round_rows]))
                print(f"{'':>4} {round_rows[0].round_number:>5} {round_rows[0].frame:>6} "
                      f"{round_rows[0].score:>6.3f} {saved:>13.2f} {engine:>9.2f} "
                      f"{overhead:>+9.0%}")  # fmt: skip
        if args.first_mask:
            first_mask(api, project["id"], media, args, truth_of=lambda i: cycle[i % len(cycle)])
    finally:
        stop(backend)
        stop(ls_process)


@dataclasses.dataclass
class Row:
    round_number: int
    frame: str
    score: float
    saved_to_prediction: float
    engine_seconds: float

    @property
    def overhead(self) -> float:
        return self.saved_to_prediction / self.engine_seconds - 1


def loop(
    args, api, task, frames_dir, truth, backend_url, repeat: int, tasks_before: int
) -> list[Row]:
    """One task through the rounds: save, wait for the new prediction, compare."""
    engine = load_engine("flow")
    session = Session(engine, frames_dir)
    shape = truth[0].shape
    keyframes = [0, args.frames - 1]
    seen: set[int] = set()
    previous = None
    annotation = None
    rows = []
    for round_number in range(args.rounds + 1):
        if round_number == 1:
            keyframes.append(args.frames // 2)
        elif round_number > 1:
            status = next(r for r in previous["result"] if r["type"] == "textarea")
            picks = [int(m.group(1)) - 1 for m in map(SUGGESTED.match, status["value"]["text"])
                     if m]  # fmt: skip
            keyframes.append(next(p for p in picks if p not in keyframes))
        result = regions_for(truth, sorted(keyframes))
        saved_at = time.time()
        if annotation is None:
            annotation = api("POST", f"/api/tasks/{task['id']}/annotations",
                             json={"result": result})  # fmt: skip
        else:
            api("PATCH", f"/api/annotations/{annotation['id']}", json={"result": result})
        # The backend's job count first (a small answer), then the predictions once: polling
        # Label Studio's megabytes of predictions would take the CPU the job runs on.
        jobs_done = tasks_before * (args.rounds + 1) + round_number + 1
        timings = job_timings(backend_url, jobs_done=jobs_done)
        prediction = wait_for_new(api, task["id"], seen)
        # Label Studio's own time of storing it (same clock): the poll's delay not counted
        stored_at = datetime.datetime.fromisoformat(prediction["created_at"]).timestamp()
        saved_to_prediction = stored_at - saved_at
        seen.add(prediction["id"])

        for frame in keyframes[len(keyframes) - (1 if round_number else 2) :]:
            session.add_mask(frame, (truth[frame] > 0).astype(np.uint8))
        started = time.perf_counter()
        session.run()
        engine_seconds = time.perf_counter() - started

        masks = predicted_masks(prediction, args.frames, shape)
        changed = "-"
        if previous is not None:
            corrected = keyframes[-1]
            before = max((k for k in keyframes[:-1] if k < corrected), default=0)
            after = min((k for k in keyframes[:-1] if k > corrected), default=args.frames)
            old = predicted_masks(previous, args.frames, shape)
            outside = [i for i in range(args.frames) if not before <= i <= after]
            changed = str(sum(not np.array_equal(old[i], masks[i]) for i in outside))
        corrected = str(keyframes[-1]) if round_number else f"0,{args.frames - 1}"
        row = Row(round_number, corrected, jf(masks, truth, keyframes), saved_to_prediction,
                  engine_seconds)  # fmt: skip
        print(f"{repeat + 1:>4} {round_number:>5} {corrected:>6} {row.score:>6.3f} "
              f"{saved_to_prediction:>13.2f} {engine_seconds:>9.2f} {row.overhead:>+9.0%} "
              f"{timings['total']:>6.2f} {timings['download']:>11.2f} {changed:>16}",
              flush=True)  # fmt: skip
        rows.append(row)
        previous = prediction
    session.close()
    return rows


def first_mask(api, project_id: int, media: Path, args: argparse.Namespace, truth_of) -> None:
    """Time to the first frames on a long task (issue 17): a task of `--first-mask` frames, a
    keyframe on its first frame saved, then the times (Label Studio's `created_at`) of the
    backend's first batch and of its whole prediction."""
    folder = media / "first"
    folder.mkdir(parents=True)
    frames_dir = ping_pong(args.clip, args.first_mask, folder)
    api("POST", "/api/storages/localfiles",
        json={"project": project_id, "path": str(frames_dir), "title": "long"})  # fmt: skip
    urls = [
        f"/data/local-files/?d={path.relative_to(media).as_posix()}"
        for path in sorted(frames_dir.iterdir())
    ]
    api("POST", f"/api/projects/{project_id}/import", json=[{"frames": urls}])
    task = max(api("GET", "/api/tasks", params={"project": project_id})["tasks"],
               key=lambda t: t["id"])  # fmt: skip
    saved_at = time.time()
    api("POST", f"/api/tasks/{task['id']}/annotations",
        json={"result": regions_for({0: truth_of(0)}, [0])})  # fmt: skip
    seen: dict[int, tuple[float, bool]] = {}
    deadline = time.monotonic() + 1800
    while time.monotonic() < deadline and not any(not first for _, first in seen.values()):
        for p in api("GET", "/api/predictions", params={"task": task["id"]}):
            stored_at = datetime.datetime.fromisoformat(p["created_at"]).timestamp()
            seen[p["id"]] = (stored_at - saved_at, is_first_batch(p))
        time.sleep(0.25)
    first = min((t for t, is_first in seen.values() if is_first), default=float("nan"))
    whole = min((t for t, is_first in seen.values() if not is_first), default=float("nan"))
    print(f"{args.first_mask} frames, keyframe on frame 0: first 10 frames stored {first:.1f} s "
          f"after the save, all frames {whole:.1f} s ({first / whole:.0%})")  # fmt: skip


def subprocess_backend(
    url: str, work: Path, port: int, job_threads: int, document_root: Path | None
) -> subprocess.Popen:
    """The backend; with `document_root`, it reads Label Studio's local files from there."""
    env = backend_environment(url, TOKEN, MODEL_DIR=str(work / "model-dir"))
    if document_root is not None:
        env["LOCAL_FILES_DOCUMENT_ROOT"] = str(document_root)
    return subprocess.Popen(
        [xmem_label_command(), "serve", "--host", "127.0.0.1", "--port", str(port),
         "--engine", "flow", "--job-threads", str(job_threads)],
        env=env,
        stdout=open(work / "backend.log", "w"),  # noqa: SIM115 (lives on)
        stderr=subprocess.STDOUT,
    )  # fmt: skip


def job_timings(backend_url: str, jobs_done: int, seconds: float = 900) -> dict[str, float]:
    """The stage timings of the backend's last job, once `jobs_done` jobs are done."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        metrics = requests.get(f"{backend_url}/metrics", auth=BACKEND_AUTH, timeout=30).json()
        if metrics["jobs"]["done"] >= jobs_done:
            return metrics["last_timings"]
        time.sleep(0.5)  # the measure is created_at: a slow poll only keeps the CPU for the job
    raise SystemExit(f"the backend did not finish job {jobs_done} in {seconds:.0f} s")


def wait_for_new(api, task_id: int, seen: set[int], seconds: float = 900) -> dict:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        fresh = [
            p for p in api("GET", "/api/predictions", params={"task": task_id})
            if p["id"] not in seen and p["model_version"] != "xmem-label-failed"
            and not is_first_batch(p)
        ]  # fmt: skip
        if fresh:
            return fresh[-1]
        time.sleep(0.2)
    raise SystemExit(f"no new prediction for task {task_id} after {seconds:.0f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clip", type=Path, default=DEFAULT_CLIP)
    parser.add_argument("--frames", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--repeat", type=int, default=1, metavar="N",
        help="run the rounds on N tasks of the same frames (fresh each) and print the medians",
    )  # fmt: skip
    parser.add_argument(
        "--job-threads", type=int, default=1, metavar="N",
        help="the backend's --job-threads: 1 (default) runs the job on all cores, as the "
        "engine alone here; the server's default for the flow engine, one job per core, gives "
        "a job one torch thread so that two run at once",
    )  # fmt: skip
    parser.add_argument(
        "--media", choices=["http", "local"], default="http",
        help="how the backend reads the frames: http, from Label Studio (default, as from "
        "another machine; on this one, Label Studio serving them takes CPU from the job), "
        "or local, from its LOCAL_FILES_DOCUMENT_ROOT (the same-host setup)",
    )  # fmt: skip
    parser.add_argument(
        "--first-mask", type=int, default=0, metavar="N",
        help="then time the first batch and the whole of an N-frame task (0: skip)",
    )  # fmt: skip
    add_label_studio_options(parser)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        run(args, Path(work))


if __name__ == "__main__":
    main()
