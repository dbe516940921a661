"""cloud/learning.py, the check: a round's aggregate is the *candidate*, which the next round's
devices compare with the model the fleet runs (the incumbent); the coordinator publishes and
assigns it only if the median device finds it detects as many synthetic faults (cloud/fedavg.py
check), and a round after the last only checks.

In process, with the real coordinator on real SQLite storage, a real registry that signs with a
real key, the shipped int8 template (models/skab-ae.tflite) and float weights
(models/cloud/skab-ae.float32.tflite); the devices' uploads are built by hand and stored through
:func:`cloud.learnuploads.accept_upload`, as the endpoint stores them."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.learn.masters import load_master_file
from agent.modelstore.signing import SignedManifest
from agent.wire import records
from agent.wire.learning import (
    MAX_ROUND,
    LearningError,
    ModelUpdate,
    Recall,
    RoundTask,
    ScoreSummary,
    learn_key,
)
from cloud import fedavg
from cloud.learning import Coordinator
from cloud.learnjob import Job, JobError, JobSpec, JobState, masters_of
from cloud.learnuploads import UploadRefused, accept_upload
from cloud.models import ModelRegistry, entry_for
from cloud.storage import SQLiteStorage

ROOT = Path(__file__).resolve().parents[3]
TEMPLATE = ROOT / "models" / "skab-ae.tflite"
FLOAT = ROOT / "models" / "cloud" / "skab-ae.float32.tflite"
KEY = Ed25519PrivateKey.from_private_bytes(bytes([7]) * 32)
MODEL, ROLE, BASE = "skab-ae", "anomaly", "1.0.0"
P = 2404  # the weights of skab-ae
SAMPLES = 200  # each fake upload's windows
AS_GOOD, WORSE = Recall(0.9, 0.9), Recall(0.8, 0.9)  # the candidate's, then the incumbent's


def scores(rnd: int, i: int) -> ScoreSummary:
    """Device ``i``'s summary in round ``rnd``: each round's and device's its own."""
    return ScoreSummary.of(np.linspace(0.0, 0.3 * rnd + 0.05 * i, 201))


class Rig:
    """An endpoint's storage with ``devices`` registered and skab-ae 1.0.0 published."""

    def __init__(self, tmp: Path, devices: int) -> None:
        self.storage = SQLiteStorage.in_dir(tmp)
        self.now = 1_800_000_000.0
        self.devices = [f"pump-{i:02d}" for i in range(devices)]
        for d in self.devices:
            self.storage.add_device(d, self.now)
        registry = ModelRegistry(tmp / "models")  # SQLite's own model files
        registry.publish(TEMPLATE.read_bytes(), MODEL, BASE, entry_for(TEMPLATE), KEY)
        self.coordinator = Coordinator(self.storage, registry, KEY, clock=lambda: self.now)
        self.base_sha = masters_of(load_master_file(FLOAT), MODEL).sha256()

    def spec(self, **kw: Any) -> JobSpec:
        d: dict[str, Any] = dict(
            model=MODEL,
            role=ROLE,
            base=BASE,
            rounds=2,
            fraction=1.0,
            min_devices=len(self.devices),
            round_seconds=600.0,
        )
        return JobSpec(**(d | kw))

    def start(self, **kw: Any) -> int:
        return self.coordinator.start(self.spec(**kw), load_master_file(FLOAT)).id

    def job(self, job_id: int) -> Job:
        return self.coordinator.job(job_id)

    def task(self, device: str) -> RoundTask:
        entry = self.storage.desired(device).entries[learn_key(MODEL)]
        return RoundTask.from_value(entry.value)  # as the device decodes it

    def assigned(self, device: str) -> Any:
        entry = self.storage.desired(device).entries.get(f"model/{ROLE}")
        return None if entry is None else entry.value

    def update(
        self, job_id: int, i: int, *, weights: bool = True, recall: Recall | None = None
    ) -> ModelUpdate:
        rnd = self.job(job_id).st.round
        rng = np.random.default_rng(100 * rnd + i)
        delta = rng.normal(0.0, 0.01, P).astype(np.float32) if weights else None
        return ModelUpdate(job_id, rnd, SAMPLES, delta, scores(rnd, i), 0.1, recall)

    def upload(self, job_id: int, device: str, update: ModelUpdate) -> bool:
        return accept_upload(self.storage, device, update.to_cbor(), self.now)

    def play(self, job_id: int, recalls: list[Recall | None] | Recall | None = None) -> Job:
        """Every selected device uploads for the open round (``recalls``: each one's check, or
        one for all), weights unless the round only checks; then the round closes."""
        job = self.job(job_id)
        assert job.st.open
        only_checks = job.st.round > job.spec.rounds
        for i, device in enumerate(job.st.selected):
            recall = recalls[i] if isinstance(recalls, list) else recalls
            update = self.update(job_id, i, weights=not only_checks, recall=recall)
            assert self.upload(job_id, device, update)
        closed = self.coordinator.tick(job_id)
        assert not closed.st.open, "the round did not close"
        return closed

    def published(self) -> list[str]:
        return sorted(m.version for m in self.storage.models(MODEL))


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    r = Rig(tmp_path, 3)
    yield r
    r.storage.close()


def test_round_1_closes_with_nothing_published_and_round_2_checks_its_model(rig: Rig) -> None:
    job_id = rig.start()
    assert rig.coordinator.tick(job_id).st.open  # round 1 opens
    first = rig.task(rig.devices[0])
    assert (first.round, first.masters, first.check, first.epochs) == (1, rig.base_sha, None, 10)
    st = rig.play(job_id).st
    assert st.state == "running" and st.candidate == 1
    assert st.candidate_info == {"round": 1, "devices": 3, "samples": 3 * SAMPLES}
    assert st.incumbent == rig.base_sha and st.masters != rig.base_sha and st.version == ""
    assert rig.published() == [BASE]
    assert all(rig.assigned(d) is None for d in rig.devices)
    assert not {"check", "version", "threshold"} & set(st.history[0])

    assert rig.coordinator.tick(job_id).st.open  # round 2
    for d in rig.devices:
        t = rig.task(d)
        assert (t.round, t.masters, t.check, t.epochs) == (2, st.masters, rig.base_sha, 10)


def test_a_candidate_as_good_is_published_with_its_own_threshold_and_assigned_to_all(
    tmp_path: Path,
) -> None:
    """Four devices, two selected: every eligible one gets the model; its threshold is from
    the summaries of the round that checked it (of the candidate itself), not of round 1."""
    rig = Rig(tmp_path, 4)
    try:
        job_id = rig.start(fraction=0.5, min_devices=2)
        rig.coordinator.tick(job_id)
        candidate = rig.play(job_id).st.masters
        rig.coordinator.tick(job_id)
        st = rig.play(job_id, AS_GOOD).st
        version = f"{BASE}+fl{job_id}.1"
        assert rig.published() == [BASE, version] and st.version == version
        threshold = fedavg.fleet_threshold([scores(2, i) for i in range(2)])
        assert threshold != fedavg.fleet_threshold([scores(1, i) for i in range(2)])
        h = st.history[1]
        assert (h["version"], h["threshold"]) == (version, threshold)
        assert h["check"] == {
            "round": 1,
            "passed": True,
            "devices": 2,
            "recall": 0.9,
            "recall_incumbent": 0.9,
            "margin": 0.0,
        }
        manifest = SignedManifest.from_cbor(rig.storage.model(MODEL, version).manifest)
        assert manifest.entry["threshold"]["value"] == round(threshold, 6)
        assert manifest.entry["federated"] == {
            "job": job_id,
            "round": 1,
            "devices": 2,
            "samples": 2 * SAMPLES,
        }
        want = {"name": MODEL, "version": version, "sha256": manifest.sha256}
        assert [rig.assigned(d) for d in rig.devices] == [want] * 4
        assert st.incumbent == candidate and st.candidate == 2  # round 2's aggregate waits
    finally:
        rig.storage.close()


def test_a_candidate_worse_than_the_tolerance_is_dropped_and_masters_roll_back(
    rig: Rig,
) -> None:
    job_id = rig.start(rounds=3)
    rig.coordinator.tick(job_id)
    rig.play(job_id)
    rig.coordinator.tick(job_id)
    st = rig.play(job_id, WORSE).st
    h = st.history[1]
    assert h["check"] == {
        "round": 1,
        "passed": False,
        "devices": 3,
        "recall": 0.8,
        "recall_incumbent": 0.9,
        "margin": -0.1,
    }
    assert h["dropped"] is True and "version" not in h and "threshold" not in h
    assert rig.published() == [BASE] and all(rig.assigned(d) is None for d in rig.devices)
    assert st.masters == st.incumbent == rig.base_sha
    assert (st.candidate, st.candidate_info, st.version) == (0, {}, "")
    rig.coordinator.tick(job_id)  # round 3 starts again from the incumbent, nothing to check
    t = rig.task(rig.devices[0])
    assert (t.round, t.masters, t.check, t.epochs) == (3, rig.base_sha, None, 10)


@pytest.mark.parametrize(("recall", "version"), [(AS_GOOD, "1.0.0+fl1.1"), (WORSE, "")])
def test_after_the_last_round_a_round_only_checks_and_then_the_job_is_done(
    rig: Rig, recall: Recall, version: str
) -> None:
    job_id = rig.start(rounds=1)
    rig.coordinator.tick(job_id)
    st = rig.play(job_id).st
    assert (st.state, st.candidate) == ("running", 1)
    assert rig.coordinator.tick(job_id).st.open
    t = rig.task(rig.devices[0])
    assert (t.round, t.epochs, t.evaluate, t.check) == (2, 0, True, rig.base_sha)
    st = rig.play(job_id, recall).st
    assert (st.state, st.round, st.version, st.candidate) == ("done", 2, version, 0)
    assert [h["round"] for h in st.history] == [1, 2] and "dropped" not in st.history[1]
    assert rig.published() == sorted({BASE, version} - {""})
    assert rig.coordinator.tick(job_id).st.state == "done"  # nothing more opens


def test_the_round_that_only_checks_asks_devices_that_trained_in_the_job(tmp_path: Path) -> None:
    """A device answers no more rounds that only check than it has rounds charged: the last
    round's check is opened among the devices that uploaded in the job's training rounds, at
    the job's fraction of them (a device registered since, or never selected, would refuse)."""
    rig = Rig(tmp_path, 4)
    try:
        job_id = rig.start(rounds=1, fraction=0.5, min_devices=2)
        rig.coordinator.tick(job_id)
        trained = set(rig.job(job_id).st.selected)
        assert len(trained) == 2
        rig.play(job_id)
        rig.storage.add_device("pump-new", rig.now)
        job = rig.coordinator.tick(job_id)
        assert job.st.round == 2 and set(job.st.selected) == trained
    finally:
        rig.storage.close()


@pytest.mark.parametrize(
    ("rounds", "weights", "recall", "why"),
    [
        (1, True, AS_GOOD, "only checks: the update must carry no weights"),
        (2, False, AS_GOOD, "trains: the update has no weights"),
        (2, True, None, "checks the masters: the update has no recall"),
    ],
    ids=["weights-in-a-check-only-round", "no-weights-in-a-training-round", "no-recall"],
)
def test_an_upload_that_is_not_what_the_round_asks_is_refused_4_00(
    rig: Rig, rounds: int, weights: bool, recall: Recall | None, why: str
) -> None:
    job_id = rig.start(rounds=rounds)
    rig.coordinator.tick(job_id)
    if weights or recall is None:  # the refusals of round 2 (rounds 1: check-only; 2: checked)
        rig.play(job_id)
        rig.coordinator.tick(job_id)
    update = rig.update(job_id, 0, weights=weights, recall=recall)
    with pytest.raises(UploadRefused, match=why) as refused:
        rig.upload(job_id, rig.devices[0], update)
    assert refused.value.code == "4.00"
    assert rig.storage.learn_update_devices(job_id, rig.job(job_id).st.round) == []


def test_a_job_stored_before_the_check_assigns_each_round_at_its_close(rig: Rig) -> None:
    """A job document without the state keys incumbent, candidate, candidate_info and the
    spec keys gate, tolerance (as a coordinator before the check stored it), resumed."""
    masters = masters_of(load_master_file(FLOAT), MODEL)
    rig.storage.put_learn_blob(masters.sha256(), masters.to_cbor())

    def legacy(job_id: int) -> bytes:
        d = records.loads(Job(job_id, rig.spec(), JobState(masters=masters.sha256())).to_cbor())
        for key in ("incumbent", "candidate", "candidate_info"):
            del d["state"][key]
        for key in ("gate", "tolerance"):
            del d["spec"][key]
        return records.dumps(d)

    job_id = rig.storage.create_learn_job(MODEL, legacy, rig.now)
    assert rig.coordinator.job(job_id).spec.gate is False  # learn status --json says so
    for rnd in (1, 2):
        rig.coordinator.tick(job_id)
        t = rig.task(rig.devices[0])
        assert (t.round, t.check) == (rnd, None)
        st = rig.play(job_id).st  # weights, no recall: as devices before the check upload
        version = f"{BASE}+fl{job_id}.{rnd}"
        h = st.history[-1]
        assert (st.version, h["version"]) == (version, version) and "check" not in h
        assert h["threshold"] == fedavg.fleet_threshold([scores(rnd, i) for i in range(3)])
        assert rig.assigned(rig.devices[2])["version"] == version
    assert st.state == "done" and [h["round"] for h in st.history] == [1, 2]
    assert rig.published() == [BASE, f"{BASE}+fl{job_id}.1", f"{BASE}+fl{job_id}.2"]


def test_a_base_version_too_long_for_a_checked_task_is_refused_unless_the_gate_is_off(
    rig: Rig,
) -> None:
    base = "1.0.0+" + "b" * 58  # 64 characters, a valid version name
    with pytest.raises(JobError, match="a shorter version name, or --no-gate"):
        rig.spec(base=base).check()
    rig.spec(base=base, gate=False).check()


def test_a_checked_job_leaves_room_for_the_round_after_the_last(rig: Rig) -> None:
    """A job of MAX_ROUND rounds was accepted with the gate on: its check round, MAX_ROUND + 1,
    is a task no device decodes, which the endpoint refuses as a desired value: every tick after
    the last round raised StateError (``learn start`` and ``learn resume`` died there), and the
    last round's model was never assigned."""
    with pytest.raises(LearningError, match="round"):
        RoundTask.from_value(
            RoundTask(
                1, MAX_ROUND + 1, BASE, "a" * 64, 0, 0, 2e-3, 0.0, 0.3, 0.5, "b" * 64
            ).to_value()
        )
    with pytest.raises(JobError, match="rounds"):
        rig.spec(rounds=MAX_ROUND).check()
    rig.spec(rounds=MAX_ROUND - 1).check()
    rig.spec(rounds=MAX_ROUND, gate=False).check()  # no round after the last


@pytest.mark.parametrize(
    ("honest", "liar", "passed", "margin"),
    [(WORSE, Recall(1.0, 0.0), False, -0.1), (AS_GOOD, Recall(0.0, 1.0), True, 0.0)],
    ids=["cannot-pass-a-worse-model", "cannot-fail-a-good-model"],
)
def test_one_lying_device_of_five_does_not_decide_the_check(
    tmp_path: Path, honest: Recall, liar: Recall, passed: bool, margin: float
) -> None:
    rig = Rig(tmp_path, 5)
    try:
        job_id = rig.start()
        rig.coordinator.tick(job_id)
        rig.play(job_id)
        rig.coordinator.tick(job_id)
        st = rig.play(job_id, [honest] * 4 + [liar]).st
        check = st.history[1]["check"]
        assert (check["passed"], check["devices"], check["margin"]) == (passed, 5, margin)
        assert rig.published() == sorted([BASE] + [f"{BASE}+fl{job_id}.1"] * passed)
    finally:
        rig.storage.close()


def test_a_check_round_closed_again_after_a_crash_publishes_the_same_version_once(
    rig: Rig,
) -> None:
    """The coordinator died after publishing and assigning the candidate but before it saved
    the job (``_close`` ran, the document is the one before it): resumed, the round closes
    again to the version published, and the job goes on."""
    job_id = rig.start()
    rig.coordinator.tick(job_id)
    rig.play(job_id)
    rig.coordinator.tick(job_id)
    for i, device in enumerate(rig.job(job_id).st.selected):
        rig.upload(job_id, device, rig.update(job_id, i, recall=AS_GOOD))
    lost = rig.job(job_id)
    rig.coordinator._close(lost, rig.now)  # published and assigned; never saved
    version = f"{BASE}+fl{job_id}.1"
    assert rig.published() == [BASE, version] and rig.job(job_id).st.open
    st = rig.coordinator.tick(job_id).st
    assert st.version == version and not st.open and st.candidate == 2
    assert [h["round"] for h in st.history] == [1, 2] and st.history[1]["check"]["passed"]
    assert rig.published() == [BASE, version]
    assert rig.assigned(rig.devices[0])["version"] == version


def test_the_check_passes_at_exactly_the_tolerance_and_fails_without_answers() -> None:
    at = fedavg.check([Recall(0.75, 1.0)], tolerance=0.25)
    assert (at.passed, at.devices, at.margin) == (True, 1, -0.25)
    assert not fedavg.check([Recall(0.5, 1.0)], tolerance=0.25).passed
    none = fedavg.check([])
    assert (none.passed, none.devices) == (False, 0) and np.isnan(none.margin)
    # in the job's history as None, never NaN (learn status --json stays JSON)
    assert none.to_value() == {
        "passed": False,
        "devices": 0,
        "recall": None,
        "recall_incumbent": None,
        "margin": None,
    }
    # fractions k/n whose difference is the tolerance in decimal, not in binary
    assert 0.88 - 0.90 < -0.02 and fedavg.check([Recall(0.88, 0.90)], tolerance=0.02).passed


def test_a_device_named_twice_in_devices_is_one_device_of_the_quorum(rig: Rig) -> None:
    """``--devices pump-00,pump-00 --min-devices 2``: the eligible list held pump-00 twice, so
    the round selected it twice, closed on its one upload and published a model of one
    device's update, under a quorum of 2. Now a device counts once: 1 eligible device, 2
    needed, the job fails as with any fleet too small for its quorum."""
    twice = (rig.devices[0], rig.devices[0])
    job_id = rig.start(gate=False, rounds=1, min_devices=2, devices=twice)
    job = rig.coordinator.tick(job_id)
    assert job.st.state == "failed" and job.st.error == "1 eligible devices, 2 needed"
    assert rig.published() == [BASE]
    spec = rig.spec(min_devices=1, devices=(*twice, rig.devices[1], "pump-99"))
    assert rig.coordinator.eligible(spec) == rig.devices[:2]


@pytest.mark.parametrize(("field", "name"), [("role", "a b"), ("role", ""), ("model", "9skab")])
def test_a_role_or_model_no_desired_key_can_name_is_refused_at_start(
    rig: Rig, field: str, name: str
) -> None:
    """``learn start --role 'a b'`` (or a model named ``9skab``, a valid model name) was
    accepted; the desired key ``model/a b`` (``learn/9skab``) is none a device can be given, so
    the round's close published the version and then raised StateError at the assignment (the
    first tick, writing ``learn/9skab``), at that tick and at every ``learn resume``: the job
    stuck running, its devices' privacy spent on a round that never ended. Now refused first."""
    spec = rig.spec(gate=False, **{field: name})
    with pytest.raises(JobError, match=f"--{field}"):
        spec.check()


def test_a_base_version_too_long_for_the_versions_a_job_publishes_is_refused(rig: Rig) -> None:
    """With --no-gate a 64-character base version passed: the first round's close then made
    ``<base>+fl<job>.<round>``, longer than a version may be, and raised ModelError at its
    publish, at that tick and at every ``learn resume`` (the job stuck after its devices had
    trained and spent privacy). Now refused at start, as the check's task size is."""
    base = "1.0." + "9" * 60  # 64 characters, a valid version name
    with pytest.raises(JobError, match="a shorter version name"):
        rig.spec(base=base, gate=False).check()
    rig.spec(base="1.0." + "9" * 40, gate=False).check()  # room for +fl<job>.<round>
