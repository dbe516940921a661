"""The endpoint's ingest ack (agent/wire/batch.py IngestAck): membership against a plain set of
seqs, and hostile acks refused before they cost the device's event loop anything: too many bytes,
too many ranges (an ack of 50,000 ranges blocked the loop for seconds, tested per seq of the
batch), ranges out of order or overlapping."""

from __future__ import annotations

import cbor2
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from agent.wire.batch import (
    MAX_ACK_BYTES,
    MAX_ACK_RANGES,
    MAX_SEQ,
    CodecError,
    IngestAck,
    seq_ranges,
)

seqs = st.sets(st.integers(0, 200), max_size=60)


@given(stored=seqs, conflicts=seqs, probe=st.integers(-5, 210))
@example(stored={1, 2, 3, 9}, conflicts={3}, probe=3)
def test_membership_is_that_of_the_seqs(stored: set[int], conflicts: set[int], probe: int) -> None:
    ack = IngestAck.for_seqs(sorted(stored), len(stored), 0, conflicts=sorted(conflicts))
    again = IngestAck.from_cbor(ack.to_cbor())
    for a in (ack, again):
        assert (probe in a) == (probe in stored and probe not in conflicts)
        assert a.in_conflict(probe) == (probe in conflicts)


def test_ranges_built_out_of_order_are_sorted_and_merged() -> None:
    ack = IngestAck(((7, 9), (1, 3), (2, 4)), 1, 0)
    assert ack.ranges == ((1, 4), (7, 9))
    assert 4 in ack and 5 not in ack and 8 in ack


def test_an_honest_ack_of_the_largest_batch_decodes() -> None:
    """4,096 records, every other seq, near the top of the space: the worst an endpoint sends."""
    batch = [MAX_SEQ - 2 * i for i in range(MAX_ACK_RANGES)]
    ack = IngestAck.for_seqs(batch, len(batch), 0, last=MAX_SEQ, store="s" * 64)
    data = ack.to_cbor()
    assert len(data) <= MAX_ACK_BYTES
    assert IngestAck.from_cbor(data) == ack


@pytest.mark.parametrize(
    ("attack", "doc", "said"),
    [
        (
            "too_many_ranges",
            {"ack": [[10**6 + 2 * k] * 2 for k in range(MAX_ACK_RANGES + 1)], "new": 0, "dup": 0},
            "ranges, more than",
        ),
        (
            "too_many_with_conflicts",
            {
                "ack": [[2 * k] * 2 for k in range(MAX_ACK_RANGES)],
                "conflicts": [[10**7, 10**7]],
                "new": 0,
                "dup": 0,
            },
            "ranges, more than",
        ),
        ("unsorted", {"ack": [[5, 6], [1, 2]], "new": 0, "dup": 0}, "sorted and disjoint"),
        ("overlapping", {"ack": [[1, 5], [5, 6]], "new": 0, "dup": 0}, "sorted and disjoint"),
        (
            "conflicts_unsorted",
            {"ack": [], "conflicts": [[9, 9], [3, 3]], "new": 0, "dup": 0},
            "sorted and disjoint",
        ),
    ],
)
def test_hostile_acks_are_refused(attack: str, doc: dict, said: str) -> None:
    with pytest.raises(CodecError, match=said):
        IngestAck.from_cbor(cbor2.dumps(doc))


def test_an_ack_body_over_the_limit_is_refused_before_decoding() -> None:
    body = cbor2.dumps({"ack": [], "new": 0, "dup": 0, "pad": b"x" * MAX_ACK_BYTES})
    with pytest.raises(CodecError, match=f"more than {MAX_ACK_BYTES}"):
        IngestAck.from_cbor(body)


def test_seq_ranges_of_for_seqs_are_what_the_wire_carries() -> None:
    ack = IngestAck.for_seqs([1, 2, 3, 9], 3, 1, last=9)
    assert ack.ranges == tuple(seq_ranges([1, 2, 3, 9]))
    assert ack.to_cbor().hex() == "a46361636b828201038209096364757001636e657703646c61737409"
