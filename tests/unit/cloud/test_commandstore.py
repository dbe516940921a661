"""The history of remote commands (cloud/commandstore.py) on both backends: a device's reported
results update only the commands an operator sent."""

from __future__ import annotations

import logging

import pytest

from agent.wire import commands as wire
from agent.wire.statedoc import Entry
from cloud.storage import Storage
from tests.unit.cloud.test_storage_contract import DEV, T0, backend, storage

__all__ = ["backend", "storage"]  # the fixtures, used by name


def result(command_id: int, status: str = "ok") -> Entry:
    value = wire.result_value(command_id, status, {}, T0 + 1)
    return Entry(int(T0 * 1000), value)


def test_a_result_for_an_id_never_sent_is_dropped_and_commands_still_go(
    storage: Storage, caplog: pytest.LogCaptureFixture
) -> None:
    """Attack (audit command_id_poison.py): the device reported a result for id 2**63-1; the
    endpoint made a row of it, and no command could be sent to the device again (the next id
    was capped at 2**63-1 and collided). Now the result is dropped with a warning."""
    with caplog.at_level(logging.WARNING, logger="cloud.commandstore"):
        assert storage.note_command_results(DEV, {"command/restart": result(wire.MAX_ID)}, T0) == 0
    assert storage.commands(DEV) == []
    assert any("command_result_dropped" in r.getMessage() for r in caplog.records)
    sent = storage.add_command(DEV, "rotate", {}, T0)
    assert sent < wire.MAX_ID
    # a result under the right id but another command's name is not this command's either
    assert storage.note_command_results(DEV, {"command/restart": result(sent)}, T0 + 2) == 0
    assert storage.note_command_results(DEV, {"command/rotate": result(sent)}, T0 + 2) == 1
    (row,) = storage.commands(DEV)
    assert (row.id, row.name, row.status) == (sent, "rotate", "ok")


def test_new_id_is_above_the_last_and_refuses_rather_than_repeat_one() -> None:
    assert wire.new_id(None, 1.0) == 1000
    assert wire.new_id(5000, 1.0) == 5001
    with pytest.raises(wire.CommandError):
        wire.new_id(wire.MAX_ID, 1.0)
