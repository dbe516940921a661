"""Device state sync (agent/sync/state.py) against a hostile or broken endpoint, on virtual time.

The endpoint is the scripted side of the transport seam (what ``CoapTransport.request`` and
``observe`` give back); the state file, the parsers and the clock's timers are the real ones.
Attacks: desired documents the scanner spans but that are no map, Max-Age 0 on every
notification, a 5.03 whose Max-Age is years long, a flood of notifications that change nothing
but the document's rev.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import cbor2
import pytest

from agent.sync import state as state_mod
from agent.sync.state import StateSync
from agent.sync.statedata import StateSettings, decode_state
from agent.sync.transport import Endpoints, Response, code
from agent.wire import records
from drivers.clock import VirtualClock
from tests.unit.sync.helpers import run_for

pytestmark = pytest.mark.timeout(60)

DEVICE = "pump-31"
URI = "coap://127.0.0.1:5683"
KEY = "detect/motor/threshold"
HUGE_MAX_AGE = 2**32 - 1  # the largest Max-Age CoAP can carry: 136 years


def document(rev: int, keys: dict[str, list[Any]] | None = None) -> bytes:
    return records.dumps({"rev": rev, "keys": keys or {}})


def content(payload: bytes, max_age: int | None = 60) -> Response:
    return Response(code=code("2.05"), payload=payload, max_age=max_age)


def unavailable(max_age: int | None) -> Response:
    return Response(code=code("5.03"), payload=b"busy", max_age=max_age)


def acks_for(payload: bytes) -> Response:
    """What the endpoint answers a reported PUT that it stores: each key's version."""
    body = records.loads(payload)
    return Response(code=code("2.04"), payload=records.dumps({k: v[0] for k, v in body.items()}))


class Hooks:
    def __init__(self) -> None:
        self.applied: list[tuple[str, Any]] = []

    def reported(self) -> dict[str, Any]:
        return {}

    def apply(self, key: str, value: Any) -> None:
        self.applied.append((key, value))


class ScriptedEndpoint:
    """Registration ``n`` (from 1) of the observation gets ``notifications(n)``, then stays
    quiet; reported PUTs get ``put(n, payload)`` for PUT ``n``."""

    def __init__(
        self,
        notifications: Callable[[int], list[Response]],
        put: Callable[[int, bytes], Response] = lambda n, payload: acks_for(payload),
        max_registrations: int = 1000,
    ) -> None:
        self.notifications = notifications
        self.put = put
        self.registrations = 0
        self.puts = 0
        self.max_registrations = max_registrations
        self.too_many = asyncio.Event()  # a loop: stop the test instead of spinning forever
        self.drained = asyncio.Event()  # the device asked for more after the last notification

    async def request(self, method: str, uri: str, payload: bytes = b"", **kw: Any) -> Response:
        self.puts += 1
        return self.put(self.puts, payload)

    async def observe(self, uri: str, *, deadline: float, lane: int = 0) -> AsyncIterator[Response]:
        self.registrations += 1
        if self.registrations >= self.max_registrations:
            self.too_many.set()
        for resp in self.notifications(self.registrations):
            yield resp
        self.drained.set()
        await asyncio.Event().wait()  # quiet until the device cancels


def make_sync(tmp_path: Path, endpoint: ScriptedEndpoint, clock: VirtualClock, **kw: Any):
    hooks = Hooks()
    settings = StateSettings(path=tmp_path / "state.cbor", **kw)
    sync = StateSync(
        settings,
        endpoint,  # type: ignore[arg-type]
        Endpoints((URI,), clock),
        clock,
        device_id=DEVICE,
        hooks=hooks,
    )
    sync.rng = random.Random(1)
    return sync, hooks


# -- a document the scanner spans but that is no map ---------------------------------------------

ODD_TOP = b"\xbf" + cbor2.dumps({"rev": 2, "keys": {}}) + b"\xff"  # {_ {rev, keys} }
ODD_KEYS = b"\xa2" + cbor2.dumps("rev") + b"\x02" + cbor2.dumps("keys") + b"\xbf\x61k\xff"


@pytest.mark.parametrize(("attack", "payload"), [("odd_top", ODD_TOP), ("odd_keys", ODD_KEYS)])
def test_odd_indefinite_map_document_is_refused_and_the_stage_goes_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, attack: str, payload: bytes
) -> None:
    """It used to raise ScanError (not a StateError) out of the stage: the supervisor restarted
    it, the endpoint served the same document, and the state stage stayed down."""
    caplog.set_level(logging.INFO, logger="agent.sync.state")
    clock = VirtualClock()
    good = document(3, {KEY: [3, 0.5]})
    endpoint = ScriptedEndpoint(lambda n: [content(payload), content(good)])
    sync, hooks = make_sync(tmp_path, endpoint, clock)
    clock.run(run_for(sync, 30.0))
    assert hooks.applied == [(KEY, 0.5)]
    assert sync.status["documents_rejected"] == 1 and sync.status["desired_rev"] == 3
    rejected = [r for r in caplog.records if "event=desired_document_rejected" in r.getMessage()]
    assert len(rejected) == 1 and rejected[0].levelno == logging.WARNING
    assert "odd number of items" in rejected[0].getMessage()
    assert endpoint.registrations == 1


def test_odd_indefinite_blocked_map_is_ignored_and_the_keys_apply(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="agent.sync.state")
    clock = VirtualClock()
    keys = cbor2.dumps({KEY: [3, 0.5]})
    payload = (
        b"\xa3"
        + cbor2.dumps("rev")
        + b"\x03"
        + cbor2.dumps("keys")
        + keys
        + cbor2.dumps("blocked")
        + b"\xbf\x61k\xff"
    )
    endpoint = ScriptedEndpoint(lambda n: [content(payload)])
    sync, hooks = make_sync(tmp_path, endpoint, clock)
    clock.run(run_for(sync, 30.0))
    assert hooks.applied == [(KEY, 0.5)]
    assert "event=desired_key_rejected key=blocked" in caplog.text


# -- Max-Age -------------------------------------------------------------------------------------


def test_max_age_zero_does_not_make_a_registration_loop(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Every notification says Max-Age 0: the device used to register again at once, over and
    over (thousands a second), with the failure count reset each time, so never a backoff."""
    caplog.set_level(logging.INFO, logger="agent.sync.state")
    clock = VirtualClock()
    endpoint = ScriptedEndpoint(lambda n: [content(document(1), max_age=0)])
    sync, _ = make_sync(tmp_path, endpoint, clock)
    clock.run(run_for(sync, 600.0, endpoint.too_many))
    # at least OBSERVE_MIN_MAX_AGE each, and short-lived observations back off
    assert endpoint.registrations < 40, endpoint.registrations
    assert caplog.text.count("event=observe_renew") < 40


def test_unavailable_with_huge_max_age_pauses_observation_at_most_backoff_cap(
    tmp_path: Path,
) -> None:
    clock = VirtualClock()

    def answers(n: int) -> list[Response]:
        return [unavailable(HUGE_MAX_AGE)] if n == 1 else [content(document(4, {KEY: [4, 0.5]}))]

    endpoint = ScriptedEndpoint(answers)
    sync, hooks = make_sync(tmp_path, endpoint, clock)
    clock.run(run_for(sync, state_mod.BACKOFF_CAP + 60.0))
    assert endpoint.registrations == 2 and hooks.applied == [(KEY, 0.5)]


def test_unavailable_with_huge_max_age_pauses_reported_puts_at_most_backoff_cap(
    tmp_path: Path,
) -> None:
    clock = VirtualClock()

    def put(n: int, payload: bytes) -> Response:
        return unavailable(HUGE_MAX_AGE) if n == 1 else acks_for(payload)

    endpoint = ScriptedEndpoint(lambda n: [content(document(1))], put=put)
    sync, _ = make_sync(tmp_path, endpoint, clock)
    clock.run(run_for(sync, state_mod.BACKOFF_CAP + 60.0))
    assert endpoint.puts >= 2 and sync.status["pending"] == 0


# -- a flood of notifications --------------------------------------------------------------------


def test_flood_of_rev_only_notifications_does_not_write_the_state_file_each_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """2000 notifications that change only the rev used to cost 2000 atomic writes (two
    fsyncs each). The rev is saved with the reporter's next write; an applied key at once."""
    flood = 2000
    writes: list[bytes] = []
    real_write = state_mod.write_atomic

    def counting_write(path: Path, data: bytes) -> None:
        writes.append(data)
        real_write(path, data)

    monkeypatch.setattr(state_mod, "write_atomic", counting_write)
    clock = VirtualClock()
    notes = [content(document(rev)) for rev in range(1, flood + 1)]
    notes.append(content(document(flood + 1, {KEY: [flood + 1, 0.5]})))
    endpoint = ScriptedEndpoint(lambda n: notes if n == 1 else [])
    sync, hooks = make_sync(tmp_path, endpoint, clock, min_put_interval=2.0)
    seen: list[tuple[int, dict]] = []

    async def main() -> None:
        task = asyncio.create_task(sync.run())
        try:
            await endpoint.drained.wait()
            assert sync.status["documents"] == flood + 1
            # what was applied is on disk before anything else happens
            seen.append((len(writes), decode_state((tmp_path / "state.cbor").read_bytes())))
            await asyncio.sleep(30.0)
            assert not task.done()
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    clock.run(main())
    assert hooks.applied == [(KEY, 0.5)]
    count, on_disk = seen[0]
    assert KEY in on_disk["applied"] and on_disk["applied"][KEY].version == flood + 1
    assert count < 10 and len(writes) < 40, (count, len(writes))
    assert decode_state(writes[-1])["rev"] == flood + 1  # the rev is saved too, later


# -- keys the endpoint names once ----------------------------------------------------------------


def test_refusals_of_keys_no_longer_desired_do_not_pile_up(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An endpoint naming a new key in each document (a typo an operator corrects, or an
    endpoint that means harm: ``sensor/<any name>/interval`` takes any name): each refusal used
    to stay for as long as the device ran, in memory and in the state file written on every
    save (300 documents: 300 refusals). A refusal is kept while its key is in the document,
    so a version refused is still never tried again."""
    docs = [content(document(n, {f"sensor/s{n}/interval": [n, -5.0]})) for n in range(1, 301)]
    again = content(document(301, {"sensor/s300/interval": [300, -5.0]}))
    endpoint = ScriptedEndpoint(lambda n: [*docs, again] if n == 1 else [])
    caplog.set_level(logging.INFO, logger="agent.sync.state")
    clock = VirtualClock()
    sync, hooks = make_sync(tmp_path, endpoint, clock)
    clock.run(run_for(sync, 600.0))
    assert sync.status["documents"] == 301 and hooks.applied == []
    assert sync.status["desired_failed"] == {"sensor/s300/interval": 300}
    saved = decode_state((tmp_path / "state.cbor").read_bytes())
    assert list(saved["failed"]) == ["sensor/s300/interval"]
    assert caplog.text.count("event=desired_rejected key=sensor/s300/interval ") == 1
