"""The peer state on disk, its CoAP resources on a real loopback server, and one anti-entropy
exchange between two real peers."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import aiocoap
import cbor2
import pytest
from aiocoap.numbers.codes import Code
from aiocoap.optiontypes import BlockOption

from agent.errors import StoreError, SyncError
from agent.gateway.crdt import (
    MAX_ENTRY_BYTES,
    CrdtError,
    LWWRegister,
    PNCounter,
    decode_digest,
    decode_entries,
)
from agent.gateway.hlc import Timestamp
from agent.gateway.peers import FETCH_KEYS, PeerServer, PeerSettings, PeerState, PeerSync
from agent.sync.transport import CoapTransport
from agent.wire import records
from drivers.base import OptionError, Options
from drivers.clock import RealClock
from tests.unit.gateway.helpers import SetClock

T0 = 1_700_000_000.0
T0_MS = int(T0 * 1000)


def test_local_writes_survive_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "peer-state.cbor"
    clock = SetClock(T0)
    state = PeerState("gw-1", path, clock)
    state.set("config/rate", 10)
    state.set("config/gone", "x")
    state.delete("config/gone")
    state.add("ack/pump-1", "alert-1")
    state.add("ack/pump-1", "alert-2")
    state.remove("ack/pump-1", "alert-1")
    assert state.increment("count/alerts", 5) == 5
    assert state.increment("count/alerts", -2) == 3
    before = state.snapshot()
    assert before == {"ack/pump-1": ["alert-2"], "config/rate": 10, "count/alerts": 3}
    old = state.entry("config/rate")

    clock.wall -= 3600  # restarted with the wall clock an hour back
    again = PeerState("gw-1", path, clock)
    assert again.snapshot() == before
    stamp = again.set("config/rate", 20)  # a later write still wins over the one before
    assert isinstance(old, LWWRegister) and stamp > old.ts
    assert again.get("config/rate") == 20


def test_reading_defaults_and_kinds(tmp_path: Path) -> None:
    state = PeerState("gw-1", None, SetClock(T0))
    assert state.get("config/none") is None
    assert state.get("count/none") == 0
    assert state.get("ack/none") == frozenset()
    with pytest.raises(CrdtError, match="pn key"):
        state.set("count/x", 1)
    with pytest.raises(CrdtError, match="lww key"):
        state.add("config/x", "e")
    with pytest.raises(CrdtError, match="prefix"):
        state.set("nope/x", 1)
    with pytest.raises(CrdtError, match="not CBOR data"):
        state.set("config/x", cbor2.CBORTag(1, 0))
    assert state.snapshot() == {}


def test_attack_corrupt_state_file_is_moved_aside(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "peer-state.cbor"
    path.write_bytes(b"\xa5\x00 not cbor at all")
    with caplog.at_level(logging.ERROR):
        state = PeerState("gw-1", path, SetClock(T0))
    assert state.snapshot() == {}
    assert (tmp_path / "peer-state.cbor.corrupt").exists()
    assert "peer_state_unreadable" in caplog.text
    state.set("config/a", 1)  # and it goes on
    assert PeerState("gw-1", path, SetClock(T0)).get("config/a") == 1


def test_attack_one_bad_key_in_the_state_file_loses_only_that_key(tmp_path: Path) -> None:
    path = tmp_path / "peer-state.cbor"
    good = PNCounter({"gw-1": 4}).to_item()
    path.write_bytes(cbor2.dumps({"count/good": good, "count/bad": [{"gw-1": -5}, {}]}))
    state = PeerState("gw-1", path, SetClock(T0))
    assert state.snapshot() == {"count/good": 4}


def test_a_merged_state_beyond_the_peer_limits_survives_a_restart(tmp_path: Path) -> None:
    """Three gateways acknowledge 150 alerts of one pump each, every local write within the
    limits; merged, the key holds 450 elements (about 24 KiB), more than a peer's message may
    carry for a key. The gateway keeps it (docs/gateway.md "Limits and hostile input"); before,
    its state file was read back under the peer limits, so a restart (a site's power cut: every
    gateway) dropped the whole key, every acknowledgement of it gone."""
    clock = SetClock(T0)
    path = tmp_path / "peer-state.cbor"
    state = PeerState("gw-1", path, clock)
    for node in ("gw-2", "gw-3", "gw-4"):
        peer = PeerState(node, None, clock)
        for i in range(150):
            peer.add("ack/pump-1", f"alert-{node}-{i:04d}-{'x' * 20}")
        assert peer.encode(["ack/pump-1"]) and not state.merge_from(peer.encode()).refused
    held = state.get("ack/pump-1")
    assert len(held) == 450 and len(state.encode()) > MAX_ENTRY_BYTES
    state.save()
    assert PeerState("gw-1", path, clock).get("ack/pump-1") == held


async def test_attack_a_state_file_that_cannot_be_written(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The disk refuses the file (here: its directory is a file): a local write says so, a merge
    logs it; the state in memory goes on and is written once the disk takes it again."""
    blocker = tmp_path / "data"
    state = PeerState("gw-1", blocker / "peer-state.cbor", SetClock(T0))
    blocker.write_text("a file where the directory should be")
    with pytest.raises(StoreError, match="cannot save"):
        state.set("config/a", 1)
    assert state.get("config/a") == 1
    other = PeerState("gw-2", None, SetClock(T0))
    other.increment("count/c", 2)
    with caplog.at_level(logging.ERROR):
        state.merge_from(other.encode(), save=False)
        await state.flush()
    assert "peer_state_not_saved" in caplog.text
    blocker.unlink()
    await state.flush()
    assert PeerState("gw-1", state.path, SetClock(T0)).snapshot() == state.snapshot()


def test_attack_a_peer_clock_far_ahead_is_refused_key_by_key() -> None:
    clock = SetClock(T0)
    state = PeerState("gw-1", None, clock)
    ahead = LWWRegister(Timestamp(T0_MS + 86_400_000, 0, "gw-bad"), "frozen")
    fine = LWWRegister(Timestamp(T0_MS, 0, "gw-2"), "fine")
    data = records.dumps({"config/a": ahead.to_item(), "config/b": fine.to_item()})
    report = state.merge_from(data)
    assert report.changed == ["config/b"]
    assert "ahead" in report.refused["config/a"]
    assert state.hlc.last.wall < T0_MS + 60_000  # this clock was not dragged forward
    clock.wall += 86_400  # a day later the same write is within bounds
    assert state.merge_from(data).changed == ["config/a"]


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[tuple[PeerState, PeerServer, CoapTransport]]:
    clock = RealClock()
    state = PeerState("gw-1", tmp_path / "gw-1.cbor", clock)
    server = await PeerServer.start(state)
    transport = CoapTransport(clock, uris=[server.uri])
    yield state, server, transport
    await transport.close()
    await server.stop()


async def test_resources_digest_fetch_and_push(
    served: tuple[PeerState, PeerServer, CoapTransport],
) -> None:
    state, server, transport = served
    state.set("config/rate", 10)
    state.increment("count/alerts", 2)
    digest = await transport.request("GET", f"{server.uri}/peer/digest", deadline=5)
    assert digest.dotted == "2.05" and decode_digest(digest.payload) == state.digest()
    keys = records.dumps(["config/rate", "config/absent"])
    fetched = await transport.request("FETCH", f"{server.uri}/peer/state", keys, deadline=5)
    assert decode_entries(fetched.payload).entries == {"config/rate": state.entry("config/rate")}

    pushed = {
        "count/alerts": PNCounter({"gw-2": 3}).to_item(),
        "count/bad": [{"gw-2": -1}, {}],
    }
    answer = await transport.request(
        "POST", f"{server.uri}/peer/state", records.dumps(pushed), deadline=5
    )
    assert answer.dotted == "2.04"
    assert list(records.loads(answer.payload)) == ["count/bad"]  # refused, with its reason
    assert state.get("count/alerts") == 5
    assert server.site.stats["refused"] == 1
    assert PeerState("gw-1", state.path, RealClock()).get("count/alerts") == 5  # flushed


@pytest.mark.parametrize(
    ("method", "path", "payload", "code"),
    [
        ("GET", "/nothing", b"", "4.04"),
        ("PUT", "/peer/state", b"", "4.05"),
        ("DELETE", "/peer/digest", b"", "4.05"),
        ("FETCH", "/peer/state", b"\xff\xfe junk", "4.00"),
        ("FETCH", "/peer/state", records.dumps({"a": 1}), "4.00"),
        (
            "FETCH",
            "/peer/state",
            records.dumps([f"config/k{i}" for i in range(FETCH_KEYS + 1)]),
            "4.00",
        ),
        ("FETCH", "/peer/state", records.dumps(["nope/x"]), "4.00"),
        ("POST", "/peer/state", b"\x9f" * 2000, "4.00"),  # not a map, nested 2000 deep
        ("POST", "/peer/state", records.dumps([1, 2]), "4.00"),
    ],
)
async def test_attack_bad_requests_get_a_4xx_and_the_server_goes_on(
    served: tuple[PeerState, PeerServer, CoapTransport],
    method: str,
    path: str,
    payload: bytes,
    code: str,
) -> None:
    state, server, transport = served
    state.set("config/rate", 10)
    answer = await transport.request(method, f"{server.uri}{path}", payload, deadline=5)
    assert answer.dotted == code
    after = await transport.request("GET", f"{server.uri}/peer/digest", deadline=5)
    assert decode_digest(after.payload) == state.digest()
    assert state.snapshot() == {"config/rate": 10}


async def test_attack_an_endless_block1_upload_is_cut_off(
    served: tuple[PeerState, PeerServer, CoapTransport],
) -> None:
    """A peer that announces block 2000 of a 1 KiB-block upload (2 MB) is refused at once,
    before anything is spooled."""
    _state, server, _transport = served
    ctx = await aiocoap.Context.create_client_context(transports=["udp6"])
    try:
        msg = aiocoap.Message(code=Code.POST, uri=f"{server.uri}/peer/state", payload=b"x" * 1024)
        msg.opt.block1 = BlockOption.BlockwiseTuple(2000, True, 6)
        answer = await ctx.request(msg, handle_blockwise=False).response
        assert answer.code == Code.REQUEST_ENTITY_TOO_LARGE
        msg = aiocoap.Message(code=Code.POST, uri=f"{server.uri}/peer/state", payload=b"\xa0")
        msg.opt.size1 = 50_000_000
        answer = await ctx.request(msg, handle_blockwise=False).response
        assert answer.code == Code.REQUEST_ENTITY_TOO_LARGE
    finally:
        await ctx.shutdown()


async def test_one_exchange_makes_two_peers_equal(tmp_path: Path) -> None:
    clock = RealClock()
    a = PeerState("gw-a", tmp_path / "a.cbor", clock)
    b = PeerState("gw-b", tmp_path / "b.cbor", clock)
    server = await PeerServer.start(b)
    transport = CoapTransport(clock, uris=[server.uri])
    try:
        a.set("config/x", "from-a")
        b.set("config/x", "from-b")  # the later write
        a.add("ack/pump", "alert-1")
        b.increment("count/c", 4)
        a.increment("count/c", 1)
        for i in range(200):  # more than one FETCH, and block-wise answers
            b.set(f"config/k{i:03d}", "v" * 100)
        sync = PeerSync(a, [server.uri], transport, deadline=5)
        exchange = await sync.sync_once(server.uri)
        assert len(exchange.pulled) == 202 and exchange.pushed == ["ack/pump", "count/c"]
        assert a.snapshot() == b.snapshot()
        assert a.get("config/x") == "from-b" and a.get("count/c") == 5
        again = await sync.sync_once(server.uri)
        assert again.pulled == [] and again.pushed == []
        assert PeerState("gw-a", a.path, clock).snapshot() == a.snapshot()  # saved
    finally:
        await transport.close()
        await server.stop()


async def test_an_unreachable_peer_is_logged_and_skipped(tmp_path: Path) -> None:
    clock = RealClock()
    state = PeerState("gw-a", None, clock)
    transport = CoapTransport(clock, uris=["coap://127.0.0.1:9"])
    try:
        sync = PeerSync(state, ["coap://127.0.0.1:9"], transport, deadline=0.5)
        assert await sync.try_once("coap://127.0.0.1:9") is None
        assert sync.reachable == {"coap://127.0.0.1:9": False}
        assert await sync.sync_all() == [None]  # and the next round goes on
    finally:
        await transport.close()


async def test_an_exchange_that_never_ends_stops_the_beats(monkeypatch: pytest.MonkeyPatch) -> None:
    """The peers loop beats the supervisor's health after each exchange, a failed one too; an
    exchange that never returns (raising nothing) stops the beats, so the health sees the loop
    stuck instead of a gateway that looks alive while its site state no longer converges."""
    clock = RealClock()
    transport = CoapTransport(clock, uris=["coap://127.0.0.1:9"])
    sync = PeerSync(PeerState("gw-a", None, clock), ["coap://127.0.0.1:9"], transport, period=0)
    exchanges, hang = 0, asyncio.Event()

    async def exchange(peer: str) -> None:
        nonlocal exchanges
        exchanges += 1
        if exchanges == 3:
            hang.set()
            await asyncio.Event().wait()  # never returns
        raise SyncError(f"{peer}: no answer")

    monkeypatch.setattr(sync, "sync_once", exchange)
    beats = 0

    def beat() -> None:
        nonlocal beats
        beats += 1

    running = asyncio.create_task(sync.run(beat))
    try:
        await asyncio.wait_for(hang.wait(), 30)
        for _ in range(20):
            await asyncio.sleep(0)
        assert beats == 2 and exchanges == 3  # none since the third began
    finally:
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)
        await transport.close()


def test_peer_uris_are_checked() -> None:
    with pytest.raises(ValueError, match="scheme"):
        PeerSync(PeerState("gw-a", None, RealClock()), ["http://x"], CoapTransport(RealClock()))


def test_settings_from_the_config_table(tmp_path: Path) -> None:
    opts = Options(
        {"listen": "[::1]:5700", "peers": ["coap://10.0.0.2:5690"], "period": 2, "state": "p.cbor"},
        "gateway.peers.",
    )
    settings = PeerSettings.from_options(opts, tmp_path)
    assert settings == PeerSettings(
        "::1", 5700, ("coap://10.0.0.2:5690",), 2.0, tmp_path / "p.cbor"
    )
    assert PeerSettings.from_options(Options({}), tmp_path).peers == ()
    for bad, key in (({"peers": ["http://x"]}, "peers"), ({"listen": "5690"}, "listen")):
        with pytest.raises(OptionError, match=key):
            PeerSettings.from_options(Options(bad, "gateway.peers."), tmp_path)
    with pytest.raises(OptionError, match="perid"):
        PeerSettings.from_options(Options({"perid": 1}, "gateway.peers."), tmp_path)
