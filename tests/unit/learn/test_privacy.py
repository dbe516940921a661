"""Clipping, the Gaussian mechanism and the RDP accountant (agent/learn/privacy.py)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from agent.learn.privacy import (
    Accountant,
    add_gaussian_noise,
    clip_update,
    noise_for_epsilon,
    privatize,
)

finite32 = st.floats(-1e6, 1e6, width=32, allow_nan=False, allow_infinity=False)
updates = st.one_of(
    hnp.arrays(np.float32, st.integers(1, 64), elements=finite32),
    hnp.arrays(np.float64, st.integers(1, 64), elements=st.floats(-1e6, 1e6)),
)
norms = st.floats(1e-3, 1e3)


def norm64(x: np.ndarray) -> float:
    return float(np.linalg.norm(x.astype(np.float64)))


@given(updates, norms)
@example(np.full(3, 1e6, np.float32), 1e-3)
@settings(max_examples=300, deadline=None)
def test_clipping_never_exceeds_max_norm(delta: np.ndarray, max_norm: float) -> None:
    clipped = clip_update(delta, max_norm)
    assert clipped.dtype == delta.dtype
    assert norm64(clipped) <= max_norm
    if norm64(delta) > max_norm:  # scaled down, direction kept
        assert norm64(clipped) == pytest.approx(max_norm, rel=1e-5)
        np.testing.assert_allclose(
            clipped, delta * (max_norm / norm64(delta)), rtol=1e-5, atol=1e-6 * max_norm
        )


@given(updates, norms)
@settings(max_examples=200, deadline=None)
def test_small_updates_pass_unchanged(delta: np.ndarray, max_norm: float) -> None:
    small = delta if norm64(delta) <= max_norm else delta * (0.5 * max_norm / norm64(delta))
    small = small.astype(delta.dtype)
    if norm64(small) > max_norm:  # float rounding of the rescale; nothing to test then
        return
    np.testing.assert_array_equal(clip_update(small, max_norm), small)


@pytest.mark.parametrize("bad", [np.array([1.0, np.nan]), np.array([np.inf, 0.0])])
def test_non_finite_updates_are_refused(bad: np.ndarray) -> None:
    """A diverged local training must not be uploaded: NaN makes the clipping bound vacuous."""
    with pytest.raises(ValueError, match="non-finite"):
        clip_update(bad, 1.0)


def test_noise_has_the_stated_standard_deviation() -> None:
    """std = noise_multiplier * max_norm. With n = 400 000 samples the sample std has a relative
    standard error of 1/sqrt(2n) ~ 0.11 %; the bound is 1 % (about 9 standard errors) and the seed
    is fixed, so this is deterministic, not flaky."""
    n, max_norm, z = 400_000, 0.5, 1.3
    delta = np.linspace(-0.001, 0.001, n, dtype=np.float32)
    noised = add_gaussian_noise(delta, max_norm, z, np.random.default_rng(2024))
    noise = noised.astype(np.float64) - delta
    assert noised.dtype == np.float32
    assert np.std(noise) == pytest.approx(z * max_norm, rel=0.01)
    assert abs(np.mean(noise)) < 5 * z * max_norm / math.sqrt(n)


def test_privatize_clips_before_noising() -> None:
    delta = np.full(10_000, 3.0, np.float32)  # norm 300
    out = privatize(delta, 1.0, 0.01, np.random.default_rng(1))
    # the clipped update has norm 1 (each coordinate 0.01); noise adds std 0.01 per coordinate
    assert np.mean(out) == pytest.approx(0.01, abs=1e-3)


def epsilon(z: float, rounds: int, delta: float = 1e-5, **kwargs: float) -> float:
    acc = Accountant(z, delta, **kwargs)
    acc.step(rounds)
    return acc.epsilon()


def test_epsilon_grows_with_rounds() -> None:
    acc = Accountant(1.1, 1e-5)
    assert acc.epsilon() == 0.0
    seen = []
    for _ in range(50):
        acc.step()
        seen.append(acc.epsilon())
    assert all(a < b for a, b in itertools.pairwise(seen))
    assert acc.rounds == 50
    assert epsilon(1.1, 50) == seen[-1]


def test_epsilon_falls_with_noise() -> None:
    values = [epsilon(z, 20) for z in (0.5, 0.8, 1.0, 2.0, 4.0, 10.0, 50.0)]
    assert all(a > b for a, b in itertools.pairwise(values))


def test_epsilon_at_one_order_is_the_closed_form() -> None:
    """sigma 2, 3 rounds, order 2: RDP = 3 * 2 / (2 * 2^2) = 0.75; epsilon = 0.75 + ln(1e5) / 1."""
    acc = Accountant(2.0, 1e-5)
    acc.step(3)
    assert acc.epsilon_at(2.0) == pytest.approx(0.75 + 11.512925464970229, rel=1e-12)
    # replace adjacency (sensitivity 2) at order 2: RDP = 3 * 2 * 4 / (2 * 4) = 3
    acc2 = Accountant(2.0, 1e-5, sensitivity=2.0)
    acc2.step(3)
    assert acc2.epsilon_at(2.0) == pytest.approx(3.0 + 11.512925464970229, rel=1e-12)


@pytest.mark.parametrize(("z", "rounds"), [(0.7, 1), (1.0, 10), (2.0, 100), (5.0, 1000)])
def test_grid_epsilon_is_near_the_continuous_optimum(z: float, rounds: int) -> None:
    """Over all real orders, a*alpha + L/(alpha-1) (a = rounds/(2 z^2), L = ln(1/delta)) is least
    at alpha = 1 + sqrt(L/a), where it is a + 2 sqrt(a L). The grid can only do as well or worse,
    and it is dense enough to be within 0.5 %."""
    a, big_l = rounds / (2 * z * z), math.log(1e5)
    best = a + 2 * math.sqrt(a * big_l)
    got = epsilon(z, rounds)
    assert best * (1 - 1e-12) <= got <= best * 1.005


def test_sensitivity_two_is_half_the_noise() -> None:
    assert epsilon(3.0, 7, sensitivity=2.0) == pytest.approx(epsilon(1.5, 7), rel=1e-12)


@given(st.floats(0.2, 20.0), st.integers(1, 500), st.sampled_from([1e-5, 1e-6, 1e-3]))
@settings(max_examples=40, deadline=None)
def test_noise_for_epsilon_meets_the_target_and_is_smallest(
    target: float, rounds: int, delta: float
) -> None:
    z = noise_for_epsilon(target, rounds, delta)
    assert epsilon(z, rounds, delta) <= target
    assert epsilon(z * (1 - 1e-5), rounds, delta) > target


def test_noise_for_epsilon_refuses_an_unreachable_target() -> None:
    with pytest.raises(ValueError, match="out of reach"):
        noise_for_epsilon(1e-9, 1, 1e-5)


@pytest.mark.parametrize(
    "kwargs",
    [{"noise_multiplier": 0.0, "delta": 1e-5}, {"noise_multiplier": 1.0, "delta": 1.0}],
)
def test_accountant_refuses_meaningless_parameters(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        Accountant(**kwargs)
