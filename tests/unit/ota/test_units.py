"""The OTA units (systemd/edge-agent.service.d/ota.conf, edge-agent-rollback.service,
edge-agent-update.path/.service, edge-agent-health.timer/.service) pass ``systemd-analyze
verify`` beside edge-agent.service in a root tree where their binaries exist, the drop-in is
really read, and the commands they run are the ones tests/e2e/test_ota.py drives."""

from __future__ import annotations

import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from agent.ota.bootcheck import MAX_ATTEMPTS

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parents[3]
SYSTEMD = ROOT / "systemd"
UNITS = [
    "edge-agent.service",
    "edge-agent-install.service",
    "edge-agent-rollback.service",
    "edge-agent-update.service",
    "edge-agent-update.path",
    "edge-agent-health.service",
    "edge-agent-health.timer",
]
DROPIN = SYSTEMD / "edge-agent.service.d" / "ota.conf"
HOST_UNITS = Path("/usr/lib/systemd/system")
BINARIES = (
    "opt/edge-agent/venv/bin/edge-agent",
    "opt/edge-agent/venv/bin/python",
    "opt/edge-agent/install-venv",
    "usr/bin/python3",
)


def exec_lines(path: Path, key: str) -> list[list[str]]:
    out = []
    for line in path.read_text().splitlines():
        if line.startswith(f"{key}="):
            out.append(shlex.split(line.partition("=")[2].lstrip("-+@!:")))
    return out


def make_root(tmp_path: Path, dropin_text: str | None = None) -> Path:
    root = tmp_path / "root"
    units = root / "etc" / "systemd" / "system"
    (units / "edge-agent.service.d").mkdir(parents=True)
    for name in UNITS:
        shutil.copy(SYSTEMD / name, units / name)
    (units / "edge-agent.service.d" / "ota.conf").write_text(dropin_text or DROPIN.read_text())
    for exe in BINARIES:
        path = root / exe
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("#!/bin/sh\n")
        path.chmod(0o755)
    dest = root / "usr" / "lib" / "systemd" / "system"
    dest.mkdir(parents=True)
    for target in HOST_UNITS.glob("*.target"):
        shutil.copy(target, dest / target.name)
    return root


def verify(root: Path, *units: str) -> subprocess.CompletedProcess[str]:
    assert shutil.which("systemd-analyze"), "systemd-analyze is needed (apt-get install systemd)"
    return subprocess.run(
        ["systemd-analyze", "verify", f"--root={root}", *units],
        capture_output=True,
        text=True,
        check=False,
        timeout=50,
    )


def test_verify_passes_on_the_ota_units(tmp_path: Path) -> None:
    proc = verify(make_root(tmp_path), *UNITS)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.strip() == "", f"systemd-analyze warns:\n{proc.stderr}"


def test_the_dropin_is_read(tmp_path: Path) -> None:
    """Without its '-' and with no python3, the drop-in's ExecStartPre fails verification."""
    text = DROPIN.read_text().replace("ExecStartPre=-+", "ExecStartPre=+")
    root = make_root(tmp_path, text)
    (root / "usr/bin/python3").unlink()
    proc = verify(root, "edge-agent.service")
    assert proc.returncode != 0
    assert "/usr/bin/python3" in proc.stderr


def test_units_run_the_bootcheck_and_the_updater() -> None:
    (pre,) = exec_lines(DROPIN, "ExecStartPre")
    assert pre[:3] == ["/usr/bin/python3", "-I", "/opt/edge-agent/ota-bootcheck.py"]
    assert pre[3] == "start"
    (failed,) = exec_lines(SYSTEMD / "edge-agent-rollback.service", "ExecStart")
    assert failed[3] == "failed" and failed[-2:] == ["--restart-unit", "edge-agent.service"]
    (apply,) = exec_lines(SYSTEMD / "edge-agent-update.service", "ExecStart")
    assert apply[0] == "/opt/edge-agent/venv/bin/python"
    assert apply[1:5] == ["-I", "-m", "agent.ota.updater", "apply"]
    (health,) = exec_lines(SYSTEMD / "edge-agent-health.service", "ExecStart")
    assert health[:4] == ["/usr/bin/python3", "-I", "/opt/edge-agent/ota-bootcheck.py", "health"]
    assert health[-2:] == ["--restart-unit", "edge-agent.service"]
    # each run counts --interval seconds: the timer's period
    interval = int(health[health.index("--interval") + 1])
    timer = (SYSTEMD / "edge-agent-health.timer").read_text()
    period = timer.split("OnUnitActiveSec=")[1].split()[0]
    assert period.endswith("min") and int(period[:-3]) * 60 == interval
    (start,) = exec_lines(SYSTEMD / "edge-agent.service", "ExecStart")
    assert start[0] == "/opt/edge-agent/venv/bin/edge-agent"  # venv -> current -> releases/V
    text = (SYSTEMD / "edge-agent.service").read_text()
    burst = int(text.split("StartLimitBurst=")[1].split()[0])
    assert burst > MAX_ATTEMPTS  # the boot counter rolls back before systemd gives up
