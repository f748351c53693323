"""Weight resolution and downloads, against a real HTTP server on 127.0.0.1."""

from __future__ import annotations

import hashlib
import http.server
import socket
import threading

import pytest

from xmem_label.model.errors import WeightsError
from xmem_label.model.outputs import sha256_of
from xmem_label.model.settings import manifest
from xmem_label.model.xmem import weights as weights_module
from xmem_label.model.xmem.weights import (
    download_checkpoint,
    resolve_weights,
    verify_checkpoint,
)

NAME = "XMem.pth"
GOOD = b"xmem checkpoint bytes " * 5000


class FileServer:
    """Serves `files[name] = (body, declared_length)` at /name; a shorter body than declared
    ends the connection early, like a dropped download."""

    def __init__(self):
        self.files: dict[str, tuple[bytes, int]] = {}
        self.requests = 0
        files, server = self.files, self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                server.requests += 1
                name = self.path.lstrip("/")
                if name not in files:
                    self.send_error(404)
                    return
                body, declared = files[name]
                self.send_response(200)
                self.send_header("Content-Length", str(declared))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )
        self.thread.start()

    def serve(self, name: str, body: bytes, declared: int | None = None) -> None:
        self.files[name] = (body, len(body) if declared is None else declared)

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    running = FileServer()
    yield running
    running.close()


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.delenv("XMEM_LABEL_WEIGHTS", raising=False)
    monkeypatch.delenv("XMEM_LABEL_CACHE", raising=False)
    return tmp_path / "cache"


def leftovers(cache) -> list[str]:
    return sorted(p.name for p in cache.iterdir()) if cache.exists() else []


def closed_port_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def test_good_download_records_sha256_then_hits_cache(server, cache):
    server.serve(NAME, GOOD)
    path = resolve_weights(cache_dir=cache, base_url=server.base_url)
    assert path == cache / NAME
    assert path.read_bytes() == GOOD
    recorded = (cache / f"{NAME}.sha256").read_text().strip()
    assert recorded == hashlib.sha256(GOOD).hexdigest() == sha256_of(path)
    assert leftovers(cache) == [NAME, f"{NAME}.sha256"]

    assert resolve_weights(NAME, cache_dir=cache, base_url=server.base_url) == path
    assert server.requests == 1  # the second call was a cache hit
    assert verify_checkpoint(NAME, cache_dir=cache) == recorded


def test_truncated_download_leaves_nothing(server, cache):
    server.serve(NAME, GOOD[:1000], declared=len(GOOD))
    with pytest.raises(WeightsError, match="truncated|broke off"):
        resolve_weights(cache_dir=cache, base_url=server.base_url)
    assert leftovers(cache) == []


def test_corrupted_download_against_recorded_sha256_leaves_nothing(server, cache):
    server.serve(NAME, GOOD)
    path = download_checkpoint(NAME, cache_dir=cache, base_url=server.base_url)
    path.unlink()
    server.serve(NAME, GOOD[:-1] + b"!")
    with pytest.raises(WeightsError, match="corrupted or changed.*nothing was saved"):
        resolve_weights(cache_dir=cache, base_url=server.base_url)
    assert leftovers(cache) == [f"{NAME}.sha256"]


def test_corrupted_download_against_manifest_sha256(server, cache, monkeypatch):
    with_sha = {**manifest()}
    with_sha["checkpoints"] = {
        name: {**entry, "sha256": hashlib.sha256(GOOD).hexdigest()}
        for name, entry in manifest()["checkpoints"].items()
    }
    monkeypatch.setattr(weights_module, "manifest", lambda: with_sha)
    server.serve(NAME, b"not the checkpoint")
    with pytest.raises(WeightsError, match="corrupted"):
        resolve_weights(cache_dir=cache, base_url=server.base_url)
    assert leftovers(cache) == []
    server.serve(NAME, GOOD)
    assert resolve_weights(cache_dir=cache, base_url=server.base_url).read_bytes() == GOOD
    assert leftovers(cache) == [NAME]  # a published sha256 needs no recorded one


def test_changed_cached_file_is_refused(server, cache):
    server.serve(NAME, GOOD)
    path = resolve_weights(cache_dir=cache, base_url=server.base_url)
    path.write_bytes(GOOD + b"tampered")
    with pytest.raises(WeightsError, match="changed since it was first saved"):
        resolve_weights(cache_dir=cache, base_url=server.base_url)
    with pytest.raises(WeightsError, match="changed"):
        verify_checkpoint(NAME, cache_dir=cache)


def test_offline_says_which_file_to_put_where(cache):
    url = closed_port_url()
    with pytest.raises(WeightsError) as error:
        resolve_weights(cache_dir=cache, base_url=url)
    message = str(error.value)
    assert f"{url}/{NAME}" in message
    assert str(cache / NAME) in message
    assert "\n" not in message
    assert [p for p in leftovers(cache) if p.endswith(".part")] == []


def test_missing_on_server_is_a_weights_error(server, cache):
    with pytest.raises(WeightsError, match="HTTP 404"):
        resolve_weights(cache_dir=cache, base_url=server.base_url)
    assert leftovers(cache) == []


def test_no_download_when_switched_off(server, cache):
    server.serve(NAME, GOOD)
    with pytest.raises(WeightsError, match="downloading is off.*releases/download/v1.0/XMem.pth"):
        resolve_weights(cache_dir=cache, download=False)
    assert server.requests == 0


def test_explicit_path_and_environment_variable(tmp_path, cache, monkeypatch):
    own = tmp_path / "mine.pth"
    own.write_bytes(b"weights")
    assert resolve_weights(own, cache_dir=cache, download=False) == own
    monkeypatch.setenv("XMEM_LABEL_WEIGHTS", str(own))
    assert resolve_weights(cache_dir=cache, download=False) == own
    monkeypatch.setenv("XMEM_LABEL_WEIGHTS", str(tmp_path / "gone.pth"))
    with pytest.raises(WeightsError, match=r"\$XMEM_LABEL_WEIGHTS file not found"):
        resolve_weights(cache_dir=cache, download=False)
    with pytest.raises(WeightsError, match="file not found.*XMem-s012.pth"):
        resolve_weights(tmp_path / "nope.pth", cache_dir=cache)


def test_cache_folder_from_environment(server, tmp_path, monkeypatch):
    monkeypatch.delenv("XMEM_LABEL_WEIGHTS", raising=False)
    monkeypatch.setenv("XMEM_LABEL_CACHE", str(tmp_path / "env-cache"))
    server.serve("XMem-s012.pth", GOOD)
    path = resolve_weights("XMem-s012.pth", base_url=server.base_url)
    assert path == tmp_path / "env-cache" / "XMem-s012.pth"


def test_file_placed_by_hand_gets_its_sha256_recorded(cache):
    cache.mkdir()
    (cache / NAME).write_bytes(GOOD)
    assert resolve_weights(cache_dir=cache, download=False) == cache / NAME
    assert (cache / f"{NAME}.sha256").read_text().strip() == hashlib.sha256(GOOD).hexdigest()


def test_unknown_checkpoint_name(cache):
    with pytest.raises(WeightsError, match="unknown checkpoint"):
        download_checkpoint("XMem-nonexistent.pth", cache_dir=cache)
