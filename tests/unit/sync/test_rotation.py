"""The device's credential rotation and its recovery (agent/sync/rotation.py, the ``rotate``
command in agent/service/commands.py), against a real endpoint on loopback with real OSCORE:

- the command: recorded done with the generation (no secret) before the file is replaced and
  before the restart; the OSCORE state of the old context is gone and never written again;
- a power cut between the endpoint's commit and the file replacement: the next start settles
  the pending ``.next`` (confirmed under the new context, then promoted);
- a ``.next`` the endpoint never received: nothing breaks (the current credential goes on, a
  forged refusal promotes nothing), and a re-run of the command sends the same secrets;
- a lost 2.04: the re-run confirms under the new context;
- a protected refusal (a device behind a gateway): ``.next`` removed, the credential goes on;
- a ``.next`` that is not the next generation of this credential is removed."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from agent.errors import SyncError
from agent.service.commands import COMMANDS_FILE, CommandRunner
from agent.service.logring import coap_post
from agent.sync import rotation
from agent.sync.rotation import (
    CREDENTIAL_PATH,
    RotationFailed,
    Rotator,
    coap_send_with,
    fresh,
    next_path,
    pending,
)
from agent.wire.credentials import Credential
from agent.wire.rotation import Rotation
from cloud.server import CloudServer
from drivers.clock import RealClock
from tests.e2e.test_security import Principal
from tests.unit.cloud.test_credroutes import stored

DEVICE = "pump-01"


@pytest.fixture
async def device(endpoint: CloudServer, tmp_path: Path) -> AsyncIterator[Principal]:
    """DEVICE's side (credential file, OSCORE state, transport), closed at the end."""
    p = await Principal(endpoint, tmp_path, DEVICE).open()
    yield p
    await p.close()


def rotator_of(p: Principal) -> Rotator:
    """The agent's wiring (commands.py ``_rotator``) on a principal's transport."""
    assert p.security is not None and p.transport is not None
    clock = RealClock()
    endpoints = SimpleNamespace(current=p.server.uri, uris=(p.server.uri,))
    send = coap_post(p.transport, endpoints, p.name, 0, path=CREDENTIAL_PATH, deadline=20)
    send_with = coap_send_with(clock, endpoints, p.name, p.security.state)
    return Rotator(p.security, send, send_with, clock.sleep)


def credential_path(p: Principal) -> Path:
    return p.dir / "credential.json"


async def served(p: Principal) -> bool:
    """A protected exchange under ``p``'s credential gets through."""
    try:
        return (await p.req("GET", f"devices/{DEVICE}")).dotted == "2.05"
    except SyncError:
        return False


@pytest.mark.timeout(120)
async def test_rotate_is_recorded_done_then_promoted_then_restarts(
    endpoint: CloudServer, device: Principal, tmp_path: Path
) -> None:
    cred_path, state = credential_path(device), device.dir / "oscore.json"
    old = Credential.read(cred_path)
    seen: list[Any] = []

    def restart() -> None:  # what is on disk when the agent is told to stop
        seen.append(
            (json.loads((tmp_path / COMMANDS_FILE).read_text()), Credential.read(cred_path))
        )

    r = rotator_of(device)
    runner = CommandRunner(tmp_path, clock_time=lambda: 1.0, restart=restart, rotator=r)
    runner.apply("rotate", {"id": 9})
    name, command_id, args = runner._queue.get_nowait()
    await runner.execute(name, command_id, args)
    ((done, on_disk),) = seen
    assert done["rotate"] == {"id": 9, "status": "ok", "result": {"generation": 2}, "at": 1.0}
    assert on_disk == await stored(endpoint) and on_disk.generation == 2
    assert on_disk.master_secret != old.master_secret and on_disk.sender_id == old.sender_id
    assert not next_path(cred_path).exists() and not state.exists()
    assert old.master_secret.hex() not in json.dumps(runner.reported())
    assert not await served(device)  # the old context, refused from the commit on
    await device.close()
    assert not state.exists()  # the retired context never writes its state again
    assert await served(device.connect())  # the restarted agent: the new credential


@pytest.mark.timeout(120)
async def test_a_power_cut_between_commit_and_replacement_is_settled_at_the_next_start(
    endpoint: CloudServer, device: Principal
) -> None:
    cred_path = credential_path(device)
    nxt = await rotator_of(device).rotate()  # the endpoint committed; then the power cut
    await device.close()
    assert await stored(endpoint) == nxt == Credential.read(next_path(cred_path))
    assert Credential.read(cred_path).generation == 1

    device.connect()  # the next start, with the old credential and a pending .next
    assert not await served(device)
    assert pending(cred_path) == nxt
    assert await rotator_of(device).settle() == nxt
    assert Credential.read(cred_path) == nxt and pending(cred_path) is None
    assert not (device.dir / "oscore.json").exists() and not list(device.dir.glob("*.probe"))
    await device.close()
    assert await served(device.connect())


@pytest.mark.timeout(120)
async def test_a_next_the_endpoint_never_got_harms_nothing_and_a_rerun_sends_it_again(
    endpoint: CloudServer, device: Principal
) -> None:
    cred_path = credential_path(device)
    old = Credential.read(cred_path)
    written = fresh(old)
    written.write(next_path(cred_path))  # power cut after .next was written, before the send
    r = rotator_of(device)
    assert await r.settle() is None  # not confirmed (the endpoint refuses that context)
    assert pending(cred_path) == written and Credential.read(cred_path) == old
    assert await served(device) and await stored(endpoint) == old
    assert await r.rotate() == written  # the re-run: the same secrets, stored now
    assert await stored(endpoint) == written


@pytest.mark.timeout(120)
async def test_a_protected_refusal_drops_next_and_the_current_credential_goes_on(
    endpoint: CloudServer, device: Principal
) -> None:
    """A device attached to a gateway (which holds its credential): 4.03 under the current
    context, so the endpoint kept nothing and the ``.next`` goes."""
    await endpoint.register("gw-1", "gateway")
    await endpoint.db(lambda s: s.attach("gw-1", [DEVICE], 0.0))
    await endpoint.reload_principals()
    old = await stored(endpoint)
    with pytest.raises(RotationFailed, match=r"answered 4\.03"):
        await rotator_of(device).rotate()
    assert not next_path(credential_path(device)).exists()
    assert await stored(endpoint) == old and await served(device)


async def post_only(p: Principal) -> Credential:
    """The next credential written as ``.next`` and posted under the current context, as if the
    device lost the answer (or power) right after."""
    nxt = fresh(Credential.read(credential_path(p)))
    nxt.write(next_path(credential_path(p)))
    resp = await p.req("POST", f"credential/{DEVICE}", Rotation.of(nxt).to_bytes(), 60)
    assert resp.dotted == "2.04"
    return nxt


@pytest.mark.timeout(120)
async def test_a_lost_answer_is_confirmed_under_the_new_credential(
    endpoint: CloudServer, device: Principal
) -> None:
    nxt = await post_only(device)
    assert not await served(device)
    assert await rotator_of(device).rotate() == nxt  # the re-run: confirmed under the new one
    assert await stored(endpoint) == nxt


@pytest.mark.timeout(60)
async def test_settle_loop_ends_when_nothing_is_pending_and_promotes_what_is_confirmed(
    device: Principal, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(rotation, "SETTLE_FIRST", 0.01)
    r = rotator_of(device)
    assert await r.settle_loop() is None
    nxt = await post_only(device)
    assert await r.settle_loop() == nxt
    assert Credential.read(credential_path(device)) == nxt


def test_a_next_that_is_not_the_next_generation_of_this_credential_is_removed(
    tmp_path: Path,
) -> None:
    cred_path = tmp_path / "credential.json"
    current = Credential.generate(DEVICE, "device", b"\x01\x02\x03\x04", generation=3)
    current.write(cred_path)
    good = fresh(current)
    cases = [
        current,  # already promoted (a power cut before .next was removed)
        Credential.generate(DEVICE, "device", b"\x01\x02\x03\x04", generation=2),  # older
        Credential.generate(DEVICE, "device", b"\x01\x02\x03\x04", generation=5),  # skips one
        Credential.generate("pump-02", "device", b"\x01\x02\x03\x04", generation=4),
        Credential.generate(DEVICE, "device", b"\x09\x09\x09\x09", generation=4),  # other kid
        Credential.generate(DEVICE, "operator", b"\x01\x02\x03\x04", generation=4),
    ]
    for cred in cases:
        cred.write(next_path(cred_path))
        assert pending(cred_path) is None and not next_path(cred_path).exists(), cred.generation
    next_path(cred_path).write_bytes(b"{not json")  # corrupted at rest
    assert pending(cred_path) is None and not next_path(cred_path).exists()
    good.write(next_path(cred_path))
    next_path(cred_path).chmod(0o644)  # readable by others: never used
    assert pending(cred_path) is None and not next_path(cred_path).exists()
    good.write(next_path(cred_path))
    assert pending(cred_path) == good and next_path(cred_path).exists()
    assert fresh(current).master_secret != good.master_secret
