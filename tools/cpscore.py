"""Changepoint scoring of replayed SKAB files: SKAB's NAB leaderboard protocol (tools/nab.py).

Used by ``tools/evaluate.py --task changepoint``. A detection is a ``change`` alert of the
agent's detector, at the time the detector raised it (the sample it had reached, never the
estimated change time it carries: that would be hindsight). The true changepoints are the rows
with ``changepoint`` = 1 after the first 400 of each file (SKAB's test part, as the leaderboard's
notebooks split it); detections come after commissioning anyway.

Beside the NAB scores the report gives, per detected changepoint, the seconds from the true change
to the first detection (``median_time_to_detect_s``), per alert the seconds from its own estimated
change (``time_to_detect`` of the alert record), and two data-blind references the metric needs
(NAB charges a false positive only 0.11 and the windows hold 28 % of the test rows):

- ``clock``: a detection every 60 s from row 400 on, whatever the data;
- ``random``: as many detections per file as the detector made, at random rows (mean of
  :data:`RANDOM_SEEDS` seeded draws).

A detector is only worth its score where it beats both.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nab
import numpy as np

from agent.detect.detector import Alert, AlertKind

SKIP_ROWS = 400
CLOCK_SECONDS = 60.0
RANDOM_SEEDS = 20

#: SKAB's changepoint leaderboard (README of waico/SKAB at b2c0d46): NAB standard, LowFP, LowFN,
#: missed changepoints, false positives; 34 files, 127 changepoints.
LEADERBOARD: tuple[tuple[str, float, float, float, int, int], ...] = (
    ("MSCRED", 32.42, 16.53, 40.28, 55, 342),
    ("Isolation forest", 26.16, 19.5, 30.82, 76, 135),
    ("T-squared+Q (PCA)", 25.35, 14.51, 31.33, 72, 232),
    ("Conv-AE", 23.61, 21.54, 27.55, 82, 23),
    ("LSTM-AE", 23.51, 20.11, 25.91, 88, 69),
    ("T-squared", 19.54, 10.2, 24.31, 70, 106),
    ("MSET", 13.84, 10.22, 17.37, 96, 66),
)


@dataclass
class FileChanges:
    """One labelled file: its true changepoints, the detector's change alerts, its raises."""

    name: str
    times: np.ndarray
    changepoints: list[float]
    changes: list[Alert]
    episodes: list[Alert]  # the raises and clears
    onset: float | None  # first anomalous row after row 400 (the fault's start), if any

    @property
    def detections(self) -> list[float]:
        return [a.time for a in self.changes]


def file_changes(
    name: str,
    times: np.ndarray,
    cp_labels: np.ndarray,
    labels: np.ndarray | None,
    alerts: Sequence[Alert],
) -> FileChanges:
    t = np.asarray(times, dtype=float)
    cps = [float(t[i]) for i in np.flatnonzero(cp_labels) if i >= SKIP_ROWS]
    onset = None
    if labels is not None:
        idx = [i for i in np.flatnonzero(labels) if i >= SKIP_ROWS]
        onset = float(t[idx[0]]) if idx else None
    start = t[SKIP_ROWS] if len(t) > SKIP_ROWS else np.inf
    return FileChanges(
        name,
        t,
        cps,
        [a for a in alerts if a.kind is AlertKind.CHANGE and a.time >= start],
        [a for a in alerts if a.kind is not AlertKind.CHANGE],
        onset,
    )


def clock_detections(times: np.ndarray) -> list[float]:
    """Data-blind: one detection every :data:`CLOCK_SECONDS` from row 400 on."""
    t = np.asarray(times, dtype=float)
    if len(t) <= SKIP_ROWS:
        return []
    return [float(x) for x in np.arange(t[SKIP_ROWS], t[-1] + 1e-9, CLOCK_SECONDS)]


def random_detections(times: np.ndarray, count: int, rng: np.random.Generator) -> list[float]:
    """Data-blind: ``count`` distinct rows after row 400, drawn at random."""
    t = np.asarray(times, dtype=float)[SKIP_ROWS:]
    k = min(count, len(t))
    return sorted(float(x) for x in rng.choice(t, size=k, replace=False)) if k else []


def _scores(r: nab.NabResult) -> dict[str, float]:
    return {
        "nab_standard": r.score("standard"),
        "nab_lowfp": r.score("low_fp"),
        "nab_lowfn": r.score("low_fn"),
    }


def _median(xs: Sequence[float]) -> float | None:
    return round(statistics.median(xs), 2) if xs else None


@dataclass
class ChangeReport:
    """The labelled files of one evaluation run, scored together."""

    files: list[FileChanges] = field(default_factory=list)

    def result(self) -> nab.NabResult:
        return nab.nab([(f.changepoints, f.detections) for f in self.files])

    def baseline(self, name: str) -> dict[str, float]:
        """NAB of a data-blind detector on the same files: ``"clock"`` or ``"random"``."""
        if name == "clock":
            r = nab.nab([(f.changepoints, clock_detections(f.times)) for f in self.files])
            out = _scores(r)
            out.update(missed=r.missed, false_positives=r.false_positives)
            return out
        runs = []
        for seed in range(RANDOM_SEEDS):
            rng = np.random.default_rng(seed)
            pairs = [
                (f.changepoints, random_detections(f.times, len(f.detections), rng))
                for f in self.files
            ]
            runs.append(_scores(nab.nab(pairs)))
        return {k: round(float(np.mean([r[k] for r in runs])), 2) for k in runs[0]}

    def onset_delays(self) -> tuple[list[float], list[float]]:
        """Seconds from each fault's onset to the first change alert and to the first raise at
        or after it (files where one came before the fault ended are counted)."""
        changes, raises = [], []
        for f in self.files:
            if f.onset is None:
                continue
            c = [a.time - f.onset for a in f.changes if a.time >= f.onset]
            r = [
                a.time - f.onset
                for a in f.episodes
                if a.kind is AlertKind.RAISE and a.time >= f.onset
            ]
            if c:
                changes.append(min(c))
            if r:
                raises.append(min(r))
        return changes, raises

    def summary(self) -> dict[str, Any]:
        r = self.result()
        est = [
            a.time_to_detect for f in self.files for a in f.changes if a.time_to_detect is not None
        ]
        onset_change, onset_raise = self.onset_delays()
        return {
            **_scores(r),
            "missed": r.missed,
            "false_positives": r.false_positives,
            "files": len(self.files),
            "changepoints": r.windows,
            "detections": sum(len(f.changes) for f in self.files),
            "median_time_to_detect_s": _median(r.delays),
            "median_estimated_time_to_detect_s": _median(est),
            "median_onset_to_change_s": _median(onset_change),
            "median_onset_to_raise_s": _median(onset_raise),
            "baselines": {"clock_60s": self.baseline("clock"), "random": self.baseline("random")},
        }


def format_table(summary: dict[str, Any], label: str) -> str:
    s = summary
    rows = [("method", "NAB standard", "LowFP", "LowFN", "missed", "FPs")]
    rows.append(
        (
            f"{label}, {s['files']} files, {s['changepoints']} changepoints",
            *(f"{s[k]:.2f}" for k in ("nab_standard", "nab_lowfp", "nab_lowfn")),
            str(s["missed"]),
            str(s["false_positives"]),
        )
    )
    clock, rnd = s["baselines"]["clock_60s"], s["baselines"]["random"]
    rows.append(
        (
            "data-blind: a detection every 60 s",
            *(f"{clock[k]:.2f}" for k in ("nab_standard", "nab_lowfp", "nab_lowfn")),
            str(clock["missed"]),
            str(clock["false_positives"]),
        )
    )
    rows.append(
        (
            f"data-blind: as many detections, random rows ({RANDOM_SEEDS} seeds)",
            *(f"{rnd[k]:.2f}" for k in ("nab_standard", "nab_lowfp", "nab_lowfn")),
            "",
            "",
        )
    )
    rows += [
        (f"{n} (published, 34 files)", f"{a:.2f}", f"{b:.2f}", f"{c:.2f}", str(m), str(fp))
        for n, a, b, c, m, fp in LEADERBOARD
    ]
    return markdown_table(rows)


def markdown_table(rows: Sequence[Sequence[str]]) -> str:
    """``rows`` (the first is the header) as a Markdown table with aligned columns."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    out = []
    for i, r in enumerate(rows):
        out.append("| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |")
        if i == 0:
            out.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(out)


def format_files(report: ChangeReport) -> str:
    """Per file: each true changepoint with the delay of its first detection, then every alert
    (change, raise, clear) with its own estimate of how long after the change it came."""
    lines = []
    for f in report.files:
        m = nab.match(f.changepoints, f.detections)
        t0 = f.times[0] if len(f.times) else 0.0
        found = {i: t for i, (_, t) in m.hits.items()}
        cps = ", ".join(
            f"{c - t0:.0f}s: " + (f"+{found[i] - c:.0f}s" if i in found else "missed")
            for i, c in enumerate(sorted(f.changepoints))
        )
        lines.append(f"{f.name}: changepoints [{cps}]; false positives {len(m.false_positives)}")
        for a in sorted([*f.changes, *f.episodes], key=lambda a: a.time):
            ttd = a.time_to_detect
            est = "no change estimate" if ttd is None else f"{ttd:.0f}s after its estimated change"
            lines.append(
                f"    {a.kind.value:6} at {a.time - t0:5.0f}s, {est} "
                f"({', '.join(n for n, _ in a.channels)})"
            )
    return "\n".join(lines)


def write_predictions(path: Path, stamps: Sequence[str], times: np.ndarray, f: FileChanges) -> None:
    """``datetime;changepoint`` per input row: 1 on the rows where a change alert was raised."""
    flags = np.zeros(len(stamps), dtype=int)
    t = np.asarray(times, dtype=float)
    for x in f.detections:
        flags[int(np.searchsorted(t, x))] = 1
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = ["datetime;changepoint"] + [f"{s};{v}" for s, v in zip(stamps, flags, strict=True)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
