"""Hostile values in CBOR: what no record of ours holds is refused by the decoders, as a
RecordError (CodecError, StateError at the edges), never an OverflowError, a RecursionError or a
value that breaks a reader later: bignums (tags 2 and 3), shared and cyclic values (tags 28 and
29), every other tag, ``undefined`` and other simple values, and telemetry names with terminal
escapes, bidi controls or NUL, whichever encoding carries them."""

from __future__ import annotations

import cbor2
import pytest

from agent.wire import records, statedoc
from agent.wire.batch import CodecError, WireRecord, check_body
from agent.wire.codec import decode_batch, encode_batch
from agent.wire.compact import COMPACT, COMPACT_DEFLATE
from agent.wire.records import (
    AlertBody,
    EventBody,
    RecordError,
    TelemetryBody,
    body_time,
    decode_body,
)

T0 = 1_700_000_000.0
SENML, COMPACT_CF, DEFLATE_CF = 112, COMPACT.content_format, COMPACT_DEFLATE.content_format

# tag 28 (shareable) on a map whose "self" is tag 29 (shared) 0: a map that contains itself
CYCLIC_MAP = bytes([0xD8, 0x1C, 0xA2]) + cbor2.dumps("kind") + cbor2.dumps("x")
CYCLIC_MAP += cbor2.dumps("self") + bytes([0xD8, 0x1D, 0x00])
OSC52 = "\x1b]52;c;cm0gLXJmIH4K\x07"  # writes "rm -rf ~" into the operator's clipboard
HOSTILE_NAMES = [OSC52, "\x1b[1A\x1b[2K", "\u202eevil\u202c", "nul\x00", "cr\rlf", "zw\u200b"]


def _body(time: bytes, data: bytes) -> bytes:
    """An alert/event body [time, data] from the CBOR of each part."""
    return b"\x82" + time + data


# -- the decoder: tags, bignums, the integer range ----------------------------------------------


@pytest.mark.parametrize(
    "value",
    [2**1100, 2**15000, -(2**1100), 2**64, -(2**64) - 1],
    ids=["bignum_2e1100", "bignum_2e15000", "negative_bignum", "2e64", "minus_2e64_minus_1"],
)
def test_attack_bignum_is_refused_by_the_decoder(value: int) -> None:
    data = cbor2.dumps(value)
    assert data[0] in (0xC2, 0xC3)  # cbor2 writes these as bignums (tags 2 and 3)
    with pytest.raises(records.ForeignValue, match=r"semantic tag [23]"):
        records.loads(data)


@pytest.mark.parametrize("value", [2**64 - 1, -(2**64), 0, -1, 2**63])
def test_integers_cbor_carries_without_a_tag_are_kept(value: int) -> None:
    assert records.loads(cbor2.dumps(value)) == value
    event = EventBody(T0, {"n": value})
    assert decode_body("event", event.to_cbor()) == event


def test_attack_cyclic_map_of_tags_28_and_29_is_refused() -> None:
    with pytest.raises(records.ForeignValue, match=r"semantic tag 2[89]"):
        records.loads(CYCLIC_MAP)
    with pytest.raises(records.ForeignValue):  # a shared value that is no cycle: refused too
        records.loads(bytes([0x82, 0xD8, 0x1C, 0x81, 0x01, 0xD8, 0x1D, 0x00]))


@pytest.mark.parametrize(
    "tag",
    [0, 1, 4, 5, 24, 25, 30, 32, 35, 36, 37, 52, 54, 100, 256, 258, 260, 261, 1004, 55799, 999],
)
def test_attack_any_semantic_tag_is_refused(tag: int) -> None:
    """None of our formats uses a tag: epoch times, decimal fractions, big floats, regular
    expressions, MIME, sets, the self-describe tag and unknown tags alike."""
    with pytest.raises(records.ForeignValue, match=f"semantic tag {tag}"):
        records.loads(cbor2.dumps(cbor2.CBORTag(tag, 1)))


def test_attack_huge_float_like_values_are_refused() -> None:
    """A big float (tag 5) or decimal fraction (tag 4) with a huge exponent."""
    for tag in (4, 5):
        data = cbor2.dumps(cbor2.CBORTag(tag, [10**6, 1]))
        with pytest.raises(records.ForeignValue):
            decode_body("alert", _body(data, cbor2.dumps({})))


def test_every_tag_below_70000_is_refused() -> None:
    for tag in range(70_000):
        with pytest.raises(records.ForeignValue):
            records.loads(cbor2.dumps(cbor2.CBORTag(tag, 0)))


# -- record bodies ---------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["alert", "event", "state"])
def test_attack_bignum_time_is_a_record_error_not_an_overflow(kind: str) -> None:
    data = _body(cbor2.dumps(2**1100), cbor2.dumps({"kind": "raise", "score": 1.0}))
    with pytest.raises(RecordError):
        decode_body(kind, data)
    assert body_time(kind, data, 7.0) == 7.0


def test_attack_bignum_telemetry_value_is_a_record_error() -> None:
    data = cbor2.dumps(["pump", T0, {"x": 2**1100}])
    with pytest.raises(RecordError):
        TelemetryBody.from_cbor(data)
    assert body_time("telemetry", data, 7.0) == 7.0


def test_a_float_conversion_that_overflows_is_a_record_error() -> None:
    """Defensive: should a number no float holds reach the conversion, it is a RecordError."""
    with pytest.raises(records.ForeignValue, match="out of range"):
        records._time(2**1100, "alert body")


@pytest.mark.parametrize(
    "value", [cbor2.undefined, cbor2.CBORSimpleValue(16), cbor2.CBORSimpleValue(255)]
)
def test_attack_simple_values_in_an_opaque_map_are_refused(value: object) -> None:
    data = cbor2.dumps([T0, {"note": [1, {"deep": value}]}])
    with pytest.raises(records.ForeignValue):
        AlertBody.from_cbor(data)


# -- the batch decoders --------------------------------------------------------------------------

HOSTILE_BODIES = {
    "bignum_time": ("alert", _body(cbor2.dumps(2**1100), cbor2.dumps({"kind": "raise"}))),
    "bignum_2e15000": ("event", cbor2.dumps([T0, {"note": 2**15000}])),
    "negative_bignum": ("state", cbor2.dumps([T0, {"depth": -(2**1100)}])),
    "cyclic_map": ("alert", _body(cbor2.dumps(T0), CYCLIC_MAP)),
    "epoch_tag": ("event", _body(cbor2.dumps(cbor2.CBORTag(1, 0)), cbor2.dumps({}))),
    "undefined": ("event", cbor2.dumps([T0, {"x": cbor2.undefined}])),
    "bignum_reading": ("telemetry", cbor2.dumps(["pump", T0, {"x": 2**1100}])),
    **{
        f"telemetry_sensor_{i}": ("telemetry", TelemetryBody(f"pump{n}", T0, {"x": 1.0}).to_cbor())
        for i, n in enumerate(HOSTILE_NAMES)
    },
    **{
        f"telemetry_channel_{i}": ("telemetry", TelemetryBody("pump", T0, {n: 1.0}).to_cbor())
        for i, n in enumerate(HOSTILE_NAMES)
    },
}


@pytest.mark.parametrize("cf", [SENML, COMPACT_CF, DEFLATE_CF])
@pytest.mark.parametrize("name", sorted(HOSTILE_BODIES))
def test_attack_hostile_body_is_refused_by_every_batch_decoder(name: str, cf: int) -> None:
    """Carried as SenML vd, as a compact opaque body or in a compact group (a telemetry body
    with hostile names fits a group): the decoder refuses the batch with a CodecError."""
    kind, body = HOSTILE_BODIES[name]
    data = encode_batch("evil", [WireRecord(4, kind, T0, body)], cf)
    with pytest.raises(CodecError):
        decode_batch(data, cf)


def test_attack_hostile_telemetry_names_in_senml_vd_are_refused() -> None:
    """The audit's case: a telemetry body whose names SenML cannot carry goes as vd; its names
    are checked as the readings' are."""
    body = TelemetryBody("pump" + OSC52, T0, {"x" + OSC52: 1.0}).to_cbor()
    data = encode_batch("evil", [WireRecord(2, "telemetry", T0, body)])
    assert cbor2.loads(data)[0][8] == body  # sent as vd
    with pytest.raises(CodecError, match="sensor name"):
        decode_batch(data)


@pytest.mark.parametrize("cf", [SENML, COMPACT_CF, DEFLATE_CF])
def test_legitimate_bodies_still_decode(cf: int) -> None:
    """Names a device of ours has (the SKAB source's "Volume Flow RateRMS", a scaled channel
    named in any script), the widest integers, and bodies that do not decode at all (carried as
    they are, as before) all go through."""
    recs = [
        WireRecord(
            1, "telemetry", T0, TelemetryBody("skab", T0, {"Volume Flow RateRMS": 1.5}).to_cbor()
        ),
        WireRecord(2, "telemetry", T0, TelemetryBody("s", T0, {"température": 1.0}).to_cbor()),
        WireRecord(3, "event", T0, EventBody(T0, {"max": 2**64 - 1, "min": -(2**64)}).to_cbor()),
        WireRecord(4, "state", T0, b"\xa0"),  # not a state body: carried as it is
        WireRecord(5, "telemetry", T0, b"\xff\xfe"),  # not CBOR: carried as it is
    ]
    assert decode_batch(encode_batch("d", recs, cf), cf) == ("d", recs)


def test_check_body_names_the_record() -> None:
    with pytest.raises(CodecError, match=r"^seq 9: semantic tag 2"):
        check_body("alert", HOSTILE_BODIES["bignum_time"][1], "seq 9")


# -- reported state ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "match"),
    [
        (2**1100, "semantic tag 2"),
        (2**15000, "semantic tag 2"),
        (-(2**1100), "semantic tag 3"),
        (cbor2.undefined, "undefined"),
        ({"n": [cbor2.CBORSimpleValue(99)]}, "CBORSimpleValue"),
    ],
    ids=["bignum", "bignum_2e15000", "negative_bignum", "undefined", "simple_value"],
)
def test_attack_hostile_reported_value_is_a_state_error(value: object, match: str) -> None:
    data = cbor2.dumps({"foo/bar": [5, value]})
    with pytest.raises(statedoc.StateError, match=match):
        statedoc.parse_reported(data)


def test_attack_cyclic_reported_value_is_a_state_error() -> None:
    data = b"\xa1" + cbor2.dumps("foo/cyc") + b"\x82" + cbor2.dumps(5) + CYCLIC_MAP
    with pytest.raises(statedoc.StateError, match="semantic tag"):
        statedoc.parse_reported(data)


def test_reported_values_at_the_integer_limits_are_kept() -> None:
    doc = {"queue/depth": [5, 2**64 - 1], "foo/low": [5, -(2**64)]}
    got = statedoc.parse_reported(cbor2.dumps(doc))
    assert got == {
        "queue/depth": statedoc.Entry(5, 2**64 - 1),
        "foo/low": statedoc.Entry(5, -(2**64)),
    }
