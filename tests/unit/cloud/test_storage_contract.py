"""The contract of the endpoint's storage (cloud/storebase.py), run against both implementations:
SQLite in a temporary directory and PostgreSQL in a fresh database of the session's private
cluster (tests/pg.py). Two storage objects on one database stand for two endpoint processes.

Real databases only. Where the two must differ (SQLite knows only *that* another connection
committed, PostgreSQL's notices say *what*), the test says which answer each gives. Nothing here
waits on a clock; notices between PostgreSQL sessions are asynchronous, so a test that needs one
polls for it a bounded number of times.
"""

from __future__ import annotations

import itertools
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from agent.wire.batch import WireRecord
from agent.wire.credentials import Credential
from agent.wire.features import ChannelFeatures, FeaturesBody
from agent.wire.records import AlertBody, TelemetryBody
from agent.wire.statedoc import MAX_VERSION_AHEAD, Entry, RawValue
from cloud.storage import (
    CredentialChanged,
    DocumentTooLarge,
    DuplicateKeyId,
    IngestResult,
    PreconditionFailed,
    SQLiteStorage,
    Storage,
    StorageThread,
    StorageUnavailable,
    UnknownDevice,
    describe,
    open_storage,
)

T0 = 1_700_000_000.0  # 2023-11-14 22:13:20 UTC
DAY = 86_400.0
DEV = "pump-01"
NOTICE_POLLS = 200  # rounds of 20 ms a test waits at most for a PostgreSQL notice


def telemetry(seq: int, value: float = 1.0, device_time: float | None = None) -> WireRecord:
    when = T0 + seq if device_time is None else device_time
    body = TelemetryBody("motor", when, {"current_a": value})
    return WireRecord(seq, "telemetry", when + 0.001, body.to_cbor())


def alert(seq: int) -> WireRecord:
    body = AlertBody(T0 + seq, {"score": 0.97, "verdict": "anomaly", "raise": True})
    return WireRecord(seq, "alert", T0 + seq, body.to_cbor())


def sqlite_schema_version() -> int:
    from cloud import storage

    return storage.SCHEMA_VERSION


def pg_schema_version() -> int:
    from cloud import pgschema

    return pgschema.SCHEMA_VERSION


@dataclass
class Backend:
    """One implementation under test: ``open()`` opens another storage object on the same
    database (closed after the test); ``sql()`` runs a statement on a connection of its own."""

    name: str
    target: str  # the SQLite file, or the PostgreSQL DSN
    opened: list[Storage] = field(default_factory=list)

    def open(self) -> Storage:
        storage: Storage
        if self.name == "sqlite":
            storage = SQLiteStorage(self.target)
        else:
            from cloud.pgstorage import PostgresStorage

            storage = PostgresStorage(self.target)
        self.opened.append(storage)
        return storage

    def sql(self, statement: str) -> list[tuple[Any, ...]]:
        if self.name == "sqlite":
            db = sqlite3.connect(self.target, isolation_level=None)
            try:
                return db.execute(statement).fetchall()
            finally:
                db.close()
        import psycopg

        with psycopg.connect(self.target, autocommit=True) as conn:
            cur = conn.execute(statement)
            return cur.fetchall() if cur.description else []

    def set_schema_version(self, version: int) -> None:
        if self.name == "sqlite":
            self.sql(f"PRAGMA user_version = {version}")
        else:
            self.sql(f"INSERT INTO schema_version VALUES ({version}, 0)")

    def fail_inserts_of(self, device: str) -> None:
        """Every insert of a record of ``device`` fails inside the database (a stand-in for a
        disk that fills in the middle of a transaction)."""
        if self.name == "sqlite":
            self.sql(
                f"CREATE TRIGGER boom BEFORE INSERT ON records WHEN NEW.device = '{device}' "
                "BEGIN SELECT RAISE(ABORT, 'could not extend file: No space left'); END"
            )
        else:
            self.sql(
                "CREATE FUNCTION boom() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
                "RAISE EXCEPTION 'could not extend file: No space left' USING ERRCODE = '53100';"
                " END $$"
            )
            self.sql(
                "CREATE TRIGGER boom BEFORE INSERT ON records FOR EACH ROW "
                f"WHEN (NEW.device = '{device}') EXECUTE FUNCTION boom()"
            )


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    if request.param == "sqlite":
        target = str(tmp_path / "cloud" / "cloud.sqlite3")
    else:
        target = request.getfixturevalue("pg_dsn")
    found = Backend(request.param, target)
    yield found
    for storage in found.opened:
        storage.close()


@pytest.fixture
def storage(backend: Backend) -> Storage:
    s = backend.open()
    s.add_device(DEV, T0)
    return s


def poll_changes(
    storage: Storage, token: object, want: Callable[[frozenset[str] | None, bool], bool]
) -> tuple[object, frozenset[str] | None, bool]:
    """changes() until ``want(devices, credentials)`` (PostgreSQL notices are asynchronous)."""
    for _ in range(NOTICE_POLLS):
        token, devices, creds = storage.changes(token)
        if want(devices, creds):
            return token, devices, creds
        time.sleep(0.02)
    raise AssertionError(f"no change reported (last: {devices}, {creds})")


# -- devices and records -------------------------------------------------------------------------


def test_both_are_a_storage(storage: Storage) -> None:
    assert isinstance(storage, Storage)


def test_devices_are_registered_once(backend: Backend) -> None:
    s = backend.open()
    assert s.add_device("b-2", T0) is True
    assert s.add_device("a-1", T0 + 1) is True
    assert s.add_device("b-2", T0 + 2) is False
    assert s.device("nope") is None
    info = s.device("b-2")
    assert info is not None
    assert (info.id, info.registered, info.last_seen, info.records, info.last_seq) == (
        "b-2",
        T0,
        None,
        0,
        None,
    )
    assert [d.id for d in s.devices()] == ["a-1", "b-2"]  # byte order, as SQLite


def test_a_batch_is_stored_once_and_acknowledged_twice(storage: Storage) -> None:
    batch = [telemetry(s) for s in range(10, 20)]
    first = storage.ingest(DEV, batch, T0 + 100)
    second = storage.ingest(DEV, batch, T0 + 200)
    assert first == IngestResult(tuple(range(10, 20)), 10, 0, 0, (), 19)
    assert second == IngestResult(tuple(range(10, 20)), 0, 10, 0, (), 19)
    assert storage.seqs(DEV) == list(range(10, 20))
    stored = storage.records(DEV)
    assert [(r.seq, r.kind, r.created, r.body) for r in stored] == [
        (r.seq, r.kind, r.created, r.body) for r in batch
    ]
    assert {r.received for r in stored} == {T0 + 100}  # the first copy stays
    assert stored[0].time == T0 + 10  # the time in the body
    info = storage.device(DEV)
    assert info is not None
    assert (info.records, info.last_seq, info.last_seen) == (10, 19, T0 + 200)


def test_a_reused_seq_with_other_content_is_a_conflict_and_the_first_copy_stays(
    storage: Storage,
) -> None:
    storage.ingest(DEV, [telemetry(1, 1.0)], T0)
    result = storage.ingest(DEV, [telemetry(1, 9.0), telemetry(2)], T0 + 1)
    assert (result.new, result.duplicate, result.conflict, result.conflicts) == (1, 1, 1, (1,))
    [first, _] = storage.records(DEV)
    assert TelemetryBody.from_cbor(first.body).values["current_a"] == 1.0


def test_a_seq_twice_in_one_batch_is_new_then_a_duplicate(storage: Storage) -> None:
    result = storage.ingest(DEV, [telemetry(5), telemetry(5), telemetry(5, 7.0)], T0)
    assert (result.new, result.duplicate, result.conflicts) == (1, 2, (5,))
    assert storage.seqs(DEV) == [5]


def test_last_is_the_highest_seq_after_each_batch(storage: Storage) -> None:
    assert storage.ingest(DEV, [telemetry(7), telemetry(3)], T0).last == 7
    assert storage.ingest(DEV, [telemetry(4)], T0).last == 7
    assert storage.ingest(DEV, [], T0).last == 7
    [a, b] = storage.ingest_many([(DEV, [telemetry(9)], False), (DEV, [telemetry(12)], False)], T0)
    assert (a, b) == (
        IngestResult((9,), 1, 0, 0, (), 9),
        IngestResult((12,), 1, 0, 0, (), 12),
    )
    assert storage.ingest("new-1", [], T0, register=True).last is None


def test_arrival_is_strictly_increasing_in_store_order(backend: Backend, storage: Storage) -> None:
    storage.add_device("other", T0)
    storage.ingest(DEV, [telemetry(s) for s in range(0, 6)], T0)
    storage.ingest("other", [telemetry(1)], T0)
    # alerts first, a gap, out of order, overlapping the first batch
    storage.ingest(DEV, [alert(9), telemetry(4), telemetry(5), telemetry(6), telemetry(7)], T0)
    again = backend.open()  # another process stores after this one
    again.ingest("other", [telemetry(2)], T0)
    storage.ingest(DEV, [telemetry(8)], T0)
    arrived = storage.records(DEV, by_arrival=True)
    assert [r.seq for r in arrived] == [0, 1, 2, 3, 4, 5, 9, 6, 7, 8]
    everything = sorted(
        (r.arrival, r.device, r.seq) for d in (DEV, "other") for r in storage.records(d)
    )
    assert [(d, s) for _, d, s in everything] == [
        *[(DEV, s) for s in range(6)],
        ("other", 1),
        (DEV, 9),
        (DEV, 6),
        (DEV, 7),
        ("other", 2),
        (DEV, 8),
    ]
    arrivals = [a for a, _, _ in everything]
    assert len(set(arrivals)) == len(arrivals)


def test_records_since_limit_and_counts(storage: Storage) -> None:
    storage.ingest(DEV, [telemetry(1), alert(2), telemetry(3), telemetry(4)], T0)
    assert [r.seq for r in storage.records(DEV, since=T0 + 2.5)] == [3, 4]
    assert [r.seq for r in storage.records(DEV, limit=2)] == [1, 2]
    assert [r.seq for r in storage.records(DEV, since=T0 + 2, limit=1)] == [2]
    assert storage.counts(DEV) == {"telemetry": 3, "alert": 1}
    assert storage.counts("nobody") == {}
    assert storage.records("nobody") == []


def test_an_unknown_device_is_refused_unless_registered(storage: Storage) -> None:
    with pytest.raises(UnknownDevice):
        storage.ingest("stranger", [telemetry(1)], T0)
    assert storage.device("stranger") is None
    result = storage.ingest("stranger", [telemetry(1)], T0, register=True)
    assert result.new == 1
    info = storage.device("stranger")
    assert info is not None and info.registered == T0


def test_ingest_many_commits_all_but_the_unknown_device(backend: Backend, storage: Storage) -> None:
    storage.ingest(DEV, [telemetry(1)], T0)
    results = storage.ingest_many(
        [
            (DEV, [telemetry(1), telemetry(2)], False),
            ("stranger", [telemetry(1)], False),
            ("newcomer", [telemetry(5)], True),
            (DEV, [telemetry(2), telemetry(3, 4.0)], False),  # a retransmission in the group
            (DEV, [telemetry(3, 5.0)], False),  # reuses 3 with other content
        ],
        T0 + 10,
    )
    assert results[0] == IngestResult((1, 2), 1, 1, 0, (), 2)
    assert isinstance(results[1], UnknownDevice)
    assert results[2] == IngestResult((5,), 1, 0, 0, (), 5)
    assert results[3] == IngestResult((2, 3), 1, 1, 0, (), 3)
    assert results[4] == IngestResult((3,), 0, 1, 1, (3,), 3)
    other = backend.open()  # committed: another process sees it
    assert other.seqs(DEV) == [1, 2, 3]
    assert other.seqs("newcomer") == [5]
    assert other.device("stranger") is None
    assert other.seqs("stranger") == []
    assert storage.ingest_many([], T0) == []


def test_ingest_many_that_fails_in_the_database_stores_nothing(
    backend: Backend, storage: Storage
) -> None:
    """Attack/fault: the disk fills in the middle of a group commit."""
    storage.add_device("doomed", T0)
    storage.ingest(DEV, [telemetry(1)], T0)
    backend.fail_inserts_of("doomed")
    with pytest.raises(StorageUnavailable) as caught:
        storage.ingest_many(
            [
                (DEV, [telemetry(2)], False),
                ("newcomer", [telemetry(1)], True),
                ("doomed", [telemetry(1)], False),
            ],
            T0 + 5,
        )
    assert "\n" not in str(caught.value)
    assert type(caught.value.__cause__).__module__.split(".")[0] in ("sqlite3", "psycopg")
    assert storage.seqs(DEV) == [1]
    assert storage.device("newcomer") is None
    info = storage.device(DEV)
    assert info is not None and info.last_seen == T0
    assert storage.ingest(DEV, [telemetry(2)], T0 + 6).new == 1  # the storage goes on


# -- state ---------------------------------------------------------------------------------------


def test_reported_merges_by_rule_and_refuses_versions_far_ahead(storage: Storage) -> None:
    ahead = int(T0 * 1000) + MAX_VERSION_AHEAD + 1
    first = storage.put_reported(
        DEV,
        {"link/state": Entry(5, "up"), "counter/boots": Entry(1, 3), "fw/version": Entry(ahead, 1)},
        T0,
    )
    assert first.versions == {"link/state": 5, "counter/boots": 1}
    assert first.refused == {"fw/version": ahead}
    assert not first.desired_changed
    second = storage.put_reported(
        DEV, {"link/state": Entry(4, "down"), "counter/boots": Entry(2, 2)}, T0 + 1
    )
    assert second.versions == {"link/state": 5, "counter/boots": 2}
    assert storage.reported(DEV) == {
        "counter/boots": Entry(2, 3),  # MAX: the highest value stays
        "link/state": Entry(5, "up"),  # LWW: the older version changes nothing
    }
    with pytest.raises(DocumentTooLarge):
        storage.put_reported(DEV, {"a/b": Entry(1, 1), "c/d": Entry(1, 1)}, T0, max_keys=3)
    assert set(storage.reported(DEV)) == {"counter/boots", "link/state"}
    with pytest.raises(UnknownDevice):
        storage.put_reported("stranger", {"link/state": Entry(1, "up")}, T0)


def test_reported_keys_reads_a_few_keys_of_many_devices(backend: Backend, storage: Storage) -> None:
    """What the learning coordinator reads each tick: ``learn/<model>`` and ``desired/errors``
    of a round's devices (more devices than one statement takes), nothing else; a stored value
    this endpoint cannot read comes back raw, as from reported()."""
    devices = [f"d-{i:04d}" for i in range(1000)]
    for i, d in enumerate(devices):
        storage.add_device(d, T0)
        entries = {"link/state": Entry(1, "up"), "learn/m": Entry(2, {"round": i})}
        if i % 2:
            entries["desired/errors"] = Entry(3, {"learn/m": {"version": i, "error": "no"}})
        storage.put_reported(d, entries, T0)
    backend.sql(
        f"UPDATE reported SET value = {_hex(backend, 'ffff')} "
        "WHERE device = 'd-0007' AND key = 'learn/m'"
    )
    wanted = [*devices[::-1], "stranger", DEV]
    got = backend.open().reported_keys(wanted, ["learn/m", "desired/errors", "learn/m"])
    assert set(got) == set(devices)  # reported none of them: absent
    assert got["d-0004"] == {"learn/m": Entry(2, {"round": 4})}
    assert got["d-0999"] == {
        "learn/m": Entry(2, {"round": 999}),
        "desired/errors": Entry(3, {"learn/m": {"version": 999, "error": "no"}}),
    }
    assert isinstance(got["d-0007"]["learn/m"].value, RawValue)
    assert storage.reported_keys([], ["learn/m"]) == {}
    assert storage.reported_keys(devices, []) == {}


def test_reported_link_values_go_to_the_link_history(backend: Backend, storage: Storage) -> None:
    storage.put_reported(DEV, {"link/state": Entry(1, "up"), "link/rtt_ms": Entry(1, 40)}, T0)
    storage.put_reported(DEV, {"link/state": Entry(2, "up")}, T0 + 1)  # same value: not kept
    storage.put_reported(DEV, {"link/state": Entry(3, "down")}, T0 + 2)
    storage.put_reported(DEV, {"link/rtt_ms": Entry(2, 50)}, T0 + 3)  # too soon after 40
    rows = backend.sql(f"SELECT time, key FROM link_history WHERE device = '{DEV}'")
    assert sorted(rows) == [(T0, "link/rtt_ms"), (T0, "link/state"), (T0 + 2, "link/state")]


def test_a_reported_model_failure_blocks_the_desired_version(
    backend: Backend, storage: Storage
) -> None:
    doc, changed = storage.put_desired(DEV, {"model/main": {"name": "m1"}}, T0)
    assert changed == ["model/main"] and doc.rev == 1
    failed = {"name": "m1", "status": "failed", "desired": 1}
    result = storage.put_reported(DEV, {"model/main": Entry(10, failed)}, T0 + 1)
    assert result.desired_changed
    assert result.desired.blocked == {"model/main": 1}
    assert backend.open().desired(DEV).blocked == {"model/main": 1}
    # assigning it again is a retry: a new version, unblocked
    retry, changed = storage.put_desired(DEV, {"model/main": {"name": "m1"}}, T0 + 2)
    assert changed == ["model/main"] and retry.blocked == {} and retry.rev == 2


def test_desired_if_match_and_size_limit(storage: Storage) -> None:
    empty = storage.desired(DEV)
    assert (empty.rev, empty.entries) == (0, {})
    assert empty.store == storage.storage_id()
    doc, changed = storage.put_desired(
        DEV, {"sensor/motor/interval": 5}, T0, if_match=[empty.etag()]
    )
    assert changed == ["sensor/motor/interval"] and doc.rev == 1
    with pytest.raises(PreconditionFailed):
        storage.put_desired(DEV, {"sensor/motor/interval": 6}, T0, if_match=[empty.etag()])
    same, changed = storage.put_desired(DEV, {"sensor/motor/interval": 5}, T0)
    assert changed == [] and same == doc  # no change: no new version
    assert storage.desired(DEV) == doc
    size = len(doc.to_cbor())
    with pytest.raises(DocumentTooLarge):  # grows beyond the limit
        storage.put_desired(DEV, {"detect/motor/threshold": 1.0}, T0, max_bytes=size + 5)
    assert storage.desired(DEV) == doc
    # a document over a (new, lower) limit may still shrink
    shrunk, changed = storage.put_desired(DEV, {"sensor/motor/interval": None}, T0, max_bytes=1)
    assert changed == ["sensor/motor/interval"]
    assert shrunk.entries["sensor/motor/interval"] == Entry(2, None)
    info = storage.device(DEV)
    assert info is not None and info.desired_rev == 2
    with pytest.raises(UnknownDevice):
        storage.put_desired("stranger", {"sensor/motor/interval": 5}, T0)
    with pytest.raises(UnknownDevice):
        storage.desired("stranger")


# -- credentials, identity, sequence numbers ----------------------------------------------------


def test_credentials_duplicate_key_ids_rekey_and_revoke(backend: Backend, storage: Storage) -> None:
    a = Credential.generate("dev-a", "device", b"\x01")
    b = Credential.generate("dev-b", "device", b"\x02")
    storage.put_credential(a, T0)
    storage.put_credential(b, T0)
    with pytest.raises(DuplicateKeyId):
        storage.put_credential(Credential.generate("dev-c", "device", b"\x01"), T0)
    assert storage.revoke("dev-a", T0 + 1) is True
    assert storage.revoke("nobody", T0 + 1) is False
    assert backend.open().credentials() == [(a, True), (b, False)]
    rekeyed = Credential.generate("dev-a", "device", b"\x03", generation=2)
    storage.put_credential(rekeyed, T0 + 2)  # re-key: a new key id, no longer revoked
    storage.put_credential(Credential.generate("dev-c", "operator", b"\x01"), T0)  # freed
    assert [(c.principal, c.sender_id, r) for c, r in storage.credentials()] == [
        ("dev-a", b"\x03", False),
        ("dev-b", b"\x02", False),
        ("dev-c", b"\x01", False),
    ]


def test_conditional_credential_writes_take_effect_whole_or_not_at_all(
    backend: Backend, storage: Storage
) -> None:
    """A rekey or rotation writes only over the generation it read (0: none), and a rotation
    (``unrevoke=False``) never over a revocation; a refused write changes nothing."""
    first = Credential.generate("dev-a", "device", b"\x01")
    storage.put_credential(first, T0, replaces=0)
    with pytest.raises(CredentialChanged):  # a second "add" of the same principal
        storage.put_credential(Credential.generate("dev-a", "device", b"\x02"), T0, replaces=0)
    second = Credential.generate("dev-a", "device", b"\x03", generation=2)
    storage.put_credential(second, T0 + 1, replaces=1)
    stale = Credential.generate("dev-a", "device", b"\x04", generation=2)
    with pytest.raises(CredentialChanged):  # read generation 1 before the write above
        storage.put_credential(stale, T0 + 2, replaces=1)
    assert storage.revoke("dev-a", T0 + 3)
    third = Credential.generate("dev-a", "device", b"\x05", generation=3)
    with pytest.raises(CredentialChanged):  # a rotation does not make a revoked one valid
        storage.put_credential(third, T0 + 4, replaces=2, unrevoke=False)
    assert backend.open().credentials() == [(second, True)]
    storage.put_credential(third, T0 + 5, replaces=2)  # a rekey re-admits it
    assert backend.open().credentials() == [(third, False)]
    storage.put_credential(second, T0 + 6)  # unconditional (a gateway's copy, a migration)
    assert backend.open().credentials() == [(second, False)]


def test_conditional_credential_writes_race_across_connections(backend: Backend) -> None:
    """Eight connections (threads; processes on PostgreSQL share nothing else) read generation
    1 and each writes its own generation 2: exactly one takes effect."""
    setup = backend.open()
    setup.put_credential(Credential.generate("dev-a", "device", b"\x01"), T0)
    won: list[Credential] = []
    lost: list[BaseException] = []
    barrier = threading.Barrier(8)

    def writer(i: int) -> None:
        s = backend.open()
        mine = Credential.generate("dev-a", "device", bytes([0x10 + i]), generation=2)
        barrier.wait()
        try:
            s.put_credential(mine, T0 + 1, replaces=1, unrevoke=False)
            won.append(mine)
        except CredentialChanged as err:
            lost.append(err)
        finally:
            s.close()

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1 and len(lost) == 7
    assert setup.credentials() == [(won[0], False)]
    setup.close()


def test_storage_id_is_random_stored_once_and_kept(backend: Backend, tmp_path: Path) -> None:
    s = backend.open()
    ident = s.storage_id()
    assert len(ident) == 16 and int(ident, 16) < 2**63
    s.close()
    assert backend.open().storage_id() == ident
    other = SQLiteStorage(tmp_path / "elsewhere" / "cloud.sqlite3")
    try:
        assert other.storage_id() != ident
    finally:
        other.close()


def test_reserve_sequence_blocks_are_disjoint_across_processes(backend: Backend) -> None:
    blocks: list[tuple[int, int]] = []
    lock = threading.Lock()
    errors: list[BaseException] = []

    def process() -> None:
        try:
            s = backend.open()  # SQLite: a connection belongs to its thread
            for n in range(1, 26):
                start = s.reserve_sequence("dev-a", n)
                with lock:
                    blocks.append((start, start + n))
            s.close()
        except BaseException as err:  # pragma: no cover - reported below
            errors.append(err)

    threads = [threading.Thread(target=process) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    blocks.sort()
    assert len(blocks) == 75
    assert all(a_end <= b_start for (_, a_end), (b_start, _) in itertools.pairwise(blocks))
    assert blocks[0][0] == 0


def test_reserve_sequence_is_monotone_across_reopen_and_honours_at_least(
    backend: Backend,
) -> None:
    s = backend.open()
    assert s.reserve_sequence("dev-a", 10) == 0
    assert s.reserve_sequence("dev-a", 10, at_least=5) == 10
    assert s.reserve_sequence("dev-b", 1, at_least=1000) == 1000  # per principal
    s.close()
    again = backend.open()
    assert again.reserve_sequence("dev-a", 1) == 20
    assert again.reserve_sequence("dev-a", 1, at_least=500) == 500
    assert again.reserve_sequence("dev-a", 1) == 501
    assert again.reserve_sequence("dev-b", 1) == 1001
    for bad in ((0, 0), (-1, 0), (1, -1), (2**63, 0)):
        with pytest.raises(ValueError):
            again.reserve_sequence("dev-a", *bad)


# -- changes made by another process -------------------------------------------------------------


def test_changes_sees_desired_state_written_by_another_process(backend: Backend) -> None:
    server = backend.open()
    server.add_device(DEV, T0)
    server.add_device("quiet", T0)
    token, devices, creds = server.changes(None)
    assert (devices, creds) == (frozenset(), False)
    token, devices, creds = server.changes(token)
    assert (devices, creds) == (frozenset(), False)  # nothing happened
    cli = backend.open()
    cli.put_desired(DEV, {"sensor/motor/interval": 5}, T0)
    token, devices, creds = poll_changes(server, token, lambda d, c: d != frozenset())
    if backend.name == "postgresql":
        assert devices == frozenset({DEV})  # names the device (and no credential)
        assert creds is False
    else:
        assert (devices, creds) == (None, True)  # SQLite: something, re-read everything
    token, devices, creds = server.changes(token)
    assert (devices, creds) == (frozenset(), False)  # reported once
    version = server.data_version()
    cli.put_credential(Credential.generate("dev-a", "device", b"\x01"), T0)
    token, devices, creds = poll_changes(server, token, lambda d, c: c)
    assert devices in (None, frozenset())
    assert server.data_version() != version


def test_changes_sees_a_desired_version_blocked_by_another_process(backend: Backend) -> None:
    server = backend.open()
    server.add_device(DEV, T0)
    server.put_desired(DEV, {"model/main": {"name": "m1"}}, T0)
    token, _, _ = server.changes(None)
    failed = {"name": "m1", "status": "failed", "desired": 1}
    assert backend.open().put_reported(DEV, {"model/main": Entry(3, failed)}, T0).desired_changed
    _, devices, _ = poll_changes(server, token, lambda d, c: d != frozenset())
    assert devices == (frozenset({DEV}) if backend.name == "postgresql" else None)


# -- verdicts, models, the dashboard's reader -----------------------------------------------------


def test_verdicts_are_stored_once_per_window_and_the_first_copy_stays(backend: Backend) -> None:
    one, two = backend.open(), backend.open()  # two endpoint processes (or hosts)
    assert one.verdict(DEV, 7) is None and one.put_verdicts([]) == []
    assert one.put_verdicts([(DEV, 7, "aa", b"first"), (DEV, 8, "aa", b"eight")]) == [
        b"first",
        b"eight",
    ]
    # the other process judged the same window meanwhile: it gets the stored verdict back
    assert two.put_verdicts([(DEV, 7, "aa", b"second"), (DEV, 7, "bb", b"other")]) == [
        b"first",
        b"other",
    ]
    assert two.verdict(DEV, 7, "aa") == b"first" and one.verdict(DEV, 7, "bb") == b"other"
    assert one.verdict(DEV, 7) == b"first"  # no digest: the first stored for the seq
    assert one.verdict(DEV, 7, "cc") is None and one.verdict("nobody", 7) is None
    assert one.table_count("verdicts") == 3


def test_models_are_published_once_and_read_back(backend: Backend) -> None:
    s = backend.open()
    assert s.models() == [] and s.model("m", "1") is None and s.model_file("m", "1") is None
    assert s.put_model("m", "2", b"manifest-2", b"data-2", T0 + 2) is True
    assert s.put_model("m", "1", b"manifest-1", b"data-1", T0 + 1) is True
    assert s.put_model("a", "1", b"manifest-a", b"data-a", T0) is True
    assert s.put_model("m", "1", b"other", b"other", T0 + 9) is False  # immutable
    other = backend.open()
    assert [(v.name, v.version) for v in other.models()] == [("a", "1"), ("m", "1"), ("m", "2")]
    assert [v.version for v in other.models("m")] == ["1", "2"] and other.models("z") == []
    found = other.model("m", "1")
    assert found is not None and (found.manifest, found.published) == (b"manifest-1", T0 + 1)
    assert other.model_file("m", "1") == b"data-1"
    # attack: names that would climb out of SQLite's model directory find nothing
    assert other.model("..", "m") is None and other.model_file("m/../..", "cloud.sqlite3") is None
    assert other.models("..") == []


def test_the_reader_runs_the_same_sql_on_both(storage: Storage) -> None:
    storage.ingest(DEV, [telemetry(s) for s in range(1, 11)], T0)
    with storage.reader() as db:
        assert db.dialect == storage._DIALECT  # type: ignore[attr-defined]
        (count,) = db.execute("SELECT count(*) FROM records WHERE device = ?", (DEV,)).fetchone()
        odd = db.execute(
            "SELECT seq FROM records WHERE device = ? AND seq % ? = 1 ORDER BY seq", (DEV, 2)
        ).fetchall()
    assert count == 10 and [r[0] for r in odd] == [1, 3, 5, 7, 9]
    with pytest.raises(StorageUnavailable), storage.reader() as db:
        db.execute("SELECT nothing FROM nowhere")


# -- the bulk copy of a migrate ------------------------------------------------------------------


@pytest.fixture
def empty(backend: Backend, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Storage]:
    """A second, empty storage of the same kind (a migrate's target)."""
    if backend.name == "sqlite":
        target = SQLiteStorage(tmp_path / "empty" / "cloud.sqlite3")
        yield target
        target.close()
        return
    import psycopg

    from cloud.pgstorage import PostgresStorage

    cluster = request.getfixturevalue("pg_cluster")
    name = f"empty_{next(_EMPTY)}"
    with psycopg.connect(cluster.dsn(), autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    target = PostgresStorage(cluster.dsn(name))
    yield target
    target.close()
    with psycopg.connect(cluster.dsn(), autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


_EMPTY = itertools.count(1)


def filled(storage: Storage) -> None:
    """Some of every table."""
    storage.add_device("b-2", T0 + 1)
    storage.ingest(DEV, [telemetry(s) for s in (5, 1, 3)] + [alert(9)], T0 + 10)
    storage.ingest("b-2", [telemetry(2)], T0 + DAY)  # another day (another partition)
    cf = ChannelFeatures(1.0, 0.0, 2.0, 1.2, 0.5, 3.0, 1.6, (0.25,))
    for first in (20, 30):  # features records (cloud/featurestore.py)
        feats = FeaturesBody("vib", (first, first + 2), T0, T0 + 1, {"x_g": cf})
        storage.ingest(DEV, [feats.to_record()], T0 + 10)
    storage.put_reported(DEV, {"link/state": Entry(1, "up"), "link/rtt_ms": Entry(1, 40.5)}, T0)
    storage.put_reported(DEV, {"link/state": Entry(2, "down")}, T0 + 60)
    storage.put_desired(DEV, {"model/main": {"name": "m1"}, "detect/ae/threshold": 1.5}, T0)
    storage.put_credential(Credential.generate("b-2", "device", b"\x07"), T0)
    storage.put_credential(Credential.generate("gone", "operator", b"\x08"), T0)
    storage.revoke("gone", T0 + 5)
    failed = {"name": "m1", "status": "failed", "desired": 1}
    storage.put_reported(DEV, {"model/main": Entry(3, failed)}, T0 + 70)  # blocks desired 1
    storage.put_verdicts([(DEV, 9, "d1", b"v1"), (DEV, 9, "d0", b"v0")])
    storage.put_model("m", "1", b"manifest", b"data", T0)
    storage.reserve_sequence("endpoint", 4096)
    job = storage.create_learn_job("m", lambda n: b"job %d" % n, T0)
    storage.put_learn_blob("ab" * 32, b"masters")
    storage.put_learn_update(job, 1, DEV, b"u1", T0)
    storage.put_learn_update(job, 1, "b-2", b"u2", T0 + 1)
    storage.put_credential(Credential.generate("gw-1", "gateway", b"\x09"), T0)
    storage.attach("gw-1", [DEV, "b-2"], T0 + 2)  # gateways (cloud/relaystore.py)
    sent = storage.add_command(DEV, "selftest", {}, T0 + 3)  # commands (cloud/commandstore.py)
    storage.add_command("b-2", "logs", {"since": T0}, T0 + 4)
    done = {"id": sent, "status": "ok", "result": {"ok": True}, "at": T0 + 5}
    storage.note_command_results(DEV, {"command/selftest": Entry(9, done)}, T0 + 6)
    storage.put_log_upload(DEV, T0, 2, 0, b"upload 1", T0 + 7)  # log uploads (the same module)
    storage.put_log_upload(DEV, None, 3, 1, b"upload 2", T0 + 8)
    storage.group_add("line-1", [DEV, "b-2"], T0 + 9)  # groups (cloud/releasestore.py)
    storage.set_group_release("line-1", "1.0", "ab" * 32, T0 + 9)
    storage.note_assignment(DEV, "1.0", "group line-1", T0 + 9)  # and the release history
    staged = {"result": "staged", "version": "1.0", "at": T0 + 10}
    storage.put_reported(DEV, {"agent/update": Entry(4, staged)}, T0 + 10)


def copy_all(source: Storage, target: Storage, chunk: int = 2) -> dict[str, int]:
    from cloud.storebase import TABLES
    from cloud.storesql import key_of

    new = {}
    for name, spec in TABLES.items():
        after, new[name] = None, 0
        while rows := source.dump(name, after, chunk):
            new[name] += target.load(name, rows)
            after = key_of(spec, rows[-1])
    return new


def test_dump_pages_every_table_in_key_order(storage: Storage) -> None:
    from cloud.storebase import TABLES
    from cloud.storesql import key_of

    filled(storage)
    for name in TABLES:
        whole = storage.dump(name, None, 1000)
        assert len(whole) == storage.table_count(name), name
        assert storage.dump(name, None, 2) == whole[:2]
        assert storage.dump(name, key_of(TABLES[name], whole[-1]), 10) == [], name
        assert storage.dump(name, key_of(TABLES[name], whole[0]), 1000) == whole[1:], name
    records = storage.dump("records", (DEV, 1), 2)
    assert [(r[0], r[1]) for r in records] == [(DEV, 3), (DEV, 5)]
    links = storage.dump("link_history", None, 10)
    assert [(r[1], r[4]) for r in links] == [
        ("link/rtt_ms", 40.5),
        ("link/state", "up"),
        ("link/state", "down"),
    ]
    assert [(r[3], r[4]) for r in storage.dump("verdicts", None, 10)] == [
        ("d1", b"v1"),
        ("d0", b"v0"),
    ]


def test_load_copies_every_table_and_twice_copies_nothing(storage: Storage, empty: Storage) -> None:
    from cloud.storebase import TABLES

    filled(storage)
    copied = copy_all(storage, empty)
    assert copied == {name: storage.table_count(name) for name in TABLES}
    # a re-run: nothing written once is copied twice; what may change is brought up to date
    storage.put_desired(DEV, {"detect/ae/threshold": 2.5}, T0 + 80)
    again = copy_all(storage, empty)
    assert again == {n: storage.table_count(n) if t.mutable else 0 for n, t in TABLES.items()}
    for name in TABLES:
        assert empty.dump(name, None, 1000) == storage.dump(name, None, 1000), name
    assert empty.devices() == storage.devices()
    for device in (DEV, "b-2"):
        assert empty.records(device, by_arrival=True) == storage.records(device, by_arrival=True)
        assert empty.reported(device) == storage.reported(device)
        mine, theirs = empty.desired(device), storage.desired(device)
        assert (mine.rev, mine.entries, mine.blocked) == (
            theirs.rev,
            theirs.entries,
            theirs.blocked,
        )
    assert storage.desired(DEV).blocked == {"model/main": 1}
    assert empty.credentials() == storage.credentials()
    assert empty.verdict(DEV, 9) == b"v1"  # the first stored stays the first


def test_load_keeps_the_counters_above_what_it_loaded(storage: Storage, empty: Storage) -> None:
    filled(storage)
    empty.reserve_sequence("endpoint", 10)  # the target's own counter: lower
    empty.reserve_sequence("other", 1)
    copy_all(storage, empty)
    # never a nonce twice: the next block is above every block the source handed out
    assert empty.reserve_sequence("endpoint", 1) == storage.reserve_sequence("endpoint", 1)
    assert empty.reserve_sequence("other", 1) == 1
    empty.ingest(DEV, [telemetry(100)], T0 + 20)
    top = max(r.arrival for d in (DEV, "b-2") for r in storage.records(d))
    assert empty.records(DEV, by_arrival=True)[-1].arrival > top
    empty.put_verdicts([(DEV, 10, "d", b"later")])
    assert [r[3] for r in empty.dump("verdicts", None, 10)] == ["d1", "d0", "d"]


def test_the_migration_mark_and_the_identity_taken_over(storage: Storage, empty: Storage) -> None:
    source_id = storage.storage_id()
    mine = empty.storage_id()
    assert empty.migration() is None and mine != source_id
    empty.set_migration(source_id)
    assert empty.migration() == source_id and empty.storage_id() == mine
    empty.set_migration(source_id, done=True)
    assert empty.migration() is None and empty.storage_id() == source_id
    empty.add_device(DEV, T0)
    assert empty.desired(DEV).store == source_id  # what devices are told from now on


# -- schema, failures ----------------------------------------------------------------------------


def test_a_schema_newer_than_the_code_is_refused(backend: Backend) -> None:
    backend.open().close()
    backend.set_schema_version(99)
    with pytest.raises(StorageUnavailable) as caught:
        backend.open()
    known = sqlite_schema_version() if backend.name == "sqlite" else pg_schema_version()
    assert "99" in str(caught.value) and f"({known})" in str(caught.value)
    assert "upgrade edge-agent" in str(caught.value)


def test_storages_opened_at_once_migrate_once(backend: Backend) -> None:
    """Many endpoint processes start at once on an empty database."""
    barrier = threading.Barrier(4)
    ids: list[str] = []
    errors: list[BaseException] = []

    def start() -> None:
        try:
            barrier.wait()
            s = backend.open()
            ids.append(s.storage_id())
            s.close()
        except BaseException as err:  # pragma: no cover - reported below
            errors.append(err)

    threads = [threading.Thread(target=start) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(set(ids)) == 1
    if backend.name == "postgresql":
        versions = [(v,) for v in range(1, pg_schema_version() + 1)]
        assert backend.sql("SELECT version FROM schema_version ORDER BY version") == versions
        assert backend.sql("SELECT count(*) FROM meta WHERE name = 'storage_id'") == [(1,)]


def test_a_database_that_cannot_be_reached_is_unavailable(backend: Backend, tmp_path: Path) -> None:
    if backend.name == "sqlite":
        (tmp_path / "file").write_text("not a directory")
        target = str(tmp_path / "file" / "cloud.sqlite3")
        with pytest.raises(StorageUnavailable) as caught:
            SQLiteStorage(target)
    else:
        import socket

        from cloud.pgstorage import PostgresStorage

        with socket.socket() as sock:  # a port nobody listens on
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        target = f"postgresql://edge:s3cret-pass@127.0.0.1:{port}/edge"
        with pytest.raises(StorageUnavailable) as caught:
            PostgresStorage(target)
        assert "s3cret-pass" not in str(caught.value)
        assert "refused" in str(caught.value).lower()
    assert "\n" not in str(caught.value)


def test_a_closed_storage_is_unavailable(backend: Backend) -> None:
    s = backend.open()
    s.close()
    for call in (
        lambda: s.device(DEV),
        lambda: s.ingest_many([(DEV, [telemetry(1)], True)], T0),
        lambda: s.reserve_sequence("a", 1),
        lambda: s.changes(None),
    ):
        with pytest.raises(StorageUnavailable):
            call()
    s.close()  # twice is fine


# -- PostgreSQL only: partitions, lost connections ------------------------------------------------


@pytest.fixture
def pg(pg_dsn: str) -> Iterator[Backend]:
    """PostgreSQL alone (what SQLite has no counterpart of)."""
    found = Backend("postgresql", pg_dsn)
    yield found
    for storage in found.opened:
        storage.close()


def test_records_of_another_day_go_to_another_partition_and_stay_unique(pg: Backend) -> None:
    s = pg.open()
    s.add_device(DEV, T0)
    s.ingest(DEV, [telemetry(1), telemetry(2)], T0)  # 2023-11-14 (UTC)
    later = s.ingest(DEV, [telemetry(2), telemetry(3)], T0 + 3 * DAY)  # 2023-11-17
    assert (later.new, later.duplicate) == (1, 1)
    where = pg.sql("SELECT seq, tableoid::regclass::text FROM records ORDER BY seq")
    assert where == [(1, "records_20231114"), (2, "records_20231114"), (3, "records_20231117")]
    assert s.seqs(DEV) == [1, 2, 3]
    assert s.records(DEV)[1].received == T0  # the first copy, in its own partition


def test_a_partition_that_went_away_is_made_again(pg: Backend) -> None:
    s = pg.open()
    s.add_device(DEV, T0)
    s.ingest(DEV, [telemetry(1)], T0 + 10 * DAY)
    pg.sql("DROP TABLE records_20231124")  # retention dropped it behind the storage's back
    result = s.ingest(DEV, [telemetry(2)], T0 + 10 * DAY)
    assert result.new == 1
    assert pg.sql("SELECT seq FROM records_20231124") == [(2,)]
    assert s.ingest(DEV, [telemetry(1)], T0).duplicate == 1  # its key outlived its body


def test_a_lost_connection_fails_one_call_and_the_next_reconnects(pg: Backend) -> None:
    s = pg.open()
    s.add_device(DEV, T0)
    token, _, _ = s.changes(None)
    pg.sql(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
        " WHERE application_name = 'edge-agent-cloud' AND pid <> pg_backend_pid()"
    )
    with pytest.raises(StorageUnavailable):
        s.device(DEV)
    assert s.device(DEV) is not None
    token, devices, creds = s.changes(token)  # notices may have been missed meanwhile
    assert (devices, creds) == (None, True)
    assert s.changes(token)[1:] == (frozenset(), False)


def test_a_token_of_another_storage_object_is_unknown(pg: Backend) -> None:
    token, _, _ = pg.open().changes(None)
    assert pg.open().changes(token)[1:] == (None, True)


# -- the storage thread --------------------------------------------------------------------------


async def test_the_storage_thread_runs_every_call_on_one_thread(backend: Backend) -> None:
    thread = StorageThread(backend.open)
    await thread.start()
    try:
        assert await thread.call(lambda s: s.add_device(DEV, T0)) is True
        where = await thread.call(lambda s: threading.get_ident())
        # a synchronous caller on the event loop waits for the database thread
        assert thread.call_sync(lambda s: (threading.get_ident(), s.reserve_sequence("e", 4))) == (
            where,
            0,
        )
        # and on the database thread itself it runs at once (no deadlock)
        inner = await thread.call(lambda s: thread.call_sync(lambda t: t.reserve_sequence("e", 4)))
        assert inner == 4
    finally:
        await thread.stop()
    with pytest.raises(StorageUnavailable):
        thread.call_sync(lambda s: s.device(DEV))
    with pytest.raises(StorageUnavailable):
        await thread.call(lambda s: s.device(DEV))


# -- choosing a storage --------------------------------------------------------------------------


def test_open_storage_picks_the_backend(backend: Backend, tmp_path: Path) -> None:
    if backend.name == "sqlite":
        for spec in (f"sqlite:{tmp_path / 'a'}", str(tmp_path / "b"), tmp_path / "c"):
            s = open_storage(spec)
            backend.opened.append(s)
            assert isinstance(s, SQLiteStorage)
        assert (tmp_path / "a" / "cloud.sqlite3").is_file()
    else:
        from cloud.pgstorage import PostgresStorage

        for spec in (backend.target, backend.target.replace("postgresql://", "postgres://", 1)):
            s = open_storage(spec)
            backend.opened.append(s)
            assert isinstance(s, PostgresStorage)
            password = urlsplit(backend.target).password
            assert password and password not in s.where and "***" in s.where


@pytest.mark.parametrize(
    ("spec", "shown"),
    [
        ("postgresql://edge:pw@db:5432/edge", "postgresql://edge:***@db:5432/edge"),
        (
            "postgres://edge:p%40ss@db/edge?sslmode=require",
            "postgres://edge:***@db/edge?sslmode=require",
        ),
        ("postgresql://db/edge?password=pw&user=u", "postgresql://db/edge?password=***&user=u"),
        ("postgresql://edge@db/edge", "postgresql://edge@db/edge"),
        ("host=db password=pw user=edge", "host=db password=*** user=edge"),
        ("host=db password = 'p w' user=edge", "host=db password = *** user=edge"),
        ("/var/lib/edge-agent", "/var/lib/edge-agent"),
    ],
)
def test_describe_masks_passwords(spec: str, shown: str) -> None:
    assert describe(spec) == shown


def test_learning_jobs_are_numbered_and_replaced_only_by_their_reader(storage: Storage) -> None:
    """A job's document is replaced only by a writer that read its current rev (two
    coordinators, or a coordinator and ``learn stop``, never lose each other's change)."""
    first = storage.create_learn_job("skab-ae", lambda n: b"doc %d" % n, T0)
    second = storage.create_learn_job("skab-ae", lambda n: b"doc %d" % n, T0 + 1)
    assert (first, second) == (1, 2)
    row = storage.learn_job(first)
    assert row is not None and (row.model, row.doc, row.rev) == ("skab-ae", b"doc 1", 1)
    assert storage.update_learn_job(first, 1, b"round 2", T0 + 5)
    assert not storage.update_learn_job(first, 1, b"stale writer", T0 + 6)  # read rev 1: refused
    row = storage.learn_job(first)
    assert row is not None and (row.doc, row.rev, row.updated) == (b"round 2", 2, T0 + 5)
    assert [j.id for j in storage.learn_jobs()] == [1, 2]
    assert storage.learn_job(99) is None


def test_learning_uploads_are_stored_once_per_device_and_round(storage: Storage) -> None:
    assert storage.put_learn_update(1, 1, "dev-b", b"b", T0)
    assert storage.put_learn_update(1, 1, DEV, b"a", T0)
    assert not storage.put_learn_update(1, 1, DEV, b"a retried, other bytes", T0 + 1)
    assert storage.put_learn_update(1, 2, DEV, b"next round", T0 + 2)
    assert storage.learn_updates(1, 1) == [("dev-b", b"b"), (DEV, b"a")]  # by device
    assert storage.learn_update_devices(1, 2) == [DEV]
    assert storage.learn_updates(2, 1) == []
    storage.put_learn_blob("cd" * 32, b"masters")
    storage.put_learn_blob("cd" * 32, b"masters")  # content-addressed: a second put is harmless
    assert storage.learn_blob("cd" * 32) == b"masters"
    assert storage.learn_blob("ef" * 32) is None


# -- gateways (cloud/relaystore.py) --------------------------------------------------------------


def test_a_device_is_behind_one_gateway_and_other_processes_notice(backend: Backend) -> None:
    """Attachments decide what a gateway may do: another process hears of them as of a
    credential change (and reloads both). A device is behind one gateway at most; an attach
    that names an unregistered device changes nothing."""
    server = backend.open()
    for device in (DEV, "b-2"):
        server.add_device(device, T0)
    token, _, _ = server.changes(None)
    cli = backend.open()
    assert cli.attach("gw-1", [DEV, "b-2"], T0) == {DEV: None, "b-2": None}
    token, _, _ = poll_changes(server, token, lambda d, c: c)
    assert server.relays() == {DEV: "gw-1", "b-2": "gw-1"}
    assert cli.attach("gw-2", ["b-2"], T0 + 1) == {"b-2": "gw-1"}  # moved
    with pytest.raises(UnknownDevice):
        cli.attach("gw-2", [DEV, "ghost"], T0 + 2)
    assert server.relays() == {DEV: "gw-1", "b-2": "gw-2"}  # nothing of the refused attach
    assert cli.detach([DEV, "ghost"]) == {DEV: "gw-1"}
    token, _, _ = poll_changes(server, token, lambda d, c: c)
    assert server.relays() == {"b-2": "gw-2"}
    assert server.dump("relays", None, 10) == [("b-2", "gw-2", T0 + 1)]
    assert cli.detach([DEV]) == {}


def test_commands_are_kept_sent_then_updated_by_the_reported_result(storage: Storage) -> None:
    """cloud/commandstore.py: a command is recorded `sent` under an id above every earlier id
    of the device, the device's reported outcome updates it, an outcome of an id never sent
    (a device's invention, or a desired key set over the network) is dropped (it would let a
    device write the history and block the next id), and the newest come first."""
    from cloud.storage import UnknownDevice

    first = storage.add_command(DEV, "selftest", {}, T0)
    second = storage.add_command(DEV, "logs", {"since": T0 - 60}, T0)  # same ms: still above
    assert second > first >= int(T0 * 1000)
    rows = storage.commands(DEV)
    assert [(r.id, r.name, r.status, r.args) for r in rows] == [
        (second, "logs", "sent", {"since": T0 - 60}),
        (first, "selftest", "sent", {}),
    ]
    result = {"id": first, "status": "failed", "result": {"failing": ["motor"]}, "at": T0 + 2}
    stranger = {"id": 5, "status": "refused", "result": {"error": "no"}, "at": T0 + 3}
    entries = {
        "command/selftest": Entry(3, result),
        "command/flush": Entry(3, stranger),
        "command/bogus": Entry(3, stranger),  # not a command: ignored
        "command/logs": Entry(3, {"id": "x"}),  # not an outcome: ignored
        "link/state": Entry(3, "up"),
    }
    assert storage.note_command_results(DEV, entries, T0 + 4) == 1
    rows = {r.id: r for r in storage.commands(DEV)}
    assert (rows[first].status, rows[first].result, rows[first].at) == (
        "failed",
        {"failing": ["motor"]},
        T0 + 2,
    )
    assert rows[first].args == {} and rows[first].sent == T0
    assert 5 not in rows
    assert rows[second].status == "sent"
    assert [r.id for r in storage.commands(DEV, 2)] == [second, first]
    storage.drop_command(DEV, second)
    assert second not in {r.id for r in storage.commands(DEV)}
    with pytest.raises(UnknownDevice):
        storage.add_command("nobody", "selftest", {}, T0)
    assert storage.commands("nobody") == []


def test_log_uploads_are_numbered_per_device_and_the_newest_kept(storage: Storage) -> None:
    from cloud.commandstore import LOGS_KEPT

    assert storage.last_log_upload(DEV) is None
    for i in range(LOGS_KEPT + 3):
        assert storage.put_log_upload(DEV, T0 + i, i, 0, b"body %d" % i, T0 + 100 + i) == i + 1
    with pytest.raises(UnknownDevice):  # only a registered device's (the server checks first)
        storage.put_log_upload("b-2", None, 1, 2, b"other", T0)
    storage.add_device("b-2", T0)
    storage.put_log_upload("b-2", None, 1, 2, b"other", T0)
    kept = storage.log_uploads(DEV, 100)
    assert [u["n"] for u in kept] == list(range(LOGS_KEPT + 3, 3, -1))
    assert kept[0]["body"] == b"body %d" % (LOGS_KEPT + 2)
    last = LOGS_KEPT + 2
    assert storage.last_log_upload(DEV) == {
        "n": last + 1,
        "received": T0 + 100 + last,
        "since": T0 + last,
        "count": last,
        "left_out": 0,
    }
    assert storage.log_uploads("b-2") == [
        {
            "device": "b-2",
            "n": 1,
            "received": T0,
            "since": None,
            "count": 1,
            "left_out": 2,
            "body": b"other",
        }
    ]


# -- agent releases, groups, release history (cloud/releasestore.py) -----------------------------


def test_releases_are_published_once_in_blocks_and_read_back(
    backend: Backend, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from cloud import releasestore

    monkeypatch.setattr(releasestore, "BLOCK_BYTES", 1000)  # several blocks of a small file
    first, other = tmp_path / "first.tar", tmp_path / "other.tar"
    first.write_bytes(bytes(range(256)) * 10 + b"tail")  # 2564 bytes: three blocks
    other.write_bytes(b"other bytes")
    s = backend.open()
    assert s.releases() == [] and s.release("1.0") is None
    assert s.release_file("1.0", tmp_path / "none") is None and not (tmp_path / "none").exists()
    assert s.put_release("1.0", b"manifest-1.0", first, T0) is True
    assert s.put_release("0.9", b"manifest-0.9", other, T0 + 1) is True
    assert s.put_release("1.0", b"forged", other, T0 + 9) is False  # immutable: the first stays
    reader = backend.open()  # another endpoint process
    assert [(r.version, r.manifest, r.published) for r in reader.releases()] == [
        ("0.9", b"manifest-0.9", T0 + 1),
        ("1.0", b"manifest-1.0", T0),
    ]
    found = reader.release("1.0")
    assert found is not None and found.manifest == b"manifest-1.0"
    out = tmp_path / "out.tar"
    out.write_bytes(b"stale longer content " * 200)  # replaced, not appended to
    assert reader.release_file("1.0", out) == 2564 and out.read_bytes() == first.read_bytes()
    # attack: versions that would climb out of SQLite's release directory find nothing
    assert reader.release("..") is None and reader.release("../cloud.sqlite3") is None
    assert reader.release_file("../releases", tmp_path / "x") is None


def test_groups_keep_members_and_their_release(storage: Storage) -> None:
    from cloud.releasestore import UnknownGroup

    storage.add_device("b-2", T0)
    with pytest.raises(UnknownDevice):  # nothing changed: not even the group made
        storage.group_add("line-1", [DEV, "nobody"], T0)
    assert storage.groups() == [] and storage.groups("line-1") == []
    group, added = storage.group_add("line-1", [DEV, DEV], T0)
    assert (group.members, group.version, added) == ((DEV,), None, [DEV])
    group, added = storage.group_add("line-1", [DEV, "b-2"], T0 + 1)
    assert (group.members, added) == (("b-2", DEV), ["b-2"])  # members by id
    storage.group_add("all", ["b-2"], T0)
    with pytest.raises(UnknownGroup):
        storage.set_group_release("nope", "1.0", "ab" * 32, T0)
    group = storage.set_group_release("line-1", "1.0", "ab" * 32, T0 + 2)
    assert group.assignment() == {"version": "1.0", "sha256": "ab" * 32}
    assert [(g.name, g.members, g.version) for g in storage.groups()] == [
        ("all", ("b-2",), None),
        ("line-1", ("b-2", DEV), "1.0"),
    ]
    assert storage.device_groups("b-2") == ["all", "line-1"] and storage.device_groups("x") == []
    assert storage.group_remove("line-1", ["b-2", "nobody"]) == ["b-2"]
    (kept,) = storage.groups("line-1")
    assert (kept.members, kept.sha256) == ((DEV,), "ab" * 32)  # the release stays the group's
    with pytest.raises(UnknownGroup):
        storage.group_remove("nope", [DEV])


def test_reported_update_outcomes_become_a_bounded_history_once_each(
    backend: Backend, storage: Storage, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The history is written where reported state is merged, by either storage (and so by any
    endpoint process); an outcome reported again (after a restart: a new entry version, the same
    value) is kept once; what a hostile device sends instead of an outcome is left out."""
    from cloud import releasestore

    def report(version: int, value: Any) -> None:
        storage.put_reported(DEV, {"agent/update": Entry(version, value)}, T0 + version)

    staged = {"result": "staged", "version": "1.1", "bytes": 10, "at": T0 + 1}
    report(1, staged)
    report(2, {"result": "pending", "version": "1.1"})  # no time: once per version
    report(3, staged)  # the same outcome again
    report(4, {"result": "pending", "version": "1.1"})
    hostile = [
        None,
        "updated",
        {"result": "updated", "version": "../../etc"},
        {"result": "owned", "version": "1.1", "at": T0},
        {"result": "updated", "version": ["1.1"], "at": T0},
        {"result": "refused", "version": "1.2", "at": float("nan"), "reason": "x" * 5000},
    ]
    for i, value in enumerate(hostile):
        report(10 + i, value)
    report(20, {"result": "updated", "version": "1.1", "previous": "1.0", "at": T0 + 30})
    storage.note_assignment(DEV, "1.2", "group line-1", T0 + 40)
    rows = backend.open().release_history(DEV)
    assert [(r.version, r.result, r.at) for r in rows] == [
        ("1.2", "assigned", T0 + 40),
        ("1.1", "updated", T0 + 30),
        ("1.2", "refused", None),  # a time that is not one is dropped; the reason is cut
        ("1.1", "pending", None),
        ("1.1", "staged", T0 + 1),
    ]
    assert len(rows[2].reason or "") == releasestore.REASON_CHARS and rows[1].reason is None
    assert rows[0].to_json()["reason"] == "group line-1"
    monkeypatch.setattr(releasestore, "HISTORY_KEPT", 3)
    report(30, {"result": "staged", "version": "1.3", "at": T0 + 50})
    assert [r.result for r in storage.release_history(DEV)] == ["staged", "assigned", "updated"]
    assert storage.release_history("nobody") == []


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")], ids=str)
def test_a_record_whose_time_is_not_finite_is_refused_alone_and_the_group_commits(
    storage: Storage, bad: float
) -> None:
    """SQLite stores NaN as NULL: under INSERT OR IGNORE the NOT NULL violation was taken for a
    duplicate and the lookup of the "stored copy" failed the whole group commit; PostgreSQL
    stored NaN and inf as they were. The decoders refuse such records; the storage again."""
    other = "pump-02"
    storage.add_device(other, T0)
    evil = WireRecord(2, "alert", bad, AlertBody(T0, {"score": 1.0}).to_cbor())
    results = storage.ingest_many(
        [(other, [telemetry(1)], False), (DEV, [telemetry(1), evil, telemetry(3)], False)], T0
    )
    assert results == [
        IngestResult((1,), 1, 0, 0, (), 1),
        IngestResult((1, 3), 2, 0, 0, (), 3),  # seq 2 neither stored nor acknowledged
    ]
    assert storage.seqs(other) == [1] and storage.seqs(DEV) == [1, 3]
    again = storage.ingest(DEV, [evil, telemetry(3)], T0 + 1)  # sent again: refused again
    assert again == IngestResult((3,), 0, 1, 0, (), 3)


@pytest.mark.parametrize(
    ("key", "stored"),
    [("queue/depth", "ffff"), ("counter/resets", "c34a010000000000000000")],
    ids=["not_cbor", "bignum_counter"],
)
def test_a_stored_reported_value_this_endpoint_cannot_read_is_replaced_by_the_next_report(
    backend: Backend, storage: Storage, key: str, stored: str
) -> None:
    """A value damaged at rest (not CBOR) answered 4.00 to every later report of its key, and a
    bignum an older endpoint stored for a counter (merged by the highest value) failed with a
    TypeError (5.00): the device's report replaced neither, for ever. Now both read back as a
    raw value and the next report replaces them."""
    storage.put_reported(DEV, {key: Entry(1, 1)}, T0)
    backend.sql(
        f"UPDATE reported SET value = {_hex(backend, stored)} "
        f"WHERE device = '{DEV}' AND key = '{key}'"
    )
    shown = storage.reported(DEV)[key].value
    assert isinstance(shown, RawValue)
    storage.put_reported(DEV, {key: Entry(2, 5)}, T0 + 1)
    assert storage.reported(DEV)[key] == Entry(2, 5)


def _hex(backend: Backend, data: str) -> str:
    return f"X'{data}'" if backend.name == "sqlite" else f"'\\x{data}'::bytea"
