"""agent/wire/commands.py and logupload.py: a time a device reports is Unix seconds in
[0, 2**40]; one outside (a clock far off, 1e300, a bignum, not finite) is taken as absent."""

from __future__ import annotations

import pytest

from agent.wire import commands
from agent.wire.logupload import LogUploadError, decode_upload, encode_upload
from agent.wire.records import dumps


@pytest.mark.parametrize("at", [1e300, -1e300, -1.0, 2**40 + 1, 2**1100, float("nan"), "x", True])
def test_a_result_time_outside_the_range_is_absent(at: object) -> None:
    """Attack: a device reports a command's outcome ``at = 1e300`` (or another time no date
    shows): the outcome is taken, without a time."""
    value = {"id": 5, "status": "ok", "result": {"a": 1}, "at": at}
    assert commands.parse_result(value) == (5, "ok", {"a": 1}, None)


def test_a_result_time_inside_the_range_is_kept() -> None:
    for at in (0, 1_700_000_000.5, 2**40):
        assert commands.parse_result({"id": 5, "status": "ok", "at": at})[3] == float(at)


def test_logs_since_is_a_time_in_the_range() -> None:
    assert commands.check_args("logs", {"since": 1_700_000_000}) == {"since": 1_700_000_000}
    for since in (1e300, 2**1100, -1, float("inf")):
        with pytest.raises(commands.CommandError, match="since must be"):
            commands.check_args("logs", {"since": since})


@pytest.mark.parametrize("since", [1e300, -5.0, 2.0**41, float("nan")])
def test_an_upload_window_outside_the_range_is_taken_without_its_time(since: float) -> None:
    """Attack: a log upload ``since = 1e300``: its lines are taken, the window's start is
    absent (null); a time that is not a number is still refused."""
    upload = decode_upload(encode_upload(since, [(1e300, "event=a"), (5.0, "event=b")], 0))
    assert upload.since is None and upload.first is None and upload.last == 5.0
    assert upload.lines() == ["event=a", "event=b"]
    with pytest.raises(LogUploadError):
        decode_upload(dumps({"since": "x", "count": 0, "left_out": 0, "z": b""}))
