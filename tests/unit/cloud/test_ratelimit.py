"""The per-device token bucket of the endpoint (cloud/ratelimit.py): refill, burst, the Max-Age
it tells, batches larger than the burst, the bounded table, one log line per device per
interval. The clock is a number the tests set: no sleeps, no timing."""

from __future__ import annotations

import logging
from collections import Counter

import pytest
from aiocoap.numbers.codes import Code

from cloud import ratelimit
from cloud.protocol import Limits
from cloud.ratelimit import LOG_INTERVAL, MAX_AGE, DeviceRateLimit, RateLimited


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def limiter(rate: float = 10.0, burst: int = 100, **kw: int) -> tuple[DeviceRateLimit, Clock]:
    clock = Clock()
    return DeviceRateLimit(rate, burst, clock, **kw), clock


def test_a_new_device_has_the_whole_burst_then_the_rate() -> None:
    lim, clock = limiter(rate=10.0, burst=100)
    assert lim.wait("d", 60) == 0
    assert lim.wait("d", 40) == 0  # 100 taken: the burst
    assert lim.wait("d", 1) == 1  # empty: one record needs 0.1 s, told as 1 whole second
    clock.t += 0.5
    assert lim.wait("d", 5) == 0  # 0.5 s refilled 5
    assert lim.wait("d", 1) == 1
    clock.t += 1000.0  # a long quiet time refills to the burst, never beyond
    assert lim.wait("d", 100) == 0
    assert lim.wait("d", 1) == 1


def test_max_age_is_the_whole_seconds_until_the_batch_fits_and_nothing_is_taken_meanwhile() -> None:
    lim, clock = limiter(rate=10.0, burst=100)
    assert lim.wait("d", 100) == 0
    assert lim.wait("d", 35) == 4  # 35 tokens at 10/s: 3.5 s, rounded up
    assert lim.wait("d", 35) == 4  # the refusal took nothing
    clock.t += 3.0
    assert lim.wait("d", 35) == 1  # 30 there, 0.5 s to go
    clock.t += 1.0  # exactly the Max-Age told since the first refusal: it fits
    assert lim.wait("d", 35) == 0
    assert lim.wait("d", 6) == 1  # 5 left


def test_after_exactly_the_max_age_told_the_batch_is_taken() -> None:
    """Whatever the rate and batch, waiting the Max-Age told is enough (no float left short)."""
    for rate in (0.3, 1.0, 7.0, 1000.0, 333.3):
        for batch in (1, 7, 99, 100):
            lim, clock = limiter(rate=rate, burst=100)
            assert lim.wait("d", 100) == 0
            age = lim.wait("d", batch)
            assert age >= 1
            clock.t += age
            assert lim.wait("d", batch) == 0, (rate, batch, age)


def test_devices_have_buckets_of_their_own() -> None:
    lim, _ = limiter(rate=1.0, burst=10)
    assert lim.wait("a", 10) == 0
    assert lim.wait("a", 1) == 1
    assert lim.wait("b", 10) == 0  # another device: its own full bucket


def test_a_batch_larger_than_the_burst_goes_when_the_bucket_is_full_and_leaves_a_debt() -> None:
    """Never refused for ever (a device whose batch is over the burst would be stuck); the debt
    keeps the sustained rate."""
    lim, clock = limiter(rate=10.0, burst=100)
    assert lim.wait("d", 1) == 0
    assert lim.wait("d", 250) == 1  # 99 there: needs the whole burst, 0.1 s away
    clock.t += 1.0
    assert lim.wait("d", 250) == 0  # full: taken, 150 in debt
    assert lim.wait("d", 1) == 16  # 151 tokens at 10/s
    clock.t += 25.0
    assert lim.wait("d", 100) == 0  # 250 over 26 s of refill, about the rate


def test_an_empty_batch_and_a_rate_of_zero_take_nothing() -> None:
    lim, _ = limiter(rate=1.0, burst=1)
    assert lim.wait("d", 1) == 0
    assert lim.wait("d", 0) == 0
    off, _ = limiter(rate=0.0, burst=0)
    assert all(off.wait("d", 4096) == 0 for _ in range(100))
    assert len(off) == 0  # no bucket kept when off


def test_max_age_is_capped() -> None:
    """A rate so small that the wait overflows a float (serve --device-rate 1e-310 is a finite
    number the command line takes) raised OverflowError, answered 5.00 to every batch."""
    for rate in (0.001, 1e-310):
        lim, _ = limiter(rate=rate, burst=10)
        assert lim.wait("d", 10) == 0
        assert lim.wait("d", 10) == MAX_AGE


def test_the_table_is_bounded_least_recently_used_first() -> None:
    """Forged or many device ids cannot grow the table: at most max_devices buckets; the one
    dropped is the device seen longest ago (a device that goes on sending stays)."""
    lim, _ = limiter(rate=1.0, burst=10, max_devices=3)
    assert lim.wait("busy", 10) == 0
    for i in range(1000):
        lim.wait(f"forged-{i}", 1)
        assert lim.wait("busy", 1) == 1  # still empty: its bucket was kept
        assert len(lim) <= 3
    assert len(lim) == 3
    lim2, _ = limiter(rate=1.0, burst=10, max_devices=2)
    assert lim2.wait("old", 10) == 0
    lim2.wait("x", 1)
    lim2.wait("y", 1)  # "old" was the least recently used: dropped
    assert lim2.wait("old", 10) == 0  # a new bucket, full


def test_take_raises_503_with_max_age_counts_and_logs_once_per_interval(
    caplog: pytest.LogCaptureFixture,
) -> None:
    stats: Counter[str] = Counter()
    clock = Clock()
    lim = DeviceRateLimit(10.0, 100, clock, stats)
    lim.take("d", 100)
    lim.take("e", 100)
    caplog.set_level(logging.INFO, logger="cloud.server")
    with pytest.raises(RateLimited) as caught:
        lim.take("d", 20)
    failure = caught.value
    assert failure.code == Code.SERVICE_UNAVAILABLE
    assert failure.options == {"max_age": 2} and failure.max_age == 2
    assert not failure.warn  # not said again as a bad request
    for _ in range(50):  # a device that retries at once, many times: counted, not said
        with pytest.raises(RateLimited):
            lim.take("d", 20)
        with pytest.raises(RateLimited):
            lim.take("e", 30)  # another device: its own line
    lines = [r.getMessage() for r in caplog.records if "device_rate_limited" in r.getMessage()]
    assert len(lines) == 2
    assert "device=d " in lines[0] and "refused_batches=1 refused_records=20" in lines[0]
    assert "rate=10 burst=100" in lines[0] and "retry_in=2" in lines[0]
    assert stats == {"rate_limited_batches": 101, "rate_limited_records": 20 * 51 + 30 * 50}
    caplog.clear()
    clock.t += LOG_INTERVAL  # the next refusal after the interval says what came between
    lim.take("d", 100)  # refilled: taken
    with pytest.raises(RateLimited):
        lim.take("d", 20)
    (line,) = [r.getMessage() for r in caplog.records]
    assert "device=d " in line and "refused_batches=51 refused_records=1020" in line
    assert "since_s=60" in line


def test_bad_settings_are_refused() -> None:
    for rate, burst in ((-1.0, 10), (1.0, 0)):
        with pytest.raises(ValueError):
            DeviceRateLimit(rate, burst, Clock())


def test_serve_options_default_to_the_limits_and_pass_on_to_workers() -> None:
    from cloud.cli import build_parser

    args = build_parser().parse_args(["serve", "--data", "d"])
    assert ratelimit.limits_of(args) == Limits()
    assert (Limits().device_rate, Limits().device_burst) == (1000.0, 32768)
    args = build_parser().parse_args(
        ["serve", "--data", "d", "--device-rate", "2.5", "--device-burst", "50"]
    )
    limits = ratelimit.limits_of(args)
    assert (limits.device_rate, limits.device_burst) == (2.5, 50)
    again = build_parser().parse_args(["serve", "--data", "d", *ratelimit.worker_argv(args)])
    assert ratelimit.limits_of(again) == limits
    off = build_parser().parse_args(["serve", "--data", "d", "--device-rate", "0"])
    assert ratelimit.limits_of(off).device_rate == 0
    for bad in (["--device-rate", "-1"], ["--device-rate", "nan"], ["--device-burst", "0"]):
        with pytest.raises(SystemExit) as caught:
            build_parser().parse_args(["serve", "--data", "d", *bad])
        assert caught.value.code == 64
