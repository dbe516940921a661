"""Bench of the durable queue (agent/store/), 128-byte payloads, on a real file.

Measured side by side in one run:
- durable puts/s in batches of 1, 100 and 1000, with synchronous=FULL and NORMAL;
- group commit: 100 tasks putting one record each at the same time, against batch-of-1 puts;
- the batch(1000) + ack drain rate;
- our batch-of-1 and batch-of-100 put rates (FULL) against plain ``sqlite3`` writing one row per
  transaction into the same kind of file (same schema and pragmas: WAL, synchronous=FULL),
  interleaved round by round with the batch-1 puts: what one durable commit costs on this
  storage without the store around it;
- our batch-of-1000 put rate against plain ``sqlite3`` executemany of the same rows into the same
  kind of file, interleaved round by round so load on the machine hits both alike;
- the process RSS while the queue grows to 1,000,000 records (several depths: it must be flat).

Options: ``--quick`` smaller sizes; ``--dir DIR``: the files go in a new directory inside DIR
(default: beside the agent's data directory, tools/benches/__init__.py); give a directory on the
device's real storage on a Pi: its fsync rate sets the batch-1 figures.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sqlite3
import time
from pathlib import Path
from typing import Any

from agent.store import dbfile as store_mod
from agent.store.queue import NewRecord, Store
from agent.store.settings import StoreSettings
from agent.wire.records import Kind
from benches import Result, workdir

MEASURES = (
    "durable puts/s in batches of 1, 100, 1000 (FULL and NORMAL), group commit, drain, RSS as "
    "the queue grows (in --dir)"
)
BASELINE = (
    "plain sqlite3, WAL, synchronous=FULL: one row per transaction (beside batch 1 and 100) and"
    " executemany (beside batch 1000)"
)

# What the README claims (checked by the run; a shortfall prints NOT MET)
CLAIM_RATIO_VS_SQLITE_BATCH1000 = 0.5  # store batch-1000 puts / plain executemany
CLAIM_RSS_MB = 50.0  # RSS with the deepest queue measured
CLAIM_RATIO_VS_SQLITE_BATCH1 = 0.5  # store batch-1 puts / plain one-row transactions

PAYLOAD = bytes(range(128))
MIB = 1024 * 1024
BIG_BUDGET = 4096 * MIB  # no eviction during the bench


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def settings_for(directory: Path, durability: str) -> StoreSettings:
    return StoreSettings(
        path=directory / "queue.db", budget_bytes=BIG_BUDGET, durability=durability
    )


def fresh(base: Path, name: str) -> Path:
    d = base / name
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    return d


async def put_rate(st: Store, batch: int, puts: int) -> tuple[int, float]:
    records = [NewRecord(Kind.TELEMETRY, PAYLOAD) for _ in range(batch)]
    started = time.perf_counter()
    for _ in range(puts):
        await st.put(records)
    return batch * puts, time.perf_counter() - started


async def measure_puts(
    base: Path, sizes: dict[int, tuple[int, int]], rounds: int
) -> dict[str, dict[int, float]]:
    """Puts/s per batch size for FULL and NORMAL, interleaved round by round so the machine's
    load falls on both alike; with batch 1 also plain sqlite3, one row per transaction (FULL),
    as ``out["sqlite"][1]``. ``sizes``: batch -> (puts per round FULL, puts per round NORMAL)."""
    out: dict[str, dict[int, float]] = {"full": {}, "normal": {}, "sqlite": {}}
    for batch, (n_full, n_normal) in sizes.items():
        stores = {
            mode: await Store.open(settings_for(fresh(base, f"puts-{mode}-{batch}"), mode))
            for mode in ("full", "normal")
        }
        plain = PlainSqlite(fresh(base, "plain-1")) if batch == 1 else None
        totals = {mode: [0.0, 0.0] for mode in (*stores, "sqlite")}
        for st in stores.values():
            await put_rate(st, batch, 2)  # warm up: file created, caches primed
        if plain is not None:
            plain.put(1, 2)
        for _ in range(rounds):
            for mode, st in stores.items():
                n, secs = await put_rate(st, batch, n_full if mode == "full" else n_normal)
                totals[mode][0] += n
                totals[mode][1] += secs
            if plain is not None:
                n, secs = plain.put(1, n_full)
                totals["sqlite"][0] += n
                totals["sqlite"][1] += secs
        for mode, st in stores.items():
            await st.close()
            out[mode][batch] = totals[mode][0] / totals[mode][1]
        if plain is not None:
            plain.close()
            out["sqlite"][1] = totals["sqlite"][0] / totals["sqlite"][1]
    return out


async def measure_group_commit(base: Path, durability: str, rounds: int) -> tuple[float, float]:
    """100 concurrent single-record puts per round; returns (records/s, commits per round)."""
    st = await Store.open(settings_for(fresh(base, f"group-{durability}"), durability))
    rec = [NewRecord(Kind.TELEMETRY, PAYLOAD)]
    before = (await st.stats()).commits
    started = time.perf_counter()
    for _ in range(rounds):
        await asyncio.gather(*(st.put(rec) for _ in range(100)))
    secs = time.perf_counter() - started
    commits = (await st.stats()).commits - before
    await st.close()
    return 100 * rounds / secs, commits / rounds


async def measure_drain(base: Path, records: int) -> dict[str, float]:
    """batch(1000) + ack records/s for FULL and NORMAL, drained in interleaved chunks."""
    stores = {
        mode: await Store.open(settings_for(fresh(base, f"drain-{mode}"), mode))
        for mode in ("full", "normal")
    }
    totals = {mode: [0, 0.0] for mode in stores}
    for st in stores.values():
        await put_rate(st, 1000, records // 1000)
    active = dict(stores)
    while active:
        for mode, st in list(active.items()):
            started = time.perf_counter()
            for _ in range(10):
                got = await st.batch(1000, 1 << 30)
                if not got:
                    del active[mode]
                    break
                await st.ack([r.seq for r in got])
                totals[mode][0] += len(got)
            totals[mode][1] += time.perf_counter() - started
    for st in stores.values():
        await st.close()
    assert all(n == records for n, _ in totals.values()), totals
    return {mode: n / secs for mode, (n, secs) in totals.items()}


class PlainSqlite:
    """The baseline: the same rows, schema and pragmas, written with executemany, no store."""

    def __init__(self, directory: Path) -> None:
        probe = settings_for(directory, "full")
        self.conn = sqlite3.connect(directory / "plain.db", isolation_level=None)
        c = self.conn
        c.execute(f"PRAGMA page_size = {store_mod.PAGE_SIZE}")
        c.execute("PRAGMA auto_vacuum = INCREMENTAL")
        c.execute("PRAGMA journal_mode = WAL")
        c.execute("PRAGMA synchronous = FULL")
        c.execute(f"PRAGMA journal_size_limit = {probe.wal_limit()}")
        c.execute(f"PRAGMA wal_autocheckpoint = {probe.wal_limit() // (store_mod.PAGE_SIZE + 24)}")
        c.execute(store_mod._SCHEMA[0])  # the records table
        c.execute(store_mod._SCHEMA[1])  # its (priority, seq) index
        self.seq = 0

    def put(self, batch: int, txns: int) -> tuple[int, float]:
        created = time.time()
        started = time.perf_counter()
        for _ in range(txns):
            rows = [(self.seq + i + 1, 3, 30, created, PAYLOAD) for i in range(batch)]
            self.seq += batch
            self.conn.execute("BEGIN IMMEDIATE")
            self.conn.executemany(
                "INSERT INTO records (seq, kind, priority, created, payload) "
                "VALUES (?, ?, ?, ?, ?)",
                rows,
            )
            self.conn.execute("COMMIT")
        return batch * txns, time.perf_counter() - started

    def close(self) -> None:
        self.conn.close()


async def measure_vs_sqlite(base: Path, rounds: int, txns: int) -> tuple[float, float]:
    d = fresh(base, "versus")
    st = await Store.open(settings_for(d, "full"))
    plain = PlainSqlite(d)
    await put_rate(st, 1000, 2)
    plain.put(1000, 2)
    ours_n = ours_s = plain_n = plain_s = 0.0
    for _ in range(rounds):  # interleaved, so the machine's load falls on both alike
        n, s = await put_rate(st, 1000, txns)
        ours_n, ours_s = ours_n + n, ours_s + s
        n, s = plain.put(1000, txns)
        plain_n, plain_s = plain_n + n, plain_s + s
    await st.close()
    plain.close()
    return ours_n / ours_s, plain_n / plain_s


async def measure_rss(base: Path, total: int, steps: int) -> tuple[list[tuple[int, float]], int]:
    st = await Store.open(settings_for(fresh(base, "rss"), "full"))
    records = [NewRecord(Kind.TELEMETRY, PAYLOAD) for _ in range(1000)]
    points = [(0, rss_mb())]
    per_step = total // steps
    for _ in range(steps):
        for _ in range(per_step // 1000):
            await st.put(records)
        await st.batch(1000, 1 << 30)  # the reader's side too
        depth = (await st.stats()).depth
        points.append((depth, rss_mb()))
    stats = await st.stats()
    await st.close()
    return points, stats.file_bytes


def fmt(rate: float) -> str:
    return f"{rate:,.0f}"


def run(args: argparse.Namespace) -> Result:
    with workdir(args, "store") as wd:
        return wd.stamp(asyncio.run(_run(wd.path, bool(getattr(args, "quick", False)))))


async def _run(base: Path, quick: bool) -> Result:
    # batch -> (puts per round with FULL, with NORMAL); NORMAL is faster, so it does more
    sizes = (
        {1: (15, 60), 100: (10, 30), 1000: (5, 10)}
        if quick
        else {1: (60, 400), 100: (30, 100), 1000: (20, 40)}
    )
    rates = await measure_puts(base, sizes, 4)
    full, normal = rates["full"], rates["normal"]
    sqlite1 = rates["sqlite"][1]
    gc_rounds = 5 if quick else 20
    group_full, commits_full = await measure_group_commit(base, "full", gc_rounds)
    group_normal, _ = await measure_group_commit(base, "normal", gc_rounds)
    drain_n = 20_000 if quick else 100_000
    drains = await measure_drain(base, drain_n)
    drain_full, drain_normal = drains["full"], drains["normal"]
    ours, plain = await measure_vs_sqlite(base, 3 if quick else 5, 10 if quick else 20)
    rss_total = 100_000 if quick else 1_000_000
    points, file_bytes = await measure_rss(base, rss_total, 4)
    rss_1m = points[-1][1]
    ratio = ours / plain

    r = Result()
    r.add(
        "plain sqlite3 puts/s, one row per transaction (FULL)",
        fmt(sqlite1),
        "the baseline: one durable commit on this storage, no store",
    )
    for batch in (1, 100, 1000):
        vs = f"; {full[batch] / sqlite1:.2f}x plain sqlite3 one-row" if batch < 1000 else ""
        r.add(
            f"durable puts/s, batch {batch} (FULL)",
            fmt(full[batch]),
            f"NORMAL {fmt(normal[batch])} ({normal[batch] / full[batch]:.1f}x FULL){vs}",
        )
    r.add(
        "puts/s, 100 concurrent 1-record puts (FULL)",
        fmt(group_full),
        f"{group_full / full[1]:.1f}x batch-1 puts (group commit: "
        f"{commits_full:.1f} commits per 100 puts); NORMAL {fmt(group_normal)}",
    )
    r.add(
        "drain records/s, batch(1000) + ack (FULL)",
        fmt(drain_full),
        f"NORMAL {fmt(drain_normal)} ({drain_normal / drain_full:.1f}x)",
    )
    r.add(
        "batch-1000 puts/s: store vs plain sqlite3 executemany",
        f"{fmt(ours)} vs {fmt(plain)}",
        f"ratio {ratio:.2f} (target >= {CLAIM_RATIO_VS_SQLITE_BATCH1000})",
    )
    depth_label = f"{points[-1][0] / 1e6:g}M" if points[-1][0] >= 1e6 else f"{points[-1][0]:,}"
    r.add(
        f"RSS with {depth_label} records queued (MB)",
        f"{rss_1m:.1f}",
        f"target < {CLAIM_RSS_MB:g} MB; by depth: "
        + ", ".join(f"{d:,}: {m:.1f}" for d, m in points),
    )
    r.add(
        f"queue file at {depth_label} records (db + WAL)",
        f"{file_bytes / MIB:.1f} MiB",
        f"{file_bytes / max(1, points[-1][0]):.0f} bytes per 128-byte record",
    )
    r.notes.append(
        "(the fsync latency of the storage sets the FULL figures;"
        f"{' --quick sizes;' if quick else ''} payload 128 bytes)"
    )
    r.claim(
        f"store batch-1000 puts >= {CLAIM_RATIO_VS_SQLITE_BATCH1000}x plain sqlite3 executemany",
        f"{ratio:.2f}x",
        ratio >= CLAIM_RATIO_VS_SQLITE_BATCH1000,
    )
    r.claim(
        f"store batch-1 puts >= {CLAIM_RATIO_VS_SQLITE_BATCH1}x plain sqlite3 one-row commits",
        f"{full[1] / sqlite1:.2f}x",
        full[1] / sqlite1 >= CLAIM_RATIO_VS_SQLITE_BATCH1,
    )
    r.claim(f"RSS < {CLAIM_RSS_MB:g} MB", f"{rss_1m:.1f} MB", rss_1m < CLAIM_RSS_MB)
    summary: dict[str, Any] = {
        "puts_per_s_batch1": round(full[1], 1),
        "puts_per_s_batch100": round(full[100], 1),
        "puts_per_s_batch1000": round(full[1000], 1),
        "drain_per_s": round(drain_full, 1),
        "ratio_vs_sqlite_batch1000": round(ratio, 3),
        "rss_mb_1m": round(rss_1m, 1),
        "rss_mb_by_depth": {str(d): round(m, 1) for d, m in points},
        "normal_puts_per_s_batch1": round(normal[1], 1),
        "normal_puts_per_s_batch100": round(normal[100], 1),
        "normal_puts_per_s_batch1000": round(normal[1000], 1),
        "normal_drain_per_s": round(drain_normal, 1),
        "group_commit_puts_per_s": round(group_full, 1),
        "sqlite_executemany_per_s_batch1000": round(plain, 1),
        "baseline_sqlite_puts_per_s_batch1": round(sqlite1, 1),
        "ratio_batch1_vs_sqlite": round(full[1] / sqlite1, 3),
        "ratio_batch100_vs_sqlite": round(full[100] / sqlite1, 3),
        "records_at_rss": points[-1][0],
        "quick": quick,
    }
    r.summary.update(summary)
    return r
