"""The per-device rate limit at a real endpoint on loopback (cloud/ratelimit.py; docs/ops.md "Rate
limit"): a device over its limit gets 5.03 with Max-Age and nothing of the batch is stored; once
the time told has passed the same batch is stored, once. Over OSCORE (the fast path) and plain
CoAP, through ``/relay`` per device (one device over its limit, another not, in one request), and
the gateway's forwarder, which keeps what the cloud asked for later, or refused otherwise (a
device detached from it: 4.03), and lets the other devices' records go on. The limiter's clock
is a number the tests set (no waiting for refills); the rest is real: sockets, OSCORE, SQLite.

Attack named: a compromised device with a valid credential posting records as fast as its link
allows, to fill the endpoint's disk."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from agent.errors import SyncError
from agent.gateway import later
from agent.gateway.relay import RecordForwarder, prepare_store
from agent.wire.relay import RelayRefusal
from cloud.ratelimit import DeviceRateLimit
from cloud.server import CloudServer, Limits
from cloud.storage import SQLiteStorage
from tests.e2e.test_gateway_cloud import (
    GW,
    features_record,
    gateway,
    on,
    reading,
    relay,
    senml,
)
from tests.e2e.test_security import T0, Principal, batch

A, B = "pump-01", "pump-02"
RATE, BURST = 10.0, 100  # records/s, records


class Clock:
    """The limiter's monotonic clock (and the gateway's pauses), set by the tests."""

    def __init__(self) -> None:
        self.t = 5000.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
async def limited(tmp_path: Path) -> AsyncIterator[tuple[CloudServer, Clock]]:
    limits = Limits(device_rate=RATE, device_burst=BURST)
    server = await CloudServer.start(tmp_path / "cloud", "127.0.0.1", 0, limits=limits)
    clock = Clock()
    server.rate_limit.now = clock
    yield server, clock
    await server.stop()


async def device(server: CloudServer, tmp_path: Path, name: str) -> Principal:
    return await Principal(server, tmp_path, name).open()


def _503s(server: CloudServer) -> int:
    return server.responses["5.03 Service Unavailable"]


async def forwarding(
    server: CloudServer, clock: Clock, tmp_path: Path
) -> tuple[Principal, SQLiteStorage, RecordForwarder]:
    """A gateway (A and B attached) and its forwarder over a store of its own, the pauses on
    ``clock``; everything in the store is older than keep (the prune takes what it may)."""
    await server.add_device(A)
    await server.add_device(B)
    gw = await gateway(server, tmp_path, A, B)
    first = SQLiteStorage.in_dir(tmp_path / "gw-store")
    prepare_store(first)
    first.close()
    site = SQLiteStorage.in_dir(tmp_path / "gw-store")
    data_dir = tmp_path / "gw-data"
    data_dir.mkdir()
    forwarder = RecordForwarder(
        on(site), gw.transport, lambda: server.uri, data_dir, name=GW, keep=60.0,
        wall=lambda: T0 + 10_000.0,
    )  # fmt: skip
    forwarder.later.now = clock
    return gw, site, forwarder


@pytest.fixture
async def forwarder_of(
    limited: tuple[CloudServer, Clock], tmp_path: Path
) -> AsyncIterator[tuple[CloudServer, Clock, SQLiteStorage, RecordForwarder]]:
    """:func:`forwarding` as a fixture: the cloud, its clock, the gateway's store, its forwarder."""
    server, clock = limited
    gw, site, forwarder = await forwarding(server, clock, tmp_path)
    yield server, clock, site, forwarder
    site.close()
    await gw.close()


@pytest.mark.timeout(60)
async def test_a_device_over_its_limit_gets_503_with_max_age_and_nothing_is_stored(
    limited: tuple[CloudServer, Clock], tmp_path: Path
) -> None:
    server, clock = limited
    dev = await device(server, tmp_path, A)
    try:
        first = await dev.req("POST", f"ingest/{A}", batch(A, range(1, 101)), 112)
        assert first.dotted == "2.04"  # the burst
        for _ in range(3):  # a device that does not wait: refused each time, nothing taken
            over = await dev.req("POST", f"ingest/{A}", batch(A, range(101, 131)), 112)
            assert over.dotted == "5.03" and over.max_age == 3  # 30 records at 10/s
            assert b"rate limit" in over.payload
        assert await server.seqs(A) == list(range(1, 101))
        assert _503s(server) == 3
        assert server.stats["rate_limited_batches"] == 3
        assert server.stats["rate_limited_records"] == 90
        clock.t += 3.0  # the Max-Age told
        again = await dev.req("POST", f"ingest/{A}", batch(A, range(101, 131)), 112)
        assert again.dotted == "2.04"
        assert await server.seqs(A) == list(range(1, 131))  # each once
        assert len(await server.records(A)) == 130
        # another device is not slowed by this one
        other = await device(server, tmp_path, B)
        try:
            ok = await other.req("POST", f"ingest/{B}", batch(B, range(1, 101)), 112)
            assert ok.dotted == "2.04"
        finally:
            await other.close()
    finally:
        await dev.close()


@pytest.mark.timeout(60)
async def test_plain_coap_and_a_rate_of_zero(tmp_path: Path) -> None:
    """``--insecure`` endpoints are limited the same way; ``--device-rate 0`` limits nothing."""
    from aiocoap import Code, Context, Message

    async def post(server: CloudServer, ctx: Context, seqs: range) -> Message:
        msg = Message(code=Code.POST, uri=f"{server.uri}/ingest/{A}", payload=batch(A, seqs))
        msg.opt.content_format = 112
        return await ctx.request(msg).response

    ctx = await Context.create_client_context(transports=["udp6"])
    for rate, code in ((1.0, Code.SERVICE_UNAVAILABLE), (0.0, Code.CHANGED)):
        limits = Limits(device_rate=rate, device_burst=10)
        data = tmp_path / f"cloud-{rate}"
        server = await CloudServer.start(data, "127.0.0.1", 0, allow_plain=True, limits=limits)
        try:
            await server.add_device(A)
            assert (await post(server, ctx, range(1, 11))).code == Code.CHANGED
            answer = await post(server, ctx, range(11, 1011))  # Block1: the whole batch counts
            assert answer.code == code
            if rate:
                assert answer.opt.max_age == 10  # the whole burst, refilled at 1/s
                assert await server.seqs(A) == list(range(1, 11))
            else:
                assert len(await server.seqs(A)) == 1010
        finally:
            await server.stop()
    await ctx.shutdown()


@pytest.mark.timeout(60)
async def test_relay_counts_each_entry_against_its_device_and_answers_later_per_entry(
    limited: tuple[CloudServer, Clock], tmp_path: Path
) -> None:
    server, clock = limited
    await server.add_device(A)
    await server.add_device(B)
    gw = await gateway(server, tmp_path, A, B)
    try:
        (filled,) = await relay(gw, [senml(A, range(1, 101))])
        assert not isinstance(filled, RelayRefusal)
        answers = await relay(gw, [senml(A, range(101, 121)), senml(B, range(1, 51))])
        refused, taken = answers
        assert isinstance(refused, RelayRefusal), refused
        assert (refused.dotted, refused.max_age) == ("5.03", 2)
        assert not isinstance(taken, RelayRefusal)
        assert await server.seqs(A) == list(range(1, 101))  # nothing of A's entry
        assert await server.seqs(B) == list(range(1, 51))  # B's went on
        clock.t += 2.0
        (acked,) = await relay(gw, [senml(A, range(101, 121))])
        assert not isinstance(acked, RelayRefusal)
        assert await server.seqs(A) == list(range(1, 121))
        # a device's entries in one request count one after the other against its bucket
        clock.t += 100.0
        answers = await relay(gw, [senml(A, range(200, 260)), senml(A, range(260, 320))])
        assert not isinstance(answers[0], RelayRefusal)
        assert isinstance(answers[1], RelayRefusal) and answers[1].max_age == 2
        assert await server.seqs(A) == [*range(1, 121), *range(200, 260)]
    finally:
        await gw.close()


@pytest.mark.timeout(120)
async def test_the_gateway_keeps_what_the_cloud_asks_for_later_and_the_others_go_on(
    limited: tuple[CloudServer, Clock], tmp_path: Path
) -> None:
    """The gateway's forwarder: device A's entry answered "later" is kept in the gateway's store
    (never pruned), A is paused for max-age (its new records held, nothing sent for it), the
    cursor moves on and B's records are acknowledged in the same pass; after the pause A's
    records go, each stored once."""
    server, clock = limited
    gw, site, forwarder = await forwarding(server, clock, tmp_path)
    try:
        assert server.rate_limit.wait(A, BURST) == 0  # A sent its burst (directly, say)
        site.ingest_many([(A, [reading(i) for i in range(1, 31)], True)], T0)
        site.ingest_many([(B, [reading(i) for i in range(1, 11)], True)], T0)
        assert await forwarder.forward_once() == 10  # B's; A's answered later
        assert await server.seqs(B) == list(range(1, 11))
        assert await server.seqs(A) == []
        assert forwarder.later.entries == 1
        assert site.seqs(A) == list(range(1, 31))  # kept: the prune did not take them
        held = site.db.execute("SELECT count(*) FROM relay_later").fetchone()[0]
        assert held == 30
        # paused: A's new records are held too, and nothing is sent for A
        site.ingest_many([(A, [reading(31)], False)], T0 + 1)
        requests = forwarder.requests
        assert await forwarder.forward_once() == 0
        assert forwarder.requests == requests
        assert site.db.execute("SELECT count(*) FROM relay_later").fetchone()[0] == 31
        # B is not held back meanwhile
        site.ingest_many([(B, [reading(11)], False)], T0 + 1)
        assert await forwarder.forward_once() == 1
        assert await server.seqs(B) == list(range(1, 12))
        clock.t += 3.0  # A's max-age, told for its 30 records: it has 31 now
        assert await forwarder.forward_once() == 0  # sent, answered later again: held again
        assert forwarder.later.entries == 2 and await server.seqs(A) == []
        assert site.db.execute("SELECT count(*) FROM relay_later").fetchone()[0] == 31
        clock.t += 1.0
        assert await forwarder.forward_once() == 31
        assert await server.seqs(A) == list(range(1, 32))
        assert site.db.execute("SELECT count(*) FROM relay_later").fetchone()[0] == 0
        assert await forwarder.forward_once() == 0  # nothing twice
        await forwarder.prune()
        assert site.seqs(A) == [31] and site.seqs(B) == [11]  # forwarded: dropped, newest kept
        assert len(await server.records(A)) == 31
    finally:
        site.close()
        await gw.close()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("damage", ["x'ff'", "'text'"], ids=["not-cbor", "text"])
async def test_a_held_features_record_damaged_at_rest_is_said_and_the_rest_go_on(
    limited: tuple[CloudServer, Clock],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    damage: str,
) -> None:
    """Attack named: a file corrupted at rest. A features record held for later whose body no
    longer decodes raised CodecError out of the pass, which the forwarding loop does not retry:
    its task ended, silently, and no device's records were forwarded any more (after a restart
    too: the held record goes first in every pass). It is said and skipped, as a damaged one of
    the features queue is; the device's other held records and the other devices' go on."""
    server, clock = limited
    gw, site, forwarder = await forwarding(server, clock, tmp_path)
    try:
        assert server.rate_limit.wait(A, BURST) == 0
        site.ingest_many([(A, [reading(1), features_record(20)], True)], T0)
        assert await forwarder.forward_once() == 0  # A's answered later: both held
        assert site.db.execute("SELECT count(*) FROM relay_later").fetchone()[0] == 2
        site.db.execute(f"UPDATE features SET body = {damage} WHERE device = ?", (A,))
        site.ingest_many([(B, [reading(1)], True)], T0 + 1)
        clock.t += 60.0  # the pause is over and A's bucket full again
        with caplog.at_level(logging.WARNING, logger="agent.gateway"):
            assert await forwarder.forward_once() == 2  # A's reading and B's
        assert "event=forward_features_unreadable" in caplog.text
        assert await server.seqs(A) == [1] and await server.seqs(B) == [1]
        assert site.db.execute("SELECT count(*) FROM relay_later").fetchone()[0] == 0
        assert await forwarder.forward_once() == 0  # not tried again
    finally:
        site.close()
        await gw.close()


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "damage",
    [
        "created = 'damaged'",
        "created = 9e999",
        "body = 'text'",
        "kind = 'bogus'",
        "seq = 'x'",
        "arrival = 'x'",
    ],
)
async def test_a_record_damaged_at_rest_is_set_aside_and_the_others_go_on(
    forwarder_of: tuple[CloudServer, Clock, SQLiteStorage, RecordForwarder],
    caplog: pytest.LogCaptureFixture,
    damage: str,
) -> None:
    """Attack named: a file corrupted at rest. A record row of the gateway's store that no
    longer reads as a record (a text or infinite ``created``, a text body, a kind no batch
    holds) failed every pass (ValueError, TypeError, CodecError): forwarding stopped for every
    device until someone repaired the row. It is set aside: said once with its device and seq,
    counted, kept in the store (relay_kept: never pruned, never sent again); the cursor moves
    past it and the others go, each once."""
    server, _, site, forwarder = forwarder_of
    site.ingest_many([(A, [reading(i) for i in range(1, 4)], True)], T0)
    site.ingest_many([(B, [reading(1)], True)], T0)
    site.db.execute(f"UPDATE records SET {damage} WHERE device = ? AND seq = 2", (A,))
    with caplog.at_level(logging.WARNING, logger="agent.gateway"):
        assert await forwarder.forward_once() == 3  # A's 1 and 3, B's 1
        assert await forwarder.forward_once() == 0  # not tried again
    said = [r.getMessage() for r in caplog.records if "forward_record_unreadable" in r.msg]
    assert len(said) == 1 and f"device={A}" in said[0]
    assert ("seq=x" if "seq" in damage else "seq=2") in said[0]
    assert forwarder.unreadable == 1
    assert await server.seqs(A) == [1, 3] and await server.seqs(B) == [1]
    newest = "SELECT max(arrival) FROM records WHERE typeof(arrival) = 'integer'"
    assert forwarder.cursor == site.db.execute(newest).fetchone()[0]
    assert site.db.execute("SELECT device FROM relay_kept").fetchall() == [(A,)]


@pytest.mark.timeout(60)
async def test_a_held_record_damaged_at_rest_is_set_aside_and_the_rest_go_on(
    forwarder_of: tuple[CloudServer, Clock, SQLiteStorage, RecordForwarder],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Attack named: a file corrupted at rest. A record held for later (its device over its
    rate limit) whose row no longer reads failed every pass once the pause was over: set aside
    as one of the queue is, it leaves relay_later, and the device's other held records go."""
    server, clock, site, forwarder = forwarder_of
    assert server.rate_limit.wait(A, BURST) == 0
    site.ingest_many([(A, [reading(1), reading(2)], True)], T0)
    assert await forwarder.forward_once() == 0  # A's answered later: both held
    site.db.execute("UPDATE records SET created = 'damaged' WHERE device = ? AND seq = 1", (A,))
    clock.t += 60.0
    with caplog.at_level(logging.WARNING, logger="agent.gateway"):
        assert await forwarder.forward_once() == 1
    assert "event=forward_record_unreadable device=pump-01 seq=1" in caplog.text
    assert await server.seqs(A) == [2] and forwarder.unreadable == 1
    assert site.db.execute("SELECT count(*) FROM relay_later").fetchone()[0] == 0
    assert await forwarder.forward_once() == 0


@pytest.mark.timeout(60)
async def test_records_the_cloud_refuses_alone_are_set_aside_and_the_device_goes_on(
    forwarder_of: tuple[CloudServer, Clock, SQLiteStorage, RecordForwarder],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Attack named: a file corrupted at rest. A record body damaged so that it still encodes
    (raw bytes) but holds what no record of ours holds (a CBOR tag) got the cloud's 4.00 for its
    device's whole /relay entry: the device was held and paused, 300 s doubling to an hour, for
    ever, and its later records never went. The entry is sent again in halves until each record
    refused is alone (one request per round, at most log2 of the entry's records rounds); those
    are set aside (said, counted, kept in relay_kept) and the device's others go, each once."""
    server, _, site, forwarder = forwarder_of
    site.ingest_many([(A, [reading(i) for i in range(1, 65)], True)], T0)
    site.ingest_many([(B, [reading(1)], True)], T0)
    bad = (10, 50)
    site.db.execute(
        "UPDATE records SET body = x'c24101' WHERE device = ? AND seq IN (10, 50)", (A,)
    )
    with caplog.at_level(logging.WARNING, logger="agent.gateway"):
        assert await forwarder.forward_once() == 63  # A's 62 and B's 1
    assert forwarder.requests <= 1 + 6  # the first, and a round per halving of 64 records
    said = [r.getMessage() for r in caplog.records if "forward_record_refused" in r.msg]
    assert [s.split()[2] for s in said] == ["seq=10", "seq=50"] and "code=4.00" in said[0]
    assert "event=forward_refused " not in caplog.text  # the device is not held nor paused
    assert forwarder.refused == 2 and forwarder.later.until == {}
    assert await server.seqs(A) == [q for q in range(1, 65) if q not in bad]
    assert await server.seqs(B) == [1]
    assert site.db.execute("SELECT seq FROM relay_kept ORDER BY seq").fetchall() == [(10,), (50,)]
    site.ingest_many([(A, [reading(65)], False)], T0 + 1)
    assert await forwarder.forward_once() == 1  # its later records go
    assert await server.seqs(A) == [q for q in range(1, 66) if q not in bad]
    assert len(await server.records(A)) == 63


@pytest.mark.timeout(60)
async def test_a_full_store_when_records_are_held_fails_the_pass_and_loses_nothing(
    limited: tuple[CloudServer, Clock], tmp_path: Path
) -> None:
    """Attack named: a disk that fills. The gateway's store refusing the rows of the records held
    for later (SQLITE_FULL) raised sqlite3.OperationalError out of the pass: the forwarding loop
    retries SyncError and OSError only, so its task ended and nothing was forwarded any more,
    for any device. The pass fails as a SyncError (retried), its cursor unmoved; once the store
    takes them, every record is stored once."""
    server, clock = limited
    gw, site, forwarder = await forwarding(server, clock, tmp_path)
    try:
        assert server.rate_limit.wait(A, BURST) == 0
        site.ingest_many([(A, [reading(i) for i in range(1, 2001)], True)], T0)
        site.ingest_many([(B, [reading(1)], True)], T0)
        await forwarder._check_cursor()  # the store's gateway parts, before it is full
        (pages,) = site.db.execute("PRAGMA page_count").fetchone()
        site.db.execute(f"PRAGMA max_page_count = {pages}")
        cursor = forwarder.cursor
        with pytest.raises(SyncError, match="held"):
            await forwarder.forward_once()
        assert forwarder.cursor == cursor  # nothing passed that is not on disk
        assert await server.seqs(B) == [1]
        site.db.execute(f"PRAGMA max_page_count = {pages * 100}")  # space freed
        assert await forwarder.forward_once() == 1  # B's again: stored once; A's held now
        assert site.db.execute("SELECT count(*) FROM relay_later").fetchone()[0] == 2000
        clock.t += 60.0
        assert await forwarder.forward_once() == 2000
        assert await server.seqs(A) == list(range(1, 2001))
        assert len(await server.records(B)) == 1
    finally:
        site.close()
        await gw.close()


@pytest.mark.timeout(60)
async def test_a_full_store_frees_what_the_cloud_holds_while_the_passes_fail(
    limited: tuple[CloudServer, Clock], tmp_path: Path
) -> None:
    """Attack named: a disk that fills. The prune ran only after a pass that succeeded: with the
    store full, every pass failed (the records held for later did not fit) and the records the
    cloud had acknowledged long ago were never dropped, so the store could not free itself. The
    prune runs after a failed pass too, and takes only what the cloud acknowledged: never a
    record beyond the cursor, held, or a device's newest."""
    server, clock = limited
    gw, site, forwarder = await forwarding(server, clock, tmp_path)
    now = [T0 + 30.0]
    forwarder.wall = lambda: now[0]
    try:
        site.ingest_many([(B, [reading(i) for i in range(1, 11)], True)], T0)
        assert await forwarder.forward_once() == 10
        assert site.seqs(B) == list(range(1, 11))  # acknowledged, received 30 s ago only
        assert server.rate_limit.wait(A, BURST) == 0
        site.ingest_many([(A, [reading(i) for i in range(1, 2001)], True)], T0 + 31)
        now[0] = T0 + 200.0  # B's are older than keep now
        (pages,) = site.db.execute("PRAGMA page_count").fetchone()
        site.db.execute(f"PRAGMA max_page_count = {pages}")
        for _ in range(2):
            with pytest.raises(SyncError, match="held"):
                await forwarder.forward_once()
        assert site.seqs(B) == [10]  # dropped: the cloud holds them; the newest stays
        assert site.seqs(A) == list(range(1, 2001))  # beyond the cursor: none taken
        site.db.execute(f"PRAGMA max_page_count = {pages * 100}")
        assert await forwarder.forward_once() == 0  # A's answered later: held
        now[0] = T0 + 400.0
        assert await forwarder.forward_once() == 0
        assert site.seqs(A) == list(range(1, 2001))  # held: never pruned
        clock.t += 300.0
        assert await forwarder.forward_once() == 2000
        assert await server.seqs(A) == list(range(1, 2001))
        assert await server.seqs(B) == list(range(1, 11))
    finally:
        site.close()
        await gw.close()


@pytest.mark.timeout(120)
async def test_a_device_the_cloud_refuses_is_held_and_paused_and_the_others_go_on(
    limited: tuple[CloudServer, Clock], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A relay entry refused for another reason than the rate limit (4.03: the device is no
    longer attached to this gateway at the cloud) failed the whole pass as a SyncError and held
    the cursor: every other device behind the gateway stalled for ever. The device's records are
    held as "later" ones are (never pruned, never dropped), it is paused (REFUSED_PAUSE, doubled
    at each refusal that follows), said once per episode; the others go on. After a restart the
    held records are still there; once the device is attached again each is stored once."""
    server, clock = limited
    gw, site, forwarder = await forwarding(server, clock, tmp_path)
    try:
        await server.detach([A])  # moved away from this gateway at the cloud
        site.ingest_many([(A, [reading(i) for i in range(1, 6)], True)], T0)
        site.ingest_many([(B, [reading(i) for i in range(1, 6)], True)], T0)
        with caplog.at_level(logging.INFO, logger="agent.gateway"):
            assert await forwarder.forward_once() == 5  # B's; A's refused (4.03): held
            assert await server.seqs(B) == list(range(1, 6)) and await server.seqs(A) == []
            assert site.db.execute("SELECT count(*) FROM relay_later").fetchone()[0] == 5
            site.ingest_many([(A, [reading(6)], False), (B, [reading(6)], False)], T0 + 1)
            requests = forwarder.requests
            assert await forwarder.forward_once() == 1  # B's; A paused: nothing sent for it
            assert forwarder.requests == requests + 1
            clock.t += later.REFUSED_PAUSE
            assert await forwarder.forward_once() == 0  # A's sent again, refused again
            assert forwarder.later.until[A] == clock.t + 2 * later.REFUSED_PAUSE  # doubled
        said = [r for r in caplog.records if "event=forward_refused" in r.getMessage()]
        assert len(said) == 1 and "4.03" in said[0].getMessage()  # once per episode
        assert forwarder.later.refusals == 2
        assert site.db.execute("SELECT count(*) FROM relay_later").fetchone()[0] == 6
        assert site.seqs(A) == list(range(1, 7))  # the prune takes none of them
        # a restarted gateway: the held records are on disk, its pauses are not
        again = RecordForwarder(
            on(site), gw.transport, lambda: server.uri, tmp_path / "gw-data", name=GW,
            keep=60.0, wall=lambda: T0 + 10_000.0,
        )  # fmt: skip
        again.later.now = clock
        assert await again.forward_once() == 0  # sent, refused: held again
        assert site.db.execute("SELECT count(*) FROM relay_later").fetchone()[0] == 6
        await server.attach(GW, [A])  # the operator attaches it again
        clock.t += later.REFUSED_PAUSE
        with caplog.at_level(logging.INFO, logger="agent.gateway"):
            assert await again.forward_once() == 6
        assert "event=forward_refused_over" in caplog.text
        assert await server.seqs(A) == list(range(1, 7))
        assert site.db.execute("SELECT count(*) FROM relay_later").fetchone()[0] == 0
        assert await again.forward_once() == 0  # nothing twice
        assert len(await server.records(A)) == 6 and len(await server.records(B)) == 6
    finally:
        site.close()
        await gw.close()


@pytest.mark.timeout(240)
async def test_a_real_agent_over_its_limit_is_slowed_and_every_record_arrives_once(
    tmp_path: Path,
) -> None:
    """``edge-agent run`` on the simulated rig (8x real time: about 15 records/s) against an
    endpoint that takes 5 records/s from it: it gets 5.03 with Max-Age, keeps its records queued,
    pauses and sends them again; some go meanwhile (slowed, not stopped). Once the limit is
    raised (an operator restarting with a larger --device-rate) every record it committed is
    stored exactly once, none set aside."""
    from tests.e2e.test_sync_e2e import (
        AgentProcess,
        committed_in,
        example_config,
        stored_or_queued,
        strip_tables,
    )

    device_id = "pump-rig-01"
    limits = Limits(device_rate=5.0, device_burst=20)
    server = await CloudServer.start(tmp_path / "cloud", "127.0.0.1", 0, limits=limits)
    (await server.register(device_id)).write(tmp_path / "agent" / "credential.json")
    text = (
        strip_tables(example_config().read_text(), "uplink")
        .replace('data_dir = "/var/lib/edge-agent"', f'data_dir = "{tmp_path / "agent"}"')
        .replace("interval = 1.0", "interval = 4.0")
    )
    text += "commissioning_samples = 60\n"  # the [detect] table ends the example
    text += f'\n[uplink]\nendpoints = ["{server.uri}"]\nbackoff_max = 10.0\n'
    config = tmp_path / "agent.toml"
    config.write_text(text)
    log = tmp_path / "agent.log"
    agent = AgentProcess(config, log)
    try:
        await agent.start()
        async with asyncio.timeout(60):  # refused some, stored some: slowed, not stopped
            while (  # noqa: ASYNC110 - the endpoint is polled
                server.stats["rate_limited_batches"] < 3 or len(await server.seqs(device_id)) < 40
            ):
                await asyncio.sleep(0.5)
        assert server.responses["5.03 Service Unavailable"] >= 3
        server.rate_limit = DeviceRateLimit.of(Limits(), time.monotonic, server.stats)
        async with asyncio.timeout(90):
            while not (done := committed_in(log)) or not set(done) <= set(  # noqa: ASYNC110
                await server.seqs(device_id)
            ):
                await asyncio.sleep(0.5)
        assert await agent.stop() == 0
    finally:
        if agent.proc is not None and agent.proc.returncode is None:
            agent.proc.kill()
            await agent.proc.wait()
    committed = committed_in(log)
    try:
        stored, queued = await stored_or_queued(server, device_id, config, committed)
        records = await server.records(device_id)
    finally:
        await server.stop()
    assert len(committed) >= 40  # what phase one saw stored, at least
    assert set(stored) | queued == set(committed)  # every one (queued: committed as it stopped)
    assert set(stored) <= set(committed)  # and nothing it did not commit
    assert len(queued) <= 20  # the last instant's records, not a backlog
    assert len(stored) == len(records) == len(set(stored))  # each once
    assert "event=record_rejected" not in log.read_text()  # none set aside
