"""Retention of the federated-learning uploads (cloud/learnuploads.py ``prune_uploads``, the
storage's ``delete_learn_updates``; docs/ops.md "Retention"): a prune (cloud/prunecli.py ``prune``,
what both ``prune`` and ``serve --retain-days`` run) removes the old uploads nothing reads any more
and keeps those a round's close or the check round may still read.

Job documents are written as the coordinator writes them (``Job.to_cbor``) on both backends (the
fixtures of tests/unit/cloud/test_storage_contract.py); the coordinator's own rounds run on the
rig of tests/unit/cloud/test_learning_check.py (SQLite, the real coordinator, registry and
signing). No timing assertions."""

from __future__ import annotations

import dataclasses
import json
import logging
import sqlite3
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.exits import EX_DATAERR
from agent.wire import records
from agent.wire.learning import ModelUpdate, Recall, ScoreSummary
from cloud import cli, dashlearn, prunecli
from cloud.learning import Coordinator
from cloud.learnjob import Job, JobError, JobSpec, JobState
from cloud.learnuploads import UploadRefused, accept_upload, prune_uploads
from cloud.retention import DAY, PruneResult, day_start
from cloud.storage import SQLiteStorage, Storage
from tests.unit.cloud.test_learning_check import AS_GOOD, BASE, Rig, rig
from tests.unit.cloud.test_storage_contract import T0, Backend, backend

__all__ = ["backend", "rig"]  # the fixtures, used by name

OLD = T0 - 3 * DAY  # received three days before T0
BEFORE = T0 - DAY  # prune(BEFORE): what was received before midnight of T0 - 1 day goes
SPEC = JobSpec("skab-ae", "anomaly", BASE, 3, 1.0, 1, 600.0, gate=False)
DEVICES = ("pump-a", "pump-b")


def entry(rnd: int) -> dict[str, Any]:
    """A closed round's history entry, as cloud/learning.py ``_close`` writes it."""
    return {
        "round": rnd,
        "attempts": 1,
        "selected": 2,
        "uploads": 2,
        "refused": [],
        "missing": [],
        "samples": 400,
        "closed": OLD + rnd,
        "threshold": 0.5 + rnd,
        "version": f"{BASE}+fl1.{rnd}",
    }


def add_job(s: Storage, st: JobState, *, gate: bool = False) -> int:
    spec = dataclasses.replace(SPEC, gate=gate)
    if gate:
        st = dataclasses.replace(st, incumbent=st.incumbent or "ab" * 32)
    return s.create_learn_job(spec.model, lambda n: Job(n, spec, st).to_cbor(), OLD)


def upload(s: Storage, job: int, rnd: int, when: float, devices: tuple[str, ...] = DEVICES) -> None:
    for device in devices:
        assert s.put_learn_update(job, rnd, device, b"upload %d" % rnd, when)


def stored(s: Storage) -> set[tuple[int, int, str]]:
    """(job, round, device) of every upload stored."""
    return {(int(r[0]), int(r[1]), r[2]) for r in s.dump("learn_updates", None, 10_000)}


def storage_args(backend: Backend, tmp_path: Path) -> list[str]:
    """The command line's options naming ``backend``'s storage."""
    if backend.name == "sqlite":
        return ["--data", str(Path(backend.target).parent)]
    return ["--data", str(tmp_path), "--storage", backend.target]


@pytest.fixture
def s(backend: Backend) -> Storage:
    return backend.open()


@pytest.mark.parametrize("state", ["done", "failed", "stopped"])
def test_the_old_uploads_of_an_ended_job_go_and_the_newer_stay(s: Storage, state: str) -> None:
    job = add_job(s, JobState(state=state, round=3, history=[entry(1), entry(2)]))
    upload(s, job, 1, OLD)
    upload(s, job, 2, day_start(BEFORE) - 1, ("pump-a",))  # the last second before the cutoff
    upload(s, job, 2, day_start(BEFORE), ("pump-b",))  # the first second after it: kept
    upload(s, job, 3, T0)
    result = prunecli.prune(s, BEFORE)
    assert result.learn_uploads == 3
    assert stored(s) == {(job, 2, "pump-b"), (job, 3, "pump-a"), (job, 3, "pump-b")}
    assert prunecli.prune(s, BEFORE).learn_uploads == 0  # nothing more to remove


@pytest.mark.parametrize("open_", [True, False], ids=["current-round-open", "just-closed"])
def test_a_running_job_keeps_its_current_round_and_loses_its_earlier_old_ones(
    s: Storage, open_: bool
) -> None:
    """The current round's uploads stay however old (its close reads them, also when a crash
    makes it run again: cloud/learnuploads.py ``uploads_read_from``); the rounds before it were
    closed by a save before the document named this round, so nothing reads theirs."""
    history = [entry(1), entry(2)] + ([] if open_ else [entry(3)])
    job = add_job(s, JobState(round=3, open=open_, selected=list(DEVICES), history=history))
    upload(s, job, 1, OLD)
    upload(s, job, 2, OLD, ("pump-a",))
    upload(s, job, 2, T0, ("pump-b",))  # received after the cutoff: kept
    upload(s, job, 3, OLD)
    other = add_job(s, JobState(state="done", round=1, history=[entry(1)]))
    upload(s, other, 1, OLD)
    assert prunecli.prune(s, BEFORE, dry_run=True).learn_uploads == 5
    assert len(stored(s)) == 8  # a dry run changes nothing
    assert prunecli.prune(s, BEFORE).learn_uploads == 5
    assert stored(s) == {(job, 2, "pump-b"), (job, 3, "pump-a"), (job, 3, "pump-b")}


def test_a_running_job_with_the_check_keeps_its_training_rounds_until_it_ends(s: Storage) -> None:
    """The round after the last only checks, and it is opened (and opened again) among the
    devices that uploaded in the job's training rounds (cloud/learning.py Coordinator._open
    reads their uploads): a running job with the check keeps them all; ended, they go."""
    job = add_job(s, JobState(round=3, open=True, history=[entry(1), entry(2)]), gate=True)
    for rnd in (1, 2, 3):
        upload(s, job, rnd, OLD)
    assert prunecli.prune(s, BEFORE).learn_uploads == 0
    assert len(stored(s)) == 6
    row = s.learn_job(job)
    assert row is not None
    ended = Job.from_row(row)
    ended.st.state, ended.st.open = "done", False
    assert s.update_learn_job(job, ended.rev, ended.to_cbor(), T0)
    assert prunecli.prune(s, BEFORE).learn_uploads == 6
    assert stored(s) == set()


def test_a_damaged_job_document_keeps_its_uploads(
    s: Storage, backend: Backend, caplog: pytest.LogCaptureFixture
) -> None:
    """A file or a row corrupted at rest: a job document that is not CBOR, and one that is CBOR
    but not a job. Their uploads stay (nothing can tell which rounds are read), each is logged
    once per prune without a traceback, and the other jobs are pruned as usual."""
    broken = s.create_learn_job("skab-ae", lambda n: b"\xff\x00 not cbor", OLD)
    odd = s.create_learn_job("skab-ae", lambda n: records.dumps({"spec": 1, "state": []}), OLD)
    ended = add_job(s, JobState(state="done", round=1, history=[entry(1)]))
    for job in (broken, odd, ended):
        upload(s, job, 1, OLD)
    with caplog.at_level(logging.INFO):
        result = prunecli.prune(s, BEFORE)
    assert result.learn_uploads == 2
    assert {job for job, _, _ in stored(s)} == {broken, odd}
    skipped = [r for r in caplog.records if "event=learn_prune_skipped" in r.getMessage()]
    assert [r.getMessage().split()[1] for r in skipped] == [f"job={broken}", f"job={odd}"]
    assert all(r.levelno == logging.WARNING and r.exc_info is None for r in skipped)
    assert "Traceback" not in caplog.text


def _status(backend: Backend, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> str:
    argv = storage_args(backend, tmp_path)
    assert cli.main(["learn", "status", *argv]) == 0
    text = capsys.readouterr().out
    assert cli.main(["learn", "status", *argv, "--json"]) == 0
    return text + capsys.readouterr().out


def test_learn_status_says_the_same_after_the_prune(
    s: Storage, backend: Backend, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A job's history is in its document, not in its uploads: ``learn status`` (text and
    JSON) of an ended job and of a running one prints the same before and after a prune that
    removed their uploads."""
    done = add_job(s, JobState(state="done", round=2, history=[entry(1), entry(2)]))
    running = add_job(s, JobState(round=2, open=True, selected=list(DEVICES), history=[entry(1)]))
    for job in (done, running):
        upload(s, job, 1, OLD)
        upload(s, job, 2, OLD)
    before = _status(backend, tmp_path, capsys)
    assert "round 1: 2/2 uploads, 400 windows, assigned 1.0.0+fl1.1" in before
    assert prunecli.prune(s, BEFORE).learn_uploads == 6
    assert stored(s) == {(running, 2, "pump-a"), (running, 2, "pump-b")}
    assert _status(backend, tmp_path, capsys) == before


def test_a_prune_removes_a_bounded_number_per_transaction_and_stops_between(s: Storage) -> None:
    job = add_job(s, JobState(state="done", round=3))
    devices = tuple(f"pump-{i:02d}" for i in range(5))
    for rnd in (1, 2, 3):
        upload(s, job, rnd, OLD, devices)
    assert s.delete_learn_updates(job, 4, BEFORE, 4) == 4  # one transaction, the lowest first
    assert {(r, d) for _, r, d in stored(s)} == {(1, "pump-04")} | {
        (r, d) for r in (2, 3) for d in devices
    }
    stop = threading.Event()
    stop.set()
    assert prune_uploads(s, BEFORE, stop=stop, batch=2, pause=0) == (0, True)
    assert len(stored(s)) == 11
    assert prune_uploads(s, BEFORE, batch=2, pause=0) == (11, False)  # six transactions
    assert stored(s) == set()


def test_a_prune_running_beside_another_removes_every_old_upload(
    s: Storage, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two prunes at once (on PostgreSQL the uploads are removed after the prune lock is
    released): the other one deletes a row of the batch this one selected, so this batch
    deletes fewer than it asked for while more remain. Was: taken as "none left", the prune
    ended with old uploads still there. Now it goes on until a batch finds none."""
    job = add_job(s, JobState(state="done", round=3))
    devices = tuple(f"pump-{i:02d}" for i in range(4))
    for rnd in (1, 2):
        upload(s, job, rnd, OLD, devices)
    real = s.delete_learn_updates
    raced: list[int] = []

    def beside(job_: int, below: int, before: float, limit: int) -> int:
        if not raced:  # the other prune deletes one of the rows this batch selected
            raced.append(real(job_, below, before, 1))
            return real(job_, below, before, limit - 1)
        return real(job_, below, before, limit)

    monkeypatch.setattr(s, "delete_learn_updates", beside)
    removed, stopped = prune_uploads(s, BEFORE, batch=4, pause=0)
    assert (removed, stopped, raced) == (7, False, [1])  # 3 in the first batch, then 4
    assert stored(s) == set()


def test_the_command_and_the_log_line_say_how_many_uploads_went(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "data"
    s = SQLiteStorage.in_dir(data)
    try:
        job = add_job(s, JobState(state="done", round=1, history=[entry(1)]))
        upload(s, job, 1, OLD)
    finally:
        s.close()
    argv = ["prune", "--data", str(data), "--older-than-days", "2"]
    assert cli.main([*argv, "--dry-run"]) == 0
    assert "  learn_uploads 2 " in capsys.readouterr().out
    assert cli.main([*argv, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["learn_uploads"] == 2
    assert cli.main(argv) == 0
    assert "  learn_uploads 0 " in capsys.readouterr().out
    line = prunecli.describe_result(PruneResult(T0, False, learn_uploads=7), data)
    assert " learn_uploads=7" in line  # serve --retain-days: event=retention_pruned ...


def test_a_close_run_again_after_a_crash_and_a_prune_still_has_its_round(rig: Rig) -> None:
    """The coordinator died in round 2's close, after publishing and assigning its model but
    before it saved the job, and a prune ran before it was resumed, with a cutoff after every
    upload. Round 1's uploads go: its close was saved (the document names round 2 only after
    that save, and nothing reads them again). Round 2's stay, being the round the saved document
    names: resumed, its close runs again from them, publishes the same version once and ends the
    job; the next prune removes the rest."""
    job_id = rig.start(rounds=2, gate=False)
    rig.coordinator.tick(job_id)
    rig.play(job_id)  # round 1 closed and saved
    selected = rig.coordinator.tick(job_id).st.selected  # round 2 opened
    for i, device in enumerate(selected):
        assert rig.upload(job_id, device, rig.update(job_id, i))
    lost = rig.job(job_id)
    rig.coordinator._close(lost, rig.now)  # published and assigned; never saved
    version = f"{BASE}+fl{job_id}.2"
    assert version in rig.published() and rig.job(job_id).st.open
    cutoff = rig.now + 2 * DAY
    assert prunecli.prune(rig.storage, cutoff).learn_uploads == 3
    assert rig.storage.learn_update_devices(job_id, 1) == []
    assert rig.storage.learn_update_devices(job_id, 2) == sorted(selected)
    st = rig.coordinator.tick(job_id).st  # the close again
    assert (st.state, st.version, [h["round"] for h in st.history]) == ("done", version, [1, 2])
    assert st.history[1]["uploads"] == 3
    assert rig.published().count(version) == 1
    assert prunecli.prune(rig.storage, cutoff).learn_uploads == 3  # ended: round 2's go too


def test_the_round_that_only_checks_still_finds_the_devices_of_every_training_round(
    tmp_path: Path,
) -> None:
    """A job with the check, five devices, two a round: round 1 is pump-01 and pump-04, round 2
    pump-02 and pump-03. A prune while round 2 is open keeps round 1's uploads, so the round
    after the last is drawn among all four (it picks pump-04, who trained in round 1 only);
    once the job is done, every upload goes."""
    rig = Rig(tmp_path, 5)
    try:
        job_id = rig.start(rounds=2, fraction=0.4, min_devices=2)
        rig.coordinator.tick(job_id)
        rig.play(job_id)
        second = rig.coordinator.tick(job_id)
        assert second.st.round == 2 and set(second.st.selected) == {"pump-02", "pump-03"}
        cutoff = rig.now + 2 * DAY
        assert prunecli.prune(rig.storage, cutoff).learn_uploads == 0
        rig.play(job_id, AS_GOOD)
        check = rig.coordinator.tick(job_id)
        assert check.st.round == 3 and "pump-04" in check.st.selected
        done = rig.play(job_id, AS_GOOD)
        assert done.st.state == "done"
        assert prunecli.prune(rig.storage, cutoff).learn_uploads == 6
    finally:
        rig.storage.close()


def test_learn_status_and_an_upload_with_a_damaged_job_document(
    s: Storage, backend: Backend, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A job document corrupted at rest. Was: ``learn status`` ended in a traceback (KeyError)
    and printed no job; an upload naming that job failed inside the endpoint. Now status prints
    the other jobs, says which one does not read (text: on stderr; JSON: its number and the
    error) and exits 65; the upload is refused 4.04 with the reason; resuming it is an error."""
    broken = s.create_learn_job("skab-ae", lambda n: records.dumps({"spec": 1, "state": []}), OLD)
    done = add_job(s, JobState(state="done", round=1, history=[entry(1)]))
    argv = storage_args(backend, tmp_path)
    assert cli.main(["learn", "status", *argv]) == EX_DATAERR
    out = capsys.readouterr()
    assert f"job {done}" in out.out and "Traceback" not in out.err
    assert f"error: job {broken}: its stored document does not read (" in out.err
    assert cli.main(["learn", "status", *argv, "--json"]) == EX_DATAERR
    shown = json.loads(capsys.readouterr().out)
    assert [j["job"] for j in shown] == [broken, done]
    assert shown[0]["error"].startswith(f"job {broken}: its stored document does not read")
    update = ModelUpdate(broken, 1, 10, None, ScoreSummary.of(np.ones(4)), 0.1, Recall(0.5, 0.5))
    with pytest.raises(UploadRefused) as refused:
        accept_upload(s, DEVICES[0], update.to_cbor(), T0)
    assert refused.value.code == "4.04" and "does not read" in refused.value.message
    with pytest.raises(JobError, match="does not read"):
        Coordinator(s).job(broken)


def test_the_dashboard_reads_the_jobs_on_both_storages(s: Storage) -> None:
    """cloud/dashlearn.py's SQL (the jobs newest first, the open round's upload count) on SQLite
    and PostgreSQL; the coordinator's rounds themselves: tests/unit/cloud/test_dashlearn.py."""
    done = add_job(s, JobState(state="done", round=2, history=[entry(1), entry(2)]))
    running = add_job(s, JobState(round=2, open=True, selected=list(DEVICES), history=[entry(1)]))
    upload(s, running, 2, T0, DEVICES[:1])
    upload(s, done, 2, OLD)
    answer = dashlearn.learning(s, T0)
    assert [j["id"] for j in answer["jobs"]] == [running, done] and not answer["truncated"]
    first, second = answer["jobs"]
    assert first["attempt"]["uploads"] == 1 and first["attempt"]["selected"] == 2
    assert (second["state"], second["rounds_closed"], second["version"]) == ("done", 2, None)


def test_a_job_document_of_the_wrong_types_reads_as_damaged(
    s: Storage, backend: Backend, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A job document that is CBOR with every key of a job, but a field of another type than
    the coordinator writes (here its round as a text). Was: it read as a job, and the prune
    ended in a TypeError (``max("2", 1)``) before any other job's uploads went, every time
    (``serve --retain-days`` too), as did ``learn status``. Now it is a damaged job: its uploads
    stay, the other jobs are pruned, status prints them and exits 65."""
    doc = records.loads(Job(0, SPEC, JobState(round=2, open=True)).to_cbor())
    doc["state"]["round"] = "2"
    odd = s.create_learn_job("skab-ae", lambda n: records.dumps(doc), OLD)
    ended = add_job(s, JobState(state="done", round=1, history=[entry(1)]))
    for job in (odd, ended):
        upload(s, job, 1, OLD)
    assert prunecli.prune(s, BEFORE).learn_uploads == 2
    assert {job for job, _, _ in stored(s)} == {odd}
    with pytest.raises(JobError, match="does not read"):
        Coordinator(s).job(odd)
    argv = storage_args(backend, tmp_path)
    assert cli.main(["learn", "status", *argv]) == EX_DATAERR
    out = capsys.readouterr()
    assert f"job {ended}" in out.out
    assert f"error: job {odd}: its stored document does not read (" in out.err


def test_a_prune_that_finds_the_file_locked_too_long_while_removing_uploads_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SQLite, a writer that never lets go (a transaction left open) while the prune removes
    uploads: as the storage's own prune does, the deletion is tried again ``BUSY_TRIES`` times,
    then PruneBusy (the command exits 75: run it again). Was: the first busy timeout ended the
    prune with the storage's error (exit 74, "a storage that fails")."""
    from cloud import retention

    s = SQLiteStorage(tmp_path / "cloud.sqlite3")
    try:
        ended = add_job(s, JobState(state="done", round=1, history=[entry(1)]))
        upload(s, ended, 1, OLD)
        s.db.execute("PRAGMA busy_timeout = 10")
        monkeypatch.setattr(retention, "BUSY_TRIES", 2)
        other = sqlite3.connect(tmp_path / "cloud.sqlite3", isolation_level=None)
        other.execute("BEGIN IMMEDIATE")
        with pytest.raises(retention.PruneBusy, match="stayed locked"):
            prunecli.prune(s, BEFORE)
        other.execute("ROLLBACK")
        other.close()
        assert stored(s) == {(ended, 1, d) for d in DEVICES}
        assert prunecli.prune(s, BEFORE).learn_uploads == 2
    finally:
        s.close()
