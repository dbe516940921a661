"""Validations of alerts whose record the store renumbered (agent/store/renumber.py): the
endpoint answered the alert's seq as a conflict (below its pruned floor, or another record held
there) and the uplink moved the record above the ack's ``last``. The endpoint then holds the
alert under its new seq only, so its validation and its verdict event must name that one.

They used to keep the old seq: the router sent ``POST /validate`` with it (the endpoint stored
the verdict under the other record's seq, or a seq it holds nothing under) and committed the
verdict event ``{type: "verdict", seq: old}``. A real store, the real router and its
routing.json; the endpoint is a fake transport that answers honest verdicts."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.store.queue import NewRecord, Store
from agent.store.settings import StoreSettings
from agent.sync.routing import Router, RoutingSettings
from agent.sync.transport import Response, code
from agent.wire import records
from agent.wire.records import AlertBody, EventBody, Kind
from tests.unit.sync.helpers import an_alert, honest_verdict

pytestmark = pytest.mark.timeout(60)

DEVICE = "pump-23"
WINDOW = np.linspace(0.0, 1.0, 32)


class Endpoint:
    """``POST /validate``: an honest verdict on the window it got; the seqs it was asked."""

    def __init__(self) -> None:
        self.asked: list[int] = []

    async def request(self, method: str, uri: str, payload: bytes = b"", **_: Any) -> Response:
        req = records.loads(payload)
        self.asked.append(req["seq"])
        verdict = honest_verdict(req)
        return Response(code("2.05"), records.dumps(verdict), content_format=60)


def router(tmp_path: Path, store: Store, endpoint: Endpoint) -> Router:
    return Router(
        RoutingSettings(state_path=tmp_path / "routing.json"),
        device_id=DEVICE,
        store=store,
        transport=endpoint,
        endpoint="coap://127.0.0.1:5683",
        rng=random.Random(1),
    )


async def queued_alert(store: Store) -> int:
    alert = an_alert()
    body = AlertBody(alert.time, {**alert.to_dict(), "window": [float(v) for v in WINDOW]})
    [seq] = await store.put([NewRecord(Kind.ALERT, body.to_cbor())])
    return seq


async def verdict_events(store: Store) -> list[int]:
    """The seqs the verdict events queued in ``store`` name."""
    out = []
    for rec in await store.batch(1000, 1 << 20):
        if rec.kind is Kind.EVENT:
            data = EventBody.from_cbor(rec.payload).data
            if data.get("type") == "verdict":
                out.append(data["seq"])
    return out


@pytest.fixture
async def store(tmp_path: Path):
    s = await Store.open(StoreSettings(path=tmp_path / "queue.db"))
    yield s
    await s.close()


async def test_a_validation_of_a_renumbered_alert_names_its_new_seq(tmp_path, store) -> None:
    endpoint = Endpoint()
    r = router(tmp_path, store, endpoint)
    seq = await queued_alert(store)
    r.on_alert(an_alert(), seq, WINDOW)
    await r.save()
    last = seq + 1000  # the ack said: conflict, "last" this
    assert await store.renumber([seq], floor=last) == {seq: last + 1}
    await r.step()
    assert endpoint.asked == [last + 1]
    assert sorted(r.verdicts) == [last + 1] and r.verdicts[last + 1]["seq"] == last + 1
    assert await verdict_events(store) == [last + 1]


async def test_a_renumbering_the_router_missed_is_followed_after_a_restart(tmp_path, store) -> None:
    """The renumbering is durable in the store; routing.json was saved before it (a power cut
    after the store's commit): the router started again still sends the new seq."""
    endpoint = Endpoint()
    first = router(tmp_path, store, endpoint)
    seq = await queued_alert(store)
    first.on_alert(an_alert(), seq, WINDOW)
    await first.save()
    [new] = (await store.renumber([seq], floor=seq + 1000)).values()
    [newer] = (await store.renumber([new], floor=new + 1000)).values()  # a second conflict
    again = router(tmp_path, store, endpoint)
    assert sorted(again.pending) == [seq]  # as routing.json has it
    await again.step()
    assert endpoint.asked == [newer]
    assert await verdict_events(store) == [newer]


async def test_a_verdict_merged_before_the_renumbering_is_committed_under_the_new_seq(
    tmp_path, store
) -> None:
    """The verdict came back, the store could not take its event yet; then the alert was
    renumbered: the event names the new seq."""
    endpoint = Endpoint()
    r = router(tmp_path, store, endpoint)
    seq = await queued_alert(store)
    r.on_alert(an_alert(), seq, WINDOW)
    real_store, r.store = r.store, None  # the event is not committed yet
    await r.step()
    assert endpoint.asked == [seq] and sorted(r.verdicts) == [seq]
    r.store = real_store
    [new] = (await store.renumber([seq], floor=seq + 1000)).values()
    await r.step()
    assert await verdict_events(store) == [new]
    assert sorted(r.verdicts) == [new] and r.verdicts[new]["seq"] == new


async def test_an_alert_renumbered_while_its_validation_is_out_is_asked_again_under_the_new_seq(
    tmp_path, store
) -> None:
    """The endpoint keeps a verdict under the seq it was asked with: one asked under the old
    seq is not taken; the endpoint is asked again under the new one."""
    endpoint = Endpoint()
    r = router(tmp_path, store, endpoint)
    seq = await queued_alert(store)
    r.on_alert(an_alert(), seq, WINDOW)
    answer = endpoint.request
    moved: dict[int, int] = {}

    async def renumbered_meanwhile(*args: Any, **kw: Any) -> Response:
        endpoint.request = answer  # type: ignore[method-assign]
        moved.update(await store.renumber([seq], floor=seq + 1000))
        return await answer(*args, **kw)

    endpoint.request = renumbered_meanwhile  # type: ignore[method-assign]
    await r.step()
    await r.step()
    new = moved[seq]
    assert endpoint.asked == [seq, new]
    assert sorted(r.verdicts) == [new]
    assert await verdict_events(store) == [new]
