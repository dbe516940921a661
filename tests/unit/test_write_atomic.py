"""agent/files.py write_atomic: the directories it creates are as durable as the file."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent import files


def test_a_directory_write_atomic_creates_is_fsynced_into_its_parent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The set-aside area (DATA/rejected/) is created by its first record's write, which must be
    durable before the record leaves the queue: fsyncing rejected/ alone left its own entry in
    DATA unsynced, so a power cut could take the directory, and the only copy, with it."""
    synced: list[Path] = []
    real = files.fsync_dir
    monkeypatch.setattr(files, "fsync_dir", lambda p: (synced.append(Path(p)), real(p)))
    target = tmp_path / "data" / "rejected" / "seq-7.cbor"
    files.write_atomic(target, b"x")
    assert target.read_bytes() == b"x"
    # data/ made in tmp_path, rejected/ in data/, then the rename in rejected/
    assert synced == [tmp_path, tmp_path / "data", tmp_path / "data" / "rejected"]
    synced.clear()
    files.write_atomic(target.with_name("seq-8.cbor"), b"y")
    assert synced == [tmp_path / "data" / "rejected"]  # nothing created: the rename only
