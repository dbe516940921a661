"""``edge-agent demo``: the reference pump rig on simulated parts, syncing with a local cloud.

Every sensor of the packaged rig config runs its real driver against a register-level simulator,
fed by the synthetic pump model (or a SKAB replay). A reference cloud endpoint runs on loopback
(``--link lossy|poor`` puts the impairment proxy between them), with the device registered and a
model signing key made, as README's "From the demo to your rig" does by hand.

What it prints (stdout): one summary line a second (readings per second, the device's queue, the
link, the detector and its last score, what the endpoint holds), and a line for each event: the
detector commissioned, the fault injected, each ``ALERT`` (naming the rig's channels, such as
``flow/flow_lpm``) once it reached the endpoint. ``--verbose`` prints every reading instead, with
the part it came from, and a ``cloud`` line every five seconds.

Its files live in a temporary directory (``/tmp/edge-demo-*``) that is removed at exit, on Ctrl-C
too; ``--data-dir DIR`` keeps them in DIR instead. SIGINT or SIGTERM stops it cleanly (exit 0).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import math
import shutil
import sys
import tempfile
from collections.abc import Mapping
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
SUMMARY_EVERY = 1.0  # seconds between summary lines
REPORT_EVERY = 5.0  # seconds between cloud lines (--verbose)
TOOLS = Path(__file__).resolve().parents[2] / "tools"
#: --link: what the impairment proxy does to each direction
LINKS: dict[str, dict[str, float]] = {
    "lossy": {"delay": 0.075, "jitter": 0.01, "loss": 0.05},
    "poor": {"delay": 0.3, "jitter": 0.05, "loss": 0.3},
}


class ReadingPrinter:
    """``--verbose``: one line per reading: time, sensor, part, channel values with units."""

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


def rig_channels(cfg: configmod.Config) -> dict[str, str]:
    """Model channel (a SKAB column such as ``Volume Flow RateRMS``) -> the rig's
    ``sensor/channel`` that feeds it (``flow/flow_lpm``), from ``[detect.inputs]``."""
    if cfg.detect is None:
        return {}
    return {model: f"{sensor}/{channel}" for model, (sensor, channel) in cfg.detect.inputs.items()}


def run_demo(args: argparse.Namespace) -> int:
    path = Path(args.config) if args.config else configmod.example_config()
    if not args.simulate:
        args.simulate = "pump"
    cfg = configmod.load(path)
    cfg = configmod.simulated(cfg, _simulation(args))
    made = None if args.data_dir else Path(tempfile.mkdtemp(prefix="edge-demo-"))
    workdir = Path(args.data_dir) if args.data_dir else made
    assert workdir is not None
    try:
        cfg = configmod.replace_data_dir(cfg, workdir)
        if made is None:
            from agent.service.datadir import prepare_data_dir

            prepare_data_dir(cfg)
        if cfg.detect is not None:  # a demo commissions in a minute, not in the model's 400
            detect = replace(cfg.detect.detect, commissioning_samples=DEMO_COMMISSIONING)
            cfg = replace(cfg, detect=replace(cfg.detect, detect=detect))
        logsetup.setup("warning")
        if args.no_cloud:  # asked for: no need to be told that nothing leaves the device
            logging.getLogger("agent.service.advice").setLevel(logging.ERROR)
        out = sys.stdout
        out.write(
            f"edge-agent demo: {len(cfg.sensors)} sensors of {path.name} on simulated parts "
            f"({cfg.simulation.source if cfg.simulation else '?'} source); Ctrl-C stops\n"
        )
        readings = asyncio.run(_main(args, cfg, workdir, out))
        gone = f"; removed {made}" if made is not None else f"; files in {workdir}"
        out.write(f"edge-agent demo: stopped after {readings} readings{gone}\n")
    finally:
        if made is not None:
            shutil.rmtree(made, ignore_errors=True)
    return 0


async def _main(args: argparse.Namespace, cfg: configmod.Config, workdir: Path, out: TextIO) -> int:
    from agent.sense.simrig import SimRig
    from agent.service.runtime import Agent

    clock = RealClock()
    server = proxy = None
    if not args.no_cloud:
        from agent.modelstore.signing import write_keypair
        from cloud.server import CloudServer

        server = await CloudServer.start(workdir / "cloud", "127.0.0.1", 0)
        credential = workdir / "credential.json"  # what tools/flash puts on a device
        (await server.register(cfg.agent.device_id)).write(credential)
        key = workdir / "cloud" / "models" / "signing.key"  # `models keygen`
        if not key.exists():
            write_keypair(key)
        cfg = replace(cfg, models=replace(cfg.models, public_key=Path(f"{key}.pub")))
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
    if not args.verbose:
        out.write("edge-agent demo: one line a second (--verbose: every reading)\n")
    out.flush()
    rig = SimRig(cfg, clock)
    printer = ReadingPrinter(cfg, out, clock.monotonic()) if args.verbose else None
    agent = Agent(cfg, clock=clock, rig=rig, on_reading=printer)
    loop = asyncio.get_running_loop()
    if args.seconds:
        loop.call_later(args.seconds, agent.request_stop)
    view = DemoView(agent, server, out, clock, rig=rig, fault=args.fault, fault_at=args.fault_at)
    reporter = loop.create_task(view.run(verbose=args.verbose))
    try:
        await agent.run()
    finally:
        rig.close()
        reporter.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reporter
        if proxy is not None:
            await proxy.stop()
        if server is not None:
            out.write(_cloud_line(agent, await server.counts(cfg.agent.device_id), clock) + "\n")
            await server.stop()
    return agent.readings


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


class DemoView:
    """The demo's lines besides the readings: the summary, events, alerts."""

    def __init__(
        self,
        agent: Any,
        server: Any,
        out: TextIO,
        clock: RealClock,
        *,
        rig: Any = None,
        fault: str | None = None,
        fault_at: float = 0.0,
    ) -> None:
        self.agent = agent
        self.server = server
        self.out = out
        self.clock = clock
        self.rig = rig
        self.fault = fault
        self.fault_at = fault_at
        self.names = rig_channels(agent.config)
        self.device = agent.config.agent.device_id
        self.seen_alerts: set[int] = set()
        self.since: float | None = None  # alerts before this time have been shown
        self.commissioned = False
        self.fault_said = False
        self.local_alert: Any = None  # without an endpoint: the last alert shown

    def stamp(self) -> str:
        return f"{self.clock.monotonic() - self.agent.started:8.1f}s"

    def write(self, line: str) -> None:
        self.out.write(line + "\n")
        self.out.flush()

    async def run(self, *, verbose: bool) -> None:
        last_readings, last_cloud = self.agent.readings, self.clock.monotonic()
        while True:
            await asyncio.sleep(SUMMARY_EVERY)
            self.events()
            stored = await self.server.counts(self.device) if self.server else {}
            if self.server is not None:
                await self.alerts(stored)
            elif self.agent.analyzer is not None:
                self.local_alerts()
            readings = self.agent.readings
            if verbose:
                if self.clock.monotonic() - last_cloud >= REPORT_EVERY and self.server:
                    last_cloud = self.clock.monotonic()
                    self.write(_cloud_line(self.agent, stored, self.clock))
            else:
                self.write(self.summary(readings - last_readings, stored))
            last_readings = readings

    def summary(self, readings: int, stored: Mapping[str, int]) -> str:
        a = self.agent
        queue = a.last_stats.depth if a.last_stats else 0
        link = a.link_status()
        rtt = f" (rtt {link['rtt_ms']:.0f} ms)" if link.get("rtt_ms") is not None else ""
        cloud = f"  endpoint {sum(stored.values())} records" if self.server else ""
        return (
            f"{self.stamp()}  {readings / SUMMARY_EVERY:.0f} readings/s  queue {queue}  "
            f"link {link.get('state', '?')}{rtt}{cloud}  detector {self.detector()}"
        )

    def detector(self) -> str:
        analyzer = self.agent.analyzer
        if analyzer is None:
            return "off"
        s = analyzer.status()
        if not s["commissioned"]:
            return f"commissioning {min(s['samples'], DEMO_COMMISSIONING)}/{DEMO_COMMISSIONING}"
        score = s["last_score"]
        threshold = s["threshold"]
        shown = "-" if score is None or not math.isfinite(score) else f"{score:.2f}"
        state = "ANOMALOUS" if s["anomalous"] else "normal"
        return f"{state}, score {shown} (threshold {threshold:.2f})"

    def events(self) -> None:
        analyzer = self.agent.analyzer
        if analyzer is not None and not self.commissioned and analyzer.status()["commissioned"]:
            self.commissioned = True
            s = analyzer.status()
            self.write(
                f"{self.stamp()}  detector commissioned on {DEMO_COMMISSIONING} samples of normal "
                f"running: scoring every row from now (threshold {s['threshold']:.2f})"
            )
        rig = self.rig
        if self.fault and not self.fault_said and rig is not None and rig.elapsed >= self.fault_at:
            self.fault_said = True
            self.write(f"{self.stamp()}  fault injected: {self.fault} (ramps up over 20 s)")

    async def alerts(self, stored: Mapping[str, int]) -> None:
        """Each new alert once it has arrived at the endpoint."""
        if stored.get("alert", 0) <= len(self.seen_alerts):  # only then read records
            return
        for rec in await self.server.records(self.device, since=self.since):
            if rec.kind == "alert" and rec.seq not in self.seen_alerts:
                self.seen_alerts.add(rec.seq)
                self.since = rec.time if self.since is None else max(self.since, rec.time)
                self.write(self.alert_line(rec.body, f"arrived at the endpoint, seq {rec.seq}"))

    def local_alerts(self) -> None:
        last = self.agent.analyzer.last_alert
        if last is not None and last is not self.local_alert:
            self.local_alert = last
            self.write(self.alert_line(last, f"raised on the device, seq {last.get('seq')}"))

    def alert_line(self, body: bytes | Mapping[str, Any], where: str) -> str:
        return f"{self.stamp()}  ALERT      {alert_text(body, self.names)} ({where})"


def alert_text(body: bytes | Mapping[str, Any], names: Mapping[str, str]) -> str:
    """An alert (its CBOR record body, or its dict) in words, its channels named as the rig
    names them (``names``: model channel -> ``sensor/channel``, :func:`rig_channels`)."""
    from agent.wire.records import AlertBody

    if isinstance(body, bytes | bytearray):
        try:
            a = AlertBody.from_cbor(bytes(body)).data
        except ValueError:
            return "(undecodable)"
    else:
        a = dict(body)
    if a.get("kind") == "clear":
        return "cleared"
    top = ", ".join(names.get(str(c[0]), str(c[0])) for c in a.get("channels", [])[:3])
    if a.get("kind") == "change":
        when = a.get("time_to_detect")
        since = f", {when:.0f} s after it began" if isinstance(when, int | float) else ""
        return f"process changed{since} ({a.get('verdict')}); moved: {top}"
    fault = f" ({a['fault']})" if a.get("fault") else ""
    return (
        f"{a.get('verdict')}{fault} score {a.get('score', 0):.2f} > "
        f"{a.get('threshold', 0):.2f}; top channels: {top}"
    )


def _cloud_line(agent: Any, stored: dict[str, int], clock: RealClock) -> str:
    link = agent.snapshot().get("link") or {}
    queue = agent.last_stats.depth if agent.last_stats else 0
    kinds = ", ".join(f"{k} {n}" for k, n in sorted(stored.items())) or "nothing yet"
    rtt = f" rtt {link['rtt_ms']:.0f} ms" if link.get("rtt_ms") is not None else ""
    return (
        f"{clock.monotonic() - agent.started:8.1f}s  cloud      stored: {kinds}; "
        f"queued on the device {queue}; link {link.get('state', '?')}{rtt}"
    )


def _simulation(args: argparse.Namespace) -> configmod.SimulationConfig:
    sim = configmod.simulation_from_args(args)
    assert sim is not None
    return sim
