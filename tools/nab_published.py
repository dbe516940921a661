#!/usr/bin/env python3
"""Re-score SKAB's published baseline predictions with tools/nab.py: a check of our NAB scorer.

    tools/nab_published.py --skab-repo DIR [--only DATA_DIR] [--json]

DIR is a checkout of https://github.com/waico/SKAB (commit b2c0d46 was used): its ``data/`` (all
34 labelled files) and ``results/results-*.pkl``, the outlier predictions its notebooks saved (a
list of pandas Series, one per file, on the rows after the first 400). Each notebook turns them into
changepoint predictions the same way: a changepoint wherever the predicted label changes (and at
the first row if it starts at 1). This tool does the same, scores them against the files'
``changepoint`` column by the leaderboard's protocol, and prints them beside the published
leaderboard row. ``--only DATA_DIR`` also scores them on the files present under DATA_DIR (the
25 files this project evaluates on), for a like-for-like comparison with our detector.

Needs pandas to read the pickles (``pip install pandas``; the agent never needs it). Pickles can
run code when loaded: only pandas and numpy classes are let through the unpickler.
"""

from __future__ import annotations

import argparse
import json
import pickle
import sys
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import cpscore  # noqa: E402
import evaluate as ev  # noqa: E402
import nab  # noqa: E402

#: results file -> the leaderboard's name for it
RESULTS = {
    "MSCRED": "MSCRED",
    "Isolation_Forest": "Isolation forest",
    "T2-q": "T-squared+Q (PCA)",
    "Conv_AE": "Conv-AE",
    "LSTM_AE": "LSTM-AE",
    "T2": "T-squared",
    "MSET": "MSET",
    "Vanilla_AE": "Vanilla AE",
    "Vanilla_LSTM": "Vanilla LSTM",
}
#: leaderboard rows beyond tools/cpscore.LEADERBOARD's (same README)
MORE = {
    "Vanilla AE": (11.41, 6.53, 13.91, 103, 106),
    "Vanilla LSTM": (11.31, -3.8, 17.25, 90, 342),
}


class _Unpickler(pickle.Unpickler):
    """Only pandas and numpy objects (and ``slice``) may be built from the file."""

    def find_class(self, module: str, name: str) -> Any:
        if module.split(".")[0] in ("pandas", "numpy") or (module, name) == ("builtins", "slice"):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refused: {module}.{name}")


def load_predictions(path: Path) -> list[tuple[np.ndarray, np.ndarray]]:
    """(times in seconds, 0/1 labels) per saved Series."""
    with path.open("rb") as fh:
        series = _Unpickler(fh).load()
    out = []
    for s in series:
        times = np.asarray(s.index.asi8, dtype=np.int64) / 1e9  # naive stamps, read as UTC
        out.append((times, np.asarray(s.to_numpy(), dtype=float)))
    return out


def changepoints_of(labels: np.ndarray) -> np.ndarray:
    """The notebooks' rule: 1 where the label changes, and at the first row if it is 1."""
    cp = np.abs(np.diff(labels, prepend=0.0))
    return cp == 1


def score(
    files: dict[str, ev.SkabFile],
    preds: list[tuple[np.ndarray, np.ndarray]],
    keep: set[str] | None = None,
) -> dict[str, Any]:
    """NAB of one algorithm's predictions over ``files`` (relative path -> file), or over the
    ones named in ``keep``. Each prediction is matched to its file by its timestamps."""
    pairs = []
    for times, labels in preds:
        rel, f = next(
            (rel, f)
            for rel, f in files.items()
            if np.isin(times[[0, -1]], f.times[ev.SKIP_ROWS :]).all()
        )
        if keep is not None and rel not in keep:
            continue
        test = f.times[ev.SKIP_ROWS :]
        assert f.changepoints is not None
        truth = [float(t) for t in test[f.changepoints[ev.SKIP_ROWS :]]]
        pairs.append((truth, [float(t) for t in times[changepoints_of(labels)]]))
    r = nab.nab(pairs)
    return {
        "files": len(pairs),
        "changepoints": r.windows,
        "nab": [r.score(p) for p in ("standard", "low_fp", "low_fn")],
        "missed": r.missed,
        "false_positives": r.false_positives,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--skab-repo", type=Path, required=True, help="a checkout of waico/SKAB")
    ap.add_argument("--only", type=Path, default=None, help="also score on the files in here")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    try:
        import pandas  # noqa: F401
    except ImportError:
        ap.error("reading SKAB's pickled predictions needs pandas: pip install pandas")
    data = args.skab_repo / "data"
    files = {}
    for p in ev.find_csv(data):
        f = ev.read_skab_csv(p)
        if f.changepoints is not None:
            files[p.relative_to(data).as_posix()] = f
    keep = None
    if args.only is not None:
        keep = {p.relative_to(args.only).as_posix() for p in ev.find_csv(args.only)}
    published = {r[0]: list(r[1:]) for r in cpscore.LEADERBOARD}
    published.update({k: list(v) for k, v in MORE.items()})
    rows = {}
    for stem, name in RESULTS.items():
        path = args.skab_repo / "results" / f"results-{stem}.pkl"
        if not path.is_file():
            continue
        preds = load_predictions(path)
        rows[name] = {
            "published": published.get(name),
            "all": score(files, preds),
            "only": None if keep is None else score(files, preds, keep),
        }
    for name, r in rows.items():
        a = r["all"]
        line = (
            f"{name:18} published {r['published']} | re-scored on {a['files']} files "
            f"({a['changepoints']} changepoints): {a['nab']}, missed {a['missed']}, "
            f"FPs {a['false_positives']}"
        )
        if r["only"] is not None:
            o = r["only"]
            line += (
                f" | on {o['files']} files ({o['changepoints']}): {o['nab']}, "
                f"missed {o['missed']}, FPs {o['false_positives']}"
            )
        print(line)
    if args.json:
        print(json.dumps(rows, sort_keys=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
