#!/usr/bin/env python3
"""Score the on-device anomaly detector by SKAB's outlier- and changepoint-detection protocols.

    tools/evaluate.py --data DIR [--task outlier|changepoint] [--model NAME]
                      [--predictions-out OUT] [--plot DIR] [--per-file] [--json]
                      [--zero-model] [--threshold-rule] [--two-fold]

Every SKAB-format CSV under DIR (recursively; ``;``-separated, a ``datetime`` column and the eight
sensor columns, optionally ``anomaly`` and ``changepoint``) is replayed sample by sample through
``agent.detect.detector.Detector`` with the int8 model in the real TFLite interpreter. Each
file is a fresh device: it commissions on its first 400 rows (no alerts there). Scoring is
point-wise on the rows
after the first 400 of each labelled file, TP/FP/FN/TN summed over all files:

    F1 = TP / (TP + (FN + FP) / 2),  FAR = FP / (FP + TN) * 100,  MAR = FN / (FN + TP) * 100

Files without an ``anomaly`` column still get predictions and are not scored. ``--predictions-out``
writes, for each input file, ``datetime;anomaly`` (0/1), one row per input row, at the same relative
path under OUT. ``--plot DIR`` draws, for each input file, a PNG at the same relative path under
DIR (``.png`` for ``.csv``): the eight channels, the anomaly score with its threshold, and the
predicted and true anomaly spans shaded (matplotlib, from the ``dev`` extra; the agent never needs
it). With ``--json`` the last line is one JSON object: f1, far, mar, files, rows (scored files and
scored rows) and a few more keys.

``--task changepoint`` scores the detector's ``change`` alerts instead, by SKAB's changepoint
leaderboard: the NAB score with a 60 s window to the right of each true changepoint (column
``changepoint``, rows after the first 400), standard, LowFP and LowFN profiles (tools/nab.py,
tools/cpscore.py). A detection counts at the time the detector raised it. ``--json`` then gives
nab_standard, nab_lowfp, nab_lowfn, missed, false_positives, files, median_time_to_detect_s and
more; ``--predictions-out`` writes ``datetime;changepoint`` (1 on the rows where a change was
raised) per input file; ``--per-file`` lists each changepoint with the delay of its first
detection and every alert (change, raise, clear) with its own time to detect. The anomaly
decisions, and so the outlier task's scores, are the same either way.

**What the model adds** (outlier task). ``--zero-model`` replaces the anomaly model's
reconstruction by zeros (:class:`ZeroModel`): the detector then scores the largest scaled feature
of the newest step, with everything else unchanged (the commissioning scaler, the manifest's
feature spec and normal scales, hysteresis, reference tracking). ``--threshold-rule`` replays the
files at each threshold of :data:`THRESHOLDS` and scores at the one the shipped models' rule
picks (tools/train_models.py: the highest F1 with FAR <= :data:`FAR_CAP` %, ties to the higher
threshold), so a model and its ablation are compared each at its own threshold; the JSON gives the
whole sweep. ``--two-fold`` (implies the rule) also picks the threshold on one half of the files
(alternate files of each folder, as tools/train_models.py splits them) and scores the other:
held-out thresholds, not a held-out model (the shipped models were trained on every file).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import re
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import cpscore  # noqa: E402

from agent.detect.changepoint import ChangeSettings  # noqa: E402
from agent.detect.detector import Alert, AlertKind, Detector, DetectSettings  # noqa: E402
from agent.detect.features import CHANNELS  # noqa: E402
from agent.detect.inference import RUNTIMES, Inference, TFLiteModel, load_manifest  # noqa: E402

SKIP_ROWS = 400  # SKAB: the first 400 rows of each file are the training (commissioning) part
#: The threshold rule of the shipped anomaly models (tools/train_models.py) and of
#: ``--threshold-rule``: the highest F1 with FAR <= FAR_CAP % over these thresholds.
FAR_CAP = 10.0
THRESHOLDS = tuple(round(0.5 + 0.05 * i, 2) for i in range(21))  # 0.50 .. 1.50

#: The SKAB outlier-detection leaderboard as quoted in issue 4 (F1, FAR %, MAR %).
LEADERBOARD: tuple[tuple[str, float, float, float], ...] = (
    ("Conv-AE", 0.78, 13.55, 28.02),
    ("MSET", 0.78, 39.73, 14.13),
    ("T²+Q (PCA)", 0.76, 26.62, 24.92),
    ("LSTM-AE", 0.74, 29.96, 25.92),
    ("Isolation forest", 0.29, 2.56, 82.89),
)


class DataError(ValueError):
    """A CSV file is not in SKAB format."""


@dataclass(frozen=True)
class SkabFile:
    """One experiment: timestamps (as written and as seconds), the channel rows, labels if any
    (``labels``: the ``anomaly`` column, ``changepoints``: the ``changepoint`` column)."""

    path: Path
    stamps: list[str]
    times: np.ndarray
    rows: np.ndarray
    labels: np.ndarray | None
    changepoints: np.ndarray | None = None

    @property
    def labelled(self) -> bool:
        return self.labels is not None


def _parse_time(stamp: str, index: int) -> float:
    try:
        return dt.datetime.fromisoformat(stamp).replace(tzinfo=dt.UTC).timestamp()
    except ValueError:
        try:
            return float(stamp)
        except ValueError:
            return float(index)  # unparseable stamps: fall back to the row number (1 Hz)


def read_skab_csv(path: str | Path, channels: Sequence[str] = CHANNELS) -> SkabFile:
    """Read one SKAB-format CSV. Raises DataError when a channel column is missing."""
    p = Path(path)
    text = p.read_text(encoding="utf-8-sig")
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if not lines:
        raise DataError(f"{p}: empty file")
    header = [h.strip() for h in lines[0].split(";")]
    missing = [c for c in channels if c not in header]
    if missing:
        raise DataError(f"{p}: not a SKAB file (missing columns: {', '.join(missing)})")
    cols = [header.index(c) for c in channels]
    t_col = header.index("datetime") if "datetime" in header else None
    a_col = header.index("anomaly") if "anomaly" in header else None
    c_col = header.index("changepoint") if "changepoint" in header else None
    stamps: list[str] = []
    rows = np.empty((len(lines) - 1, len(channels)))
    labels = np.zeros(len(lines) - 1, dtype=bool) if a_col is not None else None
    cps = np.zeros(len(lines) - 1, dtype=bool) if c_col is not None else None
    for i, line in enumerate(lines[1:]):
        parts = line.split(";")
        try:
            rows[i] = [float(parts[c]) for c in cols]
            if labels is not None:
                labels[i] = float(parts[a_col]) > 0.5
            if cps is not None:
                cps[i] = float(parts[c_col]) > 0.5
        except (IndexError, ValueError) as err:
            raise DataError(f"{p}: line {i + 2}: {err}") from None
        stamps.append(parts[t_col].strip() if t_col is not None else str(i))
    times = np.array([_parse_time(s, i) for i, s in enumerate(stamps)])
    return SkabFile(p, stamps, times, rows, labels, cps)


def _natural_key(p: Path) -> list[Any]:
    return [int(s) if s.isdigit() else s for s in re.split(r"(\d+)", str(p))]


def find_csv(data: Path) -> list[Path]:
    """Every .csv under ``data`` (or ``data`` itself), in natural order."""
    if data.is_file():
        return [data]
    return sorted((p for p in data.rglob("*.csv") if p.is_file()), key=_natural_key)


@dataclass(frozen=True)
class Confusion:
    tp: int = 0
    fp: int = 0
    fn: int = 0
    tn: int = 0

    def __add__(self, other: Confusion) -> Confusion:
        return Confusion(
            self.tp + other.tp, self.fp + other.fp, self.fn + other.fn, self.tn + other.tn
        )

    @property
    def rows(self) -> int:
        return self.tp + self.fp + self.fn + self.tn

    @property
    def f1(self) -> float:
        d = self.tp + (self.fn + self.fp) / 2
        return self.tp / d if d else math.nan

    @property
    def far(self) -> float:
        d = self.fp + self.tn
        return self.fp / d * 100 if d else math.nan

    @property
    def mar(self) -> float:
        d = self.fn + self.tp
        return self.fn / d * 100 if d else math.nan

    def scores(self) -> dict[str, float | None]:
        """F1, FAR and MAR rounded as the JSON reports them (None where undefined)."""

        def num(v: float, nd: int) -> float | None:
            return None if math.isnan(v) else round(v, nd)

        return {"f1": num(self.f1, 4), "far": num(self.far, 2), "mar": num(self.mar, 2)}


def confusion(labels: np.ndarray, predicted: np.ndarray, skip: int = SKIP_ROWS) -> Confusion:
    """Point-wise confusion counts on rows ``skip`` and later."""
    y = np.asarray(labels, dtype=bool)[skip:]
    p = np.asarray(predicted, dtype=bool)[skip:]
    if len(y) != len(p):
        raise ValueError("labels and predictions differ in length")
    return Confusion(
        int(np.sum(y & p)), int(np.sum(~y & p)), int(np.sum(y & ~p)), int(np.sum(~y & ~p))
    )


def write_predictions(path: Path, stamps: Sequence[str], predicted: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = ["datetime;anomaly"]
    lines += [f"{s};{int(bool(v))}" for s, v in zip(stamps, predicted, strict=True)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


@dataclass
class FileResult:
    name: str
    rows: int
    predicted: np.ndarray
    scores: np.ndarray
    alerts: int
    confusion: Confusion | None
    threshold: float = math.nan  # the detector's anomaly threshold (scores above it count)
    events: list[Alert] = field(default_factory=list)  # every alert, changes included


@dataclass
class Report:
    files: list[FileResult] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    @property
    def total(self) -> Confusion:
        c = Confusion()
        for f in self.files:
            if f.confusion is not None:
                c = c + f.confusion
        return c

    @property
    def scored(self) -> list[FileResult]:
        return [f for f in self.files if f.confusion is not None]

    def summary(self) -> dict[str, Any]:
        t = self.total
        return t.scores() | {
            "files": len(self.scored),
            "rows": t.rows,
            "tp": t.tp,
            "fp": t.fp,
            "fn": t.fn,
            "tn": t.tn,
            "unlabelled_files": len(self.files) - len(self.scored),
            "skipped_files": len(self.skipped),
        }


DetectorFactory = Callable[[], Detector]
T = TypeVar("T")


class ZeroModel:
    """``--zero-model``: the anomaly model with its reconstruction replaced by zeros, one output
    per input value as the autoencoder gives (the module docstring, "What the model adds")."""

    def __init__(self, model: Inference) -> None:
        self.name = f"{model.name}, output zeros"
        self.runtime = "none"

    def predict(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x)
        return np.zeros((len(x), int(np.prod(x.shape[1:]))), dtype=np.float32)


def alternate_halves(items: Sequence[T], folder: Callable[[T], str]) -> tuple[list[T], list[T]]:
    """Alternate items of each folder, in the order given: half A (first, third, ...) and B."""
    a: list[T] = []
    b: list[T] = []
    by_folder: dict[str, list[T]] = {}
    for item in items:
        by_folder.setdefault(folder(item), []).append(item)
    for group in by_folder.values():
        for i, item in enumerate(group):
            (a if i % 2 == 0 else b).append(item)
    return a, b


@dataclass
class RuleRun:
    """The files replayed at each threshold of :data:`THRESHOLDS`; ``threshold`` the rule's
    pick (None: no threshold keeps FAR <= FAR_CAP) and ``report`` the replay at it."""

    sweep: list[tuple[float, Report]]
    threshold: float | None
    report: Report | None


def threshold_rule(
    data: Path, make_at: Callable[[float], DetectorFactory], files: Sequence[Path]
) -> RuleRun:
    """Replay ``files`` through a detector at each threshold; the rule's pick (ties: higher)."""
    sweep = [(thr, evaluate(data, make_at(thr), files=files)) for thr in THRESHOLDS]
    best: tuple[float, float, Report] | None = None
    for thr, report in sweep:
        t = report.total
        if math.isnan(t.f1):  # no anomaly rows and no alarms: nothing to rank it by
            continue
        if t.far <= FAR_CAP and (best is None or (t.f1, thr) >= best[:2]):
            best = (t.f1, thr, report)
    return RuleRun(sweep, best[1] if best else None, best[2] if best else None)


def run_file(make_detector: DetectorFactory, f: SkabFile) -> FileResult:
    """Replay one file through a fresh detector (a fresh device)."""
    det = make_detector()
    res = det.feed(f.times, f.rows)
    conf = confusion(f.labels, res.anomalous) if f.labels is not None else None
    episodes = sum(a.kind is not AlertKind.CHANGE for a in res.alerts)  # raises and clears
    return FileResult(
        f.path.name,
        len(f.rows),
        res.anomalous,
        res.scores,
        episodes,
        conf,
        det.threshold,
        list(res.alerts),
    )


def evaluate(
    data: Path,
    make_detector: DetectorFactory,
    *,
    predictions_out: Path | None = None,
    plot_dir: Path | None = None,
    files: Iterable[Path] | None = None,
    changes: cpscore.ChangeReport | None = None,
) -> Report:
    """Replay every SKAB file under ``data`` (or the given ``files``) and score them; write
    predictions under ``predictions_out`` and plots under ``plot_dir`` when given. With
    ``changes``, each file with a ``changepoint`` column is added to it, and the predictions
    written are the changepoint ones."""
    report = Report()
    base = data if data.is_dir() else data.parent
    for path in files if files is not None else find_csv(data):
        try:
            f = read_skab_csv(path)
        except DataError as err:
            report.skipped.append(str(err))
            continue
        r = run_file(make_detector, f)
        r.name = str(path.relative_to(base)) if path.is_relative_to(base) else path.name
        report.files.append(r)
        fc = None
        if changes is not None and f.changepoints is not None:
            fc = cpscore.file_changes(r.name, f.times, f.changepoints, f.labels, r.events)
            changes.files.append(fc)
        if predictions_out is not None and changes is not None:
            fc = fc or cpscore.file_changes(r.name, f.times, np.zeros(0), None, r.events)
            cpscore.write_predictions(predictions_out / r.name, f.stamps, f.times, fc)
        elif predictions_out is not None:
            write_predictions(predictions_out / r.name, f.stamps, r.predicted)
        if plot_dir is not None:
            plot_file(plot_dir / Path(r.name).with_suffix(".png"), f, r)
    return report


# --- plots ------------------------------------------------------------------------------------
PLOT_WIDTH = 12.0  # inches; at PLOT_DPI a plot is 1200 px wide
PLOT_DPI = 100
TRUE_COLOUR = "tab:red"
PREDICTED_COLOUR = "tab:blue"


def spans(mask: np.ndarray) -> list[tuple[int, int]]:
    """The runs of True in ``mask`` as ``(start, stop)`` row ranges (stop exclusive)."""
    m = np.concatenate(([False], np.asarray(mask, dtype=bool), [False]))
    edges = np.flatnonzero(m[1:] != m[:-1])
    return [(int(a), int(b)) for a, b in zip(edges[::2], edges[1::2], strict=True)]


def _minor_log_label(value: float, _pos: int) -> str:
    """Label the 2s and 5s of a log axis (plain numbers), leave the other minor ticks bare."""
    if not value > 0:
        return ""
    mantissa = value / 10 ** math.floor(math.log10(value))
    return f"{value:g}" if round(mantissa, 6) in (2.0, 5.0) else ""


def plot_file(path: Path, f: SkabFile, r: FileResult) -> Path:
    """Draw one replayed file to the PNG ``path``: channels, score and threshold, spans.

    Uses matplotlib's Agg canvas directly (no pyplot, no display, no global figure state).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch
    from matplotlib.ticker import FuncFormatter

    n = len(f.rows)
    minutes = (f.times - f.times[0]) / 60.0 if n else np.zeros(0)
    step = float(np.median(np.diff(minutes))) if n > 1 else 1 / 60
    edges = np.append(minutes, minutes[-1] + step) if n else np.zeros(1)  # row i: edges[i..i+1]
    true_spans = spans(f.labels) if f.labels is not None else []
    predicted_spans = spans(r.predicted)

    channels = f.rows.shape[1]
    fig = Figure(figsize=(PLOT_WIDTH, 1.1 * channels + 2.6), dpi=PLOT_DPI)
    FigureCanvasAgg(fig)
    axes = fig.subplots(
        channels + 1, 1, sharex=True, gridspec_kw={"height_ratios": [1] * channels + [2]}
    )
    for ax in axes:
        for a, b in true_spans:
            ax.axvspan(edges[a], edges[b], color=TRUE_COLOUR, alpha=0.15, lw=0)
        for a, b in predicted_spans:
            ax.axvspan(edges[a], edges[b], ymax=0.5, color=PREDICTED_COLOUR, alpha=0.25, lw=0)
        if n > SKIP_ROWS:
            ax.axvline(minutes[SKIP_ROWS], color="0.4", lw=0.8, ls="--")
    for i, ax in enumerate(axes[:-1]):
        ax.plot(minutes, f.rows[:, i], color="0.15", lw=0.7)
        ax.set_ylabel(
            CHANNELS[i] if i < len(CHANNELS) else f"ch{i}",
            rotation=0,
            ha="right",
            va="center",
            fontsize=7,
        )
        ax.tick_params(labelsize=7)
    ax = axes[-1]
    scores = np.asarray(r.scores, dtype=float)
    finite = scores[np.isfinite(scores)]
    ax.plot(minutes, scores, color="black", lw=0.8, label="anomaly score")
    if math.isfinite(r.threshold):
        ax.axhline(r.threshold, color="tab:orange", lw=1.2, label=f"threshold {r.threshold:.3g}")
    if finite.size and finite.min() > 0:
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:g}"))
        ax.yaxis.set_minor_formatter(FuncFormatter(_minor_log_label))
    ax.set_ylabel("score", rotation=0, ha="right", va="center", fontsize=8)
    ax.set_xlabel("minutes from the first row")
    ax.tick_params(which="both", labelsize=7)
    handles, _ = ax.get_legend_handles_labels()
    handles += [
        Patch(color=TRUE_COLOUR, alpha=0.3, label="true anomaly"),
        Patch(color=PREDICTED_COLOUR, alpha=0.4, label="predicted anomaly (lower half)"),
    ]
    fig.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, 0.965), ncol=4, fontsize=8)
    c = r.confusion
    counts = f"TP {c.tp}  FP {c.fp}  FN {c.fn}  TN {c.tn}  F1 {c.f1:.3f}" if c else "no labels"
    fig.suptitle(
        f"{r.name}: {r.rows} rows, {r.alerts} alerts; {counts} "
        f"(scored after row {SKIP_ROWS}, dashed line)",
        fontsize=9,
    )
    fig.tight_layout(rect=(0, 0, 1, 0.94))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


def detector_factory(
    models: Path,
    model: str,
    *,
    runtime: str = "auto",
    num_threads: int = 1,
    classifier: str | None = None,
    threshold: float | None = None,
    changepoint: ChangeSettings | None = None,
    zero_model: bool = False,
) -> DetectorFactory:
    """Load the models once; each call builds a fresh detector (a fresh device) around them.
    Change alerts are on (``changepoint``: the CUSUM's settings; they do not touch the anomaly
    decisions). ``zero_model``: the anomaly model's output replaced by zeros
    (:class:`ZeroModel`)."""
    manifest = load_manifest(models)
    settings = DetectSettings(
        models_dir=models,
        model=model,
        classifier=classifier or "",
        runtime=runtime,
        num_threads=num_threads,
        threshold=threshold,
        changepoint=changepoint or ChangeSettings(alerts=True),
    )
    anomaly: Inference = TFLiteModel.open(manifest, model, runtime=runtime, num_threads=num_threads)
    if zero_model:
        anomaly = ZeroModel(anomaly)
    clf = None
    classes: Sequence[str] = ()
    if classifier:
        clf = TFLiteModel.open(manifest, classifier, runtime=runtime, num_threads=num_threads)
        classes = manifest.entry(classifier).raw.get("classes", ())
    entry = manifest.entry(model).raw

    def make() -> Detector:
        return Detector.from_entry(
            anomaly, entry, settings=settings, classifier=clf, classes=classes
        )

    return make


def format_table(report: Report, label: str) -> str:
    t = report.total
    rows = [("method", "F1", "FAR %", "MAR %")]
    rows.append((label, f"{t.f1:.3f}", f"{t.far:.2f}", f"{t.mar:.2f}"))
    rows += [(n, f"{f:.2f}", f"{fa:.2f}", f"{m:.2f}") for n, f, fa, m in LEADERBOARD]
    return cpscore.markdown_table(rows)


def format_files(report: Report) -> str:
    lines = ["file                 rows alerts    TP    FP    FN    TN"]
    for f in report.files:
        c = f.confusion
        counts = f"{c.tp:5d} {c.fp:5d} {c.fn:5d} {c.tn:5d}" if c else "  (no labels)"
        lines.append(f"{f.name:<20} {f.rows:4d} {f.alerts:6d} {counts}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, required=True, help="folder of SKAB-format CSV files")
    ap.add_argument(
        "--task",
        choices=("outlier", "changepoint"),
        default="outlier",
        help="SKAB leaderboard to score by: outlier (F1/FAR/MAR) or changepoint (NAB)",
    )
    ap.add_argument("--models", type=Path, default=ROOT / "models", help="folder with manifest")
    ap.add_argument("--model", default="skab-ae", help="anomaly model name in the manifest")
    ap.add_argument("--classifier", default="", help="also run this classifier (verdicts)")
    ap.add_argument("--threshold", type=float, default=None, help="override the threshold")
    ap.add_argument("--runtime", choices=RUNTIMES, default="auto")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--predictions-out", type=Path, default=None)
    ap.add_argument("--plot", type=Path, default=None, metavar="DIR", help="a PNG per file")
    ap.add_argument("--per-file", action="store_true", help="print counts per file")
    ap.add_argument("--json", action="store_true", help="print a JSON summary as the last line")
    ap.add_argument(
        "--zero-model",
        action="store_true",
        help="ablation: the anomaly model's reconstruction replaced by zeros",
    )
    ap.add_argument(
        "--threshold-rule",
        action="store_true",
        help=f"replay at thresholds {THRESHOLDS[0]}..{THRESHOLDS[-1]}; score at the best F1 "
        f"with FAR <= {FAR_CAP:g} %%",
    )
    ap.add_argument(
        "--two-fold",
        action="store_true",
        help="with the rule: also pick on one half of the files and score the other",
    )
    args = ap.parse_args(argv)
    if not args.data.exists():
        ap.error(f"{args.data}: no such file or folder")
    args.threshold_rule = args.threshold_rule or args.two_fold
    if args.threshold_rule and (args.threshold is not None or args.task != "outlier"):
        ap.error("--threshold-rule and --two-fold pick the threshold of the outlier task")
    if args.plot is not None:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            ap.error("--plot needs matplotlib: pip install -e '.[dev]'")

    def make_at(threshold: float | None) -> DetectorFactory:
        return detector_factory(
            args.models,
            args.model,
            runtime=args.runtime,
            num_threads=args.threads,
            classifier=args.classifier or None,
            threshold=threshold,
            zero_model=args.zero_model,
        )

    extra: dict[str, Any] = {"zero_model": args.zero_model}
    if args.threshold_rule:
        paths = find_csv(args.data)
        rule = threshold_rule(args.data, make_at, paths)
        extra["sweep"] = [r.total.scores() | {"threshold": thr} for thr, r in rule.sweep]
        if rule.threshold is None:
            print(f"no threshold of {THRESHOLDS[0]}..{THRESHOLDS[-1]} keeps FAR <= {FAR_CAP:g} %")
            _print_rule(extra)
            if args.json:
                print(json.dumps(extra | {"model": args.model, "threshold": None}, sort_keys=True))
            return 1
        args.threshold = rule.threshold
        if args.two_fold:
            extra["two_fold"] = two_fold(args.data, make_at, paths)
    make = make_at(args.threshold)
    changes = cpscore.ChangeReport() if args.task == "changepoint" else None
    report = evaluate(
        args.data, make, predictions_out=args.predictions_out, plot_dir=args.plot, changes=changes
    )
    if changes is not None:
        return _report_changes(args, report, changes)
    for msg in report.skipped:
        print(f"skipped: {msg}", file=sys.stderr)
    unlabelled = len(report.files) - len(report.scored)
    print(
        f"{len(report.files)} files replayed ({len(report.scored)} labelled and scored, "
        f"{unlabelled} without labels: predictions only), {report.total.rows} rows scored "
        f"(after the first {SKIP_ROWS} of each file)"
    )
    if args.per_file:
        print(format_files(report))
    if report.scored:
        label = f"{args.model} (int8, this repo)"
        if args.zero_model:
            label = f"{args.model}'s detector, model output zeros (ablation)"
        if args.threshold_rule:
            label += f", threshold {args.threshold:g} by the rule"
        print(format_table(report, label))
        _print_rule(extra)
    else:
        print("no labelled files: nothing to score")
    if args.predictions_out is not None:
        print(f"predictions written under {args.predictions_out}")
    if args.plot is not None:
        print(f"{len(report.files)} plots written under {args.plot}")
    if args.json:
        summary = report.summary() | extra
        summary["model"] = args.model
        summary["threshold"] = report.files[0].threshold if report.files else args.threshold
        print(json.dumps(summary, sort_keys=True))
    return 0


def two_fold(
    data: Path, make_at: Callable[[float], DetectorFactory], paths: Sequence[Path]
) -> dict[str, Any]:
    """``--two-fold``: the rule's threshold picked on each half of the labelled files, scored on
    the other half; the two held-out halves' counts summed."""
    base = data if data.is_dir() else data.parent
    labelled = []
    for path in paths:
        try:
            if read_skab_csv(path).labels is not None:
                labelled.append(path)
        except DataError:
            continue
    halves = alternate_halves(labelled, lambda p: p.relative_to(base).parts[0])
    total = Confusion()
    thresholds: list[float | None] = []
    for tune, held in (halves, halves[::-1]):
        rule = threshold_rule(data, make_at, tune)
        thresholds.append(rule.threshold)
        if rule.threshold is None:
            return {"thresholds": thresholds, "f1": None, "far": None, "mar": None}
        total = total + evaluate(data, make_at(rule.threshold), files=held).total
    return total.scores() | {"thresholds": thresholds, "rows": total.rows}


def _print_rule(extra: dict[str, Any]) -> None:
    if "sweep" in extra:
        print(
            "threshold sweep (F1 / FAR %): "
            + ", ".join(f"{s['threshold']:g}: {s['f1']} / {s['far']}" for s in extra["sweep"])
        )
    if "two_fold" in extra:
        f = extra["two_fold"]
        print(
            f"two-fold (threshold picked on one half, scored on the other; thresholds "
            f"{f['thresholds']}): F1 {f['f1']}, FAR {f['far']} %, MAR {f['mar']} %"
        )


def _report_changes(args: argparse.Namespace, report: Report, changes: cpscore.ChangeReport) -> int:
    for msg in report.skipped:
        print(f"skipped: {msg}", file=sys.stderr)
    print(
        f"{len(report.files)} files replayed ({len(changes.files)} with changepoint labels and "
        f"scored by NAB, window {cpscore.nab.WINDOW_SECONDS:.0f} s right of each changepoint "
        f"after row {SKIP_ROWS})"
    )
    if args.per_file:
        print(cpscore.format_files(changes))
    summary = changes.summary() if changes.files else None
    if summary is not None:
        print(cpscore.format_table(summary, f"{args.model} change alerts (int8, this repo)"))
        print(
            f"time to detect: median {summary['median_time_to_detect_s']} s from a true "
            f"changepoint to its first detection; median {summary['median_onset_to_change_s']} s "
            f"from a fault's onset to the first change alert, "
            f"{summary['median_onset_to_raise_s']} s to the raise"
        )
    else:
        print("no files with changepoint labels: nothing to score")
    if args.predictions_out is not None:
        print(f"changepoint predictions written under {args.predictions_out}")
    if args.plot is not None:
        print(f"{len(report.files)} plots written under {args.plot}")
    if args.json:
        out = summary or {"files": 0}
        out["model"] = args.model
        print(json.dumps(out, sort_keys=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
