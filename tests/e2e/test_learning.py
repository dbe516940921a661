"""Federated rounds with real processes: the endpoint (``edge-agent-cloud serve``), three agents on
the simulated rig (``edge-agent run``), and the coordinator (``edge-agent-cloud learn start``).

One device is SIGKILLed as the first round opens: that round closes at its deadline with the two
others (its quorum), the device comes back, and the next rounds take all three. Each round's
model is checked by the devices in the next round (a fourth round after the last only checks)
and, having passed, published as a signed int8 version that every device installs; detection
never stops (each agent's detector keeps scoring rows through all rounds).

The job runs with a smaller noise multiplier (:data:`NOISE`) and a wider check tolerance
(:data:`TOLERANCE`) than the defaults: with three devices, the default recipe's noise (0.5, for
fleets of tens) makes a model that the check fails now and then, which
tests/unit/cloud/test_learning_check.py covers; here every round's model must pass.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from agent.modelstore.signing import SignedManifest
from agent.wire.learning import ModelUpdate
from cloud.learnjob import Job
from cloud.storage import SQLiteStorage
from tests.e2e.test_gateway import until as _until
from tools.chaos.harness import agent_config, free_udp_port

pytestmark = pytest.mark.timeout(300)

ROOT = Path(__file__).resolve().parents[2]
DEVICES = ("pump-a", "pump-b", "pump-c")
KILLED = "pump-c"
ROUNDS = 3
DEADLINE = 15  # seconds a round stays open (round 1 waits it out: a device is killed)
NOISE = 0.2  # the job's noise multiplier: epsilon 79 over three rounds, within the budget
TOLERANCE = 0.1  # the job's check tolerance (module docstring)
TIME_SCALE = 5  # the simulated rig runs 5x real time: a row of the detector every 0.2 s


def cloud(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cloud.cli", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=check,
    )


def status(config: Path) -> dict:
    out = subprocess.run(
        [sys.executable, "-m", "agent.service.cli", "status", "--config", str(config), "--json"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )
    return json.loads(out.stdout) if out.returncode == 0 else {}


class Agents:
    def __init__(self, tmp: Path, port: int) -> None:
        self.tmp = tmp
        self.port = port
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def config(self, device: str) -> Path:
        return self.tmp / f"{device}.toml"

    def setup(self, device: str) -> None:
        data = self.tmp / device
        data.mkdir()
        cloud(
            "devices",
            "add",
            "--data",
            str(self.tmp / "cloud-data"),
            "--credential-out",
            str(data / "credential.json"),
            device,
        )
        text = agent_config(device, data, self.port, 1.0)
        text += "\n[learn]\nmin_windows = 32\n"
        self.config(device).write_text(text)

    def start(self, device: str) -> None:
        log = open(self.tmp / f"{device}.log", "ab")  # noqa: SIM115 (closed with the process)
        self.procs[device] = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "agent.service.cli",
                "run",
                "--config",
                str(self.config(device)),
                "--simulate",
                "pump",
                "--time-scale",
                str(TIME_SCALE),
            ],
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
        )

    def kill(self, device: str) -> None:
        p = self.procs.pop(device)
        p.send_signal(signal.SIGKILL)
        p.wait(10)

    def stop_all(self) -> None:
        for p in self.procs.values():
            p.send_signal(signal.SIGTERM)
        for p in self.procs.values():
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()


def _job(tmp: Path) -> Job | None:
    s = SQLiteStorage(tmp / "cloud-data" / "cloud.sqlite3")
    try:
        rows = s.learn_jobs()
        return Job.from_row(rows[-1]) if rows else None
    finally:
        s.close()


def _serve(tmp: Path, port: int) -> subprocess.Popen[bytes]:
    argv = ["serve", "--listen", f"127.0.0.1:{port}", "--data", str(tmp / "cloud-data")]
    return subprocess.Popen(
        [sys.executable, "-m", "cloud.cli", *argv],
        cwd=ROOT,
        stdout=open(tmp / "endpoint.log", "ab"),
        stderr=subprocess.STDOUT,
    )


async def test_three_rounds_with_a_device_killed_mid_round(tmp_path: Path) -> None:
    data = tmp_path / "cloud-data"  # the example config's [models] public_key is beside it
    port = free_udp_port()
    cloud("models", "keygen", "--data", str(data))
    cloud(
        "models",
        "publish",
        str(ROOT / "models" / "skab-ae.tflite"),
        "--data",
        str(data),
        "--name",
        "skab-ae",
        "--version",
        "1.0.0",
    )
    agents = Agents(tmp_path, port)
    for device in DEVICES:
        agents.setup(device)
    endpoint = _serve(tmp_path, port)
    learn: asyncio.subprocess.Process | None = None
    try:
        for device in DEVICES:
            agents.start(device)
        # every agent commissioned and scoring before the job starts
        for device in DEVICES:
            await _until(
                lambda d=device: (
                    (status(agents.config(d)).get("detect") or {}).get("samples", 0) > 100
                ),
                90,
                f"{device} scoring",
            )
        before = {d: status(agents.config(d))["detect"]["samples"] for d in DEVICES}
        learn = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "cloud.cli",
            "learn",
            "start",
            "--data",
            str(data),
            "--model",
            "skab-ae",
            "--rounds",
            str(ROUNDS),
            "--fraction",
            "1",
            "--min-devices",
            "2",
            "--deadline",
            str(DEADLINE),
            "--epochs",
            "2",
            "--noise",
            str(NOISE),
            "--check-tolerance",
            str(TOLERANCE),
            "--tick",
            "0.5",
            cwd=ROOT,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        job = await _until(lambda: (j := _job(tmp_path)) and j.st.open and j, 30, "round 1 open")
        assert set(job.st.selected) == set(DEVICES)
        agents.kill(KILLED)  # mid-round: selected, never uploads this round
        job = await _until(
            lambda: (j := _job(tmp_path)) and len(j.st.history) >= 1 and j,
            DEADLINE + 40,
            "round 1 closed",
        )
        first = job.st.history[0]
        assert first["uploads"] == 2 and first["missing"] == [KILLED], first
        agents.start(KILLED)  # back: the next rounds take it again
        out, _ = await asyncio.wait_for(learn.communicate(), 3 * DEADLINE + 120)
        text = out.decode()
        assert learn.returncode == 0, text
        job = _job(tmp_path)
        assert job is not None and job.st.state == "done", text
        history = job.st.history
        assert [h["round"] for h in history] == [1, 2, 3, 4], text  # 4: only the check
        assert [h.get("check", {}).get("passed") for h in history] == [None, True, True, True]
        assert [h.get("version") for h in history] == [None, *(f"1.0.0+fl1.{r}" for r in (1, 2, 3))]
        final = job.st.version
        assert final == "1.0.0+fl1.3", text
        # the new model reaches every device, which reports it active
        s = SQLiteStorage(data / "cloud.sqlite3")
        took_part: set[str] = set()
        try:
            for rnd in (1, 2, 3, 4):
                for device, body in s.learn_updates(job.id, rnd):
                    u = ModelUpdate.from_cbor(body, 2404)  # only what the format can carry
                    assert (u.job, u.round) == (job.id, rnd) and u.samples >= 16, device
                    # weights in the training rounds, none in the check; a check after round 1
                    assert (u.delta is None) == (rnd == 4) and (u.recall is None) == (rnd == 1)
                    took_part.add(device)
        finally:
            s.close()
        assert took_part == set(DEVICES)  # the killed device too, in a later round

        def installed() -> bool:
            s = SQLiteStorage(data / "cloud.sqlite3")
            try:
                published = s.model("skab-ae", final)
                assert published is not None
                sha = SignedManifest.from_cbor(published.manifest).sha256
                for device in DEVICES:
                    entry = s.reported(device).get("model/anomaly")
                    value = {} if entry is None else entry.value
                    if value.get("status") != "active" or value.get("sha256") != sha:
                        return False
                return True
            finally:
                s.close()

        await _until(installed, 60, "the final model active on every device")
        for device in DEVICES:
            st = status(agents.config(device))
            # detection went on (the restarted device's counter started again at its restart)
            assert st["detect"]["samples"] > (0 if device == KILLED else before[device])
            # its last round: uploaded, or it ran late (training yields to sampling and
            # detection): expired at its deadline on the device, or refused by the endpoint
            # because the round had closed there first
            last = st["learn"]["models"]["skab-ae"]
            assert last["status"] in ("uploaded", "expired") or (
                last["status"] == "refused" and "is not open" in last.get("error", "")
            ), last
        for device in ("pump-a", "pump-b"):  # alive throughout: scored every row since
            assert status(agents.config(device))["detect"]["samples"] > before[device] + 100
    finally:
        if learn is not None and learn.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                learn.kill()
            await learn.wait()
        agents.stop_all()
        endpoint.send_signal(signal.SIGTERM)
        try:
            endpoint.wait(20)
        except subprocess.TimeoutExpired:
            endpoint.kill()
