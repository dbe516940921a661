"""The cost planner (agent/service/planner.py, `edge-agent plan`) on profiles and bench results
written
here, and the bench runner saving the results it reads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from agent.errors import ConfigError
from agent.service import cli
from agent.service.planner import DAYS_PER_MONTH, format_plan, plan, validation_bytes

pytestmark = pytest.mark.timeout(60)

PROFILE = """
[workload]
daily_inferences = 86400
latency_requirement_ms = 100
low_confidence_share = 0.05

[prices]
currency = "EUR"
cloud_per_inference = 0.00001
per_mb = 0.5

[link]
rtt_ms = 40
"""


def write_measured(folder: Path, *, detect_ms: float = 16.0, quick: bool = False) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    runs = {
        "inference": {
            "detect_latency_p99_ms": detect_ms,
            "latency_p99_us": 600.0,
            "float32_latency_p50_us": 2000.0,
        },
        "sync": {"bytes_per_record": 60.0, "records_per_s_clean": 2500.0},
        "codec": {"bytes_per_reading": {"high": 10.0, "medium": 2.0, "low": 0.5}},
    }
    for name, summary in runs.items():
        doc = {"bench": name, "quick": quick, "finished": "2025-01-01T00:00:00+00:00"}
        (folder / f"{name}.json").write_text(json.dumps({**doc, "summary": summary}))
    return folder


def write_profile(tmp_path: Path, text: str = PROFILE, name: str = "p.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_planner_picks_edge_only_and_computes_each_split(tmp_path: Path) -> None:
    measured = write_measured(tmp_path / "bench")
    p = plan(write_profile(tmp_path), measured)
    splits = {s.name: s for s in p.splits}
    assert p.choice == "edge-only"
    n = 86400
    # cloud-only: every inference in the cloud, one 60-byte record uploaded for each
    cloud = splits["cloud-only"]
    assert cloud.latency_ms == pytest.approx(40 + 2.0)  # RTT + measured float32 model time
    assert cloud.daily_cost == pytest.approx(n * (0.00001 + 60 * 0.5 / 1e6))
    assert cloud.monthly_cost == pytest.approx(cloud.daily_cost * DAYS_PER_MONTH)
    assert cloud.meets
    # hybrid: edge latency, 5 % validated in the cloud
    hybrid = splits["hybrid"]
    vb = validation_bytes()
    assert 300 < vb < 1000
    assert hybrid.latency_ms == 16.0
    assert hybrid.daily_cost == pytest.approx(n * 0.05 * (0.00001 + vb * 0.5 / 1e6))
    assert hybrid.cloud_inferences_per_day == pytest.approx(n * 0.05)
    edge = splits["edge-only"]
    assert (edge.latency_ms, edge.daily_cost, edge.meets) == (16.0, 0.0, True)
    assert p.inputs["edge_latency_p99_ms"]["source"] == "bench inference: detect_latency_p99_ms"
    assert p.inputs["bytes_per_record"] == {"value": 60.0, "source": "bench sync: bytes_per_record"}
    text = format_plan(p)
    assert "cheapest split that meets the requirement: edge-only" in text
    assert "hybrid" in text and "EUR" in text


def test_planner_picks_hybrid_when_unsure_results_must_be_validated(tmp_path: Path) -> None:
    measured = write_measured(tmp_path / "bench")
    profile = PROFILE.replace(
        "low_confidence_share = 0.05", "low_confidence_share = 0.05\nrequire_validation = true"
    )
    p = plan(write_profile(tmp_path, profile), measured)
    splits = {s.name: s for s in p.splits}
    assert not splits["edge-only"].meets and "not validated" in splits["edge-only"].why
    assert splits["hybrid"].daily_cost < splits["cloud-only"].daily_cost
    assert p.choice == "hybrid"


def test_planner_picks_cloud_only_when_the_edge_is_too_slow(tmp_path: Path) -> None:
    measured = write_measured(tmp_path / "bench", detect_ms=250.0)
    p = plan(write_profile(tmp_path), measured)
    assert p.choice == "cloud-only"
    assert [s.name for s in p.splits if not s.meets] == ["edge-only", "hybrid"]


def test_planner_says_when_nothing_meets_the_requirement(tmp_path: Path) -> None:
    measured = write_measured(tmp_path / "bench", detect_ms=250.0)
    profile = PROFILE.replace("rtt_ms = 40", "rtt_ms = 400\nrate_kbit = 9.6")
    p = plan(write_profile(tmp_path, profile), measured)
    assert p.choice is None
    cloud = {s.name: s for s in p.splits}["cloud-only"]
    assert cloud.latency_ms == pytest.approx(400 + 2.0 + 60 * 8 / 9600 * 1000)
    assert "no split meets the requirement" in format_plan(p)


def test_planner_takes_bytes_from_a_codec_level_or_the_profile(tmp_path: Path) -> None:
    measured = write_measured(tmp_path / "bench")
    low = PROFILE.replace("rtt_ms = 40", 'rtt_ms = 40\nencoding = "low"')
    p = plan(write_profile(tmp_path, low), measured)
    assert p.inputs["bytes_per_record"]["value"] == 0.5 * 8
    fixed = PROFILE.replace("rtt_ms = 40", "rtt_ms = 40\nbytes_per_record = 12.5")
    p = plan(write_profile(tmp_path, fixed), measured)
    assert p.inputs["bytes_per_record"] == {"value": 12.5, "source": "profile"}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (("[workload]", "[workloads]"), "p.toml: workload: is required"),
        (
            ("daily_inferences = 86400", "daily_inferences = -1"),
            "p.toml: workload.daily_inferences:",
        ),
        (
            ("daily_inferences = 86400", 'daily_inferences = "lots"'),
            "p.toml: workload.daily_inferences: expected a number",
        ),
        (
            ("low_confidence_share = 0.05", "low_confidence_share = 1.5"),
            "p.toml: workload.low_confidence_share: 1.5 is above",
        ),
        (("per_mb = 0.5", ""), "p.toml: prices.per_mb: is required"),
        (("per_mb = 0.5", "per_mb = 0.5\nper_gb = 3"), "p.toml: prices.per_gb: unknown key"),
        (("rtt_ms = 40", 'rtt_ms = 40\nencoding = "zstd"'), "p.toml: link.encoding: 'zstd'"),
        (("rtt_ms = 40", "rtt_ms = [40]"), "p.toml: link.rtt_ms: expected a number"),
        (("low_confidence_share = 0.05", ""), "p.toml: workload.low_confidence_share:"),
        (("[link]", "[link"), "p.toml: not valid TOML"),
    ],
)
def test_planner_bad_profiles_name_file_and_key(
    tmp_path: Path, change: tuple[str, str], message: str
) -> None:
    measured = write_measured(tmp_path / "bench")
    path = write_profile(tmp_path, PROFILE.replace(*change))
    with pytest.raises(ConfigError) as err:
        plan(path, measured)
    assert str(err.value).startswith(message), str(err.value)
    assert "\n" not in str(err.value)


def test_planner_without_measurements_says_what_to_run(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        plan(write_profile(tmp_path), tmp_path / "nothing")
    assert "summary.detect_latency_p99_ms" in str(err.value)
    assert "./tools/dev bench inference" in str(err.value)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "inference.json").write_text("{not json")
    with pytest.raises(ConfigError, match=r"inference\.json: unreadable bench result"):
        plan(write_profile(tmp_path), broken)


def test_plan_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    measured = write_measured(tmp_path / "bench", quick=True)
    profile = write_profile(tmp_path)
    argv = ["plan", "--profile", str(profile), "--measured", str(measured)]
    assert cli.main([*argv, "--json"]) == cli.EX_OK
    doc = json.loads(capsys.readouterr().out)
    assert doc["choice"] == "edge-only"
    assert [s["name"] for s in doc["splits"]] == ["edge-only", "hybrid", "cloud-only"]
    assert doc["inputs"]["edge_latency_p99_ms"]["source"].endswith("(quick run)")
    assert cli.main(argv) == cli.EX_OK
    assert "cheapest split that meets the requirement: edge-only" in capsys.readouterr().out
    bad = write_profile(tmp_path, PROFILE.replace("rtt_ms = 40", "rtt = 40"), "bad.toml")
    assert cli.main(["plan", "--profile", str(bad), "--measured", str(measured)]) == 78
    err = capsys.readouterr().err.strip()
    assert err == "bad.toml: link.rtt_ms: is required"


def test_bench_run_is_saved_for_the_planner(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import bench
    from benches import Result

    monkeypatch.setenv("EDGE_AGENT_BENCH_RESULTS", str(tmp_path / "results"))
    result = Result(summary={"bytes_per_record": 61.5})
    path = bench.save("sync", result, quick=False, elapsed=3.0)
    assert path == tmp_path / "results" / "sync.json"
    doc = json.loads(path.read_text())
    assert doc["summary"] == {"bytes_per_record": 61.5} and doc["quick"] is False
    quick = bench.save("sync", result, quick=True, elapsed=1.0)
    assert quick.name == "sync.quick.json"  # a smoke run does not replace the full figures
