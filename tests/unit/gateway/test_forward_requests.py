"""How the gateway's forwarder cuts a pass into /relay requests the endpoint takes: at most
MAX_ENTRIES entries, RELAY_RECORDS records and RELAY_BYTES of batches per request (a backlog after
an outage is larger than one request; more than that is refused 4.13 and would never drain)."""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from agent.gateway.relay import (
    BATCH_BYTES,
    BATCH_READINGS,
    MAX_BATCH_RECORDS,
    RELAY_BYTES,
    RELAY_READINGS,
    RELAY_RECORDS,
    RecordForwarder,
    _batches,
    _requests,
)
from agent.sync.transport import CoapTransport
from agent.wire.batch import WireRecord
from agent.wire.features import ChannelFeatures, FeaturesBody
from agent.wire.records import TelemetryBody
from agent.wire.relay import MAX_ENTRIES, RelayEntry
from cloud.protocol import Limits
from cloud.server import CloudServer
from cloud.storage import SQLiteStorage
from drivers.clock import RealClock
from tools.ports import free_port

T0 = 1_796_600_000.0


def _part(device: str, records: int, size: int) -> tuple[str, list[WireRecord], RelayEntry]:
    recs = [WireRecord(i + 1, "telemetry", 0.0, b"\xa0") for i in range(records)]
    return device, recs, RelayEntry(device, 65001, b"x" * size)


def _check(requests: list) -> None:
    for req in requests:
        assert 1 <= len(req) <= MAX_ENTRIES
        assert sum(len(p[1]) for p in req) <= RELAY_RECORDS
        assert sum(len(p[2].batch) for p in req) <= RELAY_BYTES


def test_a_backlog_of_many_records_is_cut_by_records() -> None:
    parts = [_part(f"d{i}", 4096, 1000) for i in range(10)]  # 40,960 records
    reqs = _requests(parts)
    _check(reqs)
    assert [len(r) for r in reqs] == [4, 4, 2]
    assert [p for r in reqs for p in r] == parts  # all of them, in order


def test_large_batches_are_cut_by_bytes_and_many_devices_by_entries() -> None:
    big = [_part(f"b{i}", 100, 100_000) for i in range(6)]
    _check(_requests(big))
    assert len(_requests(big)) == 3
    many = [_part(f"m{i}", 1, 10) for i in range(600)]
    reqs = _requests(many)
    _check(reqs)
    assert [len(r) for r in reqs] == [256, 256, 88]


def test_an_empty_pass_is_no_request() -> None:
    assert _requests([]) == []


def _features(first: int, count: int) -> WireRecord:
    cf = ChannelFeatures(1.0, 0.0, 2.0, 1.2, 0.5, 3.0, 1.6, ())
    body = FeaturesBody("vib", tuple(range(first, first + count)), 0.0, 1.0, {"x_g": cf})
    return body.to_record()


def test_features_records_are_cut_by_the_readings_they_stand_for() -> None:
    """The endpoint takes at most BATCH_READINGS readings of features records in a batch and
    RELAY_READINGS in a request (4.13 beyond, which would never drain): a gateway holding many
    of a device's large features records cuts them by readings, not only by records."""
    assert (Limits().batch_readings, Limits().relay_readings) == (BATCH_READINGS, RELAY_READINGS)
    count = 16_384  # a features record of 16,384 readings: 16 of them fill a batch
    recs = [_features(1 + i * count, count) for i in range(40)]
    batches = _batches(recs)
    assert [len(b) for b in batches] == [16, 16, 8]
    assert [r for b in batches for r in b] == recs  # all of them, in order
    parts = [("d", batches[0], RelayEntry("d", 65001, b"x" * 100))] * 10
    reqs = _requests(parts)
    assert [len(r) for r in reqs] == [4, 4, 2]  # 4 batches full of readings per request
    plain = [WireRecord(i + 1, "telemetry", 0.0, b"\xa0") for i in range(5000)]
    assert [len(b) for b in _batches(plain)] == [MAX_BATCH_RECORDS, 5000 - MAX_BATCH_RECORDS]


@pytest.mark.timeout(60)
async def test_a_device_batch_larger_than_the_endpoint_takes_is_cut_not_held_for_ever(
    tmp_path: Path,
) -> None:
    """The endpoint takes at most Limits.batch_bytes (64 KiB) in one batch, a /relay entry's
    too (4.13 beyond). A device on a good link sends its readings raw (SenML: no resolution for
    the gateway to learn), so the gateway re-encodes them exactly: 4096 readings of a 3-axis
    accelerometer are about 90 KiB. Before, such an entry was refused 4.13, held and the device
    paused, then sent the same way after each pause: its records never reached the cloud."""
    assert Limits().batch_bytes == BATCH_BYTES
    rng = random.Random(7)

    def vibration(i: int) -> bytes:
        xyz = {axis: rng.uniform(-2.0, 2.0) for axis in ("x", "y", "z")}
        return TelemetryBody("adxl345", T0 + i / 100, xyz).to_cbor()

    recs = [
        WireRecord(i, "telemetry", T0 + i / 100, vibration(i))
        for i in range(1, MAX_BATCH_RECORDS + 1)
    ]
    cloud = await CloudServer.start(tmp_path / "cloud", "127.0.0.1", free_port(), allow_plain=True)
    site = SQLiteStorage.in_dir(tmp_path / "gateway")
    transport = CoapTransport(RealClock())
    try:
        await cloud.add_device("pump-01")
        await cloud.attach("gw-1", ["pump-01"])
        site.ingest_many([("pump-01", recs, True)], T0)

        async def db(fn: Callable[[SQLiteStorage], Any]) -> Any:
            return fn(site)

        fw = RecordForwarder(db, transport, lambda: cloud.uri, tmp_path, name="gw-1")
        assert await fw.forward_once() == MAX_BATCH_RECORDS
        assert await cloud.seqs("pump-01") == list(range(1, MAX_BATCH_RECORDS + 1))
        assert fw.later.refusals == 0
    finally:
        await transport.close()
        site.close()
        await cloud.stop()
