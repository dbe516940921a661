"""Record bodies (agent/wire/records.py) and the SenML-CBOR batch codec (agent/wire/codec.py)."""

from __future__ import annotations

import math
import struct
from typing import Any

import cbor2
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.wire import batch, codec, senml
from agent.wire.batch import (
    CF_SENML_CBOR,
    CodecError,
    IngestAck,
    UnsupportedFormat,
    WireRecord,
    seq_ranges,
)
from agent.wire.codec import decode_batch, encode_batch
from agent.wire.records import (
    AlertBody,
    EventBody,
    Kind,
    RecordError,
    StateBody,
    TelemetryBody,
    body_time,
    decode_body,
)

T0 = 1_700_000_000.0

# -- record bodies: fixed bytes --------------------------------------------------------------------


def test_telemetry_body_fixed_bytes() -> None:
    body = TelemetryBody("motor", T0 + 0.5, {"current_a": 1.5})
    expected = bytes.fromhex(
        "83"  # array(3)
        "656d6f746f72"  # "motor"
        "fb41d954fc40200000"  # 1700000000.5, double (no shorter float holds it)
        "a1"  # map(1)
        "6963757272656e745f61"  # "current_a"
        "f93e00"  # 1.5, half precision
    )
    assert body.to_cbor() == expected
    assert TelemetryBody.from_cbor(expected) == body


def test_alert_body_fixed_bytes_sorted_keys() -> None:
    body = AlertBody(T0, {"score": 0.75, "raise": True})
    expected = bytes.fromhex(
        "82"
        "fa4ecaa7e2"  # 1700000000.0 fits a single-precision float exactly
        "a2"
        "657261697365f5"  # "raise": true  (keys sorted: same length, then bytewise)
        "6573636f7265f93a00"  # "score": 0.75
    )
    assert body.to_cbor() == expected
    assert AlertBody.from_cbor(expected) == body


@pytest.mark.parametrize("cls", [AlertBody, EventBody, StateBody])
def test_timed_bodies_round_trip(cls: Any) -> None:
    body = cls(T0 + 1.25, {"what": "sensor_degraded", "sensor": "motor", "n": [1, 2]})
    assert cls.from_cbor(body.to_cbor()) == body
    assert decode_body(cls.kind, body.to_cbor()) == body


@pytest.mark.parametrize(
    ("kind", "data"),
    [
        ("telemetry", b"\xff"),  # not CBOR
        ("telemetry", cbor2.dumps(["s", 1.0])),  # too short
        ("telemetry", cbor2.dumps([1, 1.0, {}])),  # sensor not text
        ("telemetry", cbor2.dumps(["s", "now", {}])),  # time not a number
        ("telemetry", cbor2.dumps(["s", True, {}])),  # bool is not a time
        ("telemetry", cbor2.dumps(["s", 1.0, {"x": "high"}])),  # value not a number
        ("telemetry", cbor2.dumps(["s", 1.0, {1: 1.0}])),  # channel not text
        ("alert", cbor2.dumps([1.0, [1]])),  # data not a map
        ("alert", cbor2.dumps({"t": 1.0})),  # not an array
        ("event", cbor2.dumps([1.0, {}]) + b"\x00"),  # trailing bytes
        ("gossip", cbor2.dumps([1.0, {}])),  # unknown kind
    ],
)
def test_bad_bodies_raise_record_error(kind: str, data: bytes) -> None:
    with pytest.raises(RecordError):
        decode_body(kind, data)
    assert body_time(kind, data, 7.0) == 7.0


def test_body_time() -> None:
    assert body_time("telemetry", TelemetryBody("s", 12.5, {"x": 1.0}).to_cbor(), 0.0) == 12.5
    assert body_time("state", StateBody(math.inf, {}).to_cbor(), 3.0) == 3.0


# -- the batch codec: fixed bytes --------------------------------------------------------------


def test_senml_batch_fixed_bytes() -> None:
    tele = TelemetryBody("s", T0, {"x": 1.5}).to_cbor()
    alert = AlertBody(T0 + 0.5, {"a": 1}).to_cbor()
    records = [
        WireRecord(5, "telemetry", T0, tele),
        WireRecord(6, "alert", T0 + 0.5, alert),
    ]
    expected = bytes.fromhex(
        "82"  # the pack: 2 SenML records
        # telemetry: {n: "x", v: 1.5, bn: "d1/s/", bt: 1700000000.0, "seq": 5}
        "a5"
        "006178"  # 0 (n): "x"
        "02f93e00"  # 2 (v): 1.5
        "216564312f732f"  # -2 (bn): "d1/s/"
        "22fa4ecaa7e2"  # -3 (bt): 1700000000.0
        "6373657105"  # "seq": 5
        # alert: {n: "alert", t: 0.5, vd: body, bn: "d1/", "seq": 6}
        "a5"
        "0065616c657274"  # 0 (n): "alert"
        "06f93800"  # 6 (t): 0.5 relative to bt
        "084e82fb41d954fc40200000a1616101"  # 8 (vd): the 14 body bytes
        "216364312f"  # -2 (bn): "d1/"
        "6373657106"  # "seq": 6
    )
    assert encode_batch("d1", records) == expected
    assert decode_batch(expected) == ("d1", records)


def test_registry() -> None:
    assert CF_SENML_CBOR in codec.content_formats()
    assert codec.encoding_for(112).name == "senml+cbor"
    assert isinstance(codec.encoding_for(112), batch.Encoding)
    with pytest.raises(UnsupportedFormat):
        codec.encoding_for(64999)
    with pytest.raises(UnsupportedFormat):
        decode_batch(b"\x80", 50)


def _tele(seq: int, time: float, created: float, values: dict[str, float]) -> WireRecord:
    return WireRecord(seq, "telemetry", created, TelemetryBody("motor", time, values).to_cbor())


def test_generic_senml_reader_sees_the_readings() -> None:
    """Resolve the pack as RFC 8428 section 4.6 says and find every reading by name and time."""
    records = [
        _tele(1, T0, T0 + 0.002, {"current_a": 1.25, "supply_v": 229.5}),
        _tele(2, T0 + 1.0, T0 + 1.001, {"current_a": 1.5, "supply_v": 230.0}),
        WireRecord(3, "event", T0 + 1.5, EventBody(T0 + 1.5, {"what": "x"}).to_cbor()),
        _tele(4, T0 + 2.0, T0 + 2.5, {"current_a": 1.75}),
    ]
    pack = cbor2.loads(encode_batch("pump-01", records))
    bn, bt, resolved = "", 0.0, []
    for rec in pack:
        bn = rec.get(-2, bn)
        bt = rec.get(-3, bt)
        resolved.append((bn + rec[0], bt + rec.get(6, 0.0), rec.get(2, rec.get(8))))
    assert ("pump-01/motor/current_a", T0, 1.25) in resolved
    assert ("pump-01/motor/supply_v", T0 + 1.0, 230.0) in resolved
    assert ("pump-01/motor/current_a", T0 + 2.0, 1.75) in resolved
    assert ("pump-01/event", T0 + 1.5, records[2].body) in resolved
    assert len(resolved) == 6


def test_device_is_optional() -> None:
    records = [_tele(1, T0, T0, {"x": 1.0}), WireRecord(2, "state", T0, b"\xa0")]
    data = encode_batch(None, records)
    assert decode_batch(data) == (None, records)
    with pytest.raises(CodecError):
        encode_batch("no/slash", records)


def test_telemetry_that_senml_cannot_carry_goes_as_vd() -> None:
    odd = [
        WireRecord(1, "telemetry", T0, b"\xff\x00"),  # not CBOR
        WireRecord(2, "telemetry", T0, cbor2.dumps(["motor", T0, {"x": 1}])),  # int, not float
        WireRecord(3, "telemetry", T0, TelemetryBody("s", T0, {"a b": 1.0}).to_cbor()),
        WireRecord(4, "telemetry", T0, TelemetryBody("s", T0, {}).to_cbor()),  # no channels
        WireRecord(5, "telemetry", T0, TelemetryBody("s", T0, {"é": 1.0}).to_cbor()),
        WireRecord(6, "telemetry", T0, TelemetryBody("s", math.nan, {"x": 1.0}).to_cbor()),
        # created - time is not exact: 0.1 + (1e-17 - 0.1) != 1e-17
        WireRecord(7, "telemetry", 1e-17, TelemetryBody("s", 0.1, {"x": 1.0}).to_cbor()),
    ]
    data = encode_batch("d", odd)
    pack = cbor2.loads(data)
    assert [rec[0] for rec in pack] == ["telemetry"] * len(odd)
    assert all(rec[8] == r.body for rec, r in zip(pack, odd, strict=True))
    assert decode_batch(data) == ("d", odd)


def test_telemetry_no_device_of_ours_makes_goes_as_vd_and_is_refused() -> None:
    """A sensor name SenML cannot carry is no sensor's of ours: sent as vd, refused on decode."""
    rec = WireRecord(3, "telemetry", T0, TelemetryBody("a/b", T0, {"x": 1.0}).to_cbor())
    data = encode_batch("d", [rec])
    assert cbor2.loads(data)[0][8] == rec.body
    with pytest.raises(CodecError, match="sensor name 'a/b' is not valid"):
        decode_batch(data)


@pytest.mark.parametrize(
    "records",
    [
        [WireRecord(-1, "alert", T0, b"")],
        [WireRecord(2**63, "alert", T0, b"")],
        [WireRecord(1, "gossip", T0, b"")],
        [WireRecord(1, "alert", math.nan, b"")],
        [WireRecord(1, "alert", T0, "text")],  # type: ignore[arg-type]
        [WireRecord(1, "alert", T0, b""), WireRecord(1, "event", T0, b"")],
    ],
)
def test_encode_rejects_bad_records(records: list[WireRecord]) -> None:
    with pytest.raises(CodecError):
        encode_batch("d", records)


def _pack(*records: dict[Any, Any]) -> bytes:
    return cbor2.dumps(list(records))


GOOD = {"seq": 1, -2: "d/s/", -3: T0, 0: "x", 2: 1.0}


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\xff",
        _pack(GOOD) + b"\x00",  # trailing bytes
        b"\x81\xa2\x63seq\x01\x63seq\x02",  # a map with a key twice
        b"\x81" * 20 + b"\x80",  # nested too deep
        cbor2.dumps({"seq": 1}),  # not an array
        cbor2.dumps([1, 2]),  # records not maps
        _pack({-2: "d/s/", -3: T0, 0: "x", 2: 1.0}),  # no seq
        _pack({**GOOD, "seq": -1}),
        _pack({**GOOD, "seq": 2**64}),
        _pack({**GOOD, "seq": "1"}),
        _pack(GOOD, GOOD),  # seq twice
        _pack({**GOOD, 2: "1.0"}),  # v not a number
        _pack({**GOOD, 2: True}),  # bool is not a number
        _pack({**GOOD, 3: "on"}),  # vs: not in this profile
        _pack({**GOOD, -5: 1.0}),  # bv: not in this profile
        _pack({**GOOD, -1: 11}),  # a SenML version we do not know
        _pack({**GOOD, "unknown_": 1}),  # must-understand label
        _pack({**GOOD, 99: 1}),  # unknown integer label
        _pack({**GOOD, -2: "d/s"}),  # bn not ending in '/'
        _pack({**GOOD, -2: "a/b/c/"}),  # bn with too many parts
        _pack({**GOOD, -2: 7}),
        _pack({**GOOD, -3: "now"}),
        _pack({**GOOD, -3: 2**2000}),  # a time too large for a float
        _pack({**GOOD, 0: "bad name!"}),
        _pack({"seq": 1, -2: "d/s/", -3: T0, 0: "x"}),  # no value
        _pack({**GOOD, 8: b"x"}),  # v and vd
        _pack({"seq": 1, -2: "d/", 0: "gossip", 8: b""}),  # unknown kind
        _pack({"seq": 1, -2: "d/", 0: "alert", 8: "text"}),  # vd not bytes
        _pack({"seq": 1, -2: "d/x/", 0: "alert", 8: b""}),  # bn of data record
        _pack({0: "x", 2: 1.0}),  # continuation without a start
        _pack(GOOD, {0: "x", 2: 2.0}),  # channel twice
        _pack(GOOD, {0: "y", 2: 2.0, 6: 1.0}),  # continuation at another time
        _pack(GOOD, {0: "y", 2: 2.0, -2: "d/s/"}),  # continuation changes bn
        _pack(GOOD, {"seq": 2, -2: "e/", 0: "alert", 8: b""}),  # two devices
        _pack({**GOOD, "cr": "x"}),
    ],
)
def test_decode_rejects_bad_packs(data: bytes) -> None:
    with pytest.raises(CodecError):
        decode_batch(data)


def test_decode_ignores_units_and_unknown_labels() -> None:
    data = _pack({**GOOD, 1: "A", "note": "hi"}, {0: "y", 2: 2.0, 1: "V"})
    dev, records = decode_batch(data)
    assert dev == "d"
    assert TelemetryBody.from_cbor(records[0].body) == TelemetryBody("s", T0, {"x": 1.0, "y": 2.0})


def test_empty_batch() -> None:
    assert decode_batch(encode_batch("d", [])) == (None, [])


# -- property tests ------------------------------------------------------------------------------

# No timing in tests: neither hypothesis's deadline nor its too-slow check may fail a test on a
# loaded machine.
RELAXED = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])

names = st.from_regex(r"[A-Za-z][A-Za-z0-9_.-]{0,8}", fullmatch=True)
any_float = st.floats(allow_nan=True, allow_infinity=True)
finite = st.floats(allow_nan=False, allow_infinity=False)
times = st.one_of(
    st.floats(min_value=T0 - 1e6, max_value=T0 + 1e6), finite, st.sampled_from([0.0, -0.0])
)
# integers as CBOR carries them without a tag (major types 0 and 1): bignums are refused
plain = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**64), 2**64 - 1), finite, st.text(max_size=8)
)
cbor_values = st.recursive(
    plain | st.binary(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=8,
)
data_maps = st.dictionaries(st.text(max_size=6), cbor_values, max_size=4)


@st.composite
def wire_records(draw: st.DrawFn, seq: int) -> WireRecord:
    kind = draw(st.sampled_from(sorted(k.value for k in Kind)))  # features: test_features.py
    created = draw(times)
    how = draw(st.integers(0, 9))
    if how == 0:
        # whatever the store holds goes through, but for what no record of ours holds (a CBOR
        # tag; test_hostile_values.py): random bytes rarely are both
        body = draw(st.binary(max_size=20).filter(lambda b: _carried(kind, b)))
    elif kind == Kind.TELEMETRY:
        time = draw(st.one_of(times, any_float, st.just(created)))
        sensor = draw(st.one_of(names, st.from_regex(r"[0-9][a-z:._-]{0,3}", fullmatch=True)))
        values = draw(
            st.dictionaries(
                st.one_of(names, st.text(max_size=3).filter(batch.channel_name_ok)),
                any_float,
                min_size=how > 1,
                max_size=5,
            )
        )
        body = TelemetryBody(sensor, time, values).to_cbor()
    else:
        cls = {"alert": AlertBody, "event": EventBody, "state": StateBody}[kind]
        body = cls(draw(times), draw(data_maps)).to_cbor()
    return WireRecord(seq, kind, created, body)


def _carried(kind: str, body: bytes) -> bool:
    try:
        batch.check_body(kind, body, "body")
    except CodecError:
        return False
    return True


@st.composite
def batches(draw: st.DrawFn) -> list[WireRecord]:
    seqs = draw(st.lists(st.integers(0, batch.MAX_SEQ), unique=True, max_size=12))
    return [draw(wire_records(seq)) for seq in seqs]


def _key(rec: WireRecord) -> tuple[int, str, bytes, bytes]:
    return rec.seq, rec.kind, struct.pack("<d", rec.created), rec.body


@settings(RELAXED, max_examples=120)
@given(device=st.one_of(st.none(), names), records=batches())
def test_round_trip_is_lossless(device: str | None, records: list[WireRecord]) -> None:
    data = encode_batch(device, records)
    got_device, got = decode_batch(data)
    assert got_device == (device if records else None)
    assert [_key(r) for r in got] == [_key(r) for r in records]
    # the hand-written writer gives exactly cbor2's deterministic encoding of the same pack
    assert cbor2.dumps(cbor2.loads(data), canonical=True) == data


@RELAXED
@given(data=st.binary(max_size=64))
def test_decoding_random_bytes_raises_only_codec_error(data: bytes) -> None:
    try:
        decode_batch(data)
    except CodecError:
        pass


@RELAXED
@given(
    pack=st.lists(
        st.dictionaries(
            st.sampled_from([-3, -2, -1, 0, 1, 2, 3, 6, 8, "seq", "cr", "x_", "y"]),
            cbor_values,
            max_size=6,
        ),
        max_size=5,
    )
)
def test_decoding_wrong_types_raises_only_codec_error(pack: list[dict[Any, Any]]) -> None:
    try:
        decode_batch(cbor2.dumps(pack))
    except CodecError:
        pass


@settings(RELAXED, max_examples=50)
@given(
    records=batches(), flips=st.lists(st.tuples(st.integers(0), st.integers(1, 255)), max_size=3)
)
def test_decoding_corrupted_batches_raises_only_codec_error(
    records: list[WireRecord], flips: list[tuple[int, int]]
) -> None:
    data = bytearray(encode_batch("dev", records))
    for pos, mask in flips:
        if data:
            data[pos % len(data)] ^= mask
    try:
        decode_batch(bytes(data))
    except CodecError:
        pass


@RELAXED
@given(body=st.builds(TelemetryBody, names, finite, st.dictionaries(names, finite, max_size=4)))
def test_telemetry_body_round_trip(body: TelemetryBody) -> None:
    assert TelemetryBody.from_cbor(body.to_cbor()) == body


# -- the acknowledgement -------------------------------------------------------------------------


def test_seq_ranges() -> None:
    assert seq_ranges([7, 1, 3, 2, 2]) == [(1, 3), (7, 7)]
    assert seq_ranges([]) == []


@RELAXED
@given(st.sets(st.integers(0, 200), max_size=40))
def test_seq_ranges_cover_exactly(seqs: set[int]) -> None:
    ack = IngestAck.for_seqs(seqs, new=len(seqs), duplicate=0)
    assert set(ack.seqs()) == seqs
    assert all(s in ack for s in seqs)
    assert IngestAck.from_cbor(ack.to_cbor()) == ack


def test_ack_fixed_bytes() -> None:
    ack = IngestAck.for_seqs([1, 2, 3, 9], new=3, duplicate=1)
    expected = bytes.fromhex(
        "a3"  # keys in canonical order: same length, so bytewise
        "6361636b"  # "ack"
        "82820103820909"  # [[1, 3], [9, 9]]
        "6364757001"  # "dup": 1
        "636e657703"  # "new": 3
    )
    assert ack.to_cbor() == expected
    assert IngestAck.from_cbor(expected) == ack


@pytest.mark.parametrize(
    "doc",
    [[], {"ack": "1-3"}, {"ack": [[3, 1]]}, {"ack": [[1]]}, {"ack": [], "new": -1}],
)
def test_bad_acks(doc: Any) -> None:
    with pytest.raises(CodecError):
        IngestAck.from_cbor(cbor2.dumps(doc))


# -- the hand-written deterministic CBOR writer agrees with cbor2's canonical mode -------------


@RELAXED
@given(
    sensor=st.text(max_size=6),
    time=any_float,
    values=st.dictionaries(st.text(max_size=6), any_float, max_size=6),
)
def test_reading_body_is_telemetry_body_to_cbor(
    sensor: str, time: float, values: dict[str, float]
) -> None:
    encoding = codec.encoding_for(CF_SENML_CBOR)
    assert isinstance(encoding, senml.SenMLCBOR)
    expected = TelemetryBody(sensor, time, values).to_cbor()
    assert encoding.reading_body(sensor, time, values) == expected
