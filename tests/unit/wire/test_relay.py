"""The body of ``POST /relay/<gateway>`` and its answer (agent/wire/relay.py): fixed bytes, the
round trip, and hostile bodies refused with the error the endpoint answers (4.00, or 4.13 for
too many entries), in time linear in the bytes whatever they declare."""

from __future__ import annotations

import cbor2
import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.wire import codec
from agent.wire.batch import IngestAck, WireRecord
from agent.wire.records import TelemetryBody
from agent.wire.relay import (
    MAX_AGE,
    MAX_BODY_BYTES,
    MAX_ENTRIES,
    RelayEntry,
    RelayError,
    RelayRefusal,
    RelayTooLarge,
    decode_relay,
    decode_relay_answer,
    encode_relay,
    encode_relay_answer,
)

ACK = IngestAck.for_seqs([1, 2], 2, 0, last=2)


def test_request_fixed_bytes() -> None:
    data = encode_relay([RelayEntry("d1", 112, b"\x80")])
    # [["d1", 112, h'80']]
    assert data.hex() == "81" + "83" + "626431" + "1870" + "4180"
    assert decode_relay(data) == [RelayEntry("d1", 112, b"\x80")]


def test_answer_fixed_bytes() -> None:
    data = encode_relay_answer([ACK, RelayRefusal(131, "no")])
    # [{"ack": [[1, 2]], "dup": 0, "new": 2, "last": 2}, [131, "no"]]: the ack as /ingest's
    assert data == bytes.fromhex("82") + ACK.to_cbor() + bytes.fromhex("821883626e6f")
    results = decode_relay_answer(data, 2)
    assert results == [ACK, RelayRefusal(131, "no")]
    assert isinstance(results[0], IngestAck) and results[0].last == 2
    assert RelayRefusal(131, "x").dotted == "4.03"


def test_a_real_batch_travels_byte_for_byte() -> None:
    recs = [WireRecord(7, "telemetry", 1.5, TelemetryBody("m", 1.5, {"a": 1.0}).to_cbor())]
    batch = codec.encode_batch("pump-01", recs, 65001, resolution=lambda _s, _c: 0.5)
    (entry,) = decode_relay(encode_relay([RelayEntry("pump-01", 65001, batch)]))
    assert codec.decode_batch(entry.batch, entry.content_format) == ("pump-01", recs)


entries = st.lists(
    st.builds(
        RelayEntry,
        st.text(min_size=1, max_size=70),
        st.integers(0, 0xFFFF),
        st.binary(max_size=64),
    ),
    max_size=20,
)


@given(entries)
def test_round_trip(items: list[RelayEntry]) -> None:
    assert decode_relay(encode_relay(items)) == items


refusals = st.builds(
    RelayRefusal,
    st.integers(128, 191),
    st.text(max_size=200),
    st.one_of(st.none(), st.integers(0, MAX_AGE)),
)


def test_a_refusal_to_send_later_carries_its_max_age() -> None:
    """``[163, message, max-age]``: the entry's device is over its rate limit at the endpoint
    (cloud/ratelimit.py); the gateway sends it again after max-age seconds."""
    later = RelayRefusal(163, "later", 4)
    data = encode_relay_answer([later, RelayRefusal(131, "no")])
    # [[163, "later", 4], [131, "no"]]
    assert data.hex() == "82" + "83" + "18a3" + "656c61746572" + "04" + "821883626e6f"
    assert decode_relay_answer(data, 2) == [later, RelayRefusal(131, "no")]
    assert later.dotted == "5.03" and RelayRefusal(131, "no").max_age is None


@given(st.lists(st.one_of(st.just(ACK), refusals), max_size=30))
def test_answer_round_trip(results: list[IngestAck | RelayRefusal]) -> None:
    assert decode_relay_answer(encode_relay_answer(results), len(results)) == results


@pytest.mark.parametrize(
    "body",
    [
        b"",
        cbor2.dumps({"d1": [112, b""]}),  # a map, not an array
        cbor2.dumps("d1"),
        cbor2.dumps([["d1", 112]]),  # an entry of two
        cbor2.dumps([["d1", 112, b"", 1]]),  # of four
        cbor2.dumps([[1, 112, b""]]),  # a device that is not a text
        cbor2.dumps([["d1", "112", b""]]),  # a content format that is not a number
        cbor2.dumps([["d1", -1, b""]]),
        cbor2.dumps([["d1", 70000, b""]]),
        cbor2.dumps([["d1", True, b""]]),
        cbor2.dumps([["d1", 112, "text"]]),  # a batch that is not bytes
        cbor2.dumps([["d1", 112, [b""]]]),
        cbor2.dumps([["d1", 112, b""]]) + b"\x00",  # bytes after the array
        bytes.fromhex("9bffffffffffffffff"),  # an array that declares 2**64 entries
        bytes.fromhex("81835bffffffffffffffff"),  # a device of 2**64 bytes
        bytes.fromhex("8183626431187044"),  # a batch cut short
        b"\x81" * 10_000,  # nested 10,000 deep
        bytes.fromhex("9f83626431187040"),  # an indefinite array without its break
        bytes.fromhex("8183a1010218704180"),  # a map as the device
    ],
)
def test_malformed_requests_are_refused(body: bytes) -> None:
    """Not an array, wrong entry shapes, lengths that lie, depth: a RelayError (4.00)."""
    with pytest.raises(RelayError) as caught:
        decode_relay(body)
    assert not isinstance(caught.value, RelayTooLarge)


def test_too_many_entries_or_bytes_are_too_large() -> None:
    entry = RelayEntry("d1", 112, b"\x80")
    with pytest.raises(RelayTooLarge):
        encode_relay([entry] * (MAX_ENTRIES + 1))
    many = cbor2.dumps([["d1", 112, b"\x80"]] * (MAX_ENTRIES + 1))
    with pytest.raises(RelayTooLarge):
        decode_relay(many)
    with pytest.raises(RelayTooLarge):
        decode_relay(cbor2.dumps([["d1", 112, bytes(MAX_BODY_BYTES)]]))
    assert len(decode_relay(encode_relay([entry] * MAX_ENTRIES))) == MAX_ENTRIES


def test_entries_the_endpoint_could_not_read_are_not_encoded() -> None:
    for bad in (
        RelayEntry("", 112, b""),
        RelayEntry("d1", -1, b""),
        RelayEntry("d1", 1 << 16, b""),
    ):
        with pytest.raises(RelayError):
            encode_relay([bad])


@pytest.mark.parametrize(
    "answer",
    [
        cbor2.dumps({"ack": []}),  # not an array
        cbor2.dumps([[69, "created"]]),  # a success code is no refusal
        cbor2.dumps([[256, "x"]]),
        cbor2.dumps([[131]]),
        cbor2.dumps([[131, "x" * 201]]),  # a message beyond the limit
        cbor2.dumps([[163, "x", -1]]),  # a max-age that is not a uint
        cbor2.dumps([[163, "x", 1 << 32]]),  # ... or beyond 32 bits
        cbor2.dumps([[163, "x", "4"]]),
        cbor2.dumps([[163, "x", 4, 4]]),  # four items
        cbor2.dumps([{"ack": [[2, 1]], "new": 0, "dup": 0}]),  # an ack that is not one
        cbor2.dumps([{"ack": [[1, 1]], "new": -1, "dup": 0}]),
        cbor2.dumps(["ack"]),
        cbor2.dumps([ACK.to_cbor()]),  # the ack as bytes, not inline
        bytes.fromhex("81a1"),  # cut short
    ],
)
def test_malformed_answers_are_refused(answer: bytes) -> None:
    with pytest.raises(RelayError):
        decode_relay_answer(answer)


def test_an_answer_with_another_number_of_results_is_refused() -> None:
    data = encode_relay_answer([ACK])
    assert decode_relay_answer(data) == [ACK]
    with pytest.raises(RelayError, match="1 results for 2 entries"):
        decode_relay_answer(data, 2)
