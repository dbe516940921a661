"""State sync's data (agent/sync/statedata.py): what the device reports of the desired versions
it refused stays small whatever a hostile document held."""

from __future__ import annotations

import pytest

from agent.sync.statedata import ERRORS_REPORT_BYTES, Failure, errors_report
from agent.wire import records

pytestmark = pytest.mark.timeout(30)


def test_desired_errors_of_a_thousand_refused_keys_stay_within_their_budget_newest_first() -> None:
    """A document of 1,000 bad keys (each refusal with a long reason) must not make the
    ``desired/errors`` report larger than the endpoint takes in a reported PUT."""
    failed = {f"sensor/s{i:04d}/interval": Failure(i, "x" * 500) for i in range(1000)}
    report = errors_report(failed)
    assert len(records.dumps(report)) <= ERRORS_REPORT_BYTES
    assert report  # not empty: the newest refusals are there
    kept = sorted(entry["version"] for entry in report.values())
    assert kept == list(range(1000 - len(kept), 1000))  # the newest, none skipped
    assert all(len(entry["error"]) == 200 for entry in report.values())


def test_desired_errors_of_a_few_refusals_are_all_reported() -> None:
    failed = {"detect/m/threshold": Failure(7, "out of range"), "model/a": Failure(3, "bad")}
    assert errors_report(failed) == {
        "detect/m/threshold": {"version": 7, "error": "out of range"},
        "model/a": {"version": 3, "error": "bad"},
    }
