"""Which round tasks a device still works on (:meth:`LearningClient._done`): the endpoint opens a
round again, with a later deadline, while too few devices uploaded; a device whose attempt
expired or failed takes the new attempt, one that uploaded or refused does not. What a device
ended is kept in its data directory across restarts."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from agent.learn.client import DONE_FILE, LearningClient
from agent.learn.settings import LearnSettings
from agent.wire.learning import RoundTask
from drivers.clock import RealClock

SHA = "ab" * 32


def task(job: int = 1, rnd: int = 3, deadline: float = 1_000.0) -> RoundTask:
    return RoundTask(job, rnd, "1.0.0", SHA, deadline, 2, 2e-3, 0.01, 0.3, 0.5)


def client(data_dir: Path) -> LearningClient:
    data_dir.mkdir(exist_ok=True)
    none: Any = None  # the transport and endpoints are not reached here
    return LearningClient(
        LearnSettings(),
        none,
        none,
        RealClock(),
        device_id="pump-a",
        data_dir=data_dir,
        window_shape=lambda: (4, 8),
    )


def test_an_attempt_that_expired_or_failed_is_taken_again_when_the_round_reopens(
    tmp_path: Path,
) -> None:
    for status in ("expired", "failed"):
        c = client(tmp_path / status)
        first = task(deadline=1_000.0)
        c._set("skab-ae", first, status)
        assert c._done("skab-ae", first)  # the same attempt: nothing more
        assert not c._done("skab-ae", task(deadline=1_015.0))  # the round opened again
        assert not client(tmp_path / status)._done("skab-ae", task(deadline=1_015.0))  # restart


def test_an_upload_or_a_refusal_stands_for_every_attempt_of_the_round(tmp_path: Path) -> None:
    for status in ("uploaded", "refused"):
        c = client(tmp_path / status)
        c._set("skab-ae", task(deadline=1_000.0), status)
        assert c._done("skab-ae", task(deadline=1_015.0))
        assert c._done("skab-ae", task(rnd=2, deadline=2_000.0))  # an earlier round
        assert not c._done("skab-ae", task(rnd=4, deadline=1_015.0))  # the next round
        assert not c._done("skab-ae", task(job=2, rnd=1))


def test_a_round_in_progress_is_not_done(tmp_path: Path) -> None:
    c = client(tmp_path)
    assert not c._done("skab-ae", task())
    c._set("skab-ae", task(), "training")
    assert not c._done("skab-ae", task())


def test_a_done_file_without_or_with_a_bad_deadline_keeps_its_round_ended(tmp_path: Path) -> None:
    for i, deadline in enumerate((None, "soon", True)):
        data_dir = tmp_path / str(i)
        data_dir.mkdir()
        st: dict[str, Any] = {"job": 1, "round": 3, "status": "expired"}
        if deadline is not None:
            st["deadline"] = deadline
        (data_dir / DONE_FILE).write_text(json.dumps({"skab-ae": st}))
        assert client(data_dir)._done("skab-ae", task(deadline=1_015.0))
