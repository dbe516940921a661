"""Fixtures of the power-cut tests: a power-cut filesystem over a fresh backing directory."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tools.powercut import PowerCutFS


@pytest.fixture
def powercut(tmp_path: Path) -> Iterator[PowerCutFS]:
    """Mounted at ``tmp_path/mnt`` over ``tmp_path/disk``. The backing files are not fsynced on
    the host: the backing directory stands for the disk, and the host does not lose power."""
    disk = tmp_path / "disk"
    mnt = tmp_path / "mnt"
    disk.mkdir()
    mnt.mkdir()
    fs = PowerCutFS(disk, mnt, host_fsync=False)
    fs.mount()
    try:
        yield fs
    finally:
        fs.close()
