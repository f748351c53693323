"""The `xmem-label` command: propagate, demo, weights, eval, and the commands of installed extras.

Every problem a user can cause ends as one line `xmem-label: error: ...` on stderr and exit code
2. `propagate` writes into a hidden sibling folder and renames it to `--out` only when every
frame is written, so a failed run leaves nothing half-written.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import inspect
import json
import re
import signal
import sys
import threading
import time
import warnings
from collections.abc import Iterator, Sequence
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import yaml
from tqdm import tqdm

from .engine import Engine, EngineSpec, auto_engine, engine_spec, load_engine, registered_engines
from .errors import InputError, WeightsError, XMemLabelError
from .evaluation import add_eval_command
from .frames import FrameSource, VideoFile, open_frames, prefetch
from .masks import read_label_mask, write_label_mask
from .outputs import (
    StagedOutput,
    check_apart,
    check_overlay_replaceable,
    check_replaceable,
    remove_stale_partials,
    staged_output,
)
from .overlay import OverlayWriter, check_overlay_path
from .results import FrameResult
from .session import DIRECTIONS, Session
from .settings import manifest
from .weights import (
    cache_folder,
    checkpoints,
    default_checkpoint,
    resolve_weights,
    sha256_of,
    verify_checkpoint,
)
from .xmem.allocator import keep_freed_memory

PROG = "xmem-label"
PLUGIN_COMMANDS = "xmem_label.commands"  # entry-point group of commands from other parts
DEMO_CLIP = Path(__file__).with_name("demo_clip")
OUTPUT_QUEUE_FRAMES = 4  # finished frames waiting to be written
FOLDER_FPS = 15.0  # overlay frame rate for image folders, which carry none (the demo clip's)
# Flags for options some engines take (XMem's); other settings go through --set KEY=VALUE.
ENGINE_FLAGS = ("weights", "device", "precision", "size")
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)  # each ends a run like Ctrl-C
KEYFRAME_ARGUMENT = re.compile(r"\s*([0-9]+)\s*=(.+)", re.ASCII | re.DOTALL)


class Interrupted(KeyboardInterrupt):
    """SIGINT, SIGTERM or SIGHUP: unwinds like Ctrl-C, so every cleanup runs."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class _Parser(argparse.ArgumentParser):
    """An argument parser whose mistakes are user errors: one line, exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise InputError(f"{message} (see: {self.prog} --help)")


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
    download_weights: bool = True
    skip_bad_frames: bool = False  # replace undecodable frames by the previous one, with a warning
    command: str = "propagate"  # recorded in the output's marker; demo replaces only its own


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (0 done, 2 bad input)."""
    keep_freed_memory()  # before any thread starts (see allocator.py)
    parser = build_parser()
    with warnings.catch_warnings(), _stop_signals_interrupt():
        warnings.showwarning = _warning_on_one_line
        try:
            try:
                args = parser.parse_args(argv)
            except SystemExit as done:  # --help and --version
                return done.code if isinstance(done.code, int) else 0
            # Every command sets its handler as `run` (set_defaults(run=...)).
            handler = getattr(args, "run", None)
            if handler is None:
                return _usage(parser)
            return handler(args)
        except (XMemLabelError, OSError) as error:
            message = " ".join(str(error).split()) or type(error).__name__
            print(f"{PROG}: error: {message}", file=sys.stderr)
            return 2
        except KeyboardInterrupt as interrupt:
            signum = interrupt.signum if isinstance(interrupt, Interrupted) else signal.SIGINT
            name = signal.Signals(signum).name
            print(f"{PROG}: interrupted ({name}); no partial output left", file=sys.stderr)
            return 128 + signum


@contextlib.contextmanager
def _stop_signals_interrupt() -> Iterator[None]:
    """Turn SIGTERM and SIGHUP (and SIGINT) into an `Interrupted` exception in the main thread,
    so a run stopped by any of them removes its staged output and spill as Ctrl-C does. Later
    signals are ignored while that cleanup runs (it waits for at most one network step)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []

    def interrupt(signum: int, frame: object) -> None:
        if not received:
            received.append(signum)
            raise Interrupted(signum)

    previous = {signum: signal.getsignal(signum) for signum in STOP_SIGNALS}
    for signum in STOP_SIGNALS:
        signal.signal(signum, interrupt)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _usage(parser: argparse.ArgumentParser) -> int:
    """A command given without its subcommand: show what it takes (exit code 2)."""
    parser.print_help(sys.stderr)
    return 2


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
        description="Keyframe masks in, a mask for every video frame out (XMem).",
    )
    subparsers = parser.add_subparsers(title="commands", metavar="COMMAND")
    _add_propagate_command(subparsers)
    _add_demo_command(subparsers)
    _add_weights_command(subparsers)
    add_eval_command(subparsers)
    _add_plugin_commands(subparsers)
    return parser


# ----- propagate ---------------------------------------------------------------------------------


def _add_propagate_command(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "propagate",
        help="turn keyframe masks into a mask for every frame",
        description="Propagate keyframe masks over SOURCE (a video file or a folder of images) "
        "and write one palette PNG per frame plus summary.json into --out.",
    )
    parser.add_argument(
        "source", type=Path, metavar="SOURCE", help="video file or folder of frames"
    )
    parser.add_argument(
        "--mask",
        action="append",
        required=True,
        metavar="FRAME=PNG",
        help="label mask (palette or grey PNG, 0 = background) on frame FRAME (0-based); "
        "repeat for more keyframes",
    )
    parser.add_argument("--out", type=Path, required=True, metavar="DIR", help="output folder")
    _add_engine_options(parser, default_engine=manifest()["default_engine"])
    parser.add_argument(
        "--direction",
        choices=DIRECTIONS,
        default="both",
        help="both: also fill frames before an object's first keyframe (default); "
        "forward: leave them empty",
    )
    parser.add_argument(
        "--save-probs",
        action="store_true",
        help="also write probs/<frame>.npy: float16 (objects + 1, H, W), background first",
    )
    parser.add_argument(
        "--overlay", type=Path, metavar="FILE", help="write the masks over the frames (.mp4/.gif)"
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help="replace xmem-label's own earlier output at --out and --overlay (nothing else)",
    )
    parser.add_argument(
        "--skip-bad-frames",
        action="store_true",
        help="use the previous frame for a frame that cannot be decoded, with a warning "
        "(default: an error)",
    )
    parser.set_defaults(run=_run_propagate)


def _add_engine_options(parser: argparse.ArgumentParser, default_engine: str | None) -> None:
    parser.add_argument(
        "--engine",
        choices=sorted(registered_engines()),
        default=default_engine,
        help=f"propagation engine (default: {default_engine or 'xmem if its weights are here'})",
    )
    parser.add_argument(
        "--weights",
        metavar="PATH|NAME",
        help=f"XMem checkpoint file or name ({', '.join(checkpoints())}; "
        f"default: ${manifest()['weights']['env_var']}, else {default_checkpoint()})",
    )
    parser.add_argument(
        "--size",
        type=int,
        metavar="N",
        help="XMem internal short side in pixels (-1 = native; default 480)",
    )
    parser.add_argument(
        "--device", metavar="D", help="cpu, cuda, cuda:1, mps (default: best available)"
    )
    parser.add_argument(
        "--precision",
        choices=("fp32", "bf16", "fp16", "int8"),
        help="XMem precision: fp32 (exact, default), bf16 (fast: CPU or CUDA), fp16 (CUDA, MPS), "
        "int8 (fastest: CPU)",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        dest="settings",
        help="engine setting, e.g. top_k=20 or mem_every=3 (repeatable)",
    )


def _run_propagate(args: argparse.Namespace) -> int:
    job = PropagationJob(
        source=args.source,
        keyframes=_parse_keyframes(args.mask),
        out=args.out,
        engine=args.engine,
        weights=args.weights,
        device=args.device,
        precision=args.precision,
        size=args.size,
        settings=_parse_settings(args.settings),
        direction=args.direction,
        save_probs=args.save_probs,
        overlay=args.overlay,
        force=args.force,
        skip_bad_frames=args.skip_bad_frames,
    )
    summary = run_propagation(job)
    timings = summary["timings"]
    print(
        f"wrote {summary['frame_count']} masks and summary.json to {job.out} in "
        f"{timings['propagation_s']:.1f} s ({timings['frames_per_second']:.1f} frames/s)"
    )
    if job.overlay is not None:
        print(f"overlay: {job.overlay}")
    return 0


def _parse_keyframes(items: list[str]) -> dict[int, Path]:
    """--mask FRAME=PNG values as frame -> path; the frame is ASCII digits, the path the rest."""
    keyframes: dict[int, Path] = {}
    for item in items:
        match = KEYFRAME_ARGUMENT.fullmatch(item)
        if match is None or not match.group(2).strip():
            raise InputError(
                f"--mask takes FRAME=PNG with a frame number, e.g. 0=mask.png; got {item!r}"
            )
        frame, path = int(match.group(1)), match.group(2)
        if frame in keyframes:
            raise InputError(f"two --mask options for frame {frame}")
        keyframes[frame] = Path(path)
    return keyframes


def _parse_settings(items: list[str]) -> dict[str, str]:
    settings: dict[str, str] = {}
    for item in items:
        key, separator, value = item.partition("=")
        if not separator or not key.strip() or not value.strip():
            raise InputError(f"--set takes KEY=VALUE, e.g. top_k=20; got {item!r}")
        if key.strip() in settings:
            raise InputError(f"two --set options for {key.strip()!r}")
        settings[key.strip()] = value.strip()
    return settings


def run_propagation(job: PropagationJob) -> dict[str, Any]:
    """Propagate `job.keyframes` over `job.source` and write the results; returns the summary.

    Checks every input and option before loading the engine. Nothing appears at `job.out` (or
    `job.overlay`) unless the whole clip was written, and nothing there is replaced unless this
    tool wrote it and `job.force` is set.
    """
    engine_options = _engine_options(job)
    _check_outputs(job)
    if engine_spec(job.engine).needs_weights:  # only now: resolving a name may download
        engine_options["weights"] = resolve_weights(job.weights, download=job.download_weights)
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
    parameters = inspect.signature(spec.load_function()).parameters.values()
    named = {p.name for p in parameters if p.kind is inspect.Parameter.KEYWORD_ONLY}
    takes_settings = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)
    return {name for name in ENGINE_FLAGS if name in named or (takes_settings and name == "size")}


def _typed_settings(engine: str, settings: dict[str, str]) -> dict[str, Any]:
    """--set values as the engine loader's parameters expect them; unknown names refused.

    Parameters with a number or flag default get that type; anything else (for XMem, the
    memory settings, which the engine checks itself) is read as a YAML scalar.
    """
    parameters = inspect.signature(engine_spec(engine).load_function()).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    named = {
        name: p.default
        for name, p in parameters.items()
        if p.kind is inspect.Parameter.KEYWORD_ONLY and name not in ENGINE_FLAGS
    }
    typed: dict[str, Any] = {}
    for key, text in settings.items():
        if key in ENGINE_FLAGS:
            raise InputError(f"give {key} as --{key}, not --set")
        if key not in named and not takes_any:
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
                if job.save_probs:
                    np.save(
                        folder / "probs" / f"{result.name}.npy", result.probs.astype(np.float16)
                    )
                if overlay is not None:
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
        "frames": per_frame,
    }


# ----- demo --------------------------------------------------------------------------------------


def _add_demo_command(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="propagate the bundled demo clip",
        description="Propagate the first-frame mask of the bundled clip (model/demo_clip, "
        "CC BY 4.0, see its ATTRIBUTION.md) and write masks, summary.json and an overlay video. "
        "Uses XMem when its weights are on this machine, else the weight-free flow engine.",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("xmem-label-demo"),
        metavar="DIR",
        help="output folder (default: ./xmem-label-demo)",
    )
    parser.add_argument(
        "--engine",
        choices=sorted(registered_engines()),
        help="default: the first engine that can run here (xmem if its weights are here, "
        "else flow)",
    )
    parser.set_defaults(run=_run_demo)


def _run_demo(args: argparse.Namespace) -> int:
    engine = args.engine
    if engine is None:
        spec, reasons = auto_engine()
        engine = spec.name
        for reason in reasons:
            print(f"Not using {reason}.")
        if reasons:
            print(f"Using the {spec.description}. To use XMem: {PROG} weights download")
    out = args.out
    job = PropagationJob(
        source=DEMO_CLIP / "frames",
        keyframes={0: DEMO_CLIP / "keyframe_00000.png"},
        out=out,
        engine=engine,
        overlay=out / "overlay.mp4",
        force=True,  # _check_outputs lets the demo replace only an earlier demo's output
        command="demo",
    )
    started = time.perf_counter()
    summary = run_propagation(job)
    wall_s = time.perf_counter() - started
    weights = summary["weights"]
    width, height = summary["frame_size"]
    print(f"engine: {engine}")
    if weights:
        print(f"weights: {weights['path']} (sha256 {weights['sha256']})")
    else:
        print("weights: none (weight-free engine)")
    print(f"clip: {summary['frame_count']} frames, {width}x{height}, from {DEMO_CLIP}")
    print(
        f"wall time: {wall_s:.2f} s, {summary['frame_count'] / wall_s:.1f} frames/s "
        f"(propagation alone {summary['timings']['frames_per_second']:.1f} frames/s)"
    )
    print(f"masks and summary.json: {out}")
    print(f"overlay: {job.overlay}")
    return 0


# ----- weights -----------------------------------------------------------------------------------


def _add_weights_command(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "weights",
        help="list, download or verify XMem checkpoints",
        description=f"XMem checkpoints live in the cache ({cache_folder()}; "
        f"${manifest()['weights']['cache_env_var']} moves it).",
    )
    parser.set_defaults(run=lambda args: _usage(parser))
    actions = parser.add_subparsers(title="actions", metavar="ACTION")
    listing = actions.add_parser("list", help="the known checkpoints and whether they are here")
    listing.set_defaults(run=_run_weights_list)
    download = actions.add_parser("download", help="download a checkpoint into the cache")
    download.add_argument("name", nargs="?", default=default_checkpoint())
    download.set_defaults(run=_run_weights_download)
    verify = actions.add_parser(
        "verify", help="check a cached checkpoint's sha256 and that it fits the XMem network"
    )
    verify.add_argument("name", nargs="?", metavar="NAME|PATH", help="default: every cached one")
    verify.set_defaults(run=_run_weights_verify)


def _run_weights_list(args: argparse.Namespace) -> int:
    folder = cache_folder()
    for name, checkpoint in checkpoints().items():
        mark = " (default)" if name == default_checkpoint() else ""
        where = folder / name
        state = f"cached at {where}" if where.is_file() else "not downloaded"
        print(f"{name}{mark}: {state}")
        print(f"    {checkpoint.description}")
        print(f"    {checkpoint.url}")
    return 0


def _run_weights_download(args: argparse.Namespace) -> int:
    if args.name not in checkpoints():
        raise WeightsError(
            f"unknown checkpoint {args.name!r}; weights download takes a name: "
            f"{', '.join(checkpoints())} (a file of your own needs no download: pass --weights)"
        )
    path = resolve_weights(args.name)
    print(f"{args.name}: {path} (sha256 {sha256_of(path)})")
    return 0


def _run_weights_verify(args: argparse.Namespace) -> int:
    from .xmem.checkpoint import build_network, load_state_dict

    if args.name is not None and Path(args.name).is_file():
        build_network(load_state_dict(args.name))
        print(f"{args.name}: fits the XMem network (sha256 {sha256_of(args.name)})")
        return 0
    if args.name is not None and args.name not in checkpoints():
        what = "is not a file" if Path(args.name).exists() else "no such file"
        raise WeightsError(
            f"{args.name}: {what}, nor a checkpoint name ({', '.join(checkpoints())})"
        )
    names = (
        [args.name]
        if args.name is not None
        else [name for name in checkpoints() if (cache_folder() / name).is_file()]
    )
    if not names:
        raise WeightsError(
            f"no checkpoint in the cache {cache_folder()}; run: {PROG} weights download"
        )
    for name in names:
        sha256 = verify_checkpoint(name)
        build_network(load_state_dict(cache_folder() / name))
        print(f"{name}: ok (sha256 {sha256}, fits the XMem network)")
    return 0


# ----- commands of other parts -------------------------------------------------------------------


def _add_plugin_commands(subparsers: argparse._SubParsersAction) -> None:
    """Let installed parts (the Label Studio backend, ...) add their subcommands.

    A part whose third-party dependencies are not installed, or whose entry point names a
    function it lacks (a stale install), still gets a command, which says what is wrong instead
    of failing the whole program.
    """
    for entry in sorted(entry_points(group=PLUGIN_COMMANDS), key=lambda e: e.name):
        try:
            add_command = entry.load()
        except (ImportError, AttributeError) as error:
            _add_unavailable_command(subparsers, entry.name, error)
            continue
        add_command(subparsers)


def _add_unavailable_command(
    subparsers: argparse._SubParsersAction, name: str, error: ImportError | AttributeError
) -> None:
    missing = (error.name or "") if isinstance(error, ImportError) else ""
    if missing and not missing.startswith("xmem_label"):
        reason = (
            f"the {name} command needs the Python package {missing!r}, which is not installed; "
            f"install the extra that provides it, e.g. pip install 'xmem-label[all]'"
        )
    else:
        reason = f"the {name} command cannot be loaded: {error}"
    # No "-" prefix: every argument, options included, is swallowed by `ignored`, so the user
    # sees why the command is unavailable rather than a complaint about its options.
    parser = subparsers.add_parser(
        name, help=f"(unavailable: {reason})", add_help=False, prefix_chars="+"
    )
    parser.add_argument("ignored", nargs="*")

    def explain(args: argparse.Namespace) -> int:
        raise InputError(reason)

    parser.set_defaults(run=explain)


def _warning_on_one_line(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"{PROG}: warning: {message}", file=sys.stderr)
