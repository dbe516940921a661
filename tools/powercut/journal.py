"""The namespace operations (create, mkdir, unlink, rmdir, rename, link, symlink) not yet made
durable by an fsync of a directory, and how to undo them at a power cut.

Every operation is applied to the backing directory at once, so the backing directory always holds
the live namespace; an operation that would destroy a name (unlink, rmdir, a rename over an
existing name) moves the old object into a hidden trash directory instead, so it can come back.
The journal is ordered, as a journalling filesystem commits metadata in order: an fsync of a
directory makes durable every operation up to the last one that touched that directory (including
earlier operations elsewhere). What is durable is therefore always a prefix of the journal, and
undoing the rest in reverse order gives exactly the namespace as it was at that point.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from dataclasses import dataclass

log = logging.getLogger(__name__)

Key = tuple[int, int]
"""An inode of the backing filesystem: (st_dev, st_ino)."""


def key_of(st: os.stat_result) -> Key:
    return (st.st_dev, st.st_ino)


def parent_key(path: str) -> Key:
    return key_of(os.lstat(os.path.dirname(path)))


@dataclass(frozen=True)
class Entry:
    """One undoable operation. Paths are paths in the backing directory."""

    kind: str  # "create", "mkdir", "remove" or "rename"
    path: str  # the name created or removed; for a rename, the old name
    dirs: frozenset[Key]  # the directories whose fsync makes it durable
    new: str | None = None  # rename: the new name
    trash: str | None = None  # remove / rename over: where the old object went


class Journal:
    """The un-synced namespace operations, oldest first."""

    def __init__(self, trash_dir: str) -> None:
        self.trash_dir = trash_dir
        self.entries: list[Entry] = []
        self.committed_trash: list[str] = []  # trash of durable removals, to delete for real
        self._serial = 0

    def __len__(self) -> int:
        return len(self.entries)

    def _trash_name(self) -> str:
        self._serial += 1
        return os.path.join(self.trash_dir, f"{self._serial:08d}")

    # -- operations (each one applied here or by the caller just before) ------------------------

    def created(self, path: str, *, directory: bool = False) -> None:
        """``path`` was just created (file, node, symlink, hard link, or directory)."""
        kind = "mkdir" if directory else "create"
        self.entries.append(Entry(kind, path, frozenset({parent_key(path)})))

    def remove(self, path: str, *, directory: bool) -> None:
        """unlink or rmdir ``path``: moved into the trash, where it can be undone from."""
        st = os.lstat(path)
        if directory:
            if not stat.S_ISDIR(st.st_mode):
                raise OSError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), path)
            if os.listdir(path):
                raise OSError(errno.ENOTEMPTY, os.strerror(errno.ENOTEMPTY), path)
        elif stat.S_ISDIR(st.st_mode):
            raise OSError(errno.EISDIR, os.strerror(errno.EISDIR), path)
        dirs = frozenset({parent_key(path)})
        trash = self._trash_name()
        os.rename(path, trash)
        self.entries.append(Entry("remove", path, dirs, trash=trash))

    def rename(self, old: str, new: str, *, noreplace: bool = False) -> None:
        src = os.lstat(old)
        try:
            dst: os.stat_result | None = os.lstat(new)
        except FileNotFoundError:
            dst = None
        if dst is not None and noreplace:
            raise OSError(errno.EEXIST, os.strerror(errno.EEXIST), new)
        if dst is not None and key_of(dst) == key_of(src):
            return  # two names of one file: rename does nothing
        dirs = frozenset({parent_key(old), parent_key(new)})
        trash = None
        if dst is not None:
            if stat.S_ISDIR(src.st_mode) and not stat.S_ISDIR(dst.st_mode):
                raise OSError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), new)
            if not stat.S_ISDIR(src.st_mode) and stat.S_ISDIR(dst.st_mode):
                raise OSError(errno.EISDIR, os.strerror(errno.EISDIR), new)
            if stat.S_ISDIR(dst.st_mode) and os.listdir(new):
                raise OSError(errno.ENOTEMPTY, os.strerror(errno.ENOTEMPTY), new)
            trash = self._trash_name()
            os.rename(new, trash)
        try:
            os.rename(old, new)
        except OSError:
            if trash is not None:
                os.rename(trash, new)
            raise
        self.entries.append(Entry("rename", old, dirs, new=new, trash=trash))

    # -- durability -----------------------------------------------------------------------------

    def commit(self, directory: Key) -> int:
        """An fsync of ``directory``: every entry up to the last one that touched it becomes
        durable. Returns how many did."""
        last = max((i for i, e in enumerate(self.entries) if directory in e.dirs), default=-1)
        return self._commit(last + 1)

    def commit_all(self) -> int:
        return self._commit(len(self.entries))

    def commit_prefix(self, n: int) -> int:
        return self._commit(max(0, min(n, len(self.entries))))

    def _commit(self, n: int) -> int:
        done, self.entries = self.entries[:n], self.entries[n:]
        self.committed_trash.extend(e.trash for e in done if e.trash is not None)
        return len(done)

    def rollback(self) -> int:
        """Undo every entry not made durable, newest first. Returns how many were undone."""
        undone = 0
        errors: list[str] = []
        while self.entries:
            e = self.entries.pop()
            try:
                _undo(e)
                undone += 1
            except OSError as err:
                errors.append(f"{e.kind} {e.path}: {err}")
        if errors:
            raise RuntimeError("powercut: rollback failed: " + "; ".join(errors))
        return undone


def _undo(e: Entry) -> None:
    if e.kind == "create":
        os.unlink(e.path)
    elif e.kind == "mkdir":
        os.rmdir(e.path)
    elif e.kind == "remove":
        assert e.trash is not None
        os.rename(e.trash, e.path)
    elif e.kind == "rename":
        assert e.new is not None
        os.rename(e.new, e.path)
        if e.trash is not None:
            os.rename(e.trash, e.new)
    else:
        raise ValueError(f"unknown journal entry {e.kind!r}")
