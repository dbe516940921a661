"""Bad input over UDP: 1,000 generated bad requests (fixed seed) each get the 4.xx they deserve,
nothing of them is stored, and the endpoint keeps serving; Observe where it means nothing gets one
answer; 2,000 malformed datagrams (tools/hostile.py) leave a handful of log lines, never a
traceback."""

from __future__ import annotations

import asyncio
import logging
import random
from collections import Counter
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import aiocoap
import cbor2
import pytest
from aiocoap import Code, Message
from aiocoap.numbers.optionnumbers import OptionNumber
from aiocoap.optiontypes import BlockOption, OpaqueOption
from hostile import DATAGRAM_KINDS, malformed_datagrams

import cloud.server
from agent import logsetup
from agent.wire.batch import IngestAck, WireRecord
from agent.wire.codec import encode_batch
from agent.wire.records import TelemetryBody
from cloud.server import CloudServer, Limits

DEVICE = "pump-01"
T0 = 1_700_000_000.0
COUNT = 1000
GROUP = 50  # requests in flight at once
LIMITS = Limits(batch_bytes=8 * 1024, state_bytes=2 * 1024)


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[CloudServer]:
    srv = await CloudServer.start(tmp_path, "127.0.0.1", 0, limits=LIMITS, allow_plain=True)
    await srv.add_device(DEVICE)
    yield srv
    await srv.stop()


def good_batch(rng: random.Random, seq: int = 1) -> bytes:
    body = TelemetryBody("motor", T0, {"current_a": rng.random()}).to_cbor()
    return encode_batch(DEVICE, [WireRecord(seq, "telemetry", T0, body)])


def random_scalar(rng: random.Random) -> object:
    return rng.choice([None, True, -1, 2**70, 1.5, "text", b"\x00\x01", [], {}])


# Each generator returns (request without its URI host part, the code it must get).
Gen = Callable[[random.Random], tuple[Message, Code]]


def _msg(code: Code, path: str, payload: bytes = b"", cf: int | None = None) -> Message:
    msg = Message(code=code, uri_path=tuple(p for p in path.split("/") if p), payload=payload)
    if cf is not None:
        msg.opt.content_format = cf
    return msg


def random_bytes(rng: random.Random) -> tuple[Message, Code]:
    # the first byte's major type is not 4 (array): never a SenML pack, whatever follows
    first = rng.choice([b for b in range(256) if b >> 5 != 4])
    payload = bytes([first]) + rng.randbytes(rng.randrange(0, 200))
    return _msg(Code.POST, f"/ingest/{DEVICE}", payload, 112), Code.BAD_REQUEST


def wrong_cbor_types(rng: random.Random) -> tuple[Message, Code]:
    good = {"seq": rng.randrange(1000), -2: f"{DEVICE}/motor/", -3: T0, 0: "x", 2: 1.0}
    label = rng.choice(["seq", -2, -3, 0, 2])
    wrong = {
        "seq": rng.choice([-1, "7", 1.5, None, 2**64]),
        -2: rng.choice([7, b"bn", "no-slash", "a/b/c/d/", None]),
        -3: rng.choice(["now", None, [], b"t"]),
        0: rng.choice([5, None, b"x", "bad name!", ""]),
        2: rng.choice(["1.0", None, True, [1]]),
    }[label]
    shape = rng.randrange(4)
    if shape == 0:
        doc: object = [{**good, label: wrong}]
    elif shape == 1:
        doc = {**good}  # a map, not an array
    elif shape == 2:
        doc = [random_scalar(rng) for _ in range(rng.randrange(1, 4))]
        doc = [d for d in doc if not isinstance(d, list)] or [1]
    else:
        doc = [{**good, 8: b"body"}]  # v and vd
    return _msg(Code.POST, f"/ingest/{DEVICE}", cbor2.dumps(doc), 112), Code.BAD_REQUEST


def wrong_content_format(rng: random.Random) -> tuple[Message, Code]:
    cf = rng.choice([None, 0, 40, 41, 42, 50, 60, 110, 111, 113, 64999, rng.randrange(1, 65535)])
    if cf in (
        112,
        65000,
        65001,
        65002,
    ):  # registered (agent/wire/codec.py)
        cf = 60
    return _msg(
        Code.POST, f"/ingest/{DEVICE}", good_batch(rng), cf
    ), Code.UNSUPPORTED_CONTENT_FORMAT


def oversize(rng: random.Random) -> tuple[Message, Code]:
    if rng.random() < 0.7:
        size = LIMITS.batch_bytes + rng.randrange(1, 4000)
        return _msg(
            Code.POST, f"/ingest/{DEVICE}", rng.randbytes(size), 112
        ), Code.REQUEST_ENTITY_TOO_LARGE
    size = LIMITS.state_bytes + rng.randrange(1, 2000)
    path = rng.choice([f"/state/{DEVICE}/reported", f"/state/{DEVICE}/desired"])
    return _msg(Code.PUT, path, rng.randbytes(size), 60), Code.REQUEST_ENTITY_TOO_LARGE


def unknown_device(rng: random.Random) -> tuple[Message, Code]:
    device = rng.choice([f"ghost-{rng.randrange(10**6)}", "-bad", "a" * 70, "x y", "dev%2F1"])
    choice = rng.randrange(4)
    if choice == 0:
        return _msg(Code.POST, f"/ingest/{device}", good_batch(rng), 112), Code.NOT_FOUND
    if choice == 1:
        return _msg(Code.GET, f"/state/{device}/desired"), Code.NOT_FOUND
    if choice == 2:
        body = cbor2.dumps({"queue/depth": [1, 0]})
        return _msg(Code.PUT, f"/state/{device}/reported", body, 60), Code.NOT_FOUND
    return _msg(Code.GET, f"/devices/{device}"), Code.NOT_FOUND


def unknown_path(rng: random.Random) -> tuple[Message, Code]:
    words = ["ingest", "state", "devices", "models", "infer", "x", DEVICE, "desired", ".well-known"]
    path = "/".join(rng.choice(words) for _ in range(rng.choice([0, 1, 3, 4, 5])))
    if path in ("", "ingest", "state", "devices"):
        path = f"{path}/nope/nope/nope"
    if path.startswith(f"ingest/{DEVICE}") and path.count("/") == 1:
        path += "/extra"
    return _msg(rng.choice([Code.GET, Code.POST]), "/" + path), Code.NOT_FOUND


def wrong_method(rng: random.Random) -> tuple[Message, Code]:
    path, methods = rng.choice(
        [
            (f"/ingest/{DEVICE}", [Code.GET, Code.PUT, Code.DELETE, Code.FETCH, Code.PATCH]),
            (f"/state/{DEVICE}/desired", [Code.POST, Code.DELETE, Code.iPATCH]),
            (f"/state/{DEVICE}/reported", [Code.POST, Code.DELETE]),
            (f"/devices/{DEVICE}", [Code.PUT, Code.POST, Code.DELETE]),
            ("/.well-known/core", [Code.PUT, Code.POST, Code.DELETE]),
        ]
    )
    return _msg(rng.choice(methods), path, b"\xa0", 60), Code.METHOD_NOT_ALLOWED


def bad_option(rng: random.Random) -> tuple[Message, Code]:
    msg = _msg(Code.POST, f"/ingest/{DEVICE}", good_batch(rng), 112)
    kind = rng.randrange(3)
    if kind == 0:  # an unrecognized critical (odd) option number
        number = rng.choice([9, 13, 19, 25, 2049, 65001])
        msg.opt.add_option(OpaqueOption(OptionNumber(number), b"x"))
    elif kind == 1:
        msg.opt.uri_query = ("since=0",)
    else:
        msg.opt.if_match = [b"\x01\x02"]
    return msg, Code.BAD_OPTION


def bad_state(rng: random.Random) -> tuple[Message, Code]:
    if rng.random() < 0.5:
        doc = rng.choice(
            [
                [1, 2],
                {"queue/depth": 5},
                {"queue/depth": [-1, 0]},
                {"Bad Key": [1, 0]},
                {"counter/sent": [1, "many"]},
                {"model/anomaly": [1, {"status": "exploded"}]},
                {7: [1, 0]},
            ]
        )
        return _msg(Code.PUT, f"/state/{DEVICE}/reported", cbor2.dumps(doc), 60), Code.BAD_REQUEST
    doc = rng.choice(
        [
            {"sensor/motor/intervl": 1.0},
            {"sensor/motor/interval": -1},
            {"sensor/motor/interval": "fast"},
            {"sensor/motor/enabled": 1},
            {"model/anomaly": {"sha256": "00"}},
            {"detect/main/threshold": float("nan")},
            [],
        ]
    )
    return _msg(Code.PUT, f"/state/{DEVICE}/desired", cbor2.dumps(doc), 60), Code.BAD_REQUEST


def bad_accept(rng: random.Random) -> tuple[Message, Code]:
    msg = _msg(Code.GET, rng.choice([f"/state/{DEVICE}/desired", "/.well-known/core"]))
    msg.opt.accept = rng.choice([0, 50, 112, 65000])
    return msg, Code.NOT_ACCEPTABLE


def orphan_block(rng: random.Random) -> tuple[Message, Code]:
    """A Block1 block that continues no upload in progress."""
    msg = _msg(Code.POST, f"/ingest/{DEVICE}", rng.randbytes(64), 112)
    msg.opt.block1 = BlockOption.BlockwiseTuple(rng.randrange(1, 50), rng.random() < 0.5, 2)
    return msg, Code.REQUEST_ENTITY_INCOMPLETE


GENERATORS: list[Gen] = [
    random_bytes,
    wrong_cbor_types,
    wrong_content_format,
    oversize,
    unknown_device,
    unknown_path,
    wrong_method,
    bad_option,
    bad_state,
    bad_accept,
    orphan_block,
]


async def test_thousand_bad_requests_get_4xx_and_the_endpoint_keeps_serving(
    server: CloudServer,
) -> None:
    rng = random.Random(20240505)
    generators = [rng.choice(GENERATORS) for _ in range(COUNT)]
    assert all(generators.count(g) >= 50 for g in GENERATORS)  # every kind is well exercised
    cases = [generate(rng) for generate in generators]
    ctx = await aiocoap.Context.create_client_context(transports=["udp6"])
    got: Counter[str] = Counter()
    wrong: list[str] = []

    async def send(msg: Message, expected: Code) -> None:
        request = Message(code=msg.code, payload=msg.payload, uri=f"{server.uri}/")
        for option in msg.opt.option_list():
            request.opt.add_option(option)
        blockwise = request.opt.block1 is None  # a hand-made block goes out as it is
        async with asyncio.timeout(30):
            response = await ctx.request(request, handle_blockwise=blockwise).response
        got[str(response.code)] += 1
        if response.code != expected:
            wrong.append(
                f"{msg.code} /{'/'.join(msg.opt.uri_path)}: {response.code}, want {expected}"
            )

    try:
        for start in range(0, COUNT, GROUP):
            await asyncio.gather(*(send(m, c) for m, c in cases[start : start + GROUP]))
        assert not wrong, f"{len(wrong)} wrong answers, e.g. {wrong[:5]}"
        assert sum(got.values()) == COUNT
        assert all(code.startswith("4.") for code in got)
        assert len(got) == 8  # 4.00, 4.02, 4.04, 4.05, 4.06, 4.08, 4.13, 4.15

        # nothing of them was stored, no stranger registered, and a good request still works
        assert await server.records(DEVICE) == []
        assert [d.id for d in await server.db(lambda s: s.devices())] == [DEVICE]
        good = Message(
            code=Code.POST,
            uri=f"{server.uri}/ingest/{DEVICE}",
            payload=good_batch(rng, seq=42),
            content_format=112,
        )
        async with asyncio.timeout(10):
            response = await ctx.request(good).response
        assert response.code == Code.CHANGED
        assert IngestAck.from_cbor(response.payload).ranges == ((42, 42),)
        assert server.responses["5.00 Internal Server Error"] == 0
    finally:
        await ctx.shutdown()


# -- Observe where it means nothing ---------------------------------------------------------------


@pytest.mark.timeout(60)
async def test_observe_on_resources_that_are_not_observable_gets_one_answer_and_no_traceback(
    server: CloudServer, caplog: pytest.LogCaptureFixture
) -> None:
    """Observe on anything but desired state is answered once, as a plain request, by aiocoap's
    public observation API: no ``'ServerObservation' object has no attribute
    '_cancellation_callback'`` traceback per request."""
    cases = [
        (Code.GET, f"/devices/{DEVICE}", None, Code.CONTENT),
        (Code.GET, f"/state/{DEVICE}/reported", None, Code.CONTENT),
        (Code.GET, "/.well-known/core", None, Code.CONTENT),
        (Code.GET, "/no/such/thing", None, Code.NOT_FOUND),
        (Code.GET, "/state/ghost-1/desired", None, Code.NOT_FOUND),
        (Code.GET, f"/ingest/{DEVICE}", None, Code.METHOD_NOT_ALLOWED),
        (Code.POST, f"/ingest/{DEVICE}", (b"\x80", 112), Code.CHANGED),  # an empty batch
        (Code.PUT, f"/state/{DEVICE}/desired", (cbor2.dumps({"x": 1}), 60), Code.BAD_REQUEST),
    ]
    ctx = await aiocoap.Context.create_client_context(transports=["udp6"])
    try:
        for code, path, body, expected in cases * 5:
            msg = Message(code=code, uri=f"{server.uri}{path}", observe=0)
            if body is not None:
                msg.payload, msg.opt.content_format = body
            request = ctx.request(msg)
            async with asyncio.timeout(10):
                response = await request.response
                assert (response.code, response.opt.observe) == (expected, None), path
                assert [n async for n in request.observation] == []  # ended: not observable
        # desired state is still observable
        desired = ctx.request(
            Message(code=Code.GET, uri=f"{server.uri}/state/{DEVICE}/desired", observe=0)
        )
        async with asyncio.timeout(10):
            assert (await desired.response).opt.observe is not None
        assert server.observers(DEVICE) == 1
        desired.observation.cancel()
    finally:
        await ctx.shutdown()
    tracebacks = [r.getMessage()[:100] for r in caplog.records if r.exc_info]
    assert tracebacks == []
    assert server.responses["5.00 Internal Server Error"] == 0


# -- malformed datagrams --------------------------------------------------------------------------

MALFORMED = 2000


@pytest.mark.timeout(120)
async def test_two_thousand_malformed_datagrams_of_every_kind_log_a_handful_of_lines(
    server: CloudServer, caplog: pytest.LogCaptureFixture
) -> None:
    """2,000 malformed datagrams of every kind tools/hostile.py makes, over plain UDP: the
    endpoint answers a valid request afterwards, no log line carries a traceback, and its
    rate-limited warnings keep the log to a handful of lines (the product's target: at most 20
    bytes of log per bad datagram on average)."""
    datagrams = malformed_datagrams(MALFORMED, seed=20240611, device=DEVICE)
    assert {d.kind for d in datagrams} == set(DATAGRAM_KINDS)
    caplog.set_level(logging.INFO)
    caplog.clear()
    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_datagram_endpoint(
        asyncio.DatagramProtocol, remote_addr=("127.0.0.1", server.port)
    )
    ctx = await aiocoap.Context.create_client_context(transports=["udp6"])
    try:
        for start in range(0, MALFORMED, 40):
            for datagram in datagrams[start : start + 40]:
                transport.sendto(datagram.data)
            await asyncio.sleep(0.005)  # pacing, so that the socket buffers do not overflow
        for _ in range(2):  # a valid request afterwards is served (the second one after it all)
            valid = Message(code=Code.GET, uri=f"{server.uri}/devices/{DEVICE}")
            async with asyncio.timeout(10):
                assert (await ctx.request(valid).response).code == Code.CONTENT
    finally:
        transport.close()
        await ctx.shutdown()
    records_ = list(caplog.records)
    formatter = logging.Formatter(logsetup.FORMAT)
    logged = sum(len(formatter.format(r)) + 1 for r in records_)
    lines = [f"{r.levelname} {r.name} {r.getMessage()[:90]}" for r in records_]
    assert [line for line, r in zip(lines, records_, strict=True) if r.exc_info] == []
    assert not any("Traceback" in r.getMessage() for r in records_)
    assert len(records_) <= 3 * cloud.server.WARN_BURST, "\n".join(lines)
    assert logged / MALFORMED <= 20, f"{logged} bytes of log for {MALFORMED} datagrams"
    assert server.responses["5.00 Internal Server Error"] == 0
    assert server.stats["undecodable_datagrams"] > 0  # counted, if not logged
    assert await server.records(DEVICE) == []  # nothing of them was stored
