"""The pre-switch data check (agent/ota/compat.py) on real queue files: the store's own file
passes, a newer schema is named, a missing or foreign file is no reason to refuse."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from agent.ota.compat import main, problems
from agent.store.settings import APPLICATION_ID, SCHEMA_VERSION

pytestmark = pytest.mark.timeout(30)


def queue(path: Path, version: int, app: int = APPLICATION_ID) -> Path:
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("CREATE TABLE records (seq INTEGER PRIMARY KEY)")
    conn.execute(f"PRAGMA application_id = {app}")
    conn.execute(f"PRAGMA user_version = {version}")
    conn.commit()
    conn.close()
    return path


def test_the_current_schema_is_readable(tmp_path: Path) -> None:
    queue(tmp_path / "queue.db", SCHEMA_VERSION)
    assert problems(tmp_path) == []
    assert main(["--data-dir", str(tmp_path)]) == 0


def test_a_newer_schema_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    queue(tmp_path / "queue.db", SCHEMA_VERSION + 1)
    assert main(["--data-dir", str(tmp_path)]) == 1
    assert f"queue schema version {SCHEMA_VERSION + 1}" in capsys.readouterr().out


def test_no_queue_or_another_file_is_not_a_reason(tmp_path: Path) -> None:
    assert problems(tmp_path) == []
    queue(tmp_path / "other.db", 7, app=1234)
    assert problems(tmp_path, tmp_path / "other.db") == []
    (tmp_path / "queue.db").write_bytes(b"garbage")
    assert problems(tmp_path) == []
