"""Unit tests of the engine choice: "auto" never downloads, it uses XMem only when its weights
are on this machine."""

from __future__ import annotations

import pytest

from xmem_label.model import InputError
from xmem_label.model.engine import engine_spec
from xmem_label.plugin.videos import choose_engine, frame_field_name


def xmem_weights_available(checkpoint: str | None = None) -> bool:
    return engine_spec("xmem").missing(checkpoint) is None


@pytest.fixture
def no_weights(monkeypatch, tmp_path):
    monkeypatch.delenv("XMEM_LABEL_WEIGHTS", raising=False)
    monkeypatch.setenv("XMEM_LABEL_CACHE", str(tmp_path / "empty-cache"))
    return tmp_path


def test_auto_is_flow_without_weights(no_weights):
    assert not xmem_weights_available()
    assert choose_engine("auto").describe().engine == "flow"


def test_weights_found_by_path_or_in_the_cache(no_weights):
    checkpoint = no_weights / "mine.pth"
    checkpoint.write_bytes(b"not checked here")
    assert xmem_weights_available(str(checkpoint))
    assert not xmem_weights_available(str(no_weights / "missing.pth"))


def test_an_engine_is_loaded_once_per_settings():
    """Runs in one process (the App server, a worker) share the loaded engine."""
    engine = choose_engine("flow")
    assert choose_engine("flow") is engine
    assert choose_engine("flow", device="cpu") is engine  # the flow engine takes no device


def test_unknown_engine_is_an_input_error():
    with pytest.raises(InputError, match="unknown engine 'sam'"):
        choose_engine("sam")


@pytest.mark.parametrize("given", ["gt", "frames.gt", " frames.gt "])
def test_frame_field_name(given):
    assert frame_field_name(given) == "gt"
