"""agent/gateway/learnrelay.py: a gateway's devices' learning exchanges passed to the cloud. The
cloud here is a scripted transport (what it answers, how long it takes); the real exchange with a
cloud endpoint is tests/e2e/test_gateway_learning.py."""

from __future__ import annotations

import asyncio
import hashlib
from typing import Any

import numpy as np
import pytest

from agent.errors import SyncError
from agent.gateway import learnrelay
from agent.gateway.learnrelay import LearnRelay
from agent.sync.transport import MAX_BODY, Response, code
from agent.wire.learning import MAX_PARAMETERS, Masters, parameter_count

CLOUD = "coap://cloud"


def sha(blob: bytes) -> str:
    return hashlib.sha256(blob).hexdigest()


class Cloud:
    """Answers each request with ``answer(method, path, payload)``: a Response, or an exception
    to raise; ``gate``, when set, holds every answer until it is set."""

    def __init__(self, answer: Any) -> None:
        self.answer = answer
        self.requests: list[tuple[str, str, bytes, int]] = []
        self.gate: asyncio.Event | None = None

    async def request(self, method: str, uri: str, payload: bytes = b"", **kw: Any) -> Response:
        self.requests.append((method, uri.removeprefix(CLOUD), payload, kw.get("lane", 0)))
        if self.gate is not None:
            await self.gate.wait()
        out = self.answer(method, uri.removeprefix(CLOUD), payload)
        if isinstance(out, Exception):
            raise out
        if len(out.payload) > kw.get("max_body", MAX_BODY):  # as CoapTransport.request ends it
            raise SyncError(f"{method} {uri}: the answer is larger than {kw['max_body']} bytes")
        return out


def relay(cloud: Cloud, lanes: int = 2) -> LearnRelay:
    return LearnRelay(cloud, lambda: CLOUD, lanes)  # type: ignore[arg-type]


def blobs(n: int) -> dict[str, bytes]:
    out = {}
    for i in range(n):
        b = f"weights {i}".encode()
        out[sha(b)] = b
    return out


def serving(store: dict[str, bytes]) -> Any:
    def answer(method: str, path: str, payload: bytes) -> Response:
        blob = store.get(path.rsplit("/", 1)[-1])
        if blob is None:
            return Response(code("4.04"), b"no such masters")
        return Response(code("2.05"), blob)

    return answer


async def test_devices_asking_at_once_are_served_from_one_fetch_then_from_memory() -> None:
    store = blobs(1)
    ((name, blob),) = store.items()
    cloud = Cloud(serving(store))
    cloud.gate = asyncio.Event()
    r = relay(cloud)
    asking = [asyncio.ensure_future(r.masters(name)) for _ in range(5)]
    await asyncio.sleep(0)
    cloud.gate.set()
    assert await asyncio.gather(*asking) == [("2.05", blob)] * 5
    assert await r.masters(name) == ("2.05", blob)
    assert len(cloud.requests) == 1 and r.fetches == 1
    assert cloud.requests[0][:2] == ("GET", f"/learn/masters/{name}")


async def test_weights_that_are_not_the_ones_named_are_neither_served_nor_kept() -> None:
    """Attack: whoever answers in the cloud's place sends other weights under the name."""
    name = sha(b"the real weights")
    cloud = Cloud(lambda *_: Response(code("2.05"), b"other weights"))
    r = relay(cloud)
    for _ in range(2):
        assert (await r.masters(name))[0] == "5.03"
    assert len(cloud.requests) == 2 and r.fetches == 0  # asked again: nothing was kept


async def test_a_slow_fetch_answers_5_03_and_goes_on(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(learnrelay, "MASTERS_WAIT", 0.05)
    store = blobs(1)
    ((name, blob),) = store.items()
    cloud = Cloud(serving(store))
    cloud.gate = asyncio.Event()
    r = relay(cloud)
    assert await r.masters(name) == ("5.03", b"fetching the masters from the cloud")
    cloud.gate.set()
    await asyncio.sleep(0.01)
    assert await r.masters(name) == ("2.05", blob)
    assert len(cloud.requests) == 1


async def test_the_masters_of_a_model_as_large_as_the_wire_allows_are_relayed() -> None:
    """A model of 51,528 weights (the wire allows 65,536): its masters are 206 KB. The gateway
    fetched at most an update's size (MAX_BODY_BYTES, 135 KB), so every device behind it was
    answered 5.03 until the round's deadline, while a device of the cloud itself got them."""
    sizes = (128, 200, 128)
    assert parameter_count(sizes) <= MAX_PARAMETERS
    blob = Masters("wide-ae", sizes, np.zeros(parameter_count(sizes), np.float32)).to_cbor()
    cloud = Cloud(serving({sha(blob): blob}))
    assert await relay(cloud).masters(sha(blob)) == ("2.05", blob)


async def test_at_most_masters_kept_weights_are_held() -> None:
    store = blobs(learnrelay.MASTERS_KEPT + 2)
    names = list(store)
    cloud = Cloud(serving(store))
    r = relay(cloud)
    for name in names:
        assert (await r.masters(name))[0] == "2.05"
    assert len(r._kept) == learnrelay.MASTERS_KEPT
    await r.masters(names[-1])  # held
    assert len(cloud.requests) == len(names)
    await r.masters(names[0])  # the least recently asked: dropped, fetched again
    assert len(cloud.requests) == len(names) + 1


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        (Response(code("2.04"), b""), ("2.04", b"")),
        (
            Response(code("4.03"), b"round 3 closed at its deadline"),
            ("4.03", b"round 3 closed at its deadline"),
        ),
        (
            Response(code("4.00"), b"update: delta must be finite"),
            ("4.00", b"update: delta must be finite"),
        ),
        (Response(code("4.04"), b"no learning job 9"), ("4.04", b"no learning job 9")),
        # the gateway's own trouble with the cloud, or the cloud's: the device asks again
        (Response(code("4.01"), b""), ("5.03", b"the cloud answered 4.01")),
        (Response(code("4.29"), b""), ("5.03", b"the cloud answered 4.29")),
        (Response(code("5.03"), b""), ("5.03", b"the cloud answered 5.03")),
        (SyncError("no answer within 30 s"), ("5.03", b"the cloud did not answer")),
    ],
)
async def test_an_upload_gets_the_clouds_answer_or_5_03(answer: Any, expected: Any) -> None:
    cloud = Cloud(lambda *_: answer)
    r = relay(cloud)
    assert await r.upload("pump-a", b"the update") == expected
    assert cloud.requests == [("POST", "/learn/pump-a", b"the update", 1)]
    assert r.uploads == (1 if expected[0] == "2.04" else 0)


async def test_a_refusal_is_passed_on_at_most_200_bytes() -> None:
    cloud = Cloud(lambda *_: Response(code("4.00"), b"x" * 5000))
    assert await relay(cloud).upload("pump-a", b"u") == ("4.00", b"x" * 200)


async def test_exchanges_take_turns_on_the_lanes() -> None:
    store = blobs(2)
    cloud = Cloud(serving(store))
    r = relay(cloud, lanes=2)
    for name in store:
        await r.masters(name)
    await r.upload("pump-a", b"u")
    assert [lane for *_, lane in cloud.requests] == [1, 0, 1]


async def test_a_flood_of_exchanges_is_answered_5_03_beyond_the_bound(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Attack: a device behind the gateway sends many uploads, or asks for many names, at once;
    the gateway keeps at most MAX_IN_FLIGHT exchanges with the cloud and answers the rest 5.03."""
    monkeypatch.setattr(learnrelay, "MAX_IN_FLIGHT", 4)
    cloud = Cloud(lambda *_: Response(code("2.04"), b""))
    cloud.gate = asyncio.Event()
    r = relay(cloud)
    names = [sha(bytes([i])) for i in range(3)]
    waiting = [asyncio.ensure_future(r.masters(n)) for n in names]
    waiting += [asyncio.ensure_future(r.upload(f"pump-{i}", b"u")) for i in range(3)]
    await asyncio.sleep(0)
    assert r.in_flight == 4
    done = [w.result() for w in waiting if w.done()]
    assert done == [learnrelay.BUSY] * 2
    assert await r.masters(sha(b"another")) == learnrelay.BUSY
    cloud.gate.set()
    await asyncio.gather(*waiting)
    assert r.in_flight == 0 and len(cloud.requests) == 4


async def test_a_device_has_one_upload_with_the_cloud_at_a_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Attack: one device behind the gateway floods it with uploads while the cloud is slow.
    Only its first goes to the cloud; the others are answered 5.03 at once, so the gateway's
    exchanges stay free for the other devices (before, the flood took all MAX_IN_FLIGHT and every
    other device was answered busy). Once its upload is answered, the device may send again."""
    monkeypatch.setattr(learnrelay, "MAX_IN_FLIGHT", 4)
    cloud = Cloud(lambda *_: Response(code("2.04"), b""))
    cloud.gate = asyncio.Event()
    r = relay(cloud)
    flood = [asyncio.ensure_future(r.upload("pump-a", b"u")) for _ in range(6)]
    await asyncio.sleep(0)
    assert [f.result() for f in flood if f.done()] == [learnrelay.UPLOADING] * 5
    others = [asyncio.ensure_future(r.upload(f"pump-{i}", b"u")) for i in range(3)]
    await asyncio.sleep(0)
    assert r.in_flight == 4 and not any(o.done() for o in others)
    cloud.gate.set()
    assert await asyncio.gather(*others) == [("2.04", b"")] * 3
    assert (await asyncio.gather(*flood)).count(("2.04", b"")) == 1
    assert await r.upload("pump-a", b"again") == ("2.04", b"")
    assert [p for _, p, _, _ in cloud.requests].count("/learn/pump-a") == 2
    assert r.in_flight == 0 and r.uploads == 5


async def test_closing_ends_the_fetches_a_timed_out_device_left_running(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A device's GET timed out while the fetch goes on; the gateway stops (agent/gateway/
    service.py closes the relay before its transport): the fetch ends with it, not left pending
    to use the closed transport (a new client context for its next block) or to be destroyed
    pending with the loop; nothing is counted in flight, and a later exchange is answered 5.03."""
    monkeypatch.setattr(learnrelay, "MASTERS_WAIT", 0.01)
    store = blobs(1)
    ((name, _),) = store.items()
    cloud = Cloud(serving(store))
    cloud.gate = asyncio.Event()  # the cloud never answers
    r = relay(cloud)
    assert (await r.masters(name))[0] == "5.03"
    (fetch,) = r._fetching.values()
    await r.close()
    assert fetch.cancelled() and r.in_flight == 0 and not r._fetching
    assert (await r.masters(sha(b"other")))[0] == "5.03"
    assert (await r.upload("pump-a", b"u"))[0] == "5.03"
    assert len(cloud.requests) == 1
