"""Device state sync (agent/sync/state.py) against the real endpoint over CoAP on loopback.

Reported state is PUT on change and periodically, with versions that keep increasing across
restarts; desired state is observed and applied live exactly once per version, restored at
start-up, and a bad document or a refused value keeps the previous configuration; the observation
is registered again after the endpoint restarts or ends it and follows an endpoint fallback;
reported keys that could not be sent survive a restart while the endpoint is down. Through the
agent's runtime on the simulated rig: an operator's sensor interval and detector threshold are
applied live and reported, kept (not applied again) across a restart, and a bad value is refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiocoap
import aiocoap.resource
import pytest
from aiocoap import Code, Message

import cloud.desired
from agent import __version__ as agent_version
from agent.sense.hardware import Hardware
from agent.sense.sampling import Sampler
from agent.sense.simrig import SimRig
from agent.service import config as configmod
from agent.service.config import example_config
from agent.service.hooks import AgentHooks
from agent.service.runtime import Agent
from agent.sync import state as state_mod
from agent.sync.state import StateSync
from agent.sync.statedata import StateSettings, decode_state, parse_desired_document
from agent.sync.transport import CoapTransport, Endpoints
from agent.sync.uplink import UplinkSettings
from agent.wire import records
from agent.wire.statedoc import StateError
from cloud.server import CloudServer
from cloud.storage import DB_NAME
from drivers.base import OptionError, Options
from drivers.clock import RealClock
from tools.ports import free_port

DEVICE = "pump-01"
FAST = StateSettings(report_interval=0.5, min_put_interval=0.02, deadline=2.0)
QUIET = StateSettings(report_interval=60.0, min_put_interval=0.02, deadline=2.0)
CONFIG = {  # what the device's config file says
    "sensor/motor/interval": 1.0,
    "sensor/motor/enabled": True,
    "sensor/old/interval": 5.0,
    "detect/motor/threshold": 0.5,
}


@pytest.fixture(autouse=True)
def fast_timing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(state_mod, "BACKOFF_BASE", 0.02)
    monkeypatch.setattr(state_mod, "BACKOFF_CAP", 0.2)
    monkeypatch.setattr(state_mod, "BACKOFF_FLOOR", 0.01)
    monkeypatch.setattr(state_mod, "NOT_REGISTERED_PAUSE", 0.2)
    monkeypatch.setattr(state_mod, "UNAVAILABLE_PAUSE", 0.2)
    monkeypatch.setattr(state_mod, "ENDPOINT_CHECK_INTERVAL", 0.02)
    monkeypatch.setattr(state_mod, "OBSERVE_STALE_LIMIT", 60.0)
    monkeypatch.setattr(state_mod, "OBSERVE_MIN_LIFETIME", 0.2)
    monkeypatch.setattr(state_mod, "FALLBACK_AFTER", 1)
    monkeypatch.setattr(cloud.desired, "POLL_INTERVAL", 0.05)


class Hooks:
    """The runtime's side: sensors motor and old, models it has; records what was applied."""

    def __init__(self, sensors: tuple[str, ...] = ("motor", "old")) -> None:
        self.sensors = sensors
        self.models = {"pump-ae-int8"}
        self.applied: list[tuple[str, Any]] = []
        self.values: dict[str, Any] = {"agent/version": "0.1.0", "queue/depth": 0}
        for name in sensors:
            self.values[f"sensor/{name}/health"] = "ok"
        for key, value in CONFIG.items():
            if key.split("/")[1] in sensors:
                self.values[key] = value

    def reported(self) -> dict[str, Any]:
        return dict(self.values)

    def apply(self, key: str, value: Any) -> None:
        kind, name = key.split("/")[:2]
        if kind in ("sensor", "detect") and name not in self.sensors:
            raise ValueError(f"no sensor named {name!r} in the config")
        if kind == "model" and value is not None and value["name"] not in self.models:
            raise ValueError(f"model {value['name']!r} is not in the model cache")
        self.applied.append((key, value))
        self.values[key] = CONFIG.get(key) if value is None else value


async def start_server(data_dir: Path, port: int) -> CloudServer:
    server = await CloudServer.start(data_dir, "127.0.0.1", port, allow_plain=True)
    await server.add_device(DEVICE)
    return server


async def wait_for(
    condition: Callable[[], Awaitable[bool]] | Callable[[], bool], what: str, limit: float = 10
) -> None:
    """Poll ``condition`` until it holds (a bound on waiting, not a timing assertion)."""
    async with asyncio.timeout(limit):
        while True:
            result = condition()
            if asyncio.iscoroutine(result):
                result = await result
            if result:
                return
            await asyncio.sleep(0.02)
    raise AssertionError(what)  # pragma: no cover - asyncio.timeout raises first


async def reported(server: CloudServer) -> dict[str, Any]:
    return {k: e.value for k, e in (await server.reported(DEVICE)).items()}


async def versions(server: CloudServer) -> dict[str, int]:
    return {k: e.version for k, e in (await server.reported(DEVICE)).items()}


class Device:
    """A StateSync with its own transport, run as a task; ``stop()`` is a restart's first half."""

    def __init__(
        self,
        uris: tuple[str, ...],
        state_path: Path,
        hooks: Hooks,
        settings: StateSettings = FAST,
        clock: Any = None,
        primary_retry: float = 60.0,
    ) -> None:
        self.clock = clock or RealClock()
        self.transport = CoapTransport(self.clock)
        self.endpoints = Endpoints(uris, self.clock, primary_retry=primary_retry)
        self.hooks = hooks
        self.sync = StateSync(
            settings,
            self.transport,
            self.endpoints,
            self.clock,
            device_id=DEVICE,
            state_path=state_path,
            hooks=hooks,
        )
        self.task: asyncio.Task[None] | None = None

    def start(self, *, restore: bool = True) -> Device:
        if restore:
            self.sync.restore()
        self.task = asyncio.create_task(self.sync.run())
        return self

    async def stop(self) -> None:
        assert self.task is not None
        if self.task.done():
            self.task.result()  # surfaces a crash of the stage
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task
        await self.transport.close()

    async def observing(self, uri: str) -> None:
        await wait_for(
            lambda: self.sync.status["observed_endpoint"] == uri, f"observing {uri}", limit=15
        )


@pytest.fixture
async def cloud_dir(tmp_path: Path) -> Path:
    return tmp_path / "cloud"


@pytest.fixture
async def server(cloud_dir: Path) -> AsyncIterator[CloudServer]:
    srv = await start_server(cloud_dir, free_port())
    yield srv
    await srv.stop()


# -- reported --------------------------------------------------------------------------------------


async def test_reported_put_on_change_and_periodically(server: CloudServer, tmp_path: Path) -> None:
    hooks = Hooks()
    device = Device((server.uri,), tmp_path / "state.cbor", hooks).start()
    try:
        await wait_for(lambda: _has(server, "agent/version"), "first report")
        got = await reported(server)
        for key, value in hooks.values.items():
            assert got[key] == value
        assert got["desired/rev"] == 0
        before = await versions(server)

        # on change: the runtime says so, the changed key gets a newer version
        hooks.values["sensor/motor/health"] = "degraded"
        device.sync.changed()
        await wait_for(
            lambda: _value_is(server, "sensor/motor/health", "degraded"), "changed health"
        )
        after = await versions(server)
        assert after["sensor/motor/health"] > before["sensor/motor/health"]
        assert after["agent/version"] == before["agent/version"]  # unchanged keys keep theirs

        # periodically: a change nobody announced goes out with the next full report
        hooks.values["queue/depth"] = 42
        await wait_for(lambda: _value_is(server, "queue/depth", 42), "periodic report")
        await wait_for(lambda: device.sync.status["pending"] == 0, "answer processed")
        assert device.sync.status["last_put_result"] == "2.04"
    finally:
        await device.stop()


class BehindClock(RealClock):
    """A wall clock that stepped back an hour (an RTC without battery, NTP not synced yet)."""

    def time(self) -> float:
        return super().time() - 3600.0


async def test_versions_increase_across_a_restart_even_if_the_wall_clock_steps_back(
    server: CloudServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "state.cbor"
    hooks = Hooks()
    first = Device((server.uri,), path, hooks).start()
    try:
        await wait_for(lambda: _has(server, "sensor/motor/health"), "first report")
    finally:
        await first.stop()
    v1 = (await versions(server))["sensor/motor/health"]

    caplog.set_level(logging.INFO, logger="agent.sync.state")
    hooks.values["sensor/motor/health"] = "down"
    second = Device((server.uri,), path, hooks, clock=BehindClock()).start()
    try:
        await wait_for(lambda: _value_is(server, "sensor/motor/health", "down"), "new value")
    finally:
        await second.stop()
    assert (await versions(server))["sensor/motor/health"] > v1
    # the persisted clock gave a winning version at once; nothing had to be numbered again
    assert "event=reported_renumbered" not in caplog.text
    assert decode_state(path.read_bytes())["clock"] >= (await versions(server))["agent/version"]


async def test_lost_state_file_with_the_clock_behind_still_wins_by_renumbering(
    server: CloudServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "state.cbor"
    hooks = Hooks()
    first = Device((server.uri,), path, hooks).start()
    try:
        await wait_for(lambda: _has(server, "sensor/motor/health"), "first report")
    finally:
        await first.stop()
    path.unlink()  # the state directory is lost

    caplog.set_level(logging.INFO, logger="agent.sync.state")
    hooks.values["sensor/motor/health"] = "down"
    second = Device((server.uri,), path, hooks, clock=BehindClock()).start()
    try:
        await wait_for(lambda: _value_is(server, "sensor/motor/health", "down"), "renumbered")
        await wait_for(lambda: second.sync.status["pending"] == 0, "all acknowledged")
    finally:
        await second.stop()
    assert "event=reported_renumbered key=sensor/motor/health" in caplog.text


async def test_pending_reported_keys_survive_a_restart_while_the_endpoint_is_down(
    cloud_dir: Path, tmp_path: Path
) -> None:
    port = free_port()
    server = await start_server(cloud_dir, port)
    path = tmp_path / "state.cbor"
    first = Device((server.uri,), path, Hooks()).start()
    try:
        await wait_for(lambda: _has(server, "sensor/old/health"), "first report")
        await server.stop()
        first.hooks.values["sensor/old/health"] = "down"
        first.sync.changed()
        await wait_for(
            lambda: str(first.sync.status["last_put_result"]).startswith("error"), "a failed PUT"
        )
    finally:
        await first.stop()
    assert "sensor/old/health" in decode_state(path.read_bytes())["pending"]

    # the sensor is gone from the new config: only the pending entry can still tell the endpoint
    second = Device((f"coap://127.0.0.1:{port}",), path, Hooks(sensors=("motor",))).start()
    server = None
    try:
        await wait_for(
            lambda: str(second.sync.status["last_put_result"]).startswith("error"),
            "a PUT while the endpoint is still down",
        )
        server = await start_server(cloud_dir, port)
        await wait_for(lambda: _value_is(server, "sensor/old/health", "down"), "pending delivered")
        await wait_for(lambda: second.sync.status["pending"] == 0, "nothing pending")
    finally:
        await second.stop()
        if server is not None:
            await server.stop()
    assert decode_state(path.read_bytes())["pending"] == set()


async def test_unregistered_device_is_reported_once_it_is_registered(
    cloud_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    server = await CloudServer.start(cloud_dir, "127.0.0.1", free_port(), allow_plain=True)
    device = Device((server.uri,), tmp_path / "state.cbor", Hooks()).start()
    try:
        await wait_for(lambda: device.sync.status["last_put_result"] == "4.04", "4.04 answer")
        assert "event=device_not_registered" in caplog.text
        await server.add_device(DEVICE)
        await wait_for(lambda: _has(server, "agent/version"), "reported after registration")
        await device.observing(server.uri)
    finally:
        await device.stop()
        await server.stop()


# -- desired -----------------------------------------------------------------------------------


async def test_desired_change_applied_live_once_and_restored_at_start_up(
    server: CloudServer,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The endpoint keeps the stopped device's observation; its next notification to that closed
    # port draws an ICMP error that aiocoap's UDP transport blames on the next datagram it sends,
    # which can be the notification to the restarted device: the endpoint then drops that
    # observation without a word. Only re-registering when Max-Age runs out recovers from it
    # (the protocol's rule), so that limit is short here. A document seen again is not
    # applied again.
    monkeypatch.setattr(state_mod, "OBSERVE_STALE_LIMIT", 0.5)
    caplog.set_level(logging.INFO, logger="agent.sync.state")
    path = tmp_path / "state.cbor"
    key = "sensor/motor/interval"
    first = Device((server.uri,), path, Hooks()).start()
    try:
        await first.observing(server.uri)
        doc, _ = await server.set_desired(DEVICE, {key: 0.25})
        await wait_for(lambda: first.hooks.applied == [(key, 0.25)], "applied live")
        await wait_for(lambda: _value_is(server, key, 0.25), "value in effect reported")
        await wait_for(lambda: _value_is(server, "desired/rev", doc.rev), "rev reported")
        assert f"event=desired_applied key={key} version={doc.rev}" in caplog.text
    finally:
        await first.stop()

    # restart: restored before anything runs, and the same version is not applied again
    hooks = Hooks()
    second = Device((server.uri,), path, hooks)
    second.sync.restore()
    assert hooks.applied == [(key, 0.25)]
    second.start()
    try:
        await wait_for(lambda: second.sync.status["documents"] >= 1, "a document processed")
        assert hooks.applied == [(key, 0.25)]
        # unset: back to the config file's value
        await server.set_desired(DEVICE, {key: None})
        await wait_for(lambda: hooks.applied[-1] == (key, None), "unset applied")
        await wait_for(lambda: _value_is(server, key, CONFIG[key]), "config value reported")
    finally:
        await second.stop()

    third = Hooks()
    Device((server.uri,), path, third).sync.restore()
    assert third.applied == []  # nothing to restore: the config file's value is in effect


async def test_refused_and_wrong_values_keep_the_previous_config_and_other_keys_apply(
    server: CloudServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "state.cbor"
    hooks = Hooks()
    device = Device((server.uri,), path, hooks).start()
    try:
        await device.observing(server.uri)
        doc, _ = await server.set_desired(
            DEVICE, {"sensor/ghost/interval": 2.0, "detect/motor/threshold": 0.9}
        )
        await wait_for(lambda: ("detect/motor/threshold", 0.9) in hooks.applied, "good key")
        assert all(k != "sensor/ghost/interval" for k, _ in hooks.applied)
        assert "event=desired_rejected key=sensor/ghost/interval" in caplog.text
        await wait_for(lambda: _has(server, "desired/errors"), "failure reported")
        errors = (await reported(server))["desired/errors"]
        assert errors["sensor/ghost/interval"]["version"] == doc.rev
        assert "ghost" in errors["sensor/ghost/interval"]["error"]

        # a model that cannot be loaded: reported failed, and the endpoint blocks that version
        doc, _ = await server.set_desired(DEVICE, {"model/main": {"name": "missing-model"}})
        await wait_for(lambda: _blocked(server, "model/main", doc.rev), "model version blocked")
        model = (await reported(server))["model/main"]
        assert model["status"] == "failed" and model["desired"] == doc.rev
        assert model["name"] == "missing-model"

        # another writer put a wrong type in the endpoint's database: that key keeps its
        # previous value, the other key of the same revision applies
        rev = await write_desired_raw(
            server, {"sensor/motor/interval": "fast", "sensor/motor/enabled": False}
        )
        await wait_for(lambda: ("sensor/motor/enabled", False) in hooks.applied, "good key")
        assert hooks.values["sensor/motor/interval"] == CONFIG["sensor/motor/interval"]
        assert "event=desired_rejected key=sensor/motor/interval" in caplog.text
        await wait_for(lambda: _value_is(server, "desired/rev", rev), "rev processed")
        applied_before = list(hooks.applied)
    finally:
        await device.stop()

    # after a restart, refused versions are not tried again
    hooks2 = Hooks()
    again = Device((server.uri,), path, hooks2).start()
    try:
        await wait_for(lambda: again.sync.status["documents"] >= 1, "a document processed")
        refused = {"sensor/ghost/interval", "model/main", "sensor/motor/interval"}
        assert not [k for k, _ in hooks2.applied if k in refused]
        assert sorted(hooks2.applied, key=repr) == sorted(
            [(k, v) for k, v in applied_before if k not in refused], key=repr
        )
    finally:
        await again.stop()


async def write_desired_raw(server: CloudServer, values: dict[str, Any]) -> int:
    """Write desired keys straight into the endpoint's SQLite file from another connection (as
    a buggy tool would, without the endpoint's checks); the endpoint notices and notifies."""
    assert server.data_dir is not None
    doc = await server.desired(DEVICE)
    rev = doc.rev + 1
    with contextlib.closing(sqlite3.connect(server.data_dir / DB_NAME, timeout=5)) as db, db:
        for key, value in values.items():
            db.execute(
                "INSERT OR REPLACE INTO desired (device, key, version, value, updated, blocked) "
                "VALUES (?, ?, ?, ?, 0, NULL)",
                (DEVICE, key, rev, records.dumps(value)),
            )
        db.execute("UPDATE devices SET desired_rev = ? WHERE id = ?", (rev, DEVICE))
    return rev


class JunkDesired(aiocoap.resource.ObservableResource):
    """A misbehaving endpoint's desired state: each payload in turn, one per notification."""

    def __init__(self, payloads: list[bytes]) -> None:
        super().__init__()
        self.payloads = payloads
        self.index = 0

    def next(self) -> None:
        self.index += 1
        self.updated_state()

    async def render_get(self, request: Message) -> Message:
        payload = self.payloads[min(self.index, len(self.payloads) - 1)]
        return Message(code=Code.CONTENT, payload=payload, content_format=60, max_age=300)


class Reported(aiocoap.resource.Resource):
    async def render_put(self, request: Message) -> Message:
        return Message(code=Code.CHANGED, payload=records.dumps({}), content_format=60)


async def test_document_that_does_not_decode_is_rejected_and_the_next_one_applies(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    good = records.dumps(
        {
            "rev": 3,
            "keys": {
                "sensor/motor/interval": [1],  # not [version, value]: left out with a warning
                "detect/motor/threshold": [3, 0.7],
            },
        }
    )
    junk = JunkDesired([b"\xff\x00 not cbor", records.dumps({"rev": "x", "keys": {}}), good])
    site = aiocoap.resource.Site()
    site.add_resource(["state", DEVICE, "desired"], junk)
    site.add_resource(["state", DEVICE, "reported"], Reported())
    port = free_port()
    ctx = await aiocoap.Context.create_server_context(
        site, bind=("127.0.0.1", port), transports=["udp6"]
    )
    hooks = Hooks()
    device = Device((f"coap://127.0.0.1:{port}",), tmp_path / "state.cbor", hooks).start()
    try:
        await wait_for(lambda: device.sync.status["documents_rejected"] == 1, "junk rejected")
        junk.next()
        await wait_for(lambda: device.sync.status["documents_rejected"] == 2, "bad rev rejected")
        assert hooks.applied == []
        junk.next()
        await wait_for(lambda: hooks.applied == [("detect/motor/threshold", 0.7)], "good key")
        assert device.sync.status["desired_rev"] == 3
        assert hooks.values["sensor/motor/interval"] == CONFIG["sensor/motor/interval"]
        assert "event=desired_document_rejected" in caplog.text
        assert "event=desired_key_rejected key=sensor/motor/interval" in caplog.text
    finally:
        await device.stop()
        await ctx.shutdown()


# -- re-registration -------------------------------------------------------------------------------


async def test_observation_registered_again_after_the_endpoint_restarts(
    cloud_dir: Path, tmp_path: Path
) -> None:
    port = free_port()
    server = await start_server(cloud_dir, port)
    hooks = Hooks()
    device = Device((server.uri,), tmp_path / "state.cbor", hooks).start()
    try:
        await device.observing(server.uri)
        await server.set_desired(DEVICE, {"sensor/motor/interval": 0.5})
        await wait_for(lambda: len(hooks.applied) == 1, "first change")
        await server.stop()
        hooks.values["queue/depth"] = 5
        device.sync.changed()
        await wait_for(
            lambda: str(device.sync.status["last_put_result"]).startswith("error"), "PUT failed"
        )
        server = await start_server(cloud_dir, port)
        await server.set_desired(DEVICE, {"sensor/motor/interval": 2.0})
        await wait_for(lambda: hooks.applied[-1] == ("sensor/motor/interval", 2.0), "after restart")
        await wait_for(lambda: _value_is(server, "queue/depth", 5), "pending delivered")
    finally:
        await device.stop()
        await server.stop()


async def test_silent_observation_registered_again_when_max_age_runs_out(
    cloud_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The endpoint restarts between two reports: nothing fails on the device's side, the
    observation just goes quiet; it is registered again when Max-Age runs out."""
    monkeypatch.setattr(state_mod, "OBSERVE_STALE_LIMIT", 0.5)
    caplog.set_level(logging.INFO, logger="agent.sync.state")
    port = free_port()
    server = await start_server(cloud_dir, port)
    hooks = Hooks()
    device = Device((server.uri,), tmp_path / "state.cbor", hooks, settings=QUIET).start()
    try:
        await device.observing(server.uri)
        # nothing in flight when the endpoint goes (an exchange failing would be another reason
        # to register again)
        await wait_for(lambda: device.sync.status["pending"] == 0, "first report acknowledged")
        await server.stop()
        server = await start_server(cloud_dir, port)
        await server.set_desired(DEVICE, {"sensor/motor/enabled": False})
        await wait_for(lambda: hooks.applied == [("sensor/motor/enabled", False)], "applied")
        renewals = [r.getMessage() for r in caplog.records if "observe_renew" in r.getMessage()]
        assert renewals and all("reason=max_age" in m for m in renewals), renewals
    finally:
        await device.stop()
        await server.stop()


class EndingDesired(aiocoap.resource.ObservableResource):
    """A desired resource whose second answer is an error: that notification ends (cancels) the
    observation on the device's side; later answers are documents again."""

    def __init__(self) -> None:
        super().__init__()
        self.answers = 0

    def next(self) -> None:
        self.updated_state()

    async def render_get(self, request: Message) -> Message:
        self.answers += 1
        if self.answers == 2:
            return Message(code=Code.SERVICE_UNAVAILABLE, payload=b"going away", max_age=0)
        doc = {"rev": self.answers, "keys": {"detect/motor/threshold": [self.answers, 0.5]}}
        return Message(code=Code.CONTENT, payload=records.dumps(doc), content_format=60)


async def test_observation_registered_again_after_the_endpoint_cancels_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="agent.sync.state")
    desired = EndingDesired()
    site = aiocoap.resource.Site()
    site.add_resource(["state", DEVICE, "desired"], desired)
    site.add_resource(["state", DEVICE, "reported"], Reported())
    port = free_port()
    ctx = await aiocoap.Context.create_server_context(
        site, bind=("127.0.0.1", port), transports=["udp6"]
    )
    hooks = Hooks()
    device = Device((f"coap://127.0.0.1:{port}",), tmp_path / "state.cbor", hooks).start()
    try:
        await wait_for(lambda: hooks.applied == [("detect/motor/threshold", 0.5)], "first doc")
        desired.next()  # the error notification ends the observation
        await wait_for(lambda: desired.answers >= 3, "registered again")
        await wait_for(lambda: device.sync.status["desired_rev"] == 3, "document after it")
        # aiocoap ends the observation with the error, or as a plain end of the notifications
        ended = ("event=observe_refused", "event=observe_renew")
        assert any(e in caplog.text for e in ended), caplog.text
        assert caplog.text.count("event=observing ") == 2
        assert hooks.applied == [("detect/motor/threshold", 0.5)] * 2  # each version once
    finally:
        await device.stop()
        await ctx.shutdown()


async def test_observation_follows_the_endpoint_fallback_and_back(tmp_path: Path) -> None:
    """The fallback is another endpoint process on the primary's storage (docs/protocol.md,
    "Fallback endpoints")."""
    port_a = free_port()
    a = await start_server(tmp_path / "cloud", port_a)
    b = await start_server(tmp_path / "cloud", free_port())
    hooks = Hooks()
    device = Device((a.uri, b.uri), tmp_path / "state.cbor", hooks, primary_retry=0.3).start()
    try:
        await device.observing(a.uri)
        await a.set_desired(DEVICE, {"sensor/motor/interval": 0.5})
        await wait_for(lambda: len(hooks.applied) == 1, "applied from the primary")

        await a.stop()  # the next report fails: the endpoints fall back to b
        await device.observing(b.uri)
        await b.set_desired(DEVICE, {"detect/motor/threshold": 0.8})
        await wait_for(lambda: ("detect/motor/threshold", 0.8) in hooks.applied, "from fallback")
        await wait_for(lambda: _value_is(b, "detect/motor/threshold", 0.8), "reported to b")

        a = await start_server(tmp_path / "cloud", port_a)  # the primary is back
        await device.observing(a.uri)
        await a.set_desired(DEVICE, {"sensor/motor/enabled": False})
        await wait_for(lambda: ("sensor/motor/enabled", False) in hooks.applied, "primary again")
        assert device.endpoints.current == a.uri
    finally:
        await device.stop()
        await a.stop()
        await b.stop()


async def test_hostile_config_desired_state_of_another_storage_is_never_applied(
    tmp_path: Path,
) -> None:
    """A "fallback" with its own storage numbers desired versions on its own: its document is
    refused as a whole (the endpoint is refused) and nothing of it is applied."""
    a = await start_server(tmp_path / "a", free_port())
    b = await start_server(tmp_path / "b", free_port())
    await b.set_desired(DEVICE, {"detect/motor/threshold": 0.9, "sensor/motor/interval": 9.0})
    hooks = Hooks()
    device = Device((a.uri, b.uri), tmp_path / "state.cbor", hooks, primary_retry=0.3).start()
    try:
        await device.observing(a.uri)
        await a.set_desired(DEVICE, {"sensor/motor/interval": 0.5})
        await wait_for(lambda: len(hooks.applied) == 1, "applied from the primary")
        await a.stop()  # the endpoints fall back to b, which names another storage
        await wait_for(lambda: b.uri in device.endpoints.refused, "b refused")
        assert hooks.applied == [("sensor/motor/interval", 0.5)]  # nothing of b's
    finally:
        await device.stop()
        await b.stop()


# -- pieces ----------------------------------------------------------------------------------------


def test_settings_from_options(tmp_path: Path) -> None:
    opts = Options({"report_interval": 60, "min_put_interval": 1, "deadline": 10})
    assert StateSettings.from_options(opts, tmp_path) == StateSettings(
        60.0, 1.0, 10.0, tmp_path / "state.cbor"
    )
    assert StateSettings.from_options(Options({"path": "/x/s.cbor"}), tmp_path).path == Path(
        "/x/s.cbor"
    )
    with pytest.raises(OptionError, match="report_interval"):
        StateSettings.from_options(Options({"report_interval": 0}), tmp_path)
    with pytest.raises(OptionError, match="min_put_interval"):
        StateSettings.from_options(
            Options({"report_interval": 5, "min_put_interval": 10}), tmp_path
        )
    with pytest.raises(OptionError, match="report_intervall"):
        StateSettings.from_options(Options({"report_intervall": 5}), tmp_path)


def test_desired_document_parsing_is_lenient_per_key() -> None:
    doc = parse_desired_document(
        records.dumps(
            {
                "rev": 4,
                "keys": {"a/b": [4, 1.0], "c/d": "x", "e/f": [-1, 2], "g/h": [3, [[[[[1]]]]]]},
                "blocked": {"model/m": 2},
            }
        )
    )
    assert doc.rev == 4 and list(doc.entries) == ["a/b"] and doc.entries["a/b"].value == 1.0
    assert doc.blocked == {"model/m": 2}
    assert sorted(k for k, _ in doc.problems) == ["c/d", "e/f"]
    assert doc.refused["g/h"].version == 3 and "nested 5 deep" in doc.refused["g/h"].error
    for bad in (b"\xff", records.dumps([1]), records.dumps({"rev": -1, "keys": {}})):
        with pytest.raises(StateError):
            parse_desired_document(bad)


def test_a_corrupt_state_file_is_moved_aside(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "state.cbor"
    path.write_bytes(b"\xa1\x61")  # truncated
    hooks = Hooks()
    device = Device(("coap://127.0.0.1:9",), path, hooks)
    device.sync.restore()
    assert hooks.applied == []
    assert not path.exists() and path.with_name("state.cbor.bad").exists()
    assert "event=state_file_bad" in caplog.text


# -- helpers ---------------------------------------------------------------------------------------


async def _has(server: CloudServer, key: str) -> bool:
    return key in await server.reported(DEVICE)


async def _value_is(server: CloudServer, key: str, value: Any) -> bool:
    entry = (await server.reported(DEVICE)).get(key)
    return entry is not None and entry.value == value


async def _blocked(server: CloudServer, key: str, version: int) -> bool:
    return (await server.desired(DEVICE)).blocked.get(key) == version


# -- through the agent's runtime -----------------------------------------------------------------


def agent_config(tmp_path: Path, uri: str) -> Any:
    """The shipped rig config on the simulated rig, with [uplink] to ``server`` and fast
    [state] timing."""
    cfg = configmod.simulated(
        configmod.load(example_config()), configmod.SimulationConfig(source="pump", seed=5)
    )
    cfg = configmod.replace_data_dir(cfg, tmp_path / "agent")
    agent_section = replace(cfg.agent, device_id=DEVICE)
    state = replace(cfg.state, report_interval=1.0, min_put_interval=0.05, deadline=2.0)
    uplink = UplinkSettings(endpoints=(uri,), security="none")
    return replace(cfg, agent=agent_section, uplink=uplink, state=state)


class RunningAgent:
    """An Agent on the simulated rig run as a task; records the motor's reading times."""

    def __init__(self, cfg: Any) -> None:
        clock = RealClock()
        self.motor_times: list[float] = []
        self.agent = Agent(
            cfg, clock=clock, rig=SimRig(cfg, clock), on_reading=self._seen, status_socket=False
        )
        self.task = asyncio.create_task(self.agent.run(install_signals=False))

    def _seen(self, reading: Any) -> None:
        if reading.sensor == "motor":
            self.motor_times.append(reading.t_mono)

    def motor_every(self, most: float, n: int = 4) -> bool:
        """True when the last ``n`` motor readings came at most ``most`` seconds apart."""
        t = self.motor_times[-(n + 1) :]
        return len(t) == n + 1 and all(b - a <= most for a, b in itertools.pairwise(t))

    def state(self) -> dict[str, Any]:
        sync = self.agent.state
        return sync.status if sync is not None else {}

    async def stop(self) -> None:
        self.agent.request_stop()
        await asyncio.wait_for(self.task, 20)


def applications(caplog: pytest.LogCaptureFixture, key: str) -> int:
    return sum(f"event=desired_applied key={key} " in r.getMessage() for r in caplog.records)


async def test_agent_applies_desired_interval_live_once_and_keeps_it_on_a_bad_value(
    server: CloudServer,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # a restarted agent's observation can be dropped by the endpoint (see the restore test):
    # Max-Age renews it
    monkeypatch.setattr(state_mod, "OBSERVE_STALE_LIMIT", 0.5)
    caplog.set_level(logging.INFO, logger="agent.sync.state")
    key = "sensor/motor/interval"
    cfg = agent_config(tmp_path, server.uri)
    assert cfg.sensor("motor").interval == 1.0

    first = RunningAgent(cfg)
    try:
        await wait_for(lambda: _value_is(server, key, 1.0), "configured interval reported")
        await wait_for(lambda: _has(server, "sensor/vib_pump/health"), "sensor health reported")
        assert (await reported(server))["agent/version"] == agent_version
        await wait_for(lambda: first.state().get("observing"), "observing desired")
        doc, _ = await server.set_desired(DEVICE, {key: 0.2})
        # applied live: the motor is read five times as often, the other sensors untouched
        await wait_for(lambda: first.motor_every(0.5), "motor read at the new interval")
        assert first.agent.sampler.tasks["vib_pump"].interval == 1.0
        await wait_for(lambda: _value_is(server, key, 0.2), "new interval reported")
        assert applications(caplog, key) == 1
        status = first.agent.snapshot()["state"]
        assert status["desired_applied"][key] == doc.rev

        # the detector's threshold, through the analyzer (the rig config runs one)
        analyzer = first.agent.analyzer
        assert analyzer is not None
        assert (await reported(server))["model/anomaly"]["status"] == "active"
        await server.set_desired(DEVICE, {"detect/anomaly/threshold": 2.5})
        await wait_for(lambda: analyzer.detector.threshold == 2.5, "threshold applied")
        await wait_for(lambda: _value_is(server, "detect/anomaly/threshold", 2.5), "reported")
    finally:
        await first.stop()

    # a restart starts with the persisted value and does not apply the change again
    second = RunningAgent(cfg)
    try:
        await wait_for(lambda: second.state().get("documents", 0) >= 1, "desired read")
        assert second.agent.sampler.tasks["motor"].interval == 0.2
        assert second.agent.analyzer is not None
        assert second.agent.analyzer.detector.threshold == 2.5
        await wait_for(lambda: second.motor_every(0.5), "motor read at the restored interval")
        assert applications(caplog, key) == 1

        # a value the agent cannot use: refused with a warning, the previous interval stays
        rev = await write_desired_raw(server, {key: "fast"})
        await wait_for(lambda: _has(server, "desired/errors"), "refusal reported")
        errors = (await reported(server))["desired/errors"]
        assert errors[key]["version"] == rev
        assert "event=desired_rejected key=sensor/motor/interval" in caplog.text
        assert second.agent.sampler.tasks["motor"].interval == 0.2
        assert (await reported(server))[key] == 0.2
        assert applications(caplog, key) == 1
    finally:
        await second.stop()


async def test_agent_hooks_report_the_sampler_and_refuse_what_they_cannot_apply(
    tmp_path: Path,
) -> None:
    cfg = agent_config(tmp_path, "coap://127.0.0.1:9")
    clock = RealClock()
    hardware = Hardware(cfg, clock, SimRig(cfg, clock))

    async def sink(reading: Any) -> None:
        return None

    sampler = Sampler(hardware.build(), clock, sink)
    link = {"state": "offline", "rtt_ms": 151.234, "loss": None}
    hooks = AgentHooks(sampler, version=agent_version, queue_depth=lambda: 7, link=lambda: link)
    try:
        got = hooks.reported()
        assert got["agent/version"] == agent_version
        assert got["sensor/motor/interval"] == 1.0 and got["sensor/motor/enabled"] is True
        assert got["sensor/motor/health"] == "starting"
        assert got["queue/depth"] == 7
        assert got["link/state"] == "offline" and got["link/rtt_ms"] == 151.2
        assert "link/loss" not in got and not any(k.startswith("model/") for k in got)

        hooks.apply("sensor/motor/interval", 0.25)
        hooks.apply("sensor/flow/enabled", False)
        assert sampler.tasks["motor"].interval == 0.25
        assert hooks.reported()["sensor/flow/health"] == "disabled"
        assert sampler.tasks["vib_pump"].interval == 1.0  # the others untouched
        hooks.apply("sensor/motor/interval", None)  # unset: the config file's value
        hooks.apply("sensor/flow/enabled", None)
        assert sampler.tasks["motor"].interval == 1.0 and sampler.tasks["flow"].enabled

        refused = {
            "sensor/ghost/interval": (2.0, "no sensor named 'ghost'"),
            "detect/skab-ae/threshold": (0.5, "no detector runs"),
            "model/main": ({"name": "x"}, "this agent applies only"),
        }
        for key, (value, message) in refused.items():
            with pytest.raises(ValueError, match=message):
                hooks.apply(key, value)
    finally:
        hardware.close()
