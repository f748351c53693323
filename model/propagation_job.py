"""One propagation job, as `xmem-label propagate` and `demo` run it: check every input and
option, run the engine over the clip, write masks (and probabilities, overlay) into a staging
folder that becomes `--out` only when every frame is written, and summarise the run.

The command line (cli.py) parses arguments into a `PropagationJob` and prints; this module
does the work.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import yaml
from tqdm import tqdm

from .engine import Engine, EngineSpec, engine_spec, load_engine, registered_engines
from .errors import InputError
from .frames import FrameSource, VideoFile, open_frames, prefetch
from .masks import read_label_mask, write_label_mask
from .outputs import (
    StagedOutput,
    check_apart,
    check_overlay_replaceable,
    check_replaceable,
    remove_stale_partials,
    sha256_of,
    staged_output,
)
from .overlay import OverlayWriter, check_overlay_path
from .results import FrameResult
from .session import Session

OUTPUT_QUEUE_FRAMES = 4  # finished frames waiting to be written
FOLDER_FPS = 15.0  # overlay frame rate for image folders, which carry none (the demo clip's)
# Flags for options some engines take (XMem's); other settings go through --set KEY=VALUE.
ENGINE_FLAGS = ("weights", "device", "precision", "size")


@dataclasses.dataclass
class PropagationJob:
    """One `propagate` run: what to read, which engine, and what to write where."""

    source: Path
    keyframes: dict[int, Path]
    out: Path
    engine: str
    weights: str | None = None
    device: str | None = None
    precision: str | None = None
    size: int | None = None
    settings: dict[str, str] = dataclasses.field(default_factory=dict)
    direction: str = "both"
    save_probs: bool = False
    overlay: Path | None = None
    force: bool = False  # replace this tool's own earlier output at `out` and `overlay`
    suggest: int = 5  # frames to check next, in summary.json (0: none)
    download_weights: bool = True
    skip_bad_frames: bool = False  # replace undecodable frames by the previous one, with a warning
    command: str = "propagate"  # recorded in the output's marker; demo replaces only its own


def run_propagation(job: PropagationJob) -> dict[str, Any]:
    """Propagate `job.keyframes` over `job.source` and write the results; returns the summary.

    Checks every input and option before loading the engine. Nothing appears at `job.out` (or
    `job.overlay`) unless the whole clip was written, and nothing there is replaced unless this
    tool wrote it and `job.force` is set.
    """
    engine_options = _engine_options(job)
    _check_outputs(job)
    spec = engine_spec(job.engine)
    if spec.needs_weights:  # only now: resolving a name may download
        find_weights = spec.find_weights_function()
        engine_options["weights"] = find_weights(job.weights, download=job.download_weights)
    frames = open_frames(job.source, skip_bad_frames=job.skip_bad_frames)
    try:
        masks = {index: read_label_mask(path) for index, path in sorted(job.keyframes.items())}
        started = time.perf_counter()
        engine = load_engine(job.engine, **engine_options)
        loaded = time.perf_counter()
        weights = engine.describe().weights
        if weights:
            check_apart(job.out, job.overlay, [("--weights file", Path(weights))])
        with Session(engine, frames) as session:
            for index, labels in masks.items():
                try:
                    session.add_mask(index, labels)
                except InputError as error:
                    raise InputError(f"{job.keyframes[index]}: {error}") from None
            remove_stale_partials(job.out)
            with staged_output(job.out, job.overlay, job.command, job.force) as staged:
                per_frame = _write_results(session, job, staged)
                finished = time.perf_counter()
                summary = _summary(job, session, engine, per_frame, started, loaded, finished)
                (staged.folder / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
                session.close()  # its passes live in the staging folder: not part of the output
    finally:
        frames.close()
    return summary


def _check_outputs(job: PropagationJob) -> None:
    """Refuse, before any work, to write over an input or over anything this tool did not
    write, and to replace its own earlier output without --force."""
    out = job.out
    inputs = [("SOURCE", job.source)]
    inputs += [("keyframe mask", path) for _, path in sorted(job.keyframes.items())]
    if job.weights is not None and Path(job.weights).expanduser().exists():
        inputs.append(("--weights file", Path(job.weights).expanduser()))
    check_apart(out, job.overlay, inputs)
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        if job.command == "demo":
            check_replaceable(out, ["demo"], "the demo replaces only its own earlier output")
        elif not job.force:
            raise InputError(f"--out {out} is not empty; choose another folder or add --force")
        else:
            check_replaceable(
                out, ["propagate", "demo"], "--force replaces only this tool's own output"
            )
    if job.overlay is not None:
        check_overlay_path(job.overlay)
        inside_out = job.overlay.resolve().is_relative_to(out.resolve())
        if job.overlay.exists() and not inside_out:
            if not job.force:
                raise InputError(
                    f"--overlay {job.overlay} exists; choose another file or add --force"
                )
            check_overlay_replaceable(job.overlay, out)


def _engine_options(job: PropagationJob) -> dict[str, Any]:
    """The engine loader's keyword arguments, every one checked (types, ranges, relations,
    the device) by the engine's own check before anything is read, downloaded or written."""
    spec = engine_spec(job.engine)
    settings = _typed_settings(job.engine, job.settings)
    given = [name for name in ENGINE_FLAGS if getattr(job, name) is not None]
    refused = [name for name in given if name not in _flags_taken(spec)]
    if refused:
        takers = [
            name
            for name, other in registered_engines().items()
            if refused[0] in _flags_taken(other)
        ]
        raise InputError(
            f"{', '.join('--' + name for name in refused)} apply to the "
            f"{' and '.join(takers)} engine only; the {job.engine} engine takes --set KEY=VALUE"
        )
    options = {name: getattr(job, name) for name in given if name != "weights"}
    spec.check_function()(**options, **settings)
    return {**options, **settings}


def _flags_taken(spec: EngineSpec) -> set[str]:
    """The engine flags an engine accepts: its loader's named options, and --size (a setting)
    when the loader takes settings by keyword."""
    named = spec.options()
    return {
        name
        for name in ENGINE_FLAGS
        if name in named or (spec.takes_any_setting and name == "size")
    }


def _typed_settings(engine: str, settings: dict[str, str]) -> dict[str, Any]:
    """--set values as the engine loader's parameters expect them; unknown names refused.

    Parameters with a number or flag default get that type; anything else (for XMem, the
    memory settings, which the engine checks itself) is read as a YAML scalar.
    """
    spec = engine_spec(engine)
    named = {name: default for name, default in spec.options().items() if name not in ENGINE_FLAGS}
    typed: dict[str, Any] = {}
    for key, text in settings.items():
        if key in ENGINE_FLAGS:
            raise InputError(f"give {key} as --{key}, not --set")
        if key not in named and not spec.takes_any_setting:
            raise InputError(
                f"unknown {engine} setting {key!r}; known settings: {', '.join(sorted(named))}"
            )
        typed[key] = _typed_value(key, text, named.get(key))
    return typed


def _typed_value(key: str, text: str, default: Any) -> Any:
    if isinstance(default, str):
        return text
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        value = text
    if isinstance(default, bool) and not isinstance(value, bool):
        raise InputError(f"setting {key!r} takes true or false, not {text!r}")
    if isinstance(default, (int, float)) and not isinstance(default, bool):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise InputError(f"setting {key!r} takes a number, not {text!r}")
        if isinstance(default, int) and not isinstance(value, int):
            raise InputError(f"setting {key!r} takes a whole number, not {text!r}")
        return type(default)(value)
    return value


def _write_results(
    session: Session, job: PropagationJob, staged: StagedOutput
) -> list[dict[str, Any]]:
    """Write every frame's mask (and probabilities, overlay frame) into the staging folder;
    return per-frame summaries."""
    folder = staged.folder
    if job.save_probs:
        (folder / "probs").mkdir()
    overlay = None
    frames_for_overlay = None
    if staged.staged_overlay is not None:
        overlay = OverlayWriter(staged.staged_overlay, _frame_rate(session.frames))
        frames_for_overlay = session.frames.forward()
    per_frame = []
    names: set[str] = set()
    with tqdm(
        desc="propagating", unit="frame", disable=not sys.stderr.isatty(), leave=False
    ) as bar:

        def show_progress(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)

        # The network runs a few frames ahead in a background thread (bounded queue), so
        # writing PNGs, probabilities and the overlay overlaps with it. Its spill goes inside
        # the staging folder; on any error or signal the session is cancelled and waited for.
        results = session.propagate(
            direction=job.direction,
            with_probs=job.save_probs,
            progress=show_progress,
            spill_dir=folder,
        )
        ahead = prefetch(results, depth=OUTPUT_QUEUE_FRAMES, on_stop=session.cancel)
        try:
            for result in ahead:
                if result.name in names:
                    raise InputError(f"two frames of {job.source} are named {result.name!r}")
                names.add(result.name)
                write_label_mask(folder / f"{result.name}.png", result.labels)
                if result.probs is not None:  # asked for with job.save_probs
                    np.save(
                        folder / "probs" / f"{result.name}.npy", result.probs.astype(np.float16)
                    )
                if overlay is not None and frames_for_overlay is not None:
                    _, frame = next(frames_for_overlay)
                    overlay.add(frame, result.labels)
                per_frame.append(_frame_summary(result))
        except BaseException:
            if overlay is not None:
                overlay.discard()  # unfinished: no check that could hide the first error
            raise
        finally:
            ahead.close()
            if frames_for_overlay is not None:
                frames_for_overlay.close()
    if overlay is not None:
        overlay.close()
    return per_frame


def _frame_rate(frames: FrameSource) -> float:
    if isinstance(frames, VideoFile):
        capture = cv2.VideoCapture(str(frames.path))
        fps = capture.get(cv2.CAP_PROP_FPS)
        capture.release()
        if fps and 0 < fps < 1000:
            return float(fps)
    return FOLDER_FPS


def _frame_summary(result: FrameResult) -> dict[str, Any]:
    return {
        "index": result.index,
        "name": result.name,
        "keyframe": result.is_keyframe,
        "min_confidence": round(result.min_confidence, 4),
        "objects": {
            str(object_id): {
                "confidence": round(obj.confidence, 4),
                "area": obj.area,
                "box": list(obj.box) if obj.box is not None else None,
                "keyframe": obj.keyframe,
                "source": obj.source,
                "keyframes": list(obj.keyframes),
            }
            for object_id, obj in result.objects.items()
        },
    }


def _summary(
    job: PropagationJob,
    session: Session,
    engine: Engine,
    per_frame: list[dict[str, Any]],
    started: float,
    loaded: float,
    finished: float,
) -> dict[str, Any]:
    described = engine.describe()
    weights = None
    if described.weights:
        weights = {
            "path": described.weights,
            "sha256": described.sha256 or sha256_of(described.weights),
        }
    height, width = session.frame_hw
    propagation_s = finished - loaded
    return {
        "source": str(job.source),
        "frame_count": len(per_frame),
        "frame_size": [width, height],
        "keyframes": {str(index): str(path) for index, path in sorted(job.keyframes.items())},
        "object_ids": session.object_ids,
        "direction": job.direction,
        "engine": described.as_dict(),
        "weights": weights,
        "settings": described.settings,
        "timings": {
            "engine_load_s": round(loaded - started, 3),
            "propagation_s": round(propagation_s, 3),
            "frames_per_second": round(len(per_frame) / propagation_s, 3),
        },
        "skipped_frames": [
            {"index": index, "name": session.frames.frame_name(index), "problem": problem}
            for index, problem in sorted(session.frames.skipped_frames.items())
        ],
        "outputs": {
            "masks": "<frame>.png",
            "probs": "probs/<frame>.npy" if job.save_probs else None,
            "overlay": str(job.overlay) if job.overlay is not None else None,
        },
        "suggestions": [s.as_dict() for s in session.suggest(job.suggest)] if job.suggest else [],
        "frames": per_frame,
    }
