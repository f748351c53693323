"""Fetching a task's media, treating every URL in a task as hostile.

A task's frame or video URL is only a name for a file that the configured Label Studio serves:
- a path (`/data/local-files/?d=...`, `/data/upload/...`) is fetched from that Label Studio;
- an absolute http(s) URL only when it points at that same Label Studio;
- a storage URI (`s3://`, `gs://`, `azure-blob://`, ...) through Label Studio's resolver
  (`/tasks/<id>/resolve/?fileuri=...`), which proxies it or redirects once to a presigned URL
  on a public address (fetched without the token);
- with LOCAL_FILES_DOCUMENT_ROOT set, `/data/local-files/` paths are read from that folder,
  never from outside it.
Anything else is refused before any connection is made, so a task cannot make the backend probe
other hosts, and errors name only Label Studio's answer. Every fetch has connect, read and total
timeouts and a size limit; frames above the pixel limit are refused before they are decoded.
"""

from __future__ import annotations

import base64
import ipaddress
import socket
import time
import urllib.parse
from collections.abc import Callable
from pathlib import Path

import requests
import urllib3
from PIL import Image

from xmem_label.model import InputError

from .settings import BackendSettings, origin_of

CHUNK = 1 << 20
MAX_URL_LENGTH = 8192
LOCAL_FILES_PATH = "/data/local-files/"
STORAGE_SCHEMES = {"s3", "gs", "azure-blob", "azure-spi"}  # what Label Studio's storages resolve


class MediaUnavailable(Exception):
    """Label Studio (or the storage it points to) did not deliver a file (HTTP 502)."""


def fetch(
    url: object,
    task_id: object,
    destination: Path,
    what: str,
    settings: BackendSettings,
    headers: Callable[[], dict[str, str]],
) -> Path:
    """A local path holding the file `url` names (`destination`, or the file itself for
    local files); `what` names it in messages ("frame 3 of task 7"). `headers()` gives the
    token's headers, sent to the configured Label Studio only."""
    if not isinstance(url, str) or not url or len(url) > MAX_URL_LENGTH:
        raise InputError(
            f"{what}: the media URL is not a string of at most {MAX_URL_LENGTH} characters"
        )
    local = _local_file(url, settings)
    if local is not None:
        return local
    target, storage = _label_studio_url(url, task_id, what, settings)
    reply = _get(target, headers(), what, settings)
    if reply.is_redirect and storage:
        location = urllib.parse.urljoin(target, reply.headers.get("Location", ""))
        reply.close()
        _check_public(location, what)
        reply = _get(location, {}, what, settings)
    if reply.is_redirect:
        reply.close()
        raise InputError(
            f"{what}: Label Studio redirected the request to another address; "
            "the backend fetches media only from Label Studio"
        )
    _save(reply, destination, what, settings)
    return destination


def check_frame_size(width: int, height: int, what: str, settings: BackendSettings) -> None:
    """Refuse frames above the pixel limit (memory grows with pixels times frames)."""
    if width * height > settings.max_frame_pixels:
        raise InputError(
            f"{what} is {width}x{height}: it has more pixels than the backend's limit of "
            f"{settings.max_frame_pixels} (XMEM_LABEL_MAX_FRAME_PIXELS)"
        )


def image_size(path: Path, what: str, settings: BackendSettings) -> tuple[int, int]:
    """(width, height) from the file header, checked against the pixel limit."""
    try:
        with Image.open(path) as image:
            width, height = image.size
    except Image.DecompressionBombError:  # PIL's own, far higher, limit
        raise InputError(
            f"{what} has more pixels than the backend's limit of "
            f"{settings.max_frame_pixels} (XMEM_LABEL_MAX_FRAME_PIXELS)"
        ) from None
    except Exception:  # PIL raises many types for files that are not images
        raise InputError(f"{what} is not an image") from None
    check_frame_size(width, height, what, settings)
    return width, height


def _local_file(url: str, settings: BackendSettings) -> Path | None:
    """The file a /data/local-files/ URL names under LOCAL_FILES_DOCUMENT_ROOT, if that is set
    and the URL is such a path (on Label Studio's address or relative)."""
    if settings.local_files_root is None:
        return None
    parts = urllib.parse.urlsplit(url)
    elsewhere = (parts.scheme or parts.netloc) and (
        not settings.label_studio_url or _origin(url) != settings.label_studio_origin
    )
    if elsewhere or parts.path != LOCAL_FILES_PATH:
        return None
    relative = urllib.parse.parse_qs(parts.query).get("d", [""])[0]
    root = settings.local_files_root
    path = (root / relative).resolve()
    if not relative or not path.is_relative_to(root) or not path.is_file():
        raise InputError(
            "a /data/local-files/ URL does not name a file under LOCAL_FILES_DOCUMENT_ROOT"
        )
    return path


def _label_studio_url(
    url: str, task_id: object, what: str, settings: BackendSettings
) -> tuple[str, bool]:
    """The address on Label Studio to fetch, and whether it is the storage resolver (whose
    one redirect to a presigned URL may be followed)."""
    if not settings.label_studio_url:
        raise InputError("LABEL_STUDIO_URL is not set: the backend cannot fetch media")
    parts = urllib.parse.urlsplit(url)
    if not parts.scheme and not parts.netloc and url.startswith("/"):
        return settings.label_studio_url + url, False
    if parts.scheme in ("http", "https"):
        if _origin(url) != settings.label_studio_origin:
            raise InputError(
                f"{what}: the media URL is not on the configured Label Studio; "
                "the backend fetches media only from there"
            )
        return url, False
    if parts.scheme in STORAGE_SCHEMES and parts.netloc and isinstance(task_id, int):
        encoded = base64.urlsafe_b64encode(url.encode()).decode()
        return (
            f"{settings.label_studio_url}/tasks/{task_id}/resolve/?fileuri="
            f"{urllib.parse.quote(encoded)}",
            True,
        )
    raise InputError(
        f"{what}: unsupported media URL (a Label Studio path, a URL on the "
        "configured Label Studio, or a storage URI of a task with an id)"
    )


def _origin(url: str) -> tuple[str, str, int] | None:
    try:
        return origin_of(url)
    except InputError:
        return None


def _check_public(url: str, what: str) -> None:
    """A presigned storage URL must be http(s) on public addresses only."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InputError(f"{what}: Label Studio's storage redirect is not an http(s) address")
    try:
        infos = socket.getaddrinfo(parts.hostname, parts.port or 443, type=socket.SOCK_STREAM)
    except OSError:
        raise MediaUnavailable(f"{what}: the storage's address does not resolve") from None
    for info in infos:
        if not ipaddress.ip_address(info[4][0].split("%")[0]).is_global:
            raise InputError(
                f"{what}: Label Studio's storage redirect points to a private address; refused"
            )


def _get(
    url: str, headers: dict[str, str], what: str, settings: BackendSettings
) -> requests.Response:
    try:
        reply = requests.get(
            url,
            headers=headers,
            stream=True,
            allow_redirects=False,
            timeout=(settings.connect_timeout, settings.read_timeout),
        )
    except requests.Timeout:
        raise MediaUnavailable(f"{what}: no answer in time") from None
    except requests.RequestException:
        raise MediaUnavailable(f"{what}: the connection failed") from None
    if reply.status_code >= 400:
        reply.close()
        raise InputError(f"{what}: Label Studio answered HTTP {reply.status_code}")
    return reply


def _save(
    reply: requests.Response, destination: Path, what: str, settings: BackendSettings
) -> None:
    """Stream the body to `destination` within the size limit and the total time limit (a
    server trickling one byte at a time never trips the read timeout)."""
    limit = settings.max_download_bytes
    declared = reply.headers.get("Content-Length", "")
    if declared.isdigit() and int(declared) > limit:
        reply.close()
        raise InputError(
            f"{what} is {int(declared)} bytes, more than the backend's limit of "
            f"{limit} (XMEM_LABEL_MAX_DOWNLOAD_MB)"
        )
    deadline = time.monotonic() + settings.download_timeout
    received = 0
    destination.parent.mkdir(parents=True, exist_ok=True)
    try:
        with reply, open(destination, "wb") as out:
            # read1 returns what has arrived (at most CHUNK), so the deadline is checked after
            # every packet, not after every full megabyte.
            while chunk := reply.raw.read1(CHUNK, decode_content=True):
                received += len(chunk)
                if received > limit:
                    raise InputError(
                        f"{what} is larger than the backend's limit of {limit} "
                        "bytes (XMEM_LABEL_MAX_DOWNLOAD_MB)"
                    )
                if time.monotonic() > deadline:
                    raise MediaUnavailable(
                        f"{what}: not received within {settings.download_timeout:g} s"
                    )
                out.write(chunk)
    except (requests.RequestException, urllib3.exceptions.HTTPError, OSError):
        destination.unlink(missing_ok=True)
        raise MediaUnavailable(f"{what}: the transfer broke off") from None
    except BaseException:
        destination.unlink(missing_ok=True)
        raise
