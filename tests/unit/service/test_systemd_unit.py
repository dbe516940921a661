"""The systemd units and the config template that tools/flash installs.

- ``systemd-analyze verify`` passes on both units in a root tree where their ExecStart binaries
  exist (and the host's target units, so dependencies are checked too), with no warnings;
- ``systemd-analyze security --offline=yes`` scores edge-agent.service at most 2.0, and systemd
  itself parses the device allow list we wrote;
- the directives issue 8 asks for are there;
- MemoryDenyWriteExecute=yes does not break the Python stack: numpy, ctypes callbacks,
  cryptography and a LiteRT/TFLite model with XNNPACK run under the same seccomp rules systemd
  installs for it (a filter built here, checked to be in force before anything runs);
- the config template renders to the reference rig's sensors.
"""

from __future__ import annotations

import importlib.util
import os
import platform
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
UNIT = ROOT / "systemd" / "edge-agent.service"
INSTALL_UNIT = ROOT / "systemd" / "edge-agent-install.service"
TEMPLATE = ROOT / "systemd" / "agent.toml.in"
RIG = ROOT / "agent" / "examples" / "pump-rig.toml"
HOST_UNITS = Path("/usr/lib/systemd/system")
EXPOSURE_LIMIT = 2.0

sys.path.insert(0, str(ROOT / "tools"))
from flash_lib.errors import FlashError  # noqa: E402
from flash_lib.provision import (  # noqa: E402
    Settings,
    check_settings,
    render_config,
    sensor_section,
)

analyze = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed"
)


def directives(path: Path) -> list[tuple[str, str, str]]:
    """(section, key, value) for every assignment in a unit file, in order."""
    out, section = [], ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        out.append((section, key.strip(), value.strip()))
    return out


def values(path: Path, section: str, key: str) -> list[str]:
    return [v for s, k, v in directives(path) if s == section and k == key]


def one(path: Path, section: str, key: str) -> str:
    found = values(path, section, key)
    assert found, f"{path.name}: [{section}] {key}= is missing"
    return found[-1]


def seconds(text: str) -> float:
    units = {"ms": 0.001, "s": 1, "sec": 1, "min": 60, "m": 60, "h": 3600}
    total = 0.0
    for number, unit in re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", text):
        total += float(number) * units.get(unit or "s", 0)
    return total


def verify_root(root: Path, *unit_files: Path) -> list[str]:
    """A root tree holding ``unit_files`` in /etc/systemd/system, the ExecStart binaries of the
    edge-agent units (the venv's edge-agent, the first-boot installer) and the host's targets;
    returns the ``systemd-analyze verify`` command for it (unit names follow)."""
    units = root / "etc" / "systemd" / "system"
    units.mkdir(parents=True)
    for unit in unit_files:
        shutil.copy(unit, units / unit.name)
    for exe in ("opt/edge-agent/venv/bin/edge-agent", "opt/edge-agent/install-venv"):
        path = root / exe
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("#!/bin/sh\n")
        path.chmod(0o755)
    recursive = HOST_UNITS.is_dir()
    if recursive:  # the host's targets, so that dependencies resolve as on a device
        dest = root / "usr" / "lib" / "systemd" / "system"
        dest.mkdir(parents=True)
        for target in HOST_UNITS.glob("*.target"):
            shutil.copy(target, dest / target.name)
    cmd = ["systemd-analyze", "verify", f"--root={root}"]
    return cmd + ([] if recursive else ["--recursive-errors=no"])


def verify_clean(cmd: list[str], *unit_files: Path) -> None:
    """``cmd`` (:func:`verify_root`'s) on the units passes with no warning."""
    names = [unit.name for unit in unit_files]
    proc = subprocess.run([*cmd, *names], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.strip() == "", f"systemd-analyze warns:\n{proc.stderr}"


def security(unit: Path) -> tuple[float, dict[str, str], str]:
    """``systemd-analyze security --offline=yes`` of a unit file: its overall exposure, the
    mark of each check (setting -> "✓" or "✗"), and the whole report."""
    proc = subprocess.run(
        ["systemd-analyze", "security", "--offline=yes", str(unit)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    name = re.escape(unit.name)
    m = re.search(rf"Overall exposure level for {name}:\s*([0-9.]+)", proc.stdout)
    assert m, proc.stdout[-2000:]
    marks = {
        line.split()[1]: line.split()[0]
        for line in proc.stdout.splitlines()
        if len(line.split()) > 1 and line.split()[0] in ("✓", "✗")
    }
    return float(m.group(1)), marks, proc.stdout


#: What must stay closed in every edge-agent service unit.
CLOSED = (
    "User=/DynamicUser=",
    "MemoryDenyWriteExecute=",
    "RestrictAddressFamilies=~AF_PACKET",
    "RestrictAddressFamilies=~AF_NETLINK",
    "CapabilityBoundingSet=~CAP_SYS_ADMIN",
    "NoNewPrivileges=",
    "ProtectSystem=",
)


# ---------------------------------------------------------------------------------------------
@analyze
def test_systemd_verify_passes_on_both_units(tmp_path: Path) -> None:
    root = tmp_path / "root"
    cmd = verify_root(root, UNIT, INSTALL_UNIT)
    verify_clean(cmd, UNIT, INSTALL_UNIT)

    # The same check fails when the ExecStart binary is not there: verify looks into the root.
    (root / "opt/edge-agent/venv/bin/edge-agent").unlink()
    proc = subprocess.run([*cmd, UNIT.name], capture_output=True, text=True, check=False)
    assert proc.returncode != 0
    assert "/opt/edge-agent/venv/bin/edge-agent" in proc.stderr


@analyze
def test_systemd_security_exposure_at_most_2() -> None:
    exposure, marks, report = security(UNIT)
    assert exposure <= EXPOSURE_LIMIT, report
    # systemd parsed our device allow list (it adds char-rtc:r for ProtectClock=yes).
    row = next(line for line in report.splitlines() if "DeviceAllow=" in line)
    for group in ("char-i2c", "char-ttyS", "char-ttyAMA", "char-ttyUSB", "char-ttyACM"):
        assert f"{group}:rw" in row, row
    for check in CLOSED:  # what must stay closed
        assert marks.get(check) == "✓", check


def test_systemd_unit_has_the_required_directives() -> None:
    assert one(UNIT, "Service", "Type") == "notify"
    assert one(UNIT, "Service", "NotifyAccess") == "main"
    assert 0 < seconds(one(UNIT, "Service", "WatchdogSec")) <= 60
    assert one(UNIT, "Service", "Restart") == "on-failure"
    assert seconds(one(UNIT, "Service", "RestartSec")) > 0
    assert seconds(one(UNIT, "Unit", "StartLimitIntervalSec")) > 0
    assert int(one(UNIT, "Unit", "StartLimitBurst")) >= 1
    assert 0 < seconds(one(UNIT, "Service", "TimeoutStopSec")) <= 60
    assert "78" in one(UNIT, "Service", "RestartPreventExitStatus").split()  # EX_CONFIG
    assert one(UNIT, "Service", "ExecStart") == (
        "/opt/edge-agent/venv/bin/edge-agent run --config /etc/edge-agent/agent.toml"
    )
    assert one(UNIT, "Service", "User") == "edge-agent"
    assert one(UNIT, "Service", "Group") == "edge-agent"
    assert set(one(UNIT, "Service", "SupplementaryGroups").split()) == {"i2c", "dialout"}
    assert "DynamicUser" not in {k for _, k, _ in directives(UNIT)}
    assert one(UNIT, "Service", "DevicePolicy") == "closed"
    allowed = values(UNIT, "Service", "DeviceAllow")
    for entry in ("char-i2c rw", "char-ttyS rw", "char-ttyUSB rw", "char-ttyAMA rw"):
        assert entry in allowed
    for key in ("StateDirectory", "ConfigurationDirectory", "LogsDirectory", "RuntimeDirectory"):
        assert one(UNIT, "Service", key) == "edge-agent"
    assert set(one(UNIT, "Service", "RestrictAddressFamilies").split()) == {
        "AF_UNIX",
        "AF_INET",
        "AF_INET6",
    }
    assert one(UNIT, "Service", "MemoryDenyWriteExecute") == "yes"
    assert one(UNIT, "Service", "NoNewPrivileges") == "yes"
    assert one(UNIT, "Service", "ProtectSystem") == "strict"
    assert one(UNIT, "Service", "CapabilityBoundingSet") == ""
    assert one(UNIT, "Install", "WantedBy") == "multi-user.target"


def syscall_set(name: str) -> set[str]:
    """The system calls of ``name``: a call, or a ``@group`` as this host's systemd defines it
    (nested groups expanded)."""
    if not name.startswith("@"):
        return {name}
    proc = subprocess.run(
        ["systemd-analyze", "syscall-filter", "--no-pager", name],
        capture_output=True,
        text=True,
        check=True,
    )
    out: set[str] = set()
    for line in proc.stdout.splitlines()[1:]:
        entry = line.strip()
        if entry and not entry.startswith("#"):
            out |= syscall_set(entry)
    return out


def allowed_syscalls(path: Path) -> set[str]:
    """The calls a unit's SystemCallFilter= lines allow, merged in order as systemd.exec(5) says:
    the first line is an allow list; a later one adds its calls, a later ``~`` one removes
    them."""
    allowed: set[str] = set()
    for value in values(path, "Service", "SystemCallFilter"):
        deny = value.startswith("~")
        calls = set().union(*(syscall_set(n) for n in value.removeprefix("~").split()))
        allowed = allowed - calls if deny else allowed | calls
    return allowed


@analyze
def test_systemd_filter_allows_what_the_agent_does_on_purpose() -> None:
    """The agent pins itself to one CPU by default (agent/service/cpu.py: sched_setaffinity)
    and its training process lowers its priority (agent/learn/worker.py: os.nice ->
    setpriority). Both are in @resources, which the filter takes away: EPERM, caught, so the
    agent ran on every CPU and trained at the agent's own priority under the service."""
    allowed = allowed_syscalls(UNIT)
    assert {"read", "mmap", "prlimit64", "sched_getaffinity"} <= allowed  # the merge is right
    assert not {"reboot", "setrlimit", "sched_setscheduler", "mount"} & allowed
    assert {"sched_setaffinity", "setpriority"} <= allowed


def test_systemd_install_unit_runs_once_before_the_agent() -> None:
    conditions = values(INSTALL_UNIT, "Unit", "ConditionPathExists")
    assert "!/opt/edge-agent/venv/bin/edge-agent" in conditions
    assert one(INSTALL_UNIT, "Unit", "Before") == "edge-agent.service"
    assert one(INSTALL_UNIT, "Service", "Type") == "oneshot"
    assert one(INSTALL_UNIT, "Service", "ExecStart") == "/opt/edge-agent/install-venv"
    assert one(INSTALL_UNIT, "Service", "PrivateNetwork") == "yes"  # offline by construction
    assert one(INSTALL_UNIT, "Install", "RequiredBy") == "edge-agent.service"
    assert "edge-agent-install.service" in values(UNIT, "Unit", "After")


# ---------------------------------------------------------------------------------------------
# MemoryDenyWriteExecute=yes, as systemd implements it with seccomp: mmap() asking for
# PROT_WRITE|PROT_EXEC together, mprotect()/pkey_mprotect() asking for PROT_EXEC, and shmat()
# with SHM_EXEC fail with EPERM. The child installs that filter on itself, checks that a W+X
# mapping is refused, then runs the stack the agent loads.
MDWE_CHILD = r"""
import ctypes, errno, mmap, platform, sys

NR = {"x86_64": (0xC000003E, 9, 10, 329, 30), "aarch64": (0xC00000B7, 222, 226, 288, 196)}
AUDIT_ARCH, MMAP, MPROTECT, PKEY_MPROTECT, SHMAT = NR[platform.machine()]
LD_W_ABS, JEQ_K, AND_K, RET_K = 0x20, 0x15, 0x54, 0x06
ALLOW, DENY = 0x7FFF0000, 0x00050000 | errno.EPERM
PROT_WRITE, PROT_EXEC, SHM_EXEC = 0x2, 0x4, 0o100000
NR_OFF, ARCH_OFF, ARG2_OFF = 0, 4, 16 + 2 * 8


def masked_eq(mask):
    return [(LD_W_ABS, None, None, ARG2_OFF), (AND_K, None, None, mask),
            (JEQ_K, "deny", "allow", mask)]


code = [
    (LD_W_ABS, None, None, ARCH_OFF), (JEQ_K, None, "allow", AUDIT_ARCH),
    (LD_W_ABS, None, None, NR_OFF),
    (JEQ_K, "mmap", None, MMAP), (JEQ_K, "mprotect", None, MPROTECT),
    (JEQ_K, "mprotect", None, PKEY_MPROTECT), (JEQ_K, "shmat", None, SHMAT),
    (RET_K, None, None, ALLOW),
    ("L", "mmap"), *masked_eq(PROT_WRITE | PROT_EXEC),
    ("L", "mprotect"), *masked_eq(PROT_EXEC),
    ("L", "shmat"), *masked_eq(SHM_EXEC),
    ("L", "deny"), (RET_K, None, None, DENY),
    ("L", "allow"), (RET_K, None, None, ALLOW),
]
labels, insns = {}, []
for item in code:
    if item[0] == "L":
        labels[item[1]] = len(insns)
    else:
        insns.append(item)


class SockFilter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_ushort), ("jt", ctypes.c_ubyte), ("jf", ctypes.c_ubyte),
                ("k", ctypes.c_uint)]


class SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(SockFilter))]


def rel(pc, label):
    return 0 if label is None else labels[label] - pc - 1


filters = (SockFilter * len(insns))(
    *[SockFilter(op, rel(pc, jt), rel(pc, jf), k) for pc, (op, jt, jf, k) in enumerate(insns)]
)
prog = SockFprog(len(insns), filters)
libc = ctypes.CDLL(None, use_errno=True)
assert libc.prctl(38, 1, 0, 0, 0) == 0, "PR_SET_NO_NEW_PRIVS"
assert libc.prctl(22, 2, ctypes.byref(prog), 0, 0) == 0, "PR_SET_SECCOMP"

try:
    mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    print("wx-mapping=allowed")
    sys.exit(3)
except PermissionError:
    print("wx-mapping=refused")
mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE).close()

import numpy as np
a = np.arange(64 * 64, dtype=np.float64).reshape(64, 64) / 4096
print("numpy=%.3f" % float((a @ a.T).trace()))

callback = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int)(lambda x: x + 1)
print("ctypes-callback=%d" % callback(41))

if sys.argv[2] == "full":
    from cryptography.hazmat.primitives.asymmetric import ed25519
    key = ed25519.Ed25519PrivateKey.generate()
    key.public_key().verify(key.sign(b"model"), b"model")
    import aiocoap, cbor2, serial, smbus2  # noqa: F401
    print("crypto=ok")

try:
    from ai_edge_litert.interpreter import Interpreter
except ImportError:
    from tflite_runtime.interpreter import Interpreter
interp = Interpreter(model_path=sys.argv[1])
interp.allocate_tensors()
interp.set_tensor(interp.get_input_details()[0]["index"], np.array([[1, 1, 1, 1]], np.float32))
interp.invoke()
print("model=%s" % interp.get_tensor(interp.get_output_details()[0]["index"]).tolist())
"""


def fully_connected_model() -> bytes:
    """A one-op float TFLite model, y = W x + b, built with LiteRT's own schema."""
    flatbuffers = pytest.importorskip("flatbuffers")
    s = pytest.importorskip("ai_edge_litert.schema_py_generated")
    import numpy as np

    def buffer(data: bytes = b"") -> object:
        b = s.BufferT()
        b.data = list(data) if data else None
        return b

    def tensor(shape: list[int], buf: int, name: str) -> object:
        t = s.TensorT()
        t.shape, t.type, t.buffer, t.name = shape, s.TensorType.FLOAT32, buf, name
        return t

    weights = np.array([[1, 2, 3, 4], [0.5, 0.5, 0.5, 0.5]], dtype=np.float32)
    bias = np.array([1, -1], dtype=np.float32)
    opcode = s.OperatorCodeT()
    opcode.builtinCode = s.BuiltinOperator.FULLY_CONNECTED
    opcode.deprecatedBuiltinCode = s.BuiltinOperator.FULLY_CONNECTED
    opcode.version = 1
    op = s.OperatorT()
    op.opcodeIndex, op.inputs, op.outputs = 0, [0, 1, 2], [3]
    op.builtinOptionsType = s.BuiltinOptions.FullyConnectedOptions
    op.builtinOptions = s.FullyConnectedOptionsT()
    graph = s.SubGraphT()
    graph.tensors = [
        tensor([1, 4], 0, "x"),
        tensor([2, 4], 1, "w"),
        tensor([2], 2, "b"),
        tensor([1, 2], 0, "y"),
    ]
    graph.inputs, graph.outputs, graph.operators = [0], [3], [op]
    model = s.ModelT()
    model.version, model.operatorCodes, model.subgraphs = 3, [opcode], [graph]
    model.buffers = [buffer(), buffer(weights.tobytes()), buffer(bias.tobytes())]
    builder = flatbuffers.Builder(1024)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


def _pythons() -> list[tuple[str, str]]:
    out = [(sys.executable, "full")]
    other = os.environ.get("EDGE_AGENT_TFLITE_PYTHON")
    if other and Path(other).exists():
        out.append((other, "tflite-runtime"))
    return out


@pytest.mark.skipif(
    not sys.platform.startswith("linux") or platform.machine() not in ("x86_64", "aarch64"),
    reason="the seccomp filter is written for Linux on x86_64 and aarch64",
)
@pytest.mark.parametrize(("python", "stack"), _pythons())
def test_systemd_memory_deny_write_execute_keeps_numpy_and_litert_working(
    tmp_path: Path, python: str, stack: str
) -> None:
    model = tmp_path / "fc.tflite"
    model.write_bytes(fully_connected_model())
    child = tmp_path / "mdwe_child.py"
    child.write_text(MDWE_CHILD)
    proc = subprocess.run(
        [python, str(child), str(model), stack],
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == "wx-mapping=refused"  # the rules are in force
    assert "ctypes-callback=42" in lines
    assert "model=[[11.0, 1.0]]" in lines  # 1+2+3+4+1, 4*0.5-1
    if stack == "full":
        assert "crypto=ok" in lines


# ---------------------------------------------------------------------------------------------
CREDENTIAL = "/var/lib/edge-agent/credential.json"  # where tools/flash puts it


def _render(**overrides: object) -> dict:
    """The template rendered as tools/flash does: by default OSCORE with a credential and the
    model key (only whether they are given matters to the template, not their content)."""
    kw: dict[str, object] = {
        "device_id": "pump-07",
        "endpoint": "coap://cloud.example:5683",
        "credential": Path("pump-07.json"),
        "model_key": Path("signing.key.pub"),
        **overrides,
    }
    settings = Settings(**kw)  # type: ignore[arg-type]
    sensors = sensor_section(RIG.read_text())
    return {"text": render_config(TEMPLATE.read_text(), settings, sensors)}


def test_flash_template_renders_the_reference_rig() -> None:
    text = _render()["text"]
    rendered = tomllib.loads(text)
    rig = tomllib.loads(RIG.read_text())
    assert rendered["agent"]["device_id"] == "pump-07"
    assert rendered["agent"]["data_dir"] == "/var/lib/edge-agent"  # StateDirectory=edge-agent
    assert rendered["sensor"] == rig["sensor"]
    assert all(s.get("bus", 1) == 1 for s in rendered["sensor"])
    assert rendered["uplink"] == {
        "endpoints": ["coap://cloud.example:5683"],
        "security": "oscore",
        "credential": CREDENTIAL,
    }
    assert rendered["models"] == {"public_key": "models.pub"}  # beside agent.toml
    # The secrets are in the credential file, not in the config: no PSK lines, live or commented.
    assert not re.findall(r"^[#\s]*psk\w*\s*=", text, re.MULTILINE)
    assert not re.findall(r"@[A-Z_]+@", text)


def test_flash_template_security_modes() -> None:
    dtls = tomllib.loads(_render(security="dtls", endpoint="coaps://cloud.example:5684")["text"])
    assert dtls["uplink"] == {
        "endpoints": ["coaps://cloud.example:5684"],
        "security": "dtls",
        "credential": CREDENTIAL,
    }
    # Plain CoAP only as asked, said so in the config, with no credential.
    text = _render(security="none", credential=None)["text"]
    assert tomllib.loads(text)["uplink"] == {
        "endpoints": ["coap://cloud.example:5683"],
        "security": "none",
    }
    lines = text.splitlines()
    at = lines.index('security = "none"')
    comment = " ".join(lines[lines.index("[uplink]") + 2 : at])
    assert comment.startswith("#") and "unauthenticated" in comment and "warns" in comment
    # Without the model key: [models] is there with the key commented out, and says why.
    text = _render(model_key=None)["text"]
    assert tomllib.loads(text)["models"] == {}
    assert any(line.startswith('# public_key = "models.pub"') for line in text.splitlines())


@pytest.mark.skipif(
    importlib.util.find_spec("drivers.adxl345") is None,
    reason="the rig's drivers are not there yet",
)
def test_flash_template_is_a_valid_agent_config(tmp_path: Path) -> None:
    from agent.modelstore.signing import write_keypair
    from agent.service import config

    _, public = write_keypair(tmp_path / "keys" / "signing.key")
    (tmp_path / "models.pub").write_bytes(public.read_bytes())  # where tools/flash puts it
    path = tmp_path / "agent.toml"
    path.write_text(_render()["text"])
    cfg = config.load(path)
    assert cfg.agent.device_id == "pump-07"
    assert not any(s.simulated for s in cfg.sensors)
    assert cfg.uplink is not None and cfg.uplink.security == "oscore"
    assert cfg.uplink.credential == Path(CREDENTIAL)
    assert cfg.models.public_key == tmp_path / "models.pub"
    for mode, endpoint in (("dtls", "coaps://cloud.example:5684"), ("none", None)):
        path.write_text(
            _render(security=mode, endpoint=endpoint or "coap://cloud.example:5683")["text"]
        )
        uplink = config.load(path).uplink
        assert uplink is not None and uplink.security == mode


@pytest.mark.parametrize(
    "endpoint", ["coap://cloud.example:5683/", "coap://cloud.example:0", "coap://cloud.example"]
)
def test_an_endpoint_tools_flash_takes_is_one_the_agent_starts_with(
    tmp_path: Path, endpoint: str
) -> None:
    """tools/flash refuses an endpoint before it touches the device, or writes one the agent
    takes: a config the agent refuses (exit 78) leaves a flashed device that never starts."""
    from agent.service import config

    settings = Settings(device_id="pump-07", endpoint=endpoint, security="none")
    try:
        check_settings(settings)
    except FlashError:
        return
    path = tmp_path / "agent.toml"
    path.write_text(render_config(TEMPLATE.read_text(), settings, sensor_section(RIG.read_text())))
    assert config.load(path).uplink is not None


def test_flash_sensor_section_takes_only_the_sensor_tables() -> None:
    text = (
        '[agent]\ndevice_id = "x"\n\n# the first part\n[[sensor]]\nname = "a"\n'
        '[sensor.options]\nrange = 2\n[[sensor.options.register]]\nname = "r"\n\n'
        '# the second\n[[sensor]]\nname = "b"\n\n# models, not sensors\n[models]\nx = 1\n'
    )
    section = sensor_section(text)
    assert section.startswith("# the first part\n[[sensor]]")
    assert "models" not in section and "[agent]" not in section
    assert [s["name"] for s in tomllib.loads(section)["sensor"]] == ["a", "b"]
    assert tomllib.loads(section)["sensor"][0]["options"]["register"] == [{"name": "r"}]
