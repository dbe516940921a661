"""The FUSE operations of the power-cut filesystem: a passthrough over the backing directory that
keeps unsynced file data in :class:`~.pending.PendingFile` objects and unsynced namespace
operations in a :class:`~.journal.Journal`.

Every operation runs under one lock; :meth:`PowerCutOps.freeze` takes it for good, so once the
filesystem is frozen no operation completes (the kernel requests wait until the connection is
aborted). File handles hold a file descriptor of the backing file, so data follows the inode
through renames; pending data is keyed by the backing inode, so every handle of a file sees it.
"""

from __future__ import annotations

import collections
import errno
import functools
import os
import random
import shutil
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import mfusepy

from .journal import Journal, Key, key_of
from .pending import PendingFile

TRASH = ".powercut-trash"  # hidden directory in the backing root: removed objects, undoable
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
UTIME_NOW = (1 << 30) - 1
UTIME_OMIT = (1 << 30) - 2

F = TypeVar("F", bound=Callable[..., Any])


def _locked(method: F) -> F:
    @functools.wraps(method)
    def run(self: PowerCutOps, *args: Any, **kwargs: Any) -> Any:
        with self._lock:
            return method(self, *args, **kwargs)

    return run  # type: ignore[return-value]


@dataclass
class Handle:
    fd: int  # backing file (read-write where possible) or directory
    key: Key


class PowerCutOps(mfusepy.Operations):
    """The operations object handed to :class:`mfusepy.FUSE`."""

    use_ns = True

    def __init__(self, backing: str, *, host_fsync: bool = True) -> None:
        self.root = os.path.realpath(backing)
        self.trash = os.path.join(self.root, TRASH)
        self.host_fsync = host_fsync
        self._lock = threading.Lock()
        self.journal = Journal(self.trash)
        self.pending: dict[Key, PendingFile] = {}
        self.handles: dict[int, Handle] = {}
        self.open_count: collections.Counter[Key] = collections.Counter()
        self.counts: collections.Counter[str] = collections.Counter()
        self._fh = 0
        self.on_init: Callable[[], None] | None = None
        _empty_trash(self.trash)
        os.mkdir(self.trash)

    # -- helpers --------------------------------------------------------------------------------

    def _real(self, path: str | None) -> str:
        if path is None:  # an open file that was unlinked, asked for by path
            raise OSError(errno.EBADF, os.strerror(errno.EBADF))
        if path == "/":
            return self.root
        if path.split("/")[1] == TRASH:
            raise OSError(errno.ENOENT, os.strerror(errno.ENOENT), path)
        return self.root + path

    def _new_fh(self, fd: int) -> int:
        self._fh += 1
        st = os.fstat(fd)
        self.handles[self._fh] = Handle(fd, key_of(st))
        self.open_count[key_of(st)] += 1
        return self._fh

    def _pending_for(self, key: Key, fd: int) -> PendingFile:
        p = self.pending.get(key)
        if p is None:
            p = PendingFile(os.open(f"/proc/self/fd/{fd}", os.O_RDWR | os.O_CLOEXEC))
            self.pending[key] = p
        return p

    def _drop_pending(self, key: Key) -> None:
        p = self.pending.pop(key, None)
        if p is not None:
            p.close()

    def _reap_trash(self) -> None:
        """Delete the trash of durable removals, except files still open (tried again later)."""
        keep: list[str] = []
        for path in self.journal.committed_trash:
            st = os.lstat(path)
            if stat.S_ISDIR(st.st_mode):
                os.rmdir(path)
            elif self.open_count[key_of(st)]:
                keep.append(path)
            else:
                os.unlink(path)
                if st.st_nlink == 1:
                    self._drop_pending(key_of(st))
        self.journal.committed_trash = keep

    # -- lifecycle (called by the server, not by the kernel) ------------------------------------

    def init(self, path: str) -> None:
        if self.on_init is not None:
            self.on_init()

    def freeze(self) -> None:
        """Take the lock for good: no operation completes after this returns."""
        self._lock.acquire()

    def stats(self) -> dict[str, int]:
        with self._lock:
            return self._stats()

    def _stats(self) -> dict[str, int]:
        dirty = [p.dirty_bytes for p in self.pending.values()]
        return {
            "pending_files": sum(1 for n in dirty if n),
            "pending_bytes": sum(dirty),
            "journal_ops": len(self.journal),
            "open_handles": len(self.handles),
            **{k: self.counts[k] for k in ("writes", "fsyncs", "fdatasyncs", "dirsyncs")},
        }

    def sync_all(self) -> dict[str, int]:
        """What sync(1) would do: every file's data and every namespace operation becomes
        durable. Returns the counters from before."""
        with self._lock:
            return self.final_sync()

    def final_sync(self) -> dict[str, int]:
        """Called frozen, for a clean unmount: as :meth:`sync_all`."""
        before = self._stats()
        for key in list(self.pending):
            self.pending[key].flush(host_fsync=self.host_fsync)
            self._drop_pending(key)
        self.journal.commit_all()
        self._reap_trash()
        return before

    def power_cut(self, torn: tuple[int, float] | None = None) -> dict[str, int]:
        """Called frozen: lose what was not durable. ``torn`` (seed, fraction): a random prefix
        of the un-synced namespace operations survives, and about ``fraction`` of the dirty
        pages that overwrite durable data get written (torn writes); otherwise all is lost."""
        before = self._stats()
        if torn is not None:
            rng = random.Random(torn[0])
            before["torn_pages"] = sum(p.tear(rng, torn[1]) for p in self.pending.values())
            before["torn_ops_kept"] = self.journal.commit_prefix(rng.randint(0, len(self.journal)))
        before["rolled_back"] = self.journal.rollback()
        for key in list(self.pending):
            self._drop_pending(key)
        for h in self.handles.values():
            os.close(h.fd)
        self.handles.clear()
        self.open_count.clear()
        self._reap_trash()
        return before

    def finish(self) -> None:
        """After a cut or a clean sync: remove the trash directory (then empty)."""
        _empty_trash(self.trash)

    # -- attributes and directories -------------------------------------------------------------

    @_locked
    def getattr(self, path: str, fh: int | None = None) -> dict[str, Any]:
        h = self.handles.get(fh) if fh is not None else None
        st = os.fstat(h.fd) if h is not None else os.lstat(self._real(path))
        attrs: dict[str, Any] = {
            k: getattr(st, k)
            for k in ("st_mode", "st_ino", "st_nlink", "st_uid", "st_gid", "st_size", "st_rdev")
        }
        attrs["st_blocks"] = st.st_blocks
        attrs["st_atime"] = st.st_atime_ns
        attrs["st_mtime"] = st.st_mtime_ns
        attrs["st_ctime"] = st.st_ctime_ns
        p = self.pending.get(key_of(st)) if stat.S_ISREG(st.st_mode) else None
        if p is not None:
            attrs["st_size"] = p.size
            attrs["st_blocks"] = -(-p.size // 512)
            attrs["st_mtime"] = p.mtime_ns
        return attrs

    @_locked
    def readdir(self, path: str, fh: int) -> list[tuple[str, dict[str, int], int]]:
        # with use_ino the kernel drops entries without an inode number: give every one
        real = self._real(path)
        here = os.lstat(real)
        up = os.lstat(os.path.dirname(real)) if path != "/" else here
        out = [(".", _dirent(here), 0), ("..", _dirent(up), 0)]
        with os.scandir(real) as it:
            for e in it:
                if path == "/" and e.name == TRASH:
                    continue
                out.append((e.name, _dirent(e.stat(follow_symlinks=False)), 0))
        return out

    @_locked
    def opendir(self, path: str) -> int:
        return self._new_fh(os.open(self._real(path), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC))

    @_locked
    def releasedir(self, path: str, fh: int) -> int:
        return self._release(fh)

    @_locked
    def fsyncdir(self, path: str, datasync: int, fh: int) -> int:
        h = self.handles[fh]
        self.counts["dirsyncs"] += 1
        if self.journal.commit(h.key):
            self._reap_trash()
        if self.host_fsync:
            os.fsync(h.fd)
        return 0

    @_locked
    def statfs(self, path: str) -> dict[str, int]:
        sv = os.statvfs(self.root)
        return {
            k: getattr(sv, k)
            for k in (
                "f_bsize",
                "f_frsize",
                "f_blocks",
                "f_bfree",
                "f_bavail",
                "f_files",
                "f_ffree",
                "f_favail",
                "f_flag",
                "f_namemax",
            )
        }

    @_locked
    def access(self, path: str, amode: int) -> int:
        os.lstat(self._real(path))
        return 0

    @_locked
    def readlink(self, path: str) -> str:
        return os.readlink(self._real(path))

    # -- passthrough metadata (durable at once) -------------------------------------------------

    @_locked
    def chmod(self, path: str, mode: int) -> int:
        os.chmod(self._real(path), stat.S_IMODE(mode))
        return 0

    @_locked
    def chown(self, path: str, uid: int, gid: int) -> int:
        os.chown(self._real(path), uid, gid, follow_symlinks=False)
        return 0

    @_locked
    def utimens(self, path: str, times: tuple[int, int] | None = None) -> int:
        real = self._real(path)
        if times is None:
            os.utime(real, follow_symlinks=False)
            return 0
        # libfuse passes utimensat's UTIME_NOW / UTIME_OMIT (tv_sec 0) through as nanoseconds
        st = os.lstat(real)
        now = time.time_ns()
        old = (st.st_atime_ns, st.st_mtime_ns)
        ns = tuple(
            now if t == UTIME_NOW else was if t == UTIME_OMIT else t
            for t, was in zip(times, old, strict=True)
        )
        os.utime(real, ns=ns, follow_symlinks=False)
        return 0

    # -- namespace (journalled) -----------------------------------------------------------------

    @_locked
    def create(self, path: str, mode: int, flags: int = 0) -> int:
        real = self._real(path)
        try:
            fd = os.open(real, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
        except FileExistsError:
            if flags & os.O_EXCL:
                raise
            return self._open(real, flags)
        self.journal.created(real)
        return self._new_fh(fd)

    @_locked
    def mknod(self, path: str, mode: int, dev: int) -> int:
        real = self._real(path)
        os.mknod(real, mode, dev)
        self.journal.created(real)
        return 0

    @_locked
    def mkdir(self, path: str, mode: int) -> int:
        real = self._real(path)
        os.mkdir(real, mode)
        self.journal.created(real, directory=True)
        return 0

    @_locked
    def symlink(self, target: str, source: str) -> int:
        real = self._real(target)  # mfusepy: the new link is ``target``, pointing at ``source``
        os.symlink(source, real)
        self.journal.created(real)
        return 0

    @_locked
    def link(self, target: str, source: str) -> int:
        real = self._real(target)  # the new name
        os.link(self._real(source), real, follow_symlinks=False)
        self.journal.created(real)
        return 0

    @_locked
    def unlink(self, path: str) -> int:
        self.journal.remove(self._real(path), directory=False)
        return 0

    @_locked
    def rmdir(self, path: str) -> int:
        self.journal.remove(self._real(path), directory=True)
        return 0

    @_locked
    def rename(self, old: str, new: str, flags: int = 0) -> int:
        if flags & RENAME_EXCHANGE or flags & ~(RENAME_NOREPLACE | RENAME_EXCHANGE):
            raise OSError(errno.EINVAL, "powercut: RENAME_EXCHANGE is not supported")
        self.journal.rename(
            self._real(old), self._real(new), noreplace=bool(flags & RENAME_NOREPLACE)
        )
        return 0

    # -- file data ------------------------------------------------------------------------------

    def _open(self, real: str, flags: int) -> int:
        try:
            fd = os.open(real, os.O_RDWR | os.O_CLOEXEC)
        except PermissionError:
            fd = os.open(real, os.O_RDONLY | os.O_CLOEXEC)
        fh = self._new_fh(fd)
        if flags & os.O_TRUNC:
            self._pending_for(self.handles[fh].key, fd).truncate(0)
        return fh

    @_locked
    def open(self, path: str, flags: int) -> int:
        return self._open(self._real(path), flags)

    @_locked
    def read(self, path: str, size: int, offset: int, fh: int) -> bytes:
        h = self.handles[fh]
        p = self.pending.get(h.key)
        return p.read(offset, size) if p is not None else os.pread(h.fd, size, offset)

    @_locked
    def write(self, path: str, data: bytes, offset: int, fh: int) -> int:
        h = self.handles[fh]
        self.counts["writes"] += 1
        return self._pending_for(h.key, h.fd).write(offset, data)

    @_locked
    def truncate(self, path: str | None, length: int, fh: int | None = None) -> int:
        h = self.handles.get(fh) if fh is not None else None
        if h is not None:
            self._pending_for(h.key, h.fd).truncate(length)
            return 0
        if path is None:
            raise OSError(errno.EBADF, os.strerror(errno.EBADF))
        fd = os.open(self._real(path), os.O_RDONLY | os.O_CLOEXEC)
        try:
            self._pending_for(key_of(os.fstat(fd)), fd).truncate(length)
        finally:
            os.close(fd)
        return 0

    @_locked
    def fsync(self, path: str, datasync: int, fh: int) -> int:
        h = self.handles[fh]
        self.counts["fdatasyncs" if datasync else "fsyncs"] += 1
        p = self.pending.get(h.key)
        if p is not None:
            p.flush(host_fsync=self.host_fsync)
            self._drop_pending(h.key)
        elif self.host_fsync:
            os.fsync(h.fd)
        return 0

    @_locked
    def flush(self, path: str, fh: int) -> int:
        return 0  # close() makes nothing durable

    @_locked
    def release(self, path: str, fh: int) -> int:
        return self._release(fh)

    def _release(self, fh: int) -> int:
        h = self.handles.pop(fh, None)
        if h is not None:
            os.close(h.fd)
            self.open_count[h.key] -= 1
            if self.open_count[h.key] <= 0:
                del self.open_count[h.key]
        return 0


def _empty_trash(trash: str) -> None:
    """Delete the trash directory and what is in it (left by a cut, a clean stop, or a server
    that died: its removals are then as good as durable)."""
    if os.path.lexists(trash):
        shutil.rmtree(trash)


class PowerCutFUSE(mfusepy.FUSE):
    """mfusepy's FUSE with the two fuse3 arguments it drops passed on: rename's flags (so
    RENAME_NOREPLACE is honoured) and truncate's file handle (ftruncate of an open file)."""

    def rename_fuse_3(self, old: bytes, new: bytes, flags: int) -> int:
        return self.operations.rename(
            old.decode(self.encoding, self.errors), new.decode(self.encoding, self.errors), flags
        )

    def truncate_fuse_3(self, path: bytes | None, length: int, fip: Any) -> int:
        fh = fip.contents.fh if fip else None
        decoded = None if path is None else path.decode(self.encoding, self.errors)
        return self.operations.truncate(decoded, length, fh)


def _dirent(st: os.stat_result) -> dict[str, int]:
    return {"st_ino": st.st_ino, "st_mode": st.st_mode}


__all__ = ["TRASH", "PowerCutFUSE", "PowerCutOps"]
