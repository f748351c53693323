"""End to end against network only (issue 6, goal 4): `xmem-label propagate` on a video file.

    python -m benchmarks.end_to_end [--size 854x480] [--frames 30] [--precision fp32]

The synthetic clip is written to an MP4 file. Network only: the same frames, pre-decoded in
memory, through a Session (no decoding, no PNG writing). End to end: the `xmem-label propagate`
command on the MP4 (decoding in a background thread, PNG + summary written while the network
runs). Both use the same engine options; the ratio of their frames/s is the overhead.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch

from xmem_label.model import Session, load_engine
from xmem_label.model.allocator import keep_freed_memory
from xmem_label.model.cli import main as cli_main
from xmem_label.model.masks import write_label_mask

from .common import SyntheticClip, synthetic_checkpoint


def write_video(clip: SyntheticClip, path: Path) -> None:
    writer = cv2.VideoWriter(
        str(path), cv2.VideoWriter_fourcc(*"mp4v"), 25, (clip.width, clip.height)
    )
    for index in range(len(clip)):
        writer.write(cv2.cvtColor(clip.read(index), cv2.COLOR_RGB2BGR))
    writer.release()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    parser.add_argument("--size", default="854x480", help="WIDTHxHEIGHT")
    parser.add_argument("--frames", type=int, default=30)
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "int8"])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    keep_freed_memory()  # first thing, as `xmem-label` does (see allocator.py)
    width, height = (int(v) for v in args.size.lower().split("x"))
    torch.set_num_threads(args.threads)
    weights = synthetic_checkpoint()
    clip = SyntheticClip(args.frames, height, width)

    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        video, keyframe = folder / "clip.mp4", folder / "keyframe.png"
        write_video(clip, video)
        capture = cv2.VideoCapture(str(video))
        decoded = []
        while True:
            ok, frame = capture.read()
            if not ok:
                break
            decoded.append(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB))
        capture.release()
        write_label_mask(keyframe, clip.first_mask(1))

        engine = load_engine(
            "xmem", weights=weights, size=-1, device="cpu", precision=args.precision
        )
        with Session(engine, decoded) as session:
            session.add_mask(0, clip.first_mask(1))
            start = time.perf_counter()
            for _ in session.propagate():
                pass
            network_only = time.perf_counter() - start

        out = folder / "out"
        cli_main(
            [
                "propagate",
                str(video),
                "--mask",
                f"0={keyframe}",
                "--out",
                str(out),
                "--engine",
                "xmem",
                "--weights",
                str(weights),
                "--size",
                "-1",
                "--device",
                "cpu",
                "--precision",
                args.precision,
            ]
        )
        summary = json.loads((out / "summary.json").read_text())
        end_to_end = summary["timings"]["propagation_s"]
        written = len(list(out.glob("*.png")))

    frames = len(decoded)
    print(f"XMem {args.precision}, {width}x{height}, {frames} frames, {args.threads} threads")
    print(f"network only (frames in memory): {frames / network_only:.3f} frames/s")
    print(
        f"xmem-label propagate on MP4 (decode + PNG writing): {frames / end_to_end:.3f} "
        f"frames/s, {written} PNGs"
    )
    print(
        f"end to end / network only: {network_only / end_to_end:.3f} "
        f"({(end_to_end / network_only - 1) * 100:+.1f} % time)"
    )
    assert np.isfinite(end_to_end)
    return 0


if __name__ == "__main__":
    sys.exit(main())
