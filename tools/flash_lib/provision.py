"""What tools/flash puts on a device, and the run that puts it there (or prints the plan).

On every target: the service account (edge-agent, in groups i2c and dialout), the wheel bundle and
its installer in /opt/edge-agent, /etc/edge-agent/agent.toml (0600 edge-agent) from the template,
the device's credential in /var/lib/edge-agent/credential.json (0600 edge-agent), the model
public key in /etc/edge-agent/models.pub, every ``edge-agent*`` unit of systemd/ and its drop-ins
in /etc/systemd/system with their enable symlinks (flash_lib.units), the over-the-air update
pieces (flash_lib.ota: /opt/edge-agent/ota-bootcheck.py, and with ``--release-key`` the release
public key in /etc/edge-agent/release.pub and agent.toml's ``[update]`` table), i2c-dev loaded at
boot with its nodes in group i2c, and ``dtparam=i2c_arm=on`` in a Pi's config.txt. The venv is
built now where the target's python can run (SSH, ``dir --chroot``, ``dir /``), else at first
boot; on a live system the service is restarted and the enabled ``.path``/``.timer`` units
started.

With ``--role gateway`` (flash_lib.roles, flash_lib.gateway) the machine gets the gateway
instead: its own account, config, credential, its devices' credentials and
edge-agent-gateway.service, beside the same bundle and venv; nothing of the device role is
written (and nothing of it removed: a machine may be both).
"""

from __future__ import annotations

import errno
import json
import os
import posixpath
import re
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from flash_lib import accounts, bootcfg, gateway, ota, units
from flash_lib import bundle as bundlemod
from flash_lib.errors import FlashError
from flash_lib.keys import read_public_key
from flash_lib.plan import Absent, Change, Dir, Entry, File, Names, apply, reconcile
from flash_lib.progress import Progress
from flash_lib.roles import DEVICE, ROLES, Role
from flash_lib.targets import BootConfig, PythonFacts, Target

PROJECT_ROOT = Path(__file__).resolve().parents[2]
SYSTEMD_DIR = PROJECT_ROOT / "systemd"
RIG = PROJECT_ROOT / "agent" / "examples" / "pump-rig.toml"

USER = DEVICE.user
HOME = DEVICE.home  # also the agent's data_dir (the unit's StateDirectory=)
OPT = "/opt/edge-agent"
BUNDLE = f"{OPT}/bundle"
VENV = f"{OPT}/venv"
INSTALLER = f"{OPT}/install-venv"
VENV_STAMP = f"{VENV}/.bundle-id"
CONF_DIR = "/etc/edge-agent"
CONF = DEVICE.conf
MODEL_KEY = f"{CONF_DIR}/models.pub"
UNIT_DIR = "/etc/systemd/system"
INSTALL_SERVICE = "edge-agent-install.service"
MODULES_CONF = "/etc/modules-load.d/edge-agent.conf"
UDEV_RULES = "/etc/udev/rules.d/60-edge-agent-i2c.rules"
ACCOUNT_FILES = ("/etc/passwd", "/etc/group", "/etc/shadow", "/etc/gshadow")

DEVICE_ID = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]{0,62}\Z")  # as agent/sense/settings.py
SECURITY = ("oscore", "dtls", "none")  # [uplink] security (agent/sync/security.py)
# What the agent's uplink speaks with each (agent/sync/uplink.py).
ENDPOINT_SCHEMES = {
    "oscore": ("coap", "coap+tcp"),
    "dtls": ("coaps",),
    "none": ("coap", "coap+tcp"),
}
CREDENTIAL_MAX_BYTES = 4096  # as agent/wire/credentials.py
CREDENTIAL_FORMAT = 1
PSK_IDENTITY_BYTES = 32  # the longest DTLS PSK identity (the device id) tinydtls takes
UDEV_TEXT = (
    "# Written by tools/flash: I2C bus nodes (/dev/i2c-*) for members of group i2c, so that\n"
    "# edge-agent.service (SupplementaryGroups=i2c) can open them without root.\n"
    'SUBSYSTEM=="i2c-dev", GROUP="i2c", MODE="0660"\n'
)
MODULES_TEXT = "# Written by tools/flash: /dev/i2c-* for edge-agent.\ni2c-dev\n"


@dataclass(frozen=True)
class Settings:
    device_id: str
    endpoint: str
    security: str = "oscore"
    credential: Path | None = None  # the device's file from `edge-agent-cloud devices add`
    model_key: Path | None = None  # the KEYFILE.pub of `edge-agent-cloud models keygen`
    release_key: Path | None = None  # the KEYFILE.pub of `edge-agent-cloud releases keygen`
    template: Path | None = None  # default: the role's in systemd/ (agent.toml.in)
    sensors: Path | None = None  # the [[sensor]] tables come from this config (default: RIG)
    role: str = "device"  # or "gateway" (flash_lib.roles)
    devices: Path | None = None  # --role gateway: its devices' credential files
    bundle_dir: Path | None = None
    arch: str | None = None
    python: str | None = None
    glibc: str | None = None
    pip_python: str | None = None
    dry_run: bool = False
    start: bool = True
    bench: bool = False  # run `edge-agent bench --quick` on the device after the install


def role_of(s: Settings) -> Role:
    return ROLES[s.role]


def check_settings(s: Settings) -> None:
    """Refuse bad settings (one line each) before the target is touched."""
    if s.role not in ROLES:
        raise FlashError(f"--role {s.role!r}: one of {', '.join(ROLES)}")
    if s.role == "gateway":
        gateway.check_options(lambda attr: getattr(s, attr))
    elif s.devices is not None:
        raise FlashError("--devices: only with --role gateway (a gateway's devices)")
    if not DEVICE_ID.match(s.device_id):
        raise FlashError(
            f"--device-id {s.device_id!r}: 1-63 letters, digits, '_', '-', '.', "
            "starting with a letter"
        )
    if s.security not in SECURITY:
        raise FlashError(f"--security {s.security!r}: one of {', '.join(SECURITY)}")
    parts = urlsplit(s.endpoint)
    try:
        port = parts.port
    except ValueError:
        port = -1
    if (  # as the agent's [uplink] endpoints takes it (agent/sync/uplink.py): no '/' after it
        parts.scheme not in ENDPOINT_SCHEMES[s.security]
        or not parts.hostname
        or port in (-1, 0)
        or parts.path
        or any(c.isspace() or ord(c) < 32 for c in s.endpoint)
    ):
        want = (
            "coaps://HOST:PORT (with --security dtls)"
            if s.security == "dtls"
            else "coap://HOST:PORT (or coap+tcp://HOST:PORT; coaps:// with --security dtls)"
        )
        raise FlashError(f"--endpoint {s.endpoint!r}: expected {want}")
    if s.security == "dtls" and len(s.device_id.encode()) > PSK_IDENTITY_BYTES:
        raise FlashError(
            f"--device-id {s.device_id!r}: longer than {PSK_IDENTITY_BYTES} bytes, the longest "
            "DTLS PSK identity tinydtls takes: use --security oscore"
        )
    what = role_of(s).principal
    if s.credential is None and s.security != "none":
        raise FlashError(
            f"--security {s.security} needs the {what}'s credential: register the {what} with "
            f"`edge-agent-cloud {what}s add --data DIR {s.device_id} --credential-out "
            f"{s.device_id}.json` and pass --credential {s.device_id}.json"
        )
    read_credential(s)
    if s.devices is not None:
        gateway.device_credentials(s.devices, _device_credential)
    ota.read_release_key(s.release_key, read_model_key(s))


def read_credential(s: Settings) -> bytes | None:
    """The credential file's bytes, checked: a credential of the role's principal (a device's,
    or with --role gateway a gateway's) named ``s.device_id`` with the secrets ``s.security``
    needs (agent/wire/credentials.py has the format)."""
    if s.credential is None:
        return None
    what = role_of(s).principal
    data, principal, psk = _credential_file(s.credential, f"--credential {s.credential}", what)
    if principal != s.device_id:
        raise FlashError(
            f"--credential {s.credential}: the credential of {principal!r}, not of --device-id "
            f"{s.device_id!r}: `edge-agent-cloud {what}s add --data DIR {s.device_id}` makes "
            f"the {what}'s own"
        )
    if s.security == "dtls" and not psk:
        raise FlashError(
            f"--credential {s.credential}: no DTLS PSK in it: `edge-agent-cloud {what}s rekey "
            f"--data DIR {s.device_id} --psk-file FILE` makes one with a PSK"
        )
    return data


def _device_credential(path: Path, role: str) -> tuple[bytes, str]:
    data, principal, _ = _credential_file(path, f"--devices: {path}", role, follow=False)
    return data, principal


def _credential_file(
    path: Path, where: str, want: str, follow: bool = True
) -> tuple[bytes, str, bytes]:
    """A credential file's bytes, principal and DTLS PSK, checked to be one of role ``want``.
    With ``follow`` False (a file found in a folder, not named by the operator) only a regular
    file that is not a link, opened without blocking (a FIFO is refused, not waited on)."""
    flags = os.O_RDONLY | os.O_CLOEXEC | (0 if follow else os.O_NOFOLLOW | os.O_NONBLOCK)
    try:
        fd = os.open(path, flags)
    except OSError as err:
        what = "not a regular file (a link)" if err.errno == errno.ELOOP else err.strerror
        raise FlashError(f"{where}: {what}") from None
    if not follow and not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise FlashError(f"{where}: not a regular file: give the credential file itself")
    try:
        with os.fdopen(fd, "rb") as f:
            data = f.read(CREDENTIAL_MAX_BYTES + 1)
    except OSError as err:
        raise FlashError(f"{where}: {err.strerror}") from None
    try:
        doc = json.loads(data) if len(data) <= CREDENTIAL_MAX_BYTES else None
        osc = doc["oscore"]
        if doc["format"] != CREDENTIAL_FORMAT or not all(
            bytes.fromhex(osc[k]) for k in ("master_secret", "sender_id")
        ):
            raise ValueError
        principal, role = str(doc["principal"]), str(doc.get("role", "device"))
        psk = bytes.fromhex(doc.get("psk", ""))
    except (ValueError, KeyError, TypeError):
        raise FlashError(
            f"{where}: not a credential file (the JSON file `edge-agent-cloud devices add "
            "--credential-out FILE` writes)"
        ) from None
    if role != want:
        raise FlashError(f"{where}: the credential of {role} {principal!r}, not of a {want}")
    if not DEVICE_ID.match(principal):  # it names a file flash writes (flash_lib.gateway)
        raise FlashError(f"{where}: {principal!r} is not a {want} name (agent/wire/credentials.py)")
    return data, principal, psk


def read_model_key(s: Settings) -> bytes | None:
    """The model public key's bytes, checked to be an Ed25519 public key in a form the agent
    reads (flash_lib.keys)."""
    if s.model_key is None:
        return None
    return read_public_key(s.model_key, "--model-key", "edge-agent-cloud models keygen")


def toml_string(value: str) -> str:
    """``value`` escaped for the inside of a TOML basic string."""
    return json.dumps(value, ensure_ascii=False)[1:-1]


_SENSOR_TABLE = re.compile(r"^\s*\[\[\s*sensor\s*\]\]")
_ANY_TABLE = re.compile(r"^\s*\[\[?\s*([A-Za-z0-9_.-]+)\s*\]\]?")


def sensor_section(text: str, source: str = "config") -> str:
    """The ``[[sensor]]`` tables of a config file as text, with the comments just above them."""
    lines = text.splitlines()
    first = next((i for i, line in enumerate(lines) if _SENSOR_TABLE.match(line)), None)
    if first is None:
        raise FlashError(f"{source}: no [[sensor]] table to copy")
    start = first
    while start > 0 and lines[start - 1].lstrip().startswith("#"):
        start -= 1
    end = len(lines)
    for i in range(first + 1, len(lines)):
        m = _ANY_TABLE.match(lines[i])
        if m and m.group(1) != "sensor" and not m.group(1).startswith("sensor."):
            end = i
            while end > first and lines[end - 1].lstrip().startswith("#"):
                end -= 1
            break
    return "\n".join(lines[start:end]).rstrip() + "\n"


def security_lines(s: Settings) -> str:
    """The ``[uplink]`` lines for ``s.security`` (what replaces @SECURITY@)."""
    if s.security == "none":
        lines = [
            "# Plain CoAP (tools/flash --security none): requests go unauthenticated and",
            "# unencrypted, and the agent warns at every start. Flash with --credential FILE",
            "# (--security oscore, the default) to protect them.",
            'security = "none"',
        ]
    else:
        lines = [f'security = "{s.security}"']
    if s.credential is not None:
        lines.append(f'credential = "{toml_string(role_of(s).credential)}"')
    return "\n".join(lines) + "\n"


def public_key_line(s: Settings) -> str:
    """The ``[models]`` line for the model key (what replaces @PUBLIC_KEY@)."""
    name = toml_string(posixpath.basename(MODEL_KEY))
    if s.model_key is None:
        return f'# public_key = "{name}"   # not flashed: tools/flash --model-key KEYFILE.pub\n'
    return f'public_key = "{name}"     # {MODEL_KEY}\n'


def render_config(template: str, s: Settings, sensors: str = "") -> str:
    """agent.toml from the template; ``sensors`` is the text that replaces @SENSORS@."""
    values = {
        "@DEVICE_ID@": s.device_id,
        "@ENDPOINT@": s.endpoint,
    }
    blocks = {
        "@SENSORS@": sensors,
        "@SECURITY@": security_lines(s),
        "@PUBLIC_KEY@": public_key_line(s),
        "@UPDATE@": ota.update_table(s.release_key is not None),
    }
    if s.release_key is not None and "@UPDATE@" not in template:
        raise FlashError(
            "config template: no @UPDATE@, where --release-key puts the [update] table: add it "
            "(systemd/agent.toml.in has it)"
        )
    text = template
    for token, value in values.items():
        text = text.replace(token, toml_string(value))
    for token, block in blocks.items():
        text = text.replace(token + "\n", block).replace(token, block)
    left = sorted(set(re.findall(r"@[A-Z_]+@", text)))
    if left:
        raise FlashError(f"config template: unknown placeholders {', '.join(left)}")
    return text


def installer_script(b: bundlemod.Bundle) -> str:
    return f"""#!/bin/sh
# Builds {VENV} from the offline wheel bundle beside this script: run by
# {INSTALL_SERVICE} at first boot, or by tools/flash where the device's python can run.
# Written by tools/flash for bundle {b.id}; it is replaced with the next bundle.
set -eu
here=$(cd "$(dirname "$0")" && pwd -P)
bundle="$here/bundle"
venv="$here/venv"
want="{b.id}"
have=$(cat "$venv/.bundle-id" 2>/dev/null || true)
if [ -L "$venv" ]; then
  echo "edge-agent-install: $venv is an over-the-air release (A/B): left as it is"
  exit 0
fi
if [ -x "$venv/bin/edge-agent" ] && [ "$have" = "$want" ]; then
  echo "edge-agent-install: $venv is up to date"
  exit 0
fi
py=/usr/bin/python3
[ -x "$py" ] || py=$(command -v python3 || true)
if [ -z "$py" ]; then
  echo "edge-agent-install: no python3 on this device: install python3" >&2
  exit 1
fi
echo "edge-agent-install: building $venv from $bundle with $py"
rm -rf "$venv"
"$py" -m venv --without-pip "$venv"
PIP_CONFIG_FILE=/dev/null "$venv/bin/python" "$bundle/{b.pip}/pip" install --isolated \\
  --no-index --find-links "$bundle" --no-cache-dir --disable-pip-version-check \\
  --no-warn-script-location --quiet "$bundle/{b.project}"
echo "$want" >"$venv/.bundle-id"
echo "edge-agent-install: done"
"""


# ---------------------------------------------------------------------------------------------
@dataclass
class Plan:
    changes: list[Change]
    account_changes: list[str]
    boot: tuple[BootConfig, bytes, str] | None  # (where, new content, description)
    build_venv: bool
    notes: list[str]

    @property
    def empty(self) -> bool:
        return not self.changes and self.boot is None and not self.build_venv


def _facts(target: Target, s: Settings, say: Callable[[str], None]) -> tuple[str, str]:
    facts: PythonFacts | None = target.python()
    if facts is not None:
        for given, found, what in ((s.arch, facts.arch, "--arch"), (s.python, facts.version, "")):
            if given and given != found:
                raise FlashError(
                    f"{what or '--python-version'} {given}, but the target runs {found} "
                    f"({facts.where})"
                )
        say(f"target: {target.label} ({facts.arch}, Python {facts.version}: {facts.where})")
        return facts.arch, facts.version
    arch = s.arch or bundlemod.host_arch()
    python = s.python or bundlemod.host_python()
    say(
        f"target: {target.label}: no /usr/bin/python3 found; building for {arch}, Python "
        f"{python} (the device needs python3 before its first boot)"
    )
    return arch, python


def _bundle(s: Settings, arch: str, python: str, say: Callable[[str], None]) -> bundlemod.Bundle:
    if s.bundle_dir is not None:
        b = bundlemod.load(s.bundle_dir)
    else:
        cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
        b = bundlemod.build(
            cache / "edge-agent" / f"bundle-{arch}-py{python}",
            PROJECT_ROOT,
            arch=arch,
            python=python,
            glibc=s.glibc,
            pip_python=s.pip_python,
        )
    if (b.arch, b.python) != (arch, python):
        raise FlashError(
            f"bundle {b.dir} is for {b.arch}, Python {b.python}, but the target runs {arch}, "
            f"Python {python}: tools/flash bundle DIR --arch {arch} --python-version {python}"
        )
    size = b.total_bytes / 1e6
    say(f"bundle: {b.dir} ({b.project}, {len(b.files)} wheels, {size:.1f} MB, id {b.id})")
    return b


def _read_optional(target: Target, path: str) -> str | None:
    st = target.fs.stat(path)
    if st is None or st["kind"] != "file":
        return None
    return target.fs.read(path).decode("utf-8")


def _names(group_text: str, uid: int, gid: int, user: str) -> Names:
    groups = {0: "root", gid: user}
    for line in group_text.splitlines():
        fields = line.split(":")
        if len(fields) >= 3 and fields[2].isdigit():
            groups.setdefault(int(fields[2]), fields[0])
    return Names(users={0: "root", uid: user}, groups=groups)


def _config(s: Settings, role: Role) -> bytes:
    """The role's config file from its template (the device's with the [[sensor]] tables)."""
    path = s.template or SYSTEMD_DIR / role.template
    try:
        template = path.read_text()
    except OSError as err:
        raise FlashError(f"{path}: cannot read the config template: {err.strerror}") from None
    if not role.hardware:
        return render_config(template, s).encode()
    sensors = s.sensors or RIG
    try:
        rig = sensors.read_text()
    except OSError as err:
        raise FlashError(f"{sensors}: cannot read the sensors: {err.strerror}") from None
    return render_config(template, s, sensor_section(rig, str(sensors))).encode()


def make_plan(target: Target, s: Settings, say: Callable[[str], None]) -> Plan:
    fs = target.fs
    role = role_of(s)
    arch, python = _facts(target, s, say)
    b = _bundle(s, arch, python, say)
    notes: list[str] = []

    # The account.
    texts = {p: _read_optional(target, p) for p in (*ACCOUNT_FILES, "/etc/login.defs")}
    shell = next(
        (sh for sh in accounts.NOLOGIN_SHELLS if fs.stat(sh) is not None),
        accounts.NOLOGIN_SHELLS[0],
    )
    acct = accounts.plan_accounts(
        texts,
        user=role.user,
        home=role.home,
        groups=role.groups,
        shell=shell,
        today=int(time.time() // 86400),
    )
    uid, gid = acct.uid, acct.gid
    names = _names(acct.files.get("/etc/group", texts["/etc/group"] or ""), uid, gid, role.user)
    entries: list[Entry] = []
    for path, text in acct.files.items():
        st = fs.stat(path) or {"mode": 0o640 if "shadow" in path else 0o644, "uid": 0, "gid": 0}
        entries.append(
            File(path, text.encode(), mode=st["mode"], uid=st["uid"], gid=st["gid"], note="account")
        )

    # The bundle and its installer.
    entries += [Dir("/opt", enforce=False), Dir(OPT), Dir(BUNDLE)]
    wanted = set(b.files) | {bundlemod.BUNDLE_JSON}
    if fs.stat(BUNDLE) is not None:
        for name in fs.listdir(BUNDLE):
            if name not in wanted:
                entries.append(Absent(f"{BUNDLE}/{name}", "not in the new bundle"))
    for name, digest in sorted(b.files.items()):
        entries.append(File(f"{BUNDLE}/{name}", source=b.dir / name, digest=digest))
    entries.append(File(f"{BUNDLE}/{bundlemod.BUNDLE_JSON}", (b.dir / "bundle.json").read_bytes()))
    entries.append(File(INSTALLER, installer_script(b).encode(), mode=0o755))

    # The configuration: only the service user reads it.
    entries += [
        Dir(CONF_DIR),
        File(role.conf, _config(s, role), mode=0o600, uid=uid, gid=gid),
    ]
    if role.hardware:  # the device checks models and releases
        model_key = read_model_key(s)
        if model_key is not None:
            entries.append(File(MODEL_KEY, model_key, note="model public key"))
        else:
            notes.append(
                "no --model-key: the device refuses model downloads until [models] public_key "
                "names the KEYFILE.pub of `edge-agent-cloud models keygen`"
            )
        release_key = ota.read_release_key(s.release_key, model_key)
        entries += ota.entries(PROJECT_ROOT, release_key)
        if release_key is None:
            notes.append(ota.NO_KEY_NOTE)

    # The device's credential, in the data directory the unit's StateDirectory= makes (made
    # here the way systemd makes it, so that the file is there before the first start).
    if s.security == "dtls":
        notes.append(
            "--security dtls: the agent needs DTLSSocket (aiocoap's tinydtls), which the offline "
            "bundle does not carry (it has no wheels, it builds from source): install it into "
            f"{VENV} on the device"
        )
    credential = read_credential(s)
    devices = (
        gateway.device_credentials(s.devices, _device_credential) if s.devices is not None else {}
    )
    if credential is not None or devices:
        entries += [
            Dir("/var", enforce=False),
            Dir("/var/lib", enforce=False),
            Dir(role.home, mode=role.home_mode, uid=uid, gid=gid),
        ]
    if credential is not None:
        note = f"{role.principal} credential"
        entries.append(File(role.credential, credential, mode=0o600, uid=uid, gid=gid, note=note))
    if devices:
        entries += gateway.device_entries(devices, uid, gid)
    elif not role.hardware:
        notes.append(gateway.NO_DEVICES_NOTE)

    # The role's units and their drop-ins, enabled the way `systemctl enable` does it.
    entries += [Dir("/etc/systemd", enforce=False), Dir(UNIT_DIR, enforce=False)]
    entries += units.entries(SYSTEMD_DIR, UNIT_DIR, role.installs)

    # /dev/i2c-*: the kernel module at boot, the nodes in group i2c.
    if role.hardware:
        entries += [
            Dir("/etc/modules-load.d", enforce=False),
            File(MODULES_CONF, MODULES_TEXT.encode()),
            Dir("/etc/udev", enforce=False),
            Dir("/etc/udev/rules.d", enforce=False),
            File(UDEV_RULES, UDEV_TEXT.encode()),
        ]

    # The venv: current, built now, or rebuilt at first boot. A link is the A/B layout of a
    # device that has taken a release over the air (docs/ota.md): the release it runs is left
    # alone, and the agent is changed by assigning another release, not by flashing.
    ota_managed = (fs.stat(VENV) or {}).get("kind") == "link"
    if ota_managed:
        notes.append(
            f"{VENV} is a link to an over-the-air release: left as it is (change the agent "
            "with `edge-agent-cloud releases assign`, docs/ota.md)"
        )
    venv_current = ota_managed or (
        fs.stat(f"{VENV}/bin/edge-agent") is not None
        and fs.stat(VENV_STAMP) is not None
        and fs.read(VENV_STAMP).decode().strip() == b.id
    )
    build_venv = False
    if not venv_current:
        if target.venv_now():
            build_venv = True
        elif fs.stat(f"{VENV}/bin/edge-agent") is not None:
            entries.append(
                Absent(f"{VENV}/bin/edge-agent", f"{INSTALL_SERVICE} rebuilds the venv at boot")
            )
        else:
            notes.append(f"the venv is built at first boot by {INSTALL_SERVICE} (no internet)")

    changes = reconcile(fs, entries, names)

    # config.txt on a Pi (a device's: a gateway needs no I2C).
    boot_change = None
    boot = target.boot_config() if role.hardware else None
    if boot is None:
        if role.hardware:
            notes.append("no config.txt found (not a Pi, or pass --boot DIR): I2C left as it is")
    else:
        old = boot.read()
        if old is None:
            raise FlashError(f"{boot.where}: missing")
        new, what = bootcfg.enable_i2c(old.decode("utf-8"))
        if what is not None:
            boot_change = (boot, new.encode("utf-8"), f"{boot.where}: {what}")
    return Plan(changes, acct.changes, boot_change, build_venv, notes)


def print_plan(plan: Plan, say: Callable[[str], None]) -> None:
    n = len(plan.changes) + (plan.boot is not None) + plan.build_venv
    say(f"plan ({n} change{'s' if n != 1 else ''}):")
    for line in plan.account_changes:
        say(f"  account: {line}")
    for c in plan.changes:
        say(f"  {c.text}")
    if plan.boot is not None:
        say(f"  config.txt: {plan.boot[2]}")
    if plan.build_venv:
        say(f"  build {VENV} on the device from {BUNDLE} (pip, offline)")


def bench_command(target: Target) -> list[str]:
    """``edge-agent bench --quick`` of the installed agent with the flashed config, as the target
    names its paths; the results go to the agent's data directory (HOME/bench/quick.json), where
    `edge-agent plan` on the device reads them first."""
    return [
        target.on_target(f"{VENV}/bin/edge-agent"),
        "bench",
        "--quick",
        "--config",
        target.on_target(CONF),
        "--data-dir",
        target.on_target(HOME),
    ]


def run_bench(target: Target, s: Settings, say: Callable[[str], None]) -> None:
    """``--bench``: run the quick bench once where the target can run commands; say why not
    where it cannot (a disk image, a foreign root directory)."""
    if not target.can_run():
        say(
            f"note: --bench: skipped: commands cannot run on {target.label} (an image, or a "
            "root directory without --chroot); after the first boot run on the device: "
            f"sudo -u {USER} {VENV}/bin/edge-agent bench --quick"
        )
        return
    argv = bench_command(target)
    if s.dry_run:
        say(f"--bench: would run {' '.join(argv)}")
        return
    say(f"bench: {' '.join(argv)} (seconds) ...")
    result = target.run(argv)
    for line in result["output"].rstrip().splitlines():
        say(f"  {line}")
    if result["rc"] != 0:
        raise FlashError(
            f"installed, but `edge-agent bench --quick` failed on {target.label} "
            f"(exit {result['rc']}): see its output above"
        )


def _run_checked(target: Target, argv: list[str], what: str) -> None:
    result = target.run(argv)
    if result["rc"] != 0:
        tail = result["output"].strip().splitlines()[-15:]
        shown = "\n  ".join(tail)
        raise FlashError(f"{what} failed (exit {result['rc']}):\n  {shown}")


def _stop_venv_users(target: Target, service: str) -> list[str]:
    """Stop ``service`` and every other role's service that runs (from the shared venv, about
    to be rebuilt); the others that ran, to be started again once it is."""
    others = [
        r.service
        for r in ROLES.values()
        if r.service != service
        and target.run(["systemctl", "is-active", "--quiet", r.service])["rc"] == 0
    ]
    target.run(["systemctl", "stop", service, *others])
    return others


def provision(target: Target, s: Settings, say: Callable[[str], None] = print) -> int:
    """Plan and (unless dry-run) apply; returns the number of changes made."""
    check_settings(s)
    try:
        target.open()
        plan = make_plan(target, s, say)
        if plan.empty:
            say(f"nothing to do: {target.label} is up to date")
            for note in plan.notes:
                say(f"note: {note}")
            if s.bench:
                run_bench(target, s, say)
            return 0
        print_plan(plan, say)
        if s.dry_run:
            for note in plan.notes:
                say(f"note: {note}")
            if s.bench:
                run_bench(target, s, say)
            say("dry run: nothing was changed")
            return 0
        if target.needs_local_root and os.geteuid() != 0:
            raise FlashError(
                f"setting owners in {target.label} needs root: run `sudo tools/flash ...` "
                "(--dry-run works without)"
            )
        total = sum(c.size for c in plan.changes)
        free = target.free_bytes()
        need = int(total * 1.05) + (1 << 20)  # filesystem overhead, directories
        if free is not None and free < need:
            raise FlashError(
                f"{target.label}: {free / 1e6:.0f} MB free on the root filesystem, "
                f"{need / 1e6:.0f} MB needed: make room (an image can be grown, see docs/device.md)"
            )
        progress = Progress(f"copying to {target.label}", total or None)
        service = role_of(s).service
        # the venv is both roles': every service running from it stops while it is rebuilt, and
        # the other role's starts again after (the flashed role's is restarted below)
        others = _stop_venv_users(target, service) if target.live and plan.build_venv else []
        try:
            apply(target.fs, plan.changes, progress.advance)
            progress.done()
            if plan.boot is not None:
                boot, data, _ = plan.boot
                boot.write(data)
            if plan.build_venv:
                say(f"building {VENV} on the device (offline pip install; a minute or more) ...")
                _run_checked(target, [target.on_target(INSTALLER)], "building the venv")
            if target.live:
                _run_checked(target, ["systemctl", "daemon-reload"], "systemctl daemon-reload")
                if role_of(s).hardware:
                    target.run(["udevadm", "control", "--reload"])
                    target.run(["modprobe", "i2c-dev"])
            if s.bench:  # before the (re)start: the agent's own load stays out of the figures
                run_bench(target, s, say)
            if target.live and s.start:
                name = service.removesuffix(".service")
                _run_checked(target, ["systemctl", "restart", service], f"starting {name}")
                say(f"started {service} (journalctl -u {name} -f to follow it)")
                started = units.triggers(SYSTEMD_DIR, role_of(s).installs)
                if started:
                    _run_checked(target, ["systemctl", "start", *started], "starting the triggers")
                    say(f"started {', '.join(started)}")
        except BaseException:
            if others:  # they ran before: a flash that fails does not leave them stopped
                target.run(["systemctl", "start", *others])
                say(f"started {', '.join(others)} again (this flash failed: see below)")
            raise
        if others:  # (they ran before: started again whatever --no-start says of this role)
            _run_checked(target, ["systemctl", "start", *others], "starting " + ", ".join(others))
            say(f"started {', '.join(others)} again (it runs from the rebuilt venv)")
        n = len(plan.changes) + (plan.boot is not None) + plan.build_venv
        say(f"done: {n} change{'s' if n != 1 else ''} on {target.label}")
        for note in plan.notes:
            say(f"note: {note}")
        if plan.boot is not None:
            say("note: I2C is on after the next boot")
        return n
    finally:
        target.close()
