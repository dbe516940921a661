"""``edge-agent gateway`` as systemd sees it (systemd/edge-agent-gateway.service, Type=notify):
a real gateway process, a real endpoint on loopback (OSCORE), and a datagram socket in
NOTIFY_SOCKET with WATCHDOG_USEC set playing systemd's side
(tests/e2e/test_runtime.py FakeSystemd).

- READY=1 once the store is open and the server listens, with a STATUS= line (devices, records
  waiting, loops down); then WATCHDOG=1 pings;
- one loop made to fail for good (a table of the gateway's store damaged at rest, as
  tests/e2e/test_gateway_loops.py does it) stops the pings once it has been down longer than
  the supervisor's DOWN_AFTER, while the process runs on and READY=1 stands (it is not sent
  again): systemd would kill and restart it; the pings resume once the loop is healthy again;
- SIGTERM: STOPPING=1, exit 0.

The supervisor's timings are shortened in the gateway process (the module constants, set
before the command runs, as the in-process tests set them); everything else is the command as
systemd starts it. Nothing here measures time: the checks are on the order of the messages.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from cloud.server import CloudServer
from tests.e2e.test_gateway_loops import DEVICE, one_device_gateway, within
from tests.e2e.test_runtime import FakeSystemd

ROOT = Path(__file__).resolve().parents[2]

# ``edge-agent gateway`` with the supervisor's timings shortened: a loop down 2 s is stuck.
GATEWAY = (
    "import sys\n"
    "from agent.service import supervise\n"
    "supervise.RESTART_CAP, supervise.HEALTHY_AFTER, supervise.DOWN_AFTER = 0.5, 2.0, 2.0\n"
    "from agent.service.cli import main\n"
    "sys.exit(main(sys.argv[1:]))\n"
)


def fields(systemd: FakeSystemd) -> list[str]:
    return [f for _, f in list(systemd.messages)]


def spawn_gateway(tmp_path: Path, systemd: FakeSystemd) -> subprocess.Popen[bytes]:
    """The gateway of ``tmp_path/gateway.toml`` as systemd starts it: NOTIFY_SOCKET, and
    WATCHDOG_USEC for a ping every 0.2 s; its output in ``tmp_path/gateway.log``."""
    env = {**os.environ, "NOTIFY_SOCKET": str(systemd.path), "WATCHDOG_USEC": "400000"}
    env.pop("WATCHDOG_PID", None)
    with open(tmp_path / "gateway.log", "wb") as out:
        return subprocess.Popen(
            [sys.executable, "-c", GATEWAY, "gateway", "--config", str(tmp_path / "gateway.toml")],
            cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip


@pytest.mark.timeout(120)
async def test_gateway_says_ready_feeds_the_watchdog_and_stops_feeding_it_while_a_loop_is_stuck(
    tmp_path: Path,
) -> None:
    server = await CloudServer.start(tmp_path / "cloud", "127.0.0.1", 0)
    store = await one_device_gateway(tmp_path, server, forward_interval=0.2)
    systemd = FakeSystemd(tmp_path / "notify.sock")
    proc = spawn_gateway(tmp_path, systemd)
    log = tmp_path / "gateway.log"
    try:
        # up: READY=1 with its status line, then pings
        await within(60, lambda: fields(systemd).count("WATCHDOG=1") >= 3, "pings")
        seen = fields(systemd)
        ready = seen.index("READY=1")
        assert ready < seen.index("WATCHDOG=1")
        status = seen[ready + 1]
        assert re.fullmatch(r"STATUS=devices 1; waiting \d+; loops down: none", status), status
        idle = "STATUS=devices 1; waiting 0; loops down: none"
        await within(30, lambda: idle in fields(systemd), "the records forwarded")
        assert sorted(await server.seqs(DEVICE)) == [1, 2, 3]

        # a table of the store damaged at rest: every forwarding pass fails, the loop restarts
        (kept,) = store.db.execute(
            "SELECT sql FROM sqlite_master WHERE name = 'relay_kept'"
        ).fetchone()
        store.db.executescript("DROP TABLE relay_kept; CREATE TABLE relay_kept (damaged)")
        down = re.compile(r"STATUS=devices 1; waiting \d+; loops down: records")
        await within(30, lambda: any(down.fullmatch(f) for f in fields(systemd)), "down")
        # down longer than DOWN_AFTER: stuck, and the pings stop while the process runs on
        await within(30, lambda: "STATUS=stuck: records-down" in fields(systemd), "stuck")
        stuck_line = "STATUS=stuck: records-down"
        first = fields(systemd).index(stuck_line)
        await within(30, lambda: fields(systemd)[first:].count(stuck_line) >= 6, "six rounds")
        stuck = fields(systemd)[first:]
        last = len(stuck) - stuck[::-1].index(stuck_line)
        assert "WATCHDOG=1" not in stuck[:last], stuck
        assert proc.poll() is None
        assert fields(systemd).count("READY=1") == 1  # READY stands: not withdrawn, not re-sent

        # repaired: the loop is healthy again after HEALTHY_AFTER, and the pings resume
        store.db.executescript(f"DROP TABLE relay_kept; {kept}")
        at = len(fields(systemd))
        await within(30, lambda: "WATCHDOG=1" in fields(systemd)[at:], "pings again")
    finally:
        proc.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(proc.wait, 30)
        systemd.close()
        store.close()
        await server.stop()
    assert code == 0, log.read_text()
    assert fields(systemd)[-1] == "STOPPING=1"
    text = log.read_text()
    assert "event=stage_failed stage=records" in text and "event=watchdog_withheld" in text
    assert "Traceback" not in text
