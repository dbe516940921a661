"""Benchmark modules for tools/bench.py; each defines ``run(args) -> Result`` and two constants,
``MEASURES`` (one line: what it measures) and ``BASELINE`` (one line: the baseline measured beside
it in the same run), which ``./tools/dev bench list`` prints.

Where a bench writes: :func:`workdir` makes a new temporary directory inside ``--dir DIR``
(default: :func:`default_base`, a directory on the same filesystem as the agent's data
directory), names it and its filesystem type in the output and in the JSON summary (``dir``,
``fs_type``), warns when that filesystem is tmpfs or ramfs (durable there involves no fsync), and
removes it afterwards.

What the README claims: a bench states each claim as a constant beside ``MEASURES`` and checks the
measured value with :meth:`Result.claim`, which prints ``README claims X; measured Y: NOT MET``
when it falls short and lists it in the summary's ``claims_not_met``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.service.quickbench import NO_FSYNC_FS, filesystem_type

AGENT_DATA_DIR = Path("/var/lib/edge-agent")  # the packaged config's [agent] data_dir
FALLBACK_DIR = Path("/var/tmp")  # disk-backed on Debian (the system temp dir may be tmpfs)


@dataclass(frozen=True)
class Row:
    metric: str
    value: str
    reference: str = ""


@dataclass
class Result:
    rows: list[Row] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def add(self, metric: str, value: str, reference: str = "") -> None:
        self.rows.append(Row(metric, value, reference))

    def claim(self, claim: str, measured: str, met: bool) -> bool:
        """Check one README claim: a line saying so when it is not met (and the summary's
        ``claims_not_met``); returns ``met``."""
        if not met:
            self.notes.append(f"README claims {claim}; measured {measured}: NOT MET")
            self.summary.setdefault("claims_not_met", []).append(f"{claim}; measured {measured}")
        return met


def default_base() -> tuple[Path, str]:
    """Where a bench runs without ``--dir``, and why: the agent's data directory when it exists
    and is writable here, else /var/tmp (on disk, unlike a tmpfs /tmp)."""
    if AGENT_DATA_DIR.is_dir() and os.access(AGENT_DATA_DIR, os.W_OK | os.X_OK):
        return AGENT_DATA_DIR, "the agent's data directory"
    why = "exists but is not writable" if AGENT_DATA_DIR.is_dir() else "does not exist"
    return FALLBACK_DIR, f"{AGENT_DATA_DIR} {why}"


@dataclass(frozen=True)
class Workdir:
    """A bench's temporary directory and what it sits on."""

    path: Path
    base: Path
    fs_type: str
    chosen: str  # "--dir" or why the default was taken

    @property
    def no_fsync(self) -> bool:
        return self.fs_type in NO_FSYNC_FS

    def lines(self) -> list[str]:
        out = [
            f"(ran in {self.path}, {self.fs_type}; base {self.base}: {self.chosen}; "
            "removed afterwards)"
        ]
        if self.no_fsync:
            out.append(
                f"WARNING: {self.base} is {self.fs_type}: durable here involves no fsync; the "
                "figures are RAM's, not storage's (give --dir DIR on real storage)"
            )
        return out

    def stamp(self, result: Result) -> Result:
        """Name the directory and its filesystem in the result (notes and summary)."""
        result.notes.extend(self.lines())
        result.summary["dir"] = str(self.path)
        result.summary["fs_type"] = self.fs_type
        if self.no_fsync:
            result.summary["no_fsync"] = True
        return result


def locate(base: Path | str | None) -> tuple[Path, str]:
    if base is None:
        return default_base()
    return Path(base), "--dir"


@contextlib.contextmanager
def workdir(args: Any, name: str, *, keep: bool = False) -> Iterator[Workdir]:
    """A new directory ``bench-NAME-*`` inside ``args.dir`` (or :func:`default_base`), removed
    on exit unless ``keep``."""
    base, chosen = locate(getattr(args, "dir", None))
    base.mkdir(parents=True, exist_ok=True)
    path = Path(tempfile.mkdtemp(prefix=f"bench-{name}-", dir=base))
    try:
        yield Workdir(path, base, filesystem_type(path), chosen)
    finally:
        if not keep:
            shutil.rmtree(path, ignore_errors=True)


def describe(path: Path | str, chosen: str = "the bench's own directory") -> Workdir:
    """A :class:`Workdir` for a directory a bench made itself (fleet, chaos): to say where."""
    p = Path(path)
    return Workdir(p, p.parent, filesystem_type(p if p.exists() else p.parent), chosen)
