"""Desired values on the wire (agent/wire/statedoc.py, agent/wire/cborscan.py): the limits and
ranges each key is held to, a write refused with the key named, and a served document split key
by key so that a hostile value costs only its own key. The attacks come from tools/hostile.py."""

from __future__ import annotations

import io
import random
from typing import Any

import cbor2
import pytest
from hostile import (
    Raw,
    bignum,
    deep_array,
    deep_map,
    encode_document,
    hostile_desired_documents,
    huge_declared_length,
    indefinite_nesting,
)
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from agent.wire import cborscan, records, statedoc
from agent.wire.cborscan import ScanError
from agent.wire.statedoc import (
    DesiredDoc,
    Entry,
    RawValue,
    StateError,
    ValueTooLarge,
    check_desired,
    parse_assignment,
    parse_desired_changes,
    parse_desired_document,
)

pytestmark = pytest.mark.timeout(60)
RELAXED = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])
MODEL = {"name": "pump-ae-int8", "sha256": "ab" * 32, "version": "2024.05.1"}


# -- ranges and limits of each key -------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("sensor/motor/interval", 0.001),
        ("sensor/motor/interval", 86_400),
        ("sensor/motor/interval", 0.5),
        ("sensor/motor/enabled", False),
        ("detect/main/threshold", 0.01),
        ("detect/main/threshold", 1.05),
        ("detect/main/threshold", 100),
        ("model/anomaly", MODEL),
        ("model/anomaly", {"name": "m" * 64}),
        ("model/anomaly", None),  # null unsets any key
    ],
)
def test_values_in_range_are_taken(key: str, value: Any) -> None:
    check_desired(key, value)


@pytest.mark.parametrize(
    ("attack", "key", "value", "says"),
    [
        ("threshold_1e308", "detect/main/threshold", 1e308, "0.01..100"),
        ("threshold_above_range", "detect/main/threshold", 100.5, "0.01..100"),
        ("threshold_zero", "detect/main/threshold", 0, "0.01..100"),
        ("threshold_negative_zero", "detect/main/threshold", -0.0, "0.01..100"),
        ("threshold_nan", "detect/main/threshold", float("nan"), "0.01..100"),
        ("threshold_bignum", "detect/main/threshold", 10**400, "0.01..100"),
        ("interval_zero", "sensor/motor/interval", 0, "0.001..86400"),
        ("interval_a_year", "sensor/motor/interval", 31_536_000, "0.001..86400"),
        ("interval_infinite", "sensor/motor/interval", float("inf"), "0.001..86400"),
        ("interval_bool", "sensor/motor/interval", True, "0.001..86400"),
        ("enabled_int", "sensor/motor/enabled", 1, "true or false"),
        ("model_name_with_slash", "model/anomaly", {"name": "../etc"}, "model name"),
        ("model_name_65_chars", "model/anomaly", {"name": "m" * 65}, "model name"),
        ("model_version_not_text", "model/anomaly", {"name": "m", "version": 2}, "model name"),
        ("model_unknown_field", "model/anomaly", {"name": "m", "url": "x"}, "model name"),
        ("unknown_key", "sensor/motor/gain", 2.0, "unknown key"),
        ("nested_20_deep", "sensor/motor/interval", cbor2.loads(deep_array(20)), "20 deep"),
    ],
)
def test_values_out_of_range_are_refused_with_the_range(
    attack: str, key: str, value: Any, says: str
) -> None:
    with pytest.raises(StateError, match=says.replace(".", r"\.").replace("(", r"\(")) as info:
        check_desired(key, value)
    assert len(str(info.value)) < 300  # a hostile value is never echoed whole


def test_value_of_20kB_is_refused_as_too_large_and_the_message_stays_short() -> None:
    with pytest.raises(ValueTooLarge, match="20009 bytes, at most 256") as info:
        check_desired("model/anomaly", {"name": "m" * 20_000})
    assert len(str(info.value)) < 200


def test_every_number_key_has_a_documented_range() -> None:
    """Each desired key that takes a number has a range in statedoc and in docs/protocol.md."""
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[3] / "docs" / "protocol.md").read_text()
    for name, (low, high) in statedoc.DESIRED_RANGES.items():
        assert f"`{name}` | number, {low:g}..{high:g}" in doc, name


# -- a write is refused whole, naming the key --------------------------------------------------


@pytest.mark.parametrize(
    ("attack", "body", "error", "says"),
    [
        (
            "nested_100_deep",
            b"\xa1" + cbor2.dumps("detect/m/threshold") + deep_array(100),
            StateError,
            "detect/m/threshold: the value is nested 100 deep, at most 4",
        ),
        (
            "deep_map",
            b"\xa1" + cbor2.dumps("sensor/motor/interval") + deep_map(30),
            StateError,
            "nested 30 deep",
        ),
        (
            "large_value_20kB",
            cbor2.dumps({"model/a": {"name": "m" * 20_000}}),
            ValueTooLarge,
            "model/a: the value has 20009 bytes",
        ),
        (
            "bignum_threshold",
            b"\xa1" + cbor2.dumps("detect/m/threshold") + bytes([0xC2, 0x48]) + b"\xff" * 8,
            StateError,
            "detect/m/threshold: semantic tag 2",  # a bignum is refused as it decodes
        ),
        (
            "huge_declared_length",
            b"\xa1\x61a" + bytes([0x5B]) + b"\xff" * 8,
            StateError,
            "not valid CBOR",
        ),
        ("indefinite_nesting", indefinite_nesting(1000), StateError, "not valid CBOR"),
        ("not_a_map", cbor2.dumps([1, 2]), StateError, "expected a map"),
        (
            "key_twice",
            b"\xa2" + (cbor2.dumps("sensor/a/enabled") + b"\xf5") * 2,
            StateError,
            "sensor/a/enabled appears twice",
        ),
        ("trailing_bytes", cbor2.dumps({}) + b"\x00", StateError, "1 bytes after"),
    ],
)
def test_desired_put_bodies_are_refused_naming_the_key(
    attack: str, body: bytes, error: type[Exception], says: str
) -> None:
    with pytest.raises(error, match=says):
        parse_desired_changes(body)


def test_desired_put_body_of_valid_keys_is_taken() -> None:
    changes = {"sensor/motor/interval": 0.5, "model/anomaly": MODEL, "detect/m/threshold": None}
    body = cbor2.dumps(changes)
    assert parse_desired_changes(body) == {
        "sensor/motor/interval": 0.5,
        "model/anomaly": MODEL,
        "detect/m/threshold": None,
    }


@pytest.mark.parametrize(
    ("attack", "text", "says"),
    [
        ("threshold_1e308", "detect/main/threshold=1e308", "0.01..100"),
        ("threshold_bignum", "detect/main/threshold=1" + "0" * 400, "0.01..100"),
        ("json_nested_100000_deep", "sensor/m/interval=" + "[" * 100_000 + "]" * 100_000, "deep"),
        ("json_nested_20_deep", "sensor/m/interval=" + "[" * 20 + "]" * 20, "20 deep"),
    ],
)
def test_command_line_assignments_over_the_limits_are_refused(
    attack: str, text: str, says: str
) -> None:
    with pytest.raises(StateError, match=says):
        parse_assignment(text)


# -- a served document is split key by key ----------------------------------------------------


def test_document_with_a_value_nested_20_deep_refuses_that_key_only() -> None:
    payload = encode_document(
        7,
        {"sensor/motor/interval": [7, 2.0], "detect/motor/threshold": [7, Raw(deep_array(20))]},
    )
    with pytest.raises(records.RecordError):  # what the whole document did before
        records.loads(payload, max_depth=16)
    doc = parse_desired_document(payload)
    assert doc.rev == 7 and doc.entries == {"sensor/motor/interval": Entry(7, 2.0)}
    refusal = doc.refused["detect/motor/threshold"]
    assert refusal.version == 7 and "nested 20 deep, at most 4" in refusal.error
    assert doc.problems == []


@pytest.mark.parametrize(
    "document", hostile_desired_documents(60, 20240611), ids=lambda d: d.attack
)
def test_hostile_desired_documents_cost_only_their_bad_keys(document: Any) -> None:
    doc = parse_desired_document(document.payload)
    refused = set(doc.refused) | {k for k, _ in doc.problems}
    for key, entry in doc.entries.items():
        try:
            check_desired(key, entry.value)
        except StateError:
            refused.add(key)
    assert refused == document.bad
    for key, value in document.good.items():
        assert doc.entries[key] == Entry(document.rev, value)
    # and the endpoint's reading of it keeps every key (a bad value as its bytes)
    served = DesiredDoc.from_cbor(document.payload)
    assert set(served.entries) == set(document.good) | document.bad
    assert DesiredDoc.from_cbor(served.to_cbor()).to_cbor() == served.to_cbor()  # NaN != NaN


@pytest.mark.parametrize(
    "payload",
    [
        b"\xff",
        cbor2.dumps([1]),
        cbor2.dumps({"rev": -1, "keys": {}}),
        cbor2.dumps({"rev": 1}),
        deep_array(10_000),
        huge_declared_length(random.Random(1)),
        b"",
    ],
)
def test_no_document_at_all_is_refused_whole(payload: bytes) -> None:
    with pytest.raises(StateError):
        parse_desired_document(payload)


# an indefinite-length map of an odd number of items: the scanner spans it, but it is no map
ODD_MAP = b"\xbf\x61k\xff"  # {_ "k" }


@pytest.mark.parametrize(
    ("attack", "payload"),
    [
        ("odd_top_level", b"\xbf" + cbor2.dumps({"rev": 1, "keys": {}}) + b"\xff"),
        ("odd_keys", b"\xa2" + cbor2.dumps("rev") + b"\x01" + cbor2.dumps("keys") + ODD_MAP),
        ("odd_put_body", b"\xbf" + cbor2.dumps("sensor/motor/interval") + b"\xff"),
    ],
)
def test_odd_indefinite_map_is_refused_as_a_state_error(attack: str, payload: bytes) -> None:
    """It used to raise cborscan.ScanError, which no caller of these parsers catches."""
    parse = parse_desired_changes if attack == "odd_put_body" else parse_desired_document
    with pytest.raises(StateError, match="odd number of items"):
        parse(payload)


def test_odd_indefinite_blocked_map_costs_only_the_blocked_list() -> None:
    keys = cbor2.dumps({"sensor/a/interval": [1, 2.0]})
    payload = b"\xa3" + cbor2.dumps("rev") + b"\x01" + cbor2.dumps("keys") + keys
    payload += cbor2.dumps("blocked") + ODD_MAP
    doc = parse_desired_document(payload)
    assert doc.entries == {"sensor/a/interval": Entry(1, 2.0)} and doc.blocked == {}
    assert [where for where, _ in doc.problems] == ["blocked"]
    with pytest.raises(StateError, match="odd number of items"):
        DesiredDoc.from_cbor(payload)  # the endpoint's reading of it


def test_stored_value_too_deep_to_decode_is_served_as_its_bytes() -> None:
    raw = deep_array(100)
    value = statedoc.decode_stored(raw)
    assert value == RawValue(raw)
    doc = DesiredDoc(3, {"detect/m/threshold": Entry(3, value), "sensor/a/interval": Entry(2, 1.0)})
    parsed = parse_desired_document(doc.to_cbor())
    assert parsed.entries == {"sensor/a/interval": Entry(2, 1.0)}
    assert "nested 100 deep" in parsed.refused["detect/m/threshold"].error
    with pytest.raises(StateError):
        statedoc.decode_stored(b"\x82\x01")  # not CBOR at all (ends early)
    with pytest.raises(StateError):
        check_desired("detect/m/threshold", value)


# -- the scanner ---------------------------------------------------------------------------------

scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8)
values = st.recursive(
    scalars | st.binary(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner),
    max_leaves=20,
)


def depth_of(value: Any) -> int:
    if isinstance(value, list):
        return 1 + max((depth_of(v) for v in value), default=0)
    if isinstance(value, dict):
        return 1 + max((depth_of(v) for v in value.values()), default=0)
    return 0


@settings(RELAXED, max_examples=300)
@given(value=values, tail=st.binary(max_size=4))
@example(value=[[[[[[]]]]]], tail=b"")
def test_scan_finds_where_every_item_ends_and_how_deep_it_nests(value: Any, tail: bytes) -> None:
    data = cbor2.dumps(value) + tail
    span = cborscan.scan(data)
    assert (span.start, span.end, span.depth) == (0, len(data) - len(tail), depth_of(value))


@settings(RELAXED, max_examples=500)
@given(data=st.binary(max_size=40))
@example(data=b"\x5f\x41a\x61b\xff")  # a chunk of another string type
@example(data=b"\x9f\x01")  # an indefinite array never closed
def test_scan_agrees_with_cbor2_on_well_formedness(data: bytes) -> None:
    """What cbor2 decodes, the scanner spans the same bytes of (the scanner checks only
    well-formedness, so it may take a little more than cbor2 does, never less)."""
    fp = io.BytesIO(data)
    try:
        cbor2.CBORDecoder(fp).decode()
    except Exception:
        return
    assert cborscan.scan(data).end == fp.tell()


@pytest.mark.parametrize(
    ("attack", "data"),
    [
        ("huge_declared_length", huge_declared_length(random.Random(3))),
        ("indefinite_nesting_never_closed", indefinite_nesting(100_000)),
        ("indefinite_string_of_arrays", b"\x5f\x81\x00\xff"),
        ("break_outside", b"\xff"),
        ("reserved_initial_byte", b"\x1c"),
        ("truncated_bignum", bignum(random.Random(4))[:-1]),
    ],
)
def test_scan_refuses_cbor_bombs_without_recursion(attack: str, data: bytes) -> None:
    with pytest.raises(ScanError):
        cborscan.scan(data)


def test_entries_refuses_an_indefinite_map_of_an_odd_number_of_items() -> None:
    data = b"\xbf\x01\x02\x03\xff"  # {_ 1: 2, 3 }: well-formed to the scanner, no map
    with pytest.raises(ScanError, match="odd number of items"):
        cborscan.entries(data, cborscan.scan(data))
    even = b"\xbf\x01\x02\xff"
    assert len(cborscan.entries(even, cborscan.scan(even))) == 1


def test_scan_walks_a_value_nested_100000_deep_without_recursion() -> None:
    assert cborscan.scan(deep_array(100_000)).depth == 100_000
    chunks = b"\x5f" + b"\x41a" * 10_000 + b"\xff"  # an indefinite-length byte string
    assert cborscan.scan(chunks) == cborscan.Span(0, len(chunks), 0)
