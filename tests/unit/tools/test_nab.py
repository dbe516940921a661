"""tools/nab.py: SKAB's NAB score (TSAD's definition) on hand-made cases.

Every expected value below is worked out by hand in the comments from the published definition
(windows [c, c + 60 s], overlapping windows cut on the right, first detection per window scored by
TSAD's tanh curve on a 1000-point grid, every other detection outside the windows charged A_fp,
missed windows charged A_fn, normalised between the null and the perfect detector over all files).
The code under test is never used to produce an expected value.

Profiles (A_tp, A_fp, A_fn): standard (1, -0.11, -1), low_fp (1, -0.22, -1), low_fn (1, -0.11, -2).
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT / "tools"))

import nab  # noqa: E402

# The curve's value mid-window, by hand: k = floor(1000 * 0.5) = 500,
# x = -pi/2 + 500 * pi / 999 = pi * (1000 - 999) / 1998 = pi / 1998 = 0.0015723687,
# tanh(x) = x - x^3/3 = 0.0015723674, tanh(pi/2) = 0.9171523357,
# ratio = 0.0015723674 / 0.9171523357 = 0.0017144016, (1 - ratio) / 2 = 0.4991427992.
HALF = 0.4991427992
MID_STANDARD = -0.11 + 1.11 * HALF  # = -0.11 + 0.5540485071 = 0.4440485071
MID_LOW_FP = -0.22 + 1.22 * HALF  # = -0.22 + 0.6089542150 = 0.3889542150


def scores(files: list[tuple[list[float], list[float]]]) -> tuple[float, float, float]:
    r = nab.nab(files)
    return r.score("standard"), r.score("low_fp"), r.score("low_fn")


def test_windows_lie_right_of_each_changepoint_and_overlaps_are_cut_on_the_right() -> None:
    # changepoints 0, 30, 200: [0, 60]; [30, 90] overlaps it and starts where it ends: [60, 90];
    # [200, 260] is clear of both
    assert nab.detection_windows([200.0, 0.0, 30.0]) == [(0.0, 60.0), (60.0, 90.0), (200.0, 260.0)]


def test_the_curve_runs_from_a_tp_at_the_changepoint_to_a_fp_at_the_window_end() -> None:
    # p = 0: k = 0, x = -pi/2, tanh(x)/tanh(pi/2) = -1: A_fp + (A_tp - A_fp) * 2/2 = A_tp
    assert nab.sigmoid_score(100.0, 100.0, 160.0, 1.0, -0.11) == pytest.approx(1.0)
    # p = 1: k = min(1000, 999) = 999, x = +pi/2, ratio = +1: A_fp + 0 = A_fp
    assert nab.sigmoid_score(100.0, 160.0, 160.0, 1.0, -0.11) == pytest.approx(-0.11)
    # p = 0.5 (30 s into a 60 s window): worked out above
    assert nab.sigmoid_score(100.0, 130.0, 160.0, 1.0, -0.11) == pytest.approx(MID_STANDARD)
    assert nab.sigmoid_score(100.0, 130.0, 160.0, 1.0, -0.22) == pytest.approx(MID_LOW_FP)
    # p = 0.25 (15 s in): k = 250, x = -pi/2 + 250 pi/999 = -499 pi / 1998 = -0.7846120,
    # e^(2x) = e^-1.5692240 = 0.2082067, tanh(x) = (0.2082067 - 1) / (0.2082067 + 1) = -0.6553459,
    # ratio = -0.6553459 / 0.9171523 = -0.7145442, (1 + 0.7145442) / 2 = 0.8572721,
    # score = -0.11 + 1.11 * 0.8572721 = -0.11 + 0.9515720 = 0.8415720
    assert nab.sigmoid_score(0.0, 15.0, 60.0, 1.0, -0.11) == pytest.approx(0.8415720, abs=1e-6)
    # the grid: p = 0.9995 still lands on k = 999, the last point (A_fp exactly)
    assert nab.sigmoid_score(0.0, 59.97, 60.0, 1.0, -0.11) == pytest.approx(-0.11)


def test_one_file_first_detection_scores_later_ones_in_the_window_count_nothing() -> None:
    # changepoint at 100: window [100, 160]. Detections: 50 (before it: FP), 100 (first inside,
    # at p = 0: +A_tp = +1), 130 (second inside: nothing), 200 (after it: FP).
    # standard: S = 1 + 2 * (-0.11) = 0.78; null N = 1 * (-1) = -1; perfect P = 1 * 1 = 1
    #   NAB = 100 * (0.78 - (-1)) / (1 - (-1)) = 100 * 1.78 / 2 = 89.00
    # low_fp:   S = 1 + 2 * (-0.22) = 0.56 -> 100 * 1.56 / 2 = 78.00
    # low_fn:   S = 0.78; N = -2 -> 100 * (0.78 + 2) / (1 + 2) = 100 * 2.78 / 3 = 92.666... = 92.67
    files = [([100.0], [50.0, 100.0, 130.0, 200.0])]
    assert scores(files) == (89.0, 78.0, 92.67)
    r = nab.nab(files)
    assert (r.windows, r.missed, r.false_positives) == (1, 0, 2)
    assert r.delays == [0.0]


def test_a_detection_mid_window_scores_half_way_between_a_tp_and_a_fp() -> None:
    # changepoint at 0, one detection at 30 s: p = 0.5
    # standard: S = 0.4440485 -> 100 * (0.4440485 + 1) / 2 = 72.2024 -> 72.20
    # low_fp:   S = 0.3889542 -> 100 * 1.3889542 / 2 = 69.4477 -> 69.45
    # low_fn:   S = 0.4440485, N = -2 -> 100 * 2.4440485 / 3 = 81.4683 -> 81.47
    assert scores([([0.0], [30.0])]) == (72.20, 69.45, 81.47)
    assert round(100 * (MID_STANDARD + 1) / 2, 2) == 72.20
    assert round(100 * (MID_LOW_FP + 1) / 2, 2) == 69.45


def test_two_files_with_cut_windows_a_miss_and_a_false_positive() -> None:
    # file 1: changepoints 0 and 30 -> windows [0, 60] and [60, 90] (cut). One detection at 60:
    #   it is inside both (the boundary belongs to each): window 1 at p = 1 (A_fp), window 2 at
    #   p = 0 (A_tp). standard: -0.11 + 1 = 0.89; low_fp: -0.22 + 1 = 0.78; low_fn: 0.89.
    # file 2: changepoint 1000 (window [1000, 1060]) never detected; a detection at 500 is an FP.
    #   standard: -1 - 0.11 = -1.11; low_fp: -1 - 0.22 = -1.22; low_fn: -2 - 0.11 = -2.11.
    # 3 windows: N = -3 (low_fn: -6), P = 3.
    #   standard: S = 0.89 - 1.11 = -0.22 -> 100 * (-0.22 + 3) / 6 = 46.333 -> 46.33
    #   low_fp:   S = 0.78 - 1.22 = -0.44 -> 100 * 2.56 / 6 = 42.666 -> 42.67
    #   low_fn:   S = 0.89 - 2.11 = -1.22 -> 100 * (-1.22 + 6) / 9 = 53.111 -> 53.11
    files = [([0.0, 30.0], [60.0]), ([1000.0], [500.0])]
    assert scores(files) == (46.33, 42.67, 53.11)
    r = nab.nab(files)
    assert (r.windows, r.missed, r.false_positives) == (3, 1, 1)
    assert sorted(r.delays) == [30.0, 60.0]  # 60 - 0 and 60 - 30
    assert r.median_delay == 45.0


def test_the_window_end_is_inside_and_a_moment_later_is_a_false_positive() -> None:
    # detection exactly at c + 60: a true positive scoring A_fp = -0.11 (standard):
    #   S = -0.11 -> 100 * 0.89 / 2 = 44.50
    assert scores([([0.0], [60.0])])[0] == 44.5
    # at c + 60.5: outside, so the window is missed (-1) and the detection is an FP (-0.11):
    #   S = -1.11 -> 100 * (-1.11 + 1) / 2 = -5.50
    assert scores([([0.0], [60.5])])[0] == -5.5


def test_null_and_perfect_detectors_are_0_and_100() -> None:
    cps = [[10.0, 300.0, 700.0], [50.0]]
    null = [(c, []) for c in cps]
    perfect = [(c, list(c)) for c in cps]
    assert scores(null) == (0.0, 0.0, 0.0)
    assert scores(perfect) == (100.0, 100.0, 100.0)
    # a file without changepoints adds only its false positives: two FPs beside the perfect
    # detections: standard S = 4 - 2 * 0.11 = 3.78, N = -4, P = 4 -> 100 * 7.78 / 8 = 97.25;
    # low_fp S = 4 - 2 * 0.22 = 3.56 -> 100 * 7.56 / 8 = 94.50;
    # low_fn S = 3.78, N = -8 -> 100 * 11.78 / 12 = 98.1666 -> 98.17
    assert scores([*perfect, ([], [5.0, 6.0])]) == (97.25, 94.5, 98.17)


def test_no_windows_at_all_gives_nan_not_a_division_error() -> None:
    r = nab.nab([([], [1.0, 2.0])])
    assert math.isnan(r.tallies["standard"].normalised)
    assert r.false_positives == 2 and r.windows == 0
