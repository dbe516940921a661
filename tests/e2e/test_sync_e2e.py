"""Issue 5's end-to-end acceptance, over OSCORE (the default security): the agent on the
simulated rig, registered with its own credential, sends through the impairment proxy (10 % loss,
150 ms delay, 20 ms jitter, 1 % duplication and reordering) to the endpoint.
During the run there is a 2-minute outage (agent time: the agent runs 8x faster than real time
on the simulated rig, so it is 15 s of real time) and the agent is SIGKILLed and restarted twice.
The simulated pump's valve starts closing 60 s into each run: only the third run lives long
enough to raise the alert, during the outage, while telemetry is queued.

Afterwards the endpoint holds every record the agent committed, exactly once, and the alert
arrived ahead of every telemetry record the third run had queued before it. The committed
sequence numbers come from the agent's own log (``event=committed ... seqs=``, written right
after each commit); a record committed in the instant before a SIGKILL, whose log line was lost
with the process, may reach the endpoint without being in the log: each such extra seq must lie
between the last logged seq of the killed run and the first seq of the next run.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import sys
from pathlib import Path
from typing import Any

import pytest
from linkem import Impairment, LinkEmulator

from agent.service import config as configmod
from agent.service.config import example_config, strip_tables
from agent.store.queue import Store
from cloud.server import CloudServer
from drivers.clock import RealClock

DEVICE = "pump-rig-01"
SCALE = 8.0
OUTAGE_AGENT_SECONDS = 120.0
RUN2_OUTAGE = 30.0  # agent seconds of the outage in run 2; run 3 has the other 90


def parse_ranges(text: str) -> set[int]:
    seqs: set[int] = set()
    for part in text.split(","):
        a, _, b = part.partition("-")
        seqs.update(range(int(a), int(b or a) + 1))
    return seqs


def committed_in(log: Path) -> list[int]:
    found: set[int] = set()
    for m in re.finditer(r"event=committed kind=\w+ seqs=([\d,\-]+)", log.read_text()):
        found |= parse_ranges(m.group(1))
    return sorted(found)


async def stored_or_queued(
    server: Any, device: str, config: Path, committed: list[int], within: float = 30.0
) -> tuple[list[int], set[int]]:
    """After the agent stopped: wait (at most ``within`` s) for the last batches it sent to be
    stored; what it committed and had not sent when it stopped (the uplink is cancelled at stop,
    not drained) is still in its queue. The server's seqs and the queued seqs of ``committed``
    that the server does not hold."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(within):
            while not set(committed) <= set(await server.seqs(device)):  # noqa: ASYNC110
                await asyncio.sleep(0.5)
    stored = await server.seqs(device)
    missing = set(committed) - set(stored)
    if not missing:
        return stored, set()
    st = await Store.open(configmod.load(config).store, clock=RealClock())
    try:
        queued = {r.seq for r in await st.batch(1_000_000, 1 << 40)}
    finally:
        await st.close()
    return stored, missing & queued


class AgentProcess:
    def __init__(self, config: Path, log: Path) -> None:
        self.config = config
        self.log = log
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        self._out = self.log.open("w")
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "agent.service.cli",
            "run",
            "--config",
            str(self.config),
            "--simulate",
            "pump",
            "--time-scale",
            str(SCALE),
            "--fault",
            "valve_closing",
            "--fault-at",
            "60",
            "--log-level",
            "debug",
            stdout=asyncio.subprocess.DEVNULL,
            stderr=self._out,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )

    async def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        await self.proc.wait()
        self._out.close()

    async def stop(self) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(self.proc.wait(), 30)
        self._out.close()
        return code


@pytest.mark.timeout(240)
async def test_every_committed_record_arrives_exactly_once_through_outage_and_kills(
    tmp_path: Path,
):
    server = await CloudServer.start(tmp_path / "cloud", "127.0.0.1", 0)  # OSCORE required
    (await server.register(DEVICE)).write(tmp_path / "agent" / "credential.json")
    imp = Impairment(delay=0.15, jitter=0.02, loss=0.10, dup=0.01, reorder=0.01)
    proxy = LinkEmulator(
        listen=("127.0.0.1", 0), target=("127.0.0.1", server.port), impairment=imp, seed=11
    )
    await proxy.start()
    text = (
        strip_tables(example_config().read_text(), "uplink")
        .replace('data_dir = "/var/lib/edge-agent"', f'data_dir = "{tmp_path / "agent"}"')
        .replace("interval = 1.0", "interval = 4.0")  # keeps the queue drainable at 8x
    )
    text += "commissioning_samples = 60\n"  # the [detect] table ends the example
    text += f'\n[uplink]\nendpoints = ["coap://127.0.0.1:{proxy.port}"]\nbackoff_max = 30.0\n'
    config = tmp_path / "agent.toml"
    config.write_text(text)

    logs = [tmp_path / f"agent-{i}.log" for i in range(3)]
    runs: list[AgentProcess] = []
    try:
        # run 1: a few seconds, then SIGKILL
        runs.append(AgentProcess(config, logs[0]))
        await runs[-1].start()
        await asyncio.sleep(5.0)
        await runs[-1].kill()
        # run 2: the outage starts; SIGKILL in the middle of it
        runs.append(AgentProcess(config, logs[1]))
        await runs[-1].start()
        await asyncio.sleep(2.0)
        proxy.outage(True)
        await asyncio.sleep(RUN2_OUTAGE / SCALE)
        await runs[-1].kill()
        # run 3: the outage goes on (the alert is raised), ends, and the backlog drains
        runs.append(AgentProcess(config, logs[2]))
        await runs[-1].start()
        await asyncio.sleep((OUTAGE_AGENT_SECONDS - RUN2_OUTAGE) / SCALE)
        proxy.outage(False)
        committed_so_far = committed_in(logs[2])
        async with asyncio.timeout(120):
            while not committed_so_far or not set(committed_so_far) <= set(
                await server.seqs(DEVICE)
            ):
                await asyncio.sleep(1.0)
                committed_so_far = committed_in(logs[2])
        assert await runs[-1].stop() == 0
    finally:
        for run in runs:
            if run.proc is not None and run.proc.returncode is None:
                run.proc.kill()
                await run.proc.wait()
        await proxy.stop()

    # wait for the last batches the final run sent before stopping
    per_run = [committed_in(log) for log in logs]
    committed = sorted(set().union(*per_run))
    stored, queued = await stored_or_queued(server, DEVICE, config, committed)
    records = await server.records(DEVICE)
    await server.stop()

    assert len(committed) > 150
    assert len(stored) == len(set(stored)) == len(records)  # nothing stored twice
    missing = set(committed) - set(stored) - queued  # queued: committed as it stopped
    assert not missing, f"{len(missing)} committed records neither arrived nor are queued"
    assert len(queued) <= 20  # the last instant's records, not a backlog
    extra = sorted(set(stored) - set(committed))
    for seq in extra:  # only records committed in the instant before a SIGKILL
        assert any(
            per_run[i] and per_run[i + 1] and per_run[i][-1] < seq < per_run[i + 1][0]
            for i in range(2)
        ), seq
    assert len(extra) <= 50
    # the alert of run 3 went ahead of the telemetry that run had queued before it
    alerts = [r for r in records if r.kind == "alert" and r.seq in per_run[2]]
    assert alerts, "run 3 raised no alert during the outage"
    first = min(alerts, key=lambda r: r.seq)
    queued_before = [
        r for r in records if r.kind == "telemetry" and per_run[2][0] <= r.seq < first.seq
    ]
    assert queued_before
    assert all(first.arrival < r.arrival for r in queued_before)
    # the proxy really was hostile (duplication at 1 % of a few hundred datagrams may not fire)
    up = proxy.counters("up")
    assert up.dropped["loss"] > 0 and up.dropped["outage"] > 0
