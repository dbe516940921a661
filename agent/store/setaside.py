"""Records set aside: queued records the endpoint refused on their own (docs/protocol.md, "Status
codes"), moved out of the queue into ``rejected/`` beside it, one file each, so that a record the
endpoint did not store is never deleted while no copy of it is kept on the device.

A file is written durably (temporary file, fsync, rename, fsync of the directory) *before* its
record leaves the queue; a crash in between leaves the record in both places, never in none. The
area is bounded (:data:`MAX_SET_ASIDE_BYTES`, each file counted as at least one 4 KiB block, so at
most 4,096 files): when a record does not fit, :class:`SetAsideFull` is raised and the record stays
in the queue.

File format (``rejected/seq-<seq>.cbor``), one deterministic CBOR map::

    {"v": 1, "seq": uint, "kind": tstr, "priority": uint, "created": float,
     "payload": bstr, "answer": tstr, "time": float}

``payload`` is the record's body as the queue held it, ``answer`` what the endpoint said (``"4.00
..."``), ``time`` the wall time it was set aside. ``cbor2.loads(path.read_bytes())`` reads it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import cbor2

from agent.errors import StoreError, StoreFull
from agent.files import write_atomic
from agent.store.dbfile import is_full

log = logging.getLogger(__name__)

SET_ASIDE_DIR = "rejected"
MAX_SET_ASIDE_BYTES = 16 << 20
BLOCK = 4096  # a file takes at least one block of the disk
FORMAT_VERSION = 1


class SetAsideFull(StoreFull):
    """The set-aside area is full: the record stays in the queue."""


class Refused(Protocol):
    """What is kept of a queued record (:class:`agent.store.queue.Record` has these)."""

    seq: int
    kind: str
    priority: int
    created: float
    payload: bytes


@dataclass(frozen=True)
class SetAsideStats:
    count: int
    bytes: int  # as counted against the cap (each file at least one block)


def _cost(size: int) -> int:
    return max(BLOCK, size)


class SetAside:
    """The set-aside area of one queue. Its methods do blocking file I/O: call them on the
    store's writer thread."""

    def __init__(self, directory: Path, cap_bytes: int | None = None) -> None:
        self.dir = directory
        self.cap = MAX_SET_ASIDE_BYTES if cap_bytes is None else cap_bytes

    def stats(self) -> SetAsideStats:
        """Read from the directory (an operator may have taken files out)."""
        count = used = 0
        try:
            with os.scandir(self.dir) as entries:
                for entry in entries:
                    if entry.name.endswith(".cbor") and entry.is_file(follow_symlinks=False):
                        count += 1
                        used += _cost(entry.stat(follow_symlinks=False).st_size)
        except FileNotFoundError:
            pass
        except OSError as err:
            log.warning("event=set_aside_unreadable dir=%s error=%r", self.dir, str(err))
        return SetAsideStats(count, used)

    def write(self, records: Sequence[Refused], answer: str, wall_now: float) -> None:
        """Keep ``records`` durably, all or (on an error) those written before it; raises
        SetAsideFull when they do not fit, StoreError when a file cannot be written."""
        docs = [(r.seq, self._encode(r, answer, wall_now)) for r in records]
        used = self.stats().bytes
        need = sum(_cost(len(data)) for _, data in docs)
        if used + need > self.cap:
            raise SetAsideFull(
                f"the set-aside area {self.dir} is full ({used} of {self.cap} bytes): "
                f"{len(docs)} refused record(s) stay in the queue; read and remove its files"
            )
        for seq, data in docs:
            path = self.dir / f"seq-{seq}.cbor"
            try:
                write_atomic(path, data, mode=0o600)
            except OSError as err:
                if is_full(err, self.dir):
                    raise StoreFull(
                        f"cannot set record {seq} aside in {self.dir}: the disk is full"
                    ) from err
                raise StoreError(f"cannot set record {seq} aside in {self.dir}: {err}") from err

    @staticmethod
    def _encode(rec: Refused, answer: str, wall_now: float) -> bytes:
        return cbor2.dumps(
            {
                "v": FORMAT_VERSION,
                "seq": rec.seq,
                "kind": str(rec.kind),
                "priority": rec.priority,
                "created": float(rec.created),
                "payload": bytes(rec.payload),
                "answer": answer,
                "time": float(wall_now),
            },
            canonical=True,
        )
