"""A device's release root, an endpoint with releases, and edge-agent.service run the way systemd
runs it: the harness of tests/e2e/test_ota.py and ``./tools/dev bench ota`` (docs/ota.md).

systemd is not running here, so :class:`Service` runs edge-agent.service from the unit files
themselves: the drop-in's ExecStartPre (the boot counter, with the system's python3), the unit's
ExecStart (``venv/bin/edge-agent``), READY=1 on a notify socket within a start timeout
(Type=notify, TimeoutStartSec), and another start after a failure (Restart=on-failure, without
its RestartSec). The root helper is edge-agent-update.service's ExecStart, run as a process.
Paths under /opt/edge-agent, /var/lib/edge-agent and /etc/edge-agent are mapped into a working
directory; nothing else in the commands is changed.

Test releases (:func:`build_wheels`): a bundle holds this checkout's wheel (``pip wheel
--no-deps``, built once) and pip's wheel (ensurepip's); a new venv sees the dependencies of the
running venv through a ``.pth`` (:func:`deps_site`: a directory of links to them, without the
agent itself), so an install is ``python -m venv --without-pip`` plus the bundle's pip
installing the agent wheel offline, the same commands as on a device, in seconds rather than the
minutes numpy and LiteRT take. A release that crashes at start, one that never sends READY=1 and
one that sends it and then never syncs are the agent's wheel with its ``edge-agent`` console
script made to do that.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import ensurepip
import hashlib
import io
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import zipfile
from pathlib import Path
from typing import Any

from flash_lib.bundle import _source_files

from agent.modelstore.signing import load_public_key
from agent.ota import bootcheck as bc
from agent.ota.release import ReleaseManifest
from agent.ota.updater import ReleaseFetcher, apply_staged, stage
from agent.service.config import example_config
from agent.sync.transport import CoapTransport
from cloud.cli import main as cloud_main
from cloud.releases import MANIFEST_FILE
from cloud.server import CloudServer
from drivers.clock import RealClock

ROOT = Path(__file__).resolve().parents[1]
SYSTEMD = ROOT / "systemd"
DEVICE = "pump-rig-01"
FAST = {"ack_timeout": 0.2, "block_deadline": 4.0, "manifest_deadline": 8.0}
READY_WINDOW = 120.0  # TimeoutStartSec for a release that works (imports, models, sensors)


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(PYTHONUNBUFFERED="1", **extra)
    return env


# -- test releases ----------------------------------------------------------------------------


def broken_wheel(agent: Path, out: Path, tag: str, body: str) -> Path:
    """The agent's wheel with its ``edge-agent`` script running ``body`` instead: a release
    whose package is whole (the pre-switch data check runs) but whose agent fails at start."""
    with zipfile.ZipFile(agent) as z:
        files = {name: z.read(name) for name in z.namelist()}
    dist = next(n.split("/")[0] for n in files if n.endswith(".dist-info/RECORD"))
    entry = f"{dist}/entry_points.txt"
    files[entry] = files[entry].replace(
        b"edge-agent = agent.service.cli:main", f"edge-agent = broken_{tag}:main".encode()
    )
    files[f"broken_{tag}.py"] = f"def main():\n{body}\n".encode()
    record = []
    for name, data in files.items():
        if name != f"{dist}/RECORD":
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=")
            record.append(f"{name},sha256={digest.decode()},{len(data)}")
    files[f"{dist}/RECORD"] = ("\n".join([*record, f"{dist}/RECORD,,"]) + "\n").encode()
    out.mkdir(parents=True, exist_ok=True)
    path = out / agent.name
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in files.items():
            z.writestr(name, data)
    return path


def build_wheels(work: Path) -> dict[str, Path]:
    """This checkout's wheel, pip's, and the three broken releases' wheels, in ``work``."""
    src = work / "src"
    for rel in _source_files(ROOT):
        dest = src / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, dest)
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(work / "agent"), src],
        capture_output=True,
        text=True,
        timeout=300,
        env=clean_env(),
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"pip wheel failed: {proc.stderr}")
    (agent,) = (work / "agent").glob("edge_agent-*.whl")
    (pip,) = (Path(ensurepip.__file__).parent / "_bundled").glob("pip-*.whl")
    crash = broken_wheel(agent, work / "crash", "crash", "    raise RuntimeError('broken release')")
    hang = broken_wheel(
        agent, work / "hang", "hang", "    import time\n    while True:\n        time.sleep(1)"
    )
    # READY=1 at once, then nothing: no sensor read, no sync exchange, never confirmed
    silent = broken_wheel(
        agent,
        work / "silent",
        "silent",
        "    import os, socket, time\n"
        "    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)\n"
        "    s.sendto(b'READY=1', os.environ['NOTIFY_SOCKET'])\n"
        "    while True:\n        time.sleep(1)",
    )
    return {"agent": agent, "pip": pip, "crash": crash, "hang": hang, "silent": silent}


def deps_site(out: Path) -> Path:
    """The running venv's site-packages without the agent: links to every other entry."""
    out.mkdir(parents=True, exist_ok=True)
    purelib = Path(sysconfig.get_paths()["purelib"])
    for entry in purelib.iterdir():
        name = entry.name
        if name.startswith(("edge_agent", "__editable__", "_virtualenv")) or name.endswith(".pth"):
            continue
        (out / name).symlink_to(entry)
    return out


def make_bundle(out: Path, project: Path, pip: Path) -> Path:
    out.mkdir(parents=True)
    files = {}
    for wheel in (project, pip):
        shutil.copy(wheel, out / wheel.name)
        files[wheel.name] = hashlib.sha256(wheel.read_bytes()).hexdigest()
    meta = {"arch": "x86_64", "python": "3.11", "project": project.name, "pip": pip.name}
    (out / "bundle.json").write_text(json.dumps({**meta, "files": files}))
    return out


def _quiet(argv: list[str]) -> int:
    """``edge-agent-cloud ARGV`` in this process, its report kept off this process's stdout
    (the bench's table and JSON line are what its stdout carries)."""
    with contextlib.redirect_stdout(io.StringIO()):
        return cloud_main(argv)


class World:
    """The endpoint with its release key, the device's root and data directory, the config."""

    def __init__(self, tmp: Path, server: CloudServer, wheels: dict[str, Path], deps: Path):
        self.tmp, self.server, self.wheels, self.deps = tmp, server, wheels, deps
        self.cloud = tmp / "cloud"
        self.root = tmp / "opt"
        self.data = tmp / "data"
        self.etc = tmp / "etc"
        self.root.mkdir()
        self.etc.mkdir()
        shutil.copy(bc.__file__, self.root / "ota-bootcheck.py")  # what tools/flash installs
        assert _quiet(["releases", "keygen", "--data", str(self.cloud)]) == 0
        self.pub = self.cloud / "releases" / "release.key.pub"
        shutil.copy(self.pub, self.etc / "release.pub")
        self.key = load_public_key(self.pub)

    def publish(self, version: str, wheel: str) -> str:
        bundle = make_bundle(self.tmp / f"bundle-{version}", self.wheels[wheel], self.wheels["pip"])
        args = ["releases", "publish", str(bundle), "--data", str(self.cloud), "--version", version]
        assert _quiet(args) == 0
        m = ReleaseManifest.from_cbor(
            (self.cloud / "releases" / version / MANIFEST_FILE).read_bytes()
        )
        return m.sha256

    def fetcher(self) -> ReleaseFetcher:
        transport = CoapTransport(RealClock(), lanes=2)
        return ReleaseFetcher(transport, f"coap://127.0.0.1:{self.server.port}", **FAST)

    async def stage(self, version: str, sha: str | None = None, **limits: int) -> Any:
        fetcher = self.fetcher()
        try:
            return await stage(
                fetcher, version=version, sha256=sha, key=self.key, data_dir=self.data, **limits
            )
        finally:
            await fetcher.close()

    async def install_initial(self, version: str = "1.0") -> None:
        """The device as an earlier update left it: ``version`` current and confirmed."""
        self.publish(version, "agent")
        await self.stage(version)
        applied = await asyncio.to_thread(
            apply_staged, self.root, self.data, self.key, site=[self.deps]
        )
        assert applied == version
        assert bc.confirm(self.root, version)

    def config(self, credential: Path) -> Path:
        text = example_config().read_text()
        text = text.replace('data_dir = "/var/lib/edge-agent"', f'data_dir = "{self.data}"')
        text = re.sub(
            r"endpoints = \[.*\]", f'endpoints = ["coap://127.0.0.1:{self.server.port}"]', text
        )
        text = text.replace('credential = "pump-rig-01.json"', f'credential = "{credential}"')
        text += f'\n[update]\nroot = "{self.root}"\npublic_key = "{self.etc / "release.pub"}"\n'
        text += "max_attempts = 2\nhealth_window_s = 120\n"  # the root helper must take these
        path = self.etc / "agent.toml"
        path.write_text(text)
        return path


def unit_command(path: Path, key: str, world: World, config: Path | None = None) -> list[str]:
    """The unit's command line with the device's paths mapped into the test's directory."""
    line = next(x for x in path.read_text().splitlines() if x.startswith(f"{key}="))
    argv = shlex.split(line.partition("=")[2].lstrip("-+@!:"))
    mapped = {
        "/etc/edge-agent/agent.toml": str(config or "/nonexistent"),
        "/etc/edge-agent/release.pub": str(world.etc / "release.pub"),
        "/opt/edge-agent": str(world.root),
        "/var/lib/edge-agent": str(world.data),
    }
    # one pass: a mapped path may itself lie under /var/lib/edge-agent (a bench's directory)
    device_path = re.compile("|".join(re.escape(k) for k in mapped))
    return [device_path.sub(lambda m: mapped[m.group(0)], arg) for arg in argv]


class Service:
    """edge-agent.service as systemd runs it (module docstring)."""

    def __init__(self, world: World, config: Path) -> None:
        self.world = world
        self.pre = unit_command(
            SYSTEMD / "edge-agent.service.d" / "ota.conf", "ExecStartPre", world
        )
        self.start_cmd = unit_command(SYSTEMD / "edge-agent.service", "ExecStart", world, config)
        self.start_cmd += ["--simulate", "pump", "--log-level", "debug"]
        self.proc: asyncio.subprocess.Process | None = None
        self.logs: list[Path] = []
        # the notify socket's path must fit sockaddr_un (108 bytes): beside the work if it does
        short = len(str(world.tmp)) < 80
        self.sockdir = Path(tempfile.mkdtemp(prefix="ota-", dir=world.tmp if short else "/tmp"))

    async def _start_once(self, bad_window: float) -> str:
        """ExecStartPre, then ExecStart until READY=1: "VERSION:ready|exited|timeout". The
        start timeout is ``bad_window`` while the release that starts is pending."""
        pre = await asyncio.create_subprocess_exec(*self.pre, cwd=self.world.tmp, env=clean_env())
        assert await pre.wait() == 0
        running = bc.link_version(self.world.root, bc.CURRENT)
        pending = bc.load(self.world.root).get("pending") == running
        return f"{running}:{await self._exec(bad_window if pending else READY_WINDOW)}"

    async def _exec(self, window: float) -> str:
        sock_path = self.sockdir / "notify"
        sock_path.unlink(missing_ok=True)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(str(sock_path))
        sock.setblocking(False)
        log = self.world.tmp / f"agent-{len(self.logs)}.log"
        self.logs.append(log)
        with open(log, "w") as out:  # noqa: ASYNC230 - a local file, opened once
            self.proc = await asyncio.create_subprocess_exec(
                *self.start_cmd,
                cwd=self.world.tmp,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=out,
                env=clean_env(NOTIFY_SOCKET=str(sock_path)),
            )
        loop = asyncio.get_running_loop()
        deadline = loop.time() + window
        try:
            while loop.time() < deadline:
                if self.proc.returncode is not None:
                    return "exited"
                with contextlib.suppress(TimeoutError):
                    data = await asyncio.wait_for(loop.sock_recv(sock, 4096), 0.5)
                    if b"READY=1" in data.split(b"\n"):
                        return "ready"
            self.proc.kill()  # TimeoutStartSec: systemd kills it (SIGKILL after SIGTERM)
            await self.proc.wait()
            return "timeout"
        finally:
            sock.close()

    async def run_until_ready(self, bad_window: float = READY_WINDOW) -> list[str]:
        """Starts (Restart=on-failure) until one sends READY=1: what each start did."""
        outcomes = []
        for _ in range(8):
            outcome = await self._start_once(bad_window)
            outcomes.append(outcome)
            if outcome.endswith(":ready"):
                return outcomes
        raise AssertionError(f"never READY: {outcomes}")

    async def stop(self) -> int:
        assert self.proc is not None
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
        return await asyncio.wait_for(self.proc.wait(), 60)

    async def drain(self, server: CloudServer) -> tuple[set[int], set[int]]:
        """After a stop: every reading committed so far, and what the endpoint stored once a
        last run of the current release has sent its queue (a reading committed just before a
        SIGTERM waits in the durable queue, it is not lost)."""
        committed = self.committed()
        await self.run_until_ready()

        async def arrived() -> bool:
            return committed <= set(await server.seqs(DEVICE))

        with contextlib.suppress(TimeoutError):
            await until(arrived, 120, "")
        await self.stop()
        return committed, set(await server.seqs(DEVICE))

    def committed(self, run: int | None = None) -> set[int]:
        """Sequence numbers the agent logged as committed (in one run, or in all)."""
        found: set[int] = set()
        for log in self.logs if run is None else [self.logs[run]]:
            for m in re.finditer(r"event=committed kind=\w+ seqs=([\d,\-]+)", log.read_text()):
                for part in m.group(1).split(","):
                    a, _, b = part.partition("-")
                    found.update(range(int(a), int(b or a) + 1))
        return found


async def until(check: Any, seconds: float, what: str) -> Any:
    async with asyncio.timeout(seconds):
        while True:
            value = await check()
            if value:
                return value
            await asyncio.sleep(0.5)
    raise AssertionError(what)


def lost(committed: set[int], stored: set[int]) -> int:
    """Readings committed by the agents that the endpoint does not have, gaps included."""
    if not committed:
        return 0
    return len(set(range(min(committed), max(committed) + 1)) - stored)
