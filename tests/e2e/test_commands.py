"""Remote commands end to end (agent/service/commands.py, cloud/commandstore.py,
cloud/commandcli.py): an operator's ``selftest`` reaches an agent on the simulated rig behind a
link that loses 30 % of the datagrams each way, runs once, and its result is stored at the
endpoint and printed by ``devices show``; a device's own credential cannot send a command (4.03);
hostile command values are refused at the endpoint, never a traceback; the ``logs`` command
uploads the lines since T, which ``logs show`` prints, and hostile log uploads are refused;
``rotate`` renews the device's credential over OSCORE and restarts the agent into it; ``requeue``
sends a record set aside as refused again."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import zlib
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from linkem import Impairment, LinkEmulator

from agent.errors import SyncError
from agent.service import commands as commands_mod
from agent.service.commands import EXIT_RESTART
from agent.store.queue import Record
from agent.store.setaside import SetAside
from agent.sync import state as state_mod
from agent.sync.rotation import Rotator
from agent.sync.uplink import UplinkSettings
from agent.wire import records
from agent.wire.credentials import Credential
from agent.wire.logupload import UPLOAD_BODY_BYTES, encode_upload
from agent.wire.records import EventBody, Kind
from cloud import cli as cloud_cli
from cloud.server import CloudServer
from tests.e2e import older_endpoint
from tests.e2e.test_security import Principal
from tests.e2e.test_state_sync import (  # noqa: F401
    DEVICE,
    RunningAgent,
    agent_config,
    fast_timing,
    wait_for,
)


@pytest.fixture
async def endpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[CloudServer]:
    """An endpoint that also takes plain CoAP (agents with security = "none"), DEVICE registered;
    a restarted agent's observation is renewed quickly."""
    monkeypatch.setattr(state_mod, "OBSERVE_STALE_LIMIT", 1.0)
    server = await CloudServer.start(tmp_path / "cloud", "127.0.0.1", 0, allow_plain=True)
    await server.add_device(DEVICE)
    yield server
    await server.stop()


async def run_cli(*argv: str) -> tuple[int, str]:
    """``edge-agent-cloud ARGV`` in a thread (it opens the storage the endpoint runs on)."""
    import contextlib
    import io

    out = io.StringIO()

    def call() -> int:
        with contextlib.redirect_stdout(out):
            return cloud_cli.main(list(argv))

    code = await asyncio.to_thread(call)
    return code, out.getvalue()


async def outcome(server: CloudServer, command_id: int) -> Any:
    rows = await server.db(lambda s: s.commands(DEVICE))
    for row in rows:
        if row.id == command_id and row.status != "sent":
            return row
    return None


@pytest.mark.timeout(240)
async def test_selftest_round_trip_through_30_percent_loss_and_devices_show_prints_it(
    endpoint: CloudServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="agent.service.commands")
    server, data = endpoint, tmp_path / "cloud"
    lossy = Impairment(delay=0.005, loss=0.3)
    async with LinkEmulator(
        listen=("127.0.0.1", 0), target=("127.0.0.1", server.port), impairment=lossy, seed=3
    ) as proxy:
        cfg = agent_config(tmp_path, f"coap://127.0.0.1:{proxy.port}")
        cfg = replace(
            cfg,
            uplink=UplinkSettings(endpoints=cfg.uplink.endpoints, security="none"),
            state=replace(cfg.state, deadline=20.0),
        )
        agent = RunningAgent(cfg)
        try:
            await wait_for(lambda: agent.state().get("observing"), "observing", 120)
            code, out = await run_cli(
                "commands", "send", "--data", str(data), "--device", DEVICE, "selftest"
            )
            assert code == 0, out
            command_id = json.loads(out)["id"]
            await wait_for(lambda: outcome(server, command_id), "selftest result", 180)
            row = await outcome(server, command_id)
            assert row.name == "selftest" and row.status in ("ok", "failed")
            assert set(row.result["sensors"]) == set(agent.agent.sampler.tasks)
            assert row.at is not None
            # the device's own record of it: run once
            assert agent.agent.commands is not None
            assert agent.agent.commands.last_id("selftest") == command_id
        finally:
            await agent.stop()
        stats = proxy.stats()  # the link really lost datagrams both ways
        assert stats["up"]["dropped_total"] > 0 and stats["down"]["dropped_total"] > 0
    code, out = await run_cli("devices", "show", "--data", str(data), DEVICE)
    assert code == 0
    assert str(command_id) in out and "selftest" in out and row.status in out
    code, out = await run_cli("devices", "show", "--data", str(data), DEVICE, "--json")
    page = json.loads(out)
    assert page["commands"][0]["id"] == command_id
    assert page["commands"][0]["result"]["sensors"] == row.result["sensors"]
    assert caplog.text.count(f"event=command_start name=selftest id={command_id}") == 1


@pytest.mark.timeout(90)
async def test_a_command_from_a_device_credential_is_refused_4_03(
    server: CloudServer, tmp_path: Path
) -> None:
    """Forged command: a device (its own valid credential, not an operator) PUTs command/restart
    on its own desired state: 4.03 and nothing stored; an operator's PUT is taken."""
    device = await Principal(server, tmp_path, DEVICE).open()
    op = await Principal(server, tmp_path, "alice").open("operator")
    try:
        body = records.dumps({"command/restart": {"id": 7}})
        resp = await device.req("PUT", f"state/{DEVICE}/desired", body, 60)
        assert resp.dotted == "4.03", resp.payload
        assert "command/restart" not in (await server.desired(DEVICE)).entries
        resp = await op.req("PUT", f"state/{DEVICE}/desired", body, 60)
        assert resp.dotted == "2.04", resp.payload
        assert (await server.desired(DEVICE)).entries["command/restart"].value == {"id": 7}
    finally:
        for p in (device, op):
            await p.close()


@pytest.mark.timeout(90)
async def test_hostile_command_values_are_refused_at_the_endpoint(
    server: CloudServer, tmp_path: Path
) -> None:
    """Unknown command names, malformed and huge arguments, from an operator: 4.00 or 4.13 with
    the reason, nothing stored, and the endpoint goes on."""
    op = await Principal(server, tmp_path, "alice").open("operator")
    await server.register(DEVICE)
    try:
        for value, code in [
            ({"command/reboot": {"id": 1}}, "4.00"),  # unknown command
            ({"command/selftest": {"id": -1}}, "4.00"),
            ({"command/selftest": {"id": True}}, "4.00"),
            ({"command/selftest": {"id": 1, "args": [1]}}, "4.00"),
            ({"command/logs": {"id": 1, "args": {"since": {"a": [1]}}}}, "4.00"),
            ({"command/logs": {"id": 1, "extra": 1}}, "4.00"),
            ({"command/logs": {"id": 1, "args": {"since": "x" * 400}}}, "4.13"),
        ]:
            resp = await op.req("PUT", f"state/{DEVICE}/desired", records.dumps(value), 60)
            assert resp.dotted == code, (value, resp.dotted, resp.payload)
        assert not (await server.desired(DEVICE)).entries
        ok = records.dumps({"command/flush": {"id": 2}})
        assert (await op.req("PUT", f"state/{DEVICE}/desired", ok, 60)).dotted == "2.04"
    finally:
        await op.close()


@pytest.mark.timeout(120)
async def test_logs_command_uploads_the_lines_since_t_and_logs_show_prints_them(
    endpoint: CloudServer, tmp_path: Path
) -> None:
    server, data = endpoint, tmp_path / "cloud"
    test_log = logging.getLogger("tests.commands")
    agent = RunningAgent(agent_config(tmp_path, server.uri))
    try:
        await wait_for(lambda: agent.state().get("observing"), "observing", 60)
        test_log.warning("event=marker_before")
        await asyncio.sleep(0.05)
        since = time.time()
        test_log.warning("event=marker_after")
        code, out = await run_cli(
            "commands",
            "send",
            "--data",
            str(data),
            "--device",
            DEVICE,
            "logs",
            f"since={since}",
        )
        assert code == 0, out
        command_id = json.loads(out)["id"]
        await wait_for(lambda: outcome(server, command_id), "logs result", 60)
        row = await outcome(server, command_id)
        assert row.status == "ok", row.result
        assert row.result["lines"] >= 1 and row.result["left_out"] == 0
    finally:
        await agent.stop()
    code, out = await run_cli("logs", "show", "--data", str(data), "--device", DEVICE)
    assert code == 0
    assert "event=marker_after" in out and "event=marker_before" not in out
    code, out = await run_cli("devices", "show", "--data", str(data), DEVICE, "--json")
    assert json.loads(out)["last_logs"]["count"] == row.result["lines"]


@pytest.mark.timeout(90)
async def test_hostile_log_uploads_are_refused(server: CloudServer, tmp_path: Path) -> None:
    """Another device's logs (4.03), a zlib bomb and a body that is not an upload (4.00), a body
    over the limit (4.13): nothing kept; the device's own upload is taken."""
    a = await Principal(server, tmp_path, DEVICE).open()
    b = await Principal(server, tmp_path, "pump-02").open()
    try:
        good = encode_upload(None, [(1.0, "event=one"), (2.0, "event=two")], 0)
        assert (await b.req("POST", f"logs/{DEVICE}", good, 60)).dotted == "4.03"
        bomb = records.dumps({"count": 1, "left_out": 0, "z": zlib.compress(b"a" * 2_000_000)})
        for body, code in [
            (bomb, "4.00"),
            (records.dumps([1, 2]), "4.00"),
            (b"\x00" * (UPLOAD_BODY_BYTES + 10), "4.13"),
        ]:
            resp = await a.req("POST", f"logs/{DEVICE}", body, 60)
            assert resp.dotted == code, (resp.dotted, resp.payload[:80])
        assert await server.db(lambda s: s.log_uploads(DEVICE)) == []
        assert (await a.req("POST", f"logs/{DEVICE}", good, 60)).dotted == "2.04"
        (kept,) = await server.db(lambda s: s.log_uploads(DEVICE))
        assert kept["count"] == 2 and kept["body"] == good
        # the device's own lines are its words: kept as sent, shown without escape sequences
        sly = encode_upload(None, [(3.0, "event=x \x1b]52;c;ZXZpbA==\x07\x1b[2J")], 0)
        assert (await a.req("POST", f"logs/{DEVICE}", sly, 60)).dotted == "2.04"
    finally:
        for p in (a, b):
            await p.close()
    code, out = await run_cli("logs", "show", "--data", str(tmp_path / "cloud"), "--device", DEVICE)
    assert code == 0 and "event=x \\x1b]52;c;ZXZpbA==\\x07\\x1b[2J" in out
    assert "\x1b" not in out and "\x07" not in out


@pytest.mark.timeout(120)
async def test_restart_stops_the_agent_with_exit_75_once_and_the_next_start_does_not_loop(
    endpoint: CloudServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # taken at once (a restart soon after a start is refused: tests/unit/service/test_commands.py)
    monkeypatch.setattr(commands_mod, "RESTART_SETTLE", 0.0)
    server, data = endpoint, tmp_path / "cloud"
    cfg = agent_config(tmp_path, server.uri)
    first = RunningAgent(cfg)
    await wait_for(lambda: first.state().get("observing"), "observing", 60)
    code, out = await run_cli(
        "commands", "send", "--data", str(data), "--device", DEVICE, "restart"
    )
    assert code == 0, out
    command_id = json.loads(out)["id"]
    await asyncio.wait_for(first.task, 60)  # it stops by itself
    assert first.agent.exit_code == EXIT_RESTART == 75
    # as systemd would: start it again; it reports the restart done and keeps running
    second = RunningAgent(cfg)
    try:
        await wait_for(lambda: outcome(server, command_id), "restart reported", 60)
        await wait_for(lambda: second.state().get("documents", 0) >= 1, "desired read", 60)
        assert not second.task.done() and second.agent.exit_code == 0
        assert (await outcome(server, command_id)).result == {"restarting": True}
    finally:
        await second.stop()
    assert second.agent.exit_code == 0


@pytest.mark.timeout(120)
async def test_requeue_sends_a_set_aside_record_again_once_and_the_endpoint_stores_it(
    endpoint: CloudServer, tmp_path: Path
) -> None:
    """A record set aside as refused (its file in DATA/rejected/, as the uplink leaves it) goes
    back into the running agent's queue with ``requeue`` and is stored at the endpoint, once."""
    server, data = endpoint, tmp_path / "cloud"
    cfg = agent_config(tmp_path, server.uri)
    body = EventBody(1_700_000_000.0, {"type": "operator-note", "text": "refused once"}).to_cbor()
    kept = Record(seq=9, kind=Kind.EVENT, priority=10, created=1.7e9, payload=body, attempts=1)
    SetAside(cfg.store.set_aside_path).write([kept], "4.00 refused", time.time())
    agent = RunningAgent(cfg)
    try:
        await wait_for(lambda: agent.state().get("observing"), "observing", 60)
        command_id = await send_command(data, "requeue")
        await wait_for(lambda: outcome(server, command_id), "requeue result", 60)
        row = await outcome(server, command_id)
        assert row.status == "ok", row.result
        assert row.result["requeued"] == 1 and row.result["left"] == 0
        new_seq = int(row.result["first"].rpartition(" ")[2])

        async def stored() -> list[int]:
            return [r.seq for r in await server.records(DEVICE) if r.body == body]

        await wait_for(lambda: stored(), "the requeued record stored", 60)
        assert await stored() == [new_seq]
        assert not list(cfg.store.set_aside_path.iterdir())
    finally:
        await agent.stop()


async def oscore_agent(server: CloudServer, tmp_path: Path) -> tuple[Any, Path, Credential]:
    """DEVICE registered, and the config of an agent that talks OSCORE to ``server`` with its
    credential file in place: (config, credential path, credential)."""
    cred = await server.register(DEVICE)
    cfg = agent_config(tmp_path, server.uri)
    cfg = replace(cfg, uplink=UplinkSettings(endpoints=(server.uri,), security="oscore"))
    cred_path = cfg.agent.data_dir / "credential.json"
    cred.write(cred_path)
    return cfg, cred_path, cred


async def send_command(data: Path, name: str) -> int:
    code, out = await run_cli("commands", "send", "--data", str(data), "--device", DEVICE, name)
    assert code == 0, out
    return int(json.loads(out)["id"])


async def stored_credential(server: CloudServer) -> Credential:
    return {c.principal: c for c, _ in await server.db(lambda s: s.credentials())}[DEVICE]


async def contiguous_beyond(server: CloudServer, last: int) -> bool:
    """The endpoint holds the device's records above ``last`` and no seq is missing."""
    seqs = await server.seqs(DEVICE)
    return bool(seqs) and seqs[-1] > last and seqs == list(range(seqs[0], seqs[-1] + 1))


@pytest.mark.timeout(180)
async def test_rotate_renews_the_credential_restarts_into_it_and_the_old_one_is_refused(
    server: CloudServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The real stack over OSCORE: ``rotate`` makes generation 2 on the device, the endpoint
    stores it, the agent records it done and stops with 75; started again (as systemd would) it
    reports ``{"generation": 2}`` under the new credential and goes on sending records with no
    seq missing; the old credential file is refused; no secret in any log line or result."""
    monkeypatch.setattr(state_mod, "OBSERVE_STALE_LIMIT", 1.0)
    caplog.set_level(logging.DEBUG)
    cfg, cred_path, old = await oscore_agent(server, tmp_path)
    thief = Principal(server, tmp_path, "stolen")
    old.write(thief.dir / "credential.json")  # what someone copied before the rotation
    first = RunningAgent(cfg)
    await wait_for(lambda: first.state().get("observing"), "observing", 60)
    await wait_for(lambda: contiguous_beyond(server, -1), "records delivered", 60)
    command_id = await send_command(tmp_path / "cloud", "rotate")
    await asyncio.wait_for(first.task, 90)  # it stops by itself, into the new credential
    assert first.agent.exit_code == EXIT_RESTART
    new = Credential.read(cred_path)
    assert (
        new == await stored_credential(server)
        and new.generation == 2
        and new.sender_id == old.sender_id
    )
    assert new.master_secret != old.master_secret and new.psk != old.psk
    assert not cred_path.with_name("credential.json.next").exists()
    before = (await server.seqs(DEVICE))[-1]
    second = RunningAgent(cfg)  # as systemd would
    try:
        await wait_for(lambda: outcome(server, command_id), "rotate reported", 60)
        row = await outcome(server, command_id)
        assert row.status == "ok" and row.result == {"generation": 2}
        await wait_for(lambda: contiguous_beyond(server, before + 5), "records after it", 60)
        assert not second.task.done() and second.agent.exit_code == 0
    finally:
        await second.stop()
    assert second.agent.exit_code == 0
    thief.connect()
    try:
        with pytest.raises(SyncError, match="refuses this credential"):
            await thief.req("GET", f"devices/{DEVICE}")
    finally:
        await thief.close()
    text = caplog.text
    for secret in (old.master_secret, new.master_secret, old.psk, new.psk):
        assert secret.hex() not in text and repr(secret) not in text
        assert secret.hex() not in json.dumps(row.result)
    assert "event=credential_rotated device=pump-01 generation=2 stored=new" in text


@pytest.mark.timeout(180)
async def test_a_crash_between_the_commit_and_the_file_replacement_is_settled_at_the_next_start(
    server: CloudServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Power cut after the endpoint stored generation 2 and the command was recorded done, before
    the credential file was replaced: on disk the old credential, its OSCORE state and the
    pending ``.next``. The next start confirms ``.next`` under the new context, promotes it and
    restarts (75); the start after runs on generation 2 and no record is lost."""
    monkeypatch.setattr(state_mod, "OBSERVE_STALE_LIMIT", 1.0)
    cfg, cred_path, old = await oscore_agent(server, tmp_path)
    first = RunningAgent(cfg)
    with monkeypatch.context() as crash:  # the files stay as they were at the commit
        crash.setattr(Rotator, "promote", lambda self, nxt: None)
        await wait_for(lambda: first.state().get("observing"), "observing", 60)
        await send_command(tmp_path / "cloud", "rotate")
        await asyncio.wait_for(first.task, 90)
    assert first.agent.exit_code == EXIT_RESTART
    nxt = Credential.read(cred_path.with_name("credential.json.next"))
    stored = await stored_credential(server)
    assert Credential.read(cred_path) == old and nxt == stored and nxt.generation == 2
    second = RunningAgent(cfg)  # settles the pending .next and restarts into it
    await asyncio.wait_for(second.task, 90)
    assert second.agent.exit_code == EXIT_RESTART
    assert Credential.read(cred_path) == nxt
    assert not cred_path.with_name("credential.json.next").exists()
    before = (await server.seqs(DEVICE) or [-1])[-1]
    third = RunningAgent(cfg)
    try:
        await wait_for(lambda: contiguous_beyond(server, before + 5), "records after it", 60)
        assert not third.task.done()
    finally:
        await third.stop()
    assert third.agent.exit_code == 0


@pytest.mark.timeout(90)
async def test_a_device_clock_far_off_is_taken_as_no_time_and_every_listing_prints(
    server: CloudServer, tmp_path: Path
) -> None:
    """Attack: a device reports a command's outcome ``at = 1e300`` and uploads a log window
    ``since = 1e300`` (a time no date can show). The endpoint takes each as absent (a time
    outside 0..2**40 s), so ``commands list``, ``devices show`` and ``logs show`` print it as
    ``-``."""
    data = tmp_path / "cloud"
    device = await Principal(server, tmp_path, DEVICE).open()
    try:
        code, out = await run_cli(
            "commands", "send", "--data", str(data), "--device", DEVICE, "selftest"
        )
        assert code == 0, out
        command_id = json.loads(out)["id"]
        value = {"id": command_id, "status": "ok", "at": 1e300, "result": {"msg": "done"}}
        doc = {"command/selftest": [int(time.time() * 1000), value]}
        resp = await device.req("PUT", f"state/{DEVICE}/reported", records.dumps(doc), 60)
        assert resp.dotted == "2.04", resp.payload
        body = encode_upload(1e300, [(time.time(), "event=one"), (time.time(), "event=two")], 0)
        assert (await device.req("POST", f"logs/{DEVICE}", body, 60)).dotted == "2.04"
    finally:
        await device.close()
    row = await outcome(server, command_id)
    assert row.status == "ok" and row.at is None and row.result == {"msg": "done"}
    (kept,) = await server.db(lambda s: s.log_uploads(DEVICE))
    assert kept["since"] is None and kept["count"] == 2
    for argv in (
        ("commands", "list", "--data", str(data), "--device", DEVICE),
        ("devices", "show", "--data", str(data), DEVICE),
        ("logs", "show", "--data", str(data), "--device", DEVICE),
    ):
        code, out = await run_cli(*argv)
        assert code == 0, (argv, out)
        assert "1e+300" not in out
    assert "lines since -" in out and "event=two" in out


def _device_data(tmp_path: Path, now: float) -> Path:
    """A data directory with DEVICE registered and nothing else."""
    from cloud.storage import SQLiteStorage

    data = tmp_path / "cloud"
    data.mkdir()
    storage = SQLiteStorage.in_dir(data)
    try:
        storage.add_device(DEVICE, now)
    finally:
        storage.close()
    return data


async def _print_all(data: Path, *argvs: tuple[str, ...]) -> dict[str, str]:
    """Each command line's output (by its words before --data, and --json): exit 0, and what
    it prints as JSON parses."""
    texts = {}
    for argv in argvs:
        code, out = await run_cli(*argv)
        assert code == 0, (argv, out)
        if "--json" in argv or argv[0] == "reported":
            json.loads(out)
        texts[" ".join(argv[:2]) + (" --json" if "--json" in argv else "")] = out
    return texts


@pytest.mark.timeout(60)
async def test_stored_times_no_date_can_show_still_print(tmp_path: Path) -> None:
    """Attack: times an older endpoint stored before it checked them: a command's outcome at
    1e300 and another at -1e300, a log window since 1e300. ``commands list``, ``devices show``
    and ``logs show`` print them as numbers and exit 0."""
    now = time.time()
    data = _device_data(tmp_path, now)
    older_endpoint.put_command(data, DEVICE, 7, "selftest", {"m": "ok"}, 1e300, now)
    older_endpoint.put_command(data, DEVICE, 8, "logs", {}, -1e300, now)
    body = encode_upload(None, [(now, "event=one"), (now, "event=two")], 0)
    older_endpoint.put_log_upload(data, DEVICE, 1e300, body, now)
    texts = await _print_all(
        data,
        ("commands", "list", "--data", str(data), "--device", DEVICE),
        ("devices", "show", "--data", str(data), DEVICE),
        ("logs", "show", "--data", str(data), "--device", DEVICE),
    )
    assert "1e+300" in texts["commands list"] and "-1e+300" in texts["commands list"]
    assert "-1e+300" in texts["devices show"]
    assert "lines since 1e+300" in texts["logs show"] and "event=two" in texts["logs show"]


@pytest.mark.timeout(60)
async def test_stored_integers_no_printer_takes_still_print(tmp_path: Path) -> None:
    """Attack: integers an older endpoint stored before it refused CBOR bignums: 2**15000 (4516
    digits, over Python's printing limit) in a command's result, as the reported agent version
    and a model's version. ``devices show`` (text and --json), ``commands list`` (both) and
    ``reported show`` print all of it and exit 0, and what they print as JSON parses."""
    now = time.time()
    data = _device_data(tmp_path, now)
    huge = 2**15000
    older_endpoint.put_command(data, DEVICE, 7, "selftest", {"n": huge, "m": "ok"}, now, now)
    older_endpoint.put_reported(
        data, DEVICE, {"agent/version": huge, "model/ae": {"name": "ae", "version": huge}}, now
    )
    texts = await _print_all(
        data,
        ("devices", "show", "--data", str(data), DEVICE),
        ("devices", "show", "--data", str(data), DEVICE, "--json"),
        ("commands", "list", "--data", str(data), "--device", DEVICE),
        ("commands", "list", "--data", str(data), "--device", DEVICE, "--json"),
        ("reported", "show", "--data", str(data), "--device", DEVICE),
    )
    (listed,) = json.loads(texts["commands list --json"])
    # the result as stored; or {"undecodable": n} where the decoder refuses bignums
    stored = {"n": "<integer of 15001 bits>", "m": "ok"}
    assert listed["result"] == stored or list(listed["result"]) == ["undecodable"]
    page = json.loads(texts["devices show --json"])
    assert page["commands"][0]["id"] == 7 and "ae" in page["models"]
    assert set(json.loads(texts["reported show"])) == {"agent/version", "model/ae"}
