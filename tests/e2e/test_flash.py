"""tools/flash end to end: into a directory, into a two-partition disk image, over SSH, and a
flashed root filesystem whose installed agent passes its selftest in a chroot.

The wheel bundle is built once for the module with ``tools/flash bundle`` (pip wheel of this
checkout + pip download of the dependencies; pip's cache makes it quick after the first time),
and the keys the way an operator makes them: each device's credential with ``edge-agent-cloud
devices add --credential-out``, the model signing key with ``edge-agent-cloud models keygen``, the
release key with ``edge-agent-cloud releases keygen``. Each target is checked for the files,
owners, modes and enable symlinks it must have (the credential 0600 and the service user's, the
model key behind ``[models] public_key``, the over-the-air update pieces: every edge-agent unit
of systemd/ and its drop-in, enabled exactly where its ``[Install]`` says, ota-bootcheck.py, the
release key behind ``[update] public_key`` as the agent's own config loader reads it),
``systemd-analyze verify --root=`` on every installed unit whose binaries exist, and a second run
that says "nothing to do" and changes nothing. The image, SSH and chroot tests need root (sshd,
chroot, bind mounts; owners in the image); the Debian tools they use must be installed
(./tools/dev setup installs them): a missing one fails the test.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FLASH = ROOT / "tools" / "flash"
SYSTEMD = ROOT / "systemd"
BOOTCHECK_SOURCE = ROOT / "agent" / "ota" / "bootcheck.py"
RIG = ROOT / "agent" / "examples" / "pump-rig.toml"
HOST_UNITS = Path("/usr/lib/systemd/system")
PY = f"{sys.version_info[0]}.{sys.version_info[1]}"
ENDPOINT = "coap://127.0.0.1:5683"
CREDENTIAL = "/var/lib/edge-agent/credential.json"  # where tools/flash puts the credential
MODEL_KEY = "/etc/edge-agent/models.pub"  # and the model public key
RELEASE_KEY = "/etc/edge-agent/release.pub"  # the release public key (edge-agent-update.service)
BOOTCHECK = "/opt/edge-agent/ota-bootcheck.py"  # the boot counter (the drop-in's ExecStartPre)
UNIT_DIR = "etc/systemd/system"

sys.path.insert(0, str(ROOT / "tools"))
from flash_lib import accounts, bootcfg, units  # noqa: E402
from flash_lib.errors import FlashError  # noqa: E402
from flash_lib.image import check_pi_image  # noqa: E402
from flash_lib.keys import raw_public_key  # noqa: E402
from flash_lib.provision import bench_command  # noqa: E402
from flash_lib.sshfs import Destination, parse_destination  # noqa: E402
from flash_lib.targets import DirTarget, SshTarget  # noqa: E402

from agent.wire.credentials import Credential  # noqa: E402

IS_ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not IS_ROOT, reason="needs root (owners, sshd, chroot)")


def need(*tools: str) -> None:
    """Fail, not skip, unless every tool is installed (on PATH or in /usr/sbin)."""
    missing = [
        t for t in tools if shutil.which(t) is None and shutil.which(t, path="/usr/sbin") is None
    ]
    if missing:
        pytest.fail(f"not installed: {', '.join(missing)} (./tools/dev setup installs them)")


def flash(*args: str | Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [str(FLASH), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    if check:
        assert proc.returncode == 0, f"tools/flash failed:\n{proc.stdout}\n{proc.stderr}"
    return proc


def cloud(*argv: str | Path) -> None:
    """edge-agent-cloud, in this process."""
    from cloud.cli import main

    assert main([str(a) for a in argv]) == 0, argv


@dataclass(frozen=True)
class Keys:
    """What the operator makes with edge-agent-cloud for the devices it flashes."""

    dir: Path

    def credential(self, device_id: str, *add_args: str | Path) -> Path:
        """The device's credential file (``devices add --credential-out``), made once."""
        path = self.dir / f"{device_id}.json"
        if not path.exists():
            data = self.dir / "cloud"
            cloud("devices", "add", "--data", data, device_id, "--credential-out", path, *add_args)
        return path

    @property
    def model_key(self) -> Path:
        """The public half of the model signing key (``models keygen`` writes KEYFILE.pub)."""
        if not (self.dir / "signing.key").exists():
            cloud("models", "keygen", "--out", self.dir / "signing.key")
        return self.dir / "signing.key.pub"

    @property
    def release_key(self) -> Path:
        """The public half of the release signing key (``releases keygen`` writes KEYFILE.pub)."""
        if not (self.dir / "release.key").exists():
            cloud("releases", "keygen", "--out", self.dir / "release.key")
        return self.dir / "release.key.pub"


def device_args(bundle: Path, keys: Keys, device_id: str = "pump-01") -> list[str | Path]:
    return [
        "--device-id",
        device_id,
        "--endpoint",
        ENDPOINT,
        "--credential",
        keys.credential(device_id),
        "--model-key",
        keys.model_key,
        "--release-key",
        keys.release_key,
        "--bundle",
        bundle,
    ]


# -- a root filesystem to flash into -----------------------------------------------------------
PASSWD = """root:x:0:0:root:/root:/bin/bash
daemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin
systemd-network:x:998:998:systemd Network Management:/:/usr/sbin/nologin
pi:x:1000:1000:,,,:/home/pi:/bin/bash
"""
GROUP = """root:x:0:
daemon:x:1:
dialout:x:20:pi
shadow:x:42:
systemd-network:x:998:
systemd-journal:x:999:
pi:x:1000:
"""
SHADOW = "root:*:19000:0:99999:7:::\npi:!:19000:0:99999:7:::\n"
GSHADOW = "root:*::\ndialout:*::pi\nshadow:*::\npi:!::\n"
LOGIN_DEFS = "SYS_UID_MIN 100\nSYS_UID_MAX 999\nSYS_GID_MIN 100\nSYS_GID_MAX 999\n"
CONFIG_TXT = """# For more options and information see http://rptl.io/configtxt
# Uncomment some or all of these to enable the optional hardware interfaces
#dtparam=i2c_arm=on
#dtparam=i2s=on
#dtparam=spi=on

[cm4]
otg_mode=1

[all]
"""


def elf_header(machine: int = 0x3E) -> bytes:
    """The first 64 bytes of a little-endian 64-bit ELF executable for ``machine``."""
    head = bytearray(64)
    head[:7] = b"\x7fELF\x02\x01\x01"
    head[16:18] = (2).to_bytes(2, "little")
    head[18:20] = machine.to_bytes(2, "little")
    return bytes(head)


def make_rootfs(root: Path, *, python: bool = True, boot: bool = True) -> Path:
    """A directory that looks like a Raspberry Pi OS root filesystem, small."""
    etc = root / "etc"
    etc.mkdir(parents=True)
    for name, text, mode in (
        ("passwd", PASSWD, 0o644),
        ("group", GROUP, 0o644),
        ("shadow", SHADOW, 0o640),
        ("gshadow", GSHADOW, 0o640),
        ("login.defs", LOGIN_DEFS, 0o644),
    ):
        (etc / name).write_text(text)
        (etc / name).chmod(mode)
        if name.endswith("shadow") and IS_ROOT:
            os.chown(etc / name, 0, 42)
    for d in ("usr/bin", "usr/sbin", "var", "tmp"):
        (root / d).mkdir(parents=True, exist_ok=True)
    (root / "tmp").chmod(0o1777)
    (root / "usr/sbin/nologin").write_bytes(elf_header())
    if python:  # found by its ELF header and name; never run (see the chroot test for that)
        (root / f"usr/bin/python{PY}").write_bytes(elf_header())
        (root / f"usr/bin/python{PY}").chmod(0o755)  # for verify: the OTA units run it
        (root / "usr/bin/python3").symlink_to(f"python{PY}")
    if HOST_UNITS.is_dir():  # the targets edge-agent.service depends on, for verify --root
        dest = root / "usr/lib/systemd/system"
        dest.mkdir(parents=True)
        for unit in HOST_UNITS.glob("*.target"):
            shutil.copy(unit, dest / unit.name)
    if boot:
        (root / "boot/firmware").mkdir(parents=True)
        (root / "boot/firmware/config.txt").write_text(CONFIG_TXT)
    return root


def snapshot(root: Path) -> dict[str, tuple[object, ...]]:
    """Every path under root with its type, mode, owner, size, mtime and link target."""
    out: dict[str, tuple[object, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath, name)
            st = path.lstat()
            link = os.readlink(path) if path.is_symlink() else None
            out[str(path.relative_to(root))] = (
                st.st_mode,
                st.st_uid,
                st.st_gid,
                st.st_size,
                st.st_mtime_ns,
                link,
            )
    return out


def passwd_entry(root: Path, name: str) -> list[str]:
    for line in (root / "etc/passwd").read_text().splitlines():
        if line.split(":")[0] == name:
            return line.split(":")
    raise AssertionError(f"no {name} in {root}/etc/passwd")


def group_members(root: Path, name: str) -> tuple[int, list[str]]:
    for line in (root / "etc/group").read_text().splitlines():
        fields = line.split(":")
        if fields[0] == name:
            return int(fields[2]), [m for m in fields[3].split(",") if m]
    raise AssertionError(f"no group {name} in {root}/etc/group")


def project_units() -> list[Path]:
    """The unit files tools/flash must install on a device: every edge-agent unit in systemd/
    but the gateway's (edge-agent-gateway*: tests/e2e/test_flash_gateway.py)."""
    return sorted(
        p
        for p in SYSTEMD.glob("edge-agent*")
        if p.suffix in (".service", ".path", ".timer")
        and not p.name.startswith("edge-agent-gateway")
    )


def enable_links(unit: Path) -> set[str]:
    """The symlinks ``systemctl enable`` makes for ``unit`` (under /etc/systemd/system), from
    its [Install] section: none for a unit without one."""
    section, links = "", set()
    for line in unit.read_text().splitlines():
        line = line.strip()
        if line.startswith("["):
            section = line
            continue
        key, _, value = line.partition("=")
        kind = {"WantedBy": "wants", "RequiredBy": "requires"}.get(key.strip())
        if section == "[Install]" and kind:
            links |= {f"{target}.{kind}/{unit.name}" for target in value.split()}
    return links


def symlinks(directory: Path) -> dict[str, str]:
    """Every symlink under ``directory``: its path relative to it -> its target."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(directory):
        for name in dirnames + filenames:
            path = Path(dirpath, name)
            if path.is_symlink():
                out[str(path.relative_to(directory))] = os.readlink(path)
    return out


def in_root(root: Path, path: str) -> Path:
    """``path`` of the target as a path of this machine, symlinks followed inside ``root``."""
    for _ in range(16):
        here = root / path.lstrip("/")
        if not here.is_symlink():
            break
        target = os.readlink(here)
        path = target if target.startswith("/") else os.path.join(os.path.dirname(path), target)
    return here


def runnable_units(root: Path) -> list[str]:
    """The installed units (and drop-ins) whose Exec*= binaries are executables in ``root``:
    ``systemd-analyze verify`` checks them, and before the first boot the venv's are missing."""
    out = []
    for unit in project_units():
        copy = root / UNIT_DIR / unit.name
        texts = [copy.read_text()] + [
            c.read_text() for c in copy.parent.glob(f"{unit.name}.d/*.conf")
        ]
        commands = [
            line.partition("=")[2].lstrip("-+@!:").split()[0]
            for text in texts
            for line in text.splitlines()
            if line.startswith("Exec")
        ]
        if all(os.access(in_root(root, c), os.X_OK) for c in commands):
            out.append(unit.name)
    return out


def verify(root: Path, *names: str) -> None:
    need("systemd-analyze")
    proc = subprocess.run(
        ["systemd-analyze", "verify", f"--root={root}", *names],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0 and not proc.stderr.strip(), proc.stderr


def assert_units(root: Path) -> None:
    """Every edge-agent unit of systemd/ and its drop-ins installed (0644, root's), and enabled
    exactly as their [Install] sections say: no link for a unit without one."""
    installed = root / UNIT_DIR
    names = [unit.name for unit in project_units()]
    assert {"edge-agent.service", "edge-agent-rollback.service", "edge-agent-update.path"} <= set(
        names
    )
    dropins = sorted(SYSTEMD.glob("edge-agent*.d/*.conf"))
    assert SYSTEMD / "edge-agent.service.d" / "ota.conf" in dropins
    for path in [*project_units(), *dropins]:
        copy = installed / path.relative_to(SYSTEMD)
        assert copy.read_bytes() == path.read_bytes(), copy
        st = copy.stat()
        assert st.st_mode & 0o7777 == 0o644
        if IS_ROOT:
            assert (st.st_uid, st.st_gid) == (0, 0)
    links = set().union(*map(enable_links, project_units()))
    assert {
        "multi-user.target.wants/edge-agent.service",
        "edge-agent.service.requires/edge-agent-install.service",
        "multi-user.target.wants/edge-agent-update.path",
    } <= links
    if (SYSTEMD / "edge-agent-health.timer").exists():
        assert "timers.target.wants/edge-agent-health.timer" in links
    assert symlinks(installed) == {link: f"/etc/systemd/system/{Path(link).name}" for link in links}


def assert_provisioned(root: Path, bundle: Path, keys: Keys, *, device_id: str, venv: bool) -> None:
    """What every target must hold after tools/flash (root: the target's / as a directory)."""
    from agent.service import config

    # The account: a system user with its own group, no login, in groups i2c and dialout.
    user = passwd_entry(root, "edge-agent")
    uid, gid = int(user[2]), int(user[3])
    assert 100 <= uid <= 999 and user[5] == "/var/lib/edge-agent"
    assert user[6] == "/usr/sbin/nologin"
    assert group_members(root, "edge-agent")[0] == gid
    assert "edge-agent" in group_members(root, "i2c")[1]
    dialout_gid, dialout = group_members(root, "dialout")
    assert dialout_gid == 20 and dialout == ["pi", "edge-agent"]
    assert any(x.startswith("edge-agent:!:") for x in (root / "etc/shadow").read_text().split())
    shadow = (root / "etc/shadow").stat()
    if IS_ROOT:
        assert (shadow.st_mode & 0o777, shadow.st_uid, shadow.st_gid) == (0o640, 0, 42)

    # The config: 0600, the service user's, the device's values.
    conf = root / "etc/edge-agent/agent.toml"
    st = conf.stat()
    assert st.st_mode & 0o7777 == 0o600
    if IS_ROOT:
        assert (st.st_uid, st.st_gid) == (uid, gid)
    parsed = tomllib.loads(conf.read_text())
    assert parsed["agent"]["device_id"] == device_id
    assert parsed["sensor"] == tomllib.loads(RIG.read_text())["sensor"]
    assert parsed["uplink"] == {
        "endpoints": [ENDPOINT],
        "security": "oscore",
        "credential": CREDENTIAL,
    }
    assert parsed["models"] == {"public_key": "models.pub"}  # MODEL_KEY, beside agent.toml
    assert parsed["update"] == {"public_key": "release.pub"}  # RELEASE_KEY, beside agent.toml
    cfg = config.load(conf)  # as the agent reads it: the keys are there and are Ed25519 keys
    assert cfg.models.public_key == conf.parent / "models.pub"
    assert cfg.update is not None and cfg.update.public_key == conf.parent / "release.pub"

    # The device's own credential, as issued, in the data directory: 0600, the service user's.
    credential = root / CREDENTIAL.lstrip("/")
    st, data_dir = credential.stat(), credential.parent.stat()
    assert st.st_mode & 0o7777 == 0o600 and data_dir.st_mode & 0o7777 == 0o755
    if IS_ROOT:
        assert (st.st_uid, st.st_gid) == (uid, gid)
        assert (data_dir.st_uid, data_dir.st_gid) == (uid, gid)
    assert credential.read_bytes() == keys.credential(device_id).read_bytes()
    assert Credential.read(credential).principal == device_id  # as the agent reads it
    # The model public key, for [models] public_key.
    model_key = root / MODEL_KEY.lstrip("/")
    assert model_key.read_bytes() == keys.model_key.read_bytes()
    assert model_key.stat().st_mode & 0o7777 == 0o644
    # The release public key, for [update] public_key and edge-agent-update.service.
    release_key = root / RELEASE_KEY.lstrip("/")
    assert release_key.read_bytes() == keys.release_key.read_bytes()
    assert release_key.stat().st_mode & 0o7777 == 0o644

    assert_units(root)
    # The boot counter the drop-in and the rollback run with the system's python3.
    bootcheck = root / BOOTCHECK.lstrip("/")
    assert bootcheck.read_bytes() == BOOTCHECK_SOURCE.read_bytes()
    st = bootcheck.stat()
    assert st.st_mode & 0o7777 == 0o755
    if IS_ROOT:
        assert (st.st_uid, st.st_gid) == (0, 0)

    # The bundle, byte for byte, and its installer.
    for wheel in bundle.glob("*.whl"):
        copied = root / "opt/edge-agent/bundle" / wheel.name
        assert hashlib.sha256(copied.read_bytes()).digest() == (
            hashlib.sha256(wheel.read_bytes()).digest()
        ), wheel.name
    assert sorted(p.name for p in (root / "opt/edge-agent/bundle").iterdir()) == sorted(
        p.name for p in bundle.iterdir()
    )
    assert (root / "opt/edge-agent/install-venv").stat().st_mode & 0o777 == 0o755
    assert "i2c-dev" in (root / "etc/modules-load.d/edge-agent.conf").read_text().split()
    assert 'GROUP="i2c"' in (root / "etc/udev/rules.d/60-edge-agent-i2c.rules").read_text()
    assert (root / "opt/edge-agent/venv/bin/edge-agent").exists() == venv


# -- the bundle, once ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("flash") / "bundle"
    proc = flash("bundle", out)
    assert "bundle:" in proc.stdout
    return out


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    return Keys(tmp_path_factory.mktemp("keys"))


# -- pure parts ----------------------------------------------------------------------------------
def test_flash_config_txt_gets_i2c_once() -> None:
    text, what = bootcfg.enable_i2c(CONFIG_TXT)
    assert what is not None and "#dtparam=i2c_arm=on" in what
    assert text.splitlines()[2] == "dtparam=i2c_arm=on"
    assert bootcfg.enable_i2c(text) == (text, None)
    # Only in a filtered section: it does not count; the line goes under [all].
    text, what = bootcfg.enable_i2c("[pi4]\ndtparam=i2c_arm=on\n")
    assert text == "[pi4]\ndtparam=i2c_arm=on\n[all]\ndtparam=i2c_arm=on\n"
    assert bootcfg.enable_i2c("dtparam=i2c_arm=off\n")[0] == "dtparam=i2c_arm=on\n"
    assert bootcfg.enable_i2c("")[0] == "dtparam=i2c_arm=on\n"


def test_flash_accounts_are_added_once() -> None:
    files: dict[str, str | None] = {
        "/etc/passwd": PASSWD,
        "/etc/group": GROUP,
        "/etc/shadow": SHADOW,
        "/etc/gshadow": GSHADOW,
        "/etc/login.defs": LOGIN_DEFS,
    }
    kw = {
        "user": "edge-agent",
        "home": "/var/lib/edge-agent",
        "groups": ("i2c", "dialout"),
        "shell": "/usr/sbin/nologin",
        "today": 20000,
    }
    plan = accounts.plan_accounts(files, **kw)  # type: ignore[arg-type]
    assert (plan.uid, plan.gid) == (997, 997)  # highest system id free as both uid and gid
    assert "edge-agent:x:997:997:edge-agent service:/var/lib/edge-agent:/usr/sbin/nologin" in (
        plan.files["/etc/passwd"].splitlines()
    )
    group = plan.files["/etc/group"].splitlines()
    assert "dialout:x:20:pi,edge-agent" in group
    assert "i2c:x:996:edge-agent" in group
    assert "edge-agent:!:20000::::::" in plan.files["/etc/shadow"].splitlines()
    assert "i2c:!::edge-agent" in plan.files["/etc/gshadow"].splitlines()
    again = accounts.plan_accounts({**files, **plan.files}, **kw)  # type: ignore[arg-type]
    assert (again.files, again.changes, again.uid, again.gid) == ({}, [], 997, 997)


def test_flash_key_check_accepts_what_the_agent_loads(tmp_path: Path) -> None:
    """tools/flash checks a public key with the standard library (it runs with the system
    python3): it must accept exactly the files the agent's load_public_key accepts."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from agent.errors import ModelError
    from agent.modelstore.signing import load_public_key, public_bytes, write_keypair

    private, public = write_keypair(tmp_path / "k" / "release.key")
    pem = public.read_bytes()
    raw = public_bytes(load_public_key(public))
    other = ec.generate_private_key(ec.SECP256R1()).public_key()
    samples = {
        "pem": pem,
        "pem, CRLF": pem.replace(b"\n", b"\r\n"),
        "pem, no final newline": pem.rstrip(),
        "raw": raw,
        "raw, all spaces": b" " * 32,
        "hex": raw.hex().encode(),
        "hex, upper case, newline": raw.hex().upper().encode() + b"\n",
        "private pem": private.read_bytes(),
        "pem, truncated": pem[:-30],
        "pem, 3 bytes of the key dropped": pem.replace(
            pem.splitlines()[1], pem.splitlines()[1][:-4]
        ),
        "pem, not base64": pem.replace(pem.splitlines()[1][:4], b"!!!!"),
        "pem, P-256": other.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ),
        "31 bytes": raw[:31],
        "33 bytes": raw + b"\0",
        "hex, 63 digits": raw.hex()[:63].encode(),
        "hex, not hex": b"g" * 64,
        "empty": b"",
    }
    for name, data in samples.items():
        path = tmp_path / f"{name}.pub"
        path.write_bytes(data)
        try:
            load_public_key(path)
            loads = True
        except ModelError:
            loads = False
        assert (raw_public_key(data) is not None) == loads, name
        if loads:
            assert raw_public_key(data) == public_bytes(load_public_key(path)), name


def test_flash_enables_units_as_their_install_section_says() -> None:
    text = (
        "[Unit]\nDescription=x\nWantedBy=not-in-install.target\n\n[Install]\n"
        "# a comment\nWantedBy=a.target\\\nb.target\nRequiredBy=c.service\nAlias=y.service\n"
        "WantedBy=\nWantedBy=timers.target\n"
    )
    assert units.install_section(text.replace("WantedBy=\n", "")) == {
        "WantedBy": ["a.target", "b.target", "timers.target"],  # continued, then one more
        "RequiredBy": ["c.service"],
        "Alias": ["y.service"],
    }
    assert units.install_section(text) == {
        "WantedBy": ["timers.target"],  # the empty assignment reset the list
        "RequiredBy": ["c.service"],
        "Alias": ["y.service"],
    }
    entries = units.enable_links("x.timer", text, "/etc/systemd/system")
    assert [e.path for e in entries] == [
        "/etc/systemd/system/timers.target.wants",
        "/etc/systemd/system/timers.target.wants/x.timer",
        "/etc/systemd/system/c.service.requires",
        "/etc/systemd/system/c.service.requires/x.timer",
        "/etc/systemd/system/y.service",
    ]
    assert units.enable_links("x.service", "[Service]\nExecStart=/bin/true\n", "/u") == []
    with pytest.raises(FlashError, match="Foo= is not something tools/flash can enable"):
        units.enable_links("x.service", "[Install]\nFoo=bar\n", "/u")


def test_flash_bench_runs_the_installed_agent_where_commands_run(tmp_path: Path) -> None:
    """--bench: the installed agent with the flashed config, results in its data directory,
    every path as the target names it (under --prefix over SSH)."""
    ssh = SshTarget(parse_destination("root@pump.local"), prefix="/srv/dev")
    assert ssh.can_run()
    assert bench_command(ssh) == [
        "/srv/dev/opt/edge-agent/venv/bin/edge-agent",
        "bench",
        "--quick",
        "--config",
        "/srv/dev/etc/edge-agent/agent.toml",
        "--data-dir",
        "/srv/dev/var/lib/edge-agent",
    ]
    root = make_rootfs(tmp_path / "rootfs")
    assert DirTarget(root, chroot=True).can_run()
    assert bench_command(DirTarget(root, chroot=True))[0] == "/opt/edge-agent/venv/bin/edge-agent"
    assert not DirTarget(root).can_run()  # a foreign root without --chroot: skipped, with a note


def test_flash_ssh_destinations_parse() -> None:
    assert parse_destination("pi@raspberrypi.local") == Destination("pi", "raspberrypi.local", None)
    assert parse_destination("root@127.0.0.1:2222") == Destination("root", "127.0.0.1", 2222)
    assert parse_destination("pi@[fe80::1]:22") == Destination("pi", "fe80::1", 22)
    for bad in ("pi@host:0", "pi@host:x", "pi@", "-oProxyCommand=x"):
        with pytest.raises(FlashError):
            parse_destination(bad)


# -- refusals ------------------------------------------------------------------------------------
def test_flash_refuses_a_directory_that_is_not_a_root_fs(
    tmp_path: Path, bundle: Path, keys: Keys
) -> None:
    (tmp_path / "etc").mkdir()
    proc = flash("dir", tmp_path, *device_args(bundle, keys), check=False)
    assert proc.returncode == 1
    assert "does not look like a root filesystem (no /usr)" in proc.stderr
    assert list(tmp_path.iterdir()) == [tmp_path / "etc"]
    proc = flash("dir", tmp_path / "nope", *device_args(bundle, keys), check=False)
    assert proc.returncode == 1 and "no such directory" in proc.stderr


def test_flash_refuses_bad_arguments(tmp_path: Path, bundle: Path, keys: Keys) -> None:
    root = make_rootfs(tmp_path / "root")
    before = snapshot(root)
    args = ["dir", root, "--bundle", bundle]
    proc = flash(*args, "--device-id", "pump-01", "--endpoint", "http://x", check=False)
    assert proc.returncode == 1 and "--endpoint" in proc.stderr
    proc = flash(*args, "--device-id", "9 lives", "--endpoint", ENDPOINT, check=False)
    assert proc.returncode == 1 and "--device-id" in proc.stderr
    proc = flash(
        *args,
        *("--device-id", "pump-01", "--endpoint", ENDPOINT),
        *("--credential", keys.credential("pump-01"), "--arch", "aarch64"),
        check=False,
    )
    assert proc.returncode == 1
    assert "--arch aarch64, but the target runs x86_64" in proc.stderr
    assert snapshot(root) == before


def test_flash_refuses_without_the_device_credential(
    tmp_path: Path, bundle: Path, keys: Keys
) -> None:
    root = make_rootfs(tmp_path / "root")
    before = snapshot(root)
    credential = keys.credential("pump-01")

    def refused(*args: str | Path, says: str) -> str:
        proc = flash("dir", root, "--bundle", bundle, "--device-id", "pump-01", *args, check=False)
        assert proc.returncode == 1, proc.stdout + proc.stderr
        error = proc.stderr.strip()
        assert len(error.splitlines()) == 1 and says in error, error
        return error

    # OSCORE (the default) and DTLS need the credential; the one line names how to make it.
    error = refused("--endpoint", ENDPOINT, says="--security oscore needs the device's credential")
    assert "`edge-agent-cloud devices add --data DIR pump-01 --credential-out" in error
    assert "--credential pump-01.json" in error
    refused(
        *("--endpoint", "coaps://127.0.0.1:5684", "--security", "dtls"),
        says="edge-agent-cloud devices add",
    )
    # Each device gets its own.
    refused(
        *("--endpoint", ENDPOINT, "--credential", keys.credential("pump-02")),
        says="the credential of 'pump-02', not of --device-id 'pump-01'",
    )
    junk = tmp_path / "junk.json"
    junk.write_text('{"format": 1, "principal": "pump-01"}')
    refused("--endpoint", ENDPOINT, "--credential", junk, says="not a credential file")
    refused(
        *("--endpoint", ENDPOINT, "--credential", tmp_path / "none.json"),
        says="No such file or directory",
    )
    # The model key is the public half, not the signing key beside it.
    refused(
        *("--endpoint", ENDPOINT, "--credential", credential),
        *("--model-key", keys.model_key.with_suffix("")),
        says="a private key: give the public one",
    )
    # So is the release key; and it is not the model key (a device given that one would refuse
    # every release signed with the release key).
    release_args = ["--endpoint", ENDPOINT, "--credential", credential, "--release-key"]
    refused(*release_args, keys.release_key.with_suffix(""), says="a private key: give the public")
    refused(*release_args, junk, says="not an Ed25519 public key")
    error = refused(*release_args, tmp_path / "none.pub", says="No such file or directory")
    assert error.startswith(f"tools/flash: error: --release-key {tmp_path / 'none.pub'}: ")
    error = refused(
        *release_args,
        keys.model_key,
        "--model-key",
        keys.model_key,
        says="the same key as --model-key",
    )
    assert "`edge-agent-cloud releases keygen`" in error
    # A template of its own needs the place for the [update] table --release-key fills in.
    template = tmp_path / "agent.toml.in"
    template.write_text((SYSTEMD / "agent.toml.in").read_text().replace("@UPDATE@", ""))
    refused(
        *release_args,
        keys.release_key,
        "--template",
        template,
        says="config template: no @UPDATE@",
    )
    # coaps:// goes with DTLS, and DTLS with coaps:// only.
    refused(
        *("--endpoint", "coaps://127.0.0.1:5684", "--credential", credential),
        says="coaps:// with --security dtls",
    )
    refused(
        *("--endpoint", ENDPOINT, "--security", "dtls", "--credential", credential),
        says="expected coaps://HOST:PORT",
    )
    # The PSK options of earlier versions say where the PSK went.
    refused(
        *("--endpoint", ENDPOINT, "--credential", credential, "--psk-file", junk),
        says="--psk-file: the DTLS PSK is in the device's credential file now",
    )
    assert snapshot(root) == before


def test_flash_refuses_an_image_without_pi_partitions(
    tmp_path: Path, bundle: Path, keys: Keys
) -> None:
    need("sfdisk")
    blank = tmp_path / "blank.img"
    blank.write_bytes(bytes(1 << 20))
    proc = flash("image", blank, *device_args(bundle, keys), check=False)
    assert proc.returncode == 1 and "no partition table" in proc.stderr
    one = tmp_path / "one.img"
    with open(one, "wb") as f:
        f.truncate(8 << 20)
    subprocess.run(["sfdisk", "-q", str(one)], input="start=2048, type=83\n", text=True, check=True)
    proc = flash("image", one, *device_args(bundle, keys), check=False)
    assert proc.returncode == 1
    assert "expected partition 1 FAT (bootfs) and partition 2 ext4 (rootfs)" in proc.stderr
    with pytest.raises(FlashError, match="partition 1"):
        check_pi_image(one)


def test_flash_refuses_an_unreachable_ssh_host(bundle: Path, keys: Keys, tmp_path: Path) -> None:
    need("ssh")
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = flash(
        "ssh",
        f"root@127.0.0.1:{port}",
        "--known-hosts",
        tmp_path / "known_hosts",
        *device_args(bundle, keys),
        check=False,
    )
    assert proc.returncode == 1
    assert f"cannot reach root@127.0.0.1:{port} over SSH" in proc.stderr
    assert "Connection refused" in proc.stderr


# -- (1) into a directory ------------------------------------------------------------------------
def test_flash_into_a_root_fs_directory(tmp_path: Path, bundle: Path, keys: Keys) -> None:
    root = make_rootfs(tmp_path / "sdcard")
    before = snapshot(root)

    dry = flash("dir", root, *device_args(bundle, keys), "--dry-run", "--bench")
    assert "--bench: skipped: commands cannot run on" in dry.stdout  # no --chroot
    assert "account: add user edge-agent" in dry.stdout
    assert "account: add group i2c" in dry.stdout
    assert "write /etc/edge-agent/agent.toml (0600 edge-agent:edge-agent" in dry.stdout
    assert f"write {CREDENTIAL} (0600 edge-agent:edge-agent" in dry.stdout
    assert f"write {MODEL_KEY} (0644 root:root" in dry.stdout
    assert "symlink /etc/systemd/system/multi-user.target.wants/edge-agent.service" in dry.stdout
    # the over-the-air update pieces, listed like the rest
    assert f"write {BOOTCHECK} (0755 root:root" in dry.stdout
    assert f"write {RELEASE_KEY} (0644 root:root" in dry.stdout
    assert "write /etc/systemd/system/edge-agent-rollback.service (0644 root:root" in dry.stdout
    assert "mkdir /etc/systemd/system/edge-agent.service.d (0755 root:root)" in dry.stdout
    assert "write /etc/systemd/system/edge-agent.service.d/ota.conf (0644 root:root" in dry.stdout
    assert (
        "symlink /etc/systemd/system/multi-user.target.wants/edge-agent-update.path" in dry.stdout
    )
    assert "edge-agent-rollback.service ->" not in dry.stdout  # no [Install]: not enabled
    assert "no --release-key" not in dry.stdout
    assert "dtparam=i2c_arm=on" in dry.stdout
    assert "dry run: nothing was changed" in dry.stdout
    secrets = json.loads(keys.credential("pump-01").read_text())
    for secret in (secrets["oscore"]["master_secret"], secrets["psk"]):
        assert secret not in dry.stdout + dry.stderr
    assert snapshot(root) == before

    first = flash("dir", root, *device_args(bundle, keys))
    assert "done:" in first.stdout
    assert "built at first boot by edge-agent-install.service" in first.stdout
    assert_provisioned(root, bundle, keys, device_id="pump-01", venv=False)
    config_txt = (root / "boot/firmware/config.txt").read_text().splitlines()
    assert config_txt.count("dtparam=i2c_arm=on") == 1
    assert "#dtparam=i2c_arm=on" not in config_txt
    # Before the first boot the venv is missing: the units that run without it are checked.
    runnable = runnable_units(root)
    assert {"edge-agent-install.service", "edge-agent-rollback.service"} <= set(runnable)
    assert "edge-agent-update.path" in runnable and "edge-agent.service" not in runnable
    verify(root, *runnable)

    after = snapshot(root)
    second = flash("dir", root, *device_args(bundle, keys))
    assert "nothing to do" in second.stdout
    assert snapshot(root) == after

    # A device that has taken a release over the air (venv -> current -> releases/V, no bundle
    # stamp): flashing again leaves its release alone, and so does the first-boot installer.
    opt = root / "opt/edge-agent"
    release = opt / "releases/1.1/bin"
    release.mkdir(parents=True)
    (release / "edge-agent").write_text("#!/bin/sh\n")
    (opt / "current").symlink_to("releases/1.1")
    (opt / "venv").symlink_to("current")
    ab = snapshot(root)
    again = flash("dir", root, *device_args(bundle, keys))
    assert "nothing to do" in again.stdout
    assert "/opt/edge-agent/venv is a link to an over-the-air release" in again.stdout
    installer = subprocess.run(
        ["sh", str(opt / "install-venv")], capture_output=True, text=True, timeout=60, check=False
    )
    assert installer.returncode == 0, installer.stderr
    assert "is an over-the-air release (A/B): left as it is" in installer.stdout
    assert snapshot(root) == ab and os.readlink(opt / "venv") == "current"
    for link in ("venv", "current"):
        (opt / link).unlink()
    shutil.rmtree(opt / "releases")

    # Another device id: only agent.toml and the credential change.
    third = flash("dir", root, *device_args(bundle, keys, "pump-02"))
    assert "plan (2 changes)" in third.stdout
    assert "update /etc/edge-agent/agent.toml" in third.stdout
    assert f"update {CREDENTIAL}" in third.stdout
    assert Credential.read(root / CREDENTIAL.lstrip("/")).principal == "pump-02"
    assert tomllib.loads((root / "etc/edge-agent/agent.toml").read_text())["agent"] == {
        "device_id": "pump-02",
        "data_dir": "/var/lib/edge-agent",
        "log_level": "info",
    }


def test_flash_dtls_and_plain_coap_only_as_asked(tmp_path: Path, bundle: Path, keys: Keys) -> None:
    from agent.service import config

    root = make_rootfs(tmp_path / "sdcard")
    conf = root / "etc/edge-agent/agent.toml"
    credential = root / CREDENTIAL.lstrip("/")

    # DTLS to a coaps:// endpoint: the same credential file, with the PSK the operator chose.
    psk = tmp_path / "pump-dtls.psk"
    psk.write_bytes(b"the-key-for-pump")
    issued = keys.credential("pump-dtls", "--psk-file", psk)
    assert json.loads(issued.read_text())["psk"] == b"the-key-for-pump".hex()
    coaps = "coaps://127.0.0.1:5684"
    args = ["dir", root, "--bundle", bundle, "--device-id", "pump-dtls"]
    first = flash(*args, "--endpoint", coaps, "--security", "dtls", "--credential", issued)
    assert "no --model-key: the device refuses model downloads" in first.stdout
    assert "no --release-key: the device refuses every agent release" in first.stdout
    assert "--security dtls: the agent needs DTLSSocket" in first.stdout
    parsed = tomllib.loads(conf.read_text())
    assert parsed["uplink"] == {"endpoints": [coaps], "security": "dtls", "credential": CREDENTIAL}
    assert parsed["models"] == {}  # no --model-key: public_key commented out
    # No --release-key: no key and no [update] table (every release refused), but the units and
    # the boot counter are there (harmless without a pending release).
    assert "update" not in parsed
    assert '# public_key = "release.pub"' in conf.read_text()
    assert not (root / RELEASE_KEY.lstrip("/")).exists()
    assert (root / BOOTCHECK.lstrip("/")).read_bytes() == BOOTCHECK_SOURCE.read_bytes()
    assert_units(root)
    assert credential.read_bytes() == issued.read_bytes()
    assert credential.stat().st_mode & 0o7777 == 0o600
    cfg = config.load(conf)
    assert cfg.update is None
    assert cfg.uplink is not None and cfg.uplink.endpoints == (coaps,)
    assert (cfg.uplink.security, cfg.uplink.credential) == ("dtls", Path(CREDENTIAL))

    # The device id is the PSK identity: tinydtls takes 32 bytes at most.
    long_id = "pump-" + "x" * 28
    proc = flash(
        *("dir", root, "--bundle", bundle, "--device-id", long_id, "--endpoint", coaps),
        *("--security", "dtls", "--credential", keys.credential(long_id)),
        check=False,
    )
    assert proc.returncode == 1 and "longer than 32 bytes" in proc.stderr, proc.stderr

    # Plain CoAP only with --security none, and then the config says so, with a comment.
    flash(*args, "--endpoint", ENDPOINT, "--security", "none")
    text = conf.read_text()
    assert tomllib.loads(text)["uplink"] == {"endpoints": [ENDPOINT], "security": "none"}
    lines = text.splitlines()
    at = lines.index('security = "none"')
    start = at
    while lines[start - 1].startswith("#"):
        start -= 1
    comment = " ".join(lines[start:at])
    assert "unauthenticated" in comment and "the agent warns at every start" in comment
    cfg = config.load(conf)
    assert cfg.uplink is not None and cfg.uplink.security == "none"

    # The release key flashed later: the key and the [update] table, nothing else.
    later = flash(
        *args, "--endpoint", ENDPOINT, "--security", "none", "--release-key", keys.release_key
    )
    assert "plan (2 changes)" in later.stdout, later.stdout
    assert f"write {RELEASE_KEY} (0644 root:root" in later.stdout
    cfg = config.load(conf)
    assert cfg.update is not None and cfg.update.public_key == conf.parent / "release.pub"


# -- (2) into a disk image -----------------------------------------------------------------------
SECTOR = 512
BOOT_START, BOOT_SECTORS = 2048, 81920  # 40 MiB FAT32 at 1 MiB
ROOT_START = BOOT_START + BOOT_SECTORS
IMAGE_MIB = 192


def make_pi_image(path: Path, tree: Path, mib: int = IMAGE_MIB) -> int:
    """An MBR image like Raspberry Pi OS: 1 FAT32 'bootfs' with config.txt, 2 ext4 'rootfs'."""
    with open(path, "wb") as f:
        f.truncate(mib << 20)
    layout = (
        f"label: dos\nstart={BOOT_START}, size={BOOT_SECTORS}, type=c\n"
        f"start={ROOT_START}, type=83\n"
    )
    subprocess.run(["sfdisk", "-q", str(path)], input=layout, text=True, check=True)
    fat = ["mkfs.vfat", "-F", "32", "-s", "1", "-n", "BOOTFS", "--offset", str(BOOT_START)]
    subprocess.run([*fat, str(path), str(BOOT_SECTORS // 2)], check=True, capture_output=True)
    config = path.parent / "config.txt"
    config.write_text(CONFIG_TXT)
    subprocess.run(
        ["mcopy", "-i", f"{path}@@{BOOT_START * SECTOR}", str(config), "::config.txt"],
        env={**os.environ, "MTOOLS_SKIP_CHECK": "1"},
        check=True,
        capture_output=True,
    )
    root_kib = (mib << 10) - ROOT_START * SECTOR // 1024
    ext4 = [
        "mkfs.ext4",
        "-q",
        "-L",
        "rootfs",
        "-d",
        str(tree),
        "-E",
        f"offset={ROOT_START * SECTOR}",
    ]
    subprocess.run([*ext4, str(path), f"{root_kib}k"], check=True, capture_output=True)
    return ROOT_START * SECTOR


@pytest.mark.slow
@needs_root
def test_flash_into_a_pi_os_image(tmp_path: Path, bundle: Path, keys: Keys) -> None:
    need("sfdisk", "mkfs.vfat", "mkfs.ext4", "mcopy", "mtype", "debugfs", "e2fsck")
    tree = make_rootfs(tmp_path / "tree", boot=False)
    (tree / "boot/firmware").mkdir(parents=True)  # the mount point of partition 1
    image = tmp_path / "pi.img"
    offset = make_pi_image(image, tree)
    device = f"{image}?offset={offset}"

    first = flash("image", image, *device_args(bundle, keys, "pump-img"))
    assert "done:" in first.stdout and "pi.img partition 1: /config.txt" in first.stdout
    fsck = subprocess.run(["e2fsck", "-fn", device], capture_output=True, text=True, check=False)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr

    dump = tmp_path / "dump"  # the ext4 as a directory, owners and modes kept (as root)
    dump.mkdir()
    subprocess.run(["debugfs", "-R", f"rdump / {dump}", device], capture_output=True, check=True)
    assert_provisioned(dump, bundle, keys, device_id="pump-img", venv=False)
    verify(dump, *runnable_units(dump))
    config_txt = subprocess.run(
        ["mtype", "-i", f"{image}@@{BOOT_START * SECTOR}", "::config.txt"],
        env={**os.environ, "MTOOLS_SKIP_CHECK": "1"},
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    assert config_txt.count("dtparam=i2c_arm=on") == 1

    digest = hashlib.sha256(image.read_bytes()).hexdigest()
    second = flash("image", image, *device_args(bundle, keys, "pump-img"), "--bench")
    assert "nothing to do" in second.stdout
    # an image cannot run the agent: --bench says so and what to run after the first boot
    assert "--bench: skipped: commands cannot run on" in second.stdout
    assert "edge-agent bench --quick" in second.stdout
    assert hashlib.sha256(image.read_bytes()).hexdigest() == digest


def test_flash_refuses_an_image_too_small_for_the_bundle(
    tmp_path: Path, bundle: Path, keys: Keys
) -> None:
    need("sfdisk", "mkfs.vfat", "mkfs.ext4", "mcopy", "debugfs")
    image = tmp_path / "small.img"
    offset = make_pi_image(image, make_rootfs(tmp_path / "tree", boot=False), mib=72)
    before = hashlib.sha256(image.read_bytes()).hexdigest()
    proc = flash("image", image, *device_args(bundle, keys), check=False)
    assert proc.returncode == 1, proc.stdout
    assert "MB free on the root filesystem" in proc.stderr and "MB needed" in proc.stderr
    assert hashlib.sha256(image.read_bytes()).hexdigest() == before  # refused before writing
    listing = subprocess.run(
        ["debugfs", "-R", "ls -p /", f"{image}?offset={offset}"], capture_output=True, text=True
    )
    assert "/opt/" not in listing.stdout


# -- (3) over SSH --------------------------------------------------------------------------------
@pytest.fixture
def sshd(tmp_path: Path) -> Iterator[dict[str, object]]:
    """An sshd on a free loopback port accepting one throwaway key for root."""
    need("sshd", "ssh", "ssh-keygen")
    if not IS_ROOT:
        pytest.skip("needs root: sshd and a login as root")
    keys = tmp_path / "ssh"
    keys.mkdir()
    for name in ("host_key", "user_key"):
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(keys / name)], check=True
        )
    shutil.copy(keys / "user_key.pub", keys / "authorized_keys")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    (keys / "sshd_config").write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {keys / 'host_key'}\n"
        f"AuthorizedKeysFile {keys / 'authorized_keys'}\nPidFile {keys / 'sshd.pid'}\n"
        "PermitRootLogin prohibit-password\nPasswordAuthentication no\n"
        "KbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\nLogLevel ERROR\n"
    )
    host_pub = (keys / "host_key.pub").read_text().split()
    (keys / "known_hosts").write_text(f"[127.0.0.1]:{port} {host_pub[0]} {host_pub[1]}\n")
    Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege separation directory
    sshd_bin = shutil.which("sshd") or "/usr/sbin/sshd"
    proc = subprocess.Popen(
        [sshd_bin, "-D", "-e", "-f", str(keys / "sshd_config")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    err = proc.stderr.read().decode() if proc.stderr else ""
                    pytest.fail(f"sshd did not start: {err}")
                time.sleep(0.05)
        yield {"port": port, "key": keys / "user_key", "known_hosts": keys / "known_hosts"}
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.mark.slow
@needs_root
def test_flash_over_ssh(tmp_path: Path, bundle: Path, keys: Keys, sshd: dict[str, object]) -> None:
    device = make_rootfs(tmp_path / "device")
    ssh_args = [
        "ssh",
        f"root@127.0.0.1:{sshd['port']}",
        "-i",
        sshd["key"],
        "--known-hosts",
        sshd["known_hosts"],
        "--host-key-check",
        "yes",
        "--prefix",
        device,
    ]
    first = flash(*ssh_args, *device_args(bundle, keys, "pump-ssh"), "--bench")  # type: ignore[arg-type]
    assert "build /opt/edge-agent/venv on the device" in first.stdout
    assert "done:" in first.stdout
    assert_provisioned(device, bundle, keys, device_id="pump-ssh", venv=True)
    # --bench: the installed agent measured the device once, into its data directory, and the
    # results belong to the agent's user (the bench ran as root over SSH)
    assert f"bench: {device}/opt/edge-agent/venv/bin/edge-agent bench --quick" in first.stdout
    quick = device / "var/lib/edge-agent/bench/quick.json"
    assert f"saved to {quick}" in first.stdout
    doc = json.loads(quick.read_text())
    assert doc["summary"]["detect"]["alerts"] > 0 and doc["fs_type"]
    uid = int(passwd_entry(device, "edge-agent")[2])
    assert quick.stat().st_uid == uid and quick.parent.stat().st_uid == uid
    assert (device / "opt/edge-agent/venv/.bundle-id").read_text().strip() in first.stdout
    config_txt = (device / "boot/firmware/config.txt").read_text().splitlines()
    assert config_txt.count("dtparam=i2c_arm=on") == 1
    assert runnable_units(device) == [unit.name for unit in project_units()]  # the venv is built
    verify(device, *runnable_units(device))
    # The agent installed on the device reads the config flashed beside it.
    check = subprocess.run(
        [
            str(device / "opt/edge-agent/venv/bin/edge-agent"),
            "check-config",
            str(device / "etc/edge-agent/agent.toml"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert check.returncode == 0, check.stdout + check.stderr

    after = snapshot(device)
    second = flash(*ssh_args, *device_args(bundle, keys, "pump-ssh"))  # type: ignore[arg-type]
    assert "nothing to do" in second.stdout
    assert snapshot(device) == after


# -- the flashed agent runs ----------------------------------------------------------------------
def in_namespace(root: Path, *argv: str | Path, timeout: int = 240) -> subprocess.CompletedProcess:
    """Run argv in a private mount namespace where ``root`` has this host's /usr and /dev.

    That makes ``root`` a working chroot built from the host's own Python; the bind mounts
    vanish with the namespace.
    """
    script = (
        'mount --bind -o ro /usr "$0/usr" && mount --rbind /dev "$0/dev" && mount -t proc proc '
        '"$0/proc" && exec "$@"'
    )
    return subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, str(root)]
        + [str(a) for a in argv],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@pytest.mark.slow
@needs_root
def test_flash_chroot_agent_passes_selftest(tmp_path: Path, bundle: Path, keys: Keys) -> None:
    need("unshare", "chroot")
    if not Path(f"/usr/bin/python{PY}").exists():
        pytest.skip(f"no /usr/bin/python{PY} on this host to build the chroot from")
    root = tmp_path / "rootfs"
    root.mkdir()
    for d in ("usr", "dev", "proc"):
        (root / d).mkdir()
    for link in ("bin", "sbin", "lib", "lib64"):
        if Path("/" + link).is_symlink():  # merged /usr, as on Debian 12 and Pi OS
            (root / link).symlink_to(f"usr/{link}")
    make_rootfs(root, python=False)
    probe = in_namespace(root, "true")
    if probe.returncode != 0:
        pytest.skip(f"cannot bind-mount in a new mount namespace here: {probe.stderr.strip()}")

    first = in_namespace(
        root, FLASH, "dir", root, "--chroot", *device_args(bundle, keys, "pump-rig")
    )
    assert first.returncode == 0, first.stdout + first.stderr
    assert "build /opt/edge-agent/venv on the device" in first.stdout
    assert_provisioned(root, bundle, keys, device_id="pump-rig", venv=True)
    every_unit = [unit.name for unit in project_units()]
    proc = in_namespace(root, "systemd-analyze", "verify", f"--root={root}", *every_unit)
    assert proc.returncode == 0 and not proc.stderr.strip(), proc.stderr

    # The installed agent, as the service user, on the simulated rig with the flashed config.
    user = passwd_entry(root, "edge-agent")
    groups = ",".join(str(group_members(root, g)[0]) for g in ("i2c", "dialout"))
    selftest = in_namespace(
        root,
        "chroot",
        f"--userspec={user[2]}:{user[3]}",
        f"--groups={groups}",
        root,
        "/opt/edge-agent/venv/bin/edge-agent",
        "selftest",
        "--config",
        "/etc/edge-agent/agent.toml",
        "--simulate",
        "pump",
        "--data-dir",
        "/tmp/edge-agent",
    )
    assert selftest.returncode == 0, selftest.stdout + selftest.stderr
    rows = [line for line in selftest.stdout.splitlines() if line.rstrip().endswith(" ok")]
    names = {s["name"] for s in tomllib.loads(RIG.read_text())["sensor"]}
    assert {row.split()[0] for row in rows} == names

    after = snapshot(root)
    second = in_namespace(
        root, FLASH, "dir", root, "--chroot", *device_args(bundle, keys, "pump-rig")
    )
    assert second.returncode == 0 and "nothing to do" in second.stdout, second.stderr
    assert snapshot(root) == after
