"""The gateway's loops under the agent's stage supervisor (agent/gateway/service.py,
agent/service/supervise.py): a real gateway in this process, its real store, a real endpoint on
loopback (OSCORE), the supervisor's timings shortened.

Attack named: a file corrupted at rest. A record of the gateway's store whose ``created`` no
longer reads as a number made every forwarding pass raise ValueError, which run_every does not
retry: the "records" task ended, with nothing logged, while the gateway went on taking its
devices' records until its disk filled."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from agent.errors import SyncError
from agent.gateway import relay, service
from agent.gateway.service import Gateway
from agent.gateway.settings import load_gateway_config
from agent.gateway.storeparts import prepare_store
from agent.service import supervise
from agent.service.notify import Health
from agent.service.supervise import Supervisor
from agent.sync.security import ClientSecurity
from agent.sync.transport import CoapTransport
from cloud.server import CloudServer
from cloud.storage import SQLiteStorage
from cloud.storebase import StorageUnavailable
from drivers.clock import RealClock
from tests.e2e.test_gateway_cloud import reading
from tests.e2e.test_security import T0, batch

GW, DEVICE = "gw-1", "pump-01"


async def within(seconds: float, check: Callable[[], object], what: str) -> None:
    async with asyncio.timeout(seconds):
        while not check():  # noqa: ASYNC110 - the gateway's state is polled
            await asyncio.sleep(0.05)


async def one_device_gateway(
    tmp_path: Path, server: CloudServer, forward_interval: float, readings: int = 3
) -> SQLiteStorage:
    """GW serving DEVICE, attached at ``server``: its data directory ``tmp_path/gateway`` with
    both credentials, its config ``tmp_path/gateway.toml``; returns its store, opened here,
    holding DEVICE's records 1 to ``readings``."""
    data = tmp_path / "gateway"
    (data / "devices").mkdir(parents=True)
    (await server.register(DEVICE)).write(data / "devices" / f"{DEVICE}.json")
    (await server.register(GW, "gateway")).write(data / "credential.json")
    await server.attach(GW, [DEVICE])
    (tmp_path / "gateway.toml").write_text(
        f'[agent]\ndevice_id = "{GW}"\ndata_dir = "{data}"\n'
        f'[uplink]\nendpoints = ["{server.uri}"]\n[gateway]\nlisten = "127.0.0.1:0"\n'
        f"forward_interval = {forward_interval}\ndesired_poll = 1.0\n"
    )
    store = SQLiteStorage.in_dir(data / "store")
    if readings:
        store.ingest_many([(DEVICE, [reading(i) for i in range(1, readings + 1)], True)], T0)
    return store


def supervised(tmp_path: Path) -> tuple[Gateway, Health]:
    """The gateway of ``tmp_path/gateway.toml``, its loops under the agent's stage supervisor
    (as ``edge-agent gateway`` runs them), and the health the supervisor reports to."""
    clock = RealClock()
    health = Health(clock)
    config = load_gateway_config(tmp_path / "gateway.toml")
    return Gateway(config, Supervisor(clock, health)), health


@contextlib.asynccontextmanager
async def serving(
    gw: Gateway, store: SQLiteStorage, server: CloudServer
) -> AsyncIterator[asyncio.Task[None]]:
    """``gw`` running (its task) until the block ends; then stopped, ``store`` closed and the
    endpoint ``server`` stopped."""
    running = asyncio.create_task(gw.run())
    try:
        yield running
    finally:
        gw.stop()
        await running
        store.close()
        await server.stop()


@pytest.mark.timeout(90)
async def test_a_forwarding_loop_that_raises_is_said_once_restarted_and_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(supervise, "RESTART_CAP", 0.5)
    monkeypatch.setattr(supervise, "HEALTHY_AFTER", 2.0)
    monkeypatch.setattr(supervise, "DOWN_AFTER", 1.0)
    server = await CloudServer.start(tmp_path / "cloud", "127.0.0.1", 0)
    # longer than HEALTHY_AFTER: a restarted loop that waited for the next interval would count
    # as healthy, and say its failure again at each pass
    store = await one_device_gateway(tmp_path, server, forward_interval=5.0)
    # a table of the store damaged (a damaged record row is set aside instead,
    # tests/e2e/test_cloud_ratelimit.py): every pass fails to read it
    prepare_store(store)
    (kept,) = store.db.execute("SELECT sql FROM sqlite_master WHERE name = 'relay_kept'").fetchone()
    store.db.executescript("DROP TABLE relay_kept; CREATE TABLE relay_kept (damaged)")
    gw, health = supervised(tmp_path)
    async with serving(gw, store, server) as running:
        with caplog.at_level(logging.INFO):

            def restarts() -> int:
                loops = gw.status()["loops"]
                return int(loops["records"]["restarts"]) if "records" in loops else 0

            await within(30.0, lambda: restarts() >= 4, "the records loop restarted")
            failed = [r for r in caplog.records if "event=stage_failed " in r.getMessage()]
            assert len(failed) == 1, [r.getMessage() for r in failed]  # one per episode
            line = failed[0].getMessage()
            assert "stage=records" in line and "OperationalError: no such column" in line
            assert failed[0].exc_info is None and "Traceback" not in caplog.text
            assert "event=stage_recovered" not in caplog.text
            loop = gw.status()["loops"]["records"]
            assert loop["down"] is True and "OperationalError" in str(loop["last_error"])
            # down longer than DOWN_AFTER: a watchdog fed from this health would stop
            await within(10.0, lambda: "records-down" in health.stuck(), "stuck")
            assert len([r for r in caplog.records if "event=stage_failed " in r.getMessage()]) == 1
            assert await server.seqs(DEVICE) == []
            # the loop goes on: once the table reads again, every record goes up, once
            store.db.executescript(f"DROP TABLE relay_kept; {kept}")
            await within(30.0, lambda: gw.forwarder and gw.forwarder.forwarded >= 3, "sent")
            assert await server.seqs(DEVICE) == [1, 2, 3]
            await within(10.0, lambda: not gw.status()["loops"]["records"]["down"], "healthy")
        assert "event=stage_recovered stage=records" in caplog.text
        assert health.stuck() == []
        assert not running.done()


@pytest.mark.timeout(90)
async def test_a_count_of_waiting_records_that_fails_is_said_and_not_shown_stale(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Attack named: a file corrupted at rest (a table of the store gone). The ``stats`` loop's
    count of the records waiting failed without a word, and STATUS= went on saying the last
    count as if it were true; the failure is now said once and the count shown as unknown."""
    monkeypatch.setattr(service, "STATS_INTERVAL", 0.05)
    server = await CloudServer.start(tmp_path / "cloud", "127.0.0.1", 0)
    store = await one_device_gateway(tmp_path, server, forward_interval=3600.0)
    gw, _ = supervised(tmp_path)
    async with serving(gw, store, server):
        with caplog.at_level(logging.INFO):
            await within(30.0, lambda: gw.forwarder and gw.forwarder.forwarded >= 3, "sent")
            await within(10.0, lambda: "waiting 0;" in gw.status_line(), "counted")
            prepare_store(store)
            (later,) = store.db.execute(
                "SELECT sql FROM sqlite_master WHERE name = 'relay_later'"
            ).fetchone()
            store.db.executescript("DROP TABLE relay_later")
            await within(10.0, lambda: "waiting ?;" in gw.status_line(), "unknown")
            await asyncio.sleep(0.3)  # counts that fail again are not said again
            said = [r for r in caplog.records if "event=gateway_waiting_unknown" in r.getMessage()]
            assert len(said) == 1 and "no such table" in said[0].getMessage()
            assert said[0].exc_info is None and "Traceback" not in caplog.text
            store.db.executescript(later)
            await within(10.0, lambda: "waiting ?;" not in gw.status_line(), "counted again")


@pytest.mark.timeout(90)
async def test_a_loop_whose_round_never_ends_counts_as_stuck(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A round that hangs (a store whose read never returns, a lock never released) raised
    nothing, so the loop was never down and the watchdog went on being fed while nothing was
    forwarded; its beats stop now and the health counts it stuck (the other loops' beats go
    on)."""
    monkeypatch.setattr(service, "HUNG_AFTER", 1.0)
    server = await CloudServer.start(tmp_path / "cloud", "127.0.0.1", 0)
    store = await one_device_gateway(tmp_path, server, forward_interval=0.2)
    gw, health = supervised(tmp_path)
    forward, hang = gw._forward, asyncio.Event()

    async def hung_after_the_first_pass() -> None:
        if hang.is_set():
            await asyncio.Event().wait()  # never returns
        await forward()

    monkeypatch.setattr(gw, "_forward", hung_after_the_first_pass)
    async with serving(gw, store, server):
        await within(30.0, lambda: gw.forwarder and gw.forwarder.forwarded >= 3, "sent")
        assert health.stuck() == []
        hang.set()
        await within(30.0, lambda: "records-hung" in health.stuck(), "stuck")
        assert health.stuck() == ["records-hung"]  # the loops that still go round are not
        assert not gw.status()["loops"]["records"]["down"]  # it never raised


@pytest.mark.timeout(90)
async def test_a_backlog_drained_in_many_passes_is_not_counted_stuck(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A backlog after an outage is drained in one round of the records loop, pass after full
    pass (each bounded: forward_records, requests with their deadline); a drain longer than
    HUNG_AFTER is no hung round: the systemd watchdog must not kill the gateway mid-drain."""
    monkeypatch.setattr(service, "HUNG_AFTER", 1.0)
    server = await CloudServer.start(tmp_path / "cloud", "127.0.0.1", 0)
    store = await one_device_gateway(tmp_path, server, forward_interval=0.2)
    gw, health = supervised(tmp_path)
    passes, stuck = 0, set()

    async def full_pass(self: object) -> int:  # a pass of a backlog: 0.3 s, full, 10 times
        nonlocal passes
        passes += 1
        await asyncio.sleep(0.3)
        return gw.config.gateway.forward_records if passes <= 10 else 0

    monkeypatch.setattr(relay.RecordForwarder, "forward_once", full_pass)
    async with serving(gw, store, server):
        while passes <= 10:
            stuck.update(health.stuck())
            await asyncio.sleep(0.05)
    assert "records-hung" not in stuck


@pytest.mark.timeout(90)
async def test_a_desired_document_whose_mirror_write_failed_is_mirrored_at_the_next_round(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Attack named: a disk that fills. The write that mirrors a device's desired document into
    the gateway's store failed (StorageUnavailable: a full disk, a locked store) after the
    relay had noted the document's ETag as mirrored, so every later poll was answered 2.03 Valid
    and the device never saw that document until the operator changed it again at the cloud."""
    monkeypatch.setattr(supervise, "RESTART_CAP", 0.5)
    server = await CloudServer.start(tmp_path / "cloud", "127.0.0.1", 0)
    store = await one_device_gateway(tmp_path, server, forward_interval=3600.0, readings=0)
    await server.set_desired(DEVICE, {"detect/anomaly/threshold": 0.7})
    failed = asyncio.Event()

    def full_disk_once(s: Any, *args: Any) -> Any:
        if not failed.is_set():
            failed.set()
            raise StorageUnavailable("database or disk is full")
        return relay.mirror_desired(s, *args)

    monkeypatch.setattr(service, "mirror_desired", full_disk_once)
    gw, _ = supervised(tmp_path)

    def served() -> object:
        return store.desired(DEVICE).entries.get("detect/anomaly/threshold")

    async with serving(gw, store, server):
        await within(30.0, failed.is_set, "the write failed")
        await within(30.0, served, "mirrored after all")
        assert served().value == 0.7  # type: ignore[attr-defined]


@pytest.mark.timeout(90)
async def test_a_first_start_does_not_wait_on_a_device_the_cloud_refuses(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The first start reads a desired document from the cloud to learn its storage identity.
    It asked always as the first device of its credentials (by file name): one the cloud
    refuses (detached, moved to another gateway: 4.03) kept the gateway from ever starting,
    retried every STORE_RETRY s, though its other devices were attached. Now each try asks as
    the next device in turn."""
    monkeypatch.setattr(service, "STORE_RETRY", 0.05)
    server = await CloudServer.start(tmp_path / "cloud", "127.0.0.1", 0)
    store = await one_device_gateway(tmp_path, server, forward_interval=0.2)
    moved = "pump-00"  # sorted first; registered, not attached to this gateway
    (await server.register(moved)).write(tmp_path / "gateway" / "devices" / f"{moved}.json")
    gw, _ = supervised(tmp_path)
    with caplog.at_level(logging.WARNING, logger="agent.gateway"):
        async with serving(gw, store, server):
            await within(30.0, lambda: gw.forwarder and gw.forwarder.forwarded >= 3, "started")
    assert f"/state/{moved}/desired code=4.03" in caplog.text  # it was asked, and refused


@pytest.mark.timeout(90)
async def test_a_device_whose_credential_file_is_removed_is_refused_by_the_gateway(
    tmp_path: Path,
) -> None:
    """Attack named: a stolen device. The operator revokes it at the cloud and removes its
    credential file from the gateway's devices folder (docs/gateway.md: the folder holds the
    credentials of the gateway's devices); before, the gateway kept the credential it had copied
    into its store at an earlier start and went on taking the device's records (acknowledged,
    then held for a cloud that refuses them, never dropped: its disk filled at the device's
    rate). Now a start revokes, in its store, every device credential whose file is gone."""
    server = await CloudServer.start(tmp_path / "cloud", "127.0.0.1", 0)
    store = await one_device_gateway(tmp_path, server, forward_interval=3600.0, readings=0)
    stolen = "pump-02"
    cred = await server.register(stolen)
    cred.write(tmp_path / "gateway" / "devices" / f"{stolen}.json")
    (tmp_path / "device").mkdir()
    cred.write(tmp_path / "device" / "credential.json")
    await server.attach(GW, [stolen])

    async def post_as_device(gw: Gateway, seq: int) -> str:
        assert gw.server is not None
        uris = (gw.server.uri,)
        where = tmp_path / "device"
        security = ClientSecurity.open(
            "oscore", uris, where / "credential.json", where / "oscore.json"
        )
        transport = CoapTransport(RealClock(), uris=uris, security=security)
        try:
            resp = await transport.request(
                "POST", f"{gw.server.uri}/ingest/{stolen}", batch(stolen, range(seq, seq + 1)),
                content_format=112, deadline=10,
            )  # fmt: skip
            return resp.dotted
        except SyncError as err:  # the refusal of its context comes unprotected
            return "4.01" if "answer 4.01 without OSCORE" in str(err) else str(err)
        finally:
            await transport.close()
            security.close()

    try:
        for removed in (False, True):
            if removed:
                (tmp_path / "gateway" / "devices" / f"{stolen}.json").unlink()
            gw, _ = supervised(tmp_path)
            running = asyncio.create_task(gw.run())
            try:
                await within(30.0, lambda g=gw: g.forwarder is not None, "listening")
                answer = await post_as_device(gw, 1 + int(removed))
            finally:
                gw.stop()
                await running
            assert answer == ("4.01" if removed else "2.04"), (removed, answer)
    finally:
        store.close()
        await server.stop()
