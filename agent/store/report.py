"""The operator's ``edge-agent queue`` report: reads the queue file without its lock (the agent
may be running) and formats what it holds.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from agent.errors import StoreError
from agent.store.dbfile import examine_header, file_size
from agent.store.setaside import SetAside
from agent.store.settings import BUSY_TIMEOUT_SECONDS, CODE_KIND, StoreSettings
from agent.wire.records import Kind
from drivers.clock import Clock, RealClock

__all__ = ["format_report", "queue_report", "read_report"]


def _connect_readonly(path: Path, wal: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(
        f"file:{path}?mode=ro", uri=True, isolation_level=None, timeout=BUSY_TIMEOUT_SECONDS
    )
    try:
        conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
        return conn
    except sqlite3.OperationalError:
        conn.close()
        if wal.exists() and wal.stat().st_size:
            raise
    # No WAL with content, so no writer: read the file as it is without creating -wal/-shm
    # (which a user without write access to the directory cannot).
    return sqlite3.connect(
        f"file:{path}?mode=ro&immutable=1",
        uri=True,
        isolation_level=None,
        timeout=BUSY_TIMEOUT_SECONDS,
    )


def read_report(settings: StoreSettings, wall_now: float | None = None) -> dict[str, Any]:
    """What ``edge-agent queue`` shows, read without taking the queue's lock (the agent may be
    running): depth and payload bytes by kind, eviction counters, the oldest record's age, file
    sizes. Raises StoreError when the file is missing or unreadable."""
    path = settings.path
    wall_now = time.time() if wall_now is None else wall_now
    if not path.exists():
        raise StoreError(f"no queue at {path} (the agent has not run with this config yet)")
    reason = examine_header(path)
    if reason is not None:
        raise StoreError(
            f"the queue {path} is damaged: {reason}; the agent moves it aside at start"
        )
    try:
        conn = _connect_readonly(path, settings.wal_path)
        try:
            conn.execute("BEGIN")
            kinds = {
                CODE_KIND[c]: {"depth": n, "bytes": b, "evicted": e}
                for c, n, b, e in conn.execute("SELECT kind, depth, bytes, evicted FROM kinds")
                if c in CODE_KIND
            }
            meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
            oldest = conn.execute(
                "SELECT seq, created FROM records ORDER BY seq LIMIT 1"
            ).fetchone()
            page_size = conn.execute("PRAGMA page_size").fetchone()[0]
            free = conn.execute("PRAGMA freelist_count").fetchone()[0]
            conn.execute("COMMIT")
        finally:
            conn.close()
    except sqlite3.Error as err:
        raise StoreError(f"cannot read the queue {path}: {err}") from err
    db_bytes, wal_bytes = file_size(path), file_size(settings.wal_path)
    aside = SetAside(settings.set_aside_path).stats()
    return {
        "path": str(path),
        "budget_bytes": settings.budget_bytes,
        "durability": settings.durability,
        "kinds": {str(k): kinds.get(k, {"depth": 0, "bytes": 0, "evicted": 0}) for k in Kind},
        "depth": sum(v["depth"] for v in kinds.values()),
        "payload_bytes": sum(v["bytes"] for v in kinds.values()),
        "oldest_seq": None if oldest is None else oldest[0],
        "oldest_age_s": None if oldest is None else max(0.0, wall_now - oldest[1]),
        "last_seq": int(meta.get("seq_hwm", 0)),
        "ring_dropped": int(meta.get("ring_dropped", 0)),
        "db_bytes": db_bytes,
        "wal_bytes": wal_bytes,
        "file_bytes": db_bytes + wal_bytes,
        "free_bytes_in_file": free * page_size,
        "set_aside": aside.count,
        "set_aside_path": str(settings.set_aside_path),
    }


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _age(seconds: float) -> str:
    s = int(seconds)
    if s < 120:
        return f"{seconds:.0f} s"
    if s < 3600:
        return f"{s // 60} min {s % 60} s"
    if s < 172800:
        return f"{s // 3600} h {s % 3600 // 60} min"
    return f"{s // 86400} d {s % 86400 // 3600} h"


def format_report(report: Mapping[str, Any]) -> str:
    """The human form of :func:`read_report`."""
    lines = [
        f"queue {report['path']} (durability {report['durability']})",
        f"file {_size(report['file_bytes'])} (db {_size(report['db_bytes'])} + wal "
        f"{_size(report['wal_bytes'])}) of budget {_size(report['budget_bytes'])}, "
        f"{_size(report['free_bytes_in_file'])} free inside",
        f"{'kind':<10} {'depth':>10} {'bytes':>12} {'evicted':>10}",
    ]
    for kind in Kind:
        k = report["kinds"][str(kind)]
        lines.append(f"{kind!s:<10} {k['depth']:>10} {k['bytes']:>12} {k['evicted']:>10}")
    lines.append(f"{'total':<10} {report['depth']:>10} {report['payload_bytes']:>12}")
    if report["oldest_seq"] is None:
        lines.append("oldest record: none (queue empty)")
    else:
        lines.append(
            f"oldest record: seq {report['oldest_seq']}, {_age(report['oldest_age_s'])} old"
        )
    lines.append(f"last seq: {report['last_seq']}")
    if report["ring_dropped"]:
        lines.append(
            f"alerts dropped from the memory ring while the disk was full: {report['ring_dropped']}"
        )
    if report["set_aside"]:
        lines.append(
            f"set aside (refused by the endpoint): {report['set_aside']} in "
            f"{report['set_aside_path']}"
        )
    return "\n".join(lines)


async def queue_report(
    settings: StoreSettings, *, as_json: bool = False, clock: Clock | None = None
) -> str:
    """The text of ``edge-agent queue --config FILE`` (``--json``: one JSON object)."""
    clock = clock or RealClock()
    report = await clock.run_blocking(None, read_report, settings, clock.time())
    return json.dumps(report, sort_keys=True) if as_json else format_report(report)
