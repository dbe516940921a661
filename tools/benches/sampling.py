"""Bench of the sampling path: drivers + sampler on the full simulated rig.

Measured side by side in one run, on the packaged reference rig (8 sensors, 7 kinds of part)
under the virtual clock, so conversion waits cost no real time:

- readings per second through drivers and sampler (real seconds of CPU and I/O per reading);
- the same bus traffic issued bare: every I2C transfer and serial exchange the drivers made,
  recorded and replayed synchronously on fresh simulated parts at the same virtual times, with
  no asyncio, no worker threads, no conversions and no sampler;
- ``overhead_ratio`` = time per reading through the sampler / time per reading of bare bus calls.

Options: ``--quick`` (60 virtual seconds instead of 300).
"""

from __future__ import annotations

import argparse
import asyncio
import time
from dataclasses import replace
from typing import Any

from agent.sense.simrig import SimRig
from agent.service import config as configmod
from agent.service.config import example_config
from agent.service.runtime import Agent
from benches import Result
from drivers.clock import VirtualClock


def _config() -> configmod.Config:
    cfg = configmod.simulated(
        configmod.load(example_config()), configmod.SimulationConfig(source="pump", seed=7)
    )
    return replace(cfg, detect=None)  # the sampling path only (bench inference has the detector)


class _Recorder:
    """Records every I2C transfer on the rig's fake bus and every serial exchange."""

    def __init__(self, rig: SimRig, clock: VirtualClock) -> None:
        self.clock = clock
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


def _run_agent(seconds: float, record: bool) -> tuple[int, float, _Recorder | None]:
    cfg = _config()
    clock = VirtualClock()
    count = 0
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
        asyncio.get_running_loop().call_later(seconds, agent.request_stop)
        try:
            await agent.run(install_signals=False)
        finally:
            rig.close()

    started = time.perf_counter()
    clock.run(main())
    return count, time.perf_counter() - started, recorder


def _replay_bare(recorder: _Recorder) -> float:
    """Issue the recorded traffic on fresh parts, synchronously. Returns real seconds."""
    from drivers.bus import open_serial

    cfg = _config()
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
    seconds = 60.0 if args.quick else 300.0
    # warm up imports, caches and the vibration synthesis once
    _run_agent(5.0, record=False)
    readings, elapsed, _ = _run_agent(seconds, record=False)
    readings_rec, _, recorder = _run_agent(seconds, record=True)
    assert recorder is not None
    bare = _replay_bare(recorder)
    per_reading = elapsed / readings
    bare_per_reading = bare / readings_rec
    ratio = per_reading / bare_per_reading
    res = Result()
    res.add("virtual time simulated", f"{seconds:.0f} s", "8 sensors, 7 kinds of part")
    res.add("readings through drivers + sampler", f"{readings}", f"in {elapsed:.2f} s real")
    res.add("readings per second", f"{readings / elapsed:,.0f}", "full simulated rig")
    res.add(
        "bare bus traffic (same transfers)",
        f"{len(recorder.i2c)} I2C + {len(recorder.serial)} serial",
        f"in {bare:.2f} s real",
    )
    res.add("time per reading, sampler path", f"{per_reading * 1e3:.3f} ms", "")
    res.add("time per reading, bare bus calls", f"{bare_per_reading * 1e3:.3f} ms", "")
    res.add("overhead ratio (sampler / bare)", f"{ratio:.2f}x", "lower is better")
    res.notes.append(
        "Both sides run the same simulated parts; the sampler side adds the drivers' "
        "conversions, asyncio scheduling, one worker-thread hop per bus transaction and the "
        "Modbus inter-frame silence."
    )
    res.summary = {
        "readings_per_s": round(readings / elapsed, 1),
        "overhead_ratio": round(ratio, 3),
    }
    return res
