"""Ours against the official XMem implementation, side by side in one run (issue 17).

    python -m benchmarks.against_reference --reference PATH [--data DIR] [--clip bmx-trees]
        [--frames 30] [--objects 1,3] [--threads 2] [--cases reference,fp32,bf16,int8]

PATH is a checkout of github.com/hkchengrex/XMem; it is imported from there at run time, never
copied. Two adaptations let it run on CPU, made here at import time and not in its files: its
ResNets are built with `pretrained=False` (no ImageNet download; every weight is then
overwritten), and nothing of it that we call touches CUDA (eval.py's `.cuda()` and autocast are
not used: its loop is reproduced below). torchvision is not needed by the parts we import.

Both run on the same real frames (a clip of the shared vos data, 854x480, decoded before
timing), from its first-frame mask (3 objects: the mask split into 3 vertical strips of its
bounding box), with the same deterministic weights (`common.synthetic_checkpoint`, loaded into
the official `XMem` with eval.py's default configuration), at the reference evaluation's size
(`--size 480`: the short side of these frames already, so neither side resizes), under
`torch.inference_mode` with `--threads` threads. Each case runs in its own process so its peak
RSS (ru_maxrss) is its own. Time per frame: the reference's `InferenceCore.step` + argmax, as
eval.py times it; ours is one step of the public `Session` (the network, argmax, statistics and
the pass written to its cache), median over frames 3..N-1. The masks of every case are compared
with the reference's.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from .common import peak_rss_mb, synthetic_checkpoint

CASES = ("reference", "fp32", "bf16", "int8")
TITLES = {"reference": "reference", "fp32": "exact fp32", "bf16": "bf16", "int8": "int8"}
SIZE = 480  # eval.py's default --size: the short side of the DAVIS 480p frames
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# eval.py's defaults (its argument parser), the configuration the official results use.
REFERENCE_CONFIG: dict[str, Any] = {
    "top_k": 30,
    "mem_every": 5,
    "deep_update_every": -1,
    "enable_long_term": True,
    "max_mid_term_frames": 10,
    "min_mid_term_frames": 5,
    "max_long_term_elements": 10000,
    "num_prototypes": 128,
}


def load_clip(folder: Path, frames: int, objects: int) -> tuple[list[np.ndarray], np.ndarray]:
    """The first `frames` RGB frames of a vos clip and its first-frame mask as labels 1..objects
    (vertical strips of the mask's bounding box, as the reference's timing runs split it)."""
    paths = sorted((folder / "frames").glob("*.jpg"))[:frames]
    if len(paths) < frames:
        raise SystemExit(f"{folder} has {len(paths)} frames, fewer than --frames {frames}")
    images = [cv2.cvtColor(cv2.imread(str(p)), cv2.COLOR_BGR2RGB) for p in paths]
    mask = cv2.imread(str(folder / "masks" / f"{paths[0].stem}.png"), cv2.IMREAD_GRAYSCALE) > 0
    xs = np.nonzero(mask)[1]
    edges = np.linspace(xs.min(), xs.max() + 1, objects + 1)
    columns = np.arange(mask.shape[1])
    labels = np.zeros(mask.shape, np.uint8)
    for object_id in range(1, objects + 1):
        in_strip = (columns >= edges[object_id - 1]) & (columns < edges[object_id])
        labels[mask & in_strip[None, :]] = object_id
    return images, labels


@contextlib.contextmanager
def imported_from(checkout: Path) -> Iterator[None]:
    """Import the official code from its checkout (its packages are `model`, `inference`,
    `util`, which would shadow nothing of ours: we are `xmem_label`)."""
    sys.path.insert(0, str(checkout))
    try:
        yield
    finally:
        sys.path.remove(str(checkout))


def run_reference(
    checkout: Path, images: list[np.ndarray], labels: np.ndarray
) -> tuple[list[float], np.ndarray]:
    """eval.py's loop over pre-decoded frames: per-frame seconds and the argmax masks."""
    with imported_from(checkout):
        from inference.inference_core import InferenceCore  # type: ignore[import-not-found]
        from model.network import XMem  # type: ignore[import-not-found]

        from model import resnet  # type: ignore[import-not-found]

    for name in ("resnet18", "resnet50"):  # no ImageNet download: the weights are replaced
        build = getattr(resnet, name)
        setattr(resnet, name, lambda pretrained=True, _build=build, **kw: _build(False, **kw))

    config = dict(REFERENCE_CONFIG)
    frames = len(images)
    config["enable_long_term_count_usage"] = (
        frames / (config["max_mid_term_frames"] - config["min_mid_term_frames"])
    ) * config["num_prototypes"] >= config["max_long_term_elements"]
    network = XMem(config).eval()
    network.load_weights(torch.load(synthetic_checkpoint()), init_as_zero_if_needed=True)
    processor = InferenceCore(network, config=config)
    objects = int(labels.max())
    one_hot = torch.from_numpy(np.stack([labels == k for k in range(1, objects + 1)])).float()
    processor.set_all_labels(list(range(1, objects + 1)))
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    seconds, masks = [], []
    with torch.inference_mode():
        for t, image in enumerate(images):
            # eval.py's data loader: ToTensor + Normalize, done before its timer starts.
            rgb = (torch.from_numpy(image).permute(2, 0, 1).float() / 255 - mean) / std
            start = time.perf_counter()
            first = t == 0
            prob = processor.step(
                rgb,
                one_hot if first else None,
                list(range(1, objects + 1)) if first else None,
                end=t == frames - 1,
            )
            mask = torch.max(prob, dim=0).indices.numpy().astype(np.uint8)
            seconds.append(time.perf_counter() - start)
            masks.append(mask)
    return seconds, np.stack(masks)


def run_ours(
    precision: str, images: list[np.ndarray], labels: np.ndarray
) -> tuple[list[float], np.ndarray]:
    """Our engine through the public Session, forward like eval.py."""
    from xmem_label.model import Session, load_engine

    engine = load_engine(
        "xmem", weights=synthetic_checkpoint(), size=SIZE, device="cpu", precision=precision
    )
    session = Session(engine, images)
    session.add_mask(0, labels)
    stamps, masks = [time.perf_counter()], []
    with torch.inference_mode():
        for result in session.propagate(direction="forward"):
            stamps.append(time.perf_counter())
            masks.append(result.labels)
    return [b - a for a, b in zip(stamps, stamps[1:], strict=False)], np.stack(masks)


def run_case(args: argparse.Namespace) -> dict[str, Any]:
    """One case in this process; the masks go to `args.masks_out`."""
    images, labels = load_clip(Path(args.data) / args.clip, args.frames, int(args.objects))
    if args.case == "reference":
        seconds, masks = run_reference(Path(args.reference), images, labels)
    else:  # loading our engine under inference_mode fails (weights are versioned)
        seconds, masks = run_ours(args.case, images, labels)
    np.save(args.masks_out, masks)
    timed = seconds[3:-1]
    return {"median": statistics.median(timed), "seconds": timed, "peak_rss_mb": peak_rss_mb()}


def child_command(args: argparse.Namespace, case: str, objects: int, masks_out: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "benchmarks.against_reference",
        "--case",
        case,
        "--reference",
        str(args.reference),
        "--data",
        str(args.data),
        "--clip",
        args.clip,
        "--frames",
        str(args.frames),
        "--objects",
        str(objects),
        "--threads",
        str(args.threads),
        "--masks-out",
        str(masks_out),
    ]


def load_average() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reference", required=True, help="a checkout of hkchengrex/XMem")
    parser.add_argument("--data", default="/work/shared/data/vos", help="DAVIS-format clips")
    parser.add_argument("--clip", default="bmx-trees")
    parser.add_argument("--frames", type=int, default=30)
    parser.add_argument("--objects", default="1,3", help="comma-separated object counts")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cases", default=",".join(CASES), help=f"some of {','.join(CASES)}")
    parser.add_argument("--case", choices=CASES, help=argparse.SUPPRESS)
    parser.add_argument("--masks-out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    if args.case:  # child process: one case, JSON on the last line of stdout
        print(json.dumps(run_case(args)))
        return 0

    checkout = Path(args.reference)
    if not (checkout / "inference" / "inference_core.py").is_file():
        parser.error(f"{checkout} is not a checkout of hkchengrex/XMem")
    cases = args.cases.split(",")
    if unknown := set(cases) - set(CASES):
        parser.error(f"unknown cases {sorted(unknown)}; choose from {CASES}")
    print(
        f"{args.clip}, {args.frames} frames, {args.threads} threads, median s/frame over frames "
        f"3..{args.frames - 1}, peak RSS in MB; load average before: {load_average()}",
        flush=True,
    )
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for objects in (int(n) for n in args.objects.split(",")):
            results: dict[str, dict[str, Any]] = {}
            for case in cases:
                masks_out = Path(folder) / f"{case}-{objects}.npy"
                command = child_command(args, case, objects, masks_out)
                output = subprocess.run(command, capture_output=True, text=True)
                if output.returncode:
                    sys.exit(f"case {case}, {objects} object(s) failed:\n{output.stderr}")
                results[case] = json.loads(output.stdout.strip().splitlines()[-1])
                results[case]["masks"] = np.load(masks_out)
                print(
                    f"  {objects} object(s), {TITLES[case]}: {results[case]['median']:.3f} s, "
                    f"{results[case]['peak_rss_mb']:,.0f} MB",
                    flush=True,
                )
            rows.append((objects, results))
    print(f"load average after: {load_average()}\n")
    print("| case | " + " | ".join(TITLES[c] for c in cases) + " |")
    print("|---" * (len(cases) + 1) + "|")
    for objects, results in rows:
        cells = []
        reference = results.get("reference")
        for case in cases:
            result = results[case]
            ratio = ""
            if reference is not None and case != "reference":
                ratio = f" ({reference['median'] / result['median']:.2f}x)"
            cells.append(f"{result['median']:.3f} s{ratio}, {result['peak_rss_mb']:,.0f} MB")
        name = "1 object" if objects == 1 else f"{objects} objects"
        print(f"| {name} | " + " | ".join(cells) + " |")
    for objects, results in rows:
        if "reference" not in results:
            continue
        agreement = ", ".join(
            f"{TITLES[case]} {np.mean(results[case]['masks'] == results['reference']['masks']):.4%}"
            for case in cases
            if case != "reference"
        )
        print(f"mask pixels equal to the reference's, {objects} object(s): {agreement}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
