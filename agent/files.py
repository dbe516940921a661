"""Durable file replacement and the reading of JSON state files and TOML documents, shared by
every module that keeps a small state file or reads a config."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import tomllib
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.errors import ConfigError

if TYPE_CHECKING:
    from drivers.base import Options

#: The largest JSON state file read whole (the agent's are kilobytes): a larger one is refused as
#: unreadable instead of read into memory.
MAX_JSON_BYTES = 16 << 20


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
    rename, fsync of the directory (and of the parent of each directory it had to create, so
    that a new directory's entry is as durable as the file). A crash leaves the old file or the
    new one, never a mix."""
    created = []
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        created.append(parent)
        parent = parent.parent
    path.parent.mkdir(parents=True, exist_ok=True)
    for made in reversed(created):
        fsync_dir(made.parent)
    tmp = path.with_name(f".{path.name}.tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()  # a leftover of a crash: O_EXCL below must create it anew with ``mode``
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:  # a full disk, ``path`` a directory: no copy of the data left beside it
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync_dir(path.parent)


def resolve_path(base: Path, value: str) -> Path:
    """``value`` (``~`` expanded) relative to ``base`` unless it is absolute."""
    p = Path(value).expanduser()
    return p if p.is_absolute() else (base / p)


def config_path_exists(opts: Options, key: str, path: Path) -> bool:
    """Whether the file that config key ``key`` names is there; a path the system cannot look up
    (a name longer than the filesystem takes, a directory this user may not enter) is that key's
    error (:class:`~drivers.base.OptionError`), not an OSError out of the parser."""
    try:
        return path.exists()
    except OSError as err:
        raise opts.error(key, f"cannot be looked up: {err.strerror}") from None


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


def loads_json(data: str | bytes) -> Any:
    """``json.loads``, with a document nested deeper than the parser's stack (``[[[...]]]``, a few
    kilobytes) refused as ValueError like any other malformed JSON: the standard library raises
    RecursionError there, which a reader that handles ValueError would let through."""
    try:
        return json.loads(data)
    except RecursionError:
        raise ValueError("not JSON: nested too deep") from None


def read_json(path: Path, limit: int = MAX_JSON_BYTES) -> Any:
    """The JSON document in ``path``: OSError as reading raises (FileNotFoundError when there is
    none); ValueError when the file is more than ``limit`` bytes, not UTF-8, not JSON, or nested
    too deep (:func:`loads_json`)."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size  # read(n) allocates n: a regular file's size + 1
        data = f.read(min(size, limit) + 1 if size else limit + 1)
        if size and len(data) > size and len(data) <= limit:  # it grew meanwhile
            data += f.read(limit + 1 - len(data))
    if len(data) > limit:
        raise ValueError(f"more than {limit} bytes: not a state file")
    return loads_json(data)


class OpenToOthers(ValueError):
    """A secret's file that its group or others may read (:func:`read_private`)."""

    def __init__(self, path: Path, mode: int) -> None:
        super().__init__(f"{path}: readable by group or others (mode {mode:o})")
        self.mode = mode  # the permission bits


def read_private(path: Path, limit: int) -> bytes:
    """A secret's file (a credential, a site secret): at most ``limit`` + 1 bytes (the caller
    tells a larger file by the length); OSError as opening raises (FileNotFoundError when there
    is none); :class:`OpenToOthers` when its mode lets the group or others read it."""
    with open(path, "rb") as f:
        mode = os.fstat(f.fileno()).st_mode
        data = f.read(limit + 1)
    if mode & 0o077:
        raise OpenToOthers(path, mode & 0o777)
    return data


def toml_document(text: str, label: str) -> dict[str, Any]:
    """The TOML document ``text``; ConfigError ``LABEL: not valid TOML: ...`` when it is not one,
    arrays nested deeper than the parser's stack included (tomllib raises RecursionError)."""
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(label, "", f"not valid TOML: {err}") from None
    except RecursionError:
        raise ConfigError(label, "", "not valid TOML: nested too deep") from None


#: The largest disk or memory budget a config may give, in MB (1 TiB): its byte count must stay a
#: finite integer (1e308 MB is not)
MAX_BUDGET_MB = 1 << 20

#: The largest config file read (the packaged one is a few kilobytes): /dev/zero, or a log file
#: named by mistake, is refused instead of read into memory
MAX_CONFIG_BYTES = 1 << 20


def read_config_text(path: Path) -> str:
    """A UTF-8 file's text; ConfigError ``FILE: problem`` when it is missing or unreadable."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_CONFIG_BYTES + 1)
        if len(data) > MAX_CONFIG_BYTES:
            raise ConfigError(str(path), "", f"larger than {MAX_CONFIG_BYTES} bytes: not a config")
        return data.decode("utf-8")
    except FileNotFoundError:
        raise ConfigError(str(path), "", "no such file") from None
    except PermissionError:
        raise ConfigError(
            str(path),
            "",
            "cannot read: permission denied (an installed config is the service user's, mode "
            f"0600: read it as that user, e.g. sudo -u edge-agent edge-agent check-config {path})",
        ) from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(str(path), "", f"cannot read: {err}") from None
