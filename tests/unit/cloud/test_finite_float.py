"""Numbers read back from storage or from a device's document become floats or nothing: an
integer no float holds (a CBOR bignum an older endpoint stored before the strict decoder refused
them) is nothing, where ``math.isfinite`` would raise OverflowError."""

from __future__ import annotations

import math

import pytest

from cloud import linkhistory, releasestore
from cloud.storebase import finite_float


@pytest.mark.parametrize(
    ("value", "expected"),
    [(3, 3.0), (-2.5, -2.5), (0, 0.0), (2**63, float(2**63))],
)
def test_numbers_a_float_holds_are_kept(value: object, expected: float) -> None:
    assert finite_float(value) == expected


@pytest.mark.parametrize(
    "value",
    [2**1100, -(2**1100), 2**15000, math.inf, -math.inf, math.nan, True, "1", None, [1]],
    ids=["2^1100", "-2^1100", "2^15000", "inf", "-inf", "nan", "true", "text", "none", "list"],
)
def test_what_no_float_holds_is_none(value: object) -> None:
    assert finite_float(value) is None


def test_link_history_keeps_no_bignum() -> None:
    assert linkhistory._keepable("link/rtt_ms", 2**1100) is None
    assert linkhistory._keepable("link/rtt_ms", 12) == 12.0


def test_release_outcome_with_a_bignum_time_keeps_the_outcome_without_a_time() -> None:
    got = releasestore.outcome_row({"version": "1.2.0", "result": "updated", "at": 2**1100})
    assert got == ("1.2.0", "updated", None, None)
