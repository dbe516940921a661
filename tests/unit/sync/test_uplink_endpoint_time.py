"""A device whose wall clock is never set (a plant network that blocks NTP) learns the time from
the endpoint's acks (agent/sync/walltime.py): on virtual time with the real store, the real watch
and the scripted endpoint, the wall clock stays at 1970 + uptime for ever."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import cbor2
import pytest

from agent.errors import SyncError
from agent.service.wallclock import FLOOR, WallClockWatch
from agent.sync import uplink as uplink_mod
from agent.sync import walltime
from agent.sync.transport import Endpoints, Response, code
from agent.sync.walltime import EndpointClock
from agent.wire.batch import WireRecord
from agent.wire.records import TelemetryBody
from drivers.clock import VirtualClock
from tests.unit.sync.test_uplink_refusals import URI, ScriptedEndpoint, make_uplink, open_store
from tests.unit.sync.test_uplink_wall_clock import drive

pytestmark = pytest.mark.timeout(60)

BOOT = 30.0  # the wall clock at boot: 1970-01-01T00:00:30Z, and never set
NOW = 1_796_600_000.0  # the endpoint's clock at the device's boot
START = 1000.0  # the monotonic clock at boot


class TimedEndpoint(ScriptedEndpoint):
    """The scripted endpoint, whose acks say its time (``say``: how, from the time; None: an
    older endpoint that does not say it). ``delay``: seconds it takes to answer."""

    def __init__(self, base: VirtualClock, say=float, delay: float = 0.0) -> None:  # type: ignore[assignment]
        super().__init__(lambda recs, n: None)
        self.base = base
        self.say = say
        self.delay = delay
        self.asks = 0  # empty batches

    def time(self) -> float:
        return NOW + (self.base.monotonic() - START)

    async def request(self, method: str, uri: str, payload: bytes = b"", **kw) -> Response:  # type: ignore[override]
        if self.delay:
            await asyncio.sleep(self.delay)
        resp = await super().request(method, uri, payload, **kw)
        if payload == b"\x80":
            self.asks += 1
        if self.say is None:
            return resp
        doc = cbor2.loads(resp.payload)
        doc["now"] = self.say(self.time())
        return Response(code=code("2.04"), payload=cbor2.dumps(doc))


def run(
    tmp_path: Path,
    endpoint: TimedEndpoint,
    base: VirtualClock,
    seconds: float,
    uris: tuple[str, ...] = (),
) -> dict[int, tuple[float, WireRecord]]:
    """A reading every second for ``seconds`` while the uplink and the watch run on the clock
    that learns from the endpoint (``uris``: the uplink's endpoint list, default one): the
    endpoint's time when each was taken, and what it stored."""
    clock = EndpointClock(base)
    taken: dict[int, float] = {}

    async def main() -> None:
        store = await open_store(tmp_path, clock)  # type: ignore[arg-type]
        watch = WallClockWatch(store, clock)
        uplink = make_uplink(store, endpoint, clock)  # type: ignore[arg-type]
        uplink.wall_settled = watch.settled
        uplink.endpoint_time = clock
        if uris:
            uplink.endpoints = Endpoints(uris, clock)
        await drive(
            clock, store, uplink, watch, seconds, lambda i: taken.update({i: endpoint.time()})
        )

    base.run(main())
    out = {}
    for rec in endpoint.stored.values():
        body = TelemetryBody.from_cbor(bytes(rec.body))
        out[int(body.values["current_a"])] = (taken[int(body.values["current_a"])], rec)
    return out


def times(stored: dict[int, tuple[float, WireRecord]]) -> list[tuple[float, float]]:
    """(the endpoint's time when taken, the body's time) of each stored reading."""
    return [(t, TelemetryBody.from_cbor(bytes(r.body)).time) for t, r in stored.values()]


def test_every_reading_gets_the_endpoints_time_though_ntp_never_answers(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Before: the hold ran out (WALL_HOLD) and every reading went stamped 1970 + uptime, for
    ever. Now the uplink asks the endpoint for its time while it holds the records (an empty
    batch: the records held are not in it), the watch restamps those taken before, and the
    hold ends at once: every reading is stamped within a second of the endpoint's time."""
    caplog.set_level(logging.INFO)
    base = VirtualClock(start_wall=BOOT, start_monotonic=START)
    endpoint = TimedEndpoint(base)
    seconds = uplink_mod.WALL_HOLD + 60.0
    stored = run(tmp_path, endpoint, base, seconds)
    assert len(stored) == int(seconds)
    assert base.time() < FLOOR  # the system clock was never set
    for said, stamped in times(stored):
        assert abs(stamped - said) <= 1.0, (said, stamped)
    for _, rec in stored.values():
        assert rec.created == TelemetryBody.from_cbor(bytes(rec.body)).time
    messages = [r.getMessage() for r in caplog.records]
    assert sum("event=wall_clock_from_endpoint" in m for m in messages) == 1  # not per ack
    assert not any("event=uplink_wall_clock_hold_over" in m for m in messages)
    assert any("event=records_restamped" in m for m in messages)
    assert endpoint.asks == 1  # the first answer said it


def test_an_older_endpoint_without_the_time_gets_what_it_got_before(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An endpoint (or a gateway) that does not say its time: the records wait WALL_HOLD, then
    go stamped as they are (``uplink_wall_clock_hold_over``), as before; the asks stay few."""
    caplog.set_level(logging.INFO)
    base = VirtualClock(start_wall=BOOT, start_monotonic=START)
    endpoint = TimedEndpoint(base, say=None)
    seconds = uplink_mod.WALL_HOLD + 20.0
    stored = run(tmp_path, endpoint, base, seconds)
    assert len(stored) == int(seconds)
    assert max(stamped for _, stamped in times(stored)) < FLOOR
    assert any("event=uplink_wall_clock_hold_over" in r.getMessage() for r in caplog.records)
    assert endpoint.asks <= uplink_mod.WALL_HOLD / walltime.ASK_EVERY + 1


@pytest.mark.parametrize(
    "forged",
    [lambda t: float("nan"), lambda t: True, lambda t: 2**70, lambda t: str(t), lambda t: [t]],
    ids=["nan", "bool", "huge-int", "text", "nested"],
)
def test_a_forged_time_moves_nothing_and_the_hold_runs_its_course(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, forged
) -> None:
    """A spoofed or broken answer (plain CoAP, or a buggy peer) with a time that is not one:
    refused as an unreadable ack, no traceback, the clock stays unset; the records wait, as
    with an unreachable endpoint, and are sent again after the hold (the unreadable acks send
    them again too: nothing is lost)."""
    caplog.set_level(logging.INFO)
    base = VirtualClock(start_wall=BOOT, start_monotonic=START)
    endpoint = TimedEndpoint(base, say=forged)
    seconds = uplink_mod.WALL_HOLD + 10.0
    run(tmp_path, endpoint, base, seconds)
    messages = [r.getMessage() for r in caplog.records]
    assert any("event=time_ask_unreadable" in m for m in messages)
    assert not any("event=wall_clock_from_endpoint" in m for m in messages)
    assert any("event=uplink_wall_clock_hold_over" in m for m in messages)
    assert not any(r.exc_info for r in caplog.records)


def test_an_endpoint_too_slow_to_tell_the_time_teaches_nothing(tmp_path: Path) -> None:
    """Answers later than RTT_MAX: the time could be off by half of that; not taken."""
    base = VirtualClock(start_wall=BOOT, start_monotonic=START)
    endpoint = TimedEndpoint(base, delay=walltime.RTT_MAX + 1.0)
    seconds = uplink_mod.WALL_HOLD + 10.0
    stored = run(tmp_path, endpoint, base, seconds)
    assert stored and max(stamped for _, stamped in times(stored)) < FLOOR


def unreachable_until(endpoint: TimedEndpoint, base: VirtualClock, until: float) -> None:
    """``endpoint`` gives no answer (a timeout) before the monotonic time ``until``."""
    inner = endpoint.request

    async def request(method: str, uri: str, payload: bytes = b"", **kw) -> Response:
        if base.monotonic() < until:
            raise SyncError("timeout")
        return await inner(method, uri, payload, **kw)

    endpoint.request = request  # type: ignore[method-assign]


def test_an_endpoint_unreachable_past_the_hold_still_gives_every_reading_its_time(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The endpoint answers nothing for the first 180 s (a modem that attaches late). Before,
    the hold ran out at 120 s, the records of the run were handed to the uplink (and failed),
    and those went stamped 1970 once the link came up. Now the hold counts only once an ask
    was answered: nothing could leave before anyway, the first answer says the time, and every
    reading of the run is restamped with it."""
    caplog.set_level(logging.INFO)
    base = VirtualClock(start_wall=BOOT, start_monotonic=START)
    endpoint = TimedEndpoint(base)
    unreachable_until(endpoint, base, START + uplink_mod.WALL_HOLD + 60.0)
    seconds = uplink_mod.WALL_HOLD + 120.0
    stored = run(tmp_path, endpoint, base, seconds)
    assert len(stored) == int(seconds)
    for said, stamped in times(stored):
        assert abs(stamped - said) <= 1.0, (said, stamped)
    messages = [r.getMessage() for r in caplog.records]
    assert sum("event=uplink_wall_clock_hold_unanswered" in m for m in messages) == 1
    assert not any("event=uplink_wall_clock_hold_over" in m for m in messages)


def test_an_older_endpoint_unreachable_at_first_ends_the_hold_after_its_first_answer(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An endpoint that does not say its time, unreachable for 180 s: the hold counts from its
    first answer (NTP may answer now that the network is up), then ends: readings go as
    stamped, none is lost."""
    caplog.set_level(logging.INFO)
    base = VirtualClock(start_wall=BOOT, start_monotonic=START)
    endpoint = TimedEndpoint(base, say=None)
    up = uplink_mod.WALL_HOLD + 60.0
    unreachable_until(endpoint, base, START + up)
    first = {}
    inner = endpoint.request

    async def request(method: str, uri: str, payload: bytes = b"", **kw) -> Response:
        resp = await inner(method, uri, payload, **kw)
        if payload != b"\x80":
            first.setdefault("batch", base.monotonic())
        return resp

    endpoint.request = request  # type: ignore[method-assign]
    seconds = up + uplink_mod.WALL_HOLD + 30.0
    stored = run(tmp_path, endpoint, base, seconds)
    assert len(stored) == int(seconds)
    assert first["batch"] >= START + up + uplink_mod.WALL_HOLD  # held from the first answer
    assert max(stamped for _, stamped in times(stored)) < FLOOR
    messages = [r.getMessage() for r in caplog.records]
    assert any("event=uplink_wall_clock_hold_over" in m for m in messages)


def test_an_ask_without_an_answer_moves_to_the_next_endpoint(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Two endpoints, the primary down for good: the asks go on to the fallback (as a batch
    would) and the time comes from it, within the hold."""
    caplog.set_level(logging.INFO)
    base = VirtualClock(start_wall=BOOT, start_monotonic=START)
    endpoint = TimedEndpoint(base)
    dead = "coap://127.0.0.2:5683"
    inner = endpoint.request
    asked: list[str] = []

    async def request(method: str, uri: str, payload: bytes = b"", **kw) -> Response:
        asked.append(uri)
        if uri.startswith(dead):
            raise SyncError("timeout")
        return await inner(method, uri, payload, **kw)

    endpoint.request = request  # type: ignore[method-assign]
    stored = run(tmp_path, endpoint, base, 60.0, uris=(dead, URI))
    assert len(stored) == 60 and asked[0].startswith(dead)
    for said, stamped in times(stored):
        assert abs(stamped - said) <= 1.0, (said, stamped)
    assert not any("event=uplink_wall_clock_hold" in r.getMessage() for r in caplog.records)
