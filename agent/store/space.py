"""Disk space for the queue: the budget capped by what the filesystem can hold, and a reserve
file that is given back when the disk fills, so the deletes that acks make can still be written.

- At open, a budget larger than the filesystem's room for the queue (its free space plus the
  queue's own files) is capped to :data:`FS_SHARE` of that room, with a warning: a 256 MB default
  on a 2 MiB partition would otherwise fill it with the WAL alone.
- The reserve (``queue.db.reserve``, one WAL's worth of allocated blocks) exists while there is
  room. SQLite needs free pages to delete rows in WAL mode; when an ack finds the disk full, the
  reserve is deleted, the ack is written, and the WAL is checkpointed and truncated, so a full disk
  drains as soon as the endpoint answers. The reserve is recreated once the disk has room again.
- A second, small one (``queue.db.reserve-open``, :data:`OPEN_ROOM`) is given back only by an
  open that finds the disk full and the first one spent: the room to open the queue (SQLite's
  shared-memory file, the first WAL frames), so an agent restarted on a disk that stayed full
  runs (alerts wait in memory, acks drain the queue) instead of exiting at every start.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import replace
from pathlib import Path

from agent.errors import no_room
from agent.store.settings import MIN_BUDGET_BYTES, StoreSettings

log = logging.getLogger(__name__)

FS_SHARE = 0.8  # of the filesystem's room the queue's budget may take
RESERVE_RETRY_SECONDS = 10.0  # how often a missing reserve is tried again
_CHUNK = 64 * 1024
OPEN_ROOM = 128 * 1024  # the shared-memory file (32 KiB) and the first WAL frames, with margin


def free_bytes(directory: Path) -> int | None:
    """Bytes free for an unprivileged writer on ``directory``'s filesystem (None: unknown)."""
    try:
        st = os.statvfs(directory)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def room_for(settings: StoreSettings) -> int | None:
    """Bytes the queue could occupy on its filesystem: free space plus its own files (None when
    the filesystem cannot say)."""
    free = free_bytes(settings.path.parent)
    if free is None:
        return None
    ours = 0
    spare = reserve_path(settings).with_name(reserve_path(settings).name + "-open")
    for p in (settings.path, settings.wal_path, reserve_path(settings), spare):
        with contextlib.suppress(OSError):
            ours += p.stat().st_size
    return free + ours


def cap_budget(settings: StoreSettings) -> StoreSettings:
    """``settings`` with the budget capped by the filesystem's room (warned once at open)."""
    room = room_for(settings)
    if room is None:
        return settings
    cap = int(room * FS_SHARE)
    if settings.budget_bytes <= cap:
        return settings
    budget = max(MIN_BUDGET_BYTES, cap)
    log.warning(
        "event=budget_capped path=%s budget=%d filesystem_room=%d capped_to=%d "
        "note=the [store] budget_mb is larger than this filesystem can hold",
        settings.path,
        settings.budget_bytes,
        room,
        budget,
    )
    return replace(settings, budget_bytes=budget)


def reserve_path(settings: StoreSettings) -> Path:
    return settings.path.with_name(settings.path.name + ".reserve")


class Reserve:
    """A file of ``size`` allocated bytes, deleted to give SQLite room on a full disk."""

    def __init__(self, path: Path, size: int, spare: int = 0) -> None:
        self.path = path
        self.size = size
        self.present = False
        self._next_try = 0.0
        #: the room to open the queue on a full disk (:meth:`open_room`)
        self.spare = Reserve(path.with_name(path.name + "-open"), spare) if spare else None

    def ensure(self, now: float, room: int | None = None) -> bool:
        """Make the reserve (its spare first) exist (at most every
        :data:`RESERVE_RETRY_SECONDS` after a failure, and only with ``room`` free, by default
        twice its size, so it never takes the last space a put needs)."""
        if self.spare is not None:
            self.spare.ensure(now)
        if self.present:
            return True
        if now < self._next_try:
            return False
        self._next_try = now + RESERVE_RETRY_SECONDS
        try:
            if self.path.exists() and self.path.stat().st_size >= self.size:
                self.present = True
                return True
            free = free_bytes(self.path.parent)
            if free is None or free < (2 * self.size if room is None else room):
                return False
            self._write()
        except OSError as err:
            with contextlib.suppress(OSError):
                self.path.unlink()
            if not no_room(err):
                log.warning("event=reserve_failed path=%s error=%s", self.path, err)
            return False
        self.present = True
        log.debug("event=reserve_made path=%s bytes=%d", self.path, self.size)
        return True

    def _write(self) -> None:
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            try:
                os.posix_fallocate(fd, 0, self.size)
            except OSError as err:  # not supported here: write the blocks
                if no_room(err):
                    raise
                zeros = bytes(_CHUNK)
                left = self.size
                while left > 0:
                    left -= os.write(fd, zeros[: min(left, _CHUNK)])
            os.fsync(fd)
        finally:
            os.close(fd)

    def spare_back(self) -> None:
        """Once the queue's connection is closed (its WAL and shared-memory file deleted): the
        spare made again if an open gave it back, from that room (its size free is enough), so
        the next start on a disk that stayed full finds it too."""
        if self.spare is not None and not self.spare.present:
            self.spare._next_try = 0.0
            self.spare.ensure(0.0, room=self.spare.size)

    def open_room(self) -> bool:
        """At an open that finds the disk full: the reserve, or once it is spent its spare; True
        when there was one to give back."""
        return self.release() or (self.spare is not None and self.spare.release())

    def release(self) -> bool:
        """Delete the reserve; True when there was one to give back."""
        if not self.present and not self.path.exists():
            return False
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass
        except OSError as err:
            log.error("event=reserve_release_failed path=%s error=%s", self.path, err)
            return False
        self.present = False
        log.warning(
            "event=reserve_released path=%s bytes=%d reason=disk_full", self.path, self.size
        )
        return True
