"""The telemetry writer's commit window, on a real queue under the virtual clock.

An idle writer lets readings gather for ``window`` seconds after the first one and commits them
together (each commit rewrites whole WAL pages and syncs them: flash wear on a device); a busy
one commits back to back as before; a stop commits what waits at once; 0 commits each reading
as it comes.
"""

from __future__ import annotations

import asyncio
import itertools
from pathlib import Path

import pytest

from agent.sense.ingest import TelemetryWriter
from agent.store.queue import Store
from agent.store.settings import StoreSettings
from agent.wire.records import Kind, TelemetryBody
from drivers.base import Reading
from drivers.clock import VirtualClock


def reading(clock: VirtualClock, n: int) -> Reading:
    return Reading("flow", {"flow_lpm": float(n)}, n, clock.monotonic(), clock.time())


def run(tmp_path: Path, window: float, script) -> tuple[dict, list]:
    """Run ``script(writer, clock)`` against a writer on a fresh queue; the queue's stats and
    the committed bodies after the writer stopped."""
    clock = VirtualClock()

    async def main() -> tuple[dict, list]:
        store = await Store.open(StoreSettings(path=tmp_path / "queue.db"), clock=clock)
        writer = TelemetryWriter(store, clock, window=window)
        task = asyncio.create_task(writer.run())
        await script(writer, clock)
        writer.stop()
        await task
        stats = (await store.stats()).to_dict()
        batch = await store.batch(max_records=1000, max_bytes=1 << 20)
        await store.close()
        assert all(r.kind is Kind.TELEMETRY for r in batch)
        return stats, [TelemetryBody.from_cbor(r.payload) for r in batch]

    return clock.run(main())


async def one_per_second(writer: TelemetryWriter, clock: VirtualClock, n: int = 10) -> None:
    """Two readings 0.25 s apart each second (at 0.1 and 0.35 s of it)."""
    for i in range(n):
        await clock.sleep(0.1)
        writer.submit(reading(clock, i))
        await clock.sleep(0.25)
        writer.submit(reading(clock, 100 + i))
        await clock.sleep(0.65)


@pytest.mark.parametrize(("window", "commits"), [(0.0, 20), (0.5, 10), (5.0, 2)])
def test_readings_of_one_window_share_one_commit(
    tmp_path: Path, window: float, commits: int
) -> None:
    stats, bodies = run(tmp_path, window, one_per_second)
    assert len(bodies) == 20  # every reading committed, in the order it came
    assert [b.values["flow_lpm"] for b in bodies] == [
        float(v) for i in range(10) for v in (i, 100 + i)
    ]
    assert stats["commits"] == commits


def test_a_reading_waits_at_most_the_window(tmp_path: Path) -> None:
    waited: list[float] = []

    async def script(writer: TelemetryWriter, clock: VirtualClock) -> None:
        for i in range(5):
            t0 = clock.monotonic()
            writer.submit(reading(clock, i))
            while writer.committed <= i:
                await clock.sleep(0.01)
            waited.append(clock.monotonic() - t0)
            await clock.sleep(3.0)

    run(tmp_path, 2.0, script)
    assert len(waited) == 5 and all(1.99 <= w <= 2.05 for w in waited), waited


def test_a_stop_commits_what_waits_without_waiting_out_the_window(tmp_path: Path) -> None:
    stopped_after: list[float] = []

    async def script(writer: TelemetryWriter, clock: VirtualClock) -> None:
        writer.submit(reading(clock, 1))
        await clock.sleep(0.1)
        t0 = clock.monotonic()
        writer.stop()
        while writer.committed < 1:
            await clock.sleep(0.001)
        stopped_after.append(clock.monotonic() - t0)

    stats, bodies = run(tmp_path, 30.0, script)
    assert len(bodies) == 1 and stats["commits"] == 1
    assert stopped_after[0] < 0.01  # not the 29.9 s left of the window


def test_a_busy_writer_commits_back_to_back(tmp_path: Path) -> None:
    """Readings that queued while a put was committing go in the next put at once: the window
    opens only when the writer was idle, so a backlog never waits again."""
    puts: list[tuple[float, int]] = []

    async def script(writer: TelemetryWriter, clock: VirtualClock) -> None:
        real_put = writer.store.put

        async def slow_put(records):
            puts.append((clock.monotonic(), len(records)))
            await clock.sleep(1.5)  # a slow disk: each commit takes 1.5 s
            return await real_put(records)

        writer.store.put = slow_put  # type: ignore[method-assign]
        for i in range(40):
            writer.submit(reading(clock, i))
            await clock.sleep(0.1)
        await clock.sleep(5.0)

    _stats, bodies = run(tmp_path, 1.0, script)
    assert len(bodies) == 40
    gaps = [b[0] - a[0] for a, b in itertools.pairwise(puts)]
    # the first put after the first window; then each starts as the previous one ends
    assert puts[0][0] == pytest.approx(1001.0)
    assert all(g == pytest.approx(1.5) for g in gaps[:-1]), puts
    assert sum(n for _, n in puts) == 40


@pytest.mark.parametrize("bad", [-1.0, 60.5, float("nan")])
def test_a_window_out_of_range_is_refused(tmp_path: Path, bad: float) -> None:
    with pytest.raises(ValueError, match="commit_window"):
        StoreSettings(path=tmp_path / "q.db", commit_window=bad)
