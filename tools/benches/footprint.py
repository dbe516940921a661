"""Bench of the device's footprint: the real agent process on the simulated reference rig.

One run starts a local endpoint (``edge-agent-cloud serve``, its own process) and the agent as
systemd would run it (``edge-agent run`` with ``NOTIFY_SOCKET`` set, the packaged reference rig
with every sensor simulated, the detector and its models, and an [uplink] to the endpoint over
OSCORE with the device's credential, as it runs by default), for
``--seconds`` of rig time (120 by default) at ``--time-scale`` (4 by default). Measured:

- ``ready_s``: process start to the ``READY=1`` datagram on the notify socket;
- ``rss_mb``: peak resident memory of the agent (``VmHWM``), everything loaded; beside it the
  limit (60 MB) and the figure the issue compares with (Greengrass stream manager, >= 70 MB);
- ``cpu_percent``: CPU time of the agent after READY, per second of rig time, in percent of one
  core (so the figure is for the reference rig's rates whatever the time scale);
- ``import_ms``: wall time of ``edge-agent --version`` (median of 5), beside the bare interpreter
  start (``python -c pass``) measured in the same run;
- ``records_acked``: what the endpoint stored meanwhile (proves the uplink ran);
- ``rss_dependencies_mb``: the floor under ``rss_mb`` that no code of ours sets: a fresh
  interpreter that imports only the fixed dependencies the running agent imports (numpy,
  cryptography's AEAD, asyncio, aiocoap with OSCORE, cbor2, pyserial, minimalmodbus, the TFLite
  runtime) and loads the three shipped models into interpreters as the agent does, with the RSS
  after each step (``rss_steps_mb``); ``rss_own_mb`` is ``rss_mb`` less that floor.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ports import free_port

from agent.service.config import example_config, strip_tables
from benches import Result, workdir
from cloud.storage import DB_NAME

MEASURES = (
    "the agent process as systemd runs it on the simulated rig: start to READY, peak RSS, CPU %"
    " of one core, import time"
)
BASELINE = (
    "the bare interpreter's start (measured); the 60 MB target and Greengrass stream manager's "
    ">= 70 MB (cited)"
)

ROOT = Path(__file__).resolve().parents[2]
DEVICE = "pump-rig-01"
RSS_LIMIT_MB = 60.0
GREENGRASS_MB = 70.0


def _free_udp_port() -> int:
    return free_port()


def _script(name: str) -> str:
    found = shutil.which(name, path=str(Path(sys.executable).parent))
    if found is None:
        raise SystemExit(f"bench footprint: {name} is not installed beside {sys.executable}")
    return found


def _status(pid: int) -> dict[str, int]:
    out: dict[str, int] = {}
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmHWM", "VmRSS"):
                out[key] = int(value.split()[0])  # kB
    return out


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
        fields = f.read().rpartition(")")[2].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks  # utime + stime


# The dependency floor (module docstring): each step imports or loads one more thing, in the
# order the agent's start does, and prints the RSS after it (MB).
FLOOR_SCRIPT = r"""
import json, sys
from pathlib import Path

def rss():
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024

steps = {"interpreter": rss()}
import numpy
steps["numpy"] = rss()
import cryptography.hazmat.primitives.ciphers.aead
steps["cryptography"] = rss()
import asyncio
steps["asyncio"] = rss()
import aiocoap, aiocoap.oscore, cbor2
steps["aiocoap_oscore_cbor2"] = rss()
import serial, minimalmodbus
steps["pyserial_minimalmodbus"] = rss()
from ai_edge_litert.interpreter import Interpreter, OpResolverType
steps["litert"] = rss()
keep = []
for model in sys.argv[1:]:
    interp = Interpreter(
        model_content=Path(model).read_bytes(),
        num_threads=1,
        experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES,
    )
    interp.allocate_tensors()
    keep.append(interp)
steps["models"] = rss()
print(json.dumps(steps))
"""


def _dependency_floor() -> dict[str, float]:
    """RSS (MB) after each step of :data:`FLOOR_SCRIPT`, in a fresh interpreter."""
    models = sorted(str(p) for p in (ROOT / "models").glob("*.tflite"))
    out = subprocess.run(
        [sys.executable, "-c", FLOOR_SCRIPT, *models], check=True, capture_output=True, text=True
    ).stdout
    return {k: round(v, 1) for k, v in json.loads(out.splitlines()[-1]).items()}


def _median_ms(cmd: list[str], runs: int = 5) -> float:
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True)
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def _stored(db: Path) -> int:
    if not db.exists():
        return 0
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as conn:
        return int(conn.execute("SELECT count(*) FROM records").fetchone()[0])


@dataclass
class RigAgent:
    """An agent process on the simulated reference rig, READY, with its endpoint."""

    proc: subprocess.Popen[bytes]
    cloud_dir: Path
    ready_s: float  # process start to READY=1
    t_ready: float  # perf_counter at READY=1
    cpu_at_ready: float


@contextlib.contextmanager
def rig_agent(tmp_path: Path, time_scale: float, extra_toml: str = "") -> Iterator[RigAgent]:
    """A local endpoint (``edge-agent-cloud serve``) and the agent as systemd runs it
    (``edge-agent run`` with ``NOTIFY_SOCKET``, the packaged reference rig simulated, its models,
    an OSCORE uplink to the endpoint), started and READY; ``extra_toml`` is appended to its
    config. Both are stopped on exit (SIGTERM, as systemd stops it)."""
    agent_cmd, cloud_cmd = _script("edge-agent"), _script("edge-agent-cloud")
    cloud_dir = tmp_path / "cloud"
    credential = tmp_path / "credential.json"
    subprocess.run(
        [cloud_cmd, "devices", "add", "--data", str(cloud_dir), DEVICE,
         "--credential-out", str(credential)],
        check=True,
        capture_output=True,
    )  # fmt: skip
    port = _free_udp_port()
    server = subprocess.Popen(
        [cloud_cmd, "serve", "--listen", f"127.0.0.1:{port}", "--data", str(cloud_dir)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    text = strip_tables(example_config().read_text(), "uplink")
    text = text.replace('data_dir = "/var/lib/edge-agent"', f'data_dir = "{tmp_path / "agent"}"')
    text += f'\n[uplink]\nendpoints = ["coap://127.0.0.1:{port}"]\ncredential = "{credential}"\n'
    config = tmp_path / "agent.toml"
    config.write_text(text + extra_toml)
    # the notify socket in a short directory of its own: a long --dir overflows sun_path
    sock_dir = tempfile.mkdtemp(prefix="ea-notify-")
    notify_path = os.path.join(sock_dir, "notify.sock")
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(notify_path)
    notify.settimeout(0.2)
    env = {**os.environ, "NOTIFY_SOCKET": notify_path}
    cmd = [agent_cmd, "run", "--config", str(config), "--simulate", "pump"]
    cmd += ["--time-scale", str(time_scale), "--log-level", "warning"]
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = started + 120
        while time.perf_counter() < deadline and proc.poll() is None:
            try:
                msg = notify.recv(4096).decode(errors="replace")
            except TimeoutError:
                continue
            if "READY=1" in msg.split("\n"):
                t_ready = time.perf_counter()
                yield RigAgent(proc, cloud_dir, t_ready - started, t_ready, _cpu_seconds(proc.pid))
                break
        else:
            err = proc.stderr.read().decode(errors="replace") if proc.poll() is not None else ""
            raise SystemExit(f"bench: the agent never sent READY=1\n{err[-2000:]}")
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
        notify.close()
        shutil.rmtree(sock_dir, ignore_errors=True)
        server.terminate()
        server.wait(10)


def exited_early(proc: subprocess.Popen[bytes]) -> SystemExit:
    assert proc.stderr is not None
    err = proc.stderr.read().decode(errors="replace")
    return SystemExit(f"bench: the agent exited early\n{err[-2000:]}")


def run(args: argparse.Namespace) -> Result:
    parser = argparse.ArgumentParser(prog="bench footprint")
    parser.add_argument("--dir", help=argparse.SUPPRESS)  # bench.py's, passed on: workdir()
    parser.add_argument("--seconds", type=float, default=30.0 if args.quick else 120.0)
    parser.add_argument("--time-scale", type=float, default=4.0)
    opts = parser.parse_args(args.extra)
    agent_cmd = _script("edge-agent")
    result = Result()
    with workdir(args, "footprint") as wd:
        with rig_agent(wd.path, opts.time_scale) as agent:
            proc, ready_s, t_ready = agent.proc, agent.ready_s, agent.t_ready
            end = t_ready + opts.seconds / opts.time_scale
            while time.perf_counter() < end and proc.poll() is None:
                time.sleep(0.5)
            if proc.poll() is not None:
                raise exited_early(proc)
            hwm_kb = _status(proc.pid)["VmHWM"]
            cpu = _cpu_seconds(proc.pid) - agent.cpu_at_ready
            rig_seconds = (time.perf_counter() - t_ready) * opts.time_scale
        stored = _stored(agent.cloud_dir / DB_NAME)
    import_ms = _median_ms([agent_cmd, "--version"])
    python_ms = _median_ms([sys.executable, "-c", "pass"])
    floor = _dependency_floor()
    floor_mb = floor["models"]
    rss_mb = hwm_kb / 1024
    cpu_percent = 100.0 * cpu / rig_seconds
    result.add("ready_s (start -> READY=1)", f"{ready_s:.2f} s", "")
    result.add(
        "rss_mb (peak, models loaded, uplink on)",
        f"{rss_mb:.1f} MB",
        f"limit {RSS_LIMIT_MB:.0f} MB: {rss_mb / RSS_LIMIT_MB:.2f}x; Greengrass stream manager "
        f">= {GREENGRASS_MB:.0f} MB: {rss_mb / GREENGRASS_MB:.2f}x",
    )
    result.add(
        "rss_dependencies_mb (fixed dependencies imported, models loaded)",
        f"{floor_mb:.1f} MB",
        f"ours on top: {rss_mb - floor_mb:.1f} MB; steps: "
        + ", ".join(f"{k} {v:.1f}" for k, v in floor.items()),
    )
    result.add(
        "cpu_percent (of one core, reference rig rates)",
        f"{cpu_percent:.2f} %",
        f"{cpu:.2f} s CPU over {rig_seconds:.0f} s of rig time at {opts.time_scale:g}x",
    )
    result.add(
        "import_ms (edge-agent --version)",
        f"{import_ms:.0f} ms",
        f"bare interpreter {python_ms:.0f} ms: {import_ms / python_ms:.1f}x",
    )
    result.add("records stored by the endpoint during the run", f"{stored}", "")
    if rss_mb > RSS_LIMIT_MB:
        result.notes.append(f"NOT MET: rss_mb {rss_mb:.1f} > {RSS_LIMIT_MB:.0f} MB")
    result.summary = {
        "ready_s": round(ready_s, 3),
        "rss_mb": round(rss_mb, 1),
        "rss_limit_mb": RSS_LIMIT_MB,
        "rss_ratio_to_limit": round(rss_mb / RSS_LIMIT_MB, 3),
        "rss_dependencies_mb": floor_mb,
        "rss_own_mb": round(rss_mb - floor_mb, 1),
        "rss_steps_mb": floor,
        "cpu_percent": round(cpu_percent, 2),
        "import_ms": round(import_ms, 1),
        "python_start_ms": round(python_ms, 1),
        "records_stored": stored,
        "rig_seconds": round(rig_seconds, 1),
        "time_scale": opts.time_scale,
    }
    return wd.stamp(result)
