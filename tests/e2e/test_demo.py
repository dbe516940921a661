"""`edge-agent demo` prints a line a second by default and live readings from all seven parts
with --verbose, names alerts by the rig's channels, stops cleanly on a signal and removes its
temporary directory; `edge-agent selftest` probes the simulated rig and fails when a required part
is missing."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agent.detect.detector import Alert, AlertKind, Verdict
from agent.sense.simrig import SimRig
from agent.service import config as configmod
from agent.service.cli import selftest
from agent.service.config import example_config
from agent.service.demo import alert_text, rig_channels
from agent.wire.records import AlertBody
from drivers.clock import RealClock

PARTS = {"adxl345", "ina219", "ads1115", "mcp9600", "bme280", "modbus", "line"}
#: a summary line: time, readings/s, queue, link, the endpoint, the detector
SUMMARY = re.compile(
    r"^\s+[\d.]+s  \d+ readings/s  queue \d+  link \w+( \(rtt \d+ ms\))?  "
    r"endpoint \d+ records  detector (commissioning \d+/60|normal|ANOMALOUS)"
)


def _demo(tmp_path: Path, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "agent.service.cli", "demo", "--data-dir", str(tmp_path), *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def _demo_in_tmp(tmp_path: Path, *extra: str) -> subprocess.Popen[str]:
    """The demo as a user starts it: its own temporary directory (under TMPDIR = tmp_path)."""
    return subprocess.Popen(
        [sys.executable, "-m", "agent.service.cli", "demo", *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1", "TMPDIR": str(tmp_path)},
    )


def _read_until_all_parts(proc: subprocess.Popen[str], timeout: float = 60.0) -> list[str]:
    seen: set[str] = set()
    lines: list[str] = []
    deadline = time.monotonic() + timeout
    assert proc.stdout is not None
    while seen != PARTS and time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        m = re.match(r"\s*[\d.]+s\s+\S+\s+(\S+)\s+\S+=", line)
        if m:
            seen.add(m.group(1))
    assert seen == PARTS, f"parts seen: {sorted(seen)}\n{''.join(lines)}"
    return lines


@pytest.mark.timeout(120)
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_demo_verbose_prints_all_seven_parts_and_stops_cleanly(tmp_path: Path, sig: signal.Signals):
    proc = _demo(tmp_path, "--verbose")
    try:
        _read_until_all_parts(proc)
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert "stopped after" in out
    assert "Traceback" not in err
    assert (tmp_path / "queue.db").exists()  # --data-dir: the files are kept


@pytest.mark.timeout(60)
def test_demo_is_quiet_by_default_and_removes_its_directory(tmp_path: Path):
    """One summary line a second, nothing on stderr (no TFLite banner, no FIFO overrun of the
    reference rig's accelerometers, no warning), and /tmp/edge-demo-* gone at the end."""
    proc = _demo_in_tmp(tmp_path, "--seconds", "4")
    out, err = proc.communicate(timeout=50)
    assert proc.returncode == 0, err
    assert err == "", err  # was "INFO: Created TensorFlow Lite XNNPACK delegate for CPU."
    lines = out.splitlines()
    summaries = [line for line in lines if SUMMARY.match(line)]
    assert 3 <= len(summaries) <= 5, out
    others = [line for line in lines if line not in summaries]
    assert all(line.startswith("edge-agent demo: ") or "  cloud  " in line for line in others), (
        out
    )  # no reading lines
    (made,) = re.findall(r"removed (\S+edge-demo-\S+)$", lines[-1])
    assert Path(made).parent == tmp_path
    assert not Path(made).exists() and not list(tmp_path.glob("edge-demo-*"))


@pytest.mark.timeout(60)
def test_demo_ctrl_c_removes_its_directory_too(tmp_path: Path):
    proc = _demo_in_tmp(tmp_path)
    try:
        assert proc.stdout is not None
        while not SUMMARY.match(proc.stdout.readline() or "   0.0s  stop"):  # the first second
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        assert list(tmp_path.glob("edge-demo-*"))  # it is there while the demo runs
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert "Traceback" not in err
    assert not list(tmp_path.glob("edge-demo-*")), out


def test_alert_lines_name_the_rigs_channels_not_skab_columns():
    """The detector's channels are the model's (SKAB columns); the demo shows the rig's
    sensor/channel behind each, from [detect.inputs] / [sensor.signals]."""
    cfg = configmod.load(example_config())
    names = rig_channels(cfg)
    assert names["Volume Flow RateRMS"] == "flow/flow_lpm"
    alert = Alert(
        time=1_700_000_000.0,
        kind=AlertKind.RAISE,
        score=1.7,
        threshold=1.0,
        channels=(("Volume Flow RateRMS", 0.9), ("Pressure", 0.5), ("Current", 0.2)),
        verdict=Verdict.KNOWN_FAILURE,
        fault="valve_closing",
        confidence=0.93,
        novelty=None,
        model="skab-ae",
    )
    body = AlertBody(alert.time, alert.to_dict()).to_cbor()  # as the endpoint stores it
    text = alert_text(body, names)
    assert "top channels: flow/flow_lpm, loop/pressure_bar, motor/current_a" in text
    assert "known_failure (valve_closing) score 1.70 > 1.00" in text
    assert "Volume Flow RateRMS" not in text


def test_selftest_cli_passes_on_the_simulated_rig():
    cmd = [sys.executable, "-m", "agent.service.cli", "selftest", "--config", str(example_config())]
    result = subprocess.run(
        [*cmd, "--simulate", "pump"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split()[:4] == ["sensor", "driver", "bus/address", "identity"]
    assert len(lines) == 9 and all(line.rstrip().endswith("ok") for line in lines[1:])


def test_selftest_fails_when_a_required_part_is_missing():
    cfg = configmod.simulated(
        configmod.load(example_config()), configmod.SimulationConfig(source="pump")
    )

    async def main() -> list[dict]:
        clock = RealClock()
        rig = SimRig(cfg, clock)
        rig.part("loop").faults.disconnect = True  # the ADS1115 does not answer
        rig.part("ambient").faults.disconnect = True  # not required: a warning only
        try:
            return await selftest(cfg, clock, rig)
        finally:
            rig.close()

    rows = asyncio.run(main())
    by_name = {r["sensor"]: r for r in rows}
    assert not by_name["loop"]["ok"] and "no acknowledge" in by_name["loop"]["error"]
    assert not by_name["ambient"]["ok"] and not by_name["ambient"]["required"]
    assert all(r["ok"] for n, r in by_name.items() if n not in ("loop", "ambient"))
    failed_required = [r for r in rows if r["required"] and not r["ok"]]
    assert [r["sensor"] for r in failed_required] == ["loop"]


def test_selftest_reports_a_driver_bug_as_its_sensor_s_error_and_probes_the_others(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A driver whose read raises what no driver should (an IndexError of a parser that met an
    answer it did not expect): selftest said nothing of the other sensors and ended in a
    traceback; now that sensor's row says it, as the sampler does, and the others are probed."""
    from drivers.ads1115 import Ads1115

    async def buggy(self: Ads1115) -> dict[str, float]:
        raise IndexError("list index out of range")

    monkeypatch.setattr(Ads1115, "read", buggy)
    cfg = configmod.simulated(
        configmod.load(example_config()), configmod.SimulationConfig(source="pump")
    )

    async def main() -> list[dict]:
        clock = RealClock()
        rig = SimRig(cfg, clock)
        try:
            return await selftest(cfg, clock, rig)
        finally:
            rig.close()

    by_name = {r["sensor"]: r for r in asyncio.run(main())}
    assert not by_name["loop"]["ok"]
    assert by_name["loop"]["error"] == (
        "IndexError: list index out of range (a driver bug: report this line)"
    )
    assert all(r["ok"] for n, r in by_name.items() if n != "loop")
