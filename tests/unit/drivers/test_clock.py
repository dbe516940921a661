import asyncio
import time

from drivers.clock import RealClock, VirtualClock


def test_virtual_clock_runs_an_hour_of_sleeps_at_once():
    clock = VirtualClock()
    ticks: list[float] = []

    async def main() -> None:
        start = clock.monotonic()
        for _ in range(3600):
            await clock.sleep(1.0)
            ticks.append(clock.monotonic() - start)

    real_start = time.monotonic()
    clock.run(main())
    assert ticks[-1] == 3600.0
    assert len(ticks) == 3600
    # wall time follows monotonic time
    assert abs(clock.time() - (1_700_000_000.0 + 3600.0)) < 1e-6
    assert time.monotonic() - real_start < 60  # sanity, not a speed assertion: the run finished


def test_virtual_clock_holds_still_during_blocking_work():
    clock = VirtualClock()

    async def main() -> tuple[float, str]:
        before = clock.monotonic()

        def work() -> str:
            time.sleep(0.05)
            return "done"

        async with asyncio.timeout(0.01):  # would expire if time jumped during the thread call
            result = await clock.run_blocking(None, work)
        return clock.monotonic() - before, result

    elapsed, result = clock.run(main())
    assert result == "done"
    assert elapsed == 0.0


def test_virtual_clock_orders_concurrent_sleepers():
    clock = VirtualClock()
    order: list[tuple[str, float]] = []

    async def sleeper(name: str, period: float, n: int) -> None:
        for _ in range(n):
            await clock.sleep(period)
            order.append((name, clock.monotonic()))

    async def main() -> None:
        async with asyncio.TaskGroup() as tg:
            tg.create_task(sleeper("a", 1.0, 4))
            tg.create_task(sleeper("b", 1.5, 2))

    clock.run(main())
    times = [t for _, t in order]
    assert times == sorted(times)
    assert [n for n, _ in order].count("a") == 4


async def test_real_clock_sleeps_and_runs_blocking():
    clock = RealClock()
    await clock.sleep(0)
    assert await clock.run_blocking(None, lambda: 41 + 1) == 42
    assert clock.time() > 1_600_000_000
