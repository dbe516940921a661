"""cloud/learncli.py: what ``learn status`` says of each closed round (:func:`_round_parts`), for
the history entries cloud/learning.py writes: a round whose check passed, one whose check failed,
the round that only checks, a round of a job stored before the check, and a round closed before
its deadline with devices out, after an attempt that ended early."""

from __future__ import annotations

from typing import Any

import pytest

from cloud.learncli import _round_parts

ROUNDS = 3


def entry(rnd: int, uploads: int = 3, missing: tuple[str, ...] = (), **kw: Any) -> dict:
    return {
        "round": rnd,
        "attempts": 1,
        "selected": 3,
        "uploads": uploads,
        "refused": [],
        "missing": list(missing),
        "samples": 200 * uploads,
        "closed": 1_800_000_000.0,
        **kw,
    }


def check(passed: bool, recall: float, incumbent: float, devices: int = 3) -> dict:
    return {
        "round": 1,
        "passed": passed,
        "devices": devices,
        "recall": recall,
        "recall_incumbent": incumbent,
        "margin": round(recall - incumbent, 4),
    }


PASSED = (
    "round 1's model passed the check (faults detected 0.912 against 0.900 for the model the "
    "fleet runs, median margin +0.012 over 3 devices)"
)


@pytest.mark.parametrize(
    ("h", "checked", "parts"),
    [
        (
            entry(2, check=check(True, 0.9123, 0.9), threshold=1.23456, version="1.0.0+fl1.1"),
            True,
            [
                "3/3 uploads",
                "600 windows",
                PASSED,
                "assigned 1.0.0+fl1.1 (threshold 1.235)",
                "its model checked by the next round",
            ],
        ),
        (
            entry(2, 2, ("pump-c",), check=check(False, 0.8, 0.9, 2), dropped=True),
            True,
            [
                "2/3 uploads",
                "400 windows",
                "round 1's model FAILED the check (faults detected 0.800 against 0.900 for the "
                "model the fleet runs, median margin -0.100 over 2 devices): not assigned",
                "trained from a model that failed the check: dropped",
                "missing pump-c",
            ],
        ),
        (
            entry(4, check=check(True, 0.9123, 0.9), threshold=1.23456, version="1.0.0+fl1.1"),
            True,
            ["3/3 uploads", "600 windows", PASSED, "assigned 1.0.0+fl1.1 (threshold 1.235)"],
        ),
        (
            entry(1, threshold=0.98765, version="1.0.0+fl1.1"),
            False,
            ["3/3 uploads", "600 windows", "assigned 1.0.0+fl1.1 (threshold 0.9877)"],
        ),
        (
            entry(
                1,
                2,
                ("pump-c",),
                threshold=0.98765,
                version="1.0.0+fl1.1",
                attempts=2,
                out={"refused": 1},
                early=True,
                reopened=[
                    {
                        "attempt": 0,
                        "uploads": 1,
                        "out": {"expired": 1, "not_applied": 1},
                        "early": True,
                    }
                ],
            ),
            False,
            [
                "2/3 uploads",
                "400 windows",
                "assigned 1.0.0+fl1.1 (threshold 0.9877)",
                "attempt 1 ended before the deadline with 1 upload, 2 selected devices out "
                "(expired 1, not_applied 1)",
                "1/3 selected out (refused 1): closed before the deadline",
                "missing pump-c",
            ],
        ),
    ],
    ids=[
        "passed",
        "failed",
        "the-round-that-only-checks",
        "a-job-before-the-check",
        "devices-out",
    ],
)
def test_learn_status_says_each_rounds_check(h: dict, checked: bool, parts: list[str]) -> None:
    assert _round_parts(h, ROUNDS, checked) == parts
