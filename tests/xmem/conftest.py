"""Fixtures shared by the XMem tests: the reference fixture folder and synthetic weights."""

from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path

import pytest
import torch

FIXTURE_DIR = Path(__file__).parents[1] / "fixtures" / "xmem_reference"
WEIGHTS_SEED = 1
# From the fixture README: sha256 of every tensor's raw bytes, in manifest order.
WEIGHTS_SHA256 = "e3aa3c2cce3bf4f355c52fa8a7c39e476c0ef5d91a5133686bb71757cadc6007"


def make_reference_state_dict(seed: int = WEIGHTS_SEED) -> dict[str, torch.Tensor]:
    """The synthetic weights the reference fixtures were computed with (make_weights.py)."""
    spec = importlib.util.spec_from_file_location("make_weights", FIXTURE_DIR / "make_weights.py")
    make_weights = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_weights)
    manifest = json.loads((FIXTURE_DIR / "state_dict_manifest.json").read_text())
    return make_weights.make_state_dict(manifest, seed)


def state_dict_sha256(state_dict: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for tensor in state_dict.values():
        digest.update(tensor.contiguous().numpy().tobytes())
    return digest.hexdigest()


@pytest.fixture(scope="session")
def xmem_fixture_dir() -> Path:
    """tests/fixtures/xmem_reference: clip, reference outputs and intermediates (see README)."""
    return FIXTURE_DIR


@pytest.fixture(scope="session")
def xmem_weights_path(tmp_path_factory) -> Path:
    """A .pth of the seed-1 synthetic weights, checked against the fixture's checksum."""
    state_dict = make_reference_state_dict()
    assert state_dict_sha256(state_dict) == WEIGHTS_SHA256
    path = tmp_path_factory.mktemp("xmem_weights") / f"xmem_synthetic_seed{WEIGHTS_SEED}.pth"
    torch.save(state_dict, path)
    return path


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
