"""The uplink against an endpoint that refuses records or answers so that a device would re-send at
once, on virtual time.

The endpoint is the scripted side of the transport seam (what ``CoapTransport.request`` gives
back: it decodes each batch with the real codec and answers by a rule); the store, its files and
the clock's timers are the real ones. Attacks: an endpoint that answers 4.00 to everything (a
broken release: it used to make the device delete its whole queue), one record the endpoint
refuses among good ones, a full set-aside area, 4.13 at one record, a 2.04 that stores nothing,
5.03 with Max-Age 0 and with Max-Age 2^32 - 1, an ack whose ``last`` would use up the sequence
space.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cbor2
import pytest

from agent.store.queue import NewRecord, Store
from agent.store.settings import SEQ_BLOCK, StoreSettings
from agent.sync import uplink as uplink_mod
from agent.sync.transport import Endpoints, Response, code
from agent.sync.uplink import Uplink, UplinkSettings
from agent.wire import codec
from agent.wire.batch import MAX_SEQ, IngestAck, WireRecord
from agent.wire.records import Kind, TelemetryBody
from drivers.clock import VirtualClock
from tests.unit.sync.helpers import run_for

pytestmark = pytest.mark.timeout(60)

DEVICE = "pump-07"
URI = "coap://127.0.0.1:5683"
T0 = 1_700_000_000.0
HUGE_MAX_AGE = 2**32 - 1  # the largest Max-Age CoAP carries: 136 years


def telemetry(i: int, sensor: str = "motor") -> NewRecord:
    body = TelemetryBody(sensor, T0 + i, {"current_a": 1.0 + i / 1000, "supply_v": 230.0})
    return NewRecord(Kind.TELEMETRY, body.to_cbor(), created=T0 + i)


def is_bad(rec: WireRecord) -> bool:
    return TelemetryBody.from_cbor(bytes(rec.body)).sensor == "bad"


Rule = Callable[[list[WireRecord], int], Response | None]  # None: store the batch, ack it


class ScriptedEndpoint:
    """Decodes each batch; ``rule(records, n)`` answers request ``n`` (from 1), or None to store
    the records and acknowledge them all. Past ``max_requests`` it sets ``too_many`` (a spin:
    the test stops instead of looping on virtual time)."""

    def __init__(self, rule: Rule, max_requests: int = 2000) -> None:
        self.rule = rule
        self.requests = 0
        self.stored: dict[int, WireRecord] = {}
        self.max_requests = max_requests
        self.too_many = asyncio.Event()

    async def request(self, method: str, uri: str, payload: bytes = b"", **kw: Any) -> Response:
        self.requests += 1
        if self.requests >= self.max_requests:
            self.too_many.set()
        _, recs = codec.decode_batch(payload, kw["content_format"])
        answer = self.rule(recs, self.requests)
        if answer is not None:
            return answer
        new = [r for r in recs if r.seq not in self.stored]
        self.stored.update((r.seq, r) for r in recs)
        ack = IngestAck.for_seqs([r.seq for r in recs], len(new), len(recs) - len(new))
        return Response(code=code("2.04"), payload=ack.to_cbor())


def answer(dotted: str, payload: bytes = b"", max_age: int | None = None) -> Response:
    return Response(code=code(dotted), payload=payload, max_age=max_age)


def refusing_bad(dotted: str, payload: bytes = b"") -> ScriptedEndpoint:
    """An endpoint that answers ``dotted`` to any batch holding a record of sensor "bad" and
    stores every other batch."""
    return ScriptedEndpoint(
        lambda recs, n: answer(dotted, payload) if any(map(is_bad, recs)) else None
    )


async def queue_with_a_bad_record(store: Store, before: int, after: int) -> tuple[list[int], int]:
    """Readings ``0..before-1``, one of sensor "bad", then up to ``before + after``: (the good
    seqs, the bad one)."""
    good = await store.put([telemetry(i) for i in range(before)])
    (bad,) = await store.put([telemetry(before, "bad")])
    good += await store.put([telemetry(i) for i in range(before + 1, before + 1 + after)])
    return good, bad


def make_uplink(store: Store, endpoint: ScriptedEndpoint, clock: VirtualClock, **kw: Any):
    settings = UplinkSettings(endpoints=(URI,), **kw)
    return Uplink(
        settings,
        store,
        endpoint,  # type: ignore[arg-type]
        Endpoints(settings.endpoints, clock),
        clock,
        device_id=DEVICE,
        rng=random.Random(1),
    )


async def open_store(tmp_path: Path, clock: VirtualClock) -> Store:
    return await Store.open(
        StoreSettings(path=tmp_path / "queue.db", budget_bytes=64 << 20), clock=clock
    )


@pytest.fixture(autouse=True)
def fast_idle(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(uplink_mod, "IDLE_POLL", 0.2)


def errors(caplog: pytest.LogCaptureFixture, event: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if f"event={event}" in r.getMessage()]


# -- 4.00 ----------------------------------------------------------------------------------------


def test_endpoint_that_refuses_everything_deletes_nothing_and_backs_off(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A broken endpoint release answers 4.00 to every batch. The device used to re-send each
    record alone and then "set it aside" by deleting it: 500 readings gone in under a second, none
    stored anywhere. Now every one stays queued and the uplink backs off."""
    caplog.set_level(logging.INFO, logger="agent.sync.uplink")
    clock = VirtualClock()
    endpoint = ScriptedEndpoint(lambda recs, n: answer("4.00", b"bad request"))

    async def main() -> None:
        store = await open_store(tmp_path, clock)
        await store.put([telemetry(i) for i in range(500)])
        up = make_uplink(store, endpoint, clock)
        await run_for(up, 600.0, endpoint.too_many)
        stats = await store.stats()
        assert stats.depth == 500 and stats.set_aside == 0
        assert up.stats.records_rejected == 0
        assert "refuses every record" in up.last_error
        await store.close()

    clock.run(main())
    assert endpoint.requests < 200, endpoint.requests  # backoff, not a loop
    assert not (tmp_path / "rejected").exists()
    said = errors(caplog, "endpoint_refuses_all")
    assert said and said[0].levelno == logging.ERROR
    assert sum(r.levelno == logging.ERROR for r in said) == 1  # once, then quietly until success


def test_an_isolated_bad_record_is_set_aside_durably_and_the_others_delivered(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="agent.sync.uplink")
    clock = VirtualClock()
    endpoint = refusing_bad("4.00", b"cannot decode seq")

    async def main() -> int:
        store = await open_store(tmp_path, clock)
        good, bad = await queue_with_a_bad_record(store, 30, 29)
        up = make_uplink(store, endpoint, clock)
        await run_for(up, 120.0, endpoint.too_many)
        stats = await store.stats()
        assert stats.depth == 0
        assert stats.set_aside == 1 and stats.to_dict()["set_aside"] == 1
        assert sorted(endpoint.stored) == sorted(good)
        assert up.stats.records_rejected == 1
        await store.close()
        return bad

    bad = clock.run(main())
    kept = cbor2.loads((tmp_path / "rejected" / f"seq-{bad}.cbor").read_bytes())
    assert kept["seq"] == bad and kept["kind"] == "telemetry" and kept["v"] == 1
    assert kept["payload"] == telemetry(30, "bad").payload and kept["created"] == T0 + 30
    assert kept["answer"] == "4.00 cannot decode seq"
    assert len(errors(caplog, "record_rejected")) == 1


def test_a_round_called_off_by_a_pause_sets_nothing_aside(tmp_path: Path) -> None:
    """A record refused alone was held (leased, in memory) while the next single went; that one
    got a 5.03 whose pause outlasted the lease, so the held record was leased and sent again
    after it, stored by an endpoint redeployed meanwhile, and then set aside as refused (an
    operator putting it back stores it twice). Now a failure or a pause calls the round off:
    its records go back to the queue and none is set aside."""
    clock = VirtualClock()
    state = {"refused": False, "paused": False}

    def rule(recs: list[WireRecord], n: int) -> Response | None:
        if not state["refused"]:
            if any(map(is_bad, recs)):
                state["refused"] = len(recs) == 1
                return answer("4.00", b"cannot decode")
            return None
        if not state["paused"]:
            state["paused"] = True
            return answer("5.03", b"redeploying", max_age=200)  # longer than the 60 s lease
        return None  # the new release takes every record

    endpoint = ScriptedEndpoint(rule)

    async def main() -> None:
        store = await open_store(tmp_path, clock)
        good, bad = await queue_with_a_bad_record(store, 5, 10)
        up = make_uplink(store, endpoint, clock, max_inflight=1)  # the 5.03 comes next
        await run_for(up, 900.0, endpoint.too_many)
        stats = await store.stats()
        assert stats.depth == 0 and stats.set_aside == 0
        assert sorted(endpoint.stored) == sorted([*good, bad])
        assert up.stats.records_rejected == 0
        await store.close()

    clock.run(main())
    assert state["paused"]
    assert not (tmp_path / "rejected").exists()


def test_a_full_set_aside_area_keeps_the_record_queued(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="agent.sync.uplink")
    clock = VirtualClock()
    area = tmp_path / "rejected"
    area.mkdir()
    with (area / "seq-1.cbor").open("wb") as f:  # sparse: counts 16 MiB, takes no room
        f.truncate(16 << 20)
    endpoint = refusing_bad("4.00")

    async def main() -> None:
        store = await open_store(tmp_path, clock)
        await queue_with_a_bad_record(store, 10, 9)
        up = make_uplink(store, endpoint, clock)
        await run_for(up, 120.0, endpoint.too_many)
        stats = await store.stats()
        assert stats.depth == 1 and stats.set_aside == 1  # the old file only
        assert len(endpoint.stored) == 19
        assert up.last_error
        await store.close()

    clock.run(main())
    said = [r for r in errors(caplog, "set_aside_failed") if r.levelno == logging.ERROR]
    assert len(said) == 1 and "is full" in said[0].getMessage()  # once, not per retry
    assert endpoint.requests < 200, endpoint.requests


# -- answers that made the uplink re-send at once -------------------------------------------------


def test_too_large_at_one_record_sets_that_record_aside(tmp_path: Path) -> None:
    """No batch limit takes a record larger than itself: at one record, 4.13 is the record's."""
    clock = VirtualClock()
    endpoint = refusing_bad("4.13")

    async def main() -> None:
        store = await open_store(tmp_path, clock)
        _, bad = await queue_with_a_bad_record(store, 5, 34)
        up = make_uplink(store, endpoint, clock)
        await run_for(up, 300.0, endpoint.too_many)
        assert (await store.stats()).depth == 0 and len(endpoint.stored) == 39
        assert (tmp_path / "rejected" / f"seq-{bad}.cbor").exists()
        await store.close()

    clock.run(main())


@pytest.mark.parametrize(
    ("attack", "response"),
    [
        ("too_large_always", answer("4.13", b"too large")),
        ("ack_of_nothing", answer("2.04", IngestAck((), 0, 0).to_cbor())),
        ("unavailable_max_age_0", answer("5.03", b"busy", max_age=0)),
    ],
)
def test_answers_that_store_nothing_back_off_instead_of_spinning(
    tmp_path: Path, attack: str, response: Response
) -> None:
    """Each made the device send again at once, forever (1,300 requests in 3 s of a loopback):
    4.13 once the batch is down to one record, a 2.04 whose ack lists none of the batch (also
    counted a success), a 5.03 with Max-Age 0."""
    clock = VirtualClock()
    endpoint = ScriptedEndpoint(lambda recs, n: response, max_requests=1000)

    async def main() -> None:
        store = await open_store(tmp_path, clock)
        await store.put([telemetry(i) for i in range(50)])
        up = make_uplink(store, endpoint, clock)
        await run_for(up, 600.0, endpoint.too_many)
        assert (await store.stats()).depth == 50
        assert up.last_error and up.stats.batches_acked == 0
        await store.close()

    clock.run(main())
    assert not endpoint.too_many.is_set()
    assert endpoint.requests < 700, endpoint.requests  # at least backoff_base (1 s) apart


def test_unavailable_with_huge_max_age_pauses_at_most_backoff_max(tmp_path: Path) -> None:
    clock = VirtualClock()
    endpoint = ScriptedEndpoint(
        lambda recs, n: answer("5.03", b"busy", max_age=HUGE_MAX_AGE) if n == 1 else None
    )

    async def main() -> None:
        store = await open_store(tmp_path, clock)
        await store.put([telemetry(i) for i in range(20)])
        up = make_uplink(store, endpoint, clock, backoff_max=120.0)
        await run_for(up, 200.0, endpoint.too_many)
        assert (await store.stats()).depth == 0  # 136 years before
        assert up.last_error == ""
        await store.close()

    clock.run(main())


# -- the endpoint's "last" ---------------------------------------------------------------------


def test_an_ack_whose_last_would_use_up_the_sequence_space_is_not_believed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """One ack with last = 2^63 - 1 - SEQ_BLOCK - 1 moved the store to the end of its space;
    100,000 readings later every put failed, for good."""
    caplog.set_level(logging.INFO, logger="agent.sync.uplink")
    clock = VirtualClock()
    hostile = MAX_SEQ - SEQ_BLOCK - 1

    def rule(recs: list[WireRecord], n: int) -> Response:
        ack = IngestAck.for_seqs([r.seq for r in recs], len(recs), 0, last=hostile)
        return answer("2.04", ack.to_cbor())

    endpoint = ScriptedEndpoint(rule)

    async def main() -> None:
        store = await open_store(tmp_path, clock)
        seqs = await store.put([telemetry(i) for i in range(10)])
        up = make_uplink(store, endpoint, clock)
        await run_for(up, 10.0, endpoint.too_many)
        assert (await store.stats()).depth == 0  # the acks themselves count
        assert store.last_seq == seqs[-1] and up.stats.seq_epochs == 0
        more = await store.put([telemetry(i) for i in range(3)])
        assert more[0] == seqs[-1] + 1
        await store.close()

    clock.run(main())
    said = errors(caplog, "ack_last_refused")
    assert said and said[0].levelno == logging.ERROR and URI in said[0].getMessage()


def test_an_ack_whose_last_is_ahead_within_bounds_still_moves_the_epoch(tmp_path: Path) -> None:
    clock = VirtualClock()
    state: dict[str, int] = {}

    def rule(recs: list[WireRecord], n: int) -> Response:
        state["last"] = max(r.seq for r in recs) + 10**9
        ack = IngestAck.for_seqs([r.seq for r in recs], len(recs), 0, last=state["last"])
        return answer("2.04", ack.to_cbor())

    endpoint = ScriptedEndpoint(rule)

    async def main() -> None:
        store = await open_store(tmp_path, clock)
        await store.put([telemetry(i) for i in range(10)])
        up = make_uplink(store, endpoint, clock)
        await run_for(up, 10.0, endpoint.too_many)
        assert store.last_seq == state["last"] and up.stats.seq_epochs == 1
        await store.close()

    clock.run(main())
