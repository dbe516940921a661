"""What a machine is to tools/flash (``--role``): a device (the agent beside a machine, the
default) or a gateway (``edge-agent gateway``, docs/gateway.md). Each role has its own service
account, data directory, config file and units; both share /opt/edge-agent (the bundle and the
venv: one release of the code) and /etc/edge-agent, so one machine can hold both: flashing one
role leaves what the other installed as it is.
"""

from __future__ import annotations

from dataclasses import dataclass

INSTALL_SERVICE = "edge-agent-install.service"  # the first-boot venv builder: both roles


@dataclass(frozen=True)
class Role:
    name: str
    user: str  # the service account (the unit's User= and Group=)
    groups: tuple[str, ...]  # its supplementary groups (the unit's SupplementaryGroups=)
    home: str  # its data directory (the unit's StateDirectory=; the config's data_dir)
    home_mode: int  # as the unit's StateDirectoryMode= makes it
    conf: str  # its config file
    template: str  # the config template in systemd/
    service: str  # its unit
    principal: str  # the role of the credential it runs with (agent/wire/credentials.py)
    hardware: bool  # I2C and serial: i2c-dev at boot, its udev rule, dtparam=i2c_arm=on

    @property
    def credential(self) -> str:
        return f"{self.home}/credential.json"

    def installs(self, unit: str) -> bool:
        """Whether ``unit`` (a file name of systemd/) is one of this role's: the gateway's are
        ``edge-agent-gateway*``, the device's every other ``edge-agent*``; the first-boot
        installer is both roles'."""
        if unit == INSTALL_SERVICE:
            return True
        return unit.startswith("edge-agent-gateway") == (self.name == "gateway")


DEVICE = Role(
    name="device",
    user="edge-agent",
    groups=("i2c", "dialout"),
    home="/var/lib/edge-agent",
    home_mode=0o755,
    conf="/etc/edge-agent/agent.toml",
    template="agent.toml.in",
    service="edge-agent.service",
    principal="device",
    hardware=True,
)
GATEWAY = Role(
    name="gateway",
    user="edge-agent-gateway",
    groups=(),
    home="/var/lib/edge-agent-gateway",
    home_mode=0o700,
    conf="/etc/edge-agent/gateway.toml",
    template="gateway.toml.in",
    service="edge-agent-gateway.service",
    principal="gateway",
    hardware=False,
)
ROLES = {r.name: r for r in (DEVICE, GATEWAY)}
DEVICES_DIR = "devices"  # under the gateway's home: [gateway] credentials
