"""Durable file replacement, shared by every module that keeps a small state file."""

from __future__ import annotations

import contextlib
import errno
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


def write_atomic(path: Path, data: bytes, *, mode: int = 0o644) -> None:
    """Replace ``path`` with ``data``: temporary file beside it (created with ``mode``), fsync,
    rename, fsync of the directory. A crash leaves the old file or the new one, never a mix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()  # a leftover of a crash: O_EXCL below must create it anew with ``mode``
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    with os.fdopen(fd, "wb") as out:
        out.write(data)
        out.flush()
        os.fsync(out.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def resolve_path(base: Path, value: str) -> Path:
    """``value`` (``~`` expanded) relative to ``base`` unless it is absolute."""
    p = Path(value).expanduser()
    return p if p.is_absolute() else (base / p)


def ensure_writable_dir(path: Path) -> None:
    """Create ``path`` (and its parents) if missing and check that this process can create files
    in it, by creating and deleting one. Raises OSError whose ``filename`` is ``path``."""
    import tempfile

    try:
        if path.exists() and not path.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(path))
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=path, prefix=".write-test-")
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        err.filename = str(path)  # the directory, not the probe file in it
        raise
