"""The `xmem-label` command: propagate, demo, weights, eval, and the commands of installed extras.

Parsing and printing only: `propagate` and `demo` hand a `PropagationJob` to
propagation_job.py, which checks, runs, writes atomically and summarises. Every problem a user
can cause ends as one line `xmem-label: error: ...` on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import contextlib
import re
import signal
import sys
import threading
import time
import warnings
from collections.abc import Iterator, Sequence
from importlib.metadata import entry_points
from pathlib import Path
from typing import TextIO

from .allocator import keep_freed_memory
from .engine import auto_engine, registered_engines
from .errors import InputError, WeightsError, XMemLabelError, one_line
from .evaluation import add_eval_command
from .outputs import sha256_of
from .propagation_job import PropagationJob, run_propagation
from .session import DIRECTIONS
from .settings import manifest
from .xmem.weights import (
    cache_folder,
    checkpoints,
    default_checkpoint,
    resolve_weights,
    verify_checkpoint,
)

PROG = "xmem-label"
PLUGIN_COMMANDS = "xmem_label.commands"  # entry-point group of commands from other parts
DEMO_CLIP = Path(__file__).with_name("demo_clip")
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
            print(f"{PROG}: error: {one_line(error)}", file=sys.stderr)
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
        help="both: every keyframe's forward and backward passes, fused between keyframes "
        "(default); forward: one forward pass from the first keyframe, frames before it empty",
    )
    parser.add_argument(
        "--suggest",
        type=int,
        default=5,
        metavar="N",
        help="list the N frames to check next, with reasons, in summary.json (default: 5)",
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
        "--threads",
        type=int,
        metavar="N",
        help="CPU threads of the engine's library (XMem: torch's, flow: OpenCV's), for this "
        "process; the engine option `threads` (default: the library's, one per core)",
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
        settings=_parse_settings(args.settings, threads=args.threads),
        direction=args.direction,
        save_probs=args.save_probs,
        overlay=args.overlay,
        force=args.force,
        skip_bad_frames=args.skip_bad_frames,
        suggest=args.suggest,
    )
    if args.suggest < 0:
        raise InputError(f"--suggest takes 0 or more frames, not {args.suggest}")
    summary = run_propagation(job)
    timings = summary["timings"]
    print(
        f"wrote {summary['frame_count']} masks and summary.json to {job.out} in "
        f"{timings['propagation_s']:.1f} s ({timings['frames_per_second']:.1f} frames/s)"
    )
    if job.overlay is not None:
        print(f"overlay: {job.overlay}")
    if summary["suggestions"]:
        print("check next:")
        for suggestion in summary["suggestions"]:
            print(
                f"  frame {suggestion['index']} ({suggestion['name']}): "
                + "; ".join(suggestion["reasons"])
            )
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


def _parse_settings(items: list[str], threads: int | None = None) -> dict[str, str]:
    """--set KEY=VALUE options, and --threads N: the engine option `threads`, checked and typed
    with the other options by the engine that takes it."""
    settings: dict[str, str] = {}
    for item in items:
        key, separator, value = item.partition("=")
        if not separator or not key.strip() or not value.strip():
            raise InputError(f"--set takes KEY=VALUE, e.g. top_k=20; got {item!r}")
        if key.strip() in settings:
            raise InputError(f"two --set options for {key.strip()!r}")
        settings[key.strip()] = value.strip()
    if threads is not None:
        if "threads" in settings:
            raise InputError("give threads once: --threads N or --set threads=N")
        settings["threads"] = str(threads)
    return settings


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


def _warning_on_one_line(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: TextIO | None = None,
    line: str | None = None,
) -> None:
    print(f"{PROG}: warning: {message}", file=sys.stderr)
