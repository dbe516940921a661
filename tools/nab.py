"""The NAB score of changepoint detections, as SKAB's changepoint leaderboard computes it.

SKAB scores changepoint detectors with the TSAD framework's ``evaluating(true, prediction,
metric='nab', window_width='60s', anomaly_window_destination='righter')``, a variant of the
Numenta Anomaly Benchmark (NAB) score. This module implements that published definition from its
description (no code of TSAD or NAB is used):

1. **Windows.** Each true changepoint at time ``c`` opens a detection window ``[c, c + width]``
   (``width`` = 60 s, to the right: nothing can be detected before it happens). Where two windows
   overlap, the later one starts where the earlier one ends (TSAD's "cut right window").
2. **Matching.** A detection at ``t`` is inside window ``[a, b]`` when ``a <= t <= b``. The first
   detection inside a window is its true positive; further detections inside a window count for
   nothing. A window without a detection is missed (a false negative). Every detection inside no
   window is a false positive.
3. **Scores**, per application profile (``A_tp``, ``A_fp``, ``A_fn``; ``A_tn`` is not used):
   a true positive at relative position ``p = (t - a) / (b - a)`` scores

       k = min(floor(1000 p), 999),  x = -pi/2 + k pi / 999
       s = A_fp + (A_tp - A_fp) (1 - tanh(x) / tanh(pi/2)) / 2

   (TSAD's "improved" scaled sigmoid on a grid of 1000 points: ``A_tp`` at the changepoint,
   ``(A_tp + A_fp) / 2`` mid-window, ``A_fp`` at its end); a false positive adds ``A_fp``
   (negative) wherever it lies; a missed window adds ``A_fn`` (negative).
4. **Normalisation.** Over all files: ``S`` = sum of the scores, ``N`` = windows x ``A_fn`` (the
   null detector, which detects nothing), ``P`` = windows x ``A_tp`` (the perfect detector, one
   detection at each changepoint). NAB = ``100 (S - N) / (P - N)``, rounded to 2 decimals: 0 is
   the null detector, 100 the perfect one, and a detector that fires too often goes below 0.

The profiles are NAB's: standard (``A_fp`` = -0.11, ``A_fn`` = -1), reward low FP (``A_fp`` =
-0.22) and reward low FN (``A_fn`` = -2), all with ``A_tp`` = 1.

Where this differs from Numenta's original NAB scorer (on purpose, as TSAD does): the original
scores a false positive by the sigmoid of its distance from the window before it (an FP just after
a window costs less than ``A_fp``) and reads the sigmoid continuously, with a steepness of 5, over
windows centred on the anomaly. TSAD, and therefore SKAB's leaderboard, charges every false
positive ``A_fp`` wherever it lies and samples its tanh curve on a 1000-point grid.

Times are seconds (floats). Everything here is pure and numpy-free.
"""

from __future__ import annotations

import bisect
import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

WINDOW_SECONDS = 60.0  # SKAB's leaderboard: 60 s to the right of each changepoint
GRID = 1000  # points of TSAD's scoring curve over one window


@dataclass(frozen=True)
class Profile:
    """NAB's application profile: the weights of a true positive, a false positive, a true
    negative (unused by the score) and a false negative."""

    a_tp: float
    a_fp: float
    a_tn: float
    a_fn: float


PROFILES: dict[str, Profile] = {
    "standard": Profile(1.0, -0.11, 1.0, -1.0),
    "low_fp": Profile(1.0, -0.22, 1.0, -1.0),
    "low_fn": Profile(1.0, -0.11, 1.0, -2.0),
}


def detection_windows(
    changepoints: Iterable[float], width: float = WINDOW_SECONDS
) -> list[tuple[float, float]]:
    """``[c, c + width]`` for each changepoint ``c`` (sorted); an overlapping window starts where
    the one before it ends."""
    out: list[tuple[float, float]] = []
    for c in sorted(changepoints):
        start, end = c, c + width
        if out and out[-1][1] >= start:
            start = out[-1][1]
        out.append((start, end))
    return out


def sigmoid_score(start: float, t: float, end: float, a_tp: float, a_fp: float) -> float:
    """The score of a first detection at ``t`` in the window ``[start, end]``."""
    rel = (t - start) / (end - start) if end > start else 0.0
    k = min(max(math.floor(rel * GRID), 0), GRID - 1)
    x = -math.pi / 2 + k * math.pi / (GRID - 1)
    return a_fp + (a_tp - a_fp) * (1.0 - math.tanh(x) / math.tanh(math.pi / 2)) / 2.0


@dataclass(frozen=True)
class Match:
    """One file's detections against its windows."""

    windows: tuple[tuple[float, float], ...]
    #: window index -> (its changepoint, the first detection inside it)
    hits: dict[int, tuple[float, float]] = field(default_factory=dict)
    missed: tuple[int, ...] = ()
    false_positives: tuple[float, ...] = ()

    @property
    def delays(self) -> list[float]:
        """Seconds from each detected changepoint to its first detection."""
        return [t - c for c, t in self.hits.values()]


def match(
    changepoints: Iterable[float], detections: Iterable[float], width: float = WINDOW_SECONDS
) -> Match:
    """Sort ``detections`` into true positives (the first in each window), false positives (in
    no window) and missed windows."""
    cps = sorted(changepoints)
    wins = detection_windows(cps, width)
    dets = sorted(detections)
    hits: dict[int, tuple[float, float]] = {}
    missed: list[int] = []
    for i, (a, b) in enumerate(wins):
        j = bisect.bisect_left(dets, a)
        if j < len(dets) and dets[j] <= b:
            hits[i] = (cps[i], dets[j])
        else:
            missed.append(i)
    fps = tuple(t for t in dets if not any(a <= t <= b for a, b in wins))
    return Match(tuple(wins), hits, tuple(missed), fps)


@dataclass(frozen=True)
class Tally:
    """Summed raw scores of one profile: the detector's, the null detector's, the perfect one's."""

    score: float = 0.0
    null: float = 0.0
    perfect: float = 0.0

    def __add__(self, other: Tally) -> Tally:
        return Tally(self.score + other.score, self.null + other.null, self.perfect + other.perfect)

    @property
    def normalised(self) -> float:
        """100 (S - N) / (P - N), NaN without windows."""
        span = self.perfect - self.null
        return 100.0 * (self.score - self.null) / span if span else math.nan


def tally(m: Match, profile: Profile) -> Tally:
    """The raw score of one file's :class:`Match` under ``profile``."""
    s = profile.a_fp * len(m.false_positives) + profile.a_fn * len(m.missed)
    for i, (_, t) in m.hits.items():
        a, b = m.windows[i]
        s += sigmoid_score(a, t, b, profile.a_tp, profile.a_fp)
    n = len(m.windows)
    return Tally(s, n * profile.a_fn, n * profile.a_tp)


@dataclass
class NabResult:
    """NAB over a set of files, per profile, with the counts the leaderboard quotes."""

    tallies: dict[str, Tally]
    windows: int
    missed: int
    false_positives: int
    delays: list[float]

    def score(self, profile: str) -> float:
        return round(self.tallies[profile].normalised, 2)

    @property
    def median_delay(self) -> float:
        return statistics.median(self.delays) if self.delays else math.nan


def nab(
    files: Sequence[tuple[Sequence[float], Sequence[float]]], width: float = WINDOW_SECONDS
) -> NabResult:
    """NAB of ``(changepoints, detections)`` pairs, one per file, summed over the files."""
    tallies = {name: Tally() for name in PROFILES}
    windows = missed = fps = 0
    delays: list[float] = []
    for cps, dets in files:
        m = match(cps, dets, width)
        for name, prof in PROFILES.items():
            tallies[name] = tallies[name] + tally(m, prof)
        windows += len(m.windows)
        missed += len(m.missed)
        fps += len(m.false_positives)
        delays += m.delays
    return NabResult(tallies, windows, missed, fps, delays)
