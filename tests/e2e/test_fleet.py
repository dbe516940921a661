"""tools/fleet.py against a real endpoint on loopback: a small fleet (worker processes, real
OSCORE with the Echo round trip, the real compact encoding) with and without security, and
through the impairment proxy with 10 % loss each way. Whatever the link did, every record the
endpoint acknowledged is stored, nothing is stored twice, and what is stored is exactly what was
acknowledged plus what was stored without its ack reaching the device. No timing assertions."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import fleet
import pytest
from linkem import Impairment

from cloud.server import CloudServer

DEVICES = 50
FLEET = Path(__file__).resolve().parents[2] / "tools" / "fleet.py"


@pytest.fixture(params=["oscore", "none"])
def security(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
async def endpoint(security: str, tmp_path: Path) -> AsyncIterator[CloudServer]:
    """The endpoint; with security "none" it serves plain CoAP too (``serve --insecure``)."""
    srv = await CloudServer.start(
        tmp_path / "cloud", "127.0.0.1", 0, allow_plain=security == "none"
    )
    yield srv
    await srv.stop()


async def run(server: CloudServer, security: str, **options: object) -> fleet.FleetReport:
    creds = await server.db(lambda s: fleet.provision(s, DEVICES, "fleet"))
    await server.reload_principals()
    config = fleet.FleetConfig(
        target=server.uri,
        devices=DEVICES,
        processes=2,
        interval=1.0,
        batch=10,
        duration=3.0,
        security=security,
        credentials=tuple(creds),
        seed=7,
        **options,  # type: ignore[arg-type]
    )
    return await fleet.run_fleet(config)


async def check(server: CloudServer, report: fleet.FleetReport) -> fleet.Verification:
    result = await server.db(lambda s: fleet.verify(s, report))
    lost, duplicated = result
    assert lost == 0 and duplicated == 0 and result.foreign == 0
    assert result.stored == report.records_acked + result.stored_unacked
    assert result.devices == DEVICES and report.abandoned == 0
    return result


@pytest.mark.timeout(60)
async def test_fleet_every_acknowledged_record_stored_once(
    endpoint: CloudServer, security: str
) -> None:
    report = await run(endpoint, security, drain=20.0)
    result = await check(endpoint, report)
    assert report.errors == {} and report.timeouts == 0
    assert report.records_acked == report.records_generated == DEVICES * 10 * 3
    assert result.stored_unacked == 0
    # every device went through the Echo round trip of its new OSCORE ID Context, once
    assert report.echo_handshakes == (DEVICES if security == "oscore" else 0)
    assert report.requests_sent == report.requests_acked + report.echo_handshakes


@pytest.mark.timeout(90)
@pytest.mark.parametrize("security", ["oscore"])
async def test_fleet_through_lossy_link_loses_nothing(endpoint: CloudServer, security: str) -> None:
    """10 % loss each way: requests, answers (the Echo round trip's too) and ACKs are lost and
    retransmitted; a lost answer leaves its records stored but unacknowledged, sent again and
    acknowledged as duplicates. With OSCORE, the harder case (plain CoAP's message layer is the
    same)."""
    report = await run(
        endpoint, security, proxy=Impairment(loss=0.1), proxy_seed=11, ack_timeout=0.5, drain=25.0
    )
    await check(endpoint, report)
    assert report.retransmissions > 0
    assert report.proxy is not None and report.proxy["up"]["dropped"]["loss"] > 0
    assert report.records_acked > 0


@pytest.mark.timeout(120)
def test_command_line_serves_runs_and_verifies(tmp_path: Path) -> None:
    """``run --serve DIR``: provisions a new endpoint's database, runs ``edge-agent-cloud
    serve`` on it, runs the fleet, stops the endpoint, verifies; one JSON object on stdout."""
    args = ["--devices", "20", "--processes", "1", "--interval", "1", "--duration", "2"]
    args += ["--security", "none", "--drain", "20", "--json"]
    out = subprocess.run(
        [sys.executable, str(FLEET), "run", "--serve", str(tmp_path / "cloud"), *args],
        capture_output=True,
        text=True,
        timeout=110,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert doc["verification"]["lost"] == 0 and doc["verification"]["duplicated"] == 0
    assert doc["verification"]["stored"] == doc["records_acked"] > 0
    assert doc["endpoint"]["cpu_s_window"] >= 0


@pytest.mark.timeout(240)
async def test_one_of_three_processes_killed_mid_run_loses_nothing(
    tmp_path: Path, pg_dsn: str
) -> None:
    """`serve --processes 3` on PostgreSQL; one worker is SIGKILLed in the middle of a fleet
    run. Its devices are hashed to the other workers (a new Echo each), the parent starts it
    again, and every acknowledged record is stored exactly once."""
    import asyncio
    import os
    import signal

    from cloud.storage import open_storage

    storage = open_storage(pg_dsn)
    try:
        creds = fleet.provision(storage, 200, "fleet")
    finally:
        storage.close()
    endpoint = fleet.EndpointProcess(tmp_path / "data", insecure=False, storage=pg_dsn, processes=3)
    (tmp_path / "data").mkdir()
    await endpoint.start()
    assert endpoint.proc is not None
    try:
        config = fleet.FleetConfig(
            target=endpoint.uri,
            devices=200,
            processes=1,
            interval=1.0,
            batch=5,
            duration=12.0,
            devices_per_socket=1,  # each device its own address: spread over the workers
            credentials=tuple(creds),
            seed=3,
        )
        running = asyncio.create_task(fleet.run_fleet(config))
        await asyncio.sleep(6)
        workers = [p for p in fleet.process_tree(endpoint.proc.pid) if p != endpoint.proc.pid]
        assert len(workers) == 3
        os.kill(workers[1], signal.SIGKILL)
        report = await running
    finally:
        await endpoint.stop()
    storage = open_storage(pg_dsn)
    try:
        result = fleet.verify(storage, report)
    finally:
        storage.close()
    assert (result.lost, result.duplicated) == (0, 0)
    assert report.records_acked == report.records_generated > 0
    log = (tmp_path / "data" / "endpoint.log").read_text()
    assert "event=worker_exited" in log and "event=worker_restarted" in log
    assert "Traceback" not in log
