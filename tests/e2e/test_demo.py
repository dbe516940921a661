"""`edge-agent demo` prints live readings from all seven parts and stops cleanly on a signal;
`edge-agent selftest` probes the simulated rig and fails when a required part is missing."""

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

from agent.sense.simrig import SimRig
from agent.service import config as configmod
from agent.service.cli import selftest
from agent.service.config import example_config
from drivers.clock import RealClock

PARTS = {"adxl345", "ina219", "ads1115", "mcp9600", "bme280", "modbus", "line"}


def _demo(tmp_path: Path, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "agent.service.cli", "demo", "--data-dir", str(tmp_path), *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
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


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_demo_prints_all_seven_parts_and_stops_cleanly(tmp_path: Path, sig: signal.Signals):
    proc = _demo(tmp_path)
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
