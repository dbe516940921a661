"""The readings a batch's features records may claim (docs/protocol.md "Limits and timing"):
an authenticated device, and a gateway through ``/relay``, against the real endpoint (OSCORE)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from agent.wire import codec
from agent.wire.batch import IngestAck
from agent.wire.features import MAX_BATCH_READINGS, MAX_COUNT
from agent.wire.relay import RelayEntry, RelayRefusal
from cloud.server import CloudServer, Limits
from tests.e2e.test_gateway_cloud import GW, gateway, relay
from tests.e2e.test_security import Principal
from tests.unit.wire.test_features import claiming

A = "pump-01"


@pytest.mark.timeout(60)
async def test_gap_runs_claiming_millions_of_readings_get_4_13_and_the_limit_is_taken(
    server: CloudServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Attack (audit feat_dos.py): 800 records of ~75 bytes each claimed 65,536 readings, 52 M
    in one 62 KB batch. Refused from the headers with 4.13; a batch at the limit is stored."""
    caplog.set_level(logging.INFO)
    device = await Principal(server, tmp_path, A).open()
    try:
        hostile = [claiming(i * MAX_COUNT, MAX_COUNT) for i in range(200)]  # 13 M
        resp = await device.req("POST", f"ingest/{A}", codec.encode_batch(None, hostile), 112)
        assert resp.dotted == "4.13", (resp.dotted, resp.payload)
        assert b"claim" in resp.payload
        at_limit = [claiming(1 + i * MAX_COUNT, MAX_COUNT) for i in range(4)]
        assert sum(MAX_COUNT for _ in at_limit) == MAX_BATCH_READINGS
        resp = await device.req("POST", f"ingest/{A}", codec.encode_batch(None, at_limit), 112)
        assert resp.dotted == "2.04", (resp.dotted, resp.payload)
        ack = IngestAck.from_cbor(resp.payload)
        assert ack.new == MAX_BATCH_READINGS and 1 in ack and MAX_BATCH_READINGS in ack
    finally:
        await device.close()
    assert not [r for r in caplog.records if r.exc_info]


@pytest.mark.timeout(60)
async def test_a_relay_request_has_a_budget_of_claimed_readings(
    server: CloudServer, tmp_path: Path
) -> None:
    """Attack: 256 entries of a /relay request each claiming a batch's worth of readings. The
    request's budget is checked before an entry's gaps are expanded: the entry beyond it gets
    4.13, the others are stored."""
    await server.add_device(A)
    gw = await gateway(server, tmp_path, A)
    server.limits = Limits(relay_readings=100)
    try:

        def entry(first: int, count: int) -> RelayEntry:
            return RelayEntry(A, 112, codec.encode_batch(None, [claiming(first, count)]))

        results = await relay(gw, [entry(1, 60), entry(61, 60), entry(121, 40)], GW)
        codes = [r.dotted if isinstance(r, RelayRefusal) else "ack" for r in results]
        assert codes == ["ack", "4.13", "ack"]
        assert isinstance(results[1], RelayRefusal) and "at most 40" in results[1].message
    finally:
        await gw.close()
