"""Remote commands on the device (agent/service/commands.py) and the log ring and its upload
(agent/service/logring.py, agent/wire/logupload.py): each command runs once per id, a restart is
recorded before the stop and never re-run, bad or hostile values are reported refused and never
run, logs uploads hold the lines since T and never more than the bound."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import zlib
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from agent.service import commands as cmd
from agent.service.commands import CommandRunner, flush_probe, selftest_probe
from agent.service.hooks import AgentHooks
from agent.service.logring import LogRing, LogSettings, LogUploader, window
from agent.wire import logupload, records
from agent.wire.commands import check_args, check_value
from agent.wire.logupload import UPLOAD_TEXT_BYTES, LogUploadError, decode_upload, encode_upload


def runner(tmp_path: Path, **parts: Any) -> CommandRunner:
    return CommandRunner(tmp_path, clock_time=lambda: 1000.0, **parts)


async def drain(r: CommandRunner) -> None:
    while not r._queue.empty():
        name, command_id, args = r._queue.get_nowait()
        await r.execute(name, command_id, args)


async def test_restart_is_recorded_done_before_the_stop_and_never_runs_again(
    tmp_path: Path,
) -> None:
    seen_on_disk: list[Any] = []

    def restart() -> None:  # what the file says at the moment the agent is told to stop
        seen_on_disk.append(json.loads((tmp_path / cmd.COMMANDS_FILE).read_text()))

    first = runner(tmp_path, restart=restart)
    first.apply("restart", {"id": 41})
    await drain(first)
    assert seen_on_disk == [
        {"restart": {"id": 41, "status": "ok", "result": {"restarting": True}, "at": 1000.0}}
    ]
    # the restarted agent: state sync applies the persisted desired value again
    again: list[int] = []
    second = runner(tmp_path, restart=lambda: again.append(1))
    second.apply("restart", {"id": 41})
    await drain(second)
    assert again == [] and second._queue.empty()
    assert second.reported()["command/restart"]["id"] == 41
    second.apply("restart", {"id": 42})  # the operator's next restart does run
    await drain(second)
    assert again == [1]


async def test_hostile_disk_a_restart_that_cannot_be_recorded_does_not_stop_the_agent(
    tmp_path: Path,
) -> None:
    """A full disk (here commands.json a directory, so its replacement fails): the agent, once
    restarted, would find the id not done and restart again, until systemd's start limit gives
    the unit up. The restart is reported failed instead, and the agent keeps running."""
    (tmp_path / cmd.COMMANDS_FILE).mkdir()
    stops: list[int] = []
    r = runner(tmp_path, restart=lambda: stops.append(1))
    r.apply("restart", {"id": 41})
    await drain(r)
    assert stops == []
    outcome = r.reported()["command/restart"]
    assert outcome["id"] == 41 and outcome["status"] == "failed"
    assert "not restarting" in outcome["result"]["error"]


async def test_restarts_faster_than_systemd_s_start_limit_are_refused(tmp_path: Path) -> None:
    """systemd starts the unit at most StartLimitBurst times in StartLimitIntervalSec, restarts
    by command included: restart commands sent one after the other would leave the agent
    stopped for good (and its pending release rolled back), with nothing left on the device to
    take the next command. A restart is taken only once the agent has run RESTART_SETTLE."""
    unit = (Path(__file__).parents[3] / "systemd" / "edge-agent.service").read_text()
    burst, minutes = (
        int(m.group(1)) if (m := re.search(rf"^{key}=(\d+)(min)?$", unit, re.M)) else 0
        for key in ("StartLimitBurst", "StartLimitIntervalSec")
    )
    assert burst > 1 and minutes > 0
    assert cmd.RESTART_SETTLE * (burst - 1) >= minutes * 60  # the limit is never reached

    stops: list[int] = []
    uptime = [12.0]
    r = runner(tmp_path, restart=lambda: stops.append(1), uptime=lambda: uptime[0])
    r.apply("restart", {"id": 7})
    await drain(r)
    assert stops == []
    outcome = r.reported()["command/restart"]
    assert outcome["status"] == "refused" and "send it again in 138 s" in outcome["result"]["error"]
    uptime[0] = cmd.RESTART_SETTLE
    r.apply("restart", {"id": 8})
    await drain(r)
    assert stops == [1] and r.reported()["command/restart"]["status"] == "ok"


async def test_each_id_runs_once_and_the_outcome_is_reported(tmp_path: Path) -> None:
    runs: list[int] = []
    changed: list[int] = []

    async def probe() -> dict[str, Any]:
        runs.append(1)
        return {"ok": True, "sensors": {"motor": "ok"}}

    r = runner(tmp_path, selftest=probe, changed=lambda: changed.append(1))
    r.apply("selftest", {"id": 5})
    r.apply("selftest", {"id": 5})  # a repeated notification
    await drain(r)
    r.apply("selftest", {"id": 5})  # and again after it ran
    r.apply("selftest", {"id": 4})  # an older id
    r.apply("selftest", None)  # unset: nothing
    await drain(r)
    assert runs == [1] and changed == [1]
    assert r.reported() == {
        "command/selftest": {
            "id": 5,
            "status": "ok",
            "result": {"ok": True, "sensors": {"motor": "ok"}},
            "at": 1000.0,
        }
    }


@pytest.mark.parametrize(
    ("name", "value", "why"),
    [
        ("logs", {"id": 3, "args": {"since": "yesterday"}}, "since must be"),
        ("logs", {"id": 3, "args": {"since": -1}}, "since must be"),
        ("logs", {"id": 3, "args": {"since": float("nan")}}, "since must be"),
        ("selftest", {"id": 3, "args": {"verbose": True}}, "no argument 'verbose'"),
        ("flush", {"id": 3, "args": {"x" * 30: "y" * 10_000}}, "no argument"),  # huge
        ("rotate", {"id": 3}, 'not supported without [uplink] security = "oscore": rekey'),
    ],
)
async def test_hostile_and_unsupported_commands_are_reported_refused_never_run(
    tmp_path: Path, name: str, value: Any, why: str
) -> None:
    ran: list[str] = []

    async def probe() -> dict[str, Any]:
        ran.append("probe")
        return {"ok": True}

    r = runner(tmp_path, selftest=probe, flush=probe, logs=lambda since: probe())
    r.apply(name, value)
    await drain(r)
    outcome = r.done[name]
    assert outcome["status"] == "refused" and why in outcome["result"]["error"]
    assert len(outcome["result"]["error"]) <= 200 and ran == []


async def test_a_value_that_is_not_a_command_is_refused_to_state_sync(tmp_path: Path) -> None:
    """Values state sync would refuse (its check_desired): the runner raises ValueError, which
    state sync reports in desired/errors; nothing runs, nothing is kept."""
    r = runner(tmp_path)
    for value in ({"id": 0}, {"id": True}, {"id": 1, "args": [1]}, [1], "x", {"id": 1, "z": 1}):
        assert check_value(value) is not None
        with pytest.raises(ValueError, match="expected"):
            r.apply("selftest", value)
    with pytest.raises(ValueError, match="unknown command 'reboot'"):
        r.apply("reboot", {"id": 3})  # never a reported key of its own
    assert r.done == {} and r._queue.empty()


async def test_a_command_that_breaks_is_reported_failed_and_the_runner_goes_on(
    tmp_path: Path,
) -> None:
    async def broken() -> dict[str, Any]:
        raise RuntimeError("sensor bus gone")

    r = runner(tmp_path, selftest=broken)
    r.apply("selftest", {"id": 1})
    await drain(r)
    assert r.done["selftest"]["status"] == "failed"
    assert r.done["selftest"]["result"] == {"error": "sensor bus gone"}


async def test_a_corrupt_commands_file_is_ignored_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / cmd.COMMANDS_FILE).write_text("{not json")
    assert runner(tmp_path).done == {}
    assert "event=commands_file_unreadable" in caplog.text
    (tmp_path / cmd.COMMANDS_FILE).write_text(json.dumps({"bogus": {"id": 1}, "flush": 3}))
    assert runner(tmp_path).done == {}


async def test_flush_wakes_the_uplink_and_reports_the_depth_before_and_after(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(cmd, "FLUSH_POLL", 0.0)
    depths = iter([120, 60, 0])
    pokes: list[int] = []

    async def depth() -> int:
        return next(depths)

    now = [0.0]

    async def sleep(s: float) -> None:
        now[0] += 1.0

    flush = flush_probe(lambda: pokes.append(1), depth, sleep, lambda: now[0])
    assert await flush() == {"before": 120, "after": 0}
    assert len(pokes) >= 2


async def test_flush_gives_up_after_its_wait_and_reports_what_is_left() -> None:
    now = [0.0]

    async def depth() -> int:
        return 7

    async def sleep(s: float) -> None:
        now[0] += s

    flush = flush_probe(lambda: None, depth, sleep, lambda: now[0])
    assert await flush() == {"before": 7, "after": 7}
    assert now[0] >= cmd.FLUSH_WAIT


async def test_selftest_reports_each_sensor_and_fails_on_a_required_one() -> None:
    def task(state: str, required: bool) -> Any:
        return SimpleNamespace(
            health=SimpleNamespace(state=SimpleNamespace(value=state)),
            cfg=SimpleNamespace(required=required),
            enabled=True,
        )

    sampler = SimpleNamespace(tasks={"motor": task("ok", True), "amb": task("down", False)})
    probe = selftest_probe(sampler, lambda: 3, lambda: "online")
    assert await probe() == {
        "ok": True,
        "sensors": {"amb": "down", "motor": "ok"},
        "failing": [],
        "queue": 3,
        "link": "online",
    }
    sampler.tasks["motor"] = task("degraded", True)
    result = await probe()
    assert result["ok"] is False and result["failing"] == ["motor"]


async def test_agent_hooks_hand_command_keys_to_the_runner_and_report_outcomes(
    tmp_path: Path,
) -> None:
    r = runner(tmp_path)
    sampler = SimpleNamespace(tasks={})
    hooks = AgentHooks(sampler, version="1", queue_depth=lambda: None, link=lambda: {}, commands=r)
    hooks.apply("command/rotate", {"id": 9})
    await drain(r)
    assert hooks.reported()["command/rotate"]["status"] == "refused"
    plain = AgentHooks(sampler, version="1", queue_depth=lambda: None, link=lambda: {})
    with pytest.raises(ValueError, match="this agent applies only"):
        plain.apply("command/rotate", {"id": 9})


# -- logs on demand -------------------------------------------------------------------------------


def test_the_ring_is_bounded_by_lines_and_by_bytes() -> None:
    ring = LogRing(LogSettings(ring_lines=10, ring_bytes=4096))
    for i in range(25):
        ring.add(float(i), f"line {i}")
    assert len(ring) == 10 and [t for t, _ in ring.since(None)] == [float(i) for i in range(15, 25)]
    assert ring.dropped == 15
    ring = LogRing(LogSettings(ring_lines=1000, ring_bytes=4096))
    for i in range(100):
        ring.add(float(i), "x" * 99)
    assert ring.bytes <= 4096 and len(ring) == 40
    assert ring.since(95.0) == [(float(i), "x" * 99) for i in range(95, 100)]


def test_the_ring_takes_formatted_records_from_the_root_logger_one_line_each() -> None:
    ring = LogRing()
    root = logging.getLogger()
    root.addHandler(ring)
    try:
        logging.getLogger("agent.test").warning("event=x detail=%r", "two\nlines")
    finally:
        root.removeHandler(ring)
    (line,) = [line for _, line in ring.since(None) if "event=x" in line]
    assert "level=WARNING logger=agent.test event=x" in line and "\n" not in line


def test_an_upload_holds_the_newest_lines_since_t_within_the_bound() -> None:
    lines = [(float(i), f"{i:06d} " + "y" * 200) for i in range(1000)]
    kept, left_out = window(lines[500:])
    text = sum(len(s) + 1 for _, s in kept)
    assert text <= UPLOAD_TEXT_BYTES and left_out == 500 - len(kept)
    assert kept[-1] == lines[-1] and kept[0][0] > 500.0  # the newest kept
    body = encode_upload(500.0, kept, left_out)
    upload = decode_upload(body)
    assert upload.lines() == [s for _, s in kept]
    assert (upload.since, upload.count, upload.left_out) == (500.0, len(kept), left_out)
    assert len(body) <= logupload.UPLOAD_BODY_BYTES


@pytest.mark.parametrize(
    ("attack", "body"),
    [
        ("zlib bomb", records.dumps({"count": 1, "left_out": 0, "z": zlib.compress(b"a" * 10**6)})),
        ("not zlib", records.dumps({"count": 1, "left_out": 0, "z": b"plain text"})),
        ("cut short", records.dumps({"count": 1, "left_out": 0, "z": zlib.compress(b"ab")[:-3]})),
        ("no z", records.dumps({"count": 1, "left_out": 0})),
        ("bad count", records.dumps({"count": -1, "left_out": 0, "z": zlib.compress(b"")})),
        ("bad time", records.dumps({"count": 0, "left_out": 0, "since": "x", "z": b""})),
        ("too deep", records.dumps({"a": [[[[1]]]]})),
        ("not cbor", b"\xff\xff"),
        ("too large", b"\x00" * (logupload.UPLOAD_BODY_BYTES + 1)),
    ],
)
def test_hostile_upload_bodies_are_refused(attack: str, body: bytes) -> None:
    with pytest.raises(LogUploadError):
        decode_upload(body)


async def test_the_uploader_waits_for_alerts_and_batches_to_go_first() -> None:
    ring = LogRing()
    for i in range(5):
        ring.add(100.0 + i, f"event=e{i}")
    queued = iter([2, 1, 0])
    busy = iter([True, False, False, False])
    sent: list[bytes] = []
    order: list[str] = []

    async def alerts() -> int:
        n = next(queued)
        order.append(f"alerts={n}")
        return n

    async def post(body: bytes) -> str:
        sent.append(body)
        return "2.04"

    async def sleep(s: float) -> None:
        await asyncio.sleep(0)

    uploader = LogUploader(
        ring,
        alerts_queued=alerts,
        uplink_busy=lambda: next(busy),
        post=post,
        sleep=sleep,
        monotonic=lambda: 0.0,
    )
    result = await uploader.upload(102.0)
    assert order == ["alerts=2", "alerts=1", "alerts=0"]  # sent only once no alert waits
    assert result == {"lines": 3, "left_out": 0, "bytes": len(sent[0])}
    assert decode_upload(sent[0]).lines() == ["event=e2", "event=e3", "event=e4"]


async def test_an_upload_the_endpoint_refuses_or_a_busy_link_is_a_failed_command() -> None:
    ring = LogRing()
    now = [0.0]

    async def sleep(s: float) -> None:
        now[0] += s

    async def refused(body: bytes) -> str:
        return "4.13"

    async def none_queued() -> int:
        return 0

    async def always_queued() -> int:
        return 1

    up = LogUploader(
        ring,
        alerts_queued=none_queued,
        uplink_busy=lambda: False,
        post=refused,
        sleep=sleep,
        monotonic=lambda: now[0],
    )
    assert await up.upload(None) == {"error": "the endpoint answered 4.13"}
    up.alerts_queued = always_queued
    assert "stayed busy" in (await up.upload(None))["error"]


def test_check_args_of_each_command() -> None:
    assert check_args("logs", {"since": 1.5}) == {"since": 1.5}
    assert check_args("logs", None) == {}
    assert check_args("selftest", {}) == {}
