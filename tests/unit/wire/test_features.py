"""Features records (agent/wire/features.py): the body, its round trip in every batch encoding,
and hostile bodies that the endpoint's decoder refuses with a CodecError (answered 4.00)."""

from __future__ import annotations

import math
from dataclasses import replace

import cbor2
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from agent.wire import codec
from agent.wire.batch import FEATURES, CodecError, WireRecord
from agent.wire.compact import COMPACT, COMPACT_DEFLATE, COMPACT_DICT
from agent.wire.compact_format import FLAG_FEATURES
from agent.wire.features import (
    MAX_BANDS,
    MAX_BATCH_READINGS,
    MAX_COUNT,
    MAX_SPAN,
    ChannelFeatures,
    FeaturesBody,
    FeaturesTooLarge,
    check_batch,
    covered,
    decode_gaps,
    encode_gaps,
)
from agent.wire.packing import _varint
from agent.wire.records import TelemetryBody, dumps

RELAXED = settings(deadline=None, max_examples=150, derandomize=False)

CF = ChannelFeatures(1.0, 0.5, 2.0, 1.25, 0.5, 3.0, 1.6, (0.25, 0.0))


def body(seqs: tuple[int, ...] = (10, 12, 14, 15), **kw: object) -> FeaturesBody:
    args: dict[str, object] = {
        "sensor": "vib",
        "seqs": seqs,
        "t0": 1700000000.0,
        "t1": 1700000059.0,
        "channels": {"x_g": CF},
    }
    args.update(kw)
    return FeaturesBody(**args)  # type: ignore[arg-type]


def test_fixed_bytes() -> None:
    data = body().to_cbor()
    assert data.hex() == (
        "88"  # array of 8
        "63766962"  # "vib"
        "0a0f"  # first 10, last 15
        "4401020001"  # gaps: (1, x2), (0, x1): 12, 14, 15
        "fa4ecaa7e2"  # t0 1700000000.0 (a float32 holds it)
        "fb41d954fc4ec00000"  # t1 1700000059.0
        "04"  # count
        "a163785f67"  # {"x_g":
        "88f93c00f93800f94000f93d00f93800f94200fb3ff999999999999a"  # mean .. crest
        "82f93400f90000"  # bands [0.25, 0.0]
    )
    assert FeaturesBody.from_cbor(data) == body()
    rec = body().to_record()
    assert (rec.seq, rec.kind, rec.created) == (10, FEATURES, 1700000059.0)


finite = st.floats(allow_nan=False, allow_infinity=False, width=32, min_value=-1e9, max_value=1e9)


@st.composite
def channel_features(draw: st.DrawFn) -> ChannelFeatures:
    a, b, c = sorted(draw(st.lists(finite, min_size=3, max_size=3)))
    pos = st.floats(0, 1e9, allow_nan=False, width=32)
    bands = tuple(draw(st.lists(pos, max_size=8)))
    return ChannelFeatures(b, a, c, draw(pos), draw(pos), draw(pos), draw(pos), bands)


@st.composite
def features_bodies(draw: st.DrawFn) -> FeaturesBody:
    first = draw(st.integers(0, 2**62))
    gaps = draw(st.lists(st.integers(0, 50), max_size=40))
    seqs = [first]
    for g in gaps:
        seqs.append(seqs[-1] + g + 1)
    t0 = draw(st.floats(0, 4e9, allow_nan=False))
    t1 = t0 + draw(st.floats(0, 1e5, allow_nan=False))
    sensors = st.text("abcxyz_.:-", min_size=1, max_size=8).filter(lambda n: n[0].isalnum())
    names = st.text("abcxyz_/ ", min_size=1, max_size=8)
    chans = draw(st.dictionaries(names, channel_features(), min_size=1, max_size=4))
    return FeaturesBody(draw(sensors), tuple(seqs), t0, t1, chans)


@RELAXED
@given(b=features_bodies())
@example(b=body(seqs=(0,)))
@example(b=body(seqs=(5, 6, 7, 8, 20, 21, 22)))
def test_body_round_trip(b: FeaturesBody) -> None:
    assert FeaturesBody.from_cbor(b.to_cbor()) == b
    assert decode_gaps(b.first, b.last, b.count, encode_gaps(b.seqs)) == b.seqs


@RELAXED
@given(bodies=st.lists(features_bodies(), max_size=4), device=st.sampled_from([None, "d1"]))
def test_every_encoding_carries_features_records_losslessly(
    bodies: list[FeaturesBody], device: str | None
) -> None:
    # disjoint seqs: shift each body above the previous one
    recs, floor = [], 0
    for b in bodies:
        shift = floor - b.first if b.first < floor else 0
        b = FeaturesBody(b.sensor, tuple(s + shift for s in b.seqs), b.t0, b.t1, b.channels)
        floor = b.last + 1
        recs.append(b.to_record())
    reading = TelemetryBody("m", 1700000000.0, {"a": 1.5})
    recs.append(WireRecord(floor, "telemetry", 1700000000.0, reading.to_cbor()))
    for cf in codec.content_formats():
        got_device, got = codec.decode_batch(codec.encode_batch(device, recs, cf), cf)
        assert got_device == device
        assert [(r.seq, r.kind, r.created, r.body) for r in got] == [
            (r.seq, r.kind, r.created, r.body) for r in recs
        ], cf
        assert sorted(covered(got)) == sorted(covered(recs))


def test_the_features_flag_is_set_only_when_a_batch_carries_features_records() -> None:
    """Batches without features records are byte for byte what they were before."""
    reading = TelemetryBody("m", 1700000000.0, {"a": 1.5})
    rec = WireRecord(3, "telemetry", 1700000000.0, reading.to_cbor())
    for encoding in (COMPACT, COMPACT_DEFLATE, COMPACT_DICT):
        plain, _ = encoding.sections("d1", [rec])
        mixed, _ = encoding.sections("d1", [rec, body().to_record()])
        assert plain[1] & FLAG_FEATURES == 0
        assert mixed[1] & FLAG_FEATURES == FLAG_FEATURES


def _raw(item: list[object]) -> bytes:
    return cbor2.dumps(item, canonical=True)


def _good() -> list[object]:
    return cbor2.loads(body().to_cbor())


def _with(index: int, value: object) -> bytes:
    item = _good()
    item[index] = value
    return _raw(item)


def _channel(index: int, value: object) -> bytes:
    item = _good()
    item[7]["x_g"][index] = value  # type: ignore[index]
    return _raw(item)


HOSTILE = {
    "first after last": _with(2, 5),
    "count that the gaps do not give": _with(6, 9),
    "count of zero": _with(6, 0),
    "count over the limit": _with(6, MAX_COUNT + 1),
    "span over the limit": _raw(
        [
            *_good()[:1],
            0,
            MAX_SPAN + 1,
            encode_gaps((0, MAX_SPAN + 1)),
            *_good()[4:6],
            2,
            _good()[7],
        ]
    ),
    "gaps beyond last": _with(3, bytes([100, 3])),
    "a repeat of zero": _with(3, bytes([1, 0])),
    "a huge repeat": _with(3, bytes([0, 0xFF, 0xFF, 0xFF, 0xFF, 0x0F])),
    "NaN mean": _channel(0, math.nan),
    "infinite rms": _channel(3, math.inf),
    "a text for a number": _channel(1, "0"),
    "mean below min": _channel(0, -1.0),
    "negative std": _channel(4, -1.0),
    "negative band": _channel(7, [-1.0]),
    "NaN band": _channel(7, [math.nan]),
    "huge band array": _channel(7, [0.0] * (MAX_BANDS + 1)),
    "t0 after t1": _with(4, 1800000000.0),
    "NaN time": _with(5, math.nan),
    "no channels": _with(7, {}),
    "not an array": _raw({"sensor": "vib"}),  # type: ignore[arg-type]
    "seven items": _raw(_good()[:7]),
    "a negative seq": _with(1, -1),
    "a boolean count": _with(6, True),
    "trailing bytes": body().to_cbor() + b"\x00",
    "nested too deep": _channel(7, [[[[[1.0]]]]]),
    "over 64 KiB": _with(0, "v" * 70000),
    "a sensor name with a terminal escape": _with(0, "vib\x1b]52;c;cm0K\x07"),
    "a sensor name with a slash": _with(0, "a/b"),
    "a channel name with a bidi override": _with(7, {"x\u202eg": _good()[7]["x_g"]}),
    "a channel name with a NUL": _with(7, {"x\x00": _good()[7]["x_g"]}),
}


@pytest.mark.parametrize("attack", sorted(HOSTILE))
def test_hostile_bodies_are_refused_with_a_codec_error(attack: str) -> None:
    data = HOSTILE[attack]
    with pytest.raises(CodecError):
        FeaturesBody.from_cbor(data)
    rec = WireRecord(10, FEATURES, 1.0, data)
    for cf in codec.content_formats():
        with pytest.raises(CodecError):
            codec.decode_batch(codec.encode_batch("d1", [rec], cf), cf)


@RELAXED
@given(data=st.binary(max_size=80))
def test_random_bodies_raise_only_codec_error(data: bytes) -> None:
    try:
        FeaturesBody.from_cbor(data)
    except CodecError:
        pass


def test_a_batch_that_claims_a_seq_twice_is_refused() -> None:
    f = body().to_record()
    reading = WireRecord(12, "telemetry", 1.0, TelemetryBody("m", 1.0, {"a": 1.0}).to_cbor())
    with pytest.raises(CodecError, match="claimed twice"):
        check_batch([f, reading])
    other = body(seqs=(11, 14)).to_record()
    with pytest.raises(CodecError, match="claimed twice"):
        check_batch([f, other])
    moved = WireRecord(11, FEATURES, f.created, f.body)
    with pytest.raises(CodecError, match="first seq"):
        check_batch([moved])
    check_batch([f, body(seqs=(11, 13)).to_record(), replace(reading, seq=16)])


def test_encoding_refuses_a_body_it_cannot_carry() -> None:
    with pytest.raises(CodecError):
        body(seqs=(3, 2)).to_cbor()
    with pytest.raises(CodecError):
        body(channels={}).to_cbor()


def test_dumps_is_the_body_encoding() -> None:
    b = body()
    assert b.to_cbor() == dumps(cbor2.loads(b.to_cbor()))


def claiming(first: int, count: int, gaps: bytes | None = None) -> WireRecord:
    """A features record whose header claims ``count`` readings from ``first``; ``gaps`` None:
    one run (0, count - 1), so a few bytes stand for every seq of the range."""
    if gaps is None:
        run = bytearray()
        if count > 1:
            _varint(run, 0)
            _varint(run, count - 1)
        gaps = bytes(run)
    data = dumps(["vib", first, first + count - 1, gaps, 1.0, 2.0, count, {"x": CF.to_list()}])
    return WireRecord(first, FEATURES, 2.0, data)


def test_gap_runs_claiming_more_readings_than_a_batch_may_are_refused_from_the_headers() -> None:
    """Attack: ~75 bytes of gap runs per record claim 65,536 readings each; 800 of them in one
    62 KB batch claimed 52 M readings (5.2 GB at the endpoint). The sum of the counts is checked
    before any gap run is expanded: the bodies here have gaps that code too few seqs, and the
    refusal is still the claim's, not the gaps' (nothing was expanded)."""
    n = MAX_BATCH_READINGS // MAX_COUNT + 1
    recs = [claiming(i * MAX_COUNT, MAX_COUNT, b"") for i in range(n)]
    with pytest.raises(FeaturesTooLarge, match=f"at most {MAX_BATCH_READINGS}"):
        check_batch(recs)
    for cf in codec.content_formats():  # the codec's decoder refuses it too
        with pytest.raises(FeaturesTooLarge):
            codec.decode_batch(codec.encode_batch(None, recs, cf), cf)
    whole = [claiming(i * MAX_COUNT, MAX_COUNT) for i in range(n - 1)]
    assert check_batch(whole) == MAX_BATCH_READINGS  # at the limit: taken
    with pytest.raises(FeaturesTooLarge, match="at most 100"):
        check_batch([claiming(0, 60), claiming(60, 41)], 100)


def test_interleaved_sensors_overlap_in_range_but_not_in_seqs() -> None:
    """Two sensors' windows of one lease interleave (odd and even seqs): their ranges overlap
    and the batch is honest; a third record claiming one of those seqs is refused."""
    odd = body(seqs=tuple(range(1, 100, 2))).to_record()
    even = body(sensor="amb", seqs=tuple(range(2, 101, 2))).to_record()
    alert = WireRecord(101, "alert", 1.0, b"\xa0")
    assert check_batch([odd, even, alert]) == 100
    with pytest.raises(CodecError, match="claimed twice"):
        check_batch(
            [odd, even, body(sensor="p", seqs=(150, 151)).to_record(), replace(alert, seq=51)]
        )
    with pytest.raises(CodecError, match="claimed twice"):
        check_batch([odd, body(seqs=(97, 99, 300)).to_record()])


def test_a_full_lease_folded_into_features_stays_within_the_batch_limit() -> None:
    """The device side (agent/sync/featurize.py): a lease holds at most MAX_BATCH_RECORDS
    readings, so what fold makes of the largest lease claims no more than the endpoint takes."""
    from agent.sync.datapolicy import DataSettings
    from agent.sync.featurize import fold
    from agent.sync.uplink import MAX_BATCH_RECORDS
    from tests.unit.sync.test_featurize import reading

    assert MAX_BATCH_RECORDS <= MAX_BATCH_READINGS and MAX_COUNT <= MAX_BATCH_READINGS
    lease = [
        reading(seq, "vib", 1.0 + seq, x=float(seq)) for seq in range(1, MAX_BATCH_RECORDS + 1)
    ]
    data = DataSettings(featured={"low": frozenset({"vib"})}, window_samples=MAX_COUNT)
    wire = fold(lease, data, "low")
    assert check_batch(wire) == MAX_BATCH_RECORDS
