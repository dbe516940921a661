"""Device state on the endpoint: reported state and its merge rules, desired state with Observe,
If-Match, the model-failure block, and desired state set by the command line while serving."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiocoap
import cbor2
import pytest
from aiocoap import Code, Message

import cloud.desired
from agent.wire import statedoc
from agent.wire.statedoc import DesiredDoc, Entry, Rule, StateError
from cloud import cli
from cloud.server import CloudServer, Limits

DEVICE = "pump-01"
MODEL = {"name": "pump-ae-int8", "sha256": "ab" * 32}


@pytest.fixture
async def server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[CloudServer]:
    monkeypatch.setattr(cloud.desired, "POLL_INTERVAL", 0.05)
    srv = await CloudServer.start(tmp_path, "127.0.0.1", 0, allow_plain=True)
    await srv.add_device(DEVICE)
    yield srv
    await srv.stop()


async def request(
    ctx: aiocoap.Context, code: Code, uri: str, doc: Any = None, **options: Any
) -> Message:
    msg = Message(code=code, uri=uri)
    if doc is not None:
        msg.payload = cbor2.dumps(doc)
        msg.opt.content_format = 60
    for name, value in options.items():
        setattr(msg.opt, name, value)
    async with asyncio.timeout(10):
        return await ctx.request(msg).response


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

    async def next(self) -> DesiredDoc:
        async with asyncio.timeout(10):
            return await self.queue.get()

    async def stop(self) -> None:
        self.request.observation.cancel()
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)


# -- reported --------------------------------------------------------------------------------------


async def test_reported_put_then_read_back_with_lww(
    server: CloudServer, client: aiocoap.Context
) -> None:
    uri = f"{server.uri}/state/{DEVICE}/reported"
    first = {
        "agent/version": [5, "0.1.0"],
        "sensor/motor/health": [7, "ok"],
        "queue/depth": [7, 12],
    }
    response = await request(client, Code.PUT, uri, first)
    assert response.code == Code.CHANGED
    assert cbor2.loads(response.payload) == {
        "agent/version": 5,
        "sensor/motor/health": 7,
        "queue/depth": 7,
    }
    # a delayed older PUT and a repeated one change nothing; a newer one wins
    stale = {
        "sensor/motor/health": [6, "down"],
        "queue/depth": [7, 99],
        "agent/version": [9, "0.2.0"],
    }
    response = await request(client, Code.PUT, uri, stale)
    assert cbor2.loads(response.payload) == {
        "sensor/motor/health": 7,
        "queue/depth": 7,
        "agent/version": 9,
    }
    got = cbor2.loads((await request(client, Code.GET, uri)).payload)
    assert got == {
        "agent/version": [9, "0.2.0"],
        "queue/depth": [7, 12],
        "sensor/motor/health": [7, "ok"],
    }


async def test_counters_merge_by_max(server: CloudServer, client: aiocoap.Context) -> None:
    uri = f"{server.uri}/state/{DEVICE}/reported"
    await request(client, Code.PUT, uri, {"counter/records": [10, 500]})
    await request(client, Code.PUT, uri, {"counter/records": [11, 400]})  # reordered, lower count
    assert (await server.reported(DEVICE))["counter/records"] == Entry(11, 500)
    # a device whose version clock went back still raises its counter
    await request(client, Code.PUT, uri, {"counter/records": [1, 800]})
    assert (await server.reported(DEVICE))["counter/records"] == Entry(11, 800)


async def test_reported_keys_are_limited(tmp_path: Path, client: aiocoap.Context) -> None:
    srv = await CloudServer.start(
        tmp_path, "127.0.0.1", 0, limits=Limits(reported_keys=3), allow_plain=True
    )
    try:
        await srv.add_device(DEVICE)
        uri = f"{srv.uri}/state/{DEVICE}/reported"
        three = {"a/x": [1, 1], "a/y": [1, 2], "a/z": [1, 3]}
        assert (await request(client, Code.PUT, uri, three)).code == Code.CHANGED
        response = await request(client, Code.PUT, uri, {"a/w": [1, 4]})
        assert response.code == Code.REQUEST_ENTITY_TOO_LARGE
        assert (await request(client, Code.PUT, uri, {"a/x": [2, 5]})).code == Code.CHANGED
        assert set(await srv.reported(DEVICE)) == {"a/x", "a/y", "a/z"}
    finally:
        await srv.stop()


# -- desired ---------------------------------------------------------------------------------------


async def test_observing_registers_a_device_when_any_device_is_allowed(
    tmp_path: Path, client: aiocoap.Context
) -> None:
    srv = await CloudServer.start(tmp_path, "127.0.0.1", 0, allow_any_device=True, allow_plain=True)
    observer = Observer(client, f"{srv.uri}/state/fresh-01/desired")
    try:
        assert await observer.start() == DesiredDoc(store=srv.store_id)
        await srv.set_desired("fresh-01", {"sensor/motor/enabled": False})
        assert (await observer.next()).entries == {"sensor/motor/enabled": Entry(1, False)}
        assert srv.observers("fresh-01") == 1
    finally:
        await observer.stop()
        await srv.stop()


async def test_desired_put_notifies_the_observer(
    server: CloudServer, client: aiocoap.Context
) -> None:
    uri = f"{server.uri}/state/{DEVICE}/desired"
    observer = Observer(client, uri)
    try:
        initial = await observer.start()
        assert initial == DesiredDoc(0, {}, {}, server.store_id)
        operator = await aiocoap.Context.create_client_context(transports=["udp6"])
        try:
            response = await request(
                operator,
                Code.PUT,
                uri,
                {"sensor/motor/interval": 0.5, "sensor/loop/enabled": False},
            )
            assert response.code == Code.CHANGED
            assert cbor2.loads(response.payload) == {
                "rev": 1,
                "changed": ["sensor/motor/interval", "sensor/loop/enabled"],
            }
            doc = await observer.next()
            assert doc.rev == 1
            assert doc.entries == {
                "sensor/motor/interval": Entry(1, 0.5),
                "sensor/loop/enabled": Entry(1, False),
            }
            # the same value again is no change: no new version
            same = await request(operator, Code.PUT, uri, {"sensor/motor/interval": 0.5})
            assert cbor2.loads(same.payload) == {"rev": 1, "changed": []}
            # unsetting a key keeps it as [version, null]
            await request(operator, Code.PUT, uri, {"sensor/loop/enabled": None})
            doc = await observer.next()
            assert doc.rev == 2 and doc.entries["sensor/loop/enabled"] == Entry(2, None)
            assert doc.entries["sensor/motor/interval"] == Entry(1, 0.5)
        finally:
            await operator.shutdown()
    finally:
        await observer.stop()


async def test_if_match_and_etag(server: CloudServer, client: aiocoap.Context) -> None:
    uri = f"{server.uri}/state/{DEVICE}/desired"
    current = await request(client, Code.GET, uri)
    etag = current.opt.etag
    assert etag and current.opt.max_age == 300
    assert (await request(client, Code.GET, uri, etags=[etag])).code == Code.VALID
    ok = await request(client, Code.PUT, uri, {"detect/main/threshold": 0.8}, if_match=[etag])
    assert ok.code == Code.CHANGED
    stale = await request(client, Code.PUT, uri, {"detect/main/threshold": 0.9}, if_match=[etag])
    assert stale.code == Code.PRECONDITION_FAILED
    assert (await server.desired(DEVICE)).entries["detect/main/threshold"].value == 0.8
    fresh = await request(
        client, Code.PUT, uri, {"detect/main/threshold": 0.9}, if_match=[ok.opt.etag]
    )
    assert fresh.code == Code.CHANGED


async def test_desired_document_limit(tmp_path: Path, client: aiocoap.Context) -> None:
    srv = await CloudServer.start(
        tmp_path, "127.0.0.1", 0, limits=Limits(desired_doc_bytes=120), allow_plain=True
    )
    try:
        await srv.add_device(DEVICE)
        uri = f"{srv.uri}/state/{DEVICE}/desired"
        ok = await request(client, Code.PUT, uri, {"sensor/a/interval": 1.0})
        assert ok.code == Code.CHANGED
        many = {f"sensor/s{i}/interval": 1.0 for i in range(10)}
        response = await request(client, Code.PUT, uri, many)
        assert response.code == Code.REQUEST_ENTITY_TOO_LARGE
        assert response.opt.size1 == 120
        assert (await srv.desired(DEVICE)).rev == 1
    finally:
        await srv.stop()


async def test_model_failure_blocks_that_version_until_reassigned(
    server: CloudServer, client: aiocoap.Context
) -> None:
    desired_uri = f"{server.uri}/state/{DEVICE}/desired"
    reported_uri = f"{server.uri}/state/{DEVICE}/reported"
    observer = Observer(client, desired_uri)
    try:
        await observer.start()
        await request(client, Code.PUT, desired_uri, {"model/anomaly": MODEL})
        assert (await observer.next()).entries["model/anomaly"] == Entry(1, MODEL)
        failed = {"name": MODEL["name"], "status": "failed", "desired": 1, "error": "bad magic"}
        await request(client, Code.PUT, reported_uri, {"model/anomaly": [100, failed]})
        doc = await observer.next()
        assert doc.blocked == {"model/anomaly": 1}
        assert doc.rev == 1  # the block is not a new version
        # the operator assigns the same model again: a new version lifts the block
        response = await request(client, Code.PUT, desired_uri, {"model/anomaly": MODEL})
        assert cbor2.loads(response.payload) == {"rev": 2, "changed": ["model/anomaly"]}
        doc = await observer.next()
        assert doc.blocked == {} and doc.entries["model/anomaly"] == Entry(2, MODEL)
        # a late report about version 1 does not block version 2
        await request(client, Code.PUT, reported_uri, {"model/anomaly": [101, failed]})
        assert (await server.desired(DEVICE)).blocked == {}
    finally:
        await observer.stop()


async def test_cli_desired_set_reaches_observers_of_a_running_server(
    server: CloudServer, client: aiocoap.Context, capsys: pytest.CaptureFixture[str]
) -> None:
    observer = Observer(client, f"{server.uri}/state/{DEVICE}/desired")
    try:
        await observer.start()
        assert server.data_dir is not None
        argv = ["desired", "set", "--data", str(server.data_dir), "--device", DEVICE]
        rc = await asyncio.to_thread(
            cli.main, [*argv, "sensor/motor/interval=2", "sensor/motor/enabled=true"]
        )
        assert rc == 0
        doc = await observer.next()
        assert doc.entries["sensor/motor/interval"] == Entry(1, 2)
        assert doc.entries["sensor/motor/enabled"] == Entry(1, True)
        # and over CoAP, as an operator elsewhere would
        argv = [
            "desired",
            "set",
            "--server",
            server.uri,
            "--device",
            DEVICE,
            'model/anomaly={"name": "x"}',
        ]
        assert await asyncio.to_thread(cli.main, argv) == 0
        doc = await observer.next()
        assert doc.entries["model/anomaly"] == Entry(2, {"name": "x"})
        bad = [
            "desired",
            "set",
            "--data",
            str(server.data_dir),
            "--device",
            DEVICE,
            "sensor/motor/interval=-1",
        ]
        assert await asyncio.to_thread(cli.main, bad) == cli.EX_USAGE
    finally:
        await observer.stop()
    assert "changed" in capsys.readouterr().out


# -- the rules as pure functions -------------------------------------------------------------------


def test_rules_by_key() -> None:
    assert statedoc.rule_for("counter/alerts") is Rule.MAX
    assert statedoc.rule_for("desired/rev") is Rule.MAX
    assert statedoc.rule_for("model/anomaly") is Rule.MODEL
    assert statedoc.rule_for("sensor/motor/health") is Rule.LWW


@pytest.mark.parametrize(
    ("stored", "incoming", "rule", "expected"),
    [
        (None, Entry(1, "a"), Rule.LWW, Entry(1, "a")),
        (Entry(2, "a"), Entry(1, "b"), Rule.LWW, None),
        (Entry(2, "a"), Entry(2, "b"), Rule.LWW, None),
        (Entry(2, "a"), Entry(3, "b"), Rule.LWW, Entry(3, "b")),
        (Entry(5, 10), Entry(6, 7), Rule.MAX, Entry(6, 10)),
        (Entry(5, 10), Entry(1, 70), Rule.MAX, Entry(5, 70)),
        (Entry(5, 10), Entry(4, 9), Rule.MAX, None),
    ],
)
def test_merge_reported(
    stored: Entry | None, incoming: Entry, rule: Rule, expected: Entry | None
) -> None:
    assert statedoc.merge_reported(stored, incoming, rule) == expected


def test_apply_desired_versions() -> None:
    doc, changed = statedoc.apply_desired(DesiredDoc(), {"sensor/a/enabled": True})
    assert (doc.rev, changed) == (1, ["sensor/a/enabled"])
    same, changed = statedoc.apply_desired(doc, {"sensor/a/enabled": True})
    assert same is doc and changed == []
    # 1 and True are different values (compared as CBOR), so this is a change... and refused
    with pytest.raises(StateError):
        statedoc.apply_desired(doc, {"sensor/a/enabled": 1})
    doc2, changed = statedoc.apply_desired(doc, {"sensor/a/interval": 1, "sensor/a/enabled": False})
    assert doc2.rev == 2 and doc2.entries["sensor/a/interval"] == Entry(2, 1)
    assert doc2.entries["sensor/a/enabled"] == Entry(2, False)


@pytest.mark.parametrize(
    ("text", "key", "value"),
    [
        ("sensor/motor/interval=0.5", "sensor/motor/interval", 0.5),
        ("sensor/vib.1/enabled=false", "sensor/vib.1/enabled", False),
        ('model/main={"name": "m"}', "model/main", {"name": "m"}),
        ("detect/main/threshold=null", "detect/main/threshold", None),
    ],
)
def test_parse_assignment(text: str, key: str, value: Any) -> None:
    assert statedoc.parse_assignment(text) == (key, value)


@pytest.mark.parametrize("text", ["novalue", "=1", "sensor/m/interval=fast", "other/key=1"])
def test_parse_assignment_refuses(text: str) -> None:
    with pytest.raises(StateError):
        statedoc.parse_assignment(text)
