"""Agent releases in a PostgreSQL storage, end to end (docs/ota.md "Release storage"): the real
command line publishes and assigns on ``--storage postgresql://``, two real endpoints on that
storage (two hosts: each its own --data, so its own cache) serve the manifest and the file
block-wise, and the agent's own staging code (agent/ota/updater.py) downloads and verifies what
the operator assigned. A file altered at rest in the database is refused (5.03), never cached.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import cbor2
import psycopg
import pytest

from agent.errors import SyncError
from agent.modelstore.signing import load_public_key
from agent.ota.release import check_file
from agent.ota.updater import ReleaseFetcher, stage
from agent.sync.transport import CoapTransport
from cloud import releasestore
from cloud.cli import main as cloud_main
from cloud.releases import RELEASE_FILE
from cloud.server import CloudServer
from cloud.storage import open_storage
from drivers.clock import RealClock

from ..unit.ota.test_release import make_bundle

pytestmark = pytest.mark.timeout(90)

FAST = {"ack_timeout": 0.2, "block_deadline": 8.0, "manifest_deadline": 8.0}


def cli(*argv: str) -> int:
    return cloud_main(list(argv))


async def test_a_release_published_to_postgresql_is_served_by_every_endpoint_on_it(
    tmp_path: Path, pg_dsn: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.setattr(releasestore, "BLOCK_BYTES", 3000)  # several rows, not block-aligned
    ops = tmp_path / "ops"  # the operator's --data: the release key, nothing served from it
    where = ("--data", str(ops), "--storage", pg_dsn)
    assert cli("releases", "keygen", "--data", str(ops)) == 0
    assert cli("devices", "add", "pump-01", *where) == 0
    bundle = make_bundle(tmp_path / "bundle")
    assert cli("releases", "publish", str(bundle), "--version", "1.1", *where) == 0
    capsys.readouterr()
    assert cli("releases", "assign", "1.1", "--device", "pump-01", *where) == 0
    sha = json.loads(capsys.readouterr().out)["sha256"]
    storage = open_storage(pg_dsn)
    try:
        desired = storage.desired("pump-01").entries["agent/version"].value
    finally:
        storage.close()
    assert desired == {"version": "1.1", "sha256": sha}

    hosts = [
        await CloudServer.start(
            tmp_path / f"host-{i}", "127.0.0.1", 0, allow_plain=True, storage=pg_dsn
        )
        for i in (1, 2)
    ]
    transport = CoapTransport(RealClock(), lanes=4)
    try:
        for i, server in enumerate(hosts, 1):
            listing = await transport.request("GET", f"{server.uri}/releases", deadline=10.0)
            assert [r["sha256"] for r in cbor2.loads(listing.payload)] == [sha]
            fetcher = ReleaseFetcher(transport, server.uri, **FAST)
            staged = await stage(
                fetcher,
                version="1.1",
                sha256=desired["sha256"],
                key=load_public_key(ops / "releases" / "release.key.pub"),
                data_dir=tmp_path / f"device-{i}",
            )
            assert staged.manifest.sha256 == sha
            # each host serves from its own cache, filled from the storage and checked
            cached = tmp_path / f"host-{i}" / "releases" / "1.1" / RELEASE_FILE
            check_file(staged.manifest, cached)
            assert cached.read_bytes() == staged.file.read_bytes()
    finally:
        await transport.close()
        for server in hosts:
            await server.stop()


async def test_a_release_altered_in_the_database_is_refused_and_never_cached(
    tmp_path: Path, pg_dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    ops = tmp_path / "ops"
    where = ("--data", str(ops), "--storage", pg_dsn)
    assert cli("releases", "keygen", "--data", str(ops)) == 0
    bundle = make_bundle(tmp_path / "bundle")
    assert cli("releases", "publish", str(bundle), "--version", "1.1", *where) == 0
    with psycopg.connect(pg_dsn, autocommit=True) as conn:  # corrupted at rest
        conn.execute(
            "UPDATE release_blocks SET data = overlay(data placing '\\xff'::bytea from 2000)"
            " WHERE version = '1.1'"
        )
    server = await CloudServer.start(
        tmp_path / "host", "127.0.0.1", 0, allow_plain=True, storage=pg_dsn
    )
    transport = CoapTransport(RealClock(), lanes=1)
    try:
        manifest = await transport.request(
            "GET", f"{server.uri}/releases/1.1/manifest", deadline=10.0
        )
        assert manifest.code == 69  # 2.05 Content
        fetcher = ReleaseFetcher(transport, server.uri, **FAST)
        with pytest.raises(SyncError, match=r"5\.03 the stored release does not match"):
            await stage(
                fetcher,
                version="1.1",
                sha256=None,
                key=load_public_key(ops / "releases" / "release.key.pub"),
                data_dir=tmp_path / "device",
            )
        assert "event=stored_release_corrupt version=1.1" in caplog.text
        assert not (tmp_path / "host" / "releases" / "1.1").exists()
        assert list((tmp_path / "host" / "releases").glob(".*")) == []  # no leftover
    finally:
        await transport.close()
        await server.stop()


async def test_releases_assign_through_a_running_endpoint_as_an_operator(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """``releases assign --server URI --credential FILE``: the release and its SHA-256 from the
    storage, the desired write by the endpoint (as ``desired set --server``); without an
    operator's credential it is refused (4.01) and nothing is assigned or put in the history."""
    data = tmp_path / "cloud"
    assert cli("releases", "keygen", "--data", str(data)) == 0
    assert cli("devices", "add", "--data", str(data), "pump-01") == 0
    bundle = make_bundle(tmp_path / "bundle")
    assert cli("releases", "publish", str(bundle), "--data", str(data), "--version", "1.1") == 0
    server = await CloudServer.start(data, "127.0.0.1", 0)
    try:
        op = tmp_path / "alice.json"
        (await server.register("alice", "operator")).write(op)
        argv = ["releases", "assign", "1.1", "--device", "pump-01", "--data", str(data)]
        argv += ["--server", server.uri]
        capsys.readouterr()
        assert await asyncio.to_thread(cloud_main, argv) != 0
        assert "4.01" in capsys.readouterr().err
        assert "agent/version" not in (await server.desired("pump-01")).entries
        assert await asyncio.to_thread(cloud_main, [*argv, "--credential", str(op)]) == 0
        sha = json.loads(capsys.readouterr().out.splitlines()[-1])["sha256"]
        entry = (await server.desired("pump-01")).entries["agent/version"]
        assert entry.value == {"version": "1.1", "sha256": sha}
        history = await server.db(lambda s: s.release_history("pump-01"))
        assert [(r.version, r.result, r.reason) for r in history] == [("1.1", "assigned", "device")]
    finally:
        await server.stop()
