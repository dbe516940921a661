"""Every error of the command lines is one line on stderr naming the thing and the fix, with the
documented exit code (README "Commands", agent/exits.py), and never a traceback (issue 14).

The commands run as processes, as an operator runs them. Permission cases run as ``nobody``
(``setpriv``) when the tests run as root, whom permissions do not stop."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agent import exits
from agent.service import cli
from agent.service.config import example_config
from agent.wire.batch import WireRecord
from agent.wire.records import TelemetryBody
from cloud.storage import SQLiteStorage

ROOT = Path(__file__).resolve().parents[2]
DEVICE = "pump-rig-01"

pytestmark = pytest.mark.timeout(60)


def agent(*args: str, env: dict[str, str] | None = None, user: bool = False, **kw):
    return _run([sys.executable, "-m", "agent.service.cli", *args], env, user, **kw)


def cloud(*args: str, user: bool = False, **kw):
    return _run([sys.executable, "-m", "cloud.cli", *args], None, user, **kw)


def _run(cmd: list[str], env: dict[str, str] | None, user: bool, **kw):
    if user:
        cmd = as_other_user(cmd)
    return subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        timeout=45,
        cwd=kw.pop("cwd", ROOT),
        env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
        **kw,
    )


def as_other_user(cmd: list[str]) -> list[str]:
    """Run as nobody when root (root passes every permission check)."""
    if os.geteuid() != 0:
        return cmd
    setpriv = shutil.which("setpriv")
    assert setpriv, "setpriv (util-linux) runs the permission cases as nobody"
    return [setpriv, "--reuid=65534", "--regid=65534", "--clear-groups", *cmd]


def one_line(result: subprocess.CompletedProcess[str], code: int, *words: str) -> str:
    """stderr is exactly one line holding ``words``; the exit code is ``code``."""
    err = result.stderr
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert result.returncode == code, (result.returncode, err)
    for w in words:
        assert w in lines[0], (w, lines[0])
    return lines[0]


def rig_config(tmp_path: Path, data_dir: Path) -> Path:
    text = (
        example_config()
        .read_text()
        .replace('data_dir = "/var/lib/edge-agent"', f'data_dir = "{data_dir}"')
    )
    path = tmp_path / "rig.toml"
    path.write_text(text)
    path.chmod(0o644)
    return path


def world_readable(tmp_path: Path) -> None:
    """nobody must reach the files of the test (pytest's tmp_path is 0700)."""
    for p in (tmp_path, *tmp_path.parents):
        if p == Path("/"):
            break
        if p.stat().st_uid == os.geteuid():
            p.chmod(p.stat().st_mode | 0o005)


# -- edge-agent ------------------------------------------------------------------------------
@pytest.mark.parametrize("scale", ["0", "-2", "nan", "inf", "fast"])
def test_a_time_scale_that_is_not_a_positive_number_is_one_line_64(tmp_path: Path, scale: str):
    """Was a 25-line traceback ending in the clock's ValueError, exit 1."""
    config = rig_config(tmp_path, tmp_path / "data")
    result = agent("run", "--config", str(config), "--simulate", "pump", "--time-scale", scale)
    one_line(result, exits.EX_USAGE, "--time-scale", scale)


def test_a_demo_of_negative_seconds_is_one_line_64():
    """Was a demo that stopped at once with 0."""
    one_line(agent("demo", "--seconds", "-1"), exits.EX_USAGE, "--seconds")


def test_a_config_that_never_ends_is_one_line_78():
    """/dev/zero (or a log file named by mistake) was read whole: a MemoryError traceback under
    a memory limit."""
    one_line(agent("check-config", "/dev/zero"), exits.EX_CONFIG, "/dev/zero", "not a config")


def test_a_fault_without_the_simulated_pump_is_one_line_64(tmp_path: Path):
    """Was ignored: the agent ran on the real hardware (selftest failed there, exit 1)."""
    config = rig_config(tmp_path, tmp_path / "data")
    for argv in (["run"], ["selftest"], ["run", "--simulate", "skab", "--skab-file", "x.csv"]):
        result = agent(*argv, "--config", str(config), "--fault", "cavitation")
        one_line(result, exits.EX_USAGE, "--fault goes with --simulate pump")


@pytest.mark.parametrize(
    "content", [b"a,b\n1,2\n", b"\x89PNG\r\n\x1a\n\x00\x00", b"datetime;Pressure\n"]
)
def test_a_skab_file_that_is_not_a_skab_recording_is_one_line_78(tmp_path: Path, content: bytes):
    """Was a traceback (ValueError, UnicodeDecodeError) from the replay, exit 1, at every start
    of run, selftest or demo."""
    config = rig_config(tmp_path, tmp_path / "data")
    bad = tmp_path / "small.csv"
    bad.write_bytes(content)
    for command in ("run", "selftest"):
        result = agent(
            command, "--config", str(config), "--simulate", "skab", "--skab-file", str(bad)
        )
        one_line(result, exits.EX_CONFIG, "--skab-file", "not a SKAB recording")


def test_run_with_a_data_directory_it_may_not_write_is_one_line_77(tmp_path: Path):
    """Was a 37-line traceback ending in PermissionError: .../queue.db.lock."""
    data = tmp_path / "data"
    data.mkdir(mode=0o555)
    world_readable(tmp_path)
    result = agent(
        "run", "--config", str(rig_config(tmp_path, data)), "--simulate", "pump", user=True
    )
    line = one_line(result, exits.EX_NOPERM, f"data directory {data}", "permission denied")
    assert "chown" in line and "--data-dir DIR" in line


def test_run_with_a_data_directory_that_cannot_be_made_is_one_line_73(tmp_path: Path):
    (tmp_path / "a-file").write_text("")
    data = tmp_path / "a-file" / "data"
    result = agent("run", "--config", str(rig_config(tmp_path, data)), "--simulate", "pump")
    line = one_line(result, exits.EX_CANTCREAT, f"data directory {data}", "not a directory")
    assert "install -d" in line


def test_run_time_scale_without_simulate_is_usage_64(tmp_path: Path):
    result = agent(
        "run", "--config", str(rig_config(tmp_path, tmp_path / "d")), "--time-scale", "4"
    )
    one_line(result, exits.EX_USAGE, "--time-scale", "--simulate")


def test_a_bad_config_is_one_line_78(tmp_path: Path):
    bad = tmp_path / "bad.toml"
    bad.write_text(example_config().read_text().replace("interval = 1.0", "interval = -1", 1))
    one_line(agent("check-config", str(bad)), exits.EX_CONFIG, "bad.toml: sensor[0].interval")


def test_queue_before_the_agent_ran_is_no_input_66(tmp_path: Path):
    result = agent("queue", "--config", str(rig_config(tmp_path, tmp_path / "never")))
    one_line(result, exits.EX_NOINPUT, "no queue at", "has not run")


def test_status_without_an_agent_is_unavailable_69_naming_where_it_looked(tmp_path: Path):
    result = agent("status", env={"RUNTIME_DIRECTORY": str(tmp_path / "run")})
    line = one_line(result, exits.EX_UNAVAILABLE, "no agent is running", "--socket PATH")
    assert str(tmp_path / "run" / "status.sock") in line
    assert "/run/edge-agent/status.sock" in line and "/var/lib/edge-agent/status.sock" in line


def test_status_finds_the_agent_where_systemd_runs_it_without_options(tmp_path: Path):
    """`edge-agent status` with no option said "no agent is running" while one was: it looks
    in systemd's directories ($RUNTIME_DIRECTORY, /run/edge-agent, $STATE_DIRECTORY) and the
    data_dir of the installed and the packaged config (/var/lib/edge-agent)."""
    data = tmp_path / "state"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "agent.service.cli",
            "run",
            "--config",
            str(example_config()),
            "--simulate",
            "pump",
            "--data-dir",
            str(data),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        env = {"STATE_DIRECTORY": str(data)}  # as systemd sets it for StateDirectory=
        deadline = time.monotonic() + 30
        while True:
            result = agent("status", env=env)
            if result.returncode == 0 or time.monotonic() > deadline:
                break
            time.sleep(0.3)
        assert result.returncode == 0, result.stderr
        assert "pump-rig-01" in result.stdout
        # the agent's socket is 0660: another user is told what to do
        world_readable(tmp_path)
        data.chmod(0o755)
        denied = agent("status", "--data-dir", str(data), user=True)
        if os.geteuid() == 0:
            one_line(denied, exits.EX_NOPERM, "permission denied", "group")
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err


def test_status_sockets_follow_the_systemd_unit(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    conf = tmp_path / "agent.toml"
    conf.write_text('[agent]\ndevice_id = "d"\ndata_dir = "/srv/edge"\n')
    monkeypatch.setattr(cli, "SYSTEM_CONFIG", conf)
    monkeypatch.setenv("RUNTIME_DIRECTORY", "/run/a:/run/b")
    monkeypatch.setenv("STATE_DIRECTORY", "/var/lib/x")
    args = cli.build_parser().parse_args(["status"])
    assert [str(p) for p in cli.status_sockets(args)] == [
        "/run/a/status.sock",
        "/run/b/status.sock",
        "/var/lib/x/status.sock",
        "/run/edge-agent/status.sock",
        "/srv/edge/status.sock",
        "/var/lib/edge-agent/status.sock",  # the packaged config's data_dir
    ]


# -- edge-agent-cloud ------------------------------------------------------------------------
def test_serve_on_an_address_not_of_this_host_says_so_69():
    """Was `10.99.99.99:5683 is in use (Cannot assign requested address)`: EADDRNOTAVAIL is
    not EADDRINUSE. 192.0.2.1 is TEST-NET-1 (RFC 5737), never a host's address."""
    result = cloud("serve", "--listen", "192.0.2.1:5683", "--data", "/tmp/unused-cloud-data")
    line = one_line(result, exits.EX_UNAVAILABLE, "192.0.2.1 is not an address of this host")
    assert "is in use" not in line and "0.0.0.0" in line


def test_serve_on_a_port_in_use_says_in_use_75(tmp_path: Path):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as held:
        held.bind(("127.0.0.1", 0))
        port = held.getsockname()[1]
        result = cloud("serve", "--listen", f"127.0.0.1:{port}", "--data", str(tmp_path / "c"))
    one_line(result, exits.EX_TEMPFAIL, f"127.0.0.1:{port} is in use by another process")


def test_serve_on_a_host_that_does_not_resolve_says_so_69(tmp_path: Path):
    """Was exit 74 with "the operating system: cannot resolve ...; free space on the disk"."""
    result = cloud("serve", "--listen", "nosuchhost.invalid:5683", "--data", str(tmp_path / "c"))
    one_line(result, exits.EX_UNAVAILABLE, "nosuchhost.invalid:5683: cannot resolve", "0.0.0.0")


def test_a_dashboard_port_in_use_says_which_address_75(tmp_path: Path):
    """Was asyncio's "error while attempting to bind on address (...)" text."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        result = cloud(
            "serve", "--listen", "127.0.0.1:0", "--data", str(tmp_path / "c"),
            "--http", f"127.0.0.1:{port}",
        )  # fmt: skip
    assert result.returncode == exits.EX_TEMPFAIL and "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert (
        last == f"error: 127.0.0.1:{port} is in use by another process; stop it or choose "
        "another port"
    ), last


@pytest.mark.parametrize(
    ("option", "argv"),
    [
        ("--log-level", ["--log-level", "bogus", "devices", "list"]),  # was taken as info
        ("--storage", ["devices", "list", "--storage", "mysql://x"]),  # was ./mysql:/x created
    ],
)
def test_an_option_value_it_does_not_know_is_one_line_64(
    tmp_path: Path, option: str, argv: list[str]
):
    result = cloud(*argv, "--data", str(tmp_path / "c"), cwd=tmp_path)
    one_line(result, exits.EX_USAGE, option)
    assert list(tmp_path.iterdir()) == []  # nothing created


@pytest.mark.parametrize(
    "argv",
    [
        ["devices", "revoke", "--data", "TYPO", "pump-1"],  # was "has no credential", exit 0
        ["devices", "rekey", "--data", "TYPO", "pump-1"],
        ["operators", "token", "--data", "TYPO", "op-1"],
        ["gateways", "revoke", "--data", "TYPO", "gw-1"],
        ["gateways", "rekey", "--data", "TYPO", "gw-1"],
        ["models", "list", "--data", "TYPO"],  # was an empty list, exit 0
        ["releases", "list", "--data", "TYPO"],
    ],
)
def test_a_mistyped_data_directory_is_one_line_66_and_creates_nothing(
    tmp_path: Path, argv: list[str]
):
    result = cloud(*argv, cwd=tmp_path)
    one_line(result, exits.EX_NOINPUT, "TYPO")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "argv",
    [
        ["devices", "show", "--data", "D", "nosuch"],  # said "--data DIR"
        ["export", "--data", "D", "--device", "nosuch"],
        ["groups", "add", "--data", "D", "g1", "nosuch"],
    ],
)
def test_an_unknown_device_says_the_command_that_registers_it_66(tmp_path: Path, argv):
    data = tmp_path / "c"
    assert cloud("devices", "add", "--data", str(data), "pump-1").returncode == 0
    result = cloud(*[str(data) if a == "D" else a for a in argv])
    one_line(
        result, exits.EX_NOINPUT, f"register it: edge-agent-cloud devices add --data {data} nosuch"
    )


def test_a_database_that_is_not_one_or_does_not_answer_says_so(tmp_path: Path):
    """Were 74 (an I/O error) both: a file that is not a database is bad data (65), a database
    server that refuses the connection is unavailable (69)."""
    data = tmp_path / "c"
    data.mkdir()
    (data / "cloud.sqlite3").write_bytes(bytes(range(256)) * 20)
    one_line(cloud("devices", "list", "--data", str(data)), exits.EX_DATAERR, "not a database")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, not listening: the connection is refused
        result = cloud(
            "devices",
            "list",
            "--data",
            str(data),
            "--storage",
            f"postgresql://x@127.0.0.1:{port}/db",
        )
    one_line(result, exits.EX_UNAVAILABLE, f"127.0.0.1:{port}/db")


@pytest.mark.parametrize(
    ("server", "credential", "code", "said"),
    [
        ("notauri", None, exits.EX_USAGE, "--server notauri: give the endpoint as coap://"),
        ("coap://127.0.0.1:9", "missing.json", exits.EX_NOINPUT, "no such file"),
        ("coap://127.0.0.1:9", "garbage.json", exits.EX_DATAERR, "--credential"),
    ],
)
def test_desired_set_over_the_network_with_a_bad_server_or_credential_says_which(
    tmp_path: Path, server: str, credential: str | None, code: int, said: str
):
    """Were 69 for a --server that is no URI and 64 for a missing or corrupt credential file."""
    (tmp_path / "garbage.json").write_text("{not json")
    (tmp_path / "garbage.json").chmod(0o600)
    argv = ["desired", "set", "--server", server, "--device", "pump-1", "sensor/x/interval=1"]
    if credential is not None:
        argv += ["--credential", str(tmp_path / credential)]
    one_line(cloud(*argv), code, said)


def test_an_input_file_that_is_a_directory_is_one_line_66(tmp_path: Path):
    """Were 73 with "is a directory; choose a writable directory" (advice for an output)."""
    data = str(tmp_path / "c")
    argv = ["devices", "add", "--data", data, "pump-1", "--psk-file", str(tmp_path)]
    one_line(cloud(*argv), exits.EX_NOINPUT, "--psk-file", "not a file")
    argv = ["models", "publish", str(tmp_path), "--data", data, "--name", "m", "--version", "1"]
    one_line(cloud(*argv), exits.EX_NOINPUT, "no such file")


def test_cloud_data_directory_it_may_not_write_is_one_line_77(tmp_path: Path):
    data = tmp_path / "cloud"
    data.mkdir(mode=0o555)
    world_readable(tmp_path)
    result = cloud("devices", "add", "--data", str(data), DEVICE, user=True)
    one_line(result, exits.EX_NOPERM, f"data directory {data}", "permission denied")
    result = cloud("serve", "--listen", "127.0.0.1:0", "--data", str(data), user=True)
    one_line(result, exits.EX_NOPERM, f"data directory {data}", "permission denied")


def test_export_of_no_data_or_an_unknown_device_is_no_input_66(tmp_path: Path):
    result = cloud("export", "--data", str(tmp_path / "nothing"), "--device", DEVICE)
    one_line(result, exits.EX_NOINPUT, "no endpoint data here", "--data DIR")
    assert not (tmp_path / "nothing").exists()  # looking creates nothing
    storage = SQLiteStorage.in_dir(tmp_path / "cloud")
    storage.close()
    result = cloud("export", "--data", str(tmp_path / "cloud"), "--device", DEVICE)
    one_line(
        result,
        exits.EX_NOINPUT,
        "not registered",
        f"edge-agent-cloud devices add --data {tmp_path / 'cloud'} {DEVICE}",
    )


def test_export_into_head_closes_quietly_141(tmp_path: Path):
    """`export ... | head` printed `Broken pipe` (and an ignored exception) when head left."""
    storage = SQLiteStorage.in_dir(tmp_path / "cloud")
    t0 = 1_700_000_000.0
    records = [
        WireRecord(i, "telemetry", t0 + i, TelemetryBody("motor", t0 + i, {"a": i}).to_cbor())
        for i in range(1, 20_001)  # far more than a pipe holds
    ]
    storage.ingest(DEVICE, records, t0, register=True)
    storage.close()
    cmd = [sys.executable, "-m", "cloud.cli", "export", "--data", str(tmp_path / "cloud")]
    result = subprocess.run(
        [
            "bash",
            "-c",
            f'{" ".join(cmd)} --device {DEVICE} | head -3; echo "rc=${{PIPESTATUS[0]}}"',
        ],
        capture_output=True,
        text=True,
        timeout=45,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    out = result.stdout.splitlines()
    assert out[0] == "seq,kind,time,sensor,channel,value" and len(out) == 4, result.stdout
    assert out[-1] == f"rc={exits.EX_SIGPIPE}"
    assert result.stderr == ""  # no "Broken pipe", no "Exception ignored"


def test_export_to_a_full_disk_names_the_output_74(tmp_path: Path):
    """A write that fails (here /dev/full) said only "No space left on device"."""
    storage = SQLiteStorage.in_dir(tmp_path / "cloud")
    t0 = 1_700_000_000.0
    body = TelemetryBody("motor", t0, {"a": 1.0}).to_cbor()
    storage.ingest(DEVICE, [WireRecord(1, "telemetry", t0, body)], t0, register=True)
    storage.close()
    args = ("export", "--data", str(tmp_path / "cloud"), "--device", DEVICE)
    result = cloud(*args, "--output", "/dev/full")
    one_line(result, exits.EX_IOERR, "--output /dev/full", "no space left on the device")


def test_a_learning_job_that_does_not_exist_is_66_for_every_action(tmp_path: Path):
    """`learn stop 99` and `learn resume 99` were 65 where `learn status 99` is 66."""
    SQLiteStorage.in_dir(tmp_path / "cloud").close()
    for action in ("status", "stop"):
        result = cloud("learn", action, "99", "--data", str(tmp_path / "cloud"))
        one_line(result, exits.EX_NOINPUT, "no learning job 99")


def test_a_credential_that_cannot_be_written_registers_nothing(tmp_path: Path):
    """Checked before the device is registered: a second try must not find it half-done
    (registered, its credential lost)."""
    (tmp_path / "a-file").write_text("")
    out = tmp_path / "a-file" / "pump.json"
    data = tmp_path / "cloud"
    result = cloud("devices", "add", "--data", str(data), DEVICE, "--credential-out", str(out))
    one_line(result, exits.EX_CANTCREAT, "--credential-out directory", "not a directory")
    result = cloud(
        "devices",
        "add",
        "--data",
        str(data),
        DEVICE,
        "--credential-out",
        str(tmp_path / "pump.json"),
    )
    assert result.returncode == 0 and "credential (generation 1) written" in result.stdout


def test_a_credential_out_that_is_a_directory_gets_the_file_in_it(tmp_path: Path):
    """Was exit 73 with the secret left in ``DIR/../.DIR.tmp`` (the atomic write's temporary
    file, beside the directory) and the device registered without a file; now, as ``cp``
    does, the file goes into the directory."""
    out = tmp_path / "creds"
    out.mkdir()
    data = tmp_path / "cloud"
    result = cloud("devices", "add", "--data", str(data), DEVICE, "--credential-out", str(out))
    assert result.returncode == 0, result.stderr
    assert f"written to {out / (DEVICE + '.json')}" in result.stdout
    assert json.loads((out / f"{DEVICE}.json").read_text())["principal"] == DEVICE
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cloud", "creds"]  # nothing beside


def test_a_bad_command_line_is_one_line_64():
    """argparse's own: the usage, the error and exit 2."""
    one_line(agent("run"), exits.EX_USAGE, "--config", "edge-agent run --help")
    one_line(cloud("export", "--data", "x"), exits.EX_USAGE, "--device")


@pytest.mark.parametrize(
    "answer", [b"[1, 2]", b'{"uptime_s": "x", "sensors": 5}', b"\xff\xfe", b"[" * 5000]
)
def test_status_from_a_socket_that_is_not_the_agents_is_one_line_69(tmp_path: Path, answer):
    """Was a traceback (AttributeError in format_status, exit 1) for JSON that is not the
    agent's status document."""
    import threading

    path = tmp_path / "status.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(1)

    def answer_once() -> None:
        conn, _ = server.accept()
        with conn:
            conn.sendall(answer)

    t = threading.Thread(target=answer_once, daemon=True)
    t.start()
    try:
        result = agent("status", "--socket", str(path))
    finally:
        t.join(10)
        server.close()
    one_line(result, exits.EX_UNAVAILABLE, str(path), "no status answer")
