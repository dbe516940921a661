"""``edge-agent demo``: the reference pump rig on simulated parts, syncing with a local cloud.

Every sensor of the packaged rig config runs its real driver against a register-level simulator,
fed by the synthetic pump model (or a SKAB replay). Each reading is printed as it arrives, with the
part that produced it. A reference cloud endpoint runs on loopback (``--link lossy|poor`` puts the
impairment proxy between them); every few seconds a ``cloud`` line shows what has arrived there,
and an ``ALERT`` line each alert the on-device detector raised, once it reached the endpoint.
SIGINT or SIGTERM stops it cleanly (exit 0).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any, TextIO

from agent import logsetup
from agent.errors import ConfigError
from agent.service import config as configmod
from agent.sync.uplink import UplinkSettings
from drivers.base import Reading
from drivers.clock import RealClock

DEMO_COMMISSIONING = 60  # samples (seconds) of normal running before the detector scores
REPORT_EVERY = 5.0  # seconds between cloud lines
TOOLS = Path(__file__).resolve().parents[2] / "tools"
#: --link: what the impairment proxy does to each direction
LINKS: dict[str, dict[str, float]] = {
    "lossy": {"delay": 0.075, "jitter": 0.01, "loss": 0.05},
    "poor": {"delay": 0.3, "jitter": 0.05, "loss": 0.3},
}


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
    path = Path(args.config) if args.config else configmod.example_config()
    if not args.simulate:
        args.simulate = "pump"
    cfg = configmod.load(path)
    cfg = configmod.simulated(cfg, _simulation(args))
    workdir = Path(args.data_dir) if args.data_dir else Path(tempfile.mkdtemp(prefix="edge-demo-"))
    cfg = configmod.replace_data_dir(cfg, workdir)
    if cfg.detect is not None:  # a demo commissions in a minute, not in the model's 400 samples
        detect = replace(cfg.detect.detect, commissioning_samples=DEMO_COMMISSIONING)
        cfg = replace(cfg, detect=replace(cfg.detect, detect=detect))
    logsetup.setup("warning")
    out = sys.stdout
    out.write(
        f"edge-agent demo: {len(cfg.sensors)} sensors of {path.name} on simulated parts "
        f"({cfg.simulation.source if cfg.simulation else '?'} source); Ctrl-C stops\n"
    )
    asyncio.run(_main(args, cfg, workdir, out))
    return 0


async def _main(
    args: argparse.Namespace, cfg: configmod.Config, workdir: Path, out: TextIO
) -> None:
    from agent.sense.simrig import SimRig
    from agent.service.runtime import Agent

    clock = RealClock()
    server = proxy = None
    if not args.no_cloud:
        from cloud.server import CloudServer

        server = await CloudServer.start(workdir / "cloud", "127.0.0.1", 0)
        credential = workdir / "credential.json"  # what tools/flash puts on a device
        (await server.register(cfg.agent.device_id)).write(credential)
        port = server.port
        if args.link != "clean":
            proxy = await _start_proxy(args.link, port)
            port = proxy.port
        uplink = UplinkSettings(endpoints=(f"coap://127.0.0.1:{port}",), credential=credential)
        cfg = replace(cfg, uplink=uplink)
        out.write(
            f"edge-agent demo: cloud endpoint coap://127.0.0.1:{server.port}, OSCORE (data in "
            f"{workdir / 'cloud'}), link {args.link}"
            + (f" through the impairment proxy on port {proxy.port}" if proxy else "")
            + "\n"
        )
    if cfg.detect is not None:
        out.write(
            f"edge-agent demo: the detector commissions on the first {DEMO_COMMISSIONING} s "
            "of normal running"
            + ("" if args.fault else "; add --fault valve_closing --fault-at 90 to see an alert")
            + "\n"
        )
    rig = SimRig(cfg, clock)
    agent = Agent(cfg, clock=clock, rig=rig, on_reading=ReadingPrinter(cfg, out, clock.monotonic()))
    loop = asyncio.get_running_loop()
    if args.seconds:
        loop.call_later(args.seconds, agent.request_stop)
    reporter = loop.create_task(_report(agent, server, out, clock)) if server else None
    try:
        await agent.run()
    finally:
        rig.close()
        if reporter is not None:
            reporter.cancel()
        if proxy is not None:
            await proxy.stop()
        if server is not None:
            out.write(_cloud_line(agent, await server.counts(cfg.agent.device_id), clock) + "\n")
            await server.stop()
    out.write(f"edge-agent demo: stopped after {agent.readings} readings\n")


async def _start_proxy(link: str, port: int) -> Any:
    """The checkout's impairment proxy (tools/linkem.py) in front of the endpoint."""
    tools = TOOLS
    if not (tools / "linkem.py").is_file():
        raise ConfigError("--link", "", "needs tools/linkem.py of a source checkout")
    sys.path.insert(0, str(tools))
    from linkem import Impairment, LinkEmulator

    imp = Impairment(**LINKS[link])
    proxy = LinkEmulator(listen=("127.0.0.1", 0), target=("127.0.0.1", port), impairment=imp)
    await proxy.start()
    return proxy


def _cloud_line(agent: Any, stored: dict[str, int], clock: RealClock) -> str:
    link = agent.snapshot().get("link") or {}
    queue = agent.last_stats.depth if agent.last_stats else 0
    kinds = ", ".join(f"{k} {n}" for k, n in sorted(stored.items())) or "nothing yet"
    rtt = f" rtt {link['rtt_ms']:.0f} ms" if link.get("rtt_ms") is not None else ""
    return (
        f"{clock.monotonic() - agent.started:8.1f}s  cloud      stored: {kinds}; "
        f"queued on the device {queue}; link {link.get('state', '?')}{rtt}"
    )


async def _report(agent: Any, server: Any, out: TextIO, clock: RealClock) -> None:
    """Every few seconds: what the endpoint holds, and each new alert as it arrives there."""
    device = agent.config.agent.device_id
    seen_alerts: set[int] = set()
    since: float | None = None  # alerts before this time have been shown
    while True:
        await asyncio.sleep(REPORT_EVERY)
        stored = await server.counts(device)
        if stored.get("alert", 0) > len(seen_alerts):  # only then read records
            for rec in await server.records(device, since=since):
                if rec.kind == "alert" and rec.seq not in seen_alerts:
                    seen_alerts.add(rec.seq)
                    since = rec.time if since is None else max(since, rec.time)
                    out.write(_alert_line(agent, rec, clock) + "\n")
        out.write(_cloud_line(agent, stored, clock) + "\n")
        out.flush()


def _alert_line(agent: Any, rec: Any, clock: RealClock) -> str:
    from agent.wire.records import AlertBody

    try:
        a = AlertBody.from_cbor(rec.body).data
    except ValueError:
        return f"{clock.monotonic() - agent.started:8.1f}s  ALERT      seq {rec.seq} (undecodable)"
    top = ", ".join(str(c[0]) for c in a.get("channels", [])[:3])
    fault = f" ({a['fault']})" if a.get("fault") else ""
    return (
        f"{clock.monotonic() - agent.started:8.1f}s  ALERT      {a.get('kind')} "
        f"{a.get('verdict')}{fault} score {a.get('score', 0):.2f} > {a.get('threshold', 0):.2f}"
        f"  top: {top}  (arrived at the cloud, seq {rec.seq})"
    )


def _simulation(args: argparse.Namespace) -> configmod.SimulationConfig:
    sim = configmod.simulation_from_args(args)
    assert sim is not None
    return sim
