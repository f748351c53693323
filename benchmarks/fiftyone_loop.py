"""The annotation loop through FiftyOne for real (issue 16): operator time against the engine's.

    python -m benchmarks.fiftyone_loop [--clip dance-twirl] [--frames 100] [--rounds 5]
                                       [--repeat 3] [--engine flow]
                                       [--first-mask 300] [--first-mask-clip blackswan]

A private mongod and a scratch FiftyOne home (nothing touches ~/.fiftyone), the plugin's
operators run in this process as Python calls them (`foo.execute_operator`, immediate). The
clip is a shared DAVIS clip (../shared/data/vos/<clip>) played forward and backward to
`--frames` frames at its 854x480, as an H.264 mp4 video sample; its ground truth is the
annotator. Each repeat builds a fresh dataset and prints:

- correction: keyframes (ground truth) on the first and last frames, "propagate masks" from
  scratch, then the ground truth of the middle frame as a correction and "propagate
  corrections": both wall times and their ratio, frame documents written (their
  `last_modified_at` moved) against frames the engine recomputed (fused anew);
- rounds: from the same two keyframes, R rounds of "suggest frames to review" (one frame),
  the ground truth written on the suggested frame, "propagate corrections", labels read back:
  J&F of every frame read from the database, the operator's wall time from its start to
  written labels, the engine-only time of the same correction (a bare `Session` kept across
  the rounds, keyframes given by the same rule), and the overhead (operator / engine - 1).

--first-mask N: first, time to the first masks in the database (issue 17): an N-frame clip of
`--first-mask-clip` (played forward and backward, 854x480 H.264), its first ground-truth mask
as the only keyframe, "propagate masks" from scratch; per repeat, the seconds from the
operator's call to its first batch (the first 10 frames) written, to every frame written (the
operator's return), and the engine alone's time to its 10th and last frame for comparison.
`--repeat 0` measures only this.

The machine is shared: the summary gives medians over the repeats, and beside wall times the
CPU time of this process (all its threads; the database's own work is not counted), which
other jobs on the machine disturb less.
"""

from __future__ import annotations

import argparse
import atexit
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.annotation_loop import DEFAULT_DATA, ping_pong
from benchmarks.fiftyone import private_fiftyone, start_mongod, stop
from xmem_label.model.effort import TruthClip

PLUGIN = "@xmem-label/xmem-label"


def encode(frames: Path, path: Path) -> None:
    """The JPEG frames as an H.264 mp4 (as the plugin tests make their video)."""
    subprocess.run(
        ["ffmpeg", "-y", "-loglevel", "error", "-framerate", "25", "-i",
         str(frames / "%05d.jpg"), "-c:v", "libx264", "-crf", "12", "-pix_fmt", "yuv420p",
         str(path)],
        check=True,
    )  # fmt: skip


class Loop:
    """One dataset with the clip as a video sample, and the engine-only twin of its session."""

    def __init__(self, video: Path, truth: list[np.ndarray], engine_name: str, name: str):
        import fiftyone as fo

        from xmem_label.model import Session, load_engine

        self.truth, self.engine_name = truth, engine_name
        self.object_ids = sorted({int(v) for mask in truth for v in np.unique(mask)} - {0})
        self.dataset = fo.Dataset(name, overwrite=True)
        self.dataset.add_sample(fo.Sample(filepath=str(video)))
        self.dataset.compute_metadata()
        self.sample_id = self.dataset.first().id
        self.session = Session(load_engine(engine_name), video)
        self.fused: list[int] = []
        self.cpu = 0.0  # CPU seconds of this process (every thread) in the last timed call
        fuse = Session._fuse  # counts the frames the engine recomputes, in either session

        def counted(session, index, *args):
            self.fused.append(index)
            return fuse(session, index, *args)

        Session._fuse = counted

    def keyframe(self, index: int) -> None:
        """Write frame `index`'s ground truth as a keyframe label (FiftyOne frame index + 1)."""
        import fiftyone as fo

        detections = [
            fo.Detection.from_mask(self.truth[index] == obj, label=f"object {obj}", index=obj)
            for obj in self.object_ids
            if (self.truth[index] == obj).any()
        ]
        self.dataset.set_values(
            "frames.gt",
            {self.sample_id: {index + 1: fo.Detections(detections=detections)}},
            key_field="id",
        )

    def engine_keyframe(self, index: int) -> None:
        """The same keyframe for the bare session: each object's mask, or absent."""
        for obj in self.object_ids:
            mask = self.truth[index] == obj
            if mask.any():
                self.session.add_object_mask(index, obj, mask)
            else:
                self.session.set_absent(index, obj)

    def operator(self, name: str, **params) -> tuple[float, dict]:
        cpu = time.process_time()
        seconds, summary = self.run_operator(self.dataset, name, self.engine_name, **params)
        self.cpu = time.process_time() - cpu
        return seconds, summary

    @staticmethod
    def run_operator(dataset, name: str, engine_name: str, **params) -> tuple[float, dict]:
        """Run one of the plugin's operators immediately, as Python does; (seconds, summary)."""
        import fiftyone.operators as foo

        params = {"prompt_field": "gt", "label_field": "xmem", "engine": engine_name, **params}
        started = time.perf_counter()
        result = foo.execute_operator(f"{PLUGIN}/{name}", ctx=dict(dataset=dataset, params=params))
        seconds = time.perf_counter() - started
        dataset.reload()
        return seconds, result.result

    def engine_run(self) -> float:
        started, cpu = time.perf_counter(), time.process_time()
        for _ in self.session.propagate():
            pass
        self.cpu = time.process_time() - cpu
        return time.perf_counter() - started

    def modified(self) -> list:
        return self.dataset.values("frames.last_modified_at")[0]

    def suggested(self) -> int:
        """Engine frame index of the rank-1 suggestion ("suggest frames to review")."""
        self.operator("suggest_frames", count=1)
        numbers, ranks = self.dataset.values(["frames.frame_number", "frames.xmem_review.rank"])
        return next(n for n, r in zip(numbers[0], ranks[0], strict=True) if r == 1) - 1

    def scores(self, field: str = "xmem") -> float:
        """Mean J&F of every frame's labels read back from the database."""
        from xmem_label.model.evaluation import boundary_accuracy, region_similarity
        from xmem_label.plugin.labels import detection_to_mask

        values = []
        numbers, labels = self.dataset.values(["frames.frame_number", f"frames.{field}"])
        for number, detections in zip(numbers[0], labels[0], strict=True):
            truth = self.truth[number - 1]
            predicted = np.zeros_like(truth)
            for det in detections.detections if detections else []:
                predicted[detection_to_mask(det, truth.shape, None)] = det.index
            j = [region_similarity(predicted == o, truth == o) for o in self.object_ids]
            f = [boundary_accuracy(predicted == o, truth == o) for o in self.object_ids]
            values.append((np.mean(j) + np.mean(f)) / 2)
        return float(np.mean(values))

    def close(self) -> None:
        self.session.close()
        self.dataset.delete()


def correction(loop: Loop, length: int) -> dict:
    """Keyframes first and last, from scratch; then the middle frame corrected."""
    first, last, middle = 0, length - 1, length // 2
    for index in (first, last):
        loop.keyframe(index)
    scratch, _ = loop.operator("propagate_masks", label_field="scratch")
    scratch_cpu = loop.cpu
    filled, _ = loop.operator("propagate_corrections")  # the first run fills the cache
    loop.keyframe(middle)
    before = loop.modified()
    loop.fused.clear()
    corrected, summary = loop.operator("propagate_corrections")
    corrected_cpu = loop.cpu
    written = sum(a != b for a, b in zip(before, loop.modified(), strict=True))
    return {
        "scratch": scratch,
        "first": filled,
        "corrected": corrected,
        "ratio": corrected / scratch,
        "cpu_ratio": corrected_cpu / scratch_cpu,
        "written": written,
        "reported": summary["frames"],
        "recomputed": len(loop.fused),
        "steps": summary["network_steps"],
    }


def rounds(loop: Loop, length: int, count: int) -> list[dict]:
    """R rounds of suggest, correct with ground truth, propagate corrections, read back."""
    for index in (0, length - 1):
        loop.keyframe(index)
        loop.engine_keyframe(index)
    seconds, _ = loop.operator("propagate_corrections", label_field="xmem")
    table = [{"round": 0, "frame": None, "jf": loop.scores(), "operator": seconds}]
    table[0]["engine"] = loop.engine_run()
    for number in range(1, count + 1):
        frame = loop.suggested()
        loop.keyframe(frame)
        seconds, summary = loop.operator("propagate_corrections")
        operator_cpu = loop.cpu
        loop.engine_keyframe(frame)
        engine = loop.engine_run()
        table.append({
            "round": number, "frame": frame, "jf": loop.scores(), "operator": seconds,
            "engine": engine, "overhead": seconds / engine - 1, "written": summary["frames"],
            "cpu_overhead": operator_cpu / loop.cpu - 1,
        })  # fmt: skip
    return table


def first_mask(data: Path, clip_name: str, length: int, engine_name: str, home: Path) -> dict:
    """Seconds to the first batch stored and to every frame stored by "propagate masks" on a
    `length`-frame clip with one keyframe on its first frame, and the engine alone's seconds to
    the same first frames and to the last."""
    import fiftyone as fo

    from xmem_label.model import Session, load_engine
    from xmem_label.plugin import first_batch

    folder = home / f"first-mask-{clip_name}-{length}"
    folder.mkdir(exist_ok=True)
    video = folder / "clip.mp4"
    if not video.exists():
        encode(ping_pong(data / clip_name, length, folder), video)
    truth = TruthClip(data / clip_name).truth
    keyframe = truth[min(truth)]
    objects = sorted({int(v) for v in np.unique(keyframe)} - {0})
    dataset = fo.Dataset(f"first-mask-{length}", overwrite=True)
    dataset.add_sample(fo.Sample(filepath=str(video)))
    detections = [
        fo.Detection.from_mask(keyframe == obj, label=f"object {obj}", index=obj) for obj in objects
    ]
    dataset.set_values(
        "frames.gt", {dataset.first().id: {1: fo.Detections(detections=detections)}}, key_field="id"
    )
    stored: list[float] = []
    write = first_batch.EarlyFrames.write

    def timed_write(self, sample_id, frames) -> None:
        write(self, sample_id, frames)
        stored.append(time.perf_counter())

    first_batch.EarlyFrames.write = timed_write  # type: ignore[method-assign]
    try:
        started = time.perf_counter()
        _, summary = Loop.run_operator(dataset, "propagate_masks", engine_name)
        finished = time.perf_counter()
    finally:
        first_batch.EarlyFrames.write = write  # type: ignore[method-assign]
    assert summary["frames"] == length and len(stored) == 1, (summary, stored)
    engine = load_engine(engine_name)
    with Session(engine, video) as session:
        for obj in objects:
            session.add_object_mask(0, obj, keyframe == obj)
        begun = time.perf_counter()
        arrivals = [time.perf_counter() - begun for _ in session.propagate()]
    dataset.delete()
    return {
        "first": stored[0] - started,
        "all": finished - started,
        "engine_first": arrivals[first_batch.FIRST_BATCH - 1],
        "engine_all": arrivals[-1],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--clip", default="dance-twirl")
    parser.add_argument("--frames", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--engine", default="flow")
    parser.add_argument("--first-mask", type=int, default=0, metavar="N", help="clip length")
    parser.add_argument("--first-mask-clip", default="blackswan")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(1)
    home = Path(tempfile.mkdtemp(prefix="xmem-label-fo-loop-"))
    private_fiftyone(home)
    os.environ["XMEM_LABEL_FIFTYONE_CACHE"] = str(home / "cache")
    mongod = start_mongod(home)
    atexit.register(stop, mongod, home)

    median = statistics.median
    if args.first_mask:
        times = []
        for repeat in range(max(args.repeat, 1)):
            t = first_mask(args.data, args.first_mask_clip, args.first_mask, args.engine, home)
            times.append(t)
            print(f"[{repeat + 1}] first mask, {args.first_mask} frames of "
                  f"{args.first_mask_clip}: first 10 frames stored after {t['first']:.2f} s, all "
                  f"{t['all']:.2f} s ({t['first'] / t['all']:.1%}); engine alone: 10th frame "
                  f"{t['engine_first']:.2f} s, last {t['engine_all']:.2f} s",
                  flush=True)  # fmt: skip
        print(f"first mask, medians: first 10 stored {median(t['first'] for t in times):.2f} s, "
              f"all stored {median(t['all'] for t in times):.2f} s; engine alone "
              f"{median(t['engine_first'] for t in times):.2f} s and "
              f"{median(t['engine_all'] for t in times):.2f} s\n", flush=True)  # fmt: skip
        if args.repeat == 0:
            return

    clip = TruthClip(args.data / args.clip)
    cycle = [clip.truth[i] for i in sorted(clip.truth)]
    cycle += cycle[-2:0:-1]
    truth = [cycle[i % len(cycle)] for i in range(args.frames)]
    frames = ping_pong(args.data / args.clip, args.frames, home)
    video = home / "clip.mp4"
    encode(frames, video)
    height, width = truth[0].shape
    print(f"{args.engine}, {args.frames} frames of {args.clip} (forward and backward), "
          f"{width}x{height}, torch on 1 thread", flush=True)  # fmt: skip

    corrections, tables = [], []
    for repeat in range(args.repeat):
        loop = Loop(video, truth, args.engine, f"correction-{repeat}")
        c = correction(loop, args.frames)
        loop.close()
        corrections.append(c)
        print(f"[{repeat + 1}] propagate masks (from scratch) {c['scratch']:.1f} s, first "
              f"propagate corrections {c['first']:.1f} s, correction on frame {args.frames // 2}: "
              f"{c['corrected']:.1f} s = {c['ratio']:.0%} of from scratch (CPU time: "
              f"{c['cpu_ratio']:.0%}); frame documents "
              f"written {c['written']} (operator says {c['reported']}), frames recomputed "
              f"{c['recomputed']}, network steps {c['steps']}", flush=True)  # fmt: skip
        loop = Loop(video, truth, args.engine, f"rounds-{repeat}")
        table = rounds(loop, args.frames, args.rounds)
        loop.close()
        tables.append(table)
        for row in table:
            if row["frame"] is None:
                print(f"    round 0: keyframes 0 and {args.frames - 1}, J&F {row['jf']:.3f}, "
                      f"from scratch: operator {row['operator']:.2f} s, engine "
                      f"{row['engine']:.2f} s")  # fmt: skip
                continue
            print(f"    round {row['round']}: frame {row['frame']:>3}  J&F {row['jf']:.3f}  "
                  f"operator {row['operator']:.2f} s  engine {row['engine']:.2f} s  overhead "
                  f"{row['overhead']:+.0%} (CPU {row['cpu_overhead']:+.0%})  written "
                  f"{row['written']}", flush=True)  # fmt: skip

    print(f"\nmedians over {args.repeat} repeats (shared, noisy machine):")
    print(f"correction: from scratch {median(c['scratch'] for c in corrections):.1f} s, "
          f"corrected {median(c['corrected'] for c in corrections):.1f} s, ratio "
          f"{median(c['ratio'] for c in corrections):.0%} (CPU time "
          f"{median(c['cpu_ratio'] for c in corrections):.0%}); written == recomputed in every "
          f"repeat: {all(c['written'] == c['recomputed'] for c in corrections)}")  # fmt: skip
    print(f"{'round':>5} {'frame':>6} {'J&F':>6} {'operator s':>10} {'engine s':>9} "
          f"{'overhead':>9} {'CPU overhead':>12}")  # fmt: skip
    for number in range(args.rounds + 1):
        rows = [table[number] for table in tables]
        frames_seen = "/".join(sorted({str(r["frame"]) for r in rows}))
        if number == 0:
            print(f"{0:>5} {'-':>6} {median(r['jf'] for r in rows):>6.3f} "
                  f"{median(r['operator'] for r in rows):>10.2f} "
                  f"{median(r['engine'] for r in rows):>9.2f}  (from scratch)")  # fmt: skip
            continue
        print(f"{number:>5} {frames_seen:>6} {median(r['jf'] for r in rows):>6.3f} "
              f"{median(r['operator'] for r in rows):>10.2f} "
              f"{median(r['engine'] for r in rows):>9.2f} "
              f"{median(r['overhead'] for r in rows):>+9.0%} "
              f"{median(r['cpu_overhead'] for r in rows):>+12.0%}")  # fmt: skip


if __name__ == "__main__":
    main()
