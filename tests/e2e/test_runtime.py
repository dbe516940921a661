"""The agent process as systemd and an operator see it.

- notify: a datagram socket in NOTIFY_SOCKET with WATCHDOG_USEC set plays systemd's side; it sees
  READY=1, then periodic WATCHDOG=1, and the pings stop when a stage is made to hang;
- status: `edge-agent status` against a running agent shows every field;
- metrics: the textfile parses as Prometheus text exposition format;
- SIGTERM during heavy ingest exits 0 within the unit's TimeoutStopSec, with nothing lost.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest

from agent.sense.simrig import SimRig
from agent.service import config as configmod
from agent.service import runtime as runtime_mod
from agent.service.config import example_config
from agent.service.notify import Notifier
from agent.service.runtime import Agent
from agent.store.queue import Store
from agent.wire.records import TelemetryBody
from drivers.clock import RealClock

TIMEOUT_STOP_SEC = 20.0  # systemd/edge-agent.service


def sim_config(tmp_path: Path, **metrics) -> configmod.Config:
    cfg = configmod.simulated(
        configmod.load(example_config()), configmod.SimulationConfig(source="pump", seed=5)
    )
    cfg = configmod.replace_data_dir(cfg, tmp_path)
    if metrics:
        cfg = replace(cfg, metrics=replace(cfg.metrics, **metrics))
    return cfg


class FakeSystemd:
    """systemd's end of sd_notify: a bound AF_UNIX datagram socket read by a thread."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.1)
        self.messages: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            now = time.monotonic()
            for field in data.decode().split("\n"):
                self.messages.append((now, field))

    def close(self) -> list[tuple[float, str]]:
        self._stop.set()
        self._thread.join(2)
        self.sock.close()
        return self.messages


def test_notify_ready_then_watchdog_pings_and_they_stop_when_a_stage_hangs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    systemd = FakeSystemd(tmp_path / "notify.sock")
    monkeypatch.setenv("NOTIFY_SOCKET", str(systemd.path))
    monkeypatch.setenv("WATCHDOG_USEC", "400000")  # pings every 0.2 s
    monkeypatch.setattr(runtime_mod, "STUCK_AFTER", 1.0)
    cfg = sim_config(tmp_path)
    # each reading committed as it comes: the hung put starts when the hang does (a commit
    # window would start it up to a window later and move the phases below)
    cfg = replace(cfg, store=replace(cfg.store, commit_window=0.0))
    hang = asyncio.Event()

    async def main() -> None:
        clock = RealClock()
        rig = SimRig(cfg, clock)
        agent = Agent(cfg, clock=clock, rig=rig, notifier=Notifier())

        async def script() -> None:
            await asyncio.sleep(3.0)
            # make the store writer hang: its next put never returns
            real_put = agent.store.put

            async def stuck_put(records):
                await hang.wait()
                return await real_put(records)

            agent.store.put = stuck_put
            await asyncio.sleep(3.5)
            hang.set()  # let it go again, so the agent can stop cleanly
            await asyncio.sleep(1.0)
            agent.request_stop()

        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(agent.run(install_signals=False))
                tg.create_task(script())
        finally:
            rig.close()

    started = time.monotonic()
    asyncio.run(main())
    msgs = systemd.close()
    fields = [f for _, f in msgs]
    assert "READY=1" in fields
    ready_at = next(t for t, f in msgs if f == "READY=1")
    pings = [t - started for t, f in msgs if f == "WATCHDOG=1"]
    assert all(t >= ready_at - started - 0.01 for t in pings)
    # healthy phase: pings about every 0.2 s from ready until the hang (3 s) + 1 s to notice
    healthy = [t for t in pings if t < 3.0]
    assert len(healthy) >= 5
    # hung phase: from hang + STUCK_AFTER (+ a ping period) until released, no ping at all
    assert not [t for t in pings if 4.4 < t < 6.4], pings
    assert any("stuck: store-writer" in f for f in fields)
    # recovered after release: pings resume
    assert [t for t in pings if t > 6.6]
    assert "STOPPING=1" in fields


def test_status_shows_every_field_of_a_running_agent(tmp_path: Path):
    cfg = sim_config(tmp_path)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("RUNTIME_DIRECTORY", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "agent.service.cli", "demo", "--data-dir", str(tmp_path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    sock = tmp_path / "status.sock"
    try:
        deadline = time.monotonic() + 60
        doc = None
        while time.monotonic() < deadline:
            if sock.exists():
                out = subprocess.run(
                    [
                        sys.executable,
                        "-m",
                        "agent.service.cli",
                        "status",
                        "--socket",
                        str(sock),
                        "--json",
                    ],
                    capture_output=True,
                    text=True,
                    timeout=30,
                )
                if out.returncode == 0:
                    doc = json.loads(out.stdout)
                    if doc["ready"] and doc["queue"].get("last_seq"):
                        break
            time.sleep(0.3)
        assert doc is not None
        for key in ("device_id", "uptime_s", "sensors", "link", "queue", "models", "last_alert"):
            assert key in doc, key
        assert {s["name"] for s in doc["sensors"]} == {s.name for s in cfg.sensors}
        assert all(s["state"] == "ok" for s in doc["sensors"])
        # readings went through the queue (committed); how many wait in it at one look depends
        # on when the demo's endpoint on loopback last acknowledged them: often none
        assert doc["queue"]["last_seq"] > 0 and doc["queue"]["depth"]["telemetry"] >= 0
        text = subprocess.run(
            [sys.executable, "-m", "agent.service.cli", "status", "--socket", str(sock)],
            capture_output=True,
            text=True,
            timeout=30,
        ).stdout
        for heading in ("device", "link", "queue", "models", "alert", "sensors", "uptime"):
            assert re.search(rf"\b{heading}\b", text), (heading, text)
    finally:
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=30)
    assert proc.returncode == 0
    gone = subprocess.run(
        [sys.executable, "-m", "agent.service.cli", "status", "--socket", str(sock)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert gone.returncode == 69 and "no agent is running" in gone.stderr


_SAMPLE = re.compile(
    r"^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(?P<labels>[^}]*)\})? (?P<value>\S+)$"
)
_LABEL = re.compile(r'^([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"$')


def parse_prometheus(text: str) -> dict[str, dict]:
    """A strict parser of the text exposition format (version 0.0.4)."""
    families: dict[str, dict] = {}
    assert text.endswith("\n")
    current = None
    for line in text.splitlines():
        if line.startswith("# HELP "):
            name, _, help_text = line[7:].partition(" ")
            current = families.setdefault(name, {"help": help_text, "type": None, "samples": []})
        elif line.startswith("# TYPE "):
            name, _, kind = line[7:].partition(" ")
            assert kind in ("counter", "gauge", "histogram", "summary", "untyped"), line
            assert name == current_name(current, families), line
            families[name]["type"] = kind
        else:
            m = _SAMPLE.match(line)
            assert m, f"not a sample line: {line!r}"
            labels = {}
            if m.group("labels"):
                for part in re.findall(
                    r'[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\]|\\.)*"', m.group("labels")
                ):
                    lm = _LABEL.match(part)
                    assert lm, part
                    labels[lm.group(1)] = lm.group(2)
            value = float(m.group("value").replace("+Inf", "inf"))
            base = re.sub(r"_(bucket|sum|count)$", "", m.group("name"))
            family = families.get(m.group("name")) or families.get(base)
            assert family is not None, f"sample before its HELP/TYPE: {line}"
            family["samples"].append((m.group("name"), labels, value))
    return families


def current_name(current, families):
    for name, fam in families.items():
        if fam is current:
            return name
    return None


def test_metrics_textfile_parses_and_carries_the_agent_metrics(tmp_path: Path):
    prom = tmp_path / "metrics" / "edge_agent.prom"
    cfg = sim_config(tmp_path, textfile=prom, interval=0.5)

    async def main() -> None:
        clock = RealClock()
        rig = SimRig(cfg, clock)
        agent = Agent(cfg, clock=clock, rig=rig)
        asyncio.get_running_loop().call_later(3.0, agent.request_stop)
        try:
            await agent.run(install_signals=False)
        finally:
            rig.close()

    asyncio.run(main())
    families = parse_prometheus(prom.read_text())
    for name in (
        "edge_agent_readings_total",
        "edge_agent_sensor_errors_total",
        "edge_agent_queue_depth",
        "edge_agent_queue_bytes",
        "edge_agent_queue_evicted_total",
        "edge_agent_uptime_seconds",
    ):
        assert name in families, name
        assert families[name]["type"] in ("counter", "gauge")
    readings = {s[1]["sensor"]: s[2] for s in families["edge_agent_readings_total"]["samples"]}
    assert set(readings) == {s.name for s in cfg.sensors}
    assert all(v >= 1 for v in readings.values())
    assert oct(prom.stat().st_mode & 0o777) == "0o644"
    assert not list(prom.parent.glob(".edge_agent.prom.*"))  # no temp file left behind


@pytest.mark.timeout(180)
def test_sigterm_during_heavy_ingest_exits_0_in_time_with_nothing_lost(tmp_path: Path):
    """Every sensor every 50 ms, SIGTERM after a few seconds: every reading taken is in the
    store after the exit, and the exit is clean and well inside TimeoutStopSec."""
    cfg_text = example_config().read_text().replace("interval = 1.0", "interval = 0.05")
    cfg_text = cfg_text.replace("interval = 10.0", "interval = 0.05")
    cfg_text = cfg_text.replace('data_dir = "/var/lib/edge-agent"', f'data_dir = "{tmp_path}"')
    cfg_text = cfg_text.replace("window = 256", "window = 32")
    cfg_path = tmp_path / "agent.toml"
    cfg_path.write_text(cfg_text)
    cmd = [sys.executable, "-m", "agent.service.cli", "run", "--config", str(cfg_path)]
    proc = subprocess.Popen(
        [*cmd, "--simulate", "pump", "--log-level", "info"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    time.sleep(6.0)
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    took = time.monotonic() - sent
    assert proc.returncode == 0, err
    assert took < TIMEOUT_STOP_SEC, took
    m = re.search(r"event=stop readings=(\d+) committed=(\d+)", err)
    assert m, err
    taken, committed = int(m.group(1)), int(m.group(2))
    assert taken > 200 and committed == taken

    async def count() -> int:
        cfg = configmod.load(cfg_path)
        async with await Store.open(cfg.store) as store:
            n = 0
            while batch := await store.batch(5000, 64 << 20):
                for r in batch:
                    TelemetryBody.from_cbor(r.payload)
                n += len(batch)
                await store.ack([r.seq for r in batch])
            return n

    assert asyncio.run(count()) == taken
