"""systemd/edge-agent-gateway.service and systemd/gateway.toml.in, as ``tools/flash --role
gateway`` installs them (the agent's unit: test_systemd_unit.py, whose helpers run
systemd-analyze here too).

- ``systemd-analyze verify`` passes on it and the first-boot installer it requires, in a root
  tree with their binaries, with no warnings;
- ``systemd-analyze security --offline=yes`` scores it at most the agent unit's limit, with no
  device node open (no DeviceAllow= groups, PrivateDevices=) and the same checks closed;
- the notify, watchdog, restart and start-limit directives are the agent unit's;
- its ExecStart, user, state and config directories are the paths flash_lib.roles gives the
  gateway role, and the template renders to a config the gateway's loader reads with them;
- flash installs it for the gateway role only, the device's units for the device role only.
"""

from __future__ import annotations

import posixpath
from pathlib import Path

from flash_lib import units
from flash_lib.provision import VENV, Settings, render_config
from flash_lib.roles import DEVICE, DEVICES_DIR, GATEWAY

from tests.unit.service.test_systemd_unit import (
    CLOSED,
    EXPOSURE_LIMIT,
    INSTALL_UNIT,
    ROOT,
    UNIT,
    analyze,
    directives,
    one,
    seconds,
    security,
    values,
    verify_clean,
    verify_root,
)

GW_UNIT = ROOT / "systemd" / "edge-agent-gateway.service"
GW_TEMPLATE = ROOT / "systemd" / "gateway.toml.in"


@analyze
def test_gateway_unit_verifies_with_the_installer_it_requires(tmp_path: Path) -> None:
    root = tmp_path / "root"
    verify_clean(verify_root(root, GW_UNIT, INSTALL_UNIT), GW_UNIT, INSTALL_UNIT)


@analyze
def test_gateway_unit_exposure_at_most_the_agents_limit_with_no_devices() -> None:
    exposure, marks, report = security(GW_UNIT)
    assert exposure <= EXPOSURE_LIMIT, report
    assert exposure <= security(UNIT)[0], report  # no more open than the agent's
    for check in (*CLOSED, "PrivateDevices=", "SupplementaryGroups="):
        assert marks.get(check) == "✓", check
    row = next(line for line in report.splitlines() if "DeviceAllow=" in line)
    assert "char-i2c" not in row and "char-tty" not in row, row


def test_gateway_unit_has_the_agent_units_service_directives() -> None:
    assert one(GW_UNIT, "Service", "Type") == "notify"
    assert one(GW_UNIT, "Service", "NotifyAccess") == "main"
    assert 0 < seconds(one(GW_UNIT, "Service", "WatchdogSec")) <= 60
    assert one(GW_UNIT, "Service", "Restart") == "on-failure"
    assert "78" in one(GW_UNIT, "Service", "RestartPreventExitStatus").split()  # EX_CONFIG
    for section, key in (
        ("Unit", "StartLimitIntervalSec"),
        ("Unit", "StartLimitBurst"),
        ("Service", "RestartSec"),
        ("Service", "TimeoutStopSec"),
        ("Service", "KillMode"),
        ("Service", "KillSignal"),
        ("Service", "RestrictAddressFamilies"),
        ("Service", "MemoryDenyWriteExecute"),
        ("Service", "ProtectSystem"),
        ("Service", "CapabilityBoundingSet"),
        ("Service", "ConfigurationDirectoryMode"),  # one directory, the same mode from both
        ("Install", "WantedBy"),
    ):
        assert values(GW_UNIT, section, key) == values(UNIT, section, key), key
    # the agent's filter without its last line: the two calls only the device agent makes (its
    # CPU pinning, its training process's nice 19)
    agent_filter = values(UNIT, "Service", "SystemCallFilter")
    assert agent_filter[-1] == "sched_setaffinity setpriority"
    assert values(GW_UNIT, "Service", "SystemCallFilter") == agent_filter[:-1]
    assert one(GW_UNIT, "Service", "DevicePolicy") == "closed"
    assert one(GW_UNIT, "Service", "PrivateDevices") == "yes"
    keys = {k for _, k, _ in directives(GW_UNIT)}
    # no hardware; it listens for its devices and peers, so the network stays
    assert not {"DeviceAllow", "SupplementaryGroups", "PrivateNetwork", "DynamicUser"} & keys
    # the venv is built at first boot before it starts
    assert "edge-agent-install.service" in values(GW_UNIT, "Unit", "Requires")
    assert "edge-agent-install.service" in values(GW_UNIT, "Unit", "After")


def test_gateway_unit_paths_are_the_ones_flash_installs() -> None:
    assert one(GW_UNIT, "Service", "ExecStart") == (
        f"{VENV}/bin/edge-agent gateway --config {GATEWAY.conf}"
    )
    assert one(GW_UNIT, "Service", "User") == GATEWAY.user
    assert one(GW_UNIT, "Service", "Group") == GATEWAY.user
    assert posixpath.join("/var/lib", one(GW_UNIT, "Service", "StateDirectory")) == GATEWAY.home
    assert int(one(GW_UNIT, "Service", "StateDirectoryMode"), 8) == GATEWAY.home_mode
    conf_dir = posixpath.join("/etc", one(GW_UNIT, "Service", "ConfigurationDirectory"))
    assert posixpath.dirname(GATEWAY.conf) == conf_dir
    # and the agent's unit has the device role's
    assert one(UNIT, "Service", "User") == DEVICE.user
    assert f"--config {DEVICE.conf}" in one(UNIT, "Service", "ExecStart")
    assert posixpath.join("/var/lib", one(UNIT, "Service", "StateDirectory")) == DEVICE.home


def test_gateway_template_renders_a_config_the_gateway_loads(tmp_path: Path) -> None:
    from agent.gateway.settings import load_gateway_config

    settings = Settings(
        device_id="gw-1",
        endpoint="coap://cloud.example:5683",
        credential=Path("gw-1.json"),
        role="gateway",
    )
    text = render_config(GW_TEMPLATE.read_text(), settings)
    path = tmp_path / "gateway.toml"
    path.write_text(text)
    cfg = load_gateway_config(path)
    assert cfg.name == "gw-1"
    assert cfg.data_dir == Path(GATEWAY.home)
    assert cfg.uplink.security == "oscore"
    assert cfg.uplink.credential == Path(GATEWAY.credential)
    assert cfg.gateway.credentials == Path(GATEWAY.home) / DEVICES_DIR
    assert (cfg.gateway.host, cfg.gateway.port) == ("0.0.0.0", 5683)
    assert cfg.gateway.peers is None


def test_flash_installs_each_role_its_own_units() -> None:
    systemd = ROOT / "systemd"
    gateway = [p.name for p in units.unit_files(systemd, GATEWAY.installs)]
    device = [p.name for p in units.unit_files(systemd, DEVICE.installs)]
    assert gateway == [GW_UNIT.name, INSTALL_UNIT.name]
    assert UNIT.name in device and INSTALL_UNIT.name in device
    assert not [name for name in device if name.startswith("edge-agent-gateway")]
    assert units.dropin_files(systemd, GATEWAY.installs) == []  # the OTA drop-in is the agent's
    assert units.triggers(systemd, GATEWAY.installs) == []
