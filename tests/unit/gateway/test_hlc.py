"""The hybrid logical clock: order, the receive rule, the drift bound and the persisted ceiling."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.gateway.hlc import (
    LOGICAL_LIMIT,
    MAX_DRIFT,
    ClockDriftError,
    ClockError,
    HybridClock,
    Timestamp,
)
from tests.unit.gateway.helpers import SetClock

T0 = 1_700_000_000.0
T0_MS = int(T0 * 1000)


def test_timestamps_order_by_wall_then_logical_then_node() -> None:
    assert Timestamp(2, 0, "a") > Timestamp(1, 99, "z")
    assert Timestamp(1, 2, "a") > Timestamp(1, 1, "z")
    assert Timestamp(1, 1, "gw-b") > Timestamp(1, 1, "gw-a")  # the tie-break: the node id
    assert sorted([Timestamp(1, 1, "b"), Timestamp(1, 1, "a")])[0].node == "a"


def test_now_follows_the_wall_clock_and_counts_within_a_millisecond() -> None:
    clock = SetClock(T0)
    hlc = HybridClock("gw-1", clock)
    assert hlc.now() == Timestamp(T0_MS, 0, "gw-1")
    assert hlc.now() == Timestamp(T0_MS, 1, "gw-1")  # the same millisecond: the counter moves
    clock.wall += 0.005
    assert hlc.now() == Timestamp(T0_MS + 5, 0, "gw-1")


def test_a_wall_clock_stepped_back_does_not_take_timestamps_back() -> None:
    clock = SetClock(T0)
    hlc = HybridClock("gw-1", clock)
    first = hlc.now()
    clock.wall -= 3600  # NTP steps the clock an hour back
    second = hlc.now()
    assert second > first
    assert (second.wall, second.logical) == (first.wall, first.logical + 1)


def test_update_puts_later_local_timestamps_after_the_remote_one() -> None:
    clock = SetClock(T0)
    hlc = HybridClock("gw-1", clock)
    remote = Timestamp(T0_MS + 20_000, 7, "gw-2")  # 20 s ahead: within the drift bound
    after = hlc.update(remote)
    assert after == Timestamp(T0_MS + 20_000, 8, "gw-1")
    assert hlc.now() > remote
    behind = Timestamp(T0_MS - 5_000, 3, "gw-3")
    assert hlc.update(behind) > remote  # an old remote timestamp changes nothing but the counter


def test_update_when_both_walls_are_equal_takes_the_greater_counter() -> None:
    clock = SetClock(T0)
    hlc = HybridClock("gw-1", clock)
    hlc.now()  # (T0, 0)
    assert hlc.update(Timestamp(T0_MS, 5, "gw-2")) == Timestamp(T0_MS, 6, "gw-1")


def test_attack_a_peer_clock_far_ahead_is_refused() -> None:
    """A peer whose clock runs a day ahead cannot drag this clock (and every key) forward."""
    clock = SetClock(T0)
    hlc = HybridClock("gw-1", clock)
    before = hlc.now()
    broken = Timestamp(T0_MS + 86_400_000, 0, "gw-broken")
    with pytest.raises(ClockDriftError, match="ahead"):
        hlc.update(broken)
    assert hlc.last == before  # unchanged
    edge = Timestamp(T0_MS + int(MAX_DRIFT * 1000), 0, "gw-2")
    assert hlc.update(edge) > edge  # exactly at the bound: accepted
    clock.wall += 86_400  # refused now is accepted later, once this clock catches up
    assert hlc.update(broken) > broken


def test_the_ceiling_keeps_timestamps_rising_across_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "peer.hlc"
    clock = SetClock(T0)
    hlc = HybridClock("gw-1", clock, path)
    issued = [hlc.now() for _ in range(5)]
    assert path.exists()
    clock.wall -= 7200  # a Pi without RTC boots two hours in the past
    again = HybridClock("gw-1", clock, path)
    assert again.now() > max(issued)


def test_the_ceiling_is_written_once_per_reserve_not_per_timestamp(tmp_path: Path) -> None:
    path = tmp_path / "peer.hlc"
    clock = SetClock(T0)
    hlc = HybridClock("gw-1", clock, path, reserve=10.0)
    hlc.now()
    written = path.stat().st_mtime_ns, path.read_bytes()
    for _ in range(100):
        clock.wall += 0.05  # 5 s in all: inside the reserve
        hlc.now()
    assert path.read_bytes() == written[1]
    clock.wall += 6
    hlc.now()
    assert path.read_bytes() != written[1]


def test_attack_a_corrupt_ceiling_file_starts_from_the_wall_clock(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "peer.hlc"
    path.write_bytes(b"\x00garbage{")
    with caplog.at_level(logging.WARNING):
        hlc = HybridClock("gw-1", SetClock(T0), path)
    assert hlc.now() == Timestamp(T0_MS, 0, "gw-1")
    assert "hlc_ceiling_unreadable" in caplog.text


def test_witness_raises_the_floor_without_the_drift_check() -> None:
    hlc = HybridClock("gw-1", SetClock(T0))
    seen = Timestamp(T0_MS + 3_600_000, 4, "gw-2")  # accepted before, read back from the file
    hlc.witness(seen)
    assert hlc.now() > seen


def test_logical_overflow_borrows_the_next_millisecond() -> None:
    hlc = HybridClock("gw-1", SetClock(T0))
    hlc.update(Timestamp(T0_MS, LOGICAL_LIMIT - 1, "gw-2"))
    assert hlc.last == Timestamp(T0_MS + 1, 0, "gw-1")


def test_timestamp_round_trip_and_malformed_items() -> None:
    ts = Timestamp(T0_MS, 3, "gw-1")
    assert Timestamp.from_item(ts.to_item()) == ts
    for bad in (
        None,
        [1, 2],
        [-1, 0, "a"],
        [1.5, 0, "a"],
        [True, 0, "a"],
        [1, LOGICAL_LIMIT, "a"],
        [1 << 48, 0, "a"],
        [1, 0, ""],
        [1, 0, "a b"],
        [1, 0, "x" * 65],
        [1, 0, 7],
    ):
        with pytest.raises(ClockError):
            Timestamp.from_item(bad)


def test_bad_node_id_is_refused() -> None:
    with pytest.raises(ClockError, match="node id"):
        HybridClock("gw 1", SetClock())


steps = st.lists(
    st.one_of(
        st.tuples(st.just("now"), st.just(0)),
        st.tuples(st.just("tick"), st.integers(-5_000_000, 5_000_000)),  # ms, back or forward
        st.tuples(st.just("recv"), st.integers(-120_000, 60_000)),  # remote offset, ms
    ),
    max_size=60,
)


@settings(max_examples=300, deadline=None)
@given(steps)
def test_property_every_timestamp_is_greater_than_all_before_it(
    plan: list[tuple[str, int]],
) -> None:
    clock = SetClock(T0)
    hlc = HybridClock("gw-1", clock)
    seen: list[Timestamp] = [hlc.now()]
    for op, arg in plan:
        if op == "tick":
            clock.wall += arg / 1000
            continue
        if op == "now":
            ts = hlc.now()
        else:
            remote = Timestamp(max(0, int(clock.wall * 1000) + arg), 0, "gw-2")
            ts = hlc.update(remote)
            assert ts > remote
        assert ts > max(seen)
        assert ts.wall >= int(clock.wall * 1000)  # never behind physical time
        seen.append(ts)
