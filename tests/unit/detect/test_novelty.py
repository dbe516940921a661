"""The PCA T²+Q novelty detector (agent/detect/novelty.py) on synthetic data with a known answer."""

from __future__ import annotations

import numpy as np
import pytest

from agent.detect.novelty import (
    NoveltyDetector,
    NoveltySettings,
    chi2_quantile,
    fit_pca,
    q_limit,
)

D = 6


def low_rank(n: int, seed: int, noise: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    """Two strong latent factors (std 3 and 2) in 6 dimensions plus isotropic noise."""
    rng = np.random.default_rng(seed)
    basis, _ = np.linalg.qr(np.random.default_rng(99).normal(size=(D, 2)))
    z = rng.normal(size=(n, 2)) * np.array([3.0, 2.0])
    x = z @ basis.T + noise * rng.normal(size=(n, D)) + np.arange(D)
    return x, basis


@pytest.mark.parametrize(
    ("p", "dof", "exact"),
    [(0.95, 1, 3.841459), (0.99, 2, 9.210340), (0.99, 5, 15.086272), (0.999, 10, 29.588298)],
)
def test_chi2_quantile_close_to_tables(p: float, dof: int, exact: float) -> None:
    assert chi2_quantile(p, dof) == pytest.approx(exact, rel=0.03)


def test_q_limit_of_equal_eigenvalues_is_scaled_chi2() -> None:
    # With r equal residual eigenvalues l, Q/l is chi-square with r dof.
    lam = np.full(4, 0.5)
    assert q_limit(lam, 0.99) == pytest.approx(0.5 * 13.2767, rel=0.03)


def test_t2_is_the_mahalanobis_distance_in_the_subspace() -> None:
    x, _ = low_rank(4000, seed=1)
    m = fit_pca(x, variance=0.9, standardize=False)
    assert m.k == 2
    cov = np.cov(x, rowvar=False)
    w, v = np.linalg.eigh(cov)
    top = np.argsort(w)[::-1][:2]
    probe = x[:50] + 0.3
    centred = probe - x.mean(axis=0)
    t2_ref = np.sum((centred @ v[:, top]) ** 2 / w[top], axis=1)
    resid = centred - (centred @ v[:, top]) @ v[:, top].T
    t2, q = m.statistics(probe)
    np.testing.assert_allclose(t2, t2_ref, rtol=1e-6)
    np.testing.assert_allclose(q, np.sum(resid**2, axis=1), rtol=1e-6)


def test_false_alarm_rates_match_alpha() -> None:
    x, _ = low_rank(5000, seed=2)
    m = fit_pca(x, variance=0.9, alpha=0.99)
    fresh, _ = low_rank(20000, seed=3)
    t2, q = m.statistics(fresh)
    assert np.mean(t2 > m.t2_limit) == pytest.approx(0.01, abs=0.005)
    assert np.mean(q > m.q_limit) == pytest.approx(0.01, abs=0.005)


def test_off_subspace_trips_q_and_far_along_it_trips_t2() -> None:
    x, basis = low_rank(5000, seed=4)
    m = fit_pca(x, variance=0.9, standardize=False)
    centre = x.mean(axis=0)
    normal_dir = np.linalg.svd(basis.T)[2][-1]  # orthogonal to both factors
    off = centre + 1.5 * normal_dir  # small, but 15x the noise, out of the plane
    along = centre + 15.0 * basis[:, 0]  # 5 sigma along the strongest factor
    t2_off, q_off = m.statistics(off)
    t2_along, q_along = m.statistics(along)
    assert q_off[0] > m.q_limit and t2_off[0] < m.t2_limit
    assert t2_along[0] > m.t2_limit and q_along[0] < m.q_limit


def test_fit_refuses_too_few_rows() -> None:
    with pytest.raises(ValueError):
        fit_pca(np.zeros((5, D)))
    with pytest.raises(ValueError):
        fit_pca(np.zeros((100, D)), standardize=False)


def test_detector_buffer_is_bounded_and_refits() -> None:
    s = NoveltySettings(buffer=300, min_samples=100, retrain_every=50)
    det = NoveltyDetector(s)
    x, _ = low_rank(1000, seed=5)
    assert det.score(x[0]) is None
    for v in x[:99]:
        det.observe(v)
    assert det.model is None
    det.observe(x[99])
    assert det.fits == 1 and det.model is not None
    for v in x[100:1000]:
        det.observe(v)
    assert len(det) == 300
    assert det.fits == 1 + 900 // 50
    assert det.model.samples == 300


def test_detector_follows_slow_change() -> None:
    """Retrained on recent normal history, it accepts a new operating point."""
    s = NoveltySettings(buffer=400, min_samples=100, retrain_every=100)
    det = NoveltyDetector(s)
    x, _ = low_rank(2000, seed=6)
    det.seed(x[:400])
    shifted = x[400:] + np.array([0, 0, 0, 0, 0, 5.0])
    assert det.score(shifted[0]).novel
    for v in shifted[:800]:
        det.observe(v)
    flagged = np.mean([det.score(v).novel for v in shifted[800:1600]])
    assert flagged < 0.05
