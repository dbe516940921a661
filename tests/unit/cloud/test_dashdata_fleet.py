"""The dashboard's fleet answer (cloud/dashdata.py ``fleet``) over a fleet larger than it shows:
its work is bounded like its answer, on real SQLite storage."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.wire import statedoc
from agent.wire.statedoc import Entry
from cloud import dashdata
from cloud.storage import SQLiteStorage


@pytest.fixture
def storage(tmp_path: Path) -> Iterator[SQLiteStorage]:
    s = SQLiteStorage(tmp_path / "cloud.db")
    yield s
    s.close()


def test_a_fleet_larger_than_the_answer_reads_the_shown_devices_reported_state_only(
    storage: SQLiteStorage, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With more devices than MAX_DEVICES, the fleet read decoded the reported state of every
    device of the fleet (75,000 values for 5,000 devices, about a second on the storage thread
    that ingest shares, at each poll of each open page) to show 500 of them. Now it reads the
    shown devices' only."""
    monkeypatch.setattr(dashdata, "MAX_DEVICES", 3)
    devices = [f"pump-{i:02d}" for i in range(10)]
    for device in devices:
        storage.add_device(device, 1.0)
        entries = {"link/state": Entry(1, "high"), "queue/depth": Entry(1, 7)}
        storage.put_reported(device, entries, 1.0)
    decoded = 0
    decode = statedoc.decode_value

    def counting(data: bytes) -> Any:  # the real decoder, counted
        nonlocal decoded
        decoded += 1
        return decode(data)

    monkeypatch.setattr(statedoc, "decode_value", counting)
    answer = dashdata.fleet(storage, 100.0)
    assert answer["truncated"] is True
    assert [d["id"] for d in answer["devices"]] == devices[:3]
    assert all(d["link"]["state"] == "high" and d["queue_depth"] == 7 for d in answer["devices"])
    assert decoded == 3 * 2  # was 10 * 2
