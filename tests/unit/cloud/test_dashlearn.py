"""The dashboard's learning jobs (cloud/dashlearn.py, ``GET /api/learning``): what the real
coordinator wrote on real SQLite storage, with the devices' uploads stored through
:func:`cloud.learnuploads.accept_upload` and their reports through ``put_reported``, as the
endpoint stores them (the rig of tests/unit/cloud/test_learning_check.py); hostile values where
they can come from: a device registered under a name with markup, a job document corrupted at
rest, and one that decodes but holds fields of other types."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.wire import records
from agent.wire.learning import learn_key
from agent.wire.statedoc import Entry
from cloud import dashlearn
from cloud.learning import MAX_ATTEMPTS
from cloud.learnjob import Job, JobState
from tests.unit.cloud.test_learning_check import AS_GOOD, BASE, MODEL, WORSE, Rig

HOSTILE = '<img src=x onerror="alert(1)">'  # a device name a storage may hold (not a DEVICE_ID)
MARKUP_KEY = "<script>alert(2)</script>"  # a key of a document corrupted at rest


def api(rig: Rig) -> dict[str, Any]:
    """The answer as the endpoint sends it (cloud/dashboard.py ``_json``)."""
    answer = dashlearn.learning(rig.storage, rig.now)
    return json.loads(json.dumps(answer, allow_nan=False))


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    r = Rig(tmp_path, 3)
    yield r
    r.storage.close()


def test_running_finished_and_damaged_jobs_as_the_api_answers(rig: Rig) -> None:
    # job 1: three rounds closed, round 1's model passed the check, round 2's failed it
    done = rig.start(rounds=2)
    for recall in (None, AS_GOOD, WORSE):
        rig.coordinator.tick(done)
        rig.play(done, recall)
    assert rig.job(done).st.state == "done"
    # job 2: mid-round, with a device registered under a name with markup among the selected
    rig.storage.add_device(HOSTILE, rig.now)
    running = rig.start(rounds=3, min_devices=2)
    job = rig.coordinator.tick(running)
    assert job.st.open and HOSTILE in job.st.selected and len(job.st.selected) == 4
    for i, device in ((0, rig.devices[0]), (3, HOSTILE)):
        assert rig.upload(running, device, rig.update(running, i))
    refusal = {"job": running, "round": 1, "deadline": math.ceil(job.st.deadline)}
    refusal |= {"status": "refused", "error": f"<b>{HOSTILE}</b>"}
    rig.storage.put_reported(rig.devices[1], {learn_key(MODEL): Entry(1001, refusal)}, rig.now)
    job = rig.coordinator.tick(running)
    assert job.st.open and job.st.out == {rig.devices[1]: "refused"}
    # job 3: corrupted at rest (a key with markup); job 4: decodes, a field of another type
    broken = rig.storage.create_learn_job(
        MODEL,
        lambda n: records.dumps({"spec": {"devices": [], MARKUP_KEY: 1}, "state": {}}),
        rig.now,
    )
    odd = rig.storage.create_learn_job(
        MODEL,
        lambda n: Job(n, rig.spec(), JobState(history=7)).to_cbor(),
        rig.now,  # type: ignore[arg-type]
    )

    answer = api(rig)
    assert answer["now"] == rig.now and answer["truncated"] is False
    jobs = answer["jobs"]
    assert [j["id"] for j in jobs] == [odd, broken, running, done]  # newest first
    assert set(jobs[0]) == {"id", "error"} and jobs[0]["id"] == odd  # as learn status says it
    assert jobs[0]["error"] == (
        f"job {odd}: its stored document does not read"
        " (TypeError: history is int, not list[dict[str, Any]])"
    )
    assert set(jobs[1]) == {"id", "error"} and jobs[1]["id"] == broken
    assert jobs[1]["error"].startswith(f"job {broken}: its stored document does not read (")
    assert MARKUP_KEY in jobs[1]["error"]  # data: the page renders it as text

    assert jobs[2] == {
        "id": running,
        "model": MODEL,
        "base": BASE,
        "state": "running",
        "round": 1,
        "rounds": 3,
        "open": True,
        "attempt": {
            "attempt": 1,
            "attempts": MAX_ATTEMPTS,
            "deadline": math.ceil(rig.now + 600.0),
            "selected": 4,
            "uploads": 2,
            "out": {"refused": 1},
        },
        "version": None,
        "check": None,
        "error": None,
        "updated": rig.now,
        "rounds_closed": 0,
        "history": [],
    }
    version = f"{BASE}+fl{done}.1"
    assert jobs[3] == {
        "id": done,
        "model": MODEL,
        "base": BASE,
        "state": "done",
        "round": 3,
        "rounds": 2,
        "open": False,
        "attempt": None,
        "version": version,
        "check": {"round": 2, "passed": False, "margin": -0.1, "devices": 3},
        "error": None,
        "updated": rig.now,
        "rounds_closed": 3,
        "history": [
            {"round": 1, "uploads": 3, "selected": 3, "check": None, "version": None},
            {"round": 2, "uploads": 3, "selected": 3, "check": True, "version": version},
            {"round": 3, "uploads": 3, "selected": 3, "check": False, "version": None},
        ],
    }
    # forged identity: no device is named, so the name with markup reaches no page
    text = json.dumps(answer)
    assert "onerror" not in text and "<b>" not in text
    assert not any(d in text for d in rig.devices)


def test_the_answer_is_bounded_whatever_the_storage_holds(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(dashlearn, "MAX_JOBS", 4)
    monkeypatch.setattr(dashlearn, "MAX_ROUNDS", 2)
    history = [{"round": r, "uploads": 1, "selected": 2} for r in range(1, 6)]
    long_error = "x" * 1000
    for _ in range(5):
        rig.storage.create_learn_job(
            MODEL,
            lambda n: Job(
                n,
                rig.spec(model="m" * 200),
                JobState(state="failed", history=history, error=long_error),
            ).to_cbor(),
            rig.now,
        )
    answer = api(rig)
    assert answer["truncated"] is True
    assert [j["id"] for j in answer["jobs"]] == [5, 4, 3, 2]
    job = answer["jobs"][0]
    assert job["rounds_closed"] == 5 and [h["round"] for h in job["history"]] == [4, 5]
    assert len(job["model"]) == dashlearn.MAX_TEXT and len(job["error"]) == dashlearn.MAX_ERROR


def test_no_job_is_an_empty_list(rig: Rig) -> None:
    assert api(rig) == {"now": rig.now, "jobs": [], "truncated": False}


def test_a_round_s_uploads_are_counted_without_reading_them(rig: Rig) -> None:
    """SQLite keeps an upload's body in the primary key's b-tree (WITHOUT ROWID): counting
    through it reads a page per upload; the dashboard's count goes through a covering index."""
    with rig.storage.reader() as db:
        plan = db.execute(
            "EXPLAIN QUERY PLAN SELECT count(*) FROM learn_updates WHERE job = ? AND round = ?",
            (1, 1),
        ).fetchall()
    assert "COVERING INDEX learn_updates_rounds" in str(plan)
