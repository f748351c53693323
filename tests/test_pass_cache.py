"""The pass caches' folder: sizes recorded by each run, eviction of the least recently used."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest

from xmem_label.model import pass_cache


def filled(root: Path, name: str, size: int) -> Path:
    folder = root / name
    folder.mkdir()
    (folder / "data").write_bytes(b"x" * size)
    time.sleep(0.01)  # distinct modification times: the order of use
    return folder


def test_a_run_records_its_folders_size_and_eviction_reads_it(tmp_path, monkeypatch):
    """Eviction reads the size each run recorded instead of visiting every file again."""
    for name in ("old", "new"):
        with pass_cache.in_use(tmp_path / name) as folder:
            (folder / "data").write_bytes(b"x" * 1000)
        time.sleep(0.01)
    assert int((tmp_path / "old" / pass_cache.SIZE).read_text()) >= 1000

    def no_scan(folder: Path) -> int:
        raise AssertionError(f"{folder} was scanned")

    monkeypatch.setattr(pass_cache, "folder_bytes", no_scan)
    assert pass_cache.evict(tmp_path, 1500) == [tmp_path / "old"]
    assert [p.name for p in tmp_path.iterdir()] == ["new"]


@pytest.mark.parametrize("record", [None, "not a number"])
def test_a_folder_without_a_readable_record_is_measured(tmp_path, record):
    old = filled(tmp_path, "old", 1000)
    if record is not None:
        (old / pass_cache.SIZE).write_text(record)
    time.sleep(0.01)
    filled(tmp_path, "new", 1000)
    assert pass_cache.evict(tmp_path, 1500) == [old]


def test_a_folder_another_eviction_deleted_first_is_skipped(tmp_path, monkeypatch):
    """Two evictions at once (two jobs ending together, or two processes): a folder the other
    one deleted between listing and locking is counted as gone, not an error."""
    for name in ("a", "b", "c"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "data").write_bytes(b"x" * 100)
        time.sleep(0.01)
    measure = pass_cache.folder_bytes

    def measured_then_deleted(folder: Path) -> int:
        size = measure(folder)
        if folder.name == "a":  # the other eviction takes it right after our scan
            shutil.rmtree(folder)
        return size

    monkeypatch.setattr(pass_cache, "folder_bytes", measured_then_deleted)
    assert pass_cache.evict(tmp_path, 150) == [tmp_path / "b"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]
