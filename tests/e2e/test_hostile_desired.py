"""Hostile desired state, end to end: a real endpoint (plain CoAP or OSCORE) on loopback, its
SQLite database written around its checks (as a buggy tool or an older endpoint would), and the
agent's real state sync observing it.

What must hold: the endpoint's poller and answers survive whatever the database holds; large
documents reach the device whole (Block2, notifications included); every valid key of a document
applies and every bad key is refused by itself and reported in ``desired/errors``; writes over
the size, depth and range limits are refused before anything is stored. The hostile documents
come from tools/hostile.py."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiocoap
import cbor2
import pytest
from aiocoap import Code, Message
from hostile import deep_array, hostile_desired_documents

import cloud.desired
from agent.sync import state as state_mod
from agent.sync.security import ClientSecurity
from agent.sync.state import StateSync
from agent.sync.statedata import StateSettings
from agent.sync.transport import CoapTransport, Endpoints
from agent.wire import records
from agent.wire.statedoc import DesiredDoc, Entry, RawValue
from cloud import cli
from cloud.server import CloudServer
from cloud.storage import DB_NAME
from drivers.clock import RealClock

DEVICE = "pump-01"
SETTINGS = StateSettings(report_interval=0.5, min_put_interval=0.02, deadline=5.0)


@pytest.fixture(autouse=True)
def fast_timing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cloud.desired, "POLL_INTERVAL", 0.05)
    monkeypatch.setattr(state_mod, "BACKOFF_BASE", 0.02)
    monkeypatch.setattr(state_mod, "BACKOFF_CAP", 0.2)
    monkeypatch.setattr(state_mod, "BACKOFF_FLOOR", 0.01)
    monkeypatch.setattr(state_mod, "ENDPOINT_CHECK_INTERVAL", 0.02)


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[CloudServer]:
    srv = await CloudServer.start(tmp_path / "cloud", "127.0.0.1", 0, allow_plain=True)
    await srv.add_device(DEVICE)
    yield srv
    await srv.stop()


def no_tracebacks(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        f"{r.name}: {r.getMessage()[:120]}"
        for r in caplog.records
        if r.exc_info or "Traceback" in r.getMessage()
    ]


async def wait_for(
    condition: Callable[[], Awaitable[bool]] | Callable[[], bool], what: str, limit: float = 15
) -> None:
    """Poll ``condition`` until it holds (a bound on waiting, not a timing assertion)."""
    try:
        async with asyncio.timeout(limit):
            while True:
                result = condition()
                if asyncio.iscoroutine(result):
                    result = await result
                if result:
                    return
                await asyncio.sleep(0.02)
    except TimeoutError:
        raise AssertionError(f"never: {what}") from None


def write_raw(server: CloudServer, values: dict[str, Any], *, replace: bool = False) -> int:
    """Write desired keys (each value as CBOR bytes, unchecked, or whatever SQLite takes)
    straight into the endpoint's database at the next revision, from another connection, in one
    transaction; returns that revision."""
    assert server.data_dir is not None
    with contextlib.closing(sqlite3.connect(server.data_dir / DB_NAME, timeout=5)) as db, db:
        (rev,) = db.execute("SELECT desired_rev FROM devices WHERE id = ?", (DEVICE,)).fetchone()
        rev += 1
        if replace:
            db.execute("DELETE FROM desired WHERE device = ?", (DEVICE,))
        for key, value in values.items():
            db.execute(
                "INSERT OR REPLACE INTO desired (device, key, version, value, updated, blocked) "
                "VALUES (?, ?, ?, ?, 0, NULL)",
                (DEVICE, key, rev, value),
            )
        db.execute("UPDATE devices SET desired_rev = ? WHERE id = ?", (rev, DEVICE))
    return rev


class Hooks:
    """The runtime's side: a sensor and a detector model named motor; records what it applied
    (it applies whatever it is given for them, as the real runtime does for a threshold)."""

    def __init__(self) -> None:
        self.applied: list[tuple[str, Any]] = []

    def reported(self) -> dict[str, Any]:
        return {"agent/version": "0.1.0"}

    def apply(self, key: str, value: Any) -> None:
        if key.split("/")[:2] not in (["sensor", "motor"], ["detect", "motor"]):
            raise ValueError(f"{key}: not on this device")
        self.applied.append((key, value))


class Device:
    """The agent's state sync (real transport, optional OSCORE) running as a task."""

    def __init__(self, uri: str, state_path: Path, security: ClientSecurity | None = None):
        clock = RealClock()
        self.hooks = Hooks()
        self.transport = CoapTransport(clock, uris=(uri,), security=security)
        self.sync = StateSync(
            SETTINGS,
            self.transport,
            Endpoints((uri,), clock),
            clock,
            device_id=DEVICE,
            state_path=state_path,
            hooks=self.hooks,
        )
        self.task = asyncio.create_task(self.sync.run())

    async def stop(self) -> None:
        if self.task.done():
            self.task.result()  # surfaces a crash of the stage
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task
        await self.transport.close()

    def applied(self, key: str, version: int) -> bool:
        return self.sync.applied_version(key) == version

    def refused(self, key: str, version: int) -> bool:
        return self.sync.status["desired_failed"].get(key) == version


async def desired_errors(server: CloudServer) -> dict[str, Any]:
    entry = (await server.reported(DEVICE)).get("desired/errors")
    return {} if entry is None else dict(entry.value)


class Observer:
    """An aiocoap client observation of desired state; notifications land in a queue."""

    def __init__(self, ctx: aiocoap.Context, uri: str) -> None:
        self.request = ctx.request(Message(code=Code.GET, uri=uri, observe=0))
        self.queue: asyncio.Queue[DesiredDoc] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> DesiredDoc:
        async with asyncio.timeout(10):
            first = await self.request.response
        assert first.code == Code.CONTENT and first.opt.observe is not None
        self._task = asyncio.create_task(self._pump())
        return DesiredDoc.from_cbor(first.payload)

    async def _pump(self) -> None:
        async for notification in self.request.observation:
            self.queue.put_nowait(DesiredDoc.from_cbor(notification.payload))

    async def next_with(self, check: Callable[[DesiredDoc], bool], what: str) -> DesiredDoc:
        try:
            async with asyncio.timeout(10):
                while True:
                    doc = await self.queue.get()
                    if check(doc):
                        return doc
        except TimeoutError:
            raise AssertionError(f"no notification with {what}") from None

    async def stop(self) -> None:
        self.request.observation.cancel()
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)


async def cli_desired_set(server: CloudServer, *assignments: str) -> int:
    assert server.data_dir is not None
    argv = ["desired", "set", "--data", str(server.data_dir), "--device", DEVICE, *assignments]
    return await asyncio.to_thread(cli.main, argv)


# -- finding 1: the endpoint's poller --------------------------------------------------------------


@pytest.mark.timeout(60)
async def test_value_nested_100_deep_in_storage_does_not_stop_the_desired_poller(
    server: CloudServer, client: aiocoap.Context, caplog: pytest.LogCaptureFixture
) -> None:
    observer = Observer(client, f"{server.uri}/state/{DEVICE}/desired")
    try:
        await observer.start()
        bomb = deep_array(100)
        rev = write_raw(server, {"detect/motor/threshold": bomb})
        doc = await observer.next_with(lambda d: d.rev == rev, "the 100-deep value")
        assert doc.entries["detect/motor/threshold"] == Entry(rev, RawValue(bomb))

        # later changes, from the command line (another process), still reach the observer
        assert await cli_desired_set(server, "sensor/motor/interval=2") == 0
        doc = await observer.next_with(
            lambda d: "sensor/motor/interval" in d.entries, "a later change"
        )
        assert doc.entries["sensor/motor/interval"] == Entry(rev + 1, 2)
        # ... and over CoAP; GET answers too
        await server.set_desired(DEVICE, {"sensor/motor/enabled": False})
        await observer.next_with(lambda d: "sensor/motor/enabled" in d.entries, "a CoAP change")
        async with asyncio.timeout(10):
            got = await client.request(
                Message(code=Code.GET, uri=f"{server.uri}/state/{DEVICE}/desired")
            ).response
        assert got.code == Code.CONTENT
        # the command line refuses to write such a value at all
        deep = "[" * 100 + "]" * 100
        assert await cli_desired_set(server, f"detect/motor/threshold={deep}") == cli.EX_USAGE
    finally:
        await observer.stop()
    assert server.responses["5.00 Internal Server Error"] == 0
    assert no_tracebacks(caplog) == []


@pytest.mark.timeout(60)
async def test_desired_values_corrupted_at_rest_are_left_out_and_the_rest_is_served(
    server: CloudServer, client: aiocoap.Context, caplog: pytest.LogCaptureFixture
) -> None:
    observer = Observer(client, f"{server.uri}/state/{DEVICE}/desired")
    try:
        await observer.start()
        values: dict[str, Any] = {
            "sensor/motor/interval": cbor2.dumps(2.0),
            "model/a": b"\x82\x01",  # an array that ends early
            "model/b": "text",  # not even a BLOB
            "model/c": 7,
        }
        rev = write_raw(server, values)
        doc = await observer.next_with(lambda d: d.rev == rev, "the readable keys")
        assert doc.entries == {"sensor/motor/interval": Entry(rev, 2.0)}
        assert "event=desired_value_unreadable device=pump-01 key='model/a'" in caplog.text
    finally:
        await observer.stop()
    assert no_tracebacks(caplog) == []


# -- finding 2: per-key refusal on the device ------------------------------------------------------


@pytest.mark.timeout(60)
async def test_value_nested_20_deep_is_refused_per_key_and_the_interval_beside_it_applies(
    server: CloudServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    device = Device(server.uri, tmp_path / "state.cbor")
    try:
        await wait_for(lambda: device.sync.status["observing"], "observing")
        rev = write_raw(
            server,
            {
                "sensor/motor/interval": cbor2.dumps(2.0),
                "detect/motor/threshold": deep_array(20),
            },
        )
        await wait_for(lambda: device.applied("sensor/motor/interval", rev), "interval applied")
        assert ("sensor/motor/interval", 2.0) in device.hooks.applied
        assert device.refused("detect/motor/threshold", rev)
        assert device.sync.status["documents_rejected"] == 0
        await wait_for(
            lambda: _errors_name(server, "detect/motor/threshold", rev), "desired/errors"
        )
        error = (await desired_errors(server))["detect/motor/threshold"]["error"]
        assert "nested 20 deep, at most 4" in error
        assert "event=desired_rejected key=detect/motor/threshold" in caplog.text
    finally:
        await device.stop()
    assert no_tracebacks(caplog) == []


async def _errors_name(server: CloudServer, key: str, version: int) -> bool:
    return (await desired_errors(server)).get(key, {}).get("version") == version


# -- finding 3: large documents through Block2; limits on write ----------------------------------


@pytest.mark.timeout(90)
@pytest.mark.parametrize("security", ["none", "oscore"])
async def test_desired_value_of_20kB_reaches_the_agent_whole_through_block2(
    security: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    srv = await CloudServer.start(
        tmp_path / "cloud", "127.0.0.1", 0, allow_plain=security == "none"
    )
    sec = None
    if security == "oscore":
        (tmp_path / "dev").mkdir()
        (await srv.register(DEVICE)).write(tmp_path / "dev" / "credential.json")
        sec = ClientSecurity.open(
            "oscore", (srv.uri,), tmp_path / "dev" / "credential.json", tmp_path / "dev" / "o.json"
        )
    else:
        await srv.add_device(DEVICE)
    device = Device(srv.uri, tmp_path / "state.cbor", sec)
    try:
        await wait_for(lambda: device.sync.status["observing"], "observing")
        big = {"name": "m" * 20_000}
        rev = write_raw(
            srv,
            {"model/anomaly": records.dumps(big), "sensor/motor/interval": cbor2.dumps(0.5)},
        )
        # the notification (block 0, then GETs for the rest) gives the device the whole document
        await wait_for(lambda: device.applied("sensor/motor/interval", rev), "interval applied")
        assert device.sync.status["documents_rejected"] == 0
        assert device.refused("model/anomaly", rev)
        await wait_for(lambda: _errors_name(srv, "model/anomaly", rev), "desired/errors")
        error = (await desired_errors(srv))["model/anomaly"]["error"]
        assert "the value has 20009 bytes, at most 256" in error

        # a second large notification (the observation goes on)
        rev2 = write_raw(
            srv,
            {"model/other": records.dumps(big), "sensor/motor/interval": cbor2.dumps(3.0)},
        )
        await wait_for(lambda: device.applied("sensor/motor/interval", rev2), "second change")
        assert device.sync.status["documents_rejected"] == 0
    finally:
        await device.stop()
        if sec is not None:
            sec.close()
        await srv.stop()
    assert no_tracebacks(caplog) == []


@pytest.mark.timeout(60)
async def test_desired_writes_over_the_size_depth_or_range_limits_are_refused_not_stored(
    server: CloudServer, client: aiocoap.Context
) -> None:
    uri = f"{server.uri}/state/{DEVICE}/desired"

    async def put(body: bytes) -> Message:
        msg = Message(code=Code.PUT, uri=uri, payload=body, content_format=60)
        async with asyncio.timeout(10):
            return await client.request(msg).response

    nested = b"\xa2" + cbor2.dumps("sensor/motor/interval") + cbor2.dumps(1.0)
    nested += cbor2.dumps("detect/motor/threshold") + deep_array(20)
    response = await put(nested)
    assert response.code == Code.BAD_REQUEST
    assert b"detect/motor/threshold: the value is nested 20 deep, at most 4" in response.payload

    response = await put(cbor2.dumps({"model/anomaly": {"name": "m" * 300}}))
    assert response.code == Code.REQUEST_ENTITY_TOO_LARGE
    assert b"model/anomaly: the value has 309 bytes, at most 256" in response.payload

    response = await put(cbor2.dumps({"detect/motor/threshold": 1e308}))
    assert response.code == Code.BAD_REQUEST
    assert b"0.01..100" in response.payload

    big = '{"name": "' + "m" * 300 + '"}'
    assert await cli_desired_set(server, f"model/anomaly={big}") == cli.EX_USAGE
    assert await cli_desired_set(server, "detect/motor/threshold=1e308") == cli.EX_USAGE
    assert await cli_desired_set(server, "sensor/motor/interval=0") == cli.EX_USAGE
    assert (await server.desired(DEVICE)).rev == 0  # nothing of them was stored


# -- finding 4: ranges, refused on write and per key on the device ---------------------------------


@pytest.mark.timeout(60)
async def test_threshold_1e308_from_an_older_endpoint_is_refused_per_key_by_the_agent(
    server: CloudServer, tmp_path: Path
) -> None:
    device = Device(server.uri, tmp_path / "state.cbor")
    try:
        await wait_for(lambda: device.sync.status["observing"], "observing")
        rev = write_raw(
            server,
            {
                "detect/motor/threshold": cbor2.dumps(1e308),  # alerts silently off
                "sensor/motor/interval": cbor2.dumps(30),
            },
        )
        await wait_for(lambda: device.applied("sensor/motor/interval", rev), "interval applied")
        assert device.refused("detect/motor/threshold", rev)
        assert all(key != "detect/motor/threshold" for key, _ in device.hooks.applied)
        await wait_for(
            lambda: _errors_name(server, "detect/motor/threshold", rev), "desired/errors"
        )
        error = (await desired_errors(server))["detect/motor/threshold"]["error"]
        assert "0.01..100" in error
    finally:
        await device.stop()


# -- the generator: every hostile document costs only its bad keys ---------------------------------


@pytest.mark.timeout(120)
async def test_hostile_desired_documents_through_the_endpoint_cost_only_their_bad_keys(
    server: CloudServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    device = Device(server.uri, tmp_path / "state.cbor")
    try:
        await wait_for(lambda: device.sync.status["observing"], "observing")
        for document in hostile_desired_documents(20, 7):
            rev = write_raw(server, document.values, replace=True)
            await wait_for(
                lambda r=rev: device.applied("sensor/motor/interval", r), document.attack
            )
            refused = {k for k in document.bad if device.refused(k, rev)}
            assert refused == document.bad, document.attack
        assert device.sync.status["documents_rejected"] == 0
    finally:
        await device.stop()
    assert server.responses["5.00 Internal Server Error"] == 0
    assert no_tracebacks(caplog) == []
