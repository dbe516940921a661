"""The endpoint's OSCORE bookkeeping (cloud/security.py): sender sequence numbers from the
storage in blocks that never overlap between processes, and the replay windows a clean stop
keeps (one file, taken away at the next start, so a crash leaves none behind)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from aiocoap import oscore

from agent.wire.credentials import Credential
from cloud.cli import main as cloud_main
from cloud.security import (
    CLEAN_STOP_FILE,
    ENDPOINT_SEQUENCE,
    Principals,
    SharedSequence,
    take_clean_stop,
)
from cloud.storage import SQLiteStorage

ID_CONTEXT = bytes.fromhex("0011223344556677")


def credential(name: str, kid: int) -> Credential:
    return Credential.generate(name, "device", bytes([kid, 1]))


def lookup(principals: Principals, cred: Credential, id_context: bytes = ID_CONTEXT) -> object:
    return principals.get_oscore_context_for(
        {oscore.COSE_KID: cred.sender_id, oscore.COSE_KID_CONTEXT: id_context}
    )


def test_two_processes_on_one_storage_never_take_the_same_number(tmp_path: Path) -> None:
    """Two endpoint processes (two storage connections) interleave their blocks; every number
    handed out is unique and each process's numbers grow."""
    stores = [SQLiteStorage.in_dir(tmp_path), SQLiteStorage.in_dir(tmp_path)]
    sequences = [
        SharedSequence(lambda n, s=s: s.reserve_sequence(ENDPOINT_SEQUENCE, n), block=7)
        for s in stores
    ]
    taken: list[list[int]] = [[], []]
    for i in range(200):
        which = (i * 7919) % 3 % 2  # an irregular interleaving
        taken[which].append(sequences[which].take())
    everything = taken[0] + taken[1]
    assert len(set(everything)) == len(everything)
    for numbers in taken:
        assert numbers == sorted(numbers)
    # a new process (a restart) starts above everything handed out before
    again = SharedSequence(lambda n: stores[0].reserve_sequence(ENDPOINT_SEQUENCE, n), block=7)
    assert again.take() > max(everything)
    for s in stores:
        s.close()


def test_old_per_principal_counters_are_a_floor(tmp_path: Path) -> None:
    """State files of releases that kept a counter per principal: the shared counter starts
    above the highest reservation in them."""
    state = tmp_path / "oscore"
    state.mkdir()
    (state / "pump-01.json").write_text(
        json.dumps({"id_context": "00", "seq_reserved": 5000, "replay": None})
    )
    store = SQLiteStorage.in_dir(tmp_path)
    principals = Principals(
        state, lambda n, floor: store.reserve_sequence(ENDPOINT_SEQUENCE, n, floor)
    )
    assert principals.sequence.take() >= 5000
    store.close()


def test_a_clean_stop_keeps_the_windows_and_a_crash_keeps_none(tmp_path: Path) -> None:
    state = tmp_path / "oscore"
    cred = credential("pump-01", 1)
    principals = Principals(state)
    principals.load([(cred, False)])
    ctx = lookup(principals, cred)
    assert not ctx.recipient_replay_window.is_initialized()  # a new context: Echo first
    ctx.recipient_replay_window.initialize_from_persisted({"index": 41, "bitfield": 0})
    ctx.on_accept(ctx)  # the Echo came back: verified
    principals.close()
    assert (state / CLEAN_STOP_FILE).exists()

    restarted = Principals(state)
    assert not (state / CLEAN_STOP_FILE).exists()  # taken at start: a crash leaves nothing
    restarted.load([(cred, False)])
    ctx = lookup(restarted, cred)
    assert ctx.recipient_replay_window.is_initialized()  # carries on without an Echo
    assert not ctx.recipient_replay_window.is_valid(40)  # and refuses what it saw before
    # a crash now (no close): the next start knows no window, so it asks for an Echo
    crashed = Principals(state)
    crashed.load([(cred, False)])
    assert not lookup(crashed, cred).recipient_replay_window.is_initialized()


def test_a_window_saved_for_an_old_key_is_dropped(tmp_path: Path) -> None:
    state = tmp_path / "oscore"
    cred = credential("pump-01", 1)
    principals = Principals(state)
    principals.load([(cred, False)])
    ctx = lookup(principals, cred)
    ctx.recipient_replay_window.initialize_from_persisted({"index": 3, "bitfield": 0})
    ctx.on_accept(ctx)
    principals.close()
    rekeyed = credential("pump-01", 2)
    restarted = Principals(state)
    restarted.load([(cred, False)])
    restarted.load([(rekeyed, False)])  # re-keyed while running: the old window means nothing
    assert not lookup(restarted, rekeyed).recipient_replay_window.is_initialized()


def test_an_unreadable_clean_stop_file_is_removed_and_ignored(tmp_path: Path) -> None:
    state = tmp_path / "oscore"
    state.mkdir()
    for junk in (b"{", b'{"principals": {"a": {"id_context": "zz"}}}', b"[]", b"\xff" * 10):
        (state / CLEAN_STOP_FILE).write_bytes(junk)
        assert take_clean_stop(state) == {}
        assert not (state / CLEAN_STOP_FILE).exists()
    assert take_clean_stop(state) == {}  # none at all
    assert take_clean_stop(None) == {}


def test_a_psk_file_is_checked_before_anything_is_registered_or_rekeyed(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """``devices add|rekey --psk-file``: a file that is not a PSK leaves the storage as it was
    (no device registered, no credential replaced); a good one is the stored credential's PSK."""
    data, bad, good = tmp_path / "cloud", tmp_path / "empty", tmp_path / "psk"
    bad.write_bytes(b"  \n")
    good.write_bytes(b"0123456789abcdef\n")
    assert cloud_main(["devices", "add", "pump-01", "--data", str(data), "--psk-file", str(bad)])
    assert "a PSK is 1 to" in capsys.readouterr().err
    storage = SQLiteStorage.in_dir(data)
    try:
        assert storage.devices() == [] and storage.credentials() == []
    finally:
        storage.close()
    add = ["devices", "add", "pump-01", "--data", str(data), "--psk-file", str(good)]
    assert cloud_main(add) == 0
    storage = SQLiteStorage.in_dir(data)
    try:
        ((first, revoked),) = storage.credentials()
        assert first.psk == b"0123456789abcdef" and first.generation == 1 and not revoked
    finally:
        storage.close()
    rekey = ["devices", "rekey", "pump-01", "--data", str(data), "--psk-file", str(bad)]
    assert cloud_main(rekey) != 0
    storage = SQLiteStorage.in_dir(data)
    try:
        assert storage.credentials() == [(first, False)]  # the device is not locked out
    finally:
        storage.close()
