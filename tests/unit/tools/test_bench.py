"""tools/bench.py and tools/benches/: ``bench list`` names every bench with what it measures and
its baseline; the ``--dir`` helper runs in a new directory inside DIR, names its filesystem and
warns on tmpfs; a quick store bench reports where it ran and its plain-sqlite3 baseline.
No timing assertions: speed is the benches' business."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import bench
import benches
import pytest


def test_every_bench_module_defines_measures_and_baseline() -> None:
    names = bench.available()
    assert "store" in names and "sampling" in names
    for name in names:
        d = bench.described(name)
        assert d.get("MEASURES", "").strip(), f"{name}: MEASURES missing"
        assert d.get("BASELINE", "").strip(), f"{name}: BASELINE missing"


def test_bench_list_prints_each_bench_with_what_it_measures_and_its_baseline(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert bench.main(["list"]) == 0
    out = capsys.readouterr().out
    for name in bench.available():
        d = bench.described(name)
        assert f"{name}: {d['MEASURES']}" in out
        assert f"baseline: {d['BASELINE']}" in out
    assert "missing" not in out


def test_workdir_is_made_inside_dir_named_and_removed(tmp_path: Path) -> None:
    result = benches.Result()
    with benches.workdir(SimpleNamespace(dir=tmp_path), "unit") as wd:
        assert wd.path.parent == tmp_path and wd.path.is_dir()
        assert wd.path.name.startswith("bench-unit-")
        assert wd.fs_type and wd.fs_type != "unknown"
        assert wd.chosen == "--dir"
        wd.stamp(result)
    assert not wd.path.exists()
    assert result.summary["dir"] == str(wd.path)
    assert result.summary["fs_type"] == wd.fs_type
    assert any(str(wd.path) in line and wd.fs_type in line for line in result.notes)


def test_workdir_on_tmpfs_warns_that_durable_involves_no_fsync() -> None:
    """/dev/shm is the tmpfs every Linux system mounts (glibc's POSIX shared memory)."""
    result = benches.Result()
    with benches.workdir(SimpleNamespace(dir=Path("/dev/shm")), "unit") as wd:
        assert wd.fs_type == "tmpfs", f"/dev/shm is {wd.fs_type} here"
        wd.stamp(result)
    assert result.summary["no_fsync"] is True
    assert any("durable here involves no fsync" in line for line in result.notes)


def test_default_dir_is_the_agent_data_dir_or_var_tmp_and_says_why() -> None:
    base, why = benches.default_base()
    assert base in (benches.AGENT_DATA_DIR, benches.FALLBACK_DIR)
    assert why


def test_a_claim_not_met_says_so() -> None:
    r = benches.Result()
    assert r.claim("x >= 1", "0.5", True) is True
    assert not r.notes
    assert r.claim("x >= 1", "0.5", False) is False
    assert r.notes == ["README claims x >= 1; measured 0.5: NOT MET"]
    assert r.summary["claims_not_met"] == ["x >= 1; measured 0.5"]


@pytest.mark.timeout(120)
def test_quick_store_bench_reports_dir_fs_type_and_its_sqlite_baseline(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rc = bench.main(["store", "--quick", "--json", "--no-save", "--dir", str(tmp_path)])
    assert rc == 0
    out = capsys.readouterr().out.strip().splitlines()
    summary = json.loads(out[-1])
    assert Path(summary["dir"]).parent == tmp_path
    assert summary["fs_type"] and summary["fs_type"] != "unknown"
    for key in (
        "baseline_sqlite_puts_per_s_batch1",
        "sqlite_executemany_per_s_batch1000",
        "puts_per_s_batch1",
        "puts_per_s_batch100",
    ):
        assert summary[key] > 0
    assert list(tmp_path.iterdir()) == []  # the bench's directory was removed


@pytest.mark.timeout(180)
def test_wear_bench_runs_both_agents_and_reports_their_writes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Two real agents on the simulated rig, a few seconds each: the windowed one and the one
    committing each reading; both delivered, the ratio is theirs (no figure is asserted)."""
    rc = bench.main(["wear", "--json", "--no-save", "--dir", str(tmp_path), "--seconds", "3"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["records_stored"] > 0 and summary["records_stored_each_reading"] > 0
    if not summary.get("no_fsync"):
        assert summary["bytes_per_day"] > 0 and summary["bytes_per_day_each_reading"] > 0
        assert summary["ratio_to_each_reading"] == pytest.approx(
            summary["bytes_per_day"] / summary["bytes_per_day_each_reading"], abs=1e-3
        )
    assert list(tmp_path.iterdir()) == []
