"""The unsynced data of one file, kept in memory as the page cache would keep it.

A :class:`PendingFile` sits over the backing file (the durable copy): written pages are held as
whole 4 KiB images, truncations are remembered as a floor below which the backing file's bytes are
still visible, and the logical size is tracked apart from the backing file's. Reads merge the two.
:meth:`PendingFile.flush` writes everything to the backing file and fsyncs it (an fsync of the
file); dropping the object without a flush is what a power cut does.

Invariants: ``floor <= size``; bytes of the backing file at or above ``floor`` are not part of the
view (they read as zeros); bytes of a page image at or above ``size`` are zero.
"""

from __future__ import annotations

import os
import random
import time

PAGE = 4096


class PendingFile:
    """Unsynced writes and truncations of one backing inode. Owns ``fd`` (read-write, to the
    backing file) and closes it in :meth:`close`."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.size = os.fstat(fd).st_size  # the size a reader sees
        self.floor = self.size  # backing bytes at or above this are truncated away
        self.pages: dict[int, bytearray] = {}  # page index -> whole page image
        self.mtime_ns = time.time_ns()

    # -- the view -------------------------------------------------------------------------------

    def _base(self, start: int, length: int) -> bytes:
        """``length`` bytes of the durable view at ``start`` (zeros above the floor)."""
        n = max(0, min(length, self.floor - start))
        data = os.pread(self.fd, n, start) if n else b""
        return data + bytes(length - len(data))

    def read(self, offset: int, size: int) -> bytes:
        end = min(offset + size, self.size)
        if offset >= end:
            return b""
        out = bytearray()
        pos = offset
        while pos < end:
            index = pos // PAGE
            page = self.pages.get(index)
            if page is not None:
                stop = min(end, (index + 1) * PAGE)
                out += page[pos - index * PAGE : stop - index * PAGE]
            else:  # a run of clean pages in one read
                last = index
                while (last + 1) * PAGE < end and last + 1 not in self.pages:
                    last += 1
                stop = min(end, (last + 1) * PAGE)
                out += self._base(pos, stop - pos)
            pos = stop
        return bytes(out)

    def write(self, offset: int, data: bytes) -> int:
        end = offset + len(data)
        pos = offset
        while pos < end:
            index = pos // PAGE
            start = index * PAGE
            stop = min(end, start + PAGE)
            page = self.pages.get(index)
            if page is None:
                whole = pos == start and stop == start + PAGE
                page = bytearray(PAGE) if whole else bytearray(self._base(start, PAGE))
                self.pages[index] = page
            page[pos - start : stop - start] = data[pos - offset : stop - offset]
            pos = stop
        self.size = max(self.size, end)
        self.mtime_ns = time.time_ns()
        return len(data)

    def truncate(self, length: int) -> None:
        if length < self.size:
            keep = -(-length // PAGE)  # pages that still hold a byte
            for index in [i for i in self.pages if i >= keep]:
                del self.pages[index]
            tail = self.pages.get(length // PAGE)
            if tail is not None:
                cut = length % PAGE
                tail[cut:] = bytes(PAGE - cut)
            self.floor = min(self.floor, length)
        self.size = length
        self.mtime_ns = time.time_ns()

    @property
    def dirty_bytes(self) -> int:
        """Bytes this file would lose at a cut, counted in whole pages (a pending truncation
        counts as one page)."""
        truncated = self.floor < os.fstat(self.fd).st_size
        return len(self.pages) * PAGE + (PAGE if truncated else 0)

    # -- durability -----------------------------------------------------------------------------

    def flush(self, *, host_fsync: bool) -> None:
        """Write the pending state to the backing file and fsync it (when ``host_fsync``)."""
        fd = self.fd
        if self.floor < os.fstat(fd).st_size:
            os.ftruncate(fd, self.floor)
        for index in sorted(self.pages):
            start = index * PAGE
            n = min(PAGE, self.size - start)
            if n > 0:
                os.pwrite(fd, self.pages[index][:n], start)
        if os.fstat(fd).st_size != self.size:
            os.ftruncate(fd, self.size)
        if host_fsync:
            os.fsync(fd)
        self.pages.clear()
        self.floor = self.size

    def tear(self, rng: random.Random, fraction: float) -> int:
        """Write a random ``fraction`` of the dirty pages that lie wholly inside the backing
        file, in place, as a disk that got some of an overwrite out before the power went.
        Sizes do not change. Returns the number of pages written."""
        durable = min(self.floor, os.fstat(self.fd).st_size)
        written = 0
        for index in sorted(self.pages):
            start = index * PAGE
            if start + PAGE <= durable and rng.random() < fraction:
                os.pwrite(self.fd, self.pages[index], start)
                written += 1
        return written

    def close(self) -> None:
        os.close(self.fd)
