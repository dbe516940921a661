"""Hostile input at the SQLite storage (cloud/storage.py) and the state documents it keeps: a file
damaged at rest, a record whose time is not a number, a NUL character in reported or desired
text (agent/wire/statedoc.py), and what an older endpoint stored before these were refused.
Real SQLite files, a real endpoint on loopback and its real command line."""

from __future__ import annotations

import hashlib
import math
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import cbor2
import pytest

from agent.sync.transport import CoapTransport
from agent.wire.batch import WireRecord
from agent.wire.records import TelemetryBody
from agent.wire.statedoc import Entry
from cloud.cli import main as cloud_main
from cloud.server import CloudServer
from cloud.storage import DB_NAME, SQLiteStorage, StorageUnavailable
from drivers.clock import RealClock

pytestmark = pytest.mark.timeout(60)

T0 = 1_700_000_000.0
DEV, OTHER = "pump-01", "pump-02"
V = int(T0 * 1000)


def telemetry(seq: int, sensor: str = "motor") -> WireRecord:
    body = TelemetryBody(sensor, T0 + seq, {"current_a": 1.5}).to_cbor()
    return WireRecord(seq, "telemetry", T0 + seq, body)


@pytest.fixture
def storage(tmp_path: Path) -> Iterator[SQLiteStorage]:
    s = SQLiteStorage.in_dir(tmp_path / "cloud")
    s.add_device(DEV, T0)
    s.add_device(OTHER, T0)
    yield s
    s.close()


# -- a file damaged at rest ----------------------------------------------------------------------


def damaged_store(data: Path) -> Path:
    """A store of 500 records, closed cleanly, then two pages in its middle overwritten (a disk
    that returned garbage): the damage comes after a clean stop."""
    s = SQLiteStorage.in_dir(data)
    s.add_device(DEV, T0)
    s.ingest(DEV, [telemetry(i, "s" * 100) for i in range(500)], T0)
    s.close()
    path = data / DB_NAME
    size = path.stat().st_size
    with path.open("r+b") as f:
        f.seek(size // 2 // 4096 * 4096)
        f.write(b"\xff" * 8192)
    return path


def test_attack_a_damaged_page_is_refused_at_open_and_nothing_is_written(tmp_path: Path) -> None:
    path = damaged_store(tmp_path / "cloud")
    before = hashlib.sha256(path.read_bytes()).digest()
    with pytest.raises(StorageUnavailable) as refused:
        SQLiteStorage(path)
    text = str(refused.value)
    assert text.startswith(f"{path}: the database is damaged (Page ")
    assert 'docs/ops.md "A damaged database"' in text and "\n" not in text
    cause = refused.value.__cause__
    assert isinstance(cause, sqlite3.DatabaseError) and "malformed" in str(cause)
    assert hashlib.sha256(path.read_bytes()).digest() == before
    assert not (tmp_path / "cloud" / f"{DB_NAME}-wal").exists()  # closed: checkpointed, gone


def test_attack_a_damaged_schema_page_is_refused_with_the_same_line(tmp_path: Path) -> None:
    s = SQLiteStorage.in_dir(tmp_path / "cloud")
    s.close()
    path = tmp_path / "cloud" / DB_NAME
    with path.open("r+b") as f:
        f.seek(100)  # page 1 after the file header: the schema's b-tree
        f.write(b"\xff" * 3996)
    with pytest.raises(StorageUnavailable, match=r"the database is damaged \(.*malformed"):
        SQLiteStorage(path)


def test_attack_a_damaged_store_stops_serve_and_commands_with_one_line_and_exit_65(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "cloud"
    damaged_store(data)
    for argv in (
        ["devices", "list", "--data", str(data)],
        ["export", "--data", str(data), "--device", DEV],
        ["serve", "--data", str(data), "--listen", "127.0.0.1:0"],
    ):
        assert cloud_main(argv) == 65
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "the database is damaged" in err, err


def test_a_sound_store_opens_again_and_again(tmp_path: Path) -> None:
    for n in range(3):
        s = SQLiteStorage.in_dir(tmp_path / "cloud")
        s.add_device(DEV, T0)
        s.ingest(DEV, [telemetry(n)], T0)
        s.close()
    s = SQLiteStorage.in_dir(tmp_path / "cloud")
    assert s.seqs(DEV) == [0, 1, 2]
    s.close()


# -- a record whose time is not a number ---------------------------------------------------------


def test_a_record_without_a_usable_body_time_is_stored_at_its_created_time(
    storage: SQLiteStorage,
) -> None:
    body = TelemetryBody("motor", math.nan, {"x": 1.0}).to_cbor()
    result = storage.ingest(DEV, [WireRecord(4, "telemetry", T0 + 4, body)], T0)
    assert result.new == 1
    [stored] = storage.records(DEV)
    assert stored.time == T0 + 4


# -- NUL in state text ---------------------------------------------------------------------------


def test_text_with_nul_an_older_endpoint_stored_is_read_back_as_stored(
    storage: SQLiteStorage,
) -> None:
    db = sqlite3.connect(storage.path, isolation_level=None)
    try:
        db.execute(
            "INSERT INTO reported (device, key, version, value, updated) VALUES (?, ?, ?, ?, ?)",
            (DEV, "link/state", V, cbor2.dumps("up\x00"), T0),
        )
        logs = {"id": 5, "args": {"since": "x\x00"}}
        db.execute(
            "INSERT INTO desired (device, key, version, value, updated, blocked) "
            "VALUES (?, ?, 1, ?, ?, NULL)",
            (DEV, "command/logs", cbor2.dumps(logs), T0),
        )
        db.execute("UPDATE devices SET desired_rev = 1 WHERE id = ?", (DEV,))
    finally:
        db.close()
    assert storage.reported(DEV)["link/state"] == Entry(V, "up\x00")
    doc = storage.desired(DEV)
    assert doc.entries["command/logs"] == Entry(1, logs)
    assert cbor2.loads(doc.to_cbor())["keys"]["command/logs"] == [1, logs]  # served as stored
    # other keys are written around it, and a new value replaces it
    storage.put_reported(DEV, {"queue/depth": Entry(V, 3)}, T0)
    new, changed = storage.put_desired(DEV, {"sensor/motor/enabled": False}, T0)
    assert changed == ["sensor/motor/enabled"] and new.entries["command/logs"] == Entry(1, logs)
    storage.put_reported(DEV, {"link/state": Entry(V + 1, "up")}, T0)
    assert storage.reported(DEV)["link/state"] == Entry(V + 1, "up")


async def test_attack_nul_in_a_reported_put_gets_4_00_naming_the_key(tmp_path: Path) -> None:
    srv = await CloudServer.start(tmp_path / "cloud", "127.0.0.1", 0, allow_plain=True)
    transport = CoapTransport(RealClock())
    try:
        await srv.add_device(DEV)
        uri = f"{srv.uri}/state/{DEV}/reported"
        doc = {"queue/depth": [V, 3], "link/state": [V, "up\x00"]}
        refused = await transport.request("PUT", uri, cbor2.dumps(doc), content_format=60)
        assert refused.dotted == "4.00", refused.payload
        assert b"link/state" in refused.payload and b"NUL" in refused.payload
        assert await srv.reported(DEV) == {}
        doc["link/state"] = [V, "up\n"]  # another control character is kept
        taken = await transport.request("PUT", uri, cbor2.dumps(doc), content_format=60)
        assert taken.dotted == "2.04", taken.payload
        assert (await srv.reported(DEV))["link/state"].value == "up\n"
    finally:
        await transport.close()
        await srv.stop()


def test_an_open_told_the_file_was_checked_moments_ago_does_not_read_it_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The check reads the whole file (tens of seconds for a gigabyte on an SD card): the
    gateway checks its store when it registers its devices, and its server's open right after,
    like a serving endpoint's daily prune, passes check=False."""
    from cloud import storage as storage_module

    calls: list[Path] = []
    real = storage_module.quick_check
    monkeypatch.setattr(
        storage_module, "quick_check", lambda db, path: (calls.append(path), real(db, path))
    )
    SQLiteStorage.in_dir(tmp_path / "cloud").close()
    storage_module.open_storage(tmp_path / "cloud").close()
    assert len(calls) == 2
    SQLiteStorage.in_dir(tmp_path / "cloud", check=False).close()
    storage_module.open_storage(tmp_path / "cloud", check=False).close()
    assert len(calls) == 2
