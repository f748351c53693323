"""Finding XMem checkpoints: explicit path, environment variable, cache, then a download.

The manifest (manifest.yml) names the official checkpoints and their release URLs. The authors
publish no checksum, so the sha256 of the first download (or of the first file found in the
cache) is written next to it as `<cache>/<name>.sha256`; a later change of the file is then
refused. A download goes to a temporary file in the cache folder and is renamed into place only
once its length and checksum are right, so an interrupted or corrupted download leaves nothing.
"""

from __future__ import annotations

import dataclasses
import hashlib
import http.client
import os
import sys
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from tqdm import tqdm

from ..errors import WeightsError
from ..outputs import sha256_of
from ..settings import manifest

CHUNK_BYTES = 1 << 20
DOWNLOAD_TIMEOUT_S = 60


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """One checkpoint of the manifest. sha256 and size are None when not published."""

    name: str
    url: str
    sha256: str | None
    size: int | None
    description: str


def checkpoints() -> dict[str, Checkpoint]:
    """The manifest's checkpoints by name, default first."""
    entries: dict[str, Any] = manifest()["checkpoints"]
    default = default_checkpoint()
    names = sorted(entries, key=lambda name: name != default)
    return {
        name: Checkpoint(
            name=name,
            url=entries[name]["url"],
            sha256=entries[name].get("sha256"),
            size=entries[name].get("size"),
            description=entries[name].get("description", ""),
        )
        for name in names
    }


def default_checkpoint() -> str:
    return manifest()["default_checkpoint"]


def cache_folder(folder: str | Path | None = None) -> Path:
    """`folder` if given, else $XMEM_LABEL_CACHE, else the manifest's cache_dir (~ expanded)."""
    if folder is None:
        settings = manifest()["weights"]
        folder = os.environ.get(settings["cache_env_var"]) or settings["cache_dir"]
    return Path(folder).expanduser()


def recorded_sha256_path(name: str, folder: str | Path | None = None) -> Path:
    """Where the sha256 of checkpoint `name`'s first download is kept."""
    return cache_folder(folder) / f"{name}.sha256"


def expected_sha256(name: str, folder: str | Path | None = None) -> str | None:
    """The manifest's sha256 of `name`, else the one recorded at the first download, else None."""
    known = checkpoints().get(name)
    if known is not None and known.sha256:
        return known.sha256.lower()
    recorded = recorded_sha256_path(name, folder)
    if recorded.is_file():
        return recorded.read_text(encoding="utf-8").split()[0].lower()
    return None


def resolve_weights(
    weights: str | Path | None = None,
    *,
    download: bool = True,
    cache_dir: str | Path | None = None,
    base_url: str | None = None,
) -> Path:
    """The checkpoint file to load.

    weights: a file path, or a checkpoint name from the manifest (e.g. "XMem-s012.pth").
    Without it: $XMEM_LABEL_WEIGHTS (path or name), else the default checkpoint by name.
    A name is looked up in the cache (checked against its known sha256) and, if `download`,
    downloaded into it. base_url replaces the manifest's release folder (tests use a local
    server). Raises WeightsError saying which file to put where when nothing is found.
    """
    folder = cache_folder(cache_dir)
    if weights is None:
        env_var = manifest()["weights"]["env_var"]
        from_env = os.environ.get(env_var)
        if from_env:
            return _resolve_given(from_env, f"${env_var}", download, folder, base_url)
        return _resolve_name(default_checkpoint(), download, folder, base_url)
    return _resolve_given(weights, "weights", download, folder, base_url)


def download_checkpoint(
    name: str,
    *,
    cache_dir: str | Path | None = None,
    base_url: str | None = None,
    progress: bool | None = None,
) -> Path:
    """Download checkpoint `name` into the cache and return its path.

    The bytes go to a temporary file in the cache folder; it is renamed to `<cache>/<name>` only
    when its length matches Content-Length (and the manifest size) and its sha256 matches the
    known one. With no known sha256, the download's own is recorded in `<cache>/<name>.sha256`.
    progress: show a progress bar (default: when stderr is a terminal).
    """
    checkpoint = _known(name)
    folder = cache_folder(cache_dir)
    url = f"{base_url.rstrip('/')}/{name}" if base_url else checkpoint.url
    target = folder / name
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise WeightsError(f"cannot create the weights cache {folder}: {error}") from None
    if progress is None:
        progress = sys.stderr.isatty()

    handle, temporary_name = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=".part")
    os.close(handle)  # _fetch reopens it by name
    temporary = Path(temporary_name)
    try:
        received, sha256 = _fetch(url, temporary, checkpoint, target, progress)
        if checkpoint.size is not None and received != checkpoint.size:
            raise WeightsError(
                f"download of {name} from {url} has {received} bytes, the manifest says "
                f"{checkpoint.size}; nothing was saved"
            )
        expected = expected_sha256(name, folder)
        if expected is not None and sha256 != expected:
            raise WeightsError(
                f"download of {name} from {url} is corrupted or changed: sha256 {sha256}, "
                f"expected {expected}; nothing was saved" + _recorded_hint(name, folder, checkpoint)
            )
        if expected is None:
            _write_atomically(recorded_sha256_path(name, folder), sha256 + "\n")
        temporary.replace(target)
    finally:
        temporary.unlink(missing_ok=True)
    return target


def verify_checkpoint(name: str, *, cache_dir: str | Path | None = None) -> str:
    """Check the cached checkpoint `name` against its known sha256 and return its sha256.

    Raises WeightsError if it is not in the cache or its sha256 differs. A file with no known
    sha256 yet (placed by hand) gets its sha256 recorded now.
    """
    _known(name)
    folder = cache_folder(cache_dir)
    path = folder / name
    if not path.is_file():
        raise WeightsError(f"{name} is not in the cache ({path}); run: xmem-label weights download")
    return _check_cached(name, path, folder)


# ----- internals -------------------------------------------------------------------------------


def _known(name: str) -> Checkpoint:
    known = checkpoints()
    if name not in known:
        raise WeightsError(f"unknown checkpoint {name!r}; known checkpoints: {', '.join(known)}")
    return known[name]


def _resolve_given(
    weights: str | Path, origin: str, download: bool, folder: Path, base_url: str | None
) -> Path:
    """A path that exists, else a checkpoint name; `origin` names where it came from."""
    path = Path(weights).expanduser()
    if path.is_file():
        return path
    if str(weights) in checkpoints():
        return _resolve_name(str(weights), download, folder, base_url)
    if path.exists():
        raise WeightsError(f"{origin} {path} is not a file")
    raise WeightsError(
        f"{origin} file not found: {path} (or give a checkpoint name: {', '.join(checkpoints())})"
    )


def _resolve_name(name: str, download: bool, folder: Path, base_url: str | None) -> Path:
    path = folder / name
    if path.is_file():
        _check_cached(name, path, folder)
        return path
    if not download:
        raise WeightsError(
            _offline_message(name, folder, "not in the cache, and downloading is off")
        )
    return download_checkpoint(name, cache_dir=folder, base_url=base_url)


def _check_cached(name: str, path: Path, folder: Path) -> str:
    sha256 = sha256_of(path)
    expected = expected_sha256(name, folder)
    if expected is None:
        _write_atomically(recorded_sha256_path(name, folder), sha256 + "\n")
    elif sha256 != expected:
        raise WeightsError(
            f"cached {path} changed since it was first saved: sha256 {sha256}, expected "
            f"{expected}; delete it to download it again"
            + _recorded_hint(name, folder, _known(name))
        )
    return sha256


def _recorded_hint(name: str, folder: Path, checkpoint: Checkpoint) -> str:
    if checkpoint.sha256:
        return ""
    recorded = recorded_sha256_path(name, folder)
    return f" (or delete {recorded} if the new file is the one you want)"


def _fetch(
    url: str, temporary: Path, checkpoint: Checkpoint, target: Path, progress: bool
) -> tuple[int, str]:
    """Stream `url` into `temporary`; return (bytes received, sha256). Raises WeightsError."""
    digest = hashlib.sha256()
    received = 0
    try:
        with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response:
            declared = response.headers.get("Content-Length")
            declared = int(declared) if declared and declared.isdigit() else None
            with (
                open(temporary, "wb") as out,
                tqdm(
                    total=declared,
                    desc=checkpoint.name,
                    unit="B",
                    unit_scale=True,
                    unit_divisor=1024,
                    disable=not progress,
                ) as bar,
            ):
                while chunk := response.read(CHUNK_BYTES):
                    out.write(chunk)
                    digest.update(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
    except urllib.error.HTTPError as error:
        raise WeightsError(
            _offline_message(checkpoint.name, target.parent, f"HTTP {error.code}", url)
        ) from None
    except (urllib.error.URLError, http.client.HTTPException, OSError) as error:
        if received:
            raise WeightsError(
                f"download of {checkpoint.name} from {url} broke off after {received} bytes "
                f"({_reason(error)}); nothing was saved"
            ) from None
        reason = _reason(error)
        raise WeightsError(_offline_message(checkpoint.name, target.parent, reason, url)) from None
    if declared is not None and received != declared:
        raise WeightsError(
            f"download of {checkpoint.name} from {url} is truncated: {received} of {declared} "
            "bytes; nothing was saved"
        )
    return received, digest.hexdigest()


def _reason(error: BaseException) -> str:
    reason = getattr(error, "reason", None) or error
    return str(reason).strip() or type(error).__name__


def _offline_message(name: str, folder: Path, reason: str, url: str | None = None) -> str:
    url = url or _known(name).url
    env_var = manifest()["weights"]["env_var"]
    return (
        f"XMem weights {name} are not available ({reason}): download {url} and save it as "
        f"{folder / name} (or pass --weights PATH, or set {env_var}=PATH)"
    )


def _write_atomically(path: Path, text: str) -> None:
    """Write `text` to `path` through a temporary file and a rename."""
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as f:
            f.write(text)
        Path(temporary).replace(path)
    finally:
        Path(temporary).unlink(missing_ok=True)
