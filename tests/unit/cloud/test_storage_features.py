"""The storage contract for features records (cloud/featurestore.py), on both backends (the
fixtures of tests/unit/cloud/test_storage_contract.py): each reading is stored once, whether it
came as a record or inside a features record, and a retry of either is harmless."""

from __future__ import annotations

from agent.wire import records
from agent.wire.batch import WireRecord
from agent.wire.features import ChannelFeatures, FeaturesBody, encode_gaps
from agent.wire.records import AlertBody, TelemetryBody
from cloud.storage import IngestResult, Storage
from tests.unit.cloud.test_storage_contract import DEV, T0, Backend, backend, storage

__all__ = ["backend", "storage"]  # the fixtures, used by name

CF = ChannelFeatures(1.0, 0.5, 2.0, 1.25, 0.5, 3.0, 1.5, (0.25, 0.0))


def features(*seqs: int, sensor: str = "vib", mean: float = 1.0) -> WireRecord:
    cf = ChannelFeatures(mean, 0.5, 2.0, 1.25, 0.5, 3.0, 1.5, (0.25, 0.0))
    return FeaturesBody(sensor, seqs, T0 + seqs[0], T0 + seqs[-1], {"x_g": cf}).to_record()


def reading(seq: int, sensor: str = "vib") -> WireRecord:
    body = TelemetryBody(sensor, T0 + seq, {"x_g": 1.0}).to_cbor()
    return WireRecord(seq, "telemetry", T0 + seq, body)


def alert(seq: int) -> WireRecord:
    return WireRecord(seq, "alert", T0 + seq, AlertBody(T0 + seq, {"score": 1.0}).to_cbor())


def acked(result: IngestResult) -> list[int]:
    return sorted(set(result.seqs) - set(result.conflicts))


def test_a_features_record_is_stored_once_and_acknowledges_its_readings(storage: Storage) -> None:
    batch = [features(10, 12, 14), reading(11, "motor"), alert(13)]
    first = storage.ingest(DEV, batch, T0)
    assert acked(first) == [10, 11, 12, 13, 14]
    assert (first.new, first.duplicate, first.conflicts, first.last) == (5, 0, (), 14)
    again = storage.ingest(DEV, batch, T0 + 1)  # a retry: a duplicate, acknowledged again
    assert acked(again) == [10, 11, 12, 13, 14]
    assert (again.new, again.duplicate) == (0, 5)
    (stored,) = storage.features(DEV)
    assert (stored.first_seq, stored.last_seq, stored.sensor, stored.count) == (10, 14, "vib", 3)
    assert stored.decoded().seqs == (10, 12, 14)
    assert stored.body == batch[0].body and stored.received == T0
    assert storage.seqs(DEV) == [11, 13]  # the readings it stands for are not records


def test_readings_sent_again_as_records_are_held_by_the_features_record(
    storage: Storage,
) -> None:
    """A lost ack, then the link level changed: the same readings come as records."""
    storage.ingest(DEV, [features(10, 12, 14)], T0)
    result = storage.ingest(DEV, [reading(12), reading(14), reading(15)], T0 + 1)
    assert acked(result) == [12, 14, 15]
    assert (result.new, result.duplicate, result.conflicts) == (1, 2, ())
    assert storage.seqs(DEV) == [15]
    other = storage.ingest(DEV, [reading(10, "motor"), alert(12)], T0 + 2)
    assert sorted(other.conflicts) == [10, 12] and acked(other) == []


def test_features_over_readings_stored_as_records_store_nothing_of_it(
    storage: Storage,
) -> None:
    storage.ingest(DEV, [reading(10), reading(12), alert(13)], T0)
    # 10 and 12 are held by readings of the sensor: acknowledged; 14 not: sent again
    result = storage.ingest(DEV, [features(10, 12, 14)], T0 + 1)
    assert acked(result) == [10, 12]
    assert (result.new, result.duplicate, result.conflicts) == (0, 2, ())
    assert storage.features(DEV) == []
    # a seq held by another record is a conflict, never acknowledged
    clash = storage.ingest(DEV, [features(13, 16)], T0 + 2)
    assert clash.conflicts == (13,) and acked(clash) == []
    alone = storage.ingest(DEV, [features(14)], T0 + 3)
    assert acked(alone) == [14] and alone.new == 1


def test_another_features_record_over_stored_ones(storage: Storage) -> None:
    storage.ingest(DEV, [features(10, 12, 14)], T0)
    wider = storage.ingest(DEV, [features(12, 14, 16)], T0 + 1)
    assert acked(wider) == [12, 14] and wider.duplicate == 2
    changed = storage.ingest(DEV, [features(10, 12, 14, mean=1.5)], T0 + 2)
    assert acked(changed) == [10, 12, 14] and changed.new == 0
    other = storage.ingest(DEV, [features(14, sensor="pump")], T0 + 3)
    assert other.conflicts == (14,)
    interleaved = storage.ingest(DEV, [features(11, 13, 15, sensor="pump")], T0 + 4)
    assert acked(interleaved) == [11, 13, 15] and interleaved.new == 3
    assert [f.first_seq for f in storage.features(DEV)] == [10, 11]
    assert [f.first_seq for f in storage.features(DEV, since=T0 + 15)] == [11]
    assert len(storage.features(DEV, limit=1)) == 1


def test_features_records_are_copied_by_dump_and_load(
    backend: Backend, storage: Storage, tmp_path: object
) -> None:
    storage.ingest(DEV, [features(10, 12), features(20, 21, sensor="pump")], T0)
    assert storage.table_count("features") == 2
    rows = storage.dump("features", None, 10)
    assert [r[:4] for r in rows] == [(DEV, 10, 12, "vib"), (DEV, 20, 21, "pump")]
    assert storage.dump("features", rows[0][:2], 10) == rows[1:]
    other = backend.open()  # the same database: the rows are there already
    assert other.load("features", rows) == 0


def _older_body(seqs: tuple[int, ...], channel: str) -> bytes:
    """A features body as an endpoint before the name checks stored it: a channel name that
    FeaturesBody.from_cbor refuses now."""
    head = ["vib", seqs[0], seqs[-1], encode_gaps(seqs), T0, T0 + 5, len(seqs)]
    return records.dumps([*head, {channel: CF.to_list()}])


def _set_body(backend: Backend, body: bytes) -> None:
    literal = f"X'{body.hex()}'" if backend.name == "sqlite" else f"'\\x{body.hex()}'::bytea"
    backend.sql(f"UPDATE features SET body = {literal} WHERE device = '{DEV}'")


def test_attack_a_stored_features_body_that_no_longer_decodes_fails_no_ingest(
    backend: Backend, storage: Storage
) -> None:
    """A features row whose body today's decoder refuses (stored by an older release) is still
    read for the seqs it holds: it fails neither the device's ingest nor the other devices'
    batches committed in the same transaction (which all got the CodecError before)."""
    storage.add_device("other", T0)
    storage.ingest(DEV, [features(10, 12, 14)], T0)
    _set_body(backend, _older_body((10, 12, 14), "x\x1b[2J"))
    mine, theirs = storage.ingest_many(
        [(DEV, [reading(12), reading(13), alert(14)], False), ("other", [reading(1)], False)],
        T0 + 1,
    )
    assert isinstance(theirs, IngestResult) and acked(theirs) == [1]
    assert isinstance(mine, IngestResult)
    assert acked(mine) == [12, 13] and mine.conflicts == (14,)
    assert storage.seqs(DEV) == [13]
    again = storage.ingest(DEV, [features(10, 12, 14)], T0 + 2)  # a retry of the record
    assert acked(again) == [10, 12, 14] and again.new == 0


def test_attack_a_features_body_damaged_at_rest_holds_its_whole_span(
    backend: Backend, storage: Storage
) -> None:
    storage.ingest(DEV, [features(10, 12, 14)], T0)
    _set_body(backend, b"\xff not cbor")
    result = storage.ingest(DEV, [reading(11), alert(13), reading(15)], T0 + 1)
    assert acked(result) == [11, 15] and result.conflicts == (13,)
    assert storage.seqs(DEV) == [15]
