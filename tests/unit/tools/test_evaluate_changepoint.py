"""tools/evaluate.py --task changepoint (tools/cpscore.py): the CLI, the predictions files that let
anyone recompute the score, the data-blind references, and the acceptance on the real SKAB data."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT / "tools"))

import cpscore  # noqa: E402
import evaluate as ev  # noqa: E402
import nab  # noqa: E402

from agent.detect.features import CHANNELS  # noqa: E402

HEADER = "datetime;" + ";".join(CHANNELS) + ";anomaly;changepoint"
LEVEL = np.array([0.21, 0.27, 2.4, 0.1, 89.0, 28.0, 229.0, 125.0])
NOISE = np.array([0.002, 0.002, 0.45, 0.25, 0.1, 0.01, 10.0, 0.5])
FLOW = CHANNELS.index("Volume Flow RateRMS")
KEYS = {
    "nab_standard",
    "nab_lowfp",
    "nab_lowfn",
    "missed",
    "false_positives",
    "files",
    "median_time_to_detect_s",
}


def write_fault(path: Path, n: int, seed: int, fault: tuple[int, int] | None) -> None:
    """Normal running; the flow 15 % down over ``fault``; changepoints at its first row and at
    the first row after it (as SKAB marks a fault's onset and its end)."""
    rng = np.random.default_rng(seed)
    rows = LEVEL + rng.normal(size=(n, 8)) * NOISE
    anomaly = np.zeros(n)
    cp = np.zeros(n)
    if fault:
        a, b = fault
        rows[a:b, FLOW] -= 0.15 * LEVEL[FLOW]
        anomaly[a:b] = 1
        cp[a] = cp[b] = 1
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [HEADER]
    for i, r in enumerate(rows):
        stamp = f"2020-03-09 10:{i // 60 % 60:02d}:{i % 60:02d}"
        cells = [stamp, *(f"{v:.6g}" for v in r), f"{anomaly[i]:.1f}", f"{cp[i]:.1f}"]
        lines.append(";".join(cells))
    path.write_text("\r\n".join(lines) + "\r\n")


@pytest.fixture
def faults(tmp_path: Path) -> Path:
    data = tmp_path / "data"
    write_fault(data / "valve9" / "1.csv", 800, 1, (500, 650))
    write_fault(data / "valve9" / "2.csv", 760, 2, (450, 600))
    write_fault(data / "quiet" / "3.csv", 700, 3, None)
    return data


def test_read_skab_csv_reads_the_changepoint_column(faults: Path) -> None:
    f = ev.read_skab_csv(faults / "valve9" / "1.csv")
    assert f.changepoints is not None
    assert list(np.flatnonzero(f.changepoints)) == [500, 650]


def test_cli_changepoint_json_and_predictions_recompute_the_score(
    faults: Path, tmp_path: Path, capsys
) -> None:
    out = tmp_path / "pred"
    argv = ["--data", str(faults), "--task", "changepoint", "--predictions-out", str(out)]
    assert ev.main([*argv, "--per-file", "--json"]) == 0
    printed = capsys.readouterr().out
    summary = json.loads(printed.strip().splitlines()[-1])
    assert set(summary) >= KEYS
    assert summary["files"] == 3 and summary["changepoints"] == 4
    assert (
        "MSCRED" in printed and "every 60 s" in printed and "after its estimated change" in printed
    )
    # both faults are found at their start and their end, early, and quiet running stays quiet
    assert summary["missed"] == 0 and summary["false_positives"] == 0
    assert summary["median_time_to_detect_s"] < 10
    assert summary["nab_standard"] > 90 and summary["nab_lowfp"] > 90
    # recompute from the files alone: the predictions against the CSV's own changepoint column
    pairs = []
    for rel in ("valve9/1.csv", "valve9/2.csv", "quiet/3.csv"):
        lines = (out / rel).read_text().splitlines()
        assert lines[0] == "datetime;changepoint"
        f = ev.read_skab_csv(faults / rel)
        assert len(lines) == len(f.rows) + 1
        assert [ln.split(";")[0] for ln in lines[1:]] == f.stamps
        flags = np.array([int(ln.split(";")[1]) for ln in lines[1:]])
        assert not flags[:400].any()  # nothing during commissioning
        cps = [f.times[i] for i in np.flatnonzero(f.changepoints) if i >= 400]
        pairs.append((cps, list(f.times[flags == 1])))
    again = nab.nab(pairs)
    assert again.score("standard") == summary["nab_standard"]
    assert again.score("low_fp") == summary["nab_lowfp"]
    assert again.score("low_fn") == summary["nab_lowfn"]
    assert (again.missed, again.false_positives) == (summary["missed"], summary["false_positives"])


def test_the_outlier_task_is_the_same_with_change_alerts_on(faults: Path, capsys) -> None:
    assert ev.main(["--data", str(faults), "--json"]) == 0
    outlier = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    report = ev.evaluate(faults, ev.detector_factory(ROOT / "models", "skab-ae"))
    assert report.summary()["f1"] == outlier["f1"] and outlier["files"] == 3
    assert any(e.kind.value == "change" for f in report.files for e in f.events)
    assert all(f.alerts == 2 for f in report.files if "valve9" in f.name)  # raise and clear


def test_data_blind_references() -> None:
    times = np.arange(1000.0)
    clock = cpscore.clock_detections(times)
    assert clock[0] == 400.0 and clock[1] - clock[0] == 60.0 and clock[-1] <= 999.0
    rng = np.random.default_rng(0)
    rnd = cpscore.random_detections(times, 7, rng)
    assert len(rnd) == len(set(rnd)) == 7 and min(rnd) >= 400.0
    assert cpscore.clock_detections(np.arange(300.0)) == []


# --- acceptance on the real data ------------------------------------------------------------------
@pytest.mark.skab
@pytest.mark.timeout(300)
def test_changepoints_beat_the_leaderboard_and_the_data_blind_references(skab_dir: Path) -> None:
    changes = cpscore.ChangeReport()
    report = ev.evaluate(skab_dir, ev.detector_factory(ROOT / "models", "skab-ae"), changes=changes)
    s = changes.summary()
    assert s["files"] == 25 and s["changepoints"] == 92
    assert s["nab_standard"] >= 40 and s["nab_lowfp"] >= 25  # MSCRED: 32.42 / 16.53
    best = cpscore.LEADERBOARD[0]
    assert s["nab_standard"] > best[1] and s["nab_lowfp"] > max(r[2] for r in cpscore.LEADERBOARD)
    # a detector has to beat guessing at its own rate, and the clock on the FP-averse profile
    rnd, clock = s["baselines"]["random"], s["baselines"]["clock_60s"]
    assert s["nab_standard"] > rnd["nab_standard"] + 20 and s["nab_lowfp"] > rnd["nab_lowfp"] + 20
    assert s["nab_lowfp"] > clock["nab_lowfp"] and s["false_positives"] < clock["false_positives"]
    # and the outlier task did not move
    o = report.summary()
    assert o["f1"] >= 0.84 and o["far"] <= 10.0
