"""The wall time learned from the endpoint (agent/sync/walltime.py EndpointClock), on a virtual
clock stuck at 1970: the offset from the middle of the exchange, NTP winning afterwards,
round trips too long to tell, hostile times, and the smoothing of later samples."""

from __future__ import annotations

import logging
import math

import pytest

from agent.sync import walltime
from agent.sync.walltime import EndpointClock
from drivers.clock import WALL_FLOOR, VirtualClock

BOOT = 30.0  # the system's wall clock at boot: 1970-01-01T00:00:30Z
NOW = 1_796_600_000.0  # the endpoint's


def booted() -> tuple[VirtualClock, EndpointClock]:
    base = VirtualClock(start_wall=BOOT, start_monotonic=1000.0)
    return base, EndpointClock(base)


def exchange(base: VirtualClock, clock: EndpointClock, rtt: float, at: float = 0.4) -> bool:
    """An exchange of ``rtt`` seconds whose endpoint read its clock ``at`` of the way through,
    its clock being NOW at the device's boot."""
    sent = clock.monotonic()
    base.advance(rtt * at)
    said = NOW + (base.monotonic() - 1000.0)
    base.advance(rtt * (1 - at))
    return clock.learn(said, sent, clock.monotonic())


def endpoint_time(base: VirtualClock) -> float:
    return NOW + (base.monotonic() - 1000.0)


def test_unset_until_learned_then_the_endpoints_time_within_half_the_round_trip(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="agent.sync.walltime")
    base, clock = booted()
    assert clock.time() == base.time() < WALL_FLOOR and clock.wants_time
    base.advance(7.0)
    assert exchange(base, clock, rtt=0.8, at=0.1)
    assert not clock.wants_time and clock.time() >= WALL_FLOOR
    assert abs(clock.time() - endpoint_time(base)) <= 0.4 + 1e-6  # half the round trip
    base.advance(100.0)  # it runs on with the monotonic clock
    assert abs(clock.time() - endpoint_time(base)) <= 0.4 + 1e-6
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and lines[0].startswith("event=wall_clock_from_endpoint offset_s=")
    assert "rtt_ms=800" in lines[0]


def test_a_symmetric_exchange_gives_the_exact_time() -> None:
    base, clock = booted()
    assert exchange(base, clock, rtt=1.0, at=0.5)
    assert clock.time() == pytest.approx(endpoint_time(base), abs=1e-6)


def test_ntp_setting_the_system_clock_wins_and_nothing_more_is_learned() -> None:
    base, clock = booted()
    assert exchange(base, clock, rtt=0.2)
    base.step_wall(NOW + 3600.0 - base.time())  # NTP: another time than the endpoint's
    assert clock.time() == base.time()
    assert not exchange(base, clock, rtt=0.2)  # the system clock is set: nothing to learn
    assert clock.time() == base.time()
    # stepped back below the floor later (an operator, a bad NTP server): the offset learned
    # before NTP, now wrong by the time since, is not applied again; the clock is unset
    base.step_wall(BOOT - base.time())
    assert clock.time() == base.time() < WALL_FLOOR and clock.wants_time


def test_a_round_trip_too_long_to_tell_gives_no_time() -> None:
    base, clock = booted()
    assert not exchange(base, clock, rtt=walltime.RTT_MAX + 0.5)
    assert clock.wants_time and clock.time() == base.time()
    assert not clock.learn(NOW, clock.monotonic() + 1.0, clock.monotonic())  # negative
    assert exchange(base, clock, rtt=walltime.RTT_MAX)  # the bound itself is taken


@pytest.mark.parametrize("said", [math.nan, math.inf, -math.inf, 30.0, WALL_FLOOR - 1.0])
def test_a_hostile_or_unset_time_does_not_move_the_clock(
    said: float, caplog: pytest.LogCaptureFixture
) -> None:
    """The wire refuses these first (tests/unit/wire/test_ack_time.py); the clock refuses them
    too, for a caller that skipped it."""
    base, clock = booted()
    m = clock.monotonic()
    assert not clock.learn(said, m, m)
    assert not clock.learn(NOW, m, math.nan)
    assert clock.offset is None and clock.time() == base.time()
    assert any("event=endpoint_time_refused" in r.getMessage() for r in caplog.records)


def test_later_samples_are_smoothed_and_a_large_change_is_a_logged_step(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="agent.sync.walltime")
    base, clock = booted()
    assert exchange(base, clock, rtt=0.0)
    first = clock.offset
    assert first is not None
    m = clock.monotonic()
    assert clock.learn(endpoint_time(base) + 1.0, m, m)  # 1 s off: an eighth of it
    assert clock.offset == pytest.approx(first + walltime.GAIN * 1.0)
    assert len(caplog.records) == 1  # not per exchange
    assert clock.learn(endpoint_time(base) + 60.0, m, m)  # the endpoint was stepped
    assert clock.offset == pytest.approx(first + 60.0)
    assert len(caplog.records) == 2 and "change_s=59.875" in caplog.records[1].getMessage()


def test_the_offset_is_not_kept_across_a_restart() -> None:
    """A new clock (a new run) knows nothing: the monotonic origin may have changed."""
    base, clock = booted()
    assert exchange(base, clock, rtt=0.1)
    again = EndpointClock(base)
    assert again.wants_time and again.time() == base.time()
