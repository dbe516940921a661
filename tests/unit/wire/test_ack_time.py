"""The ingest ack's ``"now"`` (docs/protocol.md, "Ingest"): the endpoint's wall time, said only
when its clock is set; an older peer's ack without it reads as before, and a hostile value is
refused as an unreadable ack (never a traceback, never a time)."""

from __future__ import annotations

import math

import cbor2
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from agent.wire.batch import NOW_MAX, NOW_MIN, CodecError, IngestAck, said_time

NOW = 1_796_600_000.25


def ack_with(now: object) -> bytes:
    return cbor2.dumps({"ack": [[1, 3]], "new": 3, "dup": 0, "now": now})


def test_the_time_travels_in_the_ack_as_a_float() -> None:
    ack = IngestAck.for_seqs([1, 2, 3], 3, 0, now=NOW)
    data = ack.to_cbor()
    assert cbor2.loads(data)["now"] == NOW
    assert type(cbor2.loads(data)["now"]) is float
    assert IngestAck.from_cbor(data).now == NOW


def test_fixed_bytes_of_an_empty_ack_with_the_time() -> None:
    data = IngestAck.for_seqs([], 0, 0, now=1_796_600_000.5).to_cbor()
    # {"ack": [], "dup": 0, "new": 0, "now": 1796600000.5}: canonical order, "now" a float64
    assert data.hex() == "a46361636b806364757000636e657700636e6f77fb41dac57c30200000"
    # a whole second fits a float32 exactly: canonical CBOR sends that (docs/protocol.md)
    whole = IngestAck.for_seqs([], 0, 0, now=1_800_000_000.0).to_cbor()
    assert whole.hex().endswith("636e6f77fa4ed693a4")
    assert IngestAck.from_cbor(whole).now == 1_800_000_000.0


def test_an_endpoint_whose_clock_is_not_set_says_nothing() -> None:
    for wall in (30.0, NOW_MIN - 1, math.nan, math.inf, NOW_MAX):
        ack = IngestAck.for_seqs([1], 1, 0, now=wall)
        assert ack.now is None
        assert "now" not in cbor2.loads(ack.to_cbor())
    assert said_time(NOW_MIN) == NOW_MIN


def test_an_older_endpoint_without_the_time_reads_as_before() -> None:
    old = cbor2.dumps({"ack": [[1, 3]], "new": 3, "dup": 0, "last": 3})
    ack = IngestAck.from_cbor(old)
    assert ack.now is None and ack.last == 3 and list(ack.seqs()) == [1, 2, 3]


def test_an_older_device_reading_a_new_ack_ignores_the_key() -> None:
    """The device's decoder takes unknown keys (it reads with .get): a device of an earlier
    release reads a new endpoint's ack as it did; checked here on the map itself."""
    doc = cbor2.loads(IngestAck.for_seqs([1, 2], 2, 0, now=NOW).to_cbor())
    assert {k: v for k, v in doc.items() if k != "now"} == {"ack": [[1, 2]], "new": 2, "dup": 0}
    doc["later_key"] = {"x": [1]}
    assert IngestAck.from_cbor(cbor2.dumps(doc)).now == NOW


@pytest.mark.parametrize(
    "hostile",
    [
        math.nan,
        math.inf,
        -math.inf,
        True,
        False,
        2**70,  # huge: float() of a bigger one would overflow
        10**400,
        -(2**63),
        "1796600000",
        b"\x00" * 8,
        [NOW],
        {"now": NOW},
        cbor2.CBORTag(1, NOW),  # an epoch date tag
        30.0,  # 1970: an endpoint's clock not set is not a time
        NOW_MIN - 0.5,
        NOW_MAX,
        1e300,
    ],
    ids=lambda v: type(v).__name__ + ":" + repr(v)[:20],
)
def test_forged_time_values_are_refused_without_a_traceback(hostile: object) -> None:
    with pytest.raises(CodecError, match=r"ack: (now|semantic tag)"):
        IngestAck.from_cbor(ack_with(hostile))


def test_a_time_nested_too_deep_is_refused() -> None:
    deep: object = NOW
    for _ in range(100):
        deep = [deep]
    with pytest.raises(CodecError):
        IngestAck.from_cbor(ack_with(deep))


@given(st.one_of(st.floats(), st.integers(), st.booleans(), st.text(max_size=5), st.none()))
@example(NOW)
@example(int(NOW))
def test_any_value_is_a_time_in_range_or_refused(value: object) -> None:
    try:
        now = IngestAck.from_cbor(ack_with(value)).now
    except CodecError:
        return
    if value is None:
        assert now is None
    else:
        assert now is not None and NOW_MIN <= now < NOW_MAX and math.isfinite(now)
