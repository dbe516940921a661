"""A selected learning device that lies (audit learn_poison.py): its score summary cannot set the
fleet threshold and its update cannot wreck the published weights (cloud/fedavg.py,
cloud/learnuploads.py accept_upload). Real SQLite storage, the endpoint's own checks."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from agent.learn.privacy import privatize
from agent.wire.learning import QUANTILES, Masters, ModelUpdate, ScoreSummary, parameter_count
from cloud import fedavg
from cloud.learnjob import Job, JobSpec, JobState
from cloud.learnuploads import UploadRefused, accept_upload, norm_bound
from cloud.storage import SQLiteStorage

SIZES = (8, 4, 8)
P = parameter_count(SIZES)
HONEST = ScoreSummary(200, tuple(0.2 + 0.1 * i for i in range(len(QUANTILES))), 0.3, 0.1)


def test_a_huge_claimed_count_with_huge_scores_does_not_set_the_threshold() -> None:
    """Attack: n = 2**31 with every quantile at 1e6 (pooled by n uncapped, it set the
    threshold near 1e6); also a plausible-looking liar at 100x the fleet's scores."""
    fleet = [HONEST] * 9
    base = fedavg.fleet_threshold(fleet)
    wild = ScoreSummary(2**31, tuple(1e6 for _ in QUANTILES), 1e6, 0.0)
    assert fedavg.fleet_threshold([*fleet, wild]) == pytest.approx(base)
    liar = ScoreSummary(2**31, tuple(50.0 + i for i in range(len(QUANTILES))), 50.0, 1.0)
    poisoned = fedavg.fleet_threshold([*fleet, liar])
    assert poisoned < 2 * base  # it weighs as the median device: about a tenth of the pool
    mean, _ = fedavg.pooled_moments([*fleet, liar])
    assert mean == pytest.approx((9 * HONEST.mean + liar.mean) / 10)  # one share of ten


def test_honest_devices_keep_their_counts_as_weights() -> None:
    a = ScoreSummary(400, HONEST.quantiles, 0.3, 0.1)
    b = ScoreSummary(1200, tuple(q * 1.5 for q in HONEST.quantiles), 0.45, 0.15)
    mean, _ = fedavg.pooled_moments([a, b, HONEST])
    assert mean == pytest.approx((400 * 0.3 + 1200 * 0.45 + 200 * 0.3) / 1800)


@pytest.fixture
def job(tmp_path: Path) -> tuple[SQLiteStorage, int, float]:
    s = SQLiteStorage.in_dir(tmp_path)
    now = time.time()
    devices = ["pump-01", "pump-02"]
    for d in devices:
        s.add_device(d, now)
    m = Masters("skab-ae", SIZES, np.zeros(P, np.float32))
    s.put_learn_blob(m.sha256(), m.to_cbor())
    spec = JobSpec("skab-ae", "detector", "1.0.0", 3, 1.0, 2, 600.0)
    st = JobState(round=1, open=True, selected=devices, deadline=now + 600, masters=m.sha256())
    job_id = s.create_learn_job("skab-ae", lambda j: Job(j, spec, st).to_cbor(), now)
    yield s, job_id, now
    s.close()


def test_an_update_longer_than_clip_and_noise_allow_is_refused(
    job: tuple[SQLiteStorage, int, float],
) -> None:
    """Attack: every weight of the delta at 6e4 (within the wire's |value| bound); FedAvg made
    the published weights ~3e4. Refused 4.00 at upload; an honest privatized update passes."""
    s, job_id, now = job
    spec = JobSpec("skab-ae", "detector", "1.0.0", 3, 1.0, 2, 600.0)
    rng = np.random.default_rng(7)
    honest = privatize(rng.normal(0, 1, P), spec.clip, spec.noise, rng)
    up = ModelUpdate(job_id, 1, 200, honest.astype(np.float32), HONEST, 0.1)
    assert accept_upload(s, "pump-01", up.to_cbor(), now)
    evil = ModelUpdate(job_id, 1, 2048, np.full(P, 6.0e4, np.float32), HONEST, 0.0)
    with pytest.raises(UploadRefused, match="L2 norm") as refused:
        accept_upload(s, "pump-02", evil.to_cbor(), now)
    assert refused.value.code == "4.00"


def test_honest_privatized_updates_stay_within_the_bound() -> None:
    """clip + noise x clip x (sqrt(P) + 6): the noise's norm is about noise x clip x sqrt(P),
    within about noise x clip / 2 of it, so 6 is more than 8 of its standard deviations."""
    rng = np.random.default_rng(11)
    for p in (P, 1000, 20000):
        bound = norm_bound(0.3, 0.5, p)
        for _ in range(200):
            delta = privatize(rng.normal(0, 10, p), 0.3, 0.5, rng).astype(np.float16)
            assert np.linalg.norm(delta.astype(np.float64)) < bound


@pytest.mark.parametrize("gate", [False, True])
def test_hostile_summaries_that_set_no_threshold_fail_the_job_rather_than_every_tick(
    tmp_path: Path, gate: bool
) -> None:
    """Attack: every selected device uploads a well-formed update whose score summary counts no
    score (n 0; or each statistic above MAX_PLAUSIBLE_SCORE). The round's close found no
    threshold for the model it publishes: AggregationError out of tick, at every tick and
    every ``learn resume``, the job stuck running. Now the job fails, saying why, with nothing
    published or assigned."""
    from tests.unit.cloud.test_learning_check import AS_GOOD, BASE, Rig

    rig = Rig(tmp_path, 2)
    try:
        job_id = rig.start(gate=gate, rounds=1)
        rig.coordinator.tick(job_id)
        if gate:  # round 1 trains honestly; round 2 checks its model, with hostile summaries
            rig.play(job_id)
            rig.coordinator.tick(job_id)
        st = rig.job(job_id).st
        void = ScoreSummary(0, tuple(0.1 for _ in QUANTILES), 0.1, 0.0)
        huge = ScoreSummary(200, tuple(2000.0 for _ in QUANTILES), 2000.0, 0.0)
        for i, (device, summary) in enumerate(zip(st.selected, (void, huge), strict=True)):
            u = rig.update(job_id, i, weights=not gate, recall=AS_GOOD if gate else None)
            hostile = ModelUpdate(u.job, u.round, u.samples, u.delta, summary, u.loss, u.recall)
            assert rig.upload(job_id, device, hostile)
        for _ in range(2):  # and again, as a resumed coordinator ticks it
            job = rig.coordinator.tick(job_id)
        assert job.st.state == "failed" and not job.st.open
        assert "no summary counts any score" in job.st.error
        assert rig.published() == [BASE]
        assert all(rig.assigned(d) is None for d in rig.devices)
    finally:
        rig.storage.close()
