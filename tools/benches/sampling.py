"""Bench of the sampling path: drivers + sampler + store on the full simulated rig.

Measured in one run, on the packaged reference rig (8 sensors, 7 kinds of part) under the virtual
clock, so conversion waits cost no real time; the agent's config points its data directory at the
bench's own directory (a new one inside ``--dir``, tools/benches/__init__.py), so nothing is
written to /var/lib/edge-agent:

- readings per second through the whole agent (real seconds of CPU and I/O per reading);
- and where that time goes, per reading, each part measured on its own in the same run:

  - **driver transaction** (the baseline): the same bus traffic issued bare: every I2C transfer
    and serial exchange the drivers made, recorded and replayed synchronously on fresh simulated
    parts at the same virtual times, with no asyncio, no worker threads, no conversions;
  - **worker-thread hop**: one bus call's trip to the bus's worker thread and back
    (``clock.run_blocking`` on a one-thread executor under ``asyncio.timeout``, as
    ``drivers.bus.AsyncI2C.transact`` does) of a no-op, timed under the same virtual-clock loop,
    times the transactions per reading;
  - **store commit**: a put of the agent's mean records per commit into a Store with the
    config's settings in the bench's directory, timed, times the commits per reading (the
    agent's own store counted its commits);
  - **sampler bookkeeping**: the rest (drivers' conversions, asyncio scheduling, the sampler,
    the telemetry writer, the metrics file and the status socket): total minus the three above;

- and, measured in the agent's own run, how its event loop spent the time: waiting in its
  selector (under the virtual clock it waits only while a worker thread has a call in flight: the
  bus transactions, the store's commits and the threads' wake-ups) and running Python (the rest);
  the largest part of the overhead is reported, not assumed.

- ``overhead_ratio`` = time per reading through the agent / time per reading of bare bus calls.

Options: ``--quick`` (60 virtual seconds instead of 300).
"""

from __future__ import annotations

import argparse
import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

from agent.sense.simrig import SimRig
from agent.service import config as configmod
from agent.service.config import example_config
from agent.service.runtime import Agent
from agent.store.queue import NewRecord, Store
from agent.wire.records import Kind
from benches import Result, workdir
from drivers.clock import VirtualClock

MEASURES = (
    "time per reading on the simulated rig, split: driver bus transaction, worker-thread hop, "
    "sampler bookkeeping, store commit (FULL, in --dir)"
)
BASELINE = (
    "the bare bus transactions (the same transfers replayed synchronously on fresh simulated parts)"
)

HOPS = 2000  # worker-thread hops timed
COMMITS_MAX = 200  # store commits timed


def _config(data_dir: Path) -> configmod.Config:
    cfg = configmod.simulated(
        configmod.load(example_config()), configmod.SimulationConfig(source="pump", seed=7)
    )
    cfg = configmod.replace_data_dir(cfg, data_dir)  # never /var/lib/edge-agent
    return replace(cfg, detect=None)  # the sampling path only (bench inference has the detector)


class _Recorder:
    """Records every I2C transfer on the rig's fake bus and every serial exchange, and counts
    the worker-thread hops (one per ``transact``, which may hold several transfers)."""

    def __init__(self, rig: SimRig, clock: VirtualClock) -> None:
        self.clock = clock
        self.hops = 0  # bus calls sent to a bus's or a serial port's worker thread
        run_blocking = clock.run_blocking

        async def counted(executor: Any, fn: Any, *args: Any) -> Any:
            prefix = getattr(executor, "_thread_name_prefix", "") or ""
            if prefix.startswith(("bus-", "serial")):
                self.hops += 1
            return await run_blocking(executor, fn, *args)

        clock.run_blocking = counted  # type: ignore[method-assign]
        self.i2c: list[tuple[float, str, int, int | None, Any]] = []
        bus = rig.bus
        read, write = bus._read, bus._write

        def rec_read(address: int, register: int, length: int) -> bytes:
            self.i2c.append((clock.monotonic(), "r", address, register, length))
            return read(address, register, length)

        def rec_write(address: int, register: int | None, data: bytes) -> None:
            self.i2c.append((clock.monotonic(), "w", address, register, bytes(data)))
            write(address, register, data)

        bus._read, bus._write = rec_read, rec_write  # type: ignore[method-assign]
        self.serial: list[tuple[str, bytes, int]] = []  # (port, request, response length)
        for port in rig.ports.values():
            model = port.model
            answer = model.on_bytes

            def rec(data: bytes, _answer=answer, _name=port.name) -> bytes:
                out = _answer(data)
                self.serial.append((_name, bytes(data), len(out)))
                return out

            model.on_bytes = rec  # type: ignore[method-assign]


class _Waits:
    """Real seconds the event loop sat in its selector waiting (under the virtual clock it waits
    only while a worker thread has a call in flight: a bus transaction, a store commit)."""

    def __init__(self, clock: VirtualClock) -> None:
        self.seconds = 0.0
        make = clock.new_event_loop

        def new_event_loop() -> asyncio.AbstractEventLoop:
            loop = make()
            inner = loop._selector._inner  # type: ignore[attr-defined]
            select = inner.select

            def timed(timeout: float | None = None) -> Any:
                if timeout == 0:
                    return select(0)
                t0 = time.perf_counter()
                try:
                    return select(timeout)
                finally:
                    self.seconds += time.perf_counter() - t0

            inner.select = timed
            return loop

        clock.new_event_loop = new_event_loop  # type: ignore[method-assign]


def _run_agent(
    data_dir: Path, seconds: float, record: bool
) -> tuple[int, float, _Recorder | None, int, float]:
    """Run the agent; (readings, real seconds, recorder, store commits, seconds the loop
    waited on worker threads)."""
    data_dir.mkdir(parents=True)
    cfg = _config(data_dir)
    clock = VirtualClock()
    waits = _Waits(clock)
    count = 0
    commits = 0
    recorder: _Recorder | None = None

    def on_reading(_r: Any) -> None:
        nonlocal count
        count += 1

    async def main() -> None:
        nonlocal recorder
        rig = SimRig(cfg, clock)
        if record:
            recorder = _Recorder(rig, clock)
        agent = Agent(cfg, clock=clock, rig=rig, on_reading=on_reading)

        async def stop() -> None:
            nonlocal commits
            if agent.store is not None:
                commits = (await agent.store.stats()).commits
            agent.request_stop()

        loop = asyncio.get_running_loop()
        loop.call_later(seconds, lambda: loop.create_task(stop()))
        try:
            await agent.run(install_signals=False)
        finally:
            rig.close()

    started = time.perf_counter()
    clock.run(main())
    return count, time.perf_counter() - started, recorder, commits, waits.seconds


def _hop_seconds(n: int) -> float:
    """Mean real seconds of one no-op bus call through a one-thread executor, as
    ``AsyncI2C.transact`` makes it, under the virtual-clock loop."""
    clock = VirtualClock()
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bench-hop")
    out = 0.0

    def noop() -> None:
        return None

    async def main() -> None:
        nonlocal out
        for _ in range(50):  # warm up: the thread started
            await clock.run_blocking(executor, noop)
        started = time.perf_counter()
        for _ in range(n):
            async with asyncio.timeout(1.0):
                await clock.run_blocking(executor, noop)
        out = (time.perf_counter() - started) / n

    try:
        clock.run(main())
    finally:
        executor.shutdown()
    return out


def _commit_seconds(data_dir: Path, per_commit: int, n: int) -> float:
    """Mean real seconds of one Store put of ``per_commit`` records, the config's settings."""
    data_dir.mkdir(parents=True)
    settings = _config(data_dir).store
    records = [NewRecord(Kind.TELEMETRY, bytes(range(64)))] * per_commit

    async def main() -> float:
        st = await Store.open(settings)
        try:
            await st.put(records)  # warm up: the file created
            started = time.perf_counter()
            for _ in range(n):
                await st.put(records)
            return (time.perf_counter() - started) / n
        finally:
            await st.close()

    return asyncio.run(main())


def _replay_bare(data_dir: Path, recorder: _Recorder) -> float:
    """Issue the recorded traffic on fresh parts, synchronously. Returns real seconds."""
    from drivers.bus import open_serial

    data_dir.mkdir(parents=True)
    cfg = _config(data_dir)
    clock = VirtualClock()
    rig = SimRig(cfg, clock)
    bus = rig.bus
    ports = {p.name: open_serial(p.path, baudrate=19200, timeout=1.0) for p in rig.ports.values()}
    try:
        started = time.perf_counter()
        for t, op, address, register, arg in recorder.i2c:
            delta = t - clock.monotonic()
            if delta > 0:
                clock.advance(delta)
            try:
                if op == "r":
                    bus._read(address, register, arg)
                else:
                    bus._write(address, register, arg)
            except OSError:
                pass
        for name, request, length in recorder.serial:
            port = ports[name]
            port.write(request)
            port.read(length)
        return time.perf_counter() - started
    finally:
        for p in ports.values():
            p.close()
        rig.close()


def run(args: argparse.Namespace) -> Result:
    with workdir(args, "sampling") as wd:
        return wd.stamp(_run(wd.path, 60.0 if args.quick else 300.0))


def _run(base: Path, seconds: float) -> Result:
    # warm up imports, caches and the vibration synthesis once
    _run_agent(base / "warm", 5.0, record=False)
    readings, elapsed, _, commits, waited = _run_agent(base / "agent", seconds, record=False)
    readings_rec, _, recorder, _, _ = _run_agent(base / "recorded", seconds, record=True)
    assert recorder is not None
    bare = _replay_bare(base / "bare", recorder)
    transactions = len(recorder.i2c) + len(recorder.serial)
    hop = _hop_seconds(HOPS)
    per_commit = max(1, round(readings / max(1, commits)))
    commit = _commit_seconds(base / "commit", per_commit, min(COMMITS_MAX, max(1, commits)))
    per_reading = elapsed / readings
    bare_per_reading = bare / readings_rec
    hop_per_reading = hop * recorder.hops / readings_rec
    store_per_reading = commit * commits / readings
    rest = per_reading - bare_per_reading - hop_per_reading - store_per_reading
    ratio = per_reading / bare_per_reading
    wait_per_reading = waited / readings  # the loop idle, a worker thread's call in flight
    busy_per_reading = per_reading - wait_per_reading  # Python on the loop
    parts = {
        "driver transaction (bare bus calls, the baseline)": bare_per_reading,
        "worker-thread hop": hop_per_reading,
        "store commit": store_per_reading,
        "sampler bookkeeping (the rest)": rest,
    }
    res = Result()
    res.add("virtual time simulated", f"{seconds:.0f} s", "8 sensors, 7 kinds of part")
    res.add("readings through drivers + sampler", f"{readings}", f"in {elapsed:.2f} s real")
    res.add("readings per second", f"{readings / elapsed:,.0f}", "full simulated rig")
    res.add(
        "bare bus traffic (same transfers)",
        f"{len(recorder.i2c)} I2C + {len(recorder.serial)} serial",
        f"in {bare:.2f} s real; per reading {transactions / readings_rec:.2f} transfers, "
        f"{recorder.hops / readings_rec:.2f} worker-thread hops",
    )
    res.add("time per reading, whole agent", f"{per_reading * 1e3:.3f} ms", "")
    for label, secs in parts.items():
        res.add(
            f"  {label}",
            f"{secs * 1e3:.3f} ms",
            f"{secs / per_reading:.0%} of the total",
        )
    res.add(
        "  (one hop / one commit)",
        f"{hop * 1e6:.1f} us / {commit * 1e3:.3f} ms",
        f"{commits} commits, {per_commit} record(s) each on average",
    )
    res.add("overhead ratio (agent / bare)", f"{ratio:.2f}x", "lower is better")
    res.add(
        "  in the agent: the loop running Python",
        f"{busy_per_reading * 1e3:.3f} ms",
        f"{busy_per_reading / per_reading:.0%} of the total: drivers' conversions, sampler, "
        "writer, the hops' and commits' own scheduling",
    )
    res.add(
        "  in the agent: the loop waiting on worker threads",
        f"{wait_per_reading * 1e3:.3f} ms",
        f"{wait_per_reading / per_reading:.0%} of the total: the bus transactions, the store's "
        f"commits, the threads' wake-ups; beyond the bare transactions "
        f"{(wait_per_reading - bare_per_reading) * 1e3:.3f} ms",
    )
    overhead = {k: v for k, v in parts.items() if not k.startswith("driver")}
    biggest = max(overhead, key=lambda k: overhead[k])
    res.add(
        "largest part of the overhead",
        biggest,
        f"{overhead[biggest] * 1e3:.3f} ms per reading",
    )
    res.notes.append(
        "Each part is measured on its own in this run except the bookkeeping, which is the "
        "total less the other three. The loop's split is measured in the agent's own run: the "
        "time its selector waited (under the virtual clock it waits only while a worker thread "
        "has a call in flight) and the rest."
    )
    res.summary = {
        "readings_per_s": round(readings / elapsed, 1),
        "overhead_ratio": round(ratio, 3),
        "ms_per_reading": round(per_reading * 1e3, 4),
        "baseline_driver_transaction_ms_per_reading": round(bare_per_reading * 1e3, 4),
        "worker_hop_ms_per_reading": round(hop_per_reading * 1e3, 4),
        "store_commit_ms_per_reading": round(store_per_reading * 1e3, 4),
        "sampler_bookkeeping_ms_per_reading": round(rest * 1e3, 4),
        "loop_busy_ms_per_reading": round(busy_per_reading * 1e3, 4),
        "loop_waiting_on_threads_ms_per_reading": round(wait_per_reading * 1e3, 4),
        "worker_hop_us": round(hop * 1e6, 2),
        "store_commit_ms": round(commit * 1e3, 4),
        "store_commits": commits,
        "transfers_per_reading": round(transactions / readings_rec, 3),
        "worker_hops_per_reading": round(recorder.hops / readings_rec, 3),
        **res.summary,
    }
    return res
