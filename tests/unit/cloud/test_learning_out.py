"""cloud/learning.py: selected devices that say they will not upload. A device reports, under
``learn/<model>``, a final status for the (job, round, deadline) it was given
(agent/learn/client.py ``_set``), or its state sync names the desired ``learn/<model>`` version
it refused in ``desired/errors`` (agent/sync/statedata.py ``errors_report``); the coordinator
closes the round as soon as every selected device uploaded or is out, and opens it again at once
when the quorum cannot be met any more.

As tests/unit/cloud/test_learning_check.py: the real coordinator on real SQLite storage, real
signing and the shipped model; the devices' reports go through the storage as the endpoint stores
them (``put_reported``), their uploads through :func:`cloud.learnuploads.accept_upload`."""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.sync.statedata import Failure, error_text, errors_report
from agent.wire import learning as wire_learning
from agent.wire import records
from agent.wire.learning import LearningError, Recall, learn_key
from agent.wire.statedoc import Entry, show
from cloud.learncli import _print
from cloud.learning import MAX_ATTEMPTS, Coordinator
from cloud.learnjob import NOT_APPLIED, out_of_round
from cloud.storebase import StorageUnavailable
from tests.unit.cloud.test_learning_check import MODEL, Rig

KEY = learn_key(MODEL)
#: the keys of a round task before the check (agent/wire/learning.py at 5bb6db3^)
KEYS_BEFORE_CHECK = ("job", "round", "base", "masters", "deadline", "epochs", "lr", "mu")
KEYS_BEFORE_CHECK += ("clip", "noise")


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    r = Rig(tmp_path, 3)
    yield r
    r.storage.close()


class Reports:
    """Each device's reported-state versions (the device numbers its own, increasing)."""

    def __init__(self, rig: Rig) -> None:
        self.rig = rig
        self.version = 1000

    def put(self, device: str, key: str, value: Any) -> None:
        self.version += 1
        self.rig.storage.put_reported(device, {key: Entry(self.version, value)}, self.rig.now)

    def status(self, device: str, status: str, **extra: Any) -> None:
        """``learn/<model>`` as the client reports the round its desired task names."""
        task = self.rig.task(device)
        value = {
            "job": task.job,
            "round": task.round,
            "deadline": math.ceil(task.deadline),
            "status": status,
            **extra,
            "epsilon_spent": 11.599,
        }
        self.put(device, KEY, value)

    def refused_task(self, device: str, version: int | None = None) -> None:
        """``desired/errors`` of a device of a release before the check, given a task with
        ``check``: its state sync refused that desired version (agent/sync/state.py _apply)."""
        entry = self.rig.storage.desired(device).entries[KEY]
        try:  # what that release's RoundTask.from_value said
            wire_learning._map(entry.value, "round task", KEYS_BEFORE_CHECK)
        except LearningError as err:
            why = f"desired state: {KEY}: expected a round task (docs/learning.md): {err}"
        else:
            raise AssertionError("the task has no check")
        error = error_text(f"{why}, got {show(entry.value)}")
        failed = {KEY: Failure(entry.version if version is None else version, error)}
        self.put(device, "desired/errors", errors_report(failed))


def two_of_three_uploaded(rig: Rig) -> tuple[int, Reports, str]:
    """A job needing two uploads, round 1 open, the first two devices uploaded: the job, the
    reports' writer and the third device."""
    a, b, c = rig.devices
    job_id = rig.start(min_devices=2)
    rig.coordinator.tick(job_id)
    upload(rig, job_id, a)
    upload(rig, job_id, b)
    return job_id, Reports(rig), c


def holding_a_task(rig: Rig) -> list[str]:
    """The devices whose desired learn/<model> holds a task (not absent, not withdrawn)."""
    held = (rig.storage.desired(d).entries.get(KEY) for d in rig.devices)
    return [d for d, e in zip(rig.devices, held, strict=True) if e is not None and e.value]


def upload(rig: Rig, job_id: int, device: str, recall: Recall | None = None) -> None:
    i = rig.devices.index(device)
    assert rig.upload(job_id, device, rig.update(job_id, i, recall=recall))


def test_a_round_closes_once_every_selected_device_uploaded_or_is_out(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    job_id, reports, c = two_of_three_uploaded(rig)
    reports.status(c, "training", windows=2048)
    assert rig.coordinator.tick(job_id).st.open  # c may still upload: waited for
    reports.status(c, "refused", error="privacy budget: 200 spent")
    with caplog.at_level(logging.INFO, logger="cloud.learning"):
        job = rig.coordinator.tick(job_id)  # long before the deadline
    assert not job.st.open and job.st.round == 1
    h = job.st.history[-1]
    assert (h["uploads"], h["missing"], h["out"], h["early"]) == (2, [c], {"refused": 1}, True)
    assert "event=learn_round_closed_early job=1 round=1 attempt=0 uploads=2 out=1" in caplog.text


def test_a_device_out_of_the_round_is_said_while_the_round_is_open(
    rig: Rig, capsys: pytest.CaptureFixture[str]
) -> None:
    c = rig.devices[2]
    job_id = rig.start(min_devices=2)
    reports = Reports(rig)
    rig.coordinator.tick(job_id)
    reports.status(c, "failed", error="the masters do not take these windows")
    job = rig.coordinator.tick(job_id)
    assert job.st.open and job.st.out == {c: "failed"}
    assert job.summary()["out_counts"] == {"failed": 1}
    _print(job)
    assert "round 1/2 open, 1/3 selected out (failed 1)" in capsys.readouterr().out


def test_the_round_opens_again_at_once_when_the_quorum_cannot_be_met(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Two of four devices selected, two uploads needed: one selected device's attempt expired
    (its training paused under load until its own deadline). Without it the round cannot reach
    its quorum: it opens again at once, and the device that may still upload is selected again
    (left out, its upload would be refused 4.03 after it spent privacy on it)."""
    rig = Rig(tmp_path, 4)
    try:
        reports = Reports(rig)
        job_id = rig.start(min_devices=2, fraction=0.5)
        first = rig.coordinator.tick(job_id)
        gone, going = first.st.selected
        reports.status(gone, "expired")
        reports.status(going, "training")
        with caplog.at_level(logging.INFO, logger="cloud.learning"):
            job = rig.coordinator.tick(job_id)  # the clock has not moved
        assert job.st.open and (job.st.round, job.st.attempt) == (1, 1)
        assert going in job.st.selected and len(job.st.selected) == 2
        assert math.ceil(job.st.deadline) > math.ceil(first.st.deadline)  # tells them apart
        assert job.st.reopened == [
            {"attempt": 0, "uploads": 0, "out": {"expired": 1}, "early": True}
        ]
        assert (
            "event=learn_round_reopened job=1 round=1 received=0 needed=2 early=true out=1 "
            "why=expired:1"
        ) in caplog.text
        for device in job.st.selected:
            upload(rig, job_id, device)
        closed = rig.coordinator.tick(job_id)
        assert not closed.st.open
        assert closed.st.history[-1]["reopened"] == job.st.reopened
    finally:
        rig.storage.close()


def test_a_job_whose_devices_all_refuse_fails_without_waiting_for_deadlines(rig: Rig) -> None:
    """Every eligible device's privacy budget is spent: each refuses round 1. A refusal stands
    for every attempt of its round (agent/learn/client.py _done: the device does not take it
    again, nor report it again), so the same devices, selected again, are out at once."""
    job_id = rig.start(min_devices=2)
    reports = Reports(rig)
    rig.coordinator.tick(job_id)
    for device in rig.devices:
        reports.status(device, "refused", error="privacy budget: 200 spent")
    for attempt in range(1, MAX_ATTEMPTS):
        job = rig.coordinator.tick(job_id)
        assert job.st.open and job.st.attempt == attempt
        assert job.st.out == {}
    job = rig.coordinator.tick(job_id)
    assert job.st.state == "failed"
    assert job.st.error == (
        f"round 1: 0 uploads before the deadline, 3 selected devices out (refused:3), "
        f"2 needed, {MAX_ATTEMPTS} attempts"
    )


def test_a_report_of_an_earlier_attempt_or_another_job_does_not_count(rig: Rig) -> None:
    """After the deadline the round opens again with a later deadline; c's report of the first
    attempt (expired) and reports naming another job or round are not about this attempt: c is
    waited for until it reports this one."""
    a, b, c = rig.devices
    job_id = rig.start(min_devices=2)
    reports = Reports(rig)
    rig.coordinator.tick(job_id)
    reports.status(c, "expired")
    rig.now += 601.0
    again = rig.coordinator.tick(job_id)  # nobody uploaded: open again
    assert (again.st.attempt, set(again.st.selected)) == (1, set(rig.devices))
    upload(rig, job_id, a)
    upload(rig, job_id, b)
    # c's report still names the first attempt's deadline
    assert rig.coordinator.tick(job_id).st.open
    deadline = math.ceil(again.st.deadline)
    for job, rnd in ((job_id + 1, 1), (job_id, 2)):  # another job, another round: same deadline
        base = {"job": job, "round": rnd, "deadline": deadline, "status": "failed"}
        reports.put(c, KEY, base)
        assert rig.coordinator.tick(job_id).st.open
    reports.status(c, "failed", error="the running model's windows do not fit")
    closed = rig.coordinator.tick(job_id)
    assert not closed.st.open and closed.st.history[-1]["out"] == {"failed": 1}


HOSTILE = [
    None,
    "refused",
    ["refused"],
    12,
    {"job": True, "round": True, "status": "refused"},  # True == 1: not an id
    {"job": 1.0, "round": 1, "status": "refused"},
    {"job": 1, "round": 1, "status": ["refused"]},
    {"job": 1, "round": 1, "status": "REFUSED"},
    {"job": 1, "round": 1, "status": "uploaded"},  # no upload stored: not out
    {"job": 1, "round": 1, "status": "expired", "deadline": "soon"},
    {"job": 1, "round": 1, "status": "expired", "deadline": 2**70},
    {"job": 2**70, "round": 1, "status": "refused"},
    {"job": 1, "round": 1, "status": "x" * 6000},
    {"job": {"job": 1}, "round": 1, "status": "refused"},
    {1: 2, (1, 2): {"a": [1]}, "status": "refused"},
    [[[[[[[[[[[[[["refused"]]]]]]]]]]]]]],
]
HOSTILE_ERRORS = [
    "learn/skab-ae",
    {KEY: None},
    {KEY: {"version": True}},
    {KEY: {"version": "3"}},
    {KEY: {"version": 3.0}},
    {KEY: [3]},
    {KEY: {"version": 2**70}},
    [{KEY: {"version": 3}}],
]


def test_hostile_reported_values_are_not_reasons(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    """A device writes its own reported state: any shape, type or size (within the endpoint's
    limits). The coordinator reads each of them, raises nothing and takes nobody out; then the
    device's own plain refusal closes the round."""
    job_id, reports, c = two_of_three_uploaded(rig)
    for value in HOSTILE:
        reports.put(c, KEY, value)
        for errors in HOSTILE_ERRORS:
            reports.put(c, "desired/errors", errors)
            job = rig.coordinator.tick(job_id)
            assert job.st.open and job.st.out == {}, (value, errors)
    rig.storage.db.execute(  # damaged at rest: read back as a raw value
        "UPDATE reported SET value = X'ffff' WHERE device = ? AND key = ?", (c, KEY)
    )
    assert rig.coordinator.tick(job_id).st.open
    reports.status(c, "refused", error="privacy budget: 200 spent")
    assert not rig.coordinator.tick(job_id).st.open
    assert "Traceback" not in caplog.text


@pytest.mark.parametrize("value", HOSTILE)
@pytest.mark.parametrize("errors", HOSTILE_ERRORS)
def test_out_of_round_reads_any_value(value: Any, errors: Any) -> None:
    reported = {KEY: Entry(1, value), "desired/errors": Entry(1, errors)}
    assert out_of_round(reported, MODEL, 1, 1, 1_800_000_600.0, 3) is None


def test_a_device_of_a_release_before_the_check_that_refuses_the_task_is_out(rig: Rig) -> None:
    """Round 2 checks round 1's model: its task carries ``check``, which a release before the
    check does not know. Its state sync refuses that desired version and names it in
    desired/errors (the learning client never sees the task; learn/<model> still says round 1
    uploaded). That refusal, at the version the coordinator wrote, takes it out; one of an
    earlier version does not."""
    a, b, c = rig.devices
    job_id = rig.start(min_devices=2)
    reports = Reports(rig)
    rig.coordinator.tick(job_id)
    rig.play(job_id)  # round 1: all three upload; no check yet
    reports.status(c, "uploaded", bytes=4962)  # round 1's
    job = rig.coordinator.tick(job_id)
    assert job.st.round == 2 and rig.task(c).check is not None
    written = rig.storage.desired(c).entries[KEY].version
    assert job.st.versions[c] == written
    upload(rig, job_id, a, Recall(0.9, 0.9))
    upload(rig, job_id, b, Recall(0.9, 0.9))
    reports.refused_task(c, version=written - 1)  # an older task's refusal
    assert rig.coordinator.tick(job_id).st.open
    reports.refused_task(c)
    closed = rig.coordinator.tick(job_id)
    assert not closed.st.open and closed.st.round == 2
    assert closed.st.history[-1]["out"] == {NOT_APPLIED: 1}


def test_a_job_stored_before_this_keeps_running(rig: Rig) -> None:
    """A job document written before the coordinator kept versions, out and reopened (an open
    round): read with none, its refusals by learn/<model> still count."""
    a, b, c = rig.devices
    job_id = rig.start(min_devices=2)
    reports = Reports(rig)
    job = rig.coordinator.tick(job_id)
    doc = records.loads(job.to_cbor())
    for name in ("versions", "out", "reopened"):
        del doc["state"][name]
    assert rig.storage.update_learn_job(job_id, job.rev, records.dumps(doc), rig.now)
    assert rig.coordinator.job(job_id).st.versions == {}
    upload(rig, job_id, a)
    upload(rig, job_id, b)
    written = rig.storage.desired(c).entries[KEY].version
    reports.put(c, "desired/errors", errors_report({KEY: Failure(written, "refused")}))
    assert rig.coordinator.tick(job_id).st.open  # no version known: not out by desired/errors
    reports.status(c, "failed", error="the masters do not take these windows")
    assert not rig.coordinator.tick(job_id).st.open


def test_a_device_whose_task_something_else_replaced_is_waited_for(rig: Rig) -> None:
    """A second coordinator of the job (`learn resume` run twice) or an operator wrote the
    device's learn/<model> after this coordinator did: the device reports the task it had as
    ``withdrawn``, with this attempt's deadline, and goes on with the task that replaced it,
    which may be this very round's. Was: counted out, so the round closed (or opened again)
    without the upload it was about to get. ``withdrawn`` takes no device out."""
    job_id, reports, c = two_of_three_uploaded(rig)
    reports.status(c, "withdrawn", reason="withdrawn by the endpoint")
    job = rig.coordinator.tick(job_id)
    assert job.st.open and job.st.out == {}


def test_a_second_coordinator_whose_save_fails_writes_no_task(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two coordinators tick one job (`learn resume` run twice): both read it before either
    saved, and both open round 1 at their own time. Was: each wrote its task (its own deadline)
    to the devices before its compare-and-set save, so the one whose save failed left the
    devices with a task the job does not hold (another deadline, another desired version).
    Now the tasks are written only after the save that opened the attempt succeeded."""
    job_id = rig.start()
    stale = rig.job(job_id)
    other = Coordinator(
        rig.storage, rig.coordinator.registry, rig.coordinator.key, clock=lambda: rig.now + 30.0
    )
    first = rig.coordinator.tick(job_id)  # opens round 1 and writes its tasks
    assert first.st.open
    monkeypatch.setattr(other, "job", lambda _id: stale)  # read before the first one saved
    other.tick(job_id)  # opens it too, at its own time; its save fails
    job = rig.job(job_id)
    assert job.rev == first.rev and job.st.deadline == first.st.deadline
    for device in job.st.selected:
        assert rig.task(device).deadline == job.st.deadline
        assert rig.storage.desired(device).entries[KEY].version == job.st.versions[device]


def test_a_coordinator_stopped_between_opening_a_round_and_writing_its_tasks_writes_them(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`learn start` killed after the save that opened round 1 and before the tasks went: the
    next tick (`learn resume`) writes them."""
    job_id = rig.start()

    def killed(job: Any, now: float) -> Any:
        raise KeyboardInterrupt

    monkeypatch.setattr(rig.coordinator, "_write_tasks", killed)
    with pytest.raises(KeyboardInterrupt):
        rig.coordinator.tick(job_id)
    monkeypatch.undo()
    job = rig.job(job_id)
    assert job.st.open and not job.st.written
    assert all(KEY not in rig.storage.desired(d).entries for d in job.st.selected)
    job = rig.coordinator.tick(job_id)
    assert job.st.written and job.st.open
    for device in job.st.selected:
        assert rig.task(device).deadline == job.st.deadline


def test_stopping_a_job_withdraws_its_round_from_the_devices_that_did_not_upload(
    rig: Rig,
) -> None:
    """`learn stop` during a round. Was: the selected devices kept its task, trained until its
    deadline, charged their privacy ledgers and uploaded into a job that refused them (4.03).
    Now the task is withdrawn (null) from each selected device that did not upload, unless its
    desired learn/<model> is by then another job's task."""
    a, b, c = rig.devices
    job_id = rig.start()
    rig.coordinator.tick(job_id)
    upload(rig, job_id, a)
    theirs = dataclasses.replace(rig.task(c), job=99)  # another job of the same model
    rig.storage.put_desired(c, {KEY: theirs.to_value()}, rig.now)
    rig.coordinator.stop(job_id)
    assert rig.task(a).job == job_id  # uploaded: nothing to cancel
    assert rig.storage.desired(b).entries[KEY].value is None
    assert rig.task(c) == theirs


def test_a_job_that_fails_withdraws_its_last_attempt(rig: Rig) -> None:
    job_id = rig.start(min_devices=2)
    reports = Reports(rig)
    rig.coordinator.tick(job_id)
    for device in rig.devices:
        reports.status(device, "refused", error="privacy budget: 200 spent")
    for _ in range(MAX_ATTEMPTS):
        job = rig.coordinator.tick(job_id)
    assert job.st.state == "failed"
    assert all(rig.storage.desired(d).entries[KEY].value is None for d in job.st.selected)


def test_a_job_stopped_while_its_round_s_tasks_are_written_leaves_no_task(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`learn stop` (another process) runs while the coordinator writes round 1's tasks, after
    the save that opened it. Was: stop withdrew what was written so far, then the coordinator
    wrote the rest (its save failing after), so devices held the task of a stopped job: they
    trained, charged their privacy ledgers and were refused 4.03. Now a coordinator that finds
    the job ended when it saves withdraws the tasks it wrote."""
    job_id = rig.start()
    real = rig.storage.put_desired
    stopped: list[Any] = []

    def put_desired(device: str, changes: Any, now: float, **kw: Any) -> Any:
        if KEY in changes and changes[KEY] is not None and not stopped:
            stopped.append(Coordinator(rig.storage, clock=lambda: rig.now).stop(job_id))
        return real(device, changes, now, **kw)

    monkeypatch.setattr(rig.storage, "put_desired", put_desired)
    job = rig.coordinator.tick(job_id)
    assert stopped and stopped[0].st.state == "stopped"
    assert job.st.state == "stopped"
    assert holding_a_task(rig) == []


def test_a_coordinator_that_read_the_job_before_it_was_stopped_writes_no_task(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The job is stopped between the save that opened round 1 and the coordinator's read of it
    for the writes. Was: the stopped job's tasks were written (and saved as written)."""
    job_id = rig.start()
    real_job = rig.coordinator.job
    reads: list[int] = []

    def job(_id: int) -> Any:
        reads.append(_id)
        if len(reads) == 2:  # the read after the save that opened the round
            Coordinator(rig.storage, clock=lambda: rig.now).stop(_id)
        return real_job(_id)

    monkeypatch.setattr(rig.coordinator, "job", job)
    job_ = rig.coordinator.tick(job_id)
    assert job_.st.state == "stopped"
    assert holding_a_task(rig) == []


def test_learn_stop_again_withdraws_what_a_storage_error_left(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The storage fails while `learn stop` withdraws the round's tasks, after the job was saved
    as stopped. Was: running `learn stop` again found the job stopped and did nothing, so the
    devices not reached kept the task of a stopped job (trained, charged, refused 4.03). Now
    stopping a job that is stopped or failed withdraws again."""
    job_id = rig.start()
    rig.coordinator.tick(job_id)
    real = rig.storage.put_desired

    def put_desired(device: str, changes: Any, now: float, **kw: Any) -> Any:
        raise StorageUnavailable("the database is locked")

    monkeypatch.setattr(rig.storage, "put_desired", put_desired)
    with pytest.raises(StorageUnavailable):
        rig.coordinator.stop(job_id)
    monkeypatch.setattr(rig.storage, "put_desired", real)
    assert rig.job(job_id).st.state == "stopped"
    assert rig.coordinator.stop(job_id).st.state == "stopped"
    assert holding_a_task(rig) == []
