"""agent/learn/local.py: the device's round recipe. Training lowers the local loss, the update is
clipped to the task's bound, a seeded run repeats bit for bit, and the score summary is the one of
the detector's own scores (the real Detector, fed the same rows, with the same weights)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

from agent.detect.detector import Detector
from agent.detect.features import FeatureSpec, calibrate, transform, windows
from agent.learn.autoencoder import DenseAutoencoder
from agent.learn.local import (
    corrupt,
    local_update,
    recent,
    score_summary,
    split,
    train_local,
    window_scores,
)
from agent.wire.learning import ModelUpdate, RoundTask, ScoreSummary

SPEC = FeatureSpec()  # 4 steps x 8 channels: 32 inputs
LEVEL = np.array([0.21, 0.27, 2.4, 0.1, 89.0, 28.0, 229.0, 125.0])
NOISE = np.array([0.002, 0.002, 0.45, 0.25, 0.1, 0.01, 10.0, 0.5])
SHA = "ab" * 32


def task(**kw: float) -> RoundTask:
    d = dict(
        job=1,
        round=1,
        base="skab-ae",
        masters=SHA,
        deadline=0.0,
        epochs=3,
        lr=2e-3,
        mu=0.01,
        clip=1.0,
        noise=0.0,
    )
    d.update(kw)
    return RoundTask(**d)  # type: ignore[arg-type]


def model(seed: int = 0) -> DenseAutoencoder:
    return DenseAutoencoder.initial(32, 16, 4, np.random.default_rng(seed))


def rows(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    slow = np.cumsum(rng.normal(size=(n, 1)), axis=0) * 0.02  # a shared slow wander
    return LEVEL + NOISE * (rng.normal(size=(n, 8)) + slow)


def device_windows(n: int = 700, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """(rows, windows of every row from the span on) under the commissioning scaler."""
    r = rows(n, seed)
    return r, windows(SPEC, transform(SPEC, calibrate(SPEC, r), r))


@dataclass
class Float:
    """The detector's Inference seam around a numpy autoencoder."""

    m: DenseAutoencoder
    name: str = "float"
    runtime: str = "numpy"

    def predict(self, x: np.ndarray) -> np.ndarray:
        return self.m.forward(np.asarray(x, dtype=np.float32).reshape(len(x), -1))


def test_local_update_lowers_the_local_loss() -> None:
    _, w = device_windows()
    start = model()
    up = local_update(start, w, task(epochs=5, clip=100.0), np.random.default_rng(0), denoise=False)
    train, _ = split(w)
    flat = train.reshape(len(train), -1)
    after = start.with_vector(start.to_vector() + up.delta)
    assert after.loss(flat) < start.loss(flat)
    assert up.samples == len(train)
    assert 0 < up.loss < start.loss(flat)


def test_denoising_training_lowers_the_clean_reconstruction_loss() -> None:
    _, w = device_windows()
    start = model()
    trained = train_local(start, w, 4, 2e-3, np.random.default_rng(1))
    flat = w.reshape(len(w), -1)
    assert trained.model.loss(flat) < start.loss(flat)
    assert len(trained.epoch_losses) == 4 and trained.samples == len(w)


def test_update_is_clipped_to_the_bound_without_noise() -> None:
    _, w = device_windows()
    for clip in (1e-3, 0.05):
        up = local_update(model(), w, task(clip=clip), np.random.default_rng(2))
        norm = float(np.linalg.norm(up.delta.astype(np.float64)))
        assert norm <= clip
        assert norm == pytest.approx(clip, rel=1e-4)  # training moves further than that


def test_noise_is_added_when_the_task_asks() -> None:
    _, w = device_windows()
    quiet = local_update(model(), w, task(clip=0.01), np.random.default_rng(3))
    noisy = local_update(model(), w, task(clip=0.01, noise=2.0), np.random.default_rng(3))
    extra = (noisy.delta - quiet.delta).astype(np.float64)
    assert np.std(extra) == pytest.approx(2.0 * 0.01, rel=0.15)


def test_seeded_rng_repeats_the_upload_bit_for_bit() -> None:
    _, w = device_windows()
    bodies = {
        local_update(model(), w, task(noise=0.5), np.random.default_rng(7)).to_cbor()
        for _ in range(2)
    }
    assert len(bodies) == 1
    other = local_update(model(), w, task(noise=0.5), np.random.default_rng(8)).to_cbor()
    assert other not in bodies
    decoded = ModelUpdate.from_cbor(bodies.pop(), model().parameter_count)
    assert (decoded.job, decoded.round) == (1, 1)


def test_score_summary_is_the_summary_of_the_detectors_scores() -> None:
    r, w = device_windows()
    m = model(5)
    det = Detector(Float(m), SPEC, threshold=1.0, raise_after=5, clear_after=20)
    scores = det.feed(np.arange(len(r), dtype=float), r).scores
    n = SPEC.commissioning
    assert np.all(np.isnan(scores[:n])) and np.all(np.isfinite(scores[n:]))
    mine = w[n - SPEC.span :]  # window i ends at row i + span
    np.testing.assert_allclose(window_scores(m, mine), scores[n:], rtol=1e-5, atol=1e-6)
    expect = ScoreSummary.of(scores[n:])
    got = score_summary(m, mine)
    assert got.n == expect.n
    np.testing.assert_allclose(got.quantiles, expect.quantiles, rtol=1e-5)
    assert got.mean == pytest.approx(expect.mean, rel=1e-5)
    # the upload carries the summary of the masters on the held-out (newest) windows
    up = local_update(m, mine, task(), np.random.default_rng(0))
    held = split(mine)[1]
    assert up.scores.n == len(held)
    np.testing.assert_allclose(
        up.scores.quantiles, ScoreSummary.of(scores[-len(held) :]).quantiles, rtol=1e-5
    )


def test_memory_is_bounded_by_max_windows() -> None:
    _, w = device_windows(900)
    up = local_update(model(), w, task(epochs=1), np.random.default_rng(0), max_windows=100)
    assert up.samples == len(split(recent(w, 100))[0]) == 75
    np.testing.assert_array_equal(recent(w, 100), w[-100:])


def test_flat_windows_as_the_detector_hands_them_on_give_the_same_upload() -> None:
    _, w = device_windows()
    flat = w.reshape(len(w), -1)
    a = local_update(model(), w, task(noise=0.5), np.random.default_rng(4)).to_cbor()
    b = local_update(model(), flat, task(noise=0.5), np.random.default_rng(4)).to_cbor()
    assert a == b


def test_split_holds_out_the_newest_windows() -> None:
    w = np.arange(10 * 32, dtype=np.float32).reshape(10, 4, 8)
    train, held = split(w)
    np.testing.assert_array_equal(held, w[-3:])
    np.testing.assert_array_equal(train, w[:-3])
    one = w[:1]
    assert split(one)[0] is one and split(one)[1] is one
    with pytest.raises(ValueError):
        split(w, 1.0)


def test_corruption_shifts_one_channel_over_all_steps_within_the_clip() -> None:
    clean = np.zeros((2000, 32), dtype=np.float32)
    x = corrupt(clean, np.random.default_rng(0), 8)
    assert np.max(np.abs(x)) <= 8.0
    changed = (x != 0).reshape(2000, 4, 8)
    hit = changed.any(axis=(1, 2))
    assert 0.9 < hit.mean() < 0.99
    assert np.all(changed[hit].sum(axis=1).max(axis=1) == 4)  # all 4 steps of one channel
    assert np.all(changed[hit].any(axis=1).sum(axis=1) == 1)


@pytest.mark.parametrize(
    "bad", [np.zeros((5, 31)), np.zeros((5, 3, 8)), np.full((5, 4, 8), np.nan), np.zeros((0, 4, 8))]
)
def test_bad_or_no_windows_are_refused(bad: np.ndarray) -> None:
    with pytest.raises(ValueError):
        local_update(model(), bad, task(), np.random.default_rng(0))
