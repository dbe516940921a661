"""``edge-agent-cloud migrate``: a SQLite data directory filled with every kind of data (through
a real endpoint and the storage API) copied into PostgreSQL (a fresh database of the session's
private cluster, tests/pg.py), after which every read of the storage seam answers the same on
both; and back again. Refusals and exit codes (agent/exits.py), a migrate interrupted and run
again, a source that changes meanwhile."""

from __future__ import annotations

import hashlib
import socket
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import cbor2
import numpy as np
import pytest

from agent.exits import (
    EX_CANTCREAT,
    EX_IOERR,
    EX_NOINPUT,
    EX_OK,
    EX_TEMPFAIL,
    EX_UNAVAILABLE,
    EX_USAGE,
    CommandError,
)
from agent.modelstore.signing import load_private_key, write_keypair
from agent.sync.transport import CoapTransport
from agent.wire.batch import CF_CBOR, WireRecord
from agent.wire.credentials import Credential
from agent.wire.records import AlertBody, TelemetryBody
from agent.wire.statedoc import Entry
from cloud import migrate as migrate_mod
from cloud.cli import main as cloud_main
from cloud.models import entry_for
from cloud.server import CloudServer
from cloud.storage import SQLiteStorage, Storage, StorageUnavailable, open_storage
from cloud.storebase import TABLES
from drivers.clock import RealClock
from tests.unit.ota.test_release import make_bundle

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parents[2]
FLOAT_AE = ROOT / "models" / "cloud" / "skab-ae.float32.tflite"
T0 = 1_700_000_000.0
DAY = 86_400.0
DEVICES = ("pump-01", "pump-02", "fan-9")
RELEASES = ("1.0", "1.1")


def telemetry(seq: int, when: float) -> WireRecord:
    body = TelemetryBody("motor", when, {"current_a": 1.0 + seq / 100})
    return WireRecord(seq, "telemetry", when, body.to_cbor())


def alert(seq: int, when: float) -> WireRecord:
    body = AlertBody(when, {"score": 1.4, "threshold": 1.0, "kind": "raise", "model": "skab-ae"})
    return WireRecord(seq, "alert", when, body.to_cbor())


def model_window(seed: int) -> list[float]:
    w = np.random.default_rng(seed).normal(0.0, 0.3, (4, 8))
    w[1:, 7] = -5.0
    return [float(v) for v in w.reshape(-1).astype(np.float32)]


def validate_body(seq: int) -> dict[str, Any]:
    the_alert = {"time": T0, "kind": "raise", "score": 1.4, "threshold": 1.0, "model": "skab-ae"}
    return {"seq": seq, "alert": the_alert, "window": model_window(seq)}


async def fill(data: Path, tmp: Path) -> None:
    """Every kind of data: through a running endpoint (verdicts of /validate, a published model,
    OSCORE sequence blocks) and through the storage API (the rest, with times of several days)."""
    server = await CloudServer.start(data, "127.0.0.1", 0, allow_plain=True)
    transport = CoapTransport(RealClock(), lanes=2)
    try:
        await server.add_device(DEVICES[0])
        for seq in (7, 8):
            resp = await transport.request(
                "POST",
                f"{server.uri}/validate/{DEVICES[0]}",
                cbor2.dumps(validate_body(seq)),
                content_format=CF_CBOR,
                deadline=20.0,
            )
            assert resp.dotted == "2.05"
        private, _ = write_keypair(tmp / "keys" / "signing.key")
        entry = entry_for(FLOAT_AE, None, "skab-ae")
        for version in ("3.0.0", "3.0.1"):
            server.models.publish(
                FLOAT_AE.read_bytes(), "skab-ae", version, entry, load_private_key(private)
            )
        await server.db(lambda s: s.reserve_sequence("endpoint", 4096))
    finally:
        await transport.close()
        await server.stop()
    assert cloud_main(["releases", "keygen", "--data", str(data)]) == EX_OK
    bundle = make_bundle(tmp / "bundle")
    for version in RELEASES:
        publish = ["releases", "publish", str(bundle), "--data", str(data), "--version", version]
        assert cloud_main(publish) == EX_OK
    s = SQLiteStorage.in_dir(data)
    try:
        for i, device in enumerate(DEVICES):
            s.add_device(device, T0 + i)
            s.put_credential(Credential.generate(device, "device", bytes([i + 1])), T0)
        s.put_credential(Credential.generate("alice", "operator", b"\x10"), T0)
        s.revoke(DEVICES[2], T0 + 5)
        # records over three days, out of seq order, interleaved between devices
        for day in range(3):
            now = T0 + day * DAY
            s.ingest_many(
                [
                    (DEVICES[0], [telemetry(100 - day * 10 - k, now + k) for k in range(5)], False),
                    (DEVICES[1], [telemetry(day * 10 + k, now + k) for k in range(5)], False),
                    (DEVICES[0], [alert(1000 + day, now + 9)], False),
                ],
                now + 10,
            )
        s.put_reported(DEVICES[0], {"link/state": Entry(1, "up"), "link/rtt_ms": Entry(1, 40)}, T0)
        s.put_reported(
            DEVICES[0], {"link/state": Entry(2, "down"), "queue/depth": Entry(2, 3)}, T0 + 60
        )
        s.put_desired(DEVICES[0], {"model/anomaly": {"name": "skab-ae", "version": "3.0.1"}}, T0)
        s.put_desired(DEVICES[1], {"detect/skab-ae/threshold": 1.2}, T0 + 1)
        failed = {"name": "skab-ae", "version": "3.0.1", "status": "failed", "desired": 1}
        s.put_reported(DEVICES[0], {"model/anomaly": Entry(5, failed)}, T0 + 70)  # blocks rev 1
        assert s.desired(DEVICES[0]).blocked == {"model/anomaly": 1}
    finally:
        s.close()


def reads(s: Storage) -> dict[str, Any]:
    """Every read of the storage seam, over everything the filled storage holds."""
    out: dict[str, Any] = {
        "devices": s.devices(),
        "credentials": s.credentials(),
        "storage_id": s.storage_id(),
        "models": s.models(),
        "model": [s.model("skab-ae", v) for v in ("3.0.0", "3.0.1", "9")],
        "files": [s.model_file("skab-ae", v) for v in ("3.0.0", "3.0.1")],
        "links": s.dump("link_history", None, 1000),
        "verdicts": s.dump("verdicts", None, 1000),
        "counts": {name: s.table_count(name) for name in TABLES},
        "releases": s.releases(),
        "release_files": [release_file(s, v) for v in (*RELEASES, "9")],
    }
    for device in (*DEVICES, "nobody"):
        out[device] = {
            "device": s.device(device),
            "records": s.records(device),
            "by_arrival": s.records(device, by_arrival=True),
            "since": s.records(device, since=T0 + DAY, limit=3),
            "seqs": s.seqs(device),
            "counts": s.counts(device),
            "reported": s.reported(device),
            "verdicts": [s.verdict(device, seq) for seq in (7, 8, 9)],
        }
        if device != "nobody":
            out[device]["desired"] = s.desired(device)
    return out


def release_file(s: Storage, version: str) -> tuple[int, str] | None:
    """The size and SHA-256 of a release's stored file (None: not published)."""
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch) / "release"
        size = s.release_file(version, out)
        return None if size is None else (size, hashlib.sha256(out.read_bytes()).hexdigest())


@pytest.fixture
async def source(tmp_path: Path) -> AsyncIterator[Path]:
    data = tmp_path / "cloud"
    await fill(data, tmp_path)
    yield data


async def test_a_sqlite_storage_moves_to_postgresql_and_every_read_answers_the_same(
    source: Path, pg_dsn: str, tmp_path: Path, capsys: Any
) -> None:
    assert cloud_main(["migrate", "--from", f"sqlite:{source}", "--to", pg_dsn]) == EX_OK
    out = capsys.readouterr().out
    copied = {line.split()[0]: line.split()[1] for line in out.splitlines() if "copied" in line}
    assert copied["records"] == "33" and copied["verdicts"] == "2" and "verified: devices 3," in out
    old, new = SQLiteStorage.in_dir(source), open_storage(pg_dsn)
    try:
        want, got = reads(old), reads(new)
        assert got == want  # the storage id too: the same deployment, moved
        assert got["counts"]["verdicts"] == 2 and got["counts"]["models"] == 2
        assert [r.version for r in got["releases"]] == list(RELEASES)
        assert all(f is not None for f in got["release_files"][:2])
        assert got["pump-01"]["desired"].blocked == {"model/anomaly": 1}
        assert new.migration() is None
        # never a nonce twice, never an arrival number twice
        assert new.reserve_sequence("endpoint", 1) >= old.reserve_sequence("endpoint", 1)
        new.ingest(DEVICES[1], [telemetry(500, T0)], T0 + 5 * DAY)
        top = max(r.arrival for d in DEVICES for r in old.records(d))
        assert new.records(DEVICES[1], by_arrival=True)[-1].arrival > top
    finally:
        old.close()
        new.close()
    # and back, PostgreSQL to SQLite: the same again (the new record aside)
    back = tmp_path / "back"
    assert cloud_main(["migrate", "--from", pg_dsn, "--to", f"sqlite:{back}"]) == EX_OK
    pg, lite = open_storage(pg_dsn), SQLiteStorage.in_dir(back)
    try:
        assert reads(lite) == reads(pg)
    finally:
        pg.close()
        lite.close()


async def test_an_endpoint_on_the_moved_storage_answers_as_the_old_one(
    source: Path, pg_dsn: str, tmp_path: Path
) -> None:
    assert cloud_main(["migrate", "--from", f"sqlite:{source}", "--to", pg_dsn]) == EX_OK
    old = SQLiteStorage.in_dir(source)
    old_id, stored = old.storage_id(), old.verdict(DEVICES[0], 7)
    old.close()
    server = await CloudServer.start(
        tmp_path / "new-host", "127.0.0.1", 0, allow_plain=True, storage=pg_dsn
    )
    transport = CoapTransport(RealClock(), lanes=1)
    try:
        assert server.store_id == old_id  # devices that pinned the old storage accept it
        resp = await transport.request(
            "POST",
            f"{server.uri}/validate/{DEVICES[0]}",
            cbor2.dumps(validate_body(7)),
            content_format=CF_CBOR,
            deadline=20.0,
        )
        assert resp.payload == stored and server.inference.validation_runs == {}
        listing = await transport.request("GET", f"{server.uri}/models/skab-ae", deadline=10.0)
        assert [m["version"] for m in cbor2.loads(listing.payload)] == ["3.0.0", "3.0.1"]
    finally:
        await transport.close()
        await server.stop()


async def test_a_target_that_holds_data_is_refused_and_left_alone(
    source: Path, pg_dsn: str, capsys: Any
) -> None:
    target = open_storage(pg_dsn)
    try:
        target.add_device("stranger", T0)
        target_id = target.storage_id()
    finally:
        target.close()
    assert cloud_main(["migrate", "--from", f"sqlite:{source}", "--to", pg_dsn]) == EX_CANTCREAT
    err = capsys.readouterr().err
    assert "holds data already (devices 1)" in err and "empty" in err and err[-1] == "\n"
    target = open_storage(pg_dsn)
    try:
        assert target.migration() is None and target.storage_id() == target_id
        assert [d.id for d in target.devices()] == ["stranger"]
    finally:
        target.close()
    # nor one that holds only a published release
    bundle = make_bundle(source.parent / "other-bundle")
    lone = source.parent / "lone"
    assert cloud_main(["releases", "keygen", "--data", str(lone)]) == EX_OK
    publish = ["releases", "publish", str(bundle), "--data", str(lone), "--version", "7"]
    assert cloud_main(publish) == EX_OK
    capsys.readouterr()
    assert cloud_main(["migrate", "--from", f"sqlite:{source}", "--to", f"sqlite:{lone}"]) == 73
    assert "(releases 1)" in capsys.readouterr().err
    # a finished migrate is not run twice either
    empty = source.parent / "empty"
    assert cloud_main(["migrate", "--from", f"sqlite:{source}", "--to", f"sqlite:{empty}"]) == 0
    assert cloud_main(["migrate", "--from", f"sqlite:{source}", "--to", f"sqlite:{empty}"]) == 73


def test_usage_and_missing_or_unreachable_storages(tmp_path: Path, capsys: Any) -> None:
    same = f"sqlite:{tmp_path}"
    assert cloud_main(["migrate", "--from", same, "--to", f"{tmp_path}/"]) == EX_USAGE
    with pytest.raises(SystemExit) as usage:
        cloud_main(["migrate", "--to", same])
    assert usage.value.code == EX_USAGE
    assert cloud_main(["migrate", "--from", f"sqlite:{tmp_path / 'none'}", "--to", same]) == (
        EX_NOINPUT
    )
    assert not (tmp_path / "none").exists()  # a missing source is not created
    SQLiteStorage.in_dir(tmp_path / "src").close()
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    nowhere = f"postgresql://edge:secret@127.0.0.1:{port}/edge"
    assert cloud_main(["migrate", "--from", f"sqlite:{tmp_path / 'src'}", "--to", nowhere]) == (
        EX_UNAVAILABLE  # a database server that refuses the connection
    )
    err = capsys.readouterr().err
    assert "secret" not in err and "refused" in err.lower()


async def test_an_interrupted_migrate_resumes_and_a_changing_source_is_caught(
    source: Path, pg_dsn: str, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    from cloud.pgstorage import PostgresStorage

    real_load = PostgresStorage.load
    calls = {"records": 0}

    def failing_load(self: Any, name: str, rows: Any) -> int:
        if name == "records":
            calls["records"] += 1
            if calls["records"] == 4:  # the connection is lost in the middle of the records
                raise StorageUnavailable("server closed the connection unexpectedly")
        return real_load(self, name, rows)

    monkeypatch.setattr(PostgresStorage, "load", failing_load)
    args = ["migrate", "--from", f"sqlite:{source}", "--to", pg_dsn, "--chunk", "5"]
    assert cloud_main(args) == EX_IOERR
    target = open_storage(pg_dsn)
    old = SQLiteStorage.in_dir(source)
    try:
        assert target.migration() == old.storage_id() and target.table_count("records") == 15
        assert target.storage_id() != old.storage_id()  # not taken over before it is complete
        # another source may not continue this one
        other = SQLiteStorage.in_dir(source.parent / "other")
        with pytest.raises(CommandError) as caught:
            migrate_mod.migrate(other, target)
        assert caught.value.code == EX_CANTCREAT and "another storage" in str(caught.value)
        other.close()
        # run again, while an endpoint still writes to the source: caught at the end
        monkeypatch.setattr(PostgresStorage, "load", real_load)

        def say(line: str) -> None:
            if line.startswith("records"):
                old.ingest(DEVICES[2], [telemetry(1, T0)], T0 + 9 * DAY)

        with pytest.raises(CommandError) as caught:
            migrate_mod.migrate(old, target, 5, say)
        assert caught.value.code == EX_TEMPFAIL
        assert "records: source 34, target 33" in str(caught.value)
        assert "run the same command again" in str(caught.value)
    finally:
        target.close()
        old.close()
    capsys.readouterr()
    assert cloud_main(args) == EX_OK  # the rest
    assert "resuming the unfinished migrate" in capsys.readouterr().out
    old, new = SQLiteStorage.in_dir(source), open_storage(pg_dsn)
    try:
        assert reads(new) == reads(old)
    finally:
        old.close()
        new.close()


def test_a_release_whose_stored_file_is_damaged_is_named_and_left_out(
    source: Path, tmp_path: Path, capsys: Any
) -> None:
    """The rest is copied and verified; the damaged release could not be served either."""
    stored = source / "releases" / RELEASES[1] / "release.tar"
    data = bytearray(stored.read_bytes())
    data[len(data) // 2] ^= 0xFF
    stored.write_bytes(bytes(data))
    target = tmp_path / "target"
    capsys.readouterr()
    assert cloud_main(["migrate", "--from", f"sqlite:{source}", "--to", f"sqlite:{target}"]) == 0
    out = capsys.readouterr().out
    assert f"release {RELEASES[1]}: not copied" in out and "publish it again" in out
    assert "releases               1 copied" in out and "releases 1" in out
    moved = SQLiteStorage.in_dir(target)
    try:
        assert [r.version for r in moved.releases()] == [RELEASES[0]]
        assert release_file(moved, RELEASES[0]) is not None
    finally:
        moved.close()
