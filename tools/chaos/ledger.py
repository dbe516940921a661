"""The books of a chaos run, read from what the processes leave behind:

- the agent's debug log: ``event=committed kind=... seqs=...`` after each commit,
  ``event=queue_salvaged ... salvaged=N lost=M`` after a salvage, ``event=desired_document`` and
  ``event=desired_applied`` for desired state;
- the endpoint's SQLite file (``cloud.sqlite3``, read with plain SELECTs on a connection of our
  own: WAL mode lets it read while the endpoint writes, and a read changes nothing the endpoint
  notices);
- the agent's queue file after it stopped (the records it still holds).
"""

from __future__ import annotations

import contextlib
import re
import sqlite3
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

COMMITTED = re.compile(r"event=committed kind=\w+ seqs=([\d,\-]+)")
SALVAGED = re.compile(r"event=queue_salvaged from=(\S+) salvaged=(\d+) lost=(\w+)")
DOCUMENT = re.compile(r"event=desired_document endpoint=\S+ rev=(\d+)")
APPLIED = re.compile(r"event=desired_applied key=(\S+) version=(\d+)")
DB_TIMEOUT = 10.0  # seconds to wait for a lock on the endpoint's database


def parse_ranges(text: str) -> set[int]:
    """``1-3,7`` -> {1, 2, 3, 7} (the agent's ``format_ranges``)."""
    seqs: set[int] = set()
    for part in text.split(","):
        if not part:
            continue
        a, _, b = part.partition("-")
        seqs.update(range(int(a), int(b or a) + 1))
    return seqs


def _text(log: Path) -> str:
    try:
        return log.read_text(errors="replace")
    except OSError:
        return ""


def committed_in(log: Path) -> set[int]:
    """Every sequence number a run logged as committed."""
    found: set[int] = set()
    for m in COMMITTED.finditer(_text(log)):
        found |= parse_ranges(m.group(1))
    return found


def committed_all(logs: Iterable[Path]) -> set[int]:
    out: set[int] = set()
    for log in logs:
        out |= committed_in(log)
    return out


@dataclass(frozen=True)
class SalvageLine:
    """The agent's own account of one salvage."""

    source: str
    salvaged: int
    lost: int | None


def salvages_in(logs: Iterable[Path]) -> list[SalvageLine]:
    out = []
    for log in logs:
        for m in SALVAGED.finditer(_text(log)):
            lost = int(m.group(3)) if m.group(3).isdigit() else None
            out.append(SalvageLine(m.group(1), int(m.group(2)), lost))
    return out


def documents_seen(logs: Iterable[Path]) -> set[int]:
    """Revisions of desired documents the agent received (decoded as documents)."""
    return {int(m.group(1)) for log in logs for m in DOCUMENT.finditer(_text(log))}


def applied_keys(logs: Iterable[Path]) -> list[tuple[str, int]]:
    """(key, version) of every desired value the agent applied."""
    return [(m.group(1), int(m.group(2))) for log in logs for m in APPLIED.finditer(_text(log))]


def tracebacks(logs: Iterable[Path]) -> dict[Path, int]:
    """Lines starting with "Traceback", per log file that has any."""
    out = {}
    for log in logs:
        n = sum(1 for line in _text(log).splitlines() if line.startswith("Traceback"))
        if n:
            out[log] = n
    return out


class Tail:
    """Follows a growing set of agent logs, reading only what was added since the last look:
    the committed seqs and the desired revisions seen so far."""

    def __init__(self) -> None:
        self._offsets: dict[Path, int] = {}
        self.committed: set[int] = set()
        self.revisions: set[int] = set()
        self.seen_at: dict[int, float] = {}  # committed seq -> when this tail first read it

    def update(self, logs: Iterable[Path]) -> None:
        for log in logs:
            start = self._offsets.get(log, 0)
            try:
                with log.open("rb") as f:
                    f.seek(start)
                    data = f.read()
            except OSError:
                continue
            end = data.rfind(b"\n") + 1  # whole lines only
            if end == 0:
                continue
            self._offsets[log] = start + end
            text = data[:end].decode(errors="replace")
            now = time.monotonic()
            for m in COMMITTED.finditer(text):
                seqs = parse_ranges(m.group(1)) - self.committed
                self.committed |= seqs
                self.seen_at.update(dict.fromkeys(seqs, now))
            self.revisions.update(int(m.group(1)) for m in DOCUMENT.finditer(text))


def count_in(logs: Iterable[Path], text: str) -> int:
    return sum(_text(log).count(text) for log in logs)


# -- the endpoint's storage --------------------------------------------------------------------


@contextlib.contextmanager
def _connect(path: Path, readonly: bool = True):  # type: ignore[no-untyped-def]
    uri = f"file:{path}?mode=ro" if readonly else f"file:{path}"
    db = sqlite3.connect(uri, uri=True, timeout=DB_TIMEOUT, isolation_level=None)
    try:
        yield db
    finally:
        db.close()


def stored_seqs(cloud_db: Path, device: str) -> set[int]:
    """Every seq the endpoint stored for ``device``."""
    with _connect(cloud_db) as db:
        return {r[0] for r in db.execute("SELECT seq FROM records WHERE device = ?", (device,))}


@dataclass(frozen=True)
class Duplicates:
    """Records stored more than once: under one (device, seq) (the schema's primary key rules
    that out; counted anyway), and groups of seqs whose records have the same kind and body
    (the same record delivered under two numbers, or two readings that happen to be equal)."""

    same_seq: int
    same_body: tuple[tuple[int, ...], ...] = ()


def duplicates(cloud_db: Path, device: str) -> Duplicates:
    with _connect(cloud_db) as db:
        same_seq = db.execute(
            "SELECT coalesce(sum(n - 1), 0) FROM (SELECT count(*) AS n FROM records "
            "WHERE device = ? GROUP BY seq HAVING n > 1)",
            (device,),
        ).fetchone()[0]
        groups = db.execute(
            "SELECT group_concat(seq), count(*) AS n FROM records WHERE device = ? "
            "GROUP BY kind, body HAVING n > 1",
            (device,),
        ).fetchall()
    same_body = tuple(tuple(sorted(int(s) for s in g.split(","))) for g, _ in groups)
    return Duplicates(int(same_seq), same_body)


def committed_by_run(logs: Iterable[Path]) -> dict[int, list[int]]:
    """seq -> the runs (indexes into ``logs``) that logged it as committed."""
    out: dict[int, list[int]] = {}
    for i, log in enumerate(logs):
        for seq in committed_in(log):
            out.setdefault(seq, []).append(i)
    return out


def separate_commits(group: tuple[int, ...], runs: dict[int, list[int]]) -> bool:
    """Whether each seq of a same-body group was logged as committed by its own run, one run
    each: then every copy was a reading of its own (the simulated rig's clock starts anew at
    each run and, 8x fast, revisits times an earlier run covered, where the synthetic pump gives
    the same value), not one record delivered twice."""
    owners = [runs.get(seq, []) for seq in group]
    return all(len(o) == 1 for o in owners) and len({o[0] for o in owners}) == len(group)


def records_by_seq(cloud_db: Path, device: str, seqs: Iterable[int]) -> dict[int, bytes]:
    """The stored bodies of ``seqs`` (those that are stored)."""
    out: dict[int, bytes] = {}
    wanted = sorted(seqs)
    with _connect(cloud_db) as db:
        for i in range(0, len(wanted), 500):
            chunk = wanted[i : i + 500]
            marks = ",".join("?" * len(chunk))
            rows = db.execute(
                f"SELECT seq, body FROM records WHERE device = ? AND seq IN ({marks})",
                (device, *chunk),
            )
            out.update({seq: bytes(body) for seq, body in rows})
    return out


# -- the agent's queue -----------------------------------------------------------------------


def queued_seqs(queue_db: Path) -> set[int] | None:
    """The seqs a stopped agent's queue still holds (None if it cannot be read)."""
    if not queue_db.exists():
        return set()
    try:
        with _connect(queue_db, readonly=False) as db:
            return {r[0] for r in db.execute("SELECT seq FROM records")}
    except sqlite3.Error:
        return None
