"""``edge-agent demo``: the reference pump rig on simulated parts, with live readings.

Every sensor of the packaged rig config runs its real driver against a register-level simulator,
fed by the synthetic pump model (or a SKAB replay). Each reading is printed as it arrives, with the
part that produced it. SIGINT or SIGTERM stops it cleanly (exit 0).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
from pathlib import Path
from typing import TextIO

from agent import config as configmod
from agent import logsetup
from agent.clock import RealClock
from drivers.base import Reading


class ReadingPrinter:
    """Prints one line per reading: time, sensor, part, channel values with units."""

    def __init__(self, cfg: configmod.Config, out: TextIO, t0: float) -> None:
        self.out = out
        self.t0 = t0
        self.parts = {s.name: s.driver for s in cfg.sensors}
        self.units = {
            (s.name, ch): " " + sc.unit
            for s in cfg.sensors
            for ch, sc in s.scaling.items()
            if sc.unit
        }

    def __call__(self, reading: Reading) -> None:
        values = "  ".join(
            f"{ch}={v:.4f}{self.units.get((reading.sensor, ch), '')}"
            for ch, v in reading.values.items()
        )
        part = self.parts.get(reading.sensor, "?")
        self.out.write(
            f"{reading.t_mono - self.t0:8.1f}s  {reading.sensor:<10} {part:<8} {values}\n"
        )
        self.out.flush()


def run_demo(args: argparse.Namespace) -> int:
    from agent.cli import example_config
    from agent.runtime import Agent
    from drivers.sim.rig import SimRig

    path = Path(args.config) if args.config else example_config()
    if not args.simulate:
        args.simulate = "pump"
    cfg = configmod.load(path)
    cfg = configmod.simulated(cfg, _simulation(args))
    workdir = Path(args.data_dir) if args.data_dir else Path(tempfile.mkdtemp(prefix="edge-demo-"))
    cfg = configmod.replace_data_dir(cfg, workdir)
    logsetup.setup("warning")
    out = sys.stdout
    out.write(
        f"edge-agent demo: {len(cfg.sensors)} sensors of {path.name} on simulated parts "
        f"({cfg.simulation.source if cfg.simulation else '?'} source); Ctrl-C stops\n"
    )

    async def main() -> None:
        clock = RealClock()
        rig = SimRig(cfg, clock)
        agent = Agent(
            cfg, clock=clock, rig=rig, on_reading=ReadingPrinter(cfg, out, clock.monotonic())
        )
        if args.seconds:
            asyncio.get_running_loop().call_later(args.seconds, agent.request_stop)
        try:
            await agent.run()
        finally:
            rig.close()
        out.write(f"edge-agent demo: stopped after {agent.readings} readings\n")

    asyncio.run(main())
    return 0


def _simulation(args: argparse.Namespace) -> configmod.SimulationConfig:
    from agent.cli import _simulation as from_args

    sim = from_args(args)
    assert sim is not None
    return sim
