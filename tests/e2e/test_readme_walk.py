"""README's "From the demo to your rig" runs as written (issue 14).

The commands are read from the section's fenced block, so the README cannot drift from what
works: each runs in a temporary directory with bash, in order, and its output is checked. What
the test does for the reader: ``. .venv/bin/activate`` puts the checkout's .venv/bin on PATH;
``cd`` changes the directory of the next commands; a command ending in ``&`` runs in the
background as job 1, 2, ... and ``kill %N`` stops that job; a command that reads what a background
job serves (status, export) is repeated for a few seconds until it answers, as a reader would. The
one liberty: port 5683 becomes a free port, in the commands and in the copied config, so that
parallel runs do not collide.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tools.ports import free_port

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
SECTION = "## From the demo to your rig"
PORT = "5683"
BIN = ROOT / ".venv" / "bin"


def readme_commands() -> list[str]:
    text = README.read_text(encoding="utf-8")
    assert SECTION in text, f"README.md has no {SECTION!r} section"
    block = re.search(r"```sh\n(.*?)```", text.split(SECTION, 1)[1], re.S)
    assert block is not None, "no ```sh block in the section"
    return [c for c in (strip_comment(line) for line in block.group(1).splitlines()) if c]


def strip_comment(line: str) -> str:
    """The line without its ``# comment`` (a ``#`` after a blank, outside quotes)."""
    quote = ""
    for i, ch in enumerate(line):
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].strip()
    return line.strip()


class Walk:
    def __init__(self, tmp: Path) -> None:
        self.cwd = tmp
        self.tmp = tmp
        self.port = str(free_port())
        self.env = {**os.environ, "TMPDIR": str(tmp), "PYTHONUNBUFFERED": "1"}
        self.env.pop("VIRTUAL_ENV", None)
        self.jobs: list[subprocess.Popen[str]] = []
        self.logs: list[Path] = []

    def run(self, command: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["bash", "-c", command],
            cwd=self.cwd,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def until_ok(self, command: str, ok, within: float = 30.0) -> subprocess.CompletedProcess[str]:
        deadline = time.monotonic() + within
        while True:
            result = self.run(command)
            if ok(result) or time.monotonic() > deadline:
                return result
            time.sleep(0.5)

    def background(self, command: str) -> subprocess.Popen[str]:
        log = self.tmp / f"job{len(self.jobs) + 1}.log"
        self.logs.append(log)
        with open(log, "w") as out:
            job = subprocess.Popen(
                ["bash", "-c", f"exec {command}"],
                cwd=self.cwd,
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                text=True,
            )
        self.jobs.append(job)
        return job

    def log(self, n: int) -> str:
        return self.logs[n - 1].read_text()

    def stop_all(self) -> None:
        for job in self.jobs:
            if job.poll() is None:
                job.kill()
                job.wait(10)


@pytest.mark.timeout(150)
def test_from_the_demo_to_your_rig_as_written(tmp_path: Path):
    walk = Walk(tmp_path)
    commands = readme_commands()
    seen: list[str] = []
    try:
        for raw in commands:
            command = raw.replace(PORT, walk.port)
            seen.append(step(walk, command))
    finally:
        walk.stop_all()
    # the walk covers what the README promises, in this order
    assert seen == [
        "activate",
        "demo",
        "cd",
        "example-config",
        "devices add",
        "keygen",
        "check-config",
        "serve",
        "run",
        "status",
        "export",
        "kill",
    ], seen


def step(walk: Walk, command: str) -> str:
    """Run one README command and check its output; returns which step it was."""
    if command.startswith(". ") or command.startswith("source "):
        assert command.split()[1] == ".venv/bin/activate", command
        assert (BIN / "activate").is_file() and (BIN / "edge-agent").is_file()
        walk.env["PATH"] = f"{BIN}{os.pathsep}{walk.env.get('PATH', '')}"
        return "activate"
    if "&&" in command:
        for part in command.split("&&"):
            step(walk, part.strip())
        return "cd"
    if command.startswith("cd "):
        walk.cwd = (walk.cwd / command[3:].strip()).resolve()
        assert walk.cwd.is_dir(), command
        return "cd"
    if command.endswith("&"):
        job = walk.background(command[:-1].strip())
        n = len(walk.jobs)
        if " serve " in command:
            deadline = time.monotonic() + 20
            while "listening on" not in walk.log(n):
                assert job.poll() is None and time.monotonic() < deadline, walk.log(n)
                time.sleep(0.1)
            assert f"coap://127.0.0.1:{walk.port}" in walk.log(n)
            return "serve"
        time.sleep(0.5)
        assert job.poll() is None, walk.log(n)
        return command.split()[1]
    if command.startswith("kill %"):
        for spec in command.split()[1:]:
            job = walk.jobs[int(spec.lstrip("%")) - 1]
            job.send_signal(signal.SIGTERM)
            assert job.wait(30) == 0, walk.log(int(spec.lstrip("%")))
        return "kill"

    if command.startswith("edge-agent demo"):
        result = walk.run(command, timeout=90)
        ok(result, command)
        assert "stopped after" in result.stdout and "removed" in result.stdout, result.stdout
        assert re.search(r"readings/s .* detector commissioning", result.stdout), result.stdout
        assert not list(walk.tmp.glob("edge-demo-*"))  # cleaned up
        return "demo"
    if command.startswith("edge-agent status"):
        vib_ok = re.compile(r"^  vib_motor +ok", re.M)  # its first window takes 0.64 s
        result = walk.until_ok(command, lambda r: r.returncode == 0 and vib_ok.search(r.stdout))
        ok(result, command)
        assert "device    pump-rig-01" in result.stdout, result.stdout
        assert f"endpoint coap://127.0.0.1:{walk.port}" in result.stdout, result.stdout
        assert re.search(r"^  vib_motor +ok", result.stdout, re.M), result.stdout
        return "status"
    if " export " in command:
        result = walk.until_ok(command, lambda r: len(r.stdout.splitlines()) >= 3)
        lines = result.stdout.splitlines()
        assert lines[0] == "seq,kind,time,sensor,channel,value", result.stdout
        assert len(lines) >= 3 and ",telemetry," in lines[1], result.stdout
        assert "Traceback" not in result.stderr and "Broken pipe" not in result.stderr
        return "export"

    result = walk.run(command)
    ok(result, command)
    if "example-config" in command:
        config = walk.cwd / "pump-rig.toml"
        config.write_text(config.read_text().replace(PORT, walk.port))
        assert f"coap://127.0.0.1:{walk.port}" in config.read_text()
        return "example-config"
    if "devices add" in command:
        assert "pump-rig-01: credential (generation 1) written to pump-rig-01.json" in (
            result.stdout
        )
        assert (walk.cwd / "pump-rig-01.json").stat().st_mode & 0o777 == 0o600
        return "devices add"
    if "models keygen" in command:
        assert (walk.cwd / "cloud-data" / "models" / "signing.key.pub").is_file()
        return "keygen"
    if "check-config" in command:
        assert "pump-rig.toml: ok (8 sensors" in result.stdout, result.stdout
        assert "note:" not in result.stdout, result.stdout  # credential and key are there now
        return "check-config"
    if command.startswith("mkdir "):
        return "mkdir"
    return command


def ok(result: subprocess.CompletedProcess[str], command: str) -> None:
    assert result.returncode == 0, f"{command}\n{result.stdout}\n{result.stderr}"
    assert "Traceback" not in result.stderr, result.stderr
