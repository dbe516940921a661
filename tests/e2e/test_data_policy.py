"""The data policy end to end ([data], docs/protocol.md "Features records"), with the real
endpoint on loopback.

- ``local``: the agent on the simulated rig with the motor's channels local (the detector reads
  them: current and voltage are inputs of the SKAB model). Every datagram between agent and
  endpoint is captured by a relay; the test decodes every request body with the endpoint's own
  decoders (plain CoAP, so nothing is encrypted; Block1 uploads reassembled) and proves that no
  reading, alert or state document carries those channels or any of their values, and that no
  datagram holds the 8-byte encoding of any of the values.
- ``features`` at the low level, through loss and duplication: the endpoint stores features
  records that cover every reading's seq exactly once, the other records as records, and the
  queue empties.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import struct
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import cbor2
import pytest
from aiocoap import Message
from linkem import Impairment, LinkEmulator

from agent.store.queue import NewRecord, Store
from agent.store.settings import StoreSettings
from agent.sync.datapolicy import DataSettings
from agent.sync.transport import CoapTransport, Endpoints
from agent.sync.uplink import Uplink, UplinkSettings
from agent.wire import codec
from agent.wire.batch import FEATURES, WireRecord
from agent.wire.features import ChannelFeatures, FeaturesBody
from agent.wire.records import AlertBody, Kind, TelemetryBody, decode_body
from cloud.server import CloudServer
from drivers.base import Options, Reading
from drivers.clock import RealClock
from drivers.sim.sources import FaultEvent
from tests.e2e.test_runtime_wiring import DEVICE, RunningAgent, agent_config, wait_for
from tests.e2e.test_uplink import drained, until

LOCAL = ("current_a", "supply_v")  # the motor's channels (INA219)


class Relay(asyncio.DatagramProtocol):
    """A UDP relay that keeps every datagram: (direction, bytes, client address)."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.captured: list[tuple[str, bytes, Any]] = []
        self.transport: asyncio.DatagramTransport | None = None
        self._up: dict[Any, asyncio.Future[asyncio.DatagramTransport]] = {}

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.captured.append(("up", data, addr))
        if addr not in self._up:
            self._up[addr] = asyncio.ensure_future(self._open(addr))
        self._up[addr].add_done_callback(lambda f: f.result().sendto(data))

    async def _open(self, client: Any) -> asyncio.DatagramTransport:
        relay = self

        class Back(asyncio.DatagramProtocol):
            def datagram_received(self, data: bytes, addr: Any) -> None:
                relay.captured.append(("down", data, client))
                assert relay.transport is not None
                relay.transport.sendto(data, client)

        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(Back, remote_addr=self.target)
        return transport

    def close(self) -> None:
        for f in self._up.values():
            if f.done() and not f.exception():
                f.result().close()
        if self.transport is not None:
            self.transport.close()


def requests(captured: list[tuple[str, bytes, Any]]) -> Iterator[tuple[str, int | None, bytes]]:
    """(path, content format, whole body) of every request the agent sent, Block1 uploads
    reassembled (retransmitted blocks once)."""
    uploads: dict[tuple[Any, str], dict[int, bytes]] = {}
    seen: set[bytes] = set()
    for direction, data, addr in captured:
        if direction != "up" or data in seen:
            continue
        seen.add(data)
        msg = Message.decode(data)
        if not msg.code.is_request():
            continue
        path = "/".join(msg.opt.uri_path)
        cf = None if msg.opt.content_format is None else int(msg.opt.content_format)
        block = msg.opt.block1
        if block is None:
            yield path, cf, msg.payload
            continue
        blocks = uploads.setdefault((addr, path), {})
        blocks[block.block_number] = msg.payload
        if not block.more:
            yield path, cf, b"".join(blocks[i] for i in sorted(blocks))
            del uploads[(addr, path)]


def floats_in(item: Any) -> Iterator[float]:
    if isinstance(item, float):
        yield item
    elif isinstance(item, dict):
        for k, v in item.items():
            yield from floats_in(k)
            yield from floats_in(v)
    elif isinstance(item, list | tuple):
        for v in item:
            yield from floats_in(v)


async def relayed_server(tmp_path: Path) -> tuple[CloudServer, Relay, int]:
    """The endpoint with DEVICE registered, and a relay in front of it (its port)."""
    server = await CloudServer.start(tmp_path / "cloud", "127.0.0.1", 0, allow_plain=True)
    await server.add_device(DEVICE)
    loop = asyncio.get_running_loop()
    _, relay = await loop.create_datagram_endpoint(
        lambda: Relay(("127.0.0.1", server.port)), local_addr=("127.0.0.1", 0)
    )
    return server, relay, relay.transport.get_extra_info("sockname")[1]


async def test_a_local_channel_never_leaves_the_device(tmp_path: Path) -> None:
    server, relay, port = await relayed_server(tmp_path)
    fault = FaultEvent("valve_closing", at=120.0, ramp=20.0)
    cfg = agent_config(tmp_path, f"coap://127.0.0.1:{port}", fault)
    policy = {f"motor/{c}": "local" for c in LOCAL}
    data = DataSettings.from_options(Options({"policy": policy}, "data."), cfg.sensors)
    cfg = replace(cfg, data=data)
    values: set[float] = set()

    def note(reading: Reading) -> None:
        if reading.sensor == "motor":
            values.update(reading.values[c] for c in LOCAL)

    running = RunningAgent(cfg)
    running.agent.on_reading = note
    try:
        agent = running.agent
        await wait_for(lambda: agent.analyzer is not None, "the detector")
        assert agent.analyzer is not None and agent.analyzer.private == {"Current", "Voltage"}
        assert agent.uplink is not None and agent.uplink.private == agent.analyzer.private
        assert agent.sampler is not None and agent.sampler.withheld == {"motor"}

        async def alert_arrived() -> bool:
            return any(r.kind == "alert" for r in await server.records(DEVICE))

        await wait_for(alert_arrived, "an alert at the endpoint", limit=90)
        await wait_for(lambda: len(values) > 50, "readings of the local channels")
    finally:
        await running.stop()
        relay.close()
        await server.stop()

    assert agent.router is None  # no validation or cloud inference: their windows hold them
    encodings = {struct.pack(f"{e}d", v) for v in values for e in "<>"}
    for _, data_, _ in relay.captured:
        assert not any(enc in data_ for enc in encodings)
    paths, sensors, alerts, formats = set(), set(), 0, set()
    for path, cf, body in requests(relay.captured):
        paths.add(path.split("/")[0])
        if path.startswith("ingest/"):
            assert cf is not None
            formats.add(cf)
            _, recs = codec.decode_batch(body, cf)
            for rec in recs:
                content = decode_body(rec.kind, rec.body)
                if isinstance(content, TelemetryBody):
                    sensors.add(content.sensor)
                    assert not set(content.values) & set(LOCAL)
                    assert not set(content.values.values()) & values
                else:
                    assert not set(floats_in(content.data)) & values
                if isinstance(content, AlertBody):
                    alerts += 1
                    assert "window" not in content.data and content.data["window_withheld"]
                    assert not {"Current", "Voltage"} & {c[0] for c in content.data["channels"]}
        elif body:
            with contextlib.suppress(ValueError, cbor2.CBORDecodeError):
                assert not set(floats_in(cbor2.loads(body))) & values
    assert "motor" not in sensors and {"vib_motor", "ambient"} <= sensors
    assert alerts >= 1 and "ingest" in paths and "state" in paths
    assert not {"validate", "infer"} & paths
    assert len(formats) >= 1


async def drain(
    uri: str,
    store: Store,
    data: DataSettings,
    within: float,
    private: frozenset[str] = frozenset(),
    **policy: Any,
) -> Uplink:
    """Run an uplink with ``data`` (``private`` model channels, ``policy``: what the link
    monitor would set) from ``store`` to ``uri`` until the queue is empty."""
    clock = RealClock()
    cfg = UplinkSettings(endpoints=(uri,), security="none", backoff_base=0.05)
    transport = CoapTransport(clock, lanes=cfg.max_inflight)
    endpoints = Endpoints(cfg.endpoints, clock)
    up = Uplink(
        cfg, store, transport, endpoints, clock, device_id=DEVICE, rng=random.Random(2), data=data
    )
    up.private = private
    for key, value in policy.items():
        setattr(up.policy, key, value)
    task = asyncio.create_task(up.run())
    try:
        await until(lambda: drained(store), within=within)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await transport.close()
    return up


# -- a backlog queued before the policy changed ----------------------------------------------------


class Pump:
    name, driver, channels = "motor", "ina219", ("current_a", "supply_v", "power_w")


async def test_a_backlog_queued_before_a_channel_became_local_leaves_without_it(
    tmp_path: Path,
) -> None:
    """Attack: readings and an alert queued while motor/current_a was raw (or read back from the
    set-aside area by ``requeue``), then the agent restarted with current_a ``local`` and power_w
    ``drop``: nothing of them may leave, raw or summarized into features at the low level."""
    server, relay, port = await relayed_server(tmp_path)
    store = await Store.open(StoreSettings(path=tmp_path / "queue.db", budget_bytes=64 << 20))
    secret = [12.345678 + i / 7 for i in range(40)] + [77.125, 0.3125, 55.0625]
    old = [{"current_a": secret[i], "supply_v": 230.5, "power_w": secret[-3]} for i in range(40)]
    old.append({"current_a": secret[-2]})  # a reading of the local channel only
    bodies = [TelemetryBody("motor", T0 + i, v) for i, v in enumerate(old)]
    alert = {"score": 3.5, "channels": [["Current", 9.75], ["Pressure", 1.5]], "window": secret}
    aside = TelemetryBody("motor", T0 - 1, {"current_a": secret[-1], "supply_v": 230.5})
    await store.put([NewRecord(Kind.TELEMETRY, aside.to_cbor(), created=aside.time)])
    await store.set_aside(await store.batch(1, 1 << 20), "4.00 refused (then requeued)")
    await store.put([NewRecord(Kind.TELEMETRY, b.to_cbor(), created=b.time) for b in bodies])
    await store.put([NewRecord(Kind.ALERT, AlertBody(T0, alert).to_cbor(), created=T0)])
    assert len((await store.requeue()).moved) == 1
    raw = {"policy": {"current_a": "local", "power_w": "drop"}, "window": 10.0}
    raw["low"] = {"policy": {"supply_v": "features"}}
    data = DataSettings.from_options(Options(raw, "data."), [Pump()])
    private = frozenset({"Current"})  # the model channel read from current_a
    try:
        for level in ("high", "low"):
            uri = f"coap://127.0.0.1:{port}"
            await drain(uri, store, data, 30, private, level=level, batch_records=20)
            if level == "high":  # the same backlog again, sent at the low level
                await store.put(
                    [NewRecord(Kind.TELEMETRY, b.to_cbor(), created=b.time) for b in bodies]
                )
        feats = await server.db(lambda s: s.features(DEVICE))
        records = await server.records(DEVICE)
    finally:
        await store.close()
        relay.close()
        await server.stop()
    encodings = {struct.pack(f"{e}{t}", v) for v in secret for e in "<>" for t in "df"}
    for _, data_, _ in relay.captured:
        assert not any(enc in data_ for enc in encodings)
    readings = [decode_body(r.kind, r.body) for r in records]
    sent = [b for b in readings if isinstance(b, TelemetryBody)]
    assert len(sent) == 41 and all(set(b.values) == {"supply_v"} for b in sent)
    (alert_sent,) = [b for b in readings if isinstance(b, AlertBody)]
    assert "window" not in alert_sent.data and alert_sent.data["window_withheld"]
    assert alert_sent.data["channels"] == [["Pressure", 1.5]]
    assert feats and all(
        set(FeaturesBody.from_cbor(f.body).channels) == {"supply_v"} for f in feats
    )


# -- features at the low level ---------------------------------------------------------------------

T0 = 1_700_000_000.0


def vib(i: int) -> NewRecord:
    x = round(0.2 * math.sin(i / 3.0) + 0.01 * (i % 7), 4)
    body = TelemetryBody("vib", T0 + i / 10, {"x_g": x, "vibration_rms_g": abs(x)})
    return NewRecord(Kind.TELEMETRY, body.to_cbor(), created=T0 + i / 10)


def motor(i: int) -> NewRecord:
    body = TelemetryBody("motor", T0 + i, {"current_a": 1.0 + i / 1000})
    return NewRecord(Kind.TELEMETRY, body.to_cbor(), created=T0 + i)


class Rig:
    name, driver, channels = "vib", "adxl345", ("x_g", "vibration_rms_g")


class Motor:
    name, driver, channels = "motor", "ina219", ("current_a",)


async def test_features_at_the_low_level_cover_every_reading_once_through_loss(
    tmp_path: Path,
) -> None:
    server = await CloudServer.start(tmp_path / "cloud", "127.0.0.1", 0, allow_plain=True)
    await server.add_device(DEVICE)
    store = await Store.open(StoreSettings(path=tmp_path / "queue.db", budget_bytes=64 << 20))
    raw = {"window": 2.0, "bands": 4, "low": {"policy": {"vib/x_g": "features"}}}
    raw["low"]["policy"]["vib/vibration_rms_g"] = "features"
    data = DataSettings.from_options(Options(raw, "data."), [Rig(), Motor()])
    vib_seqs = set(await store.put([vib(i) for i in range(1200)]))
    other = set(await store.put([motor(i) for i in range(60)]))
    other |= set(
        await store.put(
            [NewRecord(Kind.ALERT, AlertBody(T0, {"score": 2.0}).to_cbor(), created=T0)]
        )
    )
    imp = Impairment(delay=0.02, jitter=0.005, loss=0.15, dup=0.3, reorder=0.05)
    try:
        async with LinkEmulator(
            listen=("127.0.0.1", 0), target=("127.0.0.1", server.port), impairment=imp, seed=5
        ) as proxy:
            uri = f"coap://127.0.0.1:{proxy.port}"
            policy = {"level": "low", "content_format": 65002, "batch_bytes": 1024}
            up = await drain(uri, store, data, 120, **policy)
        feats = await server.db(lambda s: s.features(DEVICE))
        records = await server.records(DEVICE)
    finally:
        await store.close()
        await server.stop()
    covered = [seq for f in feats for seq in FeaturesBody.from_cbor(f.body).seqs]
    assert sorted(covered) == sorted(vib_seqs)  # every reading, in exactly one record
    assert {r.seq for r in records} == other  # the rest as records, no reading twice
    assert all(f.sensor == "vib" and f.count <= 20 for f in feats)
    assert len(feats) >= 1200 // 20
    assert up.stats.records_acked == len(vib_seqs) + len(other)
    up_, down = proxy.counters("up"), proxy.counters("down")
    assert up_.duplicated + down.duplicated > 0 and up_.dropped["loss"] + down.dropped["loss"] > 0


async def test_hostile_features_records_are_refused_with_4_00_and_a_log_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from tests.unit.wire.test_features import HOSTILE

    server = await CloudServer.start(tmp_path / "cloud", "127.0.0.1", 0, allow_plain=True)
    await server.add_device(DEVICE)
    transport = CoapTransport(RealClock(), lanes=1)
    good = FeaturesBody("vib", (5, 7), T0, T0 + 1, {"x": _CF}).to_record()
    try:
        with caplog.at_level(logging.INFO):
            for attack, body in sorted(HOSTILE.items()):
                for cf in (112, 65002):
                    rec = WireRecord(10, FEATURES, T0, body)
                    payload = codec.encode_batch(None, [rec], cf)
                    resp = await transport.request(
                        "POST",
                        f"{server.uri}/ingest/{DEVICE}",
                        payload,
                        content_format=cf,
                        deadline=5.0,
                    )
                    # a body over the batch limit is refused before decoding
                    assert resp.dotted in (("4.00", "4.13") if "KiB" in attack else ("4.00",))
            # a range overlapping a reading in the same batch: claimed twice
            reading = WireRecord(7, "telemetry", T0, TelemetryBody("vib", T0, {"x": 1.0}).to_cbor())
            payload = codec.encode_batch(None, [good, reading], 65002)
            resp = await transport.request(
                "POST", f"{server.uri}/ingest/{DEVICE}", payload, content_format=65002, deadline=5.0
            )
            assert resp.dotted == "4.00"
            payload = codec.encode_batch(None, [good], 65002)
            resp = await transport.request(
                "POST", f"{server.uri}/ingest/{DEVICE}", payload, content_format=65002, deadline=5.0
            )
            assert resp.dotted == "2.04"  # the endpoint goes on serving
    finally:
        await transport.close()
        await server.stop()
    assert not any(r.exc_info for r in caplog.records)
    assert any("4.00" in r.getMessage() or "features" in r.getMessage() for r in caplog.records)
    assert await_features_stored(tmp_path) == [5]


def await_features_stored(tmp_path: Path) -> list[int]:
    from cloud.storage import SQLiteStorage

    storage = SQLiteStorage.in_dir(tmp_path / "cloud")
    try:
        return [f.first_seq for f in storage.features(DEVICE)]
    finally:
        storage.close()


_CF = ChannelFeatures(1.0, 0.5, 2.0, 1.25, 0.5, 3.0, 1.5, ())
