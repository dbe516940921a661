"""tools/benches/federated.py: the federated bench's pipeline on a few SKAB files (2 rounds) and on
synthetic SKAB-format files written here; the keys of the issue and the invariants (no raw bytes
sent, a finite positive epsilon, devices counted). No timing assertions."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from benches import federated

from tests.unit.tools.test_evaluate import synthetic, write_csv

KEYS = (
    "devices",
    "rounds",
    "f1_federated",
    "far_federated",
    "f1_centralized",
    "far_centralized",
    "f1_local_only",
    "far_local_only",
    "f1_no_learning",
    "far_no_learning",
    "f1_federated_minus_local_only",
    "bytes_per_device_per_round",
    "raw_bytes_sent",
    "epsilon",
    "epsilon_per_round",
    "delta",
    "target_met",
)


def run(data: Path, tmp: Path, *extra: str) -> dict[str, Any]:
    args = SimpleNamespace(quick=True, dir=tmp, extra=["--data", str(data), *extra])
    result = federated.run(args)
    assert result.rows, "the bench prints a table"
    return result.summary


def check(summary: dict[str, Any], devices: int, scored: int, rounds: int) -> None:
    for key in KEYS:
        assert key in summary, key
    assert summary["devices"] == devices
    assert summary["devices_scored"] == scored
    assert summary["rounds"] == rounds
    assert summary["uploads"] == rounds * summary["devices_per_round"]
    assert summary["raw_bytes_sent"] == 0
    assert math.isfinite(summary["epsilon"]) and summary["epsilon"] > 0
    assert summary["epsilon"] >= summary["epsilon_per_round"] > 0
    assert summary["noise_multiplier"] > 0  # DP is on in the reported figures
    # 2404 float16 weights and the small fields
    assert 2 * 2404 < summary["bytes_per_device_per_round"] < 2 * 2404 + 400
    for regime in ("federated", "centralized", "local_only", "no_learning"):
        f1 = summary[f"f1_{regime}"]
        assert f1 is None or 0.0 <= f1 <= 1.0
    # a round checks the model of the round before it (a failed check drops the round trained
    # from that model, which then has nothing to check), the round after the last only checks
    assert 1 <= summary["checks"] <= rounds
    assert -1.0 <= summary["check_margin_min"] <= summary["check_margin_max"] <= 1.0
    passed = summary["check_margins_passed_one_poisoner"]
    assert len(passed) == summary["checks_passed_one_poisoner"]
    assert all(m >= -federated.CHECK_TOLERANCE - 1e-4 for m in passed)


def test_bench_on_a_few_skab_files(skab_dir: Path, tmp_path: Path) -> None:
    summary = run(skab_dir, tmp_path, "--files", "3", "--rounds", "2")
    check(summary, devices=4, scored=3, rounds=2)  # 3 labelled files and the anomaly-free one


def test_bench_on_synthetic_skab_files(tmp_path: Path) -> None:
    data = tmp_path / "data"
    normal, _ = synthetic(700, 0, None)
    write_csv(data / "anomaly-free" / "anomaly-free.csv", normal)
    for i, (folder, name) in enumerate(
        (("valve1", "0"), ("valve1", "1"), ("other", "1"), ("other", "2"))
    ):
        rows, labels = synthetic(900, i + 1, (550, 700))
        write_csv(data / folder / f"{name}.csv", rows, labels)
    summary = run(data, tmp_path, "--rounds", "3")
    check(summary, devices=5, scored=4, rounds=3)
    # a flow drop of 40 noise widths is found in every regime
    for regime in ("federated", "centralized", "local_only"):
        assert summary[f"f1_{regime}"] > 0.5, regime


def test_missing_data_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match=r"no SKAB data at .*--data DIR"):
        run(tmp_path / "nowhere", tmp_path)


def test_uplink_refuses_a_body_that_is_not_an_update_or_a_summary() -> None:
    """Attack: a device tries to send its raw rows; the uplink counts and refuses them."""
    uplink = federated.Uplink(parameters=2404)
    raw = np.arange(64, dtype=np.float64).tobytes()
    with pytest.raises(ValueError):
        uplink.send(raw)
    assert uplink.raw_bytes == len(raw) and uplink.refused
