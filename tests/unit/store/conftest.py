"""Fixtures of the store tests."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture
def qdir(tmp_path: Path) -> Iterator[Path]:
    """A fresh directory, on tmpfs when /dev/shm is usable (the store tests check the queue's
    logic; fsync latency of a busy disk would only slow them down; bench store measures it)."""
    shm = Path("/dev/shm")
    if not (shm.is_dir() and os.access(shm, os.W_OK)):
        yield tmp_path
        return
    path = Path(tempfile.mkdtemp(prefix="edge-agent-store-", dir=shm))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
