"""Durable file replacement, shared by every module that keeps a small state file."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path


def fsync_dir(path: Path) -> None:
    """Make a rename in ``path`` durable (some filesystems refuse to open a directory: ignored)."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_atomic(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data``: temporary file beside it, fsync, rename, fsync of the
    directory. A crash leaves the old file or the new one, never a mix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as out:
        out.write(data)
        out.flush()
        os.fsync(out.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def resolve_path(base: Path, value: str) -> Path:
    """``value`` (``~`` expanded) relative to ``base`` unless it is absolute."""
    p = Path(value).expanduser()
    return p if p.is_absolute() else (base / p)
