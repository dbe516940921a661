"""The cost planner (agent/service/planner.py, `edge-agent plan`) on profiles and bench results
written here, and the bench runner saving the results it reads.

Every expected figure is worked out by hand from the profile and the bench results written here,
with the arithmetic in a comment; none is taken from the code under test. The validation exchange's
593 bytes are counted byte by byte from the CBOR encoding (RFC 8949, deterministic: shortest
integer and float forms) in ``test_validation_bytes_counted_by_hand``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from agent.errors import ConfigError
from agent.service import cli
from agent.service.planner import format_plan, plan, validation_bytes

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
        doc = {
            "bench": name,
            "quick": quick,
            "finished": "2025-01-01T00:00:00+00:00",
            "host": "x86_64 CPython 3.11.7",
        }
        (folder / f"{name}.json").write_text(json.dumps({**doc, "summary": summary}))
    return folder


def write_profile(tmp_path: Path, text: str = PROFILE, name: str = "p.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# One validation exchange, counted by hand (CBOR: a map/array/text header is 1 byte below 24
# items, 2 bytes from 24 to 255; an integer above 2^32 is 1 + 8 bytes; a float takes the
# shortest exact form: 3 bytes (half) for 0.0, 0.25, 0.5, 1.0, 5 (single) for a float32 value,
# 9 (double) otherwise).
#
# The request {"seq", "alert", "window"}: map header                                       1
#   "seq" (1 + 3) + 1_795_439_964_079_445 (above 2^32: 1 + 8)                         4 + 9 = 13
#   "alert" (1 + 5) + the alert map:                                                  6 + 187 = 193
#     header (10 pairs)                                                                     1
#     "time" 5 + 1_700_000_000.0 (= 13_281_250 * 2^7, a float32 value) 5                   10
#     "kind" 5 + "raise" 6                                                                 11
#     "score" 6 + 1.2345678 (double) 9                                                     15
#     "threshold" 10 + 1.0 (half) 3                                                        13
#     "channels" 9 + [3 pairs]: 1 + [1 + "Volume Flow RateRMS" (1 + 19) + double 9 = 30]
#                                 + [1 + "Pressure" 9 + 0.5 half 3 = 13]
#                                 + [1 + "Current" 8 + 0.25 half 3 = 12] = 56          9 + 56 = 65
#     "verdict" 8 + "novel_anomaly" 14                                                     22
#     "fault" 6 + null 1                                                                    7
#     "confidence" 11 + 0.61234567 (double) 9                                              20
#     "novelty" 8 + null 1                                                                  9
#     "model" 6 + "skab-ae" 8                                                              14
#     1 + 10 + 11 + 15 + 13 + 65 + 22 + 7 + 20 + 9 + 14 = 187
#   "window" (1 + 6) + 32 float32 values: header 2 (32 >= 24) + 0.0 half 3 + 31 singles 5 * 31
#                                                                       7 + 2 + 3 + 155 = 167
#   1 + 13 + 193 + 167 = 374
# The verdict: map header (10 pairs)                                                        1
#   "seq" 4 + 9 = 13; "anomalous" 10 + true 1 = 11; "score" 6 + 5.0134269231930375 (double) 9
#   = 15; "threshold" 10 + 1.0 half 3 = 13; "verdict" 8 + "known_failure" 14 = 22; "fault" 6
#   + "valve" 6 = 12; "confidence" 11 + 0.9975500702857971 (a float32 value) 5 = 16; "model" 6
#   + "skab-ae" 8 = 14; "classifier" 11 + "skab-clf" 9 = 20; "precision" 10 + "float32" 8 = 18
#   1 + 13 + 11 + 15 + 13 + 22 + 12 + 16 + 14 + 20 + 18 = 155
# Both, plus the CoAP overhead of two messages (2 x 32): 374 + 155 + 64 = 593.
VALIDATION_BYTES = 593


def test_validation_bytes_counted_by_hand() -> None:
    assert validation_bytes() == VALIDATION_BYTES


def test_planner_picks_edge_only_and_computes_each_split(tmp_path: Path) -> None:
    measured = write_measured(tmp_path / "bench")
    p = plan(write_profile(tmp_path), measured)
    splits = {s.name: s for s in p.splits}
    assert p.choice == "edge-only"
    # cloud-only: every inference in the cloud, one 60-byte record (bench sync) uploaded for each
    cloud = splits["cloud-only"]
    assert cloud.latency_ms == pytest.approx(42.0)  # RTT 40 + float32 model 2000 us = 2 ms
    # 86400 * (0.00001 + 60 B * 0.5 / 1e6 B = 0.00003) = 86400 * 0.00004 = 3.456 a day
    assert cloud.daily_cost == pytest.approx(3.456)
    assert cloud.monthly_cost == pytest.approx(103.68)  # 3.456 * 30 days
    assert cloud.daily_bytes == pytest.approx(5_184_000)  # 86400 * 60 B
    assert cloud.meets
    # hybrid: the edge's latency; 5 % of 86400 = 4320 validations a day, each
    # 0.00001 + 593 B * 0.5 / 1e6 B = 0.00001 + 0.0002965 = 0.0003065: 4320 * 0.0003065 = 1.32408
    hybrid = splits["hybrid"]
    assert hybrid.latency_ms == 16.0
    assert hybrid.daily_cost == pytest.approx(1.32408)
    assert hybrid.monthly_cost == pytest.approx(39.7224)  # 1.32408 * 30
    assert hybrid.daily_bytes == pytest.approx(2_561_760)  # 4320 * 593 B
    assert hybrid.cloud_inferences_per_day == pytest.approx(4320)
    edge = splits["edge-only"]
    assert (edge.latency_ms, edge.daily_cost, edge.meets) == (16.0, 0.0, True)
    assert p.inputs["validation_bytes"]["value"] == VALIDATION_BYTES
    assert p.inputs["edge_latency_p99_ms"]["source"] == (
        "--measured: x86_64 CPython 3.11.7 2025-01-01T00:00:00+00:00: "
        "bench inference detect_latency_p99_ms"
    )
    assert p.inputs["bytes_per_record"]["value"] == 60.0
    assert p.inputs["bytes_per_record"]["source"].endswith("bench sync bytes_per_record")
    text = format_plan(p)
    assert "cheapest split that meets the requirement: edge-only" in text
    assert "hybrid" in text and "EUR" in text
    assert "measured on this device" not in text  # --measured alone: no device results


def test_planner_picks_hybrid_when_unsure_results_must_be_validated(tmp_path: Path) -> None:
    measured = write_measured(tmp_path / "bench")
    profile = PROFILE.replace(
        "low_confidence_share = 0.05", "low_confidence_share = 0.05\nrequire_validation = true"
    )
    p = plan(write_profile(tmp_path, profile), measured)
    splits = {s.name: s for s in p.splits}
    assert not splits["edge-only"].meets and "not validated" in splits["edge-only"].why
    # hybrid 1.32408 a day against cloud-only 3.456 (worked out in the test above)
    assert splits["hybrid"].daily_cost == pytest.approx(1.32408)
    assert splits["cloud-only"].daily_cost == pytest.approx(3.456)
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
    # RTT 400 + model 2 + 60 B * 8 bit / 9600 bit/s = 0.05 s = 50 ms
    assert cloud.latency_ms == pytest.approx(452.0)
    assert "no split meets the requirement" in format_plan(p)


def test_planner_takes_bytes_from_a_codec_level_or_the_profile(tmp_path: Path) -> None:
    measured = write_measured(tmp_path / "bench")
    low = PROFILE.replace("rtt_ms = 40", 'rtt_ms = 40\nencoding = "low"')
    p = plan(write_profile(tmp_path, low), measured)
    assert p.inputs["bytes_per_record"]["value"] == 4.0  # 0.5 B a reading x 8 channels
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
    # a --data-dir that does not exist is named (it fell back to the bundled results silently)
    missing = tmp_path / "no-such-dir"
    assert cli.main(["plan", "--profile", str(profile), "--data-dir", str(missing)]) == 66
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"edge-agent plan: --data-dir {missing}: no such directory")


DEVICE_FINISHED = "2026-01-02T03:04:05+00:00"
DEVICE_SUMMARY = {
    "fsync": {"per_s": 1200.0, "p50_ms": 0.8, "p99_ms": 2.5, "count": 200},
    "store": {"durability": "full", "puts_per_s_batch1": 900.0, "puts_per_s_batch100": 40000.0},
    "inference": {"model": "skab-ae", "latency_p50_us": 30.0, "latency_p99_us": 40.0},
    "detect": {"latency_p50_ms": 3.0, "latency_p99_ms": 5.0, "alerts": 20},
    "codec": {"bytes_per_reading": {"high": 12.0, "medium": 1.5, "low": 1.0, "compact": 5.0}},
}
DEVICE = f"measured on this device {DEVICE_FINISHED}: bench --quick"


def write_device(data_dir: Path, summary: dict[str, object] = DEVICE_SUMMARY) -> Path:
    """DATA/bench/quick.json as `edge-agent bench --quick` writes it (agent/service/quickbench)."""
    path = data_dir / "bench" / "quick.json"
    path.parent.mkdir(parents=True)
    doc = {
        "format": 1,
        "bench": "quick",
        "finished": DEVICE_FINISHED,
        "host": "aarch64 CPython 3.11.2",
        "dir": str(data_dir / "bench-quick-x"),
        "fs_type": "ext4",
        "summary": summary,
    }
    path.write_text(json.dumps(doc))
    return path


def test_planner_reads_this_devices_quick_bench_first(tmp_path: Path) -> None:
    measured = write_measured(tmp_path / "bench")
    device = write_device(tmp_path / "data")
    p = plan(write_profile(tmp_path), measured, device)
    inputs = p.inputs
    assert inputs["edge_latency_p99_ms"] == {
        "value": 5.0,
        "source": f"{DEVICE} detect.latency_p99_ms",
    }
    assert inputs["edge_invoke_p99_us"] == {
        "value": 40.0,
        "source": f"{DEVICE} inference.latency_p99_us",
    }
    # encoding "senml": this device's SenML-CBOR level, 12 B a reading x 8 channels = 96 B
    assert inputs["bytes_per_record"] == {
        "value": 96.0,
        "source": f"{DEVICE} codec.bytes_per_reading.high (SenML-CBOR) x 8",
    }
    assert inputs["store_puts_per_s_batch1"]["value"] == 900.0
    assert inputs["fsync_per_s"] == {"value": 1200.0, "source": f"{DEVICE} fsync.per_s"}
    # the cloud's model time is not the device's: from the fallback, 2000 us = 2 ms
    assert inputs["cloud_inference_ms"]["value"] == 2.0
    assert inputs["cloud_inference_ms"]["source"].startswith("--measured: x86_64 CPython 3.11.7")
    splits = {s.name: s for s in p.splits}
    assert splits["edge-only"].latency_ms == 5.0
    # cloud-only: 86400 * (0.00001 + 96 B * 0.5 / 1e6 B = 0.000048) = 86400 * 0.000058 = 5.0112
    assert splits["cloud-only"].daily_cost == pytest.approx(5.0112)
    assert p.device_results is not None and str(device) in p.device_results
    assert p.warnings == []  # 86400 records a day = 1/s, the store puts 900/s
    text = format_plan(p)
    assert f"measured on this device: {device}" in text
    assert f"({DEVICE} detect.latency_p99_ms)" in text

    # A codec level: this device's bytes of that level, 1.0 B x 8 channels = 8 B.
    low = PROFILE.replace("rtt_ms = 40", 'rtt_ms = 40\nencoding = "low"')
    p = plan(write_profile(tmp_path, low, "low.toml"), measured, device)
    assert p.inputs["bytes_per_record"] == {
        "value": 8.0,
        "source": f"{DEVICE} codec.bytes_per_reading.low x 8",
    }
    # "compact" is a level only the device measured here: known from either source.
    compact = PROFILE.replace("rtt_ms = 40", 'rtt_ms = 40\nencoding = "compact"')
    p = plan(write_profile(tmp_path, compact, "compact.toml"), measured, device)
    assert p.inputs["bytes_per_record"]["value"] == 40.0  # 5.0 B x 8 channels

    # 100,000,000 records a day = 1157.4 a second: more than the store's 900 puts/s.
    busy = PROFILE.replace("daily_inferences = 86400", "daily_inferences = 100000000")
    p = plan(write_profile(tmp_path, busy, "busy.toml"), measured, device)
    assert len(p.warnings) == 1 and "1.16e+03 records/s" in p.warnings[0]
    assert "warning: the workload stores" in format_plan(p)


def test_planner_falls_back_figure_by_figure(tmp_path: Path) -> None:
    measured = write_measured(tmp_path / "bench")
    # the detect part was skipped on the device (a runtime that refused the model)
    summary = {**DEVICE_SUMMARY, "detect": {"skipped": "no runtime"}}
    summary.pop("codec")
    device = write_device(tmp_path / "data", summary)
    p = plan(write_profile(tmp_path), measured, device)
    assert p.inputs["edge_latency_p99_ms"]["value"] == 16.0  # write_measured's detect_ms
    assert p.inputs["edge_latency_p99_ms"]["source"].startswith("--measured: ")
    assert p.inputs["bytes_per_record"]["value"] == 60.0  # bench sync's, no device codec
    assert p.inputs["edge_invoke_p99_us"]["source"].startswith(DEVICE)
    # no device file at all: the fallback alone, and no device line
    p = plan(write_profile(tmp_path), measured, tmp_path / "nowhere" / "quick.json")
    assert p.device_results is None and p.inputs["edge_latency_p99_ms"]["value"] == 16.0
    # the bundled fallback (the checkout's docs/bench-results/) says whose figures they are
    p = plan(write_profile(tmp_path), None, device)
    assert p.inputs["cloud_inference_ms"]["source"].startswith("bundled: build machine ")
    # figures measured on tmpfs: the plan says that durable there involved no fsync
    doc = json.loads(device.read_text())
    device.write_text(json.dumps({**doc, "fs_type": "tmpfs", "no_fsync": True}))
    p = plan(write_profile(tmp_path), measured, device)
    assert any("measured on tmpfs" in w and "no fsync" in w for w in p.warnings), p.warnings
    # a damaged device file is an error naming it, not a silent fallback
    broken = tmp_path / "broken" / "bench" / "quick.json"
    broken.parent.mkdir(parents=True)
    broken.write_text('{"summary": 3}')
    with pytest.raises(ConfigError, match=r"quick\.json: summary: missing"):
        plan(write_profile(tmp_path), measured, broken)


def test_plan_command_finds_the_device_results(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    measured = write_measured(tmp_path / "bench")
    write_device(tmp_path / "data")
    profile = write_profile(tmp_path)
    base = ["plan", "--profile", str(profile), "--measured", str(measured), "--json"]
    assert cli.main([*base, "--data-dir", str(tmp_path / "data")]) == cli.EX_OK
    doc = json.loads(capsys.readouterr().out)
    assert doc["inputs"]["edge_latency_p99_ms"]["source"] == f"{DEVICE} detect.latency_p99_ms"
    # --measured alone: only the runs in that directory
    assert cli.main(base) == cli.EX_OK
    doc = json.loads(capsys.readouterr().out)
    assert doc["device_results"] is None
    assert doc["inputs"]["edge_latency_p99_ms"]["value"] == 16.0
    # --config: its data_dir
    config = tmp_path / "agent.toml"
    config.write_text(
        f'[agent]\ndevice_id = "pump-1"\ndata_dir = "{tmp_path / "data"}"\n'
        '[[sensor]]\nname = "t"\ndriver = "bme280"\nbus = 1\naddress = 0x76\n'
        'interval = 1.0\nchannels = ["temperature_c"]\n'
    )
    assert cli.main([*base, "--config", str(config)]) == cli.EX_OK, capsys.readouterr().err
    doc = json.loads(capsys.readouterr().out)
    assert doc["inputs"]["edge_latency_p99_ms"]["value"] == 5.0


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
