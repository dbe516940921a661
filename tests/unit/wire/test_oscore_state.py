"""agent/wire/oscore.py: a device's sender sequence numbers are handed out only below a
reservation that is on disk, also when the disk is full or failing (a number used before a
crash and again after it would reuse an AES-CCM nonce under the same key)."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.wire.credentials import Credential
from agent.wire.oscore import MAX_SEQNO, RESERVE, ClientContext, Sequence


class Disk:
    """A persist() whose writes fail while ``full``; ``durable`` is the last reservation
    written."""

    def __init__(self, seq: Sequence | None = None) -> None:
        self.full = False
        self.durable = 0
        self.seq = seq

    def persist(self) -> None:
        if self.full:
            raise OSError(errno.ENOSPC, "No space left on device")
        assert self.seq is not None
        self.durable = self.seq.reserved


@given(st.lists(st.booleans(), min_size=1, max_size=300), st.integers(1, 20))
def test_every_number_handed_out_is_below_the_durable_reservation(
    fullness: list[bool], reserve: int
) -> None:
    disk = Disk()
    seq = Sequence(0, disk.persist, reserve=reserve)
    disk.seq = seq
    handed: list[int] = []
    for full in fullness:
        disk.full = full
        try:
            handed.append(seq.take())
        except OSError:
            continue
        assert handed[-1] < disk.durable  # a crash now restarts at >= durable: never reused
    assert handed == sorted(set(handed))


def test_a_client_context_on_a_full_disk_sends_nothing_past_its_reservation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cred = Credential.generate("pump-01", "device", b"\x01")
    path = tmp_path / "oscore.json"
    client = ClientContext(cred, path)
    on_disk = json.loads(path.read_text())["seq_reserved"]
    taken = [client.sequence.take() for _ in range(on_disk)]  # the reservation, used up
    assert taken == list(range(on_disk))

    def full(*_args: object, **_kw: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("agent.wire.oscore.write_state", full)
    for _ in range(3):
        with pytest.raises(OSError):
            client.sequence.take()
    assert client.sequence.reserved == on_disk and client.sequence.next == on_disk
    monkeypatch.undo()  # space again: the next number is reserved on disk first
    assert client.sequence.take() == on_disk
    assert json.loads(path.read_text())["seq_reserved"] > on_disk


GOOD = {"id_context": "00112233aabbccdd", "seq_reserved": 512, "replay": None}


@pytest.mark.parametrize(
    "change",
    [
        {"seq_reserved": 1e999},  # was OverflowError at start: a crash loop
        {"seq_reserved": 1e300},  # was every request refused, "sequence numbers exhausted"
        {"seq_reserved": -5},  # was every request failing until the counter passed 0
        {"seq_reserved": 2**40 + RESERVE},  # past the most Sequence.take reserves
        {"seq_reserved": "512"},
        {"seq_reserved": True},
        {"replay": {"index": -1, "bitfield": 0}},
        {"replay": {"index": 0, "bitfield": 1 << 32}},
        {"replay": {"index": 0.5, "bitfield": 0}},
        {"replay": [[[[]]]]},
    ],
)
def test_a_state_file_out_of_range_starts_a_new_context(
    tmp_path: Path, change: dict[str, object], caplog: pytest.LogCaptureFixture
) -> None:
    """A new ID Context derives new keys, so starting at sequence number 0 reuses no nonce."""
    cred = Credential.generate("pump-01", "device", b"\x01")
    path = tmp_path / "oscore.json"
    path.write_text(json.dumps(GOOD))
    assert ClientContext(cred, path).sequence.next == 512  # the file as it should be: taken
    path.write_text(json.dumps(GOOD | change))
    client = ClientContext(cred, path)
    assert client.sequence.next == 0
    assert client.context.id_context.hex() != GOOD["id_context"]
    assert "event=oscore_state_unreadable" in caplog.text
    assert client.sequence.take() == 0


def test_a_state_file_nested_too_deep_starts_a_new_context(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cred = Credential.generate("pump-01", "device", b"\x01")
    path = tmp_path / "oscore.json"
    path.write_text("[" * 2000 + "]" * 2000)  # within the file's 4096 bytes
    assert ClientContext(cred, path).sequence.next == 0
    assert "nested too deep" in caplog.text


def test_the_largest_reservation_the_writer_makes_is_read_back(tmp_path: Path) -> None:
    """Sequence.take reserves RESERVE numbers past the one it hands out, so a context near the
    end of its numbers holds up to MAX_SEQNO + RESERVE; the reader takes it (and the context
    says it is exhausted) instead of starting a new context."""
    cred = Credential.generate("pump-01", "device", b"\x01")
    path = tmp_path / "oscore.json"
    path.write_text(json.dumps(GOOD | {"seq_reserved": MAX_SEQNO + RESERVE}))
    client = ClientContext(cred, path)
    assert client.context.id_context.hex() == GOOD["id_context"]
    with pytest.raises(Exception, match="exhausted"):
        client.sequence.take()
