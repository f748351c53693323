"""Where the command line writes, and what it may replace.

A run writes into a hidden staging folder beside `--out` (`.<out>.partial-<pid>-<token>`) that
holds an ownership marker, `.xmem-label.json`, from its first moment, and renames it to `--out`
only when every file is written. The finished marker lists every file the run wrote (with its
size and modification time), so a later `--force` (or `demo`) replaces a folder only when all of
it is this tool's own output, unchanged, and the next run into the same `--out` recognises the
staging folder of a killed run by its marker and its dead process, and removes it. Nothing else
is ever deleted or overwritten.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import socket
import uuid
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from .errors import InputError

MARKER = ".xmem-label.json"
TOOL = "xmem-label"
HASH_CHUNK_BYTES = 1 << 20


def sha256_of(path: str | Path) -> str:
    """Hex sha256 of a file, read in chunks (overlays in the marker, weights in summaries)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def check_apart(out: Path, overlay: Path | None, inputs: Iterable[tuple[str, Path]]) -> None:
    """Refuse an `out` that is, holds or lies inside an input, and an `overlay` that is an
    input or lies inside one: replacing or renaming either would destroy the input.

    inputs: (what it is, path) pairs, e.g. ("SOURCE", clip) or ("--mask", keyframe.png).
    """
    out_path = out.resolve()
    overlay_path = overlay.resolve() if overlay is not None else None
    for what, given in inputs:
        path = given.resolve()
        if out_path == path or out_path.is_relative_to(path) or path.is_relative_to(out_path):
            relation = (
                "is"
                if out_path == path
                else "lies inside"
                if out_path.is_relative_to(path)
                else "holds"
            )
            raise InputError(
                f"--out {out} {relation} the {what} {given}; write the output somewhere else"
            )
        if overlay_path is not None and (overlay_path == path or overlay_path.is_relative_to(path)):
            relation = "is" if overlay_path == path else "lies inside"
            raise InputError(
                f"--overlay {overlay} {relation} the {what} {given}; write it somewhere else"
            )


def read_marker(folder: Path) -> dict[str, Any] | None:
    """The ownership marker of `folder` if it holds one this tool wrote, else None."""
    try:
        marker = json.loads((folder / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(marker, dict) or marker.get("tool") != TOOL:
        return None
    return marker


def check_replaceable(out: Path, commands: Iterable[str], hint: str) -> None:
    """Refuse to replace `out` unless this tool wrote it (with one of `commands`) and it holds
    nothing else. hint: what to do instead, ending the message."""
    marker = read_marker(out)
    commands = tuple(commands)
    if marker is None or marker.get("state") != "complete":
        raise InputError(
            f"--out {out} is not empty and was not written by {TOOL} (no {MARKER}); {hint}"
        )
    if marker.get("command") not in commands:
        raise InputError(
            f"--out {out} holds the output of `{TOOL} {marker.get('command')}`, which "
            f"`{TOOL} {commands[0]}` does not replace; {hint}"
        )
    written = marker.get("files") or {}
    listed = {MARKER, *written}
    folders = {str(parent) for name in listed for parent in Path(name).parents}
    for path in sorted(out.rglob("*")):
        name = str(path.relative_to(out))
        own = name in folders if path.is_dir() and not path.is_symlink() else name in listed
        if not own:
            raise InputError(
                f"--out {out} is not empty: it holds {name}, which {TOOL} did not write; {hint}"
            )
        if name in written and _fingerprint(path) != written[name]:
            raise InputError(
                f"--out {out}: {name} was changed after {TOOL} wrote it (a correction?); {hint}"
            )


def check_overlay_replaceable(overlay: Path, out: Path) -> None:
    """An existing `overlay` outside `out` may be replaced only if it is, byte for byte, the
    overlay the earlier run into `out` wrote (its marker records the path and sha256)."""
    marker = read_marker(out) if out.is_dir() else None
    recorded = (marker or {}).get("overlay") or {}
    if recorded.get("path") == str(overlay.resolve()) and recorded.get("sha256") == sha256_of(
        overlay
    ):
        return
    raise InputError(
        f"--overlay {overlay} exists and is not the overlay {TOOL} wrote with --out {out}; "
        "choose another file (--force replaces only this tool's own output)"
    )


def remove_stale_partials(out: Path) -> None:
    """Remove what a killed run into `out` left: its staging folder (with the spill of the
    backward pass inside) and its staged overlay. Only folders holding this tool's marker, made
    on this machine by a process that no longer runs, are removed, each with a warning."""
    if not out.parent.is_dir():
        return
    for folder in sorted(out.parent.glob(f".{out.name}.partial-*")) + sorted(
        out.parent.glob(f".{out.name}.old-*")
    ):
        marker = read_marker(folder) if folder.is_dir() else None
        if marker is None or marker.get("host") != socket.gethostname():
            continue
        if _process_runs(marker.get("pid")):
            continue
        staged_overlay = marker.get("staged_overlay")
        if staged_overlay and Path(staged_overlay).name.startswith("."):
            Path(staged_overlay).unlink(missing_ok=True)
        shutil.rmtree(folder, ignore_errors=True)
        warnings.warn(
            f"removed {folder}, left by an interrupted run (process {marker.get('pid')})",
            stacklevel=2,
        )


def _fingerprint(path: Path) -> list[int]:
    """Size and modification time: enough to see that a person changed a file (no hashing of
    gigabytes of probabilities)."""
    status = path.stat()
    return [status.st_size, status.st_mtime_ns]


def _make_parents(folder: Path) -> list[Path]:
    """mkdir -p `folder`; returns the folders it made, outermost first."""
    missing = [f for f in [folder, *folder.parents] if not f.exists()][::-1]
    folder.mkdir(parents=True, exist_ok=True)
    return missing


def _process_runs(pid: Any) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


class StagedOutput:
    """The staging folder of one run and, for an overlay outside it, the staged overlay file."""

    def __init__(self, out: Path, overlay: Path | None, command: str):
        self.out = out
        self.overlay = overlay
        self.command = command
        token = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.folder = out.with_name(f".{out.name}.partial-{token}")
        self.staged_overlay: Path | None = None
        self._outside_overlay = False
        if overlay is not None:
            if overlay.resolve().is_relative_to(out.resolve()):
                self.staged_overlay = self.folder / overlay.resolve().relative_to(out.resolve())
            else:
                self._outside_overlay = True
                name = f".{overlay.stem}.partial-{token}{overlay.suffix}"
                self.staged_overlay = overlay.with_name(name)
        self._old = out.with_name(f".{out.name}.old-{token}")
        self._made_parents: list[Path] = []

    def create(self) -> None:
        """Make the staging folder, marked as this run's from the start."""
        self._made_parents = _make_parents(self.out.parent)
        self.folder.mkdir()  # a plain mkdir, unlike mkdtemp, keeps the user's umask
        self._write_marker(
            state="partial",
            pid=os.getpid(),
            host=socket.gethostname(),
            staged_overlay=str(self.staged_overlay.resolve())
            if self._outside_overlay and self.staged_overlay is not None
            else None,
        )
        if self.staged_overlay is not None:
            self._made_parents += _make_parents(self.staged_overlay.parent)

    def commit(self, replace: bool) -> None:
        """Record what was written, then move the overlay and the folder into place; an
        earlier output at `out` (checked replaceable by the caller) is set aside and deleted."""
        files = {
            str(path.relative_to(self.folder)): _fingerprint(path)
            for path in sorted(self.folder.rglob("*"))
            if path.is_file() and path != self.folder / MARKER
        }
        overlay_record = None
        outside = self.staged_overlay if self._outside_overlay else None
        if outside is not None and self.overlay is not None:
            overlay_record = {
                "path": str(self.overlay.resolve()),
                "sha256": sha256_of(outside),
            }
        self._write_marker(state="complete", files=files, overlay=overlay_record)
        if outside is not None and self.overlay is not None:
            outside.replace(self.overlay)
        has_old = self.out.exists() and any(self.out.iterdir())
        if has_old and not replace:
            raise InputError(f"--out {self.out} is not empty; choose another folder")
        if self.out.exists() and not has_old:
            self.out.rmdir()
        elif has_old:
            self.out.rename(self._old)
            self._claim(self._old)
        self.folder.rename(self.out)
        shutil.rmtree(self._old, ignore_errors=True)

    def discard(self) -> None:
        """Delete everything this run staged (after an error or an interrupt)."""
        if not self.folder.exists():
            return  # committed
        shutil.rmtree(self.folder, ignore_errors=True)
        if self._outside_overlay and self.staged_overlay is not None:
            self.staged_overlay.unlink(missing_ok=True)
        for folder in reversed(self._made_parents):  # the folders made for the output, if empty
            with contextlib.suppress(OSError):
                folder.rmdir()

    @staticmethod
    def _claim(folder: Path) -> None:
        """Mark a folder set aside for deletion with this process, so that if the process is
        killed now the next run recognises and removes it."""
        marker = {**(read_marker(folder) or {"tool": TOOL}), "pid": os.getpid()}
        marker["host"] = socket.gethostname()
        (folder / MARKER).write_text(json.dumps(marker, indent=1) + "\n", encoding="utf-8")

    def _write_marker(self, **fields: Any) -> None:
        marker = {"tool": TOOL, "command": self.command, **fields}
        (self.folder / MARKER).write_text(json.dumps(marker, indent=1) + "\n", encoding="utf-8")


@contextlib.contextmanager
def staged_output(
    out: Path, overlay: Path | None, command: str, replace: bool
) -> Iterator[StagedOutput]:
    """A StagedOutput, committed if the block ends normally and discarded otherwise."""
    staged = StagedOutput(out, overlay, command)
    staged.create()
    try:
        yield staged
        staged.commit(replace)
    finally:
        staged.discard()
