"""The device's privacy budget across jobs (agent/learn/ledger.py): rounds compose by RDP into
the same epsilon the per-job accountant states, a round is charged once and durably before its
upload, a round over the budget or without noise is refused, and a ledger that cannot be read
spends everything."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from agent.learn.ledger import LEDGER_FILE, BudgetExceeded, PrivacyLedger
from agent.learn.privacy import Accountant

pytestmark = pytest.mark.timeout(30)


def test_rounds_of_several_jobs_compose_like_one_accountant(tmp_path: Path) -> None:
    ledger = PrivacyLedger(tmp_path / LEDGER_FILE, budget=1e6, delta=1e-5)
    assert ledger.spent() == 0.0
    for job in (1, 2):
        for r in range(5):
            ledger.charge(job, r, 0.5)
    reference = Accountant(0.5, 1e-5)
    reference.step(10)
    assert ledger.spent() == pytest.approx(reference.epsilon(), rel=1e-9)
    # the same round again costs nothing more (the same noisy update, sent again)
    ledger.charge(2, 4, 0.5)
    assert ledger.spent() == pytest.approx(reference.epsilon(), rel=1e-9)
    # a restart reads the same ledger back
    again = PrivacyLedger(tmp_path / LEDGER_FILE, budget=1e6, delta=1e-5)
    assert again.spent() == pytest.approx(reference.epsilon(), rel=1e-9)
    assert again.charged == [f"{j}:{r}" for j in (1, 2) for r in range(5)]


def test_a_round_over_the_budget_or_without_noise_is_refused_and_not_charged(
    tmp_path: Path,
) -> None:
    one = Accountant(0.5, 1e-5)
    one.step(3)
    budget = one.epsilon() + 1e-9  # exactly three rounds at noise 0.5 fit
    ledger = PrivacyLedger(tmp_path / LEDGER_FILE, budget=budget, delta=1e-5)
    for r in range(3):
        ledger.check(7, r, 0.5)
        ledger.charge(7, r, 0.5)
    with pytest.raises(BudgetExceeded, match=r"above \[learn\] epsilon_budget"):
        ledger.check(7, 3, 0.5)
    ledger.check(7, 2, 0.5)  # a round already charged is never refused
    with pytest.raises(BudgetExceeded, match="no noise"):
        PrivacyLedger(tmp_path / "other.json", budget=1e6, delta=1e-5).check(1, 0, 0.0)
    assert json.loads((tmp_path / LEDGER_FILE).read_text())["charged"] == ["7:0", "7:1", "7:2"]


@pytest.mark.parametrize(
    "text",
    [
        "not json",
        "[]",
        '{"rdp": [1, 2], "charged": []}',
        '{"rdp": "x", "charged": []}',
        '{"charged": ["1:0"]}',
    ],
)
def test_an_unreadable_ledger_spends_everything(tmp_path: Path, text: str) -> None:
    path = tmp_path / LEDGER_FILE
    path.write_text(text)
    ledger = PrivacyLedger(path, budget=1e6, delta=1e-5)
    assert ledger.spent() == math.inf
    with pytest.raises(BudgetExceeded, match="privacy ledger unreadable"):
        ledger.check(1, 0, 10.0)
    with pytest.raises(BudgetExceeded):
        ledger.charge(1, 0, 10.0)
    assert path.read_text() == text  # left for the operator to look at


def test_a_charge_that_cannot_be_written_is_not_counted(tmp_path: Path) -> None:
    path = tmp_path / LEDGER_FILE
    ledger = PrivacyLedger(path, budget=1e6, delta=1e-5)
    path.mkdir()  # the rename onto it fails: the disk said no
    with pytest.raises(OSError):
        ledger.charge(1, 0, 0.5)
    assert ledger.spent() == 0.0 and ledger.charged == []


def test_two_rounds_charged_at_once_from_two_threads_are_both_counted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rounds of two models charge from worker threads at once (agent/learn/client.py runs each
    model's round on its own). Was possible: both read the same composed RDP, each wrote its own
    sum, and one charge was lost (a round released but not counted). The first write here waits
    until the second charge has checked the ledger (or 2 s, when a lock keeps it out): without
    the ledger's lock the race is certain, with it the charges follow each other."""
    import threading

    import agent.learn.ledger as ledger_module

    ledger = PrivacyLedger(tmp_path / LEDGER_FILE, budget=1e6, delta=1e-5)
    first_writing, second_checked = threading.Event(), threading.Event()
    real_write, real_check = ledger_module.write_atomic, ledger.check

    def slow_write(path: Path, data: bytes, **kw: object) -> None:
        if not first_writing.is_set():
            first_writing.set()
            second_checked.wait(2.0)
        real_write(path, data, **kw)

    def check(job: int, round_: int, noise: float) -> None:
        real_check(job, round_, noise)
        if job == 2:
            second_checked.set()

    monkeypatch.setattr(ledger_module, "write_atomic", slow_write)
    monkeypatch.setattr(ledger, "check", check)
    first = threading.Thread(target=ledger.charge, args=(1, 1, 0.5))
    first.start()
    assert first_writing.wait(10.0)  # the first charge is writing its sum
    ledger.charge(2, 1, 0.5)
    first.join()
    reference = Accountant(0.5, 1e-5)
    reference.step(2)
    again = PrivacyLedger(tmp_path / LEDGER_FILE, budget=1e6, delta=1e-5)
    assert sorted(again.charged) == ["1:1", "2:1"]
    assert again.spent() == pytest.approx(reference.epsilon(), rel=1e-9)


def test_rounds_that_only_check_are_answered_at_most_once_per_round_charged(
    tmp_path: Path,
) -> None:
    ledger = PrivacyLedger(tmp_path / LEDGER_FILE, budget=1e6, delta=1e-5)
    with pytest.raises(BudgetExceeded, match="0 answered, as many as the 0 rounds"):
        ledger.check_only(1, 4)
    ledger.charge(1, 3, 0.5)
    ledger.check_only(1, 4)  # may: nothing recorded yet
    assert ledger.checked == []
    ledger.check_only(1, 4, record=True)
    ledger.check_only(1, 4, record=True)  # the same round again: answered already
    with pytest.raises(BudgetExceeded, match="1 answered, as many as the 1 rounds"):
        ledger.check_only(2, 4)
    spent = ledger.spent()
    again = PrivacyLedger(tmp_path / LEDGER_FILE, budget=1e6, delta=1e-5)  # after a restart
    assert (again.charged, again.checked, again.spent()) == (["1:3"], ["1:4"], spent)
    with pytest.raises(BudgetExceeded):
        again.check_only(2, 4)


def test_a_ledger_written_before_the_check_reads_with_no_check_answered(tmp_path: Path) -> None:
    path = tmp_path / LEDGER_FILE
    ledger = PrivacyLedger(path, budget=1e6, delta=1e-5)
    ledger.charge(1, 1, 0.5)
    doc = json.loads(path.read_text())
    assert set(doc) == {"rdp", "charged"}  # no check answered: the file as before
    again = PrivacyLedger(path, budget=1e6, delta=1e-5)
    assert again.unreadable is None and again.checked == [] and again.charged == ["1:1"]
    path.write_text(json.dumps({**doc, "checked": [4]}))
    assert PrivacyLedger(path, budget=1e6, delta=1e-5).unreadable is not None
