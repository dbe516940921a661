"""The data format checks (agent/ota/compat.py) on real files: the store's own queue passes, a
newer schema is named, a missing or foreign file is no reason to refuse; the agent's record of
what it writes (DATA/formats.json) is refused when newer and ignored when damaged; the root
helper asks the new release and the running one (their bin/python) before a switch and refuses
a release whose data the running one could not read after a rollback."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from agent.errors import ConfigError
from agent.ota import bootcheck
from agent.ota.compat import (
    FORMATS_FILE,
    READS,
    WRITES,
    check_and_stamp,
    describe,
    main,
    parse_description,
    problems,
    rollback_problems,
)
from agent.ota.release import ReleaseError
from agent.ota.updater import _check_data
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


# -- the other kinds of data: DATA/formats.json, and the rollback direction ----------------------


def test_the_agent_records_what_it_writes_and_refuses_newer_data(tmp_path: Path) -> None:
    q = tmp_path / "elsewhere" / "q.db"
    check_and_stamp(tmp_path, q)
    doc = json.loads((tmp_path / FORMATS_FILE).read_text())
    assert doc == {"formats": WRITES, "queue": str(q)}
    check_and_stamp(tmp_path, q)  # its own record: fine
    doc["formats"]["calibration"] = READS["calibration"][1] + 1  # a newer release ran here
    (tmp_path / FORMATS_FILE).write_text(json.dumps(doc))
    with pytest.raises(ConfigError) as err:
        check_and_stamp(tmp_path, q)
    assert f"calibration version {READS['calibration'][1] + 1}" in str(err.value)
    assert "written by a newer release" in str(err.value)
    # the record names the queue file: its header is read there, not at DATA/queue.db
    doc["formats"]["calibration"] = 1
    (tmp_path / FORMATS_FILE).write_text(json.dumps(doc))
    q.parent.mkdir()
    queue(q, SCHEMA_VERSION + 1)
    assert problems(tmp_path) == [
        f"{q}: queue schema version {SCHEMA_VERSION + 1}, this release "
        f"reads {SCHEMA_VERSION}..{SCHEMA_VERSION}"
    ]


@pytest.mark.parametrize(
    "text",
    [
        "not json",
        "[1, 2]",
        '{"formats": "state"}',
        '{"formats": {"state": -1, "models": true, "calibration": "2", "x": 1.5}}',
        '{"formats": {"unknown-kind": 99}, "queue": 7}',
    ],
)
def test_a_damaged_or_foreign_record_is_no_reason_to_refuse(tmp_path: Path, text: str) -> None:
    (tmp_path / FORMATS_FILE).write_text(text)
    assert problems(tmp_path) == []


def test_a_record_that_cannot_be_written_does_not_stop_the_start(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / FORMATS_FILE).mkdir()  # os.replace onto a directory fails: OSError
    check_and_stamp(tmp_path, tmp_path / "queue.db")
    assert "event=formats_not_recorded" in caplog.text


def test_rollback_direction_expand_then_contract() -> None:
    old_reads = {"state": (1, 1), "queue": (1, 1)}
    # a release that writes a new state version the running one cannot read: refused
    found = rollback_problems({"state": 2, "queue": 1}, old_reads)
    assert found == [
        "it writes state version 2, which the running release (reads 1..1) cannot read "
        "after a rollback"
    ]
    # expand: the release before reads 1..2 and still writes 1; contract: the next writes 2
    assert rollback_problems({"state": 1, "queue": 1}, {"state": (1, 2), "queue": (1, 1)}) == []
    assert rollback_problems({"state": 2, "queue": 1}, {"state": (1, 2), "queue": (1, 1)}) == []
    # a kind the running release does not know is data it ignores
    assert rollback_problems({"newkind": 1}, old_reads) == []


def test_describe_round_trip_and_hostile_descriptions(capsys: pytest.CaptureFixture) -> None:
    assert main(["--describe"]) == 0
    writes, reads = parse_description(capsys.readouterr().out)
    assert writes == WRITES and reads == READS
    for bad in (
        "",
        "[]",
        '{"reads": {}}',
        '{"reads": {"state": [2, 1]}, "writes": {}}',
        '{"reads": {"state": [1]}, "writes": {}}',
        '{"reads": {}, "writes": {"state": "1"}}',
        '{"reads": {}, "writes": {"state": true}}',
    ):
        with pytest.raises(ValueError):
            parse_description(bad)


def fake_python(path: Path, describe: dict, data_ok: bool = True) -> None:
    """A release's bin/python that answers the two compat questions as ``describe`` says."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        "#!/bin/sh\n"
        'case "$*" in\n'
        f"  *--describe*) echo '{json.dumps(describe)}' ;;\n"
        f"  *) {'exit 0' if data_ok else 'echo state version 9, this release reads 1..1; exit 1'}"
        " ;;\n"
        "esac\n"
    )
    path.chmod(0o755)


def release_tree(tmp_path: Path, new: dict, data_ok: bool = True) -> tuple[Path, Path]:
    root = tmp_path / "opt"
    fake_python(root / "releases" / "1.0" / "bin" / "python", describe())
    bootcheck.set_link(root, bootcheck.CURRENT, "releases/1.0")
    rel = root / "releases" / "2.0"
    fake_python(rel / "bin" / "python", new, data_ok)
    return root, rel


def test_the_root_helper_asks_both_releases_before_the_switch(tmp_path: Path) -> None:
    data = tmp_path / "data"
    root, rel = release_tree(tmp_path, describe())
    _check_data(root, rel, "2.0", data)  # same formats: fine
    newer = describe()
    newer["writes"]["state"] = 2
    newer["reads"]["state"] = [1, 2]
    root, rel = release_tree(tmp_path / "b", newer)
    with pytest.raises(ReleaseError, match=r"it writes state version 2, which the running"):
        _check_data(root, rel, "2.0", data)
    root, rel = release_tree(tmp_path / "c", describe(), data_ok=False)
    with pytest.raises(ReleaseError, match="cannot read the data directory: state version 9"):
        _check_data(root, rel, "2.0", data)
    root, rel = release_tree(tmp_path / "d", describe())
    (rel / "bin" / "python").write_text('#!/bin/sh\ncase "$*" in *--describe*) exit 2;; esac\n')
    with pytest.raises(ReleaseError, match="does not describe its data formats"):
        _check_data(root, rel, "2.0", data)
