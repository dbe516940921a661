"""The compact columnar batch encodings (agent/wire/compact.py): 65000, 65001, 65002.

One contract runs over every batch encoding (SenML-CBOR too, where it applies): what a round
trip keeps is exactly what docs/protocol.md ("Compact batches") promises. Then fixed bytes of one
small batch per compact encoding, and decoding of random, truncated and mutated bytes.
"""

from __future__ import annotations

import collections
import itertools
import math
import struct
import subprocess
import sys
import zlib
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import cbor2
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.wire import batch, codec, compact, packing, predict
from agent.wire.batch import CF_SENML_CBOR, CodecError, WireRecord, check_body, record_time
from agent.wire.codec import decode_batch, encode_batch
from agent.wire.compact import (
    CF_COMPACT,
    CF_COMPACT_DEFLATE,
    CF_COMPACT_DICT,
    MAX_DECODED,
    MAX_INFLATED,
    MAX_RECORDS,
)
from agent.wire.compact_dict import DICTIONARIES
from agent.wire.packing import MAX_NAME
from agent.wire.predict import quantize
from agent.wire.records import AlertBody, EventBody, StateBody, TelemetryBody, body_time
from agent.wire.senml import SenMLCBOR

ROOT = Path(__file__).resolve().parents[3]
T0 = 1_700_000_000.0
COMPACT = (CF_COMPACT, CF_COMPACT_DEFLATE, CF_COMPACT_DICT)
ALL = (CF_SENML_CBOR, *COMPACT)

# No timing in tests: neither hypothesis's deadline nor its too-slow check may fail a test.
RELAXED = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])

# The rig of these tests: sensors, their channels and resolutions (None: no resolution).
RIG: dict[str, dict[str, float | None]] = {
    "motor": {"current_a": 0.0002, "supply_v": 0.004, "current_a/mean": None},
    "accel": {"x_g": 0.0039, "y_g": 0.0039, "vibration_rms_g": 0.0004875},
    "thermo": {"hot_junction_c": 0.0625},
    "probe": {"level": None, "temp_c": 0.1},
    "big": {"count": 1000.0, "tiny": 1e-7},
}

Resolution = Callable[[str, str], float | None]


def rig_resolution(sensor: str, channel: str) -> float | None:
    return RIG.get(sensor, {}).get(channel)


def _key(rec: WireRecord) -> tuple[int, str, bytes, bytes]:
    return rec.seq, rec.kind, struct.pack("<d", rec.created), rec.body


def _step(resolution: Resolution, sensor: str, channel: str) -> float | None:
    """The step the encoder uses: the channel's, else (for aggregates) the base channel's."""
    step = resolution(sensor, channel)
    if step is None and "/" in channel:
        step = resolution(sensor, channel.rsplit("/", 1)[0])
    return step


def expected(rec: WireRecord, cf: int, resolution: Resolution) -> WireRecord:
    """What ``cf`` promises to give back for ``rec`` (docs/protocol.md)."""
    if cf == CF_SENML_CBOR or rec.kind != "telemetry":
        return rec
    try:
        item = cbor2.loads(rec.body)
        sensor, time, values = item
        canonical = TelemetryBody(sensor, time, values).to_cbor() == rec.body
    except Exception:
        return rec  # not a telemetry body: its bytes go as they are
    if not canonical or type(time) is not float or not values:
        return rec
    if not all(type(x) is float for x in values.values()):
        return rec
    if not (math.isfinite(time) and math.isfinite(rec.created)):
        return rec
    if max(abs(time), abs(rec.created)) * 1000 > 2**62:
        return rec
    if any(len(n.encode()) > MAX_NAME for n in (sensor, *values)):
        return rec
    out = {}
    for channel, x in values.items():
        step = _step(resolution, sensor, channel)
        if step is None:
            out[channel] = x  # carried exactly
        elif not (abs(x) <= 1e300 and abs(x / step) <= 2**53):  # non-finite or too large
            return rec
        elif quantize(x, step) != x or (x == 0.0 and math.copysign(1.0, x) < 0.0):
            return rec  # off the resolution grid (or -0.0): the record goes with its body
        else:
            out[channel] = x
    ms = round(time * 1000) / 1000
    body = TelemetryBody(sensor, ms, out).to_cbor()
    return WireRecord(rec.seq, rec.kind, round(rec.created * 1000) / 1000, body)


# -- strategies ----------------------------------------------------------------------------------

finite = st.floats(allow_nan=False, allow_infinity=False)
plain_values = st.floats(-1000.0, 1000.0)
odd_values = st.one_of(
    st.sampled_from([math.nan, math.inf, -math.inf, -0.0, 0.0, 1e300, 1e301, -5e15, 2.0**60]),
    finite,
)
data_maps = st.dictionaries(
    st.text(max_size=6),
    # integers as CBOR carries them without a tag (major types 0 and 1): bignums are refused
    st.one_of(
        st.none(), st.booleans(), st.integers(-(2**64), 2**64 - 1), finite, st.text(max_size=6)
    ),
    max_size=4,
)


value_choice = st.one_of(plain_values, plain_values, plain_values, odd_values)


@st.composite
def readings(draw: st.DrawFn, seq: int, sensor: str, t: float) -> WireRecord:
    channels = list(RIG.get(sensor, {"a": None, "b/min": None}))
    if draw(st.booleans()):  # a sensor may report a subset (another group of the same sensor)
        channels = draw(st.lists(st.sampled_from(channels), min_size=1, unique=True))
    values = {ch: draw(value_choice) for ch in channels}
    created = draw(st.one_of(st.just(t), st.floats(t - 5.0, t + 5.0)))
    return WireRecord(seq, "telemetry", created, TelemetryBody(sensor, t, values).to_cbor())


def _carried(body: bytes) -> bool:
    """Whether a telemetry body is carried (what no record of ours holds is refused)."""
    try:
        check_body("telemetry", body, "body")
    except CodecError:
        return False
    return True


@st.composite
def other_records(draw: st.DrawFn, seq: int, t: float) -> WireRecord:
    kind = draw(st.sampled_from(["alert", "event", "state", "telemetry"]))
    created = draw(st.one_of(st.just(t), finite))
    if kind == "telemetry":  # telemetry the columns cannot carry goes as its body bytes
        body = draw(
            st.one_of(
                st.binary(max_size=12).filter(_carried),  # but bytes holding a CBOR tag
                st.just(cbor2.dumps(["motor", t, {"current_a": 1}])),  # an int, not canonical
                st.just(TelemetryBody("motor", math.inf, {"current_a": 1.0}).to_cbor()),
                st.just(TelemetryBody("motor", t, {}).to_cbor()),
                st.just(TelemetryBody("m" * (MAX_NAME + 1), t, {"x": 1.0}).to_cbor()),
            )
        )
    else:
        cls = {"alert": AlertBody, "event": EventBody, "state": StateBody}[kind]
        body = cls(draw(st.one_of(st.just(t), finite)), draw(data_maps)).to_cbor()
    return WireRecord(seq, kind, created, body)


@st.composite
def batches(draw: st.DrawFn, max_rows: int = 12) -> list[WireRecord]:
    """A rig's records: readings of several sensors at about their intervals, with alerts,
    events, state and odd telemetry between them; seqs counting up from a wall-clock start, or
    jumping about."""
    sensors = draw(st.lists(st.sampled_from([*RIG, "other"]), min_size=1, max_size=4, unique=True))
    rows = draw(st.integers(0, max_rows))
    seq = draw(st.integers(2**40, batch.MAX_SEQ - 2**40))
    stride = draw(st.sampled_from([1, 1, 3, -1, 2**31 + 1, -(2**20)]))
    t = draw(st.one_of(st.just(T0), st.floats(-1e9, 4e9)))
    interval = draw(st.sampled_from([0.001, 0.01, 0.1, 1.0, 1.37]))
    jitter = st.sampled_from([0.0, 0.0, 0.0, 0.0004, -0.0003, 2.5])
    out = []
    for _ in range(rows):
        t += interval + draw(jitter)
        for sensor in sensors:
            if draw(st.integers(0, 9)) == 0:
                out.append(draw(other_records(seq, t)))
                seq += stride
            out.append(draw(readings(seq, sensor, t)))
            seq += stride
    return out


steps = st.sampled_from([0.1, 0.01, 0.0625, 1e-5, 0.0039, 2.5, 1000.0, 3e-7, 0.3, 1 / 3])


# -- the contract, over every encoding ------------------------------------------------------------


@pytest.mark.parametrize("cf", ALL)
@settings(RELAXED, max_examples=40)
@given(device=st.one_of(st.none(), st.sampled_from(["pump-rig-01", "d"])), records=batches())
def test_round_trip_keeps_what_is_promised(
    cf: int, device: str | None, records: list[WireRecord]
) -> None:
    data = encode_batch(device, records, cf, resolution=rig_resolution)
    got_device, got = decode_batch(data, cf)
    assert got_device == (device if records or cf != CF_SENML_CBOR else None)
    want = [expected(r, cf, rig_resolution) for r in records]
    assert [_key(r) for r in got] == [_key(r) for r in want]
    # a decoder that states the time in a body states it right (the storage trusts it)
    for r in got:
        assert record_time(r) == body_time(r.kind, r.body, r.created)


@pytest.mark.parametrize("cf", COMPACT)
@settings(RELAXED, max_examples=40)
@given(
    step=steps,
    xs=st.lists(st.floats(-1e6, 1e6), min_size=1, max_size=40),
    t0=st.floats(0.0, 4e9),
    dts=st.lists(st.floats(0.0, 100.0), min_size=40, max_size=40),
)
def test_rounding_guarantees(
    cf: int, step: float, xs: list[float], t0: float, dts: list[float]
) -> None:
    """Values come back exactly (on the grid of r as columns, off it with the record's body);
    time to the millisecond for records that went as columns."""
    times = list(itertools.accumulate(dts, initial=t0))
    records = [
        WireRecord(i, "telemetry", t, TelemetryBody("s", t, {"v": x}).to_cbor())
        for i, (x, t) in enumerate(zip(xs, times, strict=False))
    ]
    _, got = decode_batch(encode_batch(None, records, cf, resolution=lambda s, c: step), cf)
    for rec, x, t in zip(got, xs, times, strict=False):
        body = TelemetryBody.from_cbor(rec.body)
        value = body.values["v"]
        assert value == x or (math.isnan(value) and math.isnan(x))
        if quantize(x, step) == x and math.copysign(1.0, x) > 0.0:  # a column: time in ms
            assert body.time == round(t * 1000) / 1000 == rec.created
        assert abs(body.time - t) <= 0.0005 + math.ulp(t)


def test_quantize_uses_the_decimal_step() -> None:
    assert quantize(1.7, 0.1) == 1.7  # 17 * 0.1 would be 1.7000000000000002
    assert quantize(0.00391, 0.0039) == 0.0039
    assert quantize(-0.03, 0.0625) == 0.0 and quantize(1e6 + 0.4, 1.0) == 1e6


@pytest.mark.parametrize("cf", COMPACT)
@pytest.mark.parametrize("device", [None, "pump-rig-01"])
def test_empty_batch(cf: int, device: str | None) -> None:
    assert decode_batch(encode_batch(device, [], cf), cf) == (device, [])


@pytest.mark.parametrize("cf", COMPACT)
def test_without_resolutions_every_value_is_exact(cf: int) -> None:
    values = [1.1, -0.0, math.nan, math.inf, 5e-324, 1.7976931348623157e308, 229.1]
    records = [
        WireRecord(i, "telemetry", T0 + i, TelemetryBody("probe", T0 + i, {"x": x}).to_cbor())
        for i, x in enumerate(values)
    ]
    _, got = decode_batch(encode_batch("d", records, cf), cf)
    assert [_key(r) for r in got] == [_key(r) for r in records]


@pytest.mark.parametrize("cf", COMPACT)
def test_aggregates_take_the_resolution_of_their_channel(cf: int) -> None:
    body = TelemetryBody("motor", T0, {"supply_v/min": 229.1, "supply_v/max": 230.0})
    on_grid = WireRecord(1, "telemetry", T0, body.to_cbor())
    off = TelemetryBody("motor", T0, {"supply_v/min": 229.1234, "supply_v/max": 229.9876})
    off_grid = WireRecord(2, "telemetry", T0, off.to_cbor())
    enc = codec.encoding_for(cf)
    assert isinstance(enc, compact.CompactEncoding)
    res = lambda s, c: 0.1 if c == "supply_v" else None  # noqa: E731
    section, _ = enc.sections(None, [on_grid], resolution=res)
    assert b"supply_v/min" in section  # the aggregate is a column at supply_v's resolution
    data = encode_batch(None, [on_grid, off_grid], cf, resolution=res)
    assert decode_batch(data, cf)[1] == [on_grid, off_grid]  # off the grid: exactly, as a body


@pytest.mark.parametrize("cf", COMPACT)
@pytest.mark.parametrize("step", [0.0, -0.1, -0.0, math.nan, math.inf, "0.1", True, 1e308 * 10])
def test_bad_resolutions_are_codec_errors(cf: int, step: Any) -> None:
    rec = WireRecord(1, "telemetry", T0, TelemetryBody("s", T0, {"v": 1.0}).to_cbor())
    with pytest.raises(CodecError, match="resolution"):
        encode_batch(None, [rec], cf, resolution=lambda s, c: step)


@pytest.mark.parametrize("cf", COMPACT)
def test_a_failing_resolution_function_is_a_codec_error(cf: int) -> None:
    rec = WireRecord(1, "telemetry", T0, TelemetryBody("s", T0, {"v": 1.0}).to_cbor())

    def broken(sensor: str, channel: str) -> float:
        raise KeyError(channel)

    with pytest.raises(CodecError, match="resolution"):
        encode_batch(None, [rec], cf, resolution=broken)


@pytest.mark.parametrize("cf", COMPACT)
@pytest.mark.parametrize(
    ("device", "records"),
    [
        ("bad device", []),
        (None, [WireRecord(1, "alert", T0, b""), WireRecord(1, "event", T0, b"")]),
        (None, [WireRecord(-1, "alert", T0, b"")]),
        (None, [WireRecord(1, "nonsense", T0, b"")]),
        (None, [WireRecord(1, "alert", math.nan, b"")]),
    ],
)
def test_encode_rejects_bad_records(cf: int, device: Any, records: list[WireRecord]) -> None:
    with pytest.raises(CodecError):
        encode_batch(device, records, cf)


def test_registered_and_announced() -> None:
    assert set(ALL) <= set(codec.content_formats())
    assert [codec.encoding_for(cf).name for cf in COMPACT] == [
        "compact",
        "compact+deflate",
        "compact+deflate+dict",
    ]
    assert all(isinstance(codec.encoding_for(cf), batch.Encoding) for cf in COMPACT)


# -- fixed bytes -----------------------------------------------------------------------------------


def _small_batch() -> list[WireRecord]:
    return [
        WireRecord(10, "telemetry", T0, TelemetryBody("m", T0, {"a": 1.5, "v": 229.1}).to_cbor()),
        WireRecord(
            11, "telemetry", T0 + 1, TelemetryBody("m", T0 + 1, {"a": 1.52, "v": 229.1}).to_cbor()
        ),
        WireRecord(12, "alert", T0 + 1.5, AlertBody(T0 + 1, {"score": 0.5}).to_cbor()),
    ]


def _small_resolution(sensor: str, channel: str) -> float | None:
    return {"a": 0.01, "v": 0.1}[channel]


# The byte section of the small batch (what deflate compresses), annotated.
SMALL_PLAIN = bytes.fromhex(
    "01"  # version 1
    "00"  # flags: residuals as varints (65000)
    "01"  # 1 group:
    "01 6d"  # sensor "m"
    "02"  # 2 channels
    "01 61  01 01 04"  # "a", resolution: tag 1, 1 * 10**-2 (exponent zigzag(2) = 4)
    "01 76  01 01 02"  # "v", resolution 1 * 10**-1
    "02 6431"  # device "d1"
    "03"  # 3 records
    "80a0abfef962"  # base time: zigzag(1700000000000 ms)
    "04 04 00"  # group ids: group 0 (id 4), group 0, an alert (id 0)
    "0a 00 00"  # seqs: 10, then zigzag(delta - 1) = 0 twice
    "41d954fc40600000"  # the alert: created, float64 big-endian (1700000001.5)
    "14 82fb41d954fc40400000a16573636f7265f93800"  # its body: length 20, the bytes
    # group 0, 2 rows:
    "00"  # its own time columns (not those of an earlier group)
    "00 d00f"  # time: zigzag(first - base) = 0, first delta zigzag(1000 ms)
    "00 00"  # created - time, zigzag, per row
    "00 ac02 04"  # "a": predictor 0 (delta), residuals zigzag(150), zigzag(2)
    "00 e623 00"  # "v": predictor 0 (delta), residuals zigzag(2291), zigzag(0)
)
SMALL_SPLIT = bytes.fromhex(
    "01 01"  # version 1, flags: split residuals (65001, 65002)
    + SMALL_PLAIN.hex()[4:-16]  # the same up to the value columns
    + "00 06  04 00"  # "a": delta, shift 6, tokens of 300 >> 6 = 4 and of 4 >> 6 = 0
    "02 e623  00  00 00"  # "v": mean (zigzag 2291), shift 0, tokens 0 0
)
# The extra bits of "a", LSB first: of 300 = 0b100_101100 the bit below the leading one and
# the 6 low bits (7 bits: 44), then the 6 low bits of 4.
SMALL_BITS = bytes.fromhex("2c02")
SMALL_DEFLATE = bytes.fromhex(
    "63646464cc65624c646464612c636464624a31646e58b0fadfcf241616062e0606c79b217f1c121818449a7e8399"
    "0e0c0c0b538b93f38b527f5a3030305ce007126c2c0c4ccf94810c002c02"
)
SMALL_DICT = bytes.fromhex(  # dictionary 1 as tools/make_compact_dict.py makes it from the rig
    "016304825c26c644a0fd8cc00e0c13538a2173c382d5ff7e26b1b0307041daf30e090c0c224de0407400658dd4e2e4"
    "fca2d49f16c012e9023f90606361607aa60c6400002c02"
)
FIXED_ZLIB = "1.2.13"  # the zlib that made the deflate bytes above (others may deflate otherwise)


def test_fixed_bytes() -> None:
    records = _small_batch()
    want = [expected(r, CF_COMPACT, _small_resolution) for r in records]
    assert encode_batch("d1", records, CF_COMPACT, resolution=_small_resolution) == SMALL_PLAIN
    for cf, data in [
        (CF_COMPACT, SMALL_PLAIN),
        (CF_COMPACT_DEFLATE, SMALL_DEFLATE),
        (CF_COMPACT_DICT, SMALL_DICT),
    ]:
        device, got = decode_batch(data, cf)
        assert device == "d1"
        assert [_key(r) for r in got] == [_key(r) for r in want]
        assert TelemetryBody.from_cbor(got[1].body).values == {"a": 1.52, "v": 229.1}
    for cf, data, zdict in [
        (CF_COMPACT_DEFLATE, SMALL_DEFLATE, None),
        (CF_COMPACT_DICT, SMALL_DICT[1:], DICTIONARIES[1]),
    ]:
        enc = codec.encoding_for(cf)
        assert enc.sections("d1", records, resolution=_small_resolution) == (
            SMALL_SPLIT,
            SMALL_BITS,
        )
        inflater = zlib.decompressobj(-15, zdict) if zdict else zlib.decompressobj(-15)
        assert inflater.decompress(data) == SMALL_SPLIT and inflater.unused_data == SMALL_BITS
        if zlib.ZLIB_RUNTIME_VERSION == FIXED_ZLIB:
            assert enc.encode("d1", records, resolution=_small_resolution) == (
                SMALL_DICT if zdict else SMALL_DEFLATE
            )


def test_the_shipped_dictionary_is_what_the_script_makes() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "make_compact_dict.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


# -- bad input: only CodecError, bounded work -----------------------------------------------------


def _decodes_or_codec_error(data: bytes, cf: int) -> None:
    try:
        decode_batch(data, cf)
    except CodecError:
        pass


def _deflate(section: bytes, zdict: bytes | None = None) -> bytes:
    comp = zlib.compressobj(9, zlib.DEFLATED, -15, 9, zlib.Z_DEFAULT_STRATEGY, zdict or b"")
    return comp.compress(section) + comp.flush()


@pytest.mark.parametrize("cf", COMPACT)
@RELAXED
@given(data=st.binary(max_size=200))
def test_random_bytes_raise_only_codec_error(cf: int, data: bytes) -> None:
    _decodes_or_codec_error(data, cf)


@pytest.mark.parametrize("cf", COMPACT)
@settings(RELAXED, max_examples=25)
@given(records=batches(max_rows=4))
def test_every_truncation_is_a_codec_error(cf: int, records: list[WireRecord]) -> None:
    data = encode_batch("d", records, cf, resolution=rig_resolution)
    for end in range(len(data)):
        with pytest.raises(CodecError):
            decode_batch(data[:end], cf)


@pytest.mark.parametrize("cf", COMPACT)
@settings(RELAXED, max_examples=60)
@given(
    records=batches(max_rows=6),
    flips=st.lists(st.tuples(st.integers(0), st.integers(1, 255)), min_size=1, max_size=4),
    inside=st.booleans(),
)
def test_mutated_batches_raise_only_codec_error(
    cf: int, records: list[WireRecord], flips: list[tuple[int, int]], inside: bool
) -> None:
    """Bytes flipped in the payload, or (to reach the parser behind deflate) in the byte section
    and the extra bits before they are put together again."""
    enc = codec.encoding_for(cf)
    section, bits = enc.sections("d", records, resolution=rig_resolution)
    if inside and cf != CF_COMPACT:
        raw = bytearray(section + bits)
    else:
        raw = bytearray(encode_batch("d", records, cf, resolution=rig_resolution))
    for pos, mask in flips:
        raw[pos % len(raw)] ^= mask
    data = bytes(raw)
    if inside and cf != CF_COMPACT:
        head = b"\x01" if cf == CF_COMPACT_DICT else b""
        cut = len(section)
        data = head + _deflate(data[:cut], DICTIONARIES[1] if head else None) + data[cut:]
    _decodes_or_codec_error(data, cf)


@pytest.mark.parametrize("cf", [CF_COMPACT_DEFLATE, CF_COMPACT_DICT])
def test_an_inflate_bomb_is_refused(cf: int) -> None:
    head = b"\x01" if cf == CF_COMPACT_DICT else b""
    bomb = head + _deflate(b"\x01\x00" + bytes(MAX_INFLATED), DICTIONARIES[1] if head else None)
    assert len(bomb) < 8 * 1024
    with pytest.raises(CodecError, match="inflates to more than"):
        decode_batch(bomb, cf)


def _varint(u: int) -> bytes:
    out = bytearray()
    while u >= 0x80:
        out.append(u & 0x7F | 0x80)
        u >>= 7
    out.append(u)
    return bytes(out)


@pytest.mark.parametrize(
    ("section", "match"),
    [
        (b"\x01\x00" + _varint(2**63), "more than the batch can hold"),  # groups
        (b"\x01\x00\x01" + _varint(2**40) + b"s", "more than the batch can hold"),  # a name
        (b"\x01\x00\x01" + _varint(MAX_NAME + 1) + b"s" * (MAX_NAME + 1), "longer than"),
        (b"\x01\x00\x00\x00" + _varint(2**62), "more than the batch can hold"),  # records
        (b"\x01\x00\x00\x00\x00" + b"\xff" * 11, "longer than 10 bytes"),
        (b"\x02\x00\x00\x00\x00\x00", "version"),
        (b"\x01\x80\x00\x00\x00\x00", "flags"),
    ],
)
def test_counts_cannot_make_huge_allocations(section: bytes, match: str) -> None:
    for cf, data in [
        (CF_COMPACT, section),
        (CF_COMPACT_DEFLATE, _deflate(section)),
        (CF_COMPACT_DICT, b"\x01" + _deflate(section, DICTIONARIES[1])),
    ]:
        with pytest.raises(CodecError, match=match):
            decode_batch(data, cf)


def test_a_batch_that_would_decode_too_large_is_refused() -> None:
    """Long names repeated in every rebuilt body: refused before any body is built."""
    channels = [f"{i:03d}".ljust(MAX_NAME, "c") for i in range(200)]
    section = bytearray(b"\x01\x00\x01" + _varint(MAX_NAME) + b"s" * MAX_NAME + _varint(200))
    for ch in channels:
        section += _varint(len(ch)) + ch.encode() + b"\x00"
    rows = MAX_DECODED // (MAX_NAME * 200) + 1
    section += b"\x00" + _varint(rows) + b"\x00" + b"\x04" * rows + b"\x00" * rows
    assert len(section) < MAX_DECODED // 100
    with pytest.raises(CodecError, match="decode to more than"):
        decode_batch(bytes(section), CF_COMPACT)


def test_too_many_records_are_refused_when_encoding() -> None:
    records = [WireRecord(i, "event", T0, b"") for i in range(MAX_RECORDS + 1)]
    with pytest.raises(CodecError, match="at most"):
        encode_batch(None, records, CF_COMPACT)


@pytest.mark.parametrize("cf", [CF_COMPACT_DEFLATE, CF_COMPACT_DICT])
def test_deflate_framing_errors(cf: int) -> None:
    good = encode_batch("d", _small_batch(), cf, resolution=_small_resolution)
    if cf == CF_COMPACT_DICT:
        with pytest.raises(CodecError, match="unknown preset dictionary 7"):
            decode_batch(b"\x07" + good[1:], cf)
    with pytest.raises(CodecError):  # extra bytes after the extra bits
        decode_batch(good + b"\x00", cf)
    with pytest.raises(CodecError):  # extra bits stripped
        decode_batch(good[:-2], cf)
    with pytest.raises(CodecError, match="carries no extra bits"):
        decode_batch(SMALL_SPLIT, CF_COMPACT)


def test_groups_taken_together_share_their_time_columns() -> None:
    records = []
    for i in range(50):
        for sensor in ("a", "b", "c"):
            body = TelemetryBody(sensor, T0 + i, {"x": float(i % 7)}).to_cbor()
            records.append(WireRecord(len(records), "telemetry", T0 + i, body))
    one = encode_batch(None, [r for r in records if b"\x61a" in r.body[:3]], CF_COMPACT)
    three = encode_batch(None, records, CF_COMPACT, resolution=lambda s, c: 1.0)
    # the groups b and c say "the clock of 1 back" in one byte instead of ~ 100 bytes of times
    assert len(three) < 3 * len(one)
    assert [_key(r) for r in decode_batch(three, CF_COMPACT)[1]] == [_key(r) for r in records]


def test_a_shared_clock_must_have_as_many_readings() -> None:
    section = bytearray(SMALL_PLAIN)
    pos = len(section) - 14  # the group's "own clock" byte: 14 bytes from the end
    assert section[pos : pos + 3] == b"\x00\x00\xd0"
    section[pos] = 1  # "the clock of the group 1 back": there is none
    with pytest.raises(CodecError, match="no earlier group"):
        decode_batch(bytes(section), CF_COMPACT)


@pytest.mark.parametrize("cf", COMPACT)
def test_reading_time_too_large_for_milliseconds_goes_as_body(cf: int) -> None:
    """A finite time whose milliseconds overflow a double (found by the mutation property test)
    is not a column value: the record travels with its body and decodes unchanged."""
    body = TelemetryBody("motor", 1.7e306, {"current_a": 1.0}).to_cbor()
    records = [WireRecord(1, "telemetry", 1.7e9, body), WireRecord(2, "telemetry", 1.7e306, body)]
    device, decoded = decode_batch(encode_batch("d", records, cf, resolution=rig_resolution), cf)
    assert device == "d" and decoded == records


@pytest.mark.parametrize("cf", COMPACT)
def test_a_record_resent_in_another_encoding_is_the_same_record(cf: int) -> None:
    """A record first sent in SenML-CBOR and again in a compact encoding (times in whole ms) is
    recognised as the same record; another time, sensor or value is not."""
    body = TelemetryBody("motor", T0 + 0.2863, {"current_a": 2.412, "supply_v": 230.1}).to_cbor()
    rec = WireRecord(7, "telemetry", T0 + 0.28634, body)
    _, (back,) = decode_batch(encode_batch("d", [rec], cf, resolution=rig_resolution), cf)
    assert batch.same_record(rec.kind, rec.created, rec.body, back)
    for sensor, t, value in (
        ("motor", 1.2863, 2.412),
        ("pump", 0.2863, 2.412),
        ("motor", 0.2863, 9.0),
    ):
        body = TelemetryBody(sensor, T0 + t, {"current_a": value, "supply_v": 230.1}).to_cbor()
        assert not batch.same_record(rec.kind, rec.created, rec.body, replace(back, body=body))
    assert not batch.same_record("alert", rec.created, rec.body, back)


# -- the encoder's shortcuts give what their definitions give ------------------------------------
# (agent/wire/packing.py, predict.py, compact.py compute costs, choices, tokens and layouts with
# less work than their definitions; the definitions are written out here as the references.)


def _ref_split_cost(residuals: list[int], k: int, per_token: float = 0.0) -> float:
    tokens: dict[int, int] = {}
    extra = 0
    for u in residuals:
        h = u >> k
        if h < 4:
            tokens[h] = tokens.get(h, 0) + 1
            extra += k
        else:
            nb = h.bit_length() - 2
            t = 2 * nb + 2 + ((h >> nb) & 1)
            tokens[t] = tokens.get(t, 0) + 1
            extra += nb + k
    n = len(residuals)
    return extra - sum(c * math.log2(c / n) for c in tokens.values()) + per_token * len(tokens)


def _ref_shift(residuals: list[int]) -> int:
    if not residuals:
        return 0
    median = sorted(residuals)[len(residuals) // 2]
    k0 = min(62, (median + 1).bit_length() - 1)
    return min(range(max(0, k0 - 2), k0 + 2), key=lambda k: _ref_split_cost(residuals, k))


def _ref_residuals(q: list[int], pred: int, param: Any) -> list[int]:
    out = []
    if pred == predict.P_PALETTE:
        return [param.index(v) for v in q]
    s = 0
    for i, v in enumerate(q):
        if pred == predict.P_DELTA:
            p = q[i - 1] if i else 0
        elif pred == predict.P_LINEAR:
            p = q[i - 1] if i < 2 and i else (2 * q[i - 1] - q[i - 2] if i else 0)
        elif pred == predict.P_MEAN:
            p = param
        else:  # P_LOCAL
            cnt = min(i, param)
            p = (2 * s + cnt) // (2 * cnt) if cnt else 0
            s += v - (q[i - param] if i >= param else 0)
        out.append(packing.zigzag(v - p))
    return out


def _ref_choose(q: list[int], split: bool) -> tuple[int, Any]:
    sample = q[:512]
    n = len(sample)
    candidates: list[tuple[int, Any]] = [(predict.P_DELTA, None), (predict.P_LINEAR, None)]
    candidates.append((predict.P_MEAN, (2 * sum(sample) + n) // (2 * n)))
    candidates += [(predict.P_LOCAL, k) for k in (2, 4, 8) if k < n]
    counts = collections.Counter(sample)
    if len(counts) <= 32 and 2 * len(counts) <= n and len(set(q)) <= 32:
        full = collections.Counter(q)
        palette = [v for v, _ in sorted(full.items(), key=lambda kv: (-kv[1], kv[0]))]
        candidates.append((predict.P_PALETTE, palette))
    best: tuple[float, int, Any] | None = None
    for pred, param in candidates:
        residuals = _ref_residuals(sample, pred, param)
        if split:
            cost = _ref_split_cost(residuals, 0, 6.0)
        else:
            cost = 8.0 * sum(max(1, (u.bit_length() + 6) // 7) for u in residuals)
        cost += 8 * len(predict._params_bytes(pred, param))
        if best is None or cost < best[0]:
            best = (cost, pred, param)
    assert best is not None
    return best[1], best[2]


residual_lists = st.lists(
    st.one_of(
        st.integers(0, 3),
        st.integers(0, 300),
        st.integers(0, 2**20),
        st.integers(0, 2**64 - 1),
    ),
    max_size=80,
)


@settings(RELAXED, max_examples=300)
@given(residuals=residual_lists, k=st.integers(0, 62), per_token=st.sampled_from([0.0, 6.0]))
def test_split_costs_and_shifts_are_those_of_their_definition(
    residuals: list[int], k: int, per_token: float
) -> None:
    # the same float (not merely a close one): the choices compare them
    assert packing._split_cost(residuals, k, per_token) == _ref_split_cost(residuals, k, per_token)
    tokens0 = packing._tokens0(residuals)
    assert packing._shift(residuals) == _ref_shift(residuals)
    assert packing._shift(residuals, packing._count(tokens0)) == _ref_shift(residuals)
    # a split column's token bytes and extra bits, as the encoder wrote them value by value
    token_at, extra_at = packing._shift_tables(k)
    want, bits = bytearray(), packing._BitWriter()
    for u in residuals:
        h = u >> k
        if h < 4:
            want.append(h)
            bits.write(u & ((1 << k) - 1), k)
        else:
            nb = h.bit_length() - 2
            want.append(2 * nb + 2 + ((h >> nb) & 1))
            bits.write(((h & ((1 << nb) - 1)) << k) | (u & ((1 << k) - 1)), nb + k)
    fast = packing._BitWriter()
    fast.write(5, 3)  # not on a byte boundary
    fast.write_low(residuals, [extra_at[t] for t in tokens0])
    slow = packing._BitWriter()
    slow.write(5, 3)
    slow.write(int.from_bytes(bits.finish(), "little"), sum(extra_at[t] for t in tokens0))
    assert bytes(token_at[t] for t in tokens0) == want
    assert fast.finish() == slow.finish()


columns = st.one_of(
    st.lists(st.integers(-5, 5), min_size=1, max_size=40),
    st.lists(st.integers(-(2**53), 2**53), min_size=1, max_size=20),
    st.builds(
        lambda start, step, noise: [start + step * i + d for i, d in enumerate(noise)],
        st.integers(-(10**6), 10**6),
        st.integers(-300, 300),
        st.lists(st.integers(-3, 3), min_size=1, max_size=700),
    ),
    st.lists(st.sampled_from([7, 9, -2, 1000]), min_size=1, max_size=600),
)


@settings(RELAXED, max_examples=300)
@given(q=columns)
def test_predictor_choices_are_those_of_their_definition(q: list[int]) -> None:
    for split in (False, True):
        pred, param, residuals, tokens0, counts = predict._choose_column(q, split)
        assert (pred, param) == _ref_choose(q, split) == predict._choose(q, split)
        assert residuals == _ref_residuals(q, pred, param) == predict._residuals(q, pred, param)
        assert tokens0 == packing._tokens0(residuals)
        assert counts == (dict(collections.Counter(tokens0)) if split else None)
        if split:
            assert list(counts) == list(collections.Counter(tokens0))  # same order


@settings(RELAXED, max_examples=150)
@given(
    data=st.one_of(
        st.binary(max_size=300),
        st.binary(max_size=5000),
        st.builds(
            lambda b, n: (b * n)[:6000], st.binary(min_size=1, max_size=40), st.integers(1, 400)
        ),
        st.lists(st.integers(0, 6), max_size=1200).map(bytes),
    ),
    dictionary=st.booleans(),
)
def test_small_deflate_parameters_make_the_same_stream(data: bytes, dictionary: bool) -> None:
    zdict = DICTIONARIES[1] if dictionary else b""
    wbits, mem = compact._deflate_params(len(data), len(zdict))
    for strategy in compact._STRATEGIES:
        want = zlib.compressobj(9, zlib.DEFLATED, -15, 9, strategy, zdict)
        got = zlib.compressobj(9, zlib.DEFLATED, wbits, mem, strategy, zdict)
        assert got.compress(data) + got.flush() == want.compress(data) + want.flush()


float_values = st.one_of(
    st.floats(-1e6, 1e6),
    st.sampled_from([0.0, -0.0, 1.5, 1000.0, 65504.0, 1e-8, 3.0e38, 1e300, math.inf, math.nan]),
    st.integers(-3000, 3000).map(lambda i: i / 4),
)


@settings(RELAXED, max_examples=200)
@given(
    sensor=st.sampled_from(["motor", "m", "ambient"]),
    time=float_values,
    values=st.dictionaries(
        st.sampled_from(["a", "bb", "current_a", "x/mean"]), float_values, min_size=1
    ),
)
def test_canonical_bodies_are_read_as_cbor_reads_them(
    sensor: str, time: float, values: dict[str, float]
) -> None:
    """The layouts of known bodies (compact._Layout) read what cbor2 reads, and only from bodies
    that SenMLCBOR writes (the canonical ones)."""
    enc = compact.CompactEncoding(CF_COMPACT, "test", deflate=False)
    canonical = TelemetryBody(sensor, time, values).to_cbor()
    other = cbor2.dumps([sensor, time, values])  # not canonical when a float fits fewer bytes
    for body in (canonical, other):
        rec = WireRecord(1, "telemetry", T0, body)
        item = cbor2.loads(body)
        want = None
        if SenMLCBOR().reading_body(*item) == body:
            want = (sensor, item[1], tuple(item[2]), tuple(item[2].values()))
        for _ in range(2):  # the first reading learns the layout, the second uses it
            got = enc._reading(rec)
            assert (got is None) == (want is None)
            if got is not None and want is not None:
                assert (got[0], got[2]) == (want[0], want[2])
                # the same floats, bit for bit (NaN too)
                floats = [got[1], *got[3]]
                assert struct.pack(f">{len(floats)}d", *floats) == struct.pack(
                    f">{len(floats)}d", want[1], *want[3]
                )


@settings(RELAXED, max_examples=200)
@given(
    xs=st.lists(float_values, min_size=1, max_size=30),
    step=st.sampled_from([0.1, 0.25, 1e-7, 1000.0, 1e290, 3e-300]),
)
def test_columns_are_quantized_as_readings_are(xs: list[float], step: float) -> None:
    num, den = predict.step_ratio(step)
    on_grid = [
        predict.quantize(x, step) if math.isfinite(x) and abs(x / step) < 2**53 else x for x in xs
    ]
    for column in (xs, on_grid):
        rows = [compact.CompactEncoding._quantize_row([x], [(step, num, den)]) for x in column]
        want = None if None in rows else [row[0] for row in rows if row is not None]
        assert compact._quantize(column, step, num, den) == want


def test_bodies_with_a_nan_in_8_bytes_are_not_canonical() -> None:
    """SenMLCBOR writes NaN in 3 bytes: a body with one in 8 goes as a body, whether its layout
    is known or not."""
    enc = compact.CompactEncoding(CF_COMPACT, "test", deflate=False)
    good = TelemetryBody("m", T0 + 0.123, {"a": 2.412, "bb": 229.004}).to_cbor()
    assert enc._reading(WireRecord(1, "telemetry", T0, good)) is not None  # learns the layout
    nan = b"\xfb" + struct.pack(">Q", 0x7FF8000000000001)
    for at in (good.index(b"\xfb"), len(good) - 9):  # the time, the last value
        body = good[:at] + nan + good[at + 9 :]
        assert len(body) == len(good)
        assert enc._reading(WireRecord(1, "telemetry", T0, body)) is None
        assert (
            encode_batch(None, [WireRecord(1, "telemetry", T0, body)], CF_COMPACT)[-len(body) :]
            == body
        )  # with its body bytes
