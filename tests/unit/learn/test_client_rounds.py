"""Which round tasks a device still works on (:meth:`LearningClient._done`): the endpoint opens a
round again, with a later deadline, while too few devices uploaded; a device whose attempt
expired or failed takes the new attempt, one that uploaded or refused does not. What a device
ended is kept in its data directory across restarts."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.learn import client as learn_client
from agent.learn.client import DONE_FILE, LearningClient, _drop_other_updates, _trained
from agent.learn.settings import LearnSettings
from agent.wire.learning import ModelUpdate, RoundTask, ScoreSummary
from drivers.clock import RealClock

SHA = "ab" * 32


def task(job: int = 1, rnd: int = 3, deadline: float = 1_000.0) -> RoundTask:
    return RoundTask(job, rnd, "1.0.0", SHA, deadline, 2, 2e-3, 0.01, 0.3, 0.5)


def client(data_dir: Path) -> LearningClient:
    data_dir.mkdir(exist_ok=True)
    none: Any = None  # the transport and endpoints are not reached here
    return LearningClient(
        LearnSettings(enabled=True),
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


@pytest.mark.parametrize("wall", [30.0, -21 * 86_400.0], ids=["1970", "3-weeks-stale"])
def test_a_task_that_came_before_ntp_set_the_clock_keeps_its_deadline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, wall: float
) -> None:
    """A task (a 10-minute round) comes while the device's wall clock reads 1970, or a
    fake-hwclock time three weeks stale; then NTP sets the clock. Before: the deadline was capped
    at that wall clock + MAX_AHEAD when the task came, so the round was expired at once once the
    clock was set, ten minutes before the coordinator's deadline."""
    now = time.time()
    c = client(tmp_path)
    value = task(deadline=now + 600.0).to_value()
    monkeypatch.setattr(learn_client.time, "time", lambda: wall if wall > 0 else now + wall)
    c.apply("skab-ae", value)
    given = c._tasks["skab-ae"]
    assert not c._expired(given)
    monkeypatch.setattr(learn_client.time, "time", lambda: now)  # NTP
    assert not c._expired(given)
    c._set("skab-ae", given, "training")
    assert c.reported()["learn/skab-ae"]["deadline"] == math.ceil(now + 600.0)
    monkeypatch.setattr(learn_client.time, "time", lambda: now + 601.0)
    assert c._expired(given)


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


DEEP = "[" * 5000 + "]" * 5000  # deeper than the JSON parser's stack


@pytest.mark.parametrize(
    "text",
    [
        DEEP,
        b"\xff not json",
        "[]",
        json.dumps({"skab-ae": {"job": 1, "status": "uploaded"}}),  # no round
        json.dumps({"skab-ae": {"job": 1, "round": [3], "status": "uploaded"}}),
        json.dumps({"skab-ae": {"job": True, "round": 3, "status": "uploaded"}}),
        json.dumps({"skab-ae": {"status": "uploaded", **{f"k{i}": i for i in range(20)}}}),
        json.dumps(
            {"skab-ae": {"status": "uploaded", **{f"k{i}": i for i in range(20)}, "job": 1}}
        ),
        '{"skab-ae": {"job": 1, "ro',  # torn
    ],
)
def test_a_damaged_done_file_is_dropped_with_a_line_and_never_stops_the_client(
    tmp_path: Path, text: str | bytes, caplog: pytest.LogCaptureFixture
) -> None:
    """Was: a KeyError or TypeError in every _done() (the learn stage restarting forever), or a
    RecursionError at start; now the entry or file is dropped, said in one line, and the round
    is taken (the privacy ledger, kept apart, refuses what it has charged)."""
    path = tmp_path / DONE_FILE
    path.write_bytes(text) if isinstance(text, bytes) else path.write_text(text)
    with caplog.at_level(logging.WARNING):
        c = client(tmp_path)
    assert not c._done("skab-ae", task())
    assert c.status()["models"] == {}
    assert "event=learn_state_" in caplog.text


def test_an_entry_keeps_only_plain_details(tmp_path: Path) -> None:
    st = {"job": 1, "round": 3, "status": "refused", "deadline": 1000, "error": "e" * 999}
    st |= {"nested": {"a": [1]}, "nan": float("nan"), "k" * 99: 1}
    (tmp_path / DONE_FILE).write_text(json.dumps({"skab-ae": st}))
    c = client(tmp_path)
    assert c._done("skab-ae", task())
    kept = c.status()["models"]["skab-ae"]
    assert kept["error"] == "e" * 200 and "nested" not in kept and "nan" not in kept
    assert kept["k" * 32] == 1


@pytest.mark.parametrize("what", ["garbage", "other round", "missing"])
def test_an_update_file_of_a_restart_is_uploaded_only_if_it_is_this_rounds(
    tmp_path: Path, what: str, caplog: pytest.LogCaptureFixture
) -> None:
    """An update trained before a restart is uploaded as it is; a file damaged at rest, or of
    another round, is removed and the round trained again: only a checked update leaves."""
    out = tmp_path / "learn-1-3.cbor"
    good = ModelUpdate(1, 3, 10, np.zeros(8, np.float32), ScoreSummary.of(np.ones(20)), 0.1)
    assert _trained(out, task()) is False
    out.write_bytes(good.to_cbor())
    assert _trained(out, task()) is True and out.exists()
    if what == "garbage":
        out.write_bytes(b"\x00" * 64 + good.to_cbor())
    elif what == "other round":
        out.write_bytes(ModelUpdate(1, 2, 10, good.delta, good.scores, 0.1).to_cbor())
    else:
        out.unlink()
    with caplog.at_level(logging.WARNING):
        assert _trained(out, task()) is False
    assert not out.exists()
    assert ("event=learn_update_unreadable" in caplog.text) == (what != "missing")


def test_job_round_and_status_are_kept_wherever_they_are_in_the_entry(tmp_path: Path) -> None:
    """Only MAX_DETAILS details are read, but never at the cost of the fields _done() needs (a
    status first and job, round after 16 other keys was a KeyError in every pass)."""
    st = {"status": "uploaded", **{f"k{i}": i for i in range(20)}, "job": 1, "round": 3}
    (tmp_path / DONE_FILE).write_text(json.dumps({"skab-ae": st}))
    c = client(tmp_path)
    assert c._done("skab-ae", task())
    kept = c.status()["models"]["skab-ae"]
    assert (kept["job"], kept["round"], kept["status"]) == (1, 3, "uploaded")


def test_a_round_in_progress_when_saved_is_taken_up_without_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    c = client(tmp_path)
    c._set("skab-ae", task(rnd=2), "uploaded")  # saved, with the other models' entries
    c._set("skab-ae", task(), "training")
    c._set("other", task(), "refused")
    with caplog.at_level(logging.WARNING):
        again = client(tmp_path)
    assert "event=learn_state" not in caplog.text
    assert not again._done("skab-ae", task()) and again._done("other", task())


async def test_a_charged_round_whose_update_is_gone_is_not_trained_again(
    tmp_path: Path,
) -> None:
    """The ledger charged it, so an update of it may have left: a second one, noised anew, would
    spend privacy the ledger does not count. The round fails instead."""
    c = client(tmp_path)
    c.ledger.charge(1, 3, 0.5)

    async def never(*_a: Any) -> bool:
        raise AssertionError("trained again")

    c._train = never  # type: ignore[method-assign]
    await c._round("skab-ae", task())
    st = c.status()["models"]["skab-ae"]
    assert st["status"] == "failed" and "charged already" in st["error"]


async def test_an_attempt_that_expired_while_uploading_keeps_its_update_for_the_next(
    tmp_path: Path,
) -> None:
    """The same noisy update goes again when the round is opened again; a later round removes
    it."""
    c = client(tmp_path)
    out = tmp_path / "learn-1-3.cbor"
    update = ModelUpdate(1, 3, 10, np.zeros(8, np.float32), ScoreSummary.of(np.ones(20)), 0.1)
    out.write_bytes(update.to_cbor())
    await c._upload("skab-ae", task(deadline=0.0), out)  # expired: nothing sent
    assert c.status()["models"]["skab-ae"]["status"] == "expired" and out.exists()
    assert _trained(out, task(deadline=2e9))  # the re-opened attempt uploads this one
    _drop_other_updates(tmp_path, {"learn-1-4"})  # the next round
    assert not out.exists()


@pytest.mark.parametrize(
    ("ahead", "wall"), [(3 * 365 * 86400.0, None), (600.0, 30.0)], ids=["years-ahead", "1970"]
)
async def test_a_round_that_ended_at_its_capped_deadline_is_not_started_again_and_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, ahead: float, wall: float | None
) -> None:
    """Attack: a task whose deadline is years ahead (capped at MAX_AHEAD after it came); or a
    10-minute task that comes while the device's wall clock reads 1970 (the cap, 1970 + 7 days
    on that clock, is before the task's deadline). Its attempt ends (here it fails at once: the
    ledger charged the round already) with the capped deadline in its status. Before:
    :meth:`_done` compared that with the task's own deadline, found the round not ended, and
    the client started it again at once, and again: a busy loop writing learn.json each time
    round."""
    value = task(deadline=time.time() + ahead).to_value()
    if wall is not None:
        monkeypatch.setattr(learn_client.time, "time", lambda: wall)
    c = client(tmp_path)
    c.ledger.charge(1, 3, 0.5)
    attempts = 0
    real_round = c._round

    async def counted(model: str, t: RoundTask) -> None:
        nonlocal attempts
        attempts += 1
        await real_round(model, t)

    c._round = counted  # type: ignore[method-assign]
    c.apply("skab-ae", value)
    running = asyncio.create_task(c.run())
    await asyncio.sleep(0.5)
    running.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await running
    assert c.status()["models"]["skab-ae"]["status"] == "failed"
    assert attempts == 1, attempts
