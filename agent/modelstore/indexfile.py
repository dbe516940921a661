"""The model cache's index file (``index.json``) and the deletes of evicted files, written on
the cache's I/O thread (:class:`IndexWriter`).

Every change of the cache's state (an install, an eviction, a pin, a use) bumps a generation
(:meth:`IndexWriter.changed`). :meth:`IndexWriter.sync` hands the index as of now, with the files
evicted meanwhile, to the I/O thread in a task of its own and awaits it shielded: the state
counts as written only once a write of that generation succeeded. A write that fails (NotNow),
or one whose awaiter was cancelled while it waited or ran, leaves the state to be written by the
next sync (and at close), and a change made while a write runs stays to be written too. (The
index on disk must name every installed model: at the next open, files it does not name are
deleted as orphans.)
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Mapping
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.errors import NotNow
from agent.files import write_atomic
from agent.modelstore.signing import check_name
from drivers.clock import Clock

Ref = tuple[str, str]  # (name, version)


@dataclass
class Record:
    """One cached file, as the index keeps it."""

    name: str
    version: str
    size: int
    sha256: str
    installed: float
    last_used: float
    seq: int  # the use counter when it was last used (LRU order; wall time may tie or step)
    pinned: bool = False

    @property
    def ref(self) -> Ref:
        return (self.name, self.version)

    def to_dict(self) -> dict[str, Any]:
        return dict(vars(self))  # scalar fields: asdict's deep copy costs 10x on the loop

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Record:
        return cls(
            name=check_name("name", d["name"]),
            version=check_name("version", d["version"]),
            size=int(d["size"]),
            sha256=str(d["sha256"]),
            installed=float(d["installed"]),
            last_used=float(d["last_used"]),
            seq=int(d["seq"]),
            pinned=bool(d.get("pinned", False)),
        )


class IndexWriter:
    """See the module docstring. ``doc()``: the index as of now (a copy the I/O thread may
    encode while the loop runs on); ``delete(manifest_path)``: the files of an evicted model."""

    def __init__(
        self,
        path: Path,
        io: Executor,
        clock: Clock,
        *,
        doc: Callable[[], dict[str, Any]],
        delete: Callable[[Path], None],
    ) -> None:
        self.path = path
        self.readonly = False
        self._io = io
        self._clock = clock
        self._doc = doc
        self._delete = delete
        self._changes = 0  # generation of the cache's state, bumped by every change
        self._written = 0  # generation of the last index written
        self._doomed: list[Path] = []  # files evicted in memory, deleted by the next write
        self._job: asyncio.Future[None] | None = None  # the latest write handed on
        self._job_changes = -1  # the generation it writes

    def changed(self) -> None:
        """The cache's state changed: the index is to be written again."""
        self._changes += 1

    @property
    def dirty(self) -> bool:
        return self._written != self._changes

    def doom(self, manifest_path: Path) -> None:
        """Delete the files of an evicted model (by the next write)."""
        self._doomed.append(manifest_path)

    def spare(self, manifest_path: Path) -> None:
        """Files installed again at ``manifest_path`` (the model downloaded again since its
        eviction, whose deletion a failed write left to the next): not to be deleted."""
        self._doomed = [p for p in self._doomed if p != manifest_path]

    def write(self, doc: dict[str, Any] | None = None) -> None:
        """Write the index now (blocking: at open, or on the cache's I/O thread)."""
        if self.readonly:
            return
        changes = self._changes
        data = json.dumps(
            self._doc() if doc is None else doc, sort_keys=True, separators=(",", ":")
        ).encode("utf-8")
        try:
            write_atomic(self.path, data)
        except OSError as err:  # the device's disk, not a model: tried again later
            raise NotNow(f"{self.path}: cannot write the model cache index ({err})") from err
        if doc is None:  # (on the I/O thread the job records what it wrote)
            self._written = changes

    def _persist(self, doc: dict[str, Any] | None, doomed: list[Path]) -> None:
        for manifest_path in doomed:
            self._delete(manifest_path)
        if doc is not None:
            self.write(doc)

    async def sync(self) -> None:
        """Make the disk agree with the state as of now: evicted files deleted, the index
        written (atomically, on the I/O thread). NotNow when the index cannot be written."""
        if self.readonly or not (self.dirty or self._doomed):
            return
        job = self._job
        if job is None or job.done() or self._job_changes != self._changes or self._doomed:
            doc = self._doc() if self.dirty else None
            doomed, self._doomed = self._doomed, []
            job = asyncio.ensure_future(self._run(doc, self._changes, doomed))
            job.add_done_callback(_retrieved)  # its awaiter may be gone: the next sync retries
            self._job, self._job_changes = job, self._changes
        await asyncio.shield(job)

    async def _run(self, doc: dict[str, Any] | None, changes: int, doomed: list[Path]) -> None:
        try:
            await self._clock.run_blocking(self._io, self._persist, doc, doomed)
        except BaseException:
            self._doomed[:0] = doomed  # deleted by the next write (deleting again is harmless)
            raise
        if doc is not None:
            self._written = max(self._written, changes)


def _retrieved(job: asyncio.Future[None]) -> None:
    if not job.cancelled():
        job.exception()
