"""``tools/flash --role gateway``: a gateway put on a machine (a root filesystem directory), as
test_flash.py puts a device, with its helpers, bundle and keys.

- the gateway's pieces: its account (edge-agent-gateway, no hardware groups), gateway.toml
  (0600, its user's) that the gateway's own loader reads with the paths of the unit, its
  credential (role gateway) and its devices' credentials in its data directory (0700),
  edge-agent-gateway.service and the first-boot installer, enabled, and nothing of a device
  (no agent unit, no I2C, no config.txt change, no OTA pieces); a second run: "nothing to do";
- beside a device: the device role flashed onto the same machine adds the agent and changes
  none of the gateway's files, and each role flashed again has nothing to do;
- refused before anything is touched: a device-only option, a device's credential as the
  gateway's, a gateway's among the devices', --devices for a device.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from agent.wire.credentials import Credential
from tests.e2e.test_flash import (
    CONFIG_TXT,
    ENDPOINT,
    IS_ROOT,
    SYSTEMD,
    UNIT_DIR,
    Keys,
    bundle,  # noqa: F401 - the module's bundle, built once
    cloud,
    device_args,
    flash,
    group_members,
    keys,  # noqa: F401
    make_rootfs,
    passwd_entry,
    snapshot,
    symlinks,
    verify,
)

pytestmark = pytest.mark.timeout(600)

GW = "gw-1"
HOME = "var/lib/edge-agent-gateway"
CONF = "etc/edge-agent/gateway.toml"


def gateway_credential(kit: Keys, name: str = GW) -> Path:
    """The gateway's credential file (``gateways add --credential-out``), made once."""
    path = kit.dir / f"{name}.json"
    if not path.exists():
        cloud("gateways", "add", "--data", kit.dir / "cloud", name, "--credential-out", path)
    return path


def devices_dir(tmp_path: Path, kit: Keys, *names: str) -> Path:
    """A folder with the devices' credential files, as an operator gathers them."""
    folder = tmp_path / "devices"
    folder.mkdir()
    for name in names:
        shutil.copy(kit.credential(name), folder / f"{name}.json")
    return folder


def gateway_args(
    wheels: Path, kit: Keys, devices: Path, credential: Path | None = None
) -> list[str | Path]:
    return [
        *("--role", "gateway", "--device-id", GW, "--endpoint", ENDPOINT),
        *("--credential", credential or gateway_credential(kit)),
        *("--devices", devices, "--bundle", wheels),
    ]


def test_flash_a_gateway_into_a_root_fs_directory(
    tmp_path: Path,
    bundle: Path,  # noqa: F811
    keys: Keys,  # noqa: F811
) -> None:
    from agent.gateway.settings import load_gateway_config

    root = make_rootfs(tmp_path / "rootfs")
    devices = devices_dir(tmp_path, keys, "pump-01", "pump-02")
    before = snapshot(root)
    dry = flash("dir", root, *gateway_args(bundle, keys, devices), "--dry-run")
    assert "account: add user edge-agent-gateway" in dry.stdout
    assert "write /etc/edge-agent/gateway.toml (0600 edge-agent-gateway:edge-agent-gateway" in (
        dry.stdout
    )
    assert f"write /{HOME}/devices/pump-01.json (0600 edge-agent-gateway" in dry.stdout
    assert "symlink /etc/systemd/system/multi-user.target.wants/edge-agent-gateway.service" in (
        dry.stdout
    )
    for device_only in ("i2c", "agent.toml", "edge-agent.service ", "ota-bootcheck", "dtparam"):
        assert device_only not in dry.stdout, device_only
    assert snapshot(root) == before

    first = flash("dir", root, *gateway_args(bundle, keys, devices))
    assert "done:" in first.stdout
    # The account: a system user with its own group, in no hardware group.
    user = passwd_entry(root, "edge-agent-gateway")
    uid, gid = int(user[2]), int(user[3])
    assert user[5] == f"/{HOME}" and user[6] == "/usr/sbin/nologin"
    assert group_members(root, "edge-agent-gateway")[0] == gid
    assert group_members(root, "dialout")[1] == ["pi"]
    assert "i2c:" not in (root / "etc/group").read_text()
    # Its config, read by the gateway's own loader: the paths of the unit.
    conf = root / CONF
    assert conf.stat().st_mode & 0o7777 == 0o600
    cfg = load_gateway_config(conf)
    assert cfg.name == GW and cfg.data_dir == Path(f"/{HOME}")
    assert list(cfg.uplink.endpoints) == [ENDPOINT] and cfg.uplink.security == "oscore"
    assert cfg.uplink.credential == Path(f"/{HOME}/credential.json")
    assert cfg.gateway.credentials == Path(f"/{HOME}/devices")
    # Its credential and its devices', in its data directory, its own.
    home = root / HOME
    credential = home / "credential.json"
    assert credential.read_bytes() == gateway_credential(keys).read_bytes()
    assert Credential.read(credential).role == "gateway"
    held = sorted(p.name for p in (home / "devices").iterdir())
    assert held == ["pump-01.json", "pump-02.json"]
    for path in (home, home / "devices"):
        assert path.stat().st_mode & 0o7777 == 0o700
    for path in (conf, credential, *(home / "devices").iterdir()):
        if path.parent.name == "devices":
            assert path.read_bytes() == keys.credential(path.stem).read_bytes()
        assert path.stat().st_mode & 0o7777 == 0o600 or path == conf
        if IS_ROOT:
            assert (path.stat().st_uid, path.stat().st_gid) == (uid, gid), path
    # Its units, enabled; nothing of a device.
    installed = root / UNIT_DIR
    assert sorted(p.name for p in installed.iterdir() if p.is_file()) == [
        "edge-agent-gateway.service",
        "edge-agent-install.service",
    ]
    for name in ("edge-agent-gateway.service", "edge-agent-install.service"):
        assert (installed / name).read_bytes() == (SYSTEMD / name).read_bytes()
    assert symlinks(installed) == {
        "multi-user.target.wants/edge-agent-gateway.service": (
            "/etc/systemd/system/edge-agent-gateway.service"
        )
    }
    for absent in (
        "etc/edge-agent/agent.toml",
        "etc/modules-load.d/edge-agent.conf",
        "etc/udev/rules.d/60-edge-agent-i2c.rules",
        "opt/edge-agent/ota-bootcheck.py",
        "var/lib/edge-agent",
    ):
        assert not (root / absent).exists(), absent
    assert (root / "boot/firmware/config.txt").read_text() == CONFIG_TXT
    assert (root / "opt/edge-agent/install-venv").exists()
    verify(root, "edge-agent-install.service")  # the gateway's own waits for the venv

    after = snapshot(root)
    second = flash("dir", root, *gateway_args(bundle, keys, devices))
    assert "nothing to do" in second.stdout
    assert snapshot(root) == after

    # Beside a device: the agent comes, the gateway's files stay as they are.
    gateway_files = {k: v for k, v in after.items() if "gateway" in k}
    flash("dir", root, *device_args(bundle, keys))
    both = snapshot(root)
    assert {k: v for k, v in both.items() if "gateway" in k} == gateway_files
    assert (root / "etc/edge-agent/agent.toml").exists()
    assert (installed / "edge-agent.service").exists()
    for args in (gateway_args(bundle, keys, devices), device_args(bundle, keys)):
        assert "nothing to do" in flash("dir", root, *args).stdout
    assert snapshot(root) == both


def test_flash_refuses_what_a_gateway_does_not_take(
    tmp_path: Path,
    bundle: Path,  # noqa: F811
    keys: Keys,  # noqa: F811
) -> None:
    root = make_rootfs(tmp_path / "rootfs")
    devices = devices_dir(tmp_path, keys, "pump-01")
    before = snapshot(root)

    def refused(*args: str | Path, says: str) -> None:
        proc = flash("dir", root, *args, check=False)
        assert proc.returncode == 1, proc.stdout + proc.stderr
        error = proc.stderr.strip()
        assert len(error.splitlines()) == 1 and says in error, error

    args = gateway_args(bundle, keys, devices)
    refused(*args, "--model-key", keys.model_key, says="--model-key: not with --role gateway")
    refused(*args, "--bench", says="--bench: not with --role gateway")
    # the gateway runs with its own credential, not a device's
    with_device = gateway_args(bundle, keys, devices, credential=keys.credential("pump-01"))
    refused(*with_device, says="the credential of device 'pump-01', not of a gateway")
    # and its devices' folder holds devices' credentials only
    shutil.copy(gateway_credential(keys, "gw-2"), devices / "gw-2.json")
    refused(*args, says="the credential of gateway 'gw-2', not of a device")
    empty = tmp_path / "empty"
    empty.mkdir()
    refused(*gateway_args(bundle, keys, empty), says="no credential files (*.json) in it")
    refused(*device_args(bundle, keys), "--devices", empty, says="only with --role gateway")
    assert snapshot(root) == before
