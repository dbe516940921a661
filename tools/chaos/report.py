"""The result of a chaos run: :class:`Report`, its figures against their targets (:meth:`rows`),
the bench summary (:meth:`summary`, exactly the keys the bench promises) and a printable table.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tools.chaos.attacks import Flood
from tools.chaos.plan import Plan
from tools.chaos.procs import Crash
from tools.chaos.queuedamage import Damage

SUMMARY_KEYS = (
    "sigkills",
    "power_cuts",
    "lost",
    "duplicated",
    "salvaged_ratio",
    "crashes",
    "tracebacks",
    "log_bytes_per_bad_datagram",
)
LOG_BYTES_TARGET = 20.0


@dataclass
class Books:
    """One device's records: what its agent committed and where each one ended up."""

    device: str
    committed: set[int] = field(default_factory=set)  # logged as committed by any run
    stored: set[int] = field(default_factory=set)  # at the endpoint
    destroyed: set[int] = field(default_factory=set)  # unreadable after a corruption, not stored
    pending: set[int] = field(default_factory=set)  # still queued at the end, committed late
    stuck: set[int] = field(default_factory=set)  # still queued at the end, committed early
    queue_unreadable: bool = False  # the final queue could not be read
    drained_to: int = 0  # the highest seq the drain at the end waited for
    same_seq: int = 0  # (device, seq) stored twice
    same_body: list[tuple[int, ...]] = field(default_factory=list)  # one record, several seqs
    equal_readings: list[tuple[int, ...]] = field(default_factory=list)  # see ledger

    @property
    def duplicated(self) -> int:
        return self.same_seq + sum(len(g) - 1 for g in self.same_body)

    @property
    def lost(self) -> set[int]:
        return self.committed - self.stored - self.destroyed - self.pending

    @property
    def unlogged(self) -> set[int]:
        """Stored but never logged as committed (committed in the instant before a kill)."""
        return self.stored - self.committed


@dataclass
class Documents:
    written: int = 0
    unwritable: int = 0  # documents DesiredDoc.from_cbor could not split (none expected)
    seen: int = 0  # of the written revisions, how many the agent logged receiving
    hostile_applied: list[tuple[str, int]] = field(default_factory=list)
    bad_keys: int = 0  # hostile keys written


@dataclass
class DiskPhase:
    ran: bool = False
    fills: int = 0
    ballast_bytes: list[int] = field(default_factory=list)
    restarts_while_full: int = 0
    disk_full_events: int = 0  # agent log: event=disk_full
    dropped_telemetry: int = 0  # agent log: event=store_full lines
    note: str = ""


@dataclass
class Report:
    plan: Plan
    workdir: Path
    elapsed: float = 0.0
    agent_sigkills: int = 0
    endpoint_sigkills: int = 0
    disk_agent_sigkills: int = 0
    power_cuts: int = 0
    cut_pending_bytes: int = 0  # un-synced bytes the power cuts threw away
    cut_rolled_back: int = 0  # namespace operations the power cuts undid
    damages: list[Damage] = field(default_factory=list)
    salvage_lines: list[tuple[int, int | None]] = field(default_factory=list)  # agent's own
    books: list[Books] = field(default_factory=list)
    crashes: list[Crash] = field(default_factory=list)
    tracebacks: dict[Path, int] = field(default_factory=dict)
    flood: Flood = field(default_factory=Flood)
    documents: Documents = field(default_factory=Documents)
    disk: DiskPhase = field(default_factory=DiskPhase)
    seq_conflicts: int = 0  # endpoint log: event=seq_conflict
    drain_seconds: float | None = None  # None: the backlog did not drain in time
    timeline: list[tuple[float, str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # the harness itself failed

    # -- figures ---------------------------------------------------------------------------------

    @property
    def sigkills(self) -> int:
        return self.agent_sigkills + self.endpoint_sigkills + self.disk_agent_sigkills

    @property
    def lost(self) -> int:
        return sum(len(b.lost) for b in self.books)

    @property
    def duplicated(self) -> int:
        return sum(b.duplicated for b in self.books)

    def salvage(self) -> tuple[int, int]:
        """(rows recovered, rows readable) over every corruption: a readable row is recovered
        when it reached the endpoint, or was still queued when a later corruption hit."""
        stored = set().union(*(b.stored for b in self.books[:1]))
        recovered = readable = 0
        for i, d in enumerate(self.damages):
            later = set().union(*(x.rows.keys() for x in self.damages[i + 1 :]))
            readable += len(d.readable)
            recovered += len(d.readable & (stored | later))
        return recovered, readable

    @property
    def salvaged_ratio(self) -> float | None:
        recovered, readable = self.salvage()
        return None if readable == 0 else recovered / readable

    @property
    def log_bytes_per_bad_datagram(self) -> float | None:
        return None if self.flood.sent == 0 else self.flood.log_bytes / self.flood.sent

    @property
    def traceback_count(self) -> int:
        return sum(self.tracebacks.values())

    def summary(self) -> dict[str, Any]:
        ratio = self.salvaged_ratio
        per = self.log_bytes_per_bad_datagram
        return {
            "sigkills": self.sigkills,
            "power_cuts": self.power_cuts,
            "lost": self.lost,
            "duplicated": self.duplicated,
            "salvaged_ratio": None if ratio is None else round(ratio, 4),
            "crashes": len(self.crashes),
            "tracebacks": self.traceback_count,
            "log_bytes_per_bad_datagram": None if per is None else round(per, 2),
        }

    def failures(self) -> list[str]:
        """The targets this run missed (a figure that could not be measured is not one)."""
        s = self.summary()
        out = [f"{k} = {s[k]}" for k in ("lost", "duplicated", "crashes", "tracebacks") if s[k]]
        if s["salvaged_ratio"] is not None and s["salvaged_ratio"] != 1.0:
            out.append(f"salvaged_ratio = {s['salvaged_ratio']}")
        per = s["log_bytes_per_bad_datagram"]
        if per is not None and per > LOG_BYTES_TARGET:
            out.append(f"log_bytes_per_bad_datagram = {per}")
        out.extend(f"harness error: {e}" for e in self.errors)
        return out

    def rows(self) -> list[tuple[str, str, str]]:
        """(metric, value, target or reference) for the table."""
        s = self.summary()
        recovered, readable = self.salvage()
        committed = sum(len(b.committed) for b in self.books)
        stored = sum(len(b.stored) for b in self.books)
        destroyed = sum(len(b.destroyed) for b in self.books)
        pending = sum(len(b.pending) for b in self.books)

        def verdict(ok: bool | None) -> str:
            return "n/a" if ok is None else ("met" if ok else "NOT MET")

        ratio = s["salvaged_ratio"]
        per = s["log_bytes_per_bad_datagram"]
        rows = [
            (
                "SIGKILLs (agent / endpoint / disk agent)",
                str(s["sigkills"]),
                f"{self.agent_sigkills} / {self.endpoint_sigkills} / {self.disk_agent_sigkills}; "
                f"planned {self.plan.agent_kills} / {self.plan.endpoint_kills}",
            ),
            (
                "power cuts",
                str(s["power_cuts"]),
                f"planned {self.plan.power_cuts}; {self.cut_pending_bytes} un-synced bytes and "
                f"{self.cut_rolled_back} namespace ops thrown away",
            ),
            (
                "lost (committed, not stored)",
                str(s["lost"]),
                f"target 0: {verdict(s['lost'] == 0)}; {committed} committed, {stored} stored, "
                f"{destroyed} destroyed by corruption, {pending} still queued at the stop",
            ),
            (
                "duplicated",
                str(s["duplicated"]),
                f"target 0: {verdict(s['duplicated'] == 0)}; same (device, seq) "
                f"{sum(b.same_seq for b in self.books)}, same record under two seqs "
                f"{sum(len(g) - 1 for b in self.books for g in b.same_body)}",
            ),
            (
                "salvaged_ratio (recovered / readable rows)",
                "n/a" if ratio is None else f"{ratio:.4f}",
                f"target 1.0: {verdict(None if ratio is None else ratio == 1.0)}; "
                f"{recovered} / {readable} over {len(self.damages)} corruptions",
            ),
            (
                "crashes",
                str(s["crashes"]),
                f"target 0: {verdict(s['crashes'] == 0)}",
            ),
            (
                "tracebacks in the logs",
                str(s["tracebacks"]),
                f"target 0: {verdict(s['tracebacks'] == 0)}; "
                f"log files with one: {len(self.tracebacks)}",
            ),
            (
                "log bytes per bad datagram",
                "n/a" if per is None else f"{per:.2f}",
                f"target <= {LOG_BYTES_TARGET:g}: "
                f"{verdict(None if per is None else per <= LOG_BYTES_TARGET)}; "
                f"{self.flood.log_bytes} bytes for {self.flood.sent} datagrams",
            ),
        ]
        return rows

    def details(self) -> list[str]:
        """Lines that explain the figures (printed under the table)."""
        out = []
        for b in self.books:
            out.append(
                f"{b.device}: committed {len(b.committed)}, stored {len(b.stored)}, lost "
                f"{len(b.lost)}, destroyed {len(b.destroyed)}, still queued {len(b.pending)} "
                f"(stuck {len(b.stuck)}), stored without a commit line {len(b.unlogged)}"
                + (", final queue unreadable" if b.queue_unreadable else "")
            )
            if b.lost:
                out.append(f"  lost seqs (first 20): {sorted(b.lost)[:20]}")
            if b.same_body:
                out.append(f"  same record under seqs (first 5): {b.same_body[:5]}")
            if b.equal_readings:
                out.append(
                    f"  {len(b.equal_readings)} equal readings committed by two runs each, not "
                    f"counted as duplicates (the simulated clocks of the runs overlap): "
                    f"{b.equal_readings[:3]}"
                )
        for i, d in enumerate(self.damages, 1):
            out.append(
                f"corruption {i}: {len(d.rows)} rows on {len(d.leaves)} leaf pages, pages "
                f"{d.corrupted} overwritten, {len(d.readable)} readable, {len(d.destroyed)} "
                f"destroyed" + (f" ({d.note})" if d.note else "")
            )
        for salvaged, lost in self.salvage_lines:
            out.append(f"agent's salvage line: salvaged={salvaged} lost={lost}")
        f = self.flood
        answers = ", ".join(f"{k} x{v}" for k, v in sorted(f.answers.items())) or "none"
        out.append(
            f"malformed datagrams: {f.sent} sent, answers: {answers}; host UDP receive-buffer "
            f"drops during the flood: {'unknown' if f.rcvbuf_errors is None else f.rcvbuf_errors}"
        )
        d = self.documents
        out.append(
            f"hostile desired documents: {d.written} written ({d.bad_keys} hostile keys), "
            f"{d.seen} seen by the agent, hostile keys applied: {len(d.hostile_applied)}"
            + (f" {d.hostile_applied[:5]}" if d.hostile_applied else "")
            + (f", {d.unwritable} could not be written" if d.unwritable else "")
        )
        k = self.disk
        if k.ran:
            out.append(
                f"disk fill: {k.fills} fill/empty cycles (ballast {k.ballast_bytes} bytes), "
                f"{k.restarts_while_full} restarts on the full disk, {k.disk_full_events} "
                f"disk_full events, {k.dropped_telemetry} store_full drops (never committed)"
            )
        elif k.note:
            out.append(f"disk fill not run: {k.note}")
        out.append(f"endpoint seq conflicts logged: {self.seq_conflicts}")
        out.append(
            "backlog drained in "
            + ("TIMEOUT" if self.drain_seconds is None else f"{self.drain_seconds:.1f} s")
        )
        for c in self.crashes:
            out.append(f"crash: {c.describe()}")
        for path, n in self.tracebacks.items():
            out.append(f"tracebacks: {n} in {path}")
        out.extend(f"error: {e}" for e in self.errors)
        out.extend(f"note: {n}" for n in self.notes)
        return out

    def render(self) -> str:
        rows = [("metric", "value", "target / reference"), *self.rows()]
        widths = [max(len(r[i]) for r in rows) for i in range(3)]
        lines = [f"## chaos (seed {self.plan.seed}, {self.elapsed:.0f} s, files in {self.workdir})"]
        if self.errors:
            lines.append("INCOMPLETE RUN: the harness failed (see the errors); partial figures")
        for i, r in enumerate(rows):
            cells = (c.ljust(w) for c, w in zip(r, widths, strict=True))
            lines.append("| " + " | ".join(cells) + " |")
            if i == 0:
                lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
        lines.extend(self.details())
        return "\n".join(lines)
