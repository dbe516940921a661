"""What the dashboard shows of federated learning jobs (docs/learning.md), read from storage:
the answer of ``GET /api/learning``.

Like cloud/dashdata.py, :func:`learning` runs on the storage thread (``CloudServer.db(fn)``) in
one read (:meth:`cloud.storebase.Storage.reader`, SQL shared by SQLite and PostgreSQL) and its
answer is bounded whatever the database holds:

- the newest :data:`MAX_JOBS` jobs (by number, newest first; ``truncated`` says there are more);
- of each, the newest :data:`MAX_ROUNDS` closed rounds of its history (``rounds_closed`` counts
  them all);
- one count of uploads per job whose round is open (an index range of ``learn_updates``' primary
  key, the same rows ``Storage.learn_update_devices`` lists), nothing more per job.

A job document is decoded as the coordinator and ``learn status`` decode it
(:meth:`cloud.learnjob.Job.from_row`); one that does not read is ``{id, error}``
(:class:`cloud.learnjob.DamagedJob`), and so is one whose fields are not of the types the
coordinator writes. No device name is in the answer (selected, missing and out devices are
counted, not named); texts are cut to :data:`MAX_TEXT` characters (an error to
:data:`MAX_ERROR`) and numbers that are not finite become null.
"""

from __future__ import annotations

from typing import Any

from cloud.learning import MAX_ATTEMPTS
from cloud.learnjob import DamagedJob, Job, out_counts
from cloud.learnstore import JobRow
from cloud.storage import Sql, Storage
from cloud.storebase import finite_float

MAX_JOBS = 50  # the newest jobs shown
MAX_ROUNDS = 20  # closed rounds shown per job (the newest)
MAX_TEXT = 64
MAX_ERROR = 300  # characters of a job's error


def _text(value: Any, limit: int = MAX_TEXT) -> str | None:
    return value[:limit] if isinstance(value, str) and value else None


def _int(value: Any) -> int | None:
    return value if type(value) is int else None  # not a bool, a float or a text


def learning(storage: Storage, now: float) -> dict[str, Any]:
    """The newest :data:`MAX_JOBS` learning jobs, newest first."""
    with storage.reader() as db:
        rows = db.execute(
            "SELECT id, model, doc, rev, created, updated FROM learn_jobs ORDER BY id DESC LIMIT ?",
            (MAX_JOBS + 1,),
        ).fetchall()
        jobs = [_entry(db, row) for row in rows[:MAX_JOBS]]
    return {"now": now, "jobs": jobs, "truncated": len(rows) > MAX_JOBS}


def _entry(db: Sql, row: Any) -> dict[str, Any]:
    job_id = int(row[0])
    try:
        job = Job.from_row(JobRow(job_id, row[1], bytes(row[2]), int(row[3]), row[4], row[5]))
        return _job(db, job, finite_float(row[5]))
    except DamagedJob as err:  # fields of other types than the coordinator writes included
        return {"id": job_id, "error": str(err)[:MAX_ERROR]}


def _job(db: Sql, job: Job, updated: float | None) -> dict[str, Any]:
    spec, st = job.spec, job.st  # of the types the coordinator writes (Job.from_row checks)
    attempt = None
    if st.open:
        (uploads,) = db.execute(
            "SELECT count(*) FROM learn_updates WHERE job = ? AND round = ?", (job.id, st.round)
        ).fetchone()
        attempt = {
            "attempt": st.attempt + 1,
            "attempts": MAX_ATTEMPTS,
            "deadline": finite_float(st.deadline),
            "selected": len(st.selected),
            "uploads": int(uploads),
            "out": out_counts(st.out),
        }
    history = st.history
    last_check = None
    for h in reversed(history):
        if isinstance(h.get("check"), dict):
            last_check = _check(h["check"])
            break
    return {
        "id": job.id,
        "model": _text(spec.model),
        "base": _text(spec.base),
        "state": _text(st.state),
        "round": st.round,
        "rounds": spec.rounds,
        "open": st.open,
        "attempt": attempt,
        "version": _text(st.version),
        "check": last_check,
        "error": _text(st.error, MAX_ERROR),
        "updated": updated,
        "rounds_closed": len(history),
        "history": [_round(h) for h in history[-MAX_ROUNDS:]],
    }


def _check(check: dict[str, Any]) -> dict[str, Any]:
    return {
        "round": _int(check.get("round")),
        "passed": check.get("passed") is True,
        "margin": finite_float(check.get("margin")),
        "devices": _int(check.get("devices")),
    }


def _round(h: dict[str, Any]) -> dict[str, Any]:
    """One closed round, compact: its uploads of selected, its check's verdict (None: it
    checked nothing), the version it assigned."""
    check = h.get("check")
    return {
        "round": _int(h.get("round")),
        "uploads": _int(h.get("uploads")),
        "selected": _int(h.get("selected")),
        "check": check.get("passed") is True if isinstance(check, dict) else None,
        "version": _text(h.get("version")),
    }
