"""Fixtures shared by the XMem tests: the reference fixture folder (the synthetic weights,
`xmem_weights_path`, are in tests/conftest.py for every test that runs XMem)."""

from __future__ import annotations

from pathlib import Path

import pytest

from ..conftest import XMEM_FIXTURES


@pytest.fixture(scope="session")
def xmem_fixture_dir() -> Path:
    """tests/fixtures/xmem_reference: clip, reference outputs and intermediates (see README)."""
    return XMEM_FIXTURES


@pytest.fixture
def count_calls(monkeypatch):
    """count_calls(module, name) replaces module.name by a wrapper that counts its calls and
    returns the list the calls are appended to."""

    def install(module, name: str) -> list[int]:
        calls: list[int] = []
        original = getattr(module, name)

        def counting(*args, **kwargs):
            calls.append(1)
            return original(*args, **kwargs)

        monkeypatch.setattr(module, name, counting)
        return calls

    return install
