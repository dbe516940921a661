"""cloud/fedavg.py: FedAvg by hand, weights by samples, refusal of what cannot be averaged, and the
fleet threshold from score summaries (pooled quantile, exact for one summary)."""

from __future__ import annotations

import numpy as np
import pytest

from agent.wire.learning import QUANTILES, ModelUpdate, ScoreSummary
from cloud.fedavg import (
    THRESHOLD_MARGIN,
    THRESHOLD_QUANTILE,
    AggregationError,
    fedavg,
    fleet_threshold,
    pooled_moments,
    pooled_quantile,
)

SUMMARY = ScoreSummary.of(np.linspace(0.0, 1.0, 1001))


def update(
    delta: list[float] | np.ndarray, samples: int, job: int = 1, rnd: int = 3
) -> ModelUpdate:
    return ModelUpdate(job, rnd, samples, np.asarray(delta, dtype=np.float32), SUMMARY, 0.1)


def test_fedavg_by_hand() -> None:
    masters = np.array([1.0, 2.0, 3.0], dtype=np.float32)
    # (1 * [3, 0, 0] + 3 * [1, 4, -4]) / 4 = [1.5, 3, -3]
    new = fedavg(masters, [update([3, 0, 0], 1), update([1, 4, -4], 3)])
    np.testing.assert_allclose(new, [2.5, 5.0, 0.0], rtol=0, atol=1e-6)
    assert new.dtype == np.float32


def test_fedavg_weights_by_samples_and_caps_a_claimed_count() -> None:
    masters = np.zeros(2, dtype=np.float32)
    updates = [update([1.0, 0.0], 99), update([0.0, 1.0], 1)]
    np.testing.assert_allclose(fedavg(masters, updates), [0.99, 0.01], atol=1e-6)
    # a device that claims a million windows gets no more weight than max_samples
    updates = [update([1.0, 0.0], 1_000_000), update([0.0, 1.0], 100)]
    np.testing.assert_allclose(fedavg(masters, updates, max_samples=100), [0.5, 0.5], atol=1e-6)


def test_fedavg_of_one_update_applies_it() -> None:
    masters = np.array([0.5, -0.5], dtype=np.float32)
    np.testing.assert_allclose(fedavg(masters, [update([0.25, 0.25], 7)]), [0.75, -0.25])


def test_fedavg_of_decoded_uploads_is_the_float16_average() -> None:
    rng = np.random.default_rng(0)
    masters = rng.normal(size=50).astype(np.float32)
    sent = [update(rng.normal(scale=0.01, size=50), n) for n in (10, 30)]
    got = [ModelUpdate.from_cbor(u.to_cbor(), 50) for u in sent]
    expect = masters + (10 * got[0].delta + 30 * got[1].delta) / 40
    np.testing.assert_allclose(fedavg(masters, got), expect, atol=1e-6)


@pytest.mark.parametrize(
    ("updates", "what"),
    [
        ([], "no updates"),
        ([update([1.0, 2.0], 1)], "2 weights, the masters have 3"),
        ([update([1.0, np.nan, 0.0], 1)], "not finite"),
        ([update([1.0, np.inf, 0.0], 1)], "not finite"),
        ([update([1.0, 0.0, 0.0], 0)], "samples"),
        ([update([1.0, 0.0, 0.0], 1, rnd=3), update([1.0, 0.0, 0.0], 1, rnd=4)], "rounds"),
        ([update([1.0, 0.0, 0.0], 1, job=1), update([1.0, 0.0, 0.0], 1, job=2)], "rounds"),
    ],
)
def test_fedavg_refuses_what_cannot_be_averaged(updates: list[ModelUpdate], what: str) -> None:
    with pytest.raises(AggregationError, match=what):
        fedavg(np.zeros(3, dtype=np.float32), updates)


def test_fedavg_refuses_bad_masters() -> None:
    with pytest.raises(AggregationError, match="finite"):
        fedavg(np.array([0.0, np.nan, 0.0], dtype=np.float32), [update([0, 0, 0], 1)])
    with pytest.raises(AggregationError, match="1-D"):
        fedavg(np.zeros((3, 1), dtype=np.float32), [update([0, 0, 0], 1)])


# --- the fleet threshold --------------------------------------------------------------------------
def test_one_summary_gives_its_own_quantile_exactly() -> None:
    scores = np.random.default_rng(1).gamma(2.0, 0.2, 5000)
    s = ScoreSummary.of(scores)
    for p in QUANTILES:
        assert pooled_quantile([s], p) == pytest.approx(s.quantile(p), rel=1e-12)
    assert fleet_threshold([s]) == pytest.approx(
        s.quantile(THRESHOLD_QUANTILE) + THRESHOLD_MARGIN, rel=1e-12
    )


def test_identical_devices_pool_to_the_same_quantile() -> None:
    s = ScoreSummary.of(np.random.default_rng(2).gamma(2.0, 0.2, 800))
    assert pooled_quantile([s, s, s], 0.99) == pytest.approx(s.quantile(0.99), rel=1e-9)


def test_pooled_quantile_approximates_the_quantile_of_the_pooled_scores() -> None:
    rng = np.random.default_rng(3)
    devices = [rng.gamma(2.0, scale, n) for scale, n in ((0.1, 400), (0.2, 1200), (0.15, 300))]
    summaries = [ScoreSummary.of(s) for s in devices]
    pooled = np.concatenate(devices)
    for p in (0.9, 0.95, 0.99):
        # piecewise-linear CDFs between five quantiles: close, not exact
        assert pooled_quantile(summaries, p) == pytest.approx(np.quantile(pooled, p), rel=0.1)
    mean, std = pooled_moments(summaries)
    assert mean == pytest.approx(pooled.mean(), rel=1e-9)
    assert std == pytest.approx(pooled.std(), rel=1e-9)


def test_a_device_with_few_windows_moves_the_threshold_by_its_share_only() -> None:
    rng = np.random.default_rng(4)
    fleet = [ScoreSummary.of(rng.gamma(2.0, 0.2, 400)) for _ in range(10)]
    odd = ScoreSummary.of(rng.gamma(2.0, 2.0, 20))  # 20 windows, scores ten times larger
    base = fleet_threshold(fleet)
    assert base < fleet_threshold([*fleet, odd]) < 1.1 * base
    assert fleet_threshold([odd]) > 3 * base  # on its own it would set a far higher threshold


def test_empty_summaries_are_left_out_and_none_usable_is_an_error() -> None:
    empty = ScoreSummary.of(np.zeros(0))
    assert empty.n == 0
    assert fleet_threshold([SUMMARY, empty]) == pytest.approx(fleet_threshold([SUMMARY]))
    with pytest.raises(AggregationError, match="no summary"):
        fleet_threshold([empty])
    with pytest.raises(AggregationError, match="no summary"):
        fleet_threshold([])


def test_forged_summaries_are_refused() -> None:
    """Attack: a summary with negative or non-finite statistics (built in memory; the wire
    decoder refuses them too) must not produce a threshold."""
    bad = ScoreSummary(10, (0.1, 0.2, -0.3, 0.4, 0.5), 0.2, 0.1)
    with pytest.raises(AggregationError, match="negative"):
        fleet_threshold([SUMMARY, bad])
    nan = ScoreSummary(10, (0.1, 0.2, 0.3, float("nan"), 0.5), 0.2, 0.1)
    with pytest.raises(AggregationError, match="finite"):
        fleet_threshold([nan])
    with pytest.raises(AggregationError, match="all 0"):
        fleet_threshold([ScoreSummary.of(np.zeros(100))], margin=0.0)
    with pytest.raises(AggregationError, match="margin"):
        fleet_threshold([SUMMARY], margin=-0.1)
    with pytest.raises(AggregationError, match="p must be"):
        pooled_quantile([SUMMARY], 1.0)
