"""Gateway tier (docs/gateway.md): uplink bytes per reading with a gateway against the same devices
posting straight to the cloud, in one run; records/s through the gateway with nothing lost or
doubled; downloads of a model version by the gateway; and the time the site's peer state takes
to converge after a partition heals.

What runs, all at once, on loopback:

1. **direct**: N fleet devices (tools/fleet.py: real wire format, real OSCORE; a batch of
   ``--batch`` readings every ``--interval`` s each) -> a byte-counting UDP relay -> the cloud
   endpoint (``edge-agent-cloud serve``, a process);
2. **gateway**: N other devices, provisioned the same way, same load -> a second relay (the
   site's LAN, counted for information) -> the gateway (:class:`agent.gateway.service.Gateway`
   in this process, the shipped ``[gateway]`` defaults unless given) -> a byte-counting relay
   (the uplink) -> the same cloud endpoint;
3. three peer-state replicas (agent/gateway/peers.py: PeerState, PeerServer, PeerSync with a
   UDP proxy between every ordered pair, as tests/e2e/test_gateway_mesh.py) partitioned
   {gw-1} | {gw-2, gw-3} with conflicting writes on both sides, then healed, ``--repeats``
   times: ``convergence_s`` is the median time from the heal until the three replicas encode
   the same state.

How bytes are counted: the relays are tools/linkem.py's LinkEmulator with no impairment, whose
counters are every UDP payload byte (CoAP message with its OSCORE protection, no IP/UDP headers)
in each direction; the bench's subclass also counts them per client port, so that the gateway's
uplink splits into its forwarder's lane and its state relay's lane. The steady window opens
``--warmup`` s after a run's first datagram (every device's Echo round trip is over) and lasts
``--window`` s; ``uplink_bytes_per_reading`` is the bytes through a run's cloud-side relay, both
ways, in the window, over the readings the cloud *stored* for that run's devices in the window.

After the fleets end the gateway drains (its ``forwarded`` count reaches what its store holds)
and both runs are checked against the cloud's storage with the fleet's ``verify``: for the
gateway run, every record the gateway acknowledged to a device must be in the cloud once. Then a
model version (models/skab-ae.tflite) is published and assigned in desired state to every device
behind the gateway; ``model_fetches_per_version`` is the gateway's downloads of it
(``status()["model_fetches"]``) once every device's assignment is mirrored, and the bytes the
uplink relay carried meanwhile are shown beside the model's size.

Options after the name: ``--devices N --interval S --batch N --warmup S --window S
--forward-interval S --desired-poll S --period S --repeats N``; ``--quick``: 50 devices, a
20 s window, peer period 1 s.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benches import Result
from benches import workdir as bench_workdir

MEASURES = (
    "the gateway tier: uplink bytes per reading (gateway <-> cloud), records/s through it, lost"
    " and duplicated records, model downloads per version, peer-state convergence after a heal"
)
BASELINE = (
    "the same number of fleet devices with the same load posting straight to the cloud through"
    " an identical byte-counting relay, concurrently in the same run"
)

RATIO_TARGET = 0.7  # the issue's: uplink bytes per reading, gateway / direct
TOOLS = Path(__file__).resolve().parents[1]
ROOT = TOOLS.parent
MODEL = ROOT / "models" / "skab-ae.tflite"
MODEL_NAME, MODEL_VERSION = "skab-ae", "1.0.0"
GATEWAY = "gw-bench"
DIRECT, RELAYED = "direct", "relayed"  # device name prefixes of the two runs
NODES = ("gw-1", "gw-2", "gw-3")  # the peer-state mesh; gw-1 alone on one side
SETTLE = 120.0  # the longest any wait of the bench may take before it gives up


def _options(args: argparse.Namespace) -> argparse.Namespace:
    from agent.gateway.settings import GatewaySettings

    shipped = GatewaySettings()
    quick = bool(getattr(args, "quick", False))
    p = argparse.ArgumentParser(prog="bench gateway")
    p.add_argument("--devices", type=int, default=50 if quick else 200)
    p.add_argument("--interval", type=float, default=10.0, help="seconds between batches")
    p.add_argument("--batch", type=int, default=10, help="readings per batch")
    p.add_argument("--warmup", type=float, default=12.0 if quick else 15.0)
    p.add_argument("--window", type=float, default=20.0 if quick else 60.0)
    p.add_argument("--forward-interval", type=float, default=shipped.forward_interval)
    p.add_argument("--desired-poll", type=float, default=shipped.desired_poll)
    p.add_argument("--period", type=float, default=1.0 if quick else 5.0, help="peer sync")
    p.add_argument("--repeats", type=int, default=3, help="partitions healed")
    p.add_argument("--sim-processes", type=int, default=1, help="fleet processes per run")
    p.add_argument("--dir", help="where the bench's files go (default: see tools/benches)")
    return p.parse_args(getattr(args, "extra", []) or [])


# -- counting relays --------------------------------------------------------------------------


@dataclass(frozen=True)
class Traffic:
    """Datagrams and bytes through a relay, each way; ``flows``: per client port, (up packets,
    up bytes, down packets, down bytes)."""

    up_packets: int = 0
    up_bytes: int = 0
    down_packets: int = 0
    down_bytes: int = 0
    flows: dict[int, tuple[int, int, int, int]] = field(default_factory=dict)

    @property
    def bytes(self) -> int:
        return self.up_bytes + self.down_bytes

    @property
    def packets(self) -> int:
        return self.up_packets + self.down_packets

    def __sub__(self, other: Traffic) -> Traffic:
        flows = {port: _minus(now, other.flows.get(port)) for port, now in self.flows.items()}
        return Traffic(
            self.up_packets - other.up_packets,
            self.up_bytes - other.up_bytes,
            self.down_packets - other.down_packets,
            self.down_bytes - other.down_bytes,
            flows,
        )

    def of(self, ports: Sequence[int]) -> tuple[int, int, int, int]:
        """The flows of ``ports`` together."""
        rows = [self.flows[p] for p in ports if p in self.flows]
        up_p, up_b, down_p, down_b = (sum(r[i] for r in rows) for i in range(4))
        return up_p, up_b, down_p, down_b


def _minus(
    a: tuple[int, int, int, int], b: tuple[int, int, int, int] | None
) -> tuple[int, int, int, int]:
    if b is None:
        return a
    return (a[0] - b[0], a[1] - b[1], a[2] - b[2], a[3] - b[3])


def counting_relay(target_port: int) -> Any:
    """A LinkEmulator (no impairment) from a free loopback port to ``target_port`` that also
    counts each client port's datagrams and bytes."""
    from linkem import Impairment, LinkEmulator

    class CountingRelay(LinkEmulator):
        def __init__(self) -> None:
            super().__init__(("127.0.0.1", 0), ("127.0.0.1", target_port), Impairment(), seed=0)
            self.per_port: dict[int, list[int]] = {}

        def _ingress(self, d: Any, flow: Any, data: bytes) -> None:
            c = self.per_port.setdefault(int(flow.client[1]), [0, 0, 0, 0])
            i = 0 if d.name == "up" else 2
            c[i] += 1
            c[i + 1] += len(data)
            super()._ingress(d, flow, data)

        def traffic(self) -> Traffic:
            up, down = self.counters("up"), self.counters("down")
            flows = {port: (a, b, c, d) for port, (a, b, c, d) in self.per_port.items()}
            return Traffic(up.packets_in, up.bytes_in, down.packets_in, down.bytes_in, flows)

    return CountingRelay()


def _context_port(ctx: Any) -> int | None:
    """The local UDP port of an aiocoap client context (as agent/gateway/peers.py finds a
    server's); None when it cannot be found."""
    for interface in getattr(ctx, "request_interfaces", ()):
        tokens = getattr(interface, "token_interface", None)
        transport = getattr(getattr(tokens, "message_interface", None), "transport", None)
        if transport is not None:
            with contextlib.suppress(AttributeError, OSError, TypeError):
                return int(transport.get_extra_info("socket").getsockname()[1])
    return None


def _lane_port(transport: Any, lane: int) -> int | None:
    """The local port of one lane of a CoapTransport (for labelling the relay's flows only)."""
    contexts = getattr(transport, "_contexts", [])
    return _context_port(contexts[lane]) if lane < len(contexts) else None


# -- set-up -----------------------------------------------------------------------------------


@dataclass
class Site:
    cloud_dir: Path
    gw_dir: Path
    direct: list[Any]  # the direct devices' credentials
    relayed: list[Any]  # the gateway's devices' credentials

    @property
    def relayed_names(self) -> list[str]:
        return [c.principal for c in self.relayed]


def _provision(where: Path, devices: int) -> Site:
    """Both fleets, the gateway and its attachments registered with the cloud's storage (before
    it starts); the gateway's credential and its devices' files in its directory."""
    from fleetlib.provision import provision

    from cloud.security import issue_credential
    from cloud.storage import SQLiteStorage

    cloud_dir, gw_dir = where / "cloud", where / "gateway"
    cloud_dir.mkdir()
    storage = SQLiteStorage.in_dir(cloud_dir)
    try:
        direct = provision(storage, devices, DIRECT)
        relayed = provision(storage, devices, RELAYED)
        now = time.time()
        gw_cred = issue_credential(storage, GATEWAY, "gateway", now)
        storage.attach(GATEWAY, [c.principal for c in relayed], now)
    finally:
        storage.close()
    gw_cred.write(gw_dir / "credential.json")
    for cred in relayed:
        cred.write(gw_dir / "devices" / f"{cred.principal}.json")
    return Site(cloud_dir, gw_dir, direct, relayed)


def _gateway_config(site: Site, uplink_port: int, opts: argparse.Namespace) -> Any:
    from agent.gateway.settings import load_gateway_config

    path = site.gw_dir / "gateway.toml"
    path.write_text(
        f'[agent]\ndevice_id = "{GATEWAY}"\ndata_dir = "{site.gw_dir}"\n'
        f'[uplink]\nendpoints = ["coap://127.0.0.1:{uplink_port}"]\n'
        f'[gateway]\nlisten = "127.0.0.1:0"\nforward_interval = {opts.forward_interval}\n'
        f"desired_poll = {opts.desired_poll}\n",
        encoding="utf-8",
    )
    return load_gateway_config(path)


def _publish(cloud_dir: Path) -> None:
    """Sign and publish the model version in the cloud's registry, as ``edge-agent-cloud models
    keygen`` and ``models publish`` do (tests/e2e/test_gateway.py runs those)."""
    from agent.modelstore.signing import load_private_key, write_keypair
    from cloud.models import ModelRegistry, entry_for

    key, _ = write_keypair(cloud_dir / "models" / "signing.key")
    registry = ModelRegistry(cloud_dir / "models")
    registry.publish(
        MODEL.read_bytes(), MODEL_NAME, MODEL_VERSION, entry_for(MODEL), load_private_key(key)
    )


def _stored(cloud_dir: Path, names: Sequence[str]) -> int:
    """Records the cloud holds for ``names`` (read beside the running endpoint)."""
    from cloud.storage import SQLiteStorage

    s = SQLiteStorage.in_dir(cloud_dir)
    try:
        return sum(sum(s.counts(n).values()) for n in names)
    finally:
        s.close()


async def _until(check: Any, what: str, within: float = SETTLE, step: float = 0.2) -> float:
    """Wait until ``await check()`` is true; the seconds it took. RuntimeError after
    ``within`` s."""
    start = time.perf_counter()
    while not await check():
        if time.perf_counter() - start > within:
            raise RuntimeError(f"bench gateway: {what}: not within {within:g} s")
        await asyncio.sleep(step)
    return time.perf_counter() - start


# -- the two runs ---------------------------------------------------------------------------


@dataclass
class Window:
    """One run's steady window: traffic on its cloud side (and device side), records stored."""

    seconds: float = 0.0
    uplink: Traffic = field(default_factory=Traffic)
    lan: Traffic | None = None
    stored: int = 0
    gateway: dict[str, int] = field(default_factory=dict)  # the gateway's counters, deltas


async def _window(
    opts: argparse.Namespace,
    site: Site,
    names: list[str],
    device_side: Any,
    cloud_side: Any,
    gw: Any = None,
) -> Window:
    """Measure one run's steady window (module docstring)."""

    async def started() -> bool:
        return device_side.counters("up").packets_in > 0

    await _until(started, "the fleet's first datagram", within=300.0, step=0.05)
    await asyncio.sleep(opts.warmup)

    async def snap() -> tuple[float, Traffic, Traffic, int, dict[str, int]]:
        stored = await asyncio.to_thread(_stored, site.cloud_dir, names)
        counters = {}
        if gw is not None:
            st = gw.status()
            counters = {k: st[k] for k in ("forwarded", "requests_up", "bytes_up")}
        return time.perf_counter(), cloud_side.traffic(), device_side.traffic(), stored, counters

    t0, up0, lan0, s0, g0 = await snap()
    await asyncio.sleep(opts.window)
    t1, up1, lan1, s1, g1 = await snap()
    return Window(
        t1 - t0,
        up1 - up0,
        (lan1 - lan0) if device_side is not cloud_side else None,
        s1 - s0,
        {k: g1[k] - g0[k] for k in g1},
    )


async def _drained(gw: Any, names: list[str]) -> None:
    """Until the gateway has forwarded (and the cloud acknowledged) all its store holds."""

    async def done() -> bool:
        held = await gw.server.db(lambda s: sum(sum(s.counts(n).values()) for n in names))
        return gw.status()["forwarded"] >= held

    await _until(done, "the gateway's backlog forwarded")


async def _model_phase(site: Site, gw: Any, uplink: Any) -> dict[str, Any]:
    """Publish a version, assign it to every device behind the gateway; the gateway's downloads
    of it once every assignment is mirrored in its store."""
    from cloud.server import Limits
    from cloud.storage import SQLiteStorage

    before = uplink.traffic()
    started = time.perf_counter()
    await asyncio.to_thread(_publish, site.cloud_dir)
    value = {"name": MODEL_NAME, "version": MODEL_VERSION}

    def assign() -> None:
        s = SQLiteStorage.in_dir(site.cloud_dir)
        try:
            for name in site.relayed_names:
                s.put_desired(
                    name, {"model/anomaly": value}, time.time(), None, Limits().desired_doc_bytes
                )
        finally:
            s.close()

    await asyncio.to_thread(assign)
    names = site.relayed_names

    async def mirrored() -> bool:
        def check(s: Any) -> bool:
            return all(s.desired(n).entries.get("model/anomaly") is not None for n in names)

        return bool(await gw.server.db(check))

    await _until(mirrored, "the assignment mirrored for every device")
    took = time.perf_counter() - started
    fetches = gw.status()["model_fetches"]
    traffic = uplink.traffic() - before
    return {
        "fetches": int(fetches.get((MODEL_NAME, MODEL_VERSION), 0)),
        "versions": 1,
        "model_bytes": MODEL.stat().st_size,
        "uplink_down_bytes": traffic.down_bytes,
        "uplink_up_bytes": traffic.up_bytes,
        "seconds": round(took, 1),
    }


async def _fleets(opts: argparse.Namespace, where: Path) -> dict[str, Any]:
    from fleet import EndpointProcess, FleetConfig, run_fleet
    from fleetlib.report import verify

    from agent.gateway.service import Gateway
    from agent.service.notify import Health
    from agent.service.supervise import Supervisor
    from cloud.storage import SQLiteStorage
    from drivers.clock import RealClock

    site = await asyncio.to_thread(_provision, where, opts.devices)
    cloud = EndpointProcess(site.cloud_dir, insecure=False)
    await cloud.start()
    relays: list[Any] = []
    gw: Any = None
    gw_task: asyncio.Task[None] | None = None
    try:
        direct_relay = counting_relay(cloud.port)
        uplink_relay = counting_relay(cloud.port)
        for r in (direct_relay, uplink_relay):
            await r.start()
            relays.append(r)
        clock = RealClock()
        gw_config = _gateway_config(site, uplink_relay.port, opts)
        gw = Gateway(gw_config, Supervisor(clock, Health(clock)))
        gw_task = asyncio.create_task(gw.run())

        async def listening() -> bool:
            if gw_task.done():
                gw_task.result()  # raises what stopped it
            return gw.forwarder is not None

        await _until(listening, "the gateway listening", step=0.05)
        lan_relay = counting_relay(gw.server.port)
        await lan_relay.start()
        relays.append(lan_relay)
        duration = opts.warmup + opts.window + 1.0

        def config(port: int, creds: list[Any], seed: int) -> Any:
            return FleetConfig(
                target=f"coap://127.0.0.1:{port}",
                devices=opts.devices,
                processes=opts.sim_processes,
                interval=opts.interval,
                batch=opts.batch,
                duration=duration,
                warmup=opts.warmup,
                drain=15.0,
                credentials=tuple(creds),
                seed=seed,
            )

        direct_names = [c.principal for c in site.direct]
        reports = asyncio.gather(
            run_fleet(config(direct_relay.port, site.direct, 1)),
            run_fleet(config(lan_relay.port, site.relayed, 2)),
        )
        windows = asyncio.gather(
            _window(opts, site, direct_names, direct_relay, direct_relay),
            _window(opts, site, site.relayed_names, lan_relay, uplink_relay, gw),
        )
        (direct_report, gw_report), (direct_w, gw_w) = await asyncio.gather(reports, windows)
        ports = {
            "records": _lane_port(gw.forwarder.transport, gw.forwarder.lane),
            "state": _lane_port(gw.state.transport, gw.state.lane),
        }
        await _drained(gw, site.relayed_names)
        model = await _model_phase(site, gw, uplink_relay)
        status = gw.status()
    finally:
        if gw is not None:
            gw.stop()
        if gw_task is not None:
            with contextlib.suppress(Exception):
                await gw_task
        for r in relays:
            await r.stop()
        await cloud.stop()

    def check() -> tuple[Any, Any]:
        s = SQLiteStorage.in_dir(site.cloud_dir)
        try:
            return verify(s, direct_report), verify(s, gw_report)
        finally:
            s.close()

    direct_v, gw_v = await asyncio.to_thread(check)
    return {
        "direct": (direct_report, direct_w, direct_v),
        "gateway": (gw_report, gw_w, gw_v),
        "ports": ports,
        "model": model,
        "status": {k: v for k, v in status.items() if k != "model_fetches"},
    }


# -- peer state convergence -------------------------------------------------------------------


def _deadline(period: float) -> float:
    """A peer request's deadline: the shipped one (peers.REQUEST_DEADLINE, 5 s) at the shipped
    period, shorter with a shorter period (1 s at least), as tests/e2e/test_gateway_mesh.py."""
    from agent.gateway.peers import REQUEST_DEADLINE

    return min(REQUEST_DEADLINE, max(1.0, period))


async def _convergence(where: Path, period: float, repeats: int) -> list[float]:
    """Seconds from each heal to three equal replicas (module docstring)."""
    from linkem import LinkEmulator

    from agent.gateway.peers import PeerServer, PeerState, PeerSync
    from agent.sync.transport import CoapTransport
    from drivers.clock import RealClock

    clock = RealClock()
    states = [PeerState(n, where / f"{n}.cbor", clock) for n in NODES]
    servers = [await PeerServer.start(s) for s in states]
    proxies: dict[tuple[int, int], Any] = {}
    transports: list[Any] = []
    tasks: list[asyncio.Task[None]] = []

    def converged() -> bool:
        first = states[0].encode()
        return all(s.encode() == first for s in states[1:])

    def partition(on: bool) -> None:
        for (i, j), proxy in proxies.items():
            if (i == 0) != (j == 0):
                proxy.outage(on)

    async def until(what: str, done: Any) -> float:
        async def check() -> bool:
            return bool(done())

        return await _until(check, what, step=0.01)

    try:
        for i in range(3):
            for j in range(3):
                if i != j:
                    proxies[i, j] = LinkEmulator(
                        ("127.0.0.1", 0), ("127.0.0.1", servers[j].port), seed=i * 3 + j
                    )
                    await proxies[i, j].start()
        for i in range(3):
            peers = [f"coap://127.0.0.1:{proxies[i, j].port}" for j in range(3) if j != i]
            transport = CoapTransport(clock, uris=peers)
            transports.append(transport)
            sync = PeerSync(
                states[i],
                peers,
                transport,
                period=period,
                deadline=_deadline(period),
                rng=random.Random(i),
            )
            tasks.append(asyncio.create_task(sync.run()))
        gw1, gw2, gw3 = states
        gw2.add("ack/pump-1", "alert-0")
        gw1.increment("count/alerts", 1)
        await until("the first convergence", converged)
        out = []
        for r in range(1, repeats + 1):
            partition(True)
            gw1.set("config/sample_rate", 100 + r)  # conflicting writes on both sides
            gw2.set("config/sample_rate", 200 + r)
            gw1.set("model/anomaly", {"version": r, "by": "gw-1"})
            gw3.set("model/anomaly", {"version": r, "by": "gw-3"})
            gw1.remove("ack/pump-1", f"alert-{r - 1}")
            gw3.add("ack/pump-1", f"alert-{r}")
            gw1.increment("count/alerts", 2)
            gw2.increment("count/alerts", -1)
            await until("side {2,3} agreeing", lambda: gw2.encode() == gw3.encode())
            await asyncio.sleep(period)  # exchanges across are tried and lost
            if converged():
                raise RuntimeError("bench gateway: the partition did not hold")
            partition(False)
            out.append(await until("convergence after the heal", converged))
        return out
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for transport in transports:
            await transport.close()
        await asyncio.sleep(0.5)  # requests the servers still handle end before they close
        for server in servers:
            await server.stop()
        for proxy in proxies.values():
            await proxy.stop()


# -- the table ----------------------------------------------------------------------------------


def _per_reading(w: Window) -> float | None:
    return w.uplink.bytes / w.stored if w.stored else None


def _fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _rows(
    result: Result, opts: argparse.Namespace, found: dict[str, Any], conv: list[float]
) -> None:
    _, dw, dv = found["direct"]
    gw_report, gwin, gv = found["gateway"]
    direct_b, gw_b = _per_reading(dw), _per_reading(gwin)
    ratio = gw_b / direct_b if direct_b and gw_b is not None else None
    offered = opts.devices * opts.batch / opts.interval
    records_per_s = gwin.stored / gwin.seconds if gwin.seconds else 0.0
    result.add(
        "devices (each run)",
        str(opts.devices),
        f"a batch of {opts.batch} every {opts.interval:g} s; {offered:.0f} readings/s",
    )
    result.add(
        "steady window",
        f"{gwin.seconds:.1f} s",
        f"after {opts.warmup:g} s warm-up; readings = records the cloud stored in it",
    )
    for label, w, b in (("direct", dw, direct_b), ("gateway", gwin, gw_b)):
        result.add(
            f"{label}: uplink bytes per reading",
            _fmt(b),
            f"{w.uplink.bytes} B ({w.uplink.up_bytes} up, {w.uplink.down_bytes} down) in "
            f"{w.uplink.packets} datagrams / {w.stored} readings",
        )
    result.add(
        "uplink bytes per reading, gateway / direct", _fmt(ratio, 3), f"target <= {RATIO_TARGET}"
    )
    g = gwin.gateway
    lanes = found["ports"]
    for lane, what in (("records", "forwarder lane"), ("state", "state relay lane")):
        port = lanes.get(lane)
        up_p, up_b, down_p, down_b = gwin.uplink.of([port] if port else [])
        result.add(
            f"gateway: {what}, bytes per reading",
            _fmt((up_b + down_b) / gwin.stored if gwin.stored else None),
            f"{up_b + down_b} B in {up_p} datagrams up, {down_p} down"
            + ("" if port else " (lane not found)"),
        )
    requests = g.get("requests_up", 0)
    if requests:
        rec_port = lanes.get("records")
        up_b = gwin.uplink.of([rec_port] if rec_port else [])[1]
        result.add(
            "gateway forwarder: requests, records per request",
            f"{requests}, {g.get('forwarded', 0) / requests:.1f}",
            f"body {g.get('bytes_up', 0) / requests:.0f} B/request, "
            f"{g.get('bytes_up', 0) / max(1, g.get('forwarded', 0)):.1f} B/record; "
            f"{(up_b - g.get('bytes_up', 0)) / requests:.0f} B/request of CoAP+OSCORE up",
        )
    direct_requests = dw.uplink.up_packets
    if direct_requests:
        result.add(
            "direct: datagrams up, readings per datagram",
            f"{direct_requests}, {dw.stored / direct_requests:.1f}",
            f"{dw.uplink.bytes / direct_requests:.0f} B per request and answer",
        )
    if gwin.lan is not None:
        result.add(
            "gateway LAN (devices <-> gateway) bytes per reading",
            _fmt(gwin.lan.bytes / gwin.stored if gwin.stored else None),
            "information: the devices' side of the gateway",
        )
    result.add(
        "records/s through the gateway",
        f"{records_per_s:.1f}",
        f"stored by the cloud in the window; offered {offered:.0f}; acked by the gateway "
        f"{gw_report.records_per_s:.1f}",
    )
    for label, v in (("direct", dv), ("gateway", gv)):
        result.add(
            f"{label}: lost / duplicated",
            f"{v.lost} / {v.duplicated}",
            f"{v.acked} acknowledged to the devices, {v.stored} stored in the cloud",
        )
    m = found["model"]
    result.add(
        "model downloads per version (gateway)",
        f"{m['fetches'] / m['versions']:g}",
        f"{opts.devices} devices assigned {MODEL_NAME} {MODEL_VERSION} ({m['model_bytes']} B);"
        f" the uplink carried {m['uplink_down_bytes']} B down meanwhile, desired polls included",
    )
    median = statistics.median(conv) if conv else None
    result.add(
        "peer state: convergence after a heal",
        f"{_fmt(median, 2)} s",
        f"median of {len(conv)} ({', '.join(f'{c:.2f}' for c in conv)}); sync period "
        f"{opts.period:g} s (+-25 %), request deadline {_deadline(opts.period):g} s",
    )
    if ratio is not None:
        result.claim(
            f"uplink bytes per reading through a gateway <= {RATIO_TARGET} x direct",
            f"{ratio:.3f}",
            ratio <= RATIO_TARGET,
        )
    result.notes.append(
        f"(gateway [gateway] forward_interval {opts.forward_interval:g} s, desired_poll "
        f"{opts.desired_poll:g} s; bytes: every UDP payload byte both ways through the relay on "
        "the cloud's side of each run; lanes told apart by the gateway's client ports)"
    )
    result.summary = {
        "devices": opts.devices,
        "batch_interval_s": opts.interval,
        "batch_size": opts.batch,
        "window_s": round(gwin.seconds, 2),
        "records_per_s": round(records_per_s, 1),
        "lost": dv.lost + gv.lost,
        "duplicated": dv.duplicated + gv.duplicated,
        "lost_direct": dv.lost,
        "lost_gateway": gv.lost,
        "duplicated_direct": dv.duplicated,
        "duplicated_gateway": gv.duplicated,
        "uplink_bytes_per_reading": round(gw_b, 2) if gw_b is not None else None,
        "uplink_bytes_per_reading_direct": round(direct_b, 2) if direct_b is not None else None,
        "uplink_bytes_ratio": round(ratio, 4) if ratio is not None else None,
        "uplink_bytes_ratio_target": RATIO_TARGET,
        "target_met": ratio is not None and ratio <= RATIO_TARGET,
        "readings_direct": dw.stored,
        "readings_gateway": gwin.stored,
        "uplink_bytes_direct": dw.uplink.bytes,
        "uplink_bytes_gateway": gwin.uplink.bytes,
        "gateway_requests_up": g.get("requests_up", 0),
        "model_fetches_per_version": m["fetches"] / m["versions"],
        "model": m,
        "convergence_s": round(median, 3) if median is not None else None,
        "convergence_runs_s": [round(c, 3) for c in conv],
        "convergence_period_s": opts.period,
        "forward_interval_s": opts.forward_interval,
        "desired_poll_s": opts.desired_poll,
    }


def run(args: argparse.Namespace) -> Result:
    opts = _options(args)
    with bench_workdir(opts, "gateway") as where:
        mesh = where.path / "mesh"
        mesh.mkdir()

        async def both() -> tuple[dict[str, Any], list[float]]:
            return await asyncio.gather(
                _fleets(opts, where.path),
                _convergence(mesh, opts.period, opts.repeats),
            )

        found, conv = asyncio.run(both())
        result = Result()
        _rows(result, opts, found, conv)
        return where.stamp(result)


if __name__ == "__main__":
    sys.exit("run it through ./tools/dev bench gateway")
