"""``POST /credential/<device>`` (cloud/credroutes.py) on a real endpoint over loopback with real
OSCORE clients: only the device itself may rotate its credential (another device, an operator,
its gateway and a device behind a gateway are refused 4.03, nothing stored); the answer 2.04
comes after the commit, from which on the old credential is refused and the new one served;
the same generation and secrets again is 2.04 (a lost answer), any other generation or other
secrets 4.09; hostile bodies 4.00 / 4.13 / 4.15."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from aiocoap.numbers.codes import Code

from agent.errors import SyncError
from agent.sync.rotation import fresh
from agent.wire import records
from agent.wire.credentials import Credential
from agent.wire.rotation import BODY_BYTES, Rotation
from cloud.credroutes import RotationRefused, store_rotation
from cloud.security import issue_credential
from cloud.server import CloudServer
from cloud.storage import SQLiteStorage
from tests.e2e.test_security import Principal

DEVICE = "pump-01"
PATH = f"credential/{DEVICE}"


async def stored(endpoint: CloudServer, name: str = DEVICE) -> Credential:
    creds = {c.principal: c for c, _ in await endpoint.db(lambda s: s.credentials())}
    return creds[name]


def body_for(cred: Credential) -> bytes:
    return Rotation.of(cred).to_bytes()


@pytest.mark.timeout(120)
async def test_the_device_rotates_its_own_credential_and_the_old_one_is_refused(
    endpoint: CloudServer, tmp_path: Path
) -> None:
    device = await Principal(endpoint, tmp_path, DEVICE).open()
    old = Credential.read(device.dir / "credential.json")
    new = fresh(old)
    try:
        resp = await device.req("POST", PATH, body_for(new), 60)
        assert resp.dotted == "2.04", resp.payload
        kept = await stored(endpoint)
        assert kept == new and kept.generation == 2 and kept.sender_id == old.sender_id
        # from the commit on, the old credential's context is refused (4.00: not decryptable)
        with pytest.raises(SyncError, match=r"answer 4\.00 without OSCORE"):
            await device.req("GET", f"devices/{DEVICE}")
    finally:
        await device.close()
    # the new credential is served; the same rotation again (its answer was lost) is 2.04
    (device.dir / "oscore.json").unlink()
    new.write(device.dir / "credential.json")
    again = device.connect()
    try:
        assert (await again.req("GET", f"devices/{DEVICE}")).dotted == "2.05"
        assert (await again.req("POST", PATH, body_for(new), 60)).dotted == "2.04"
        assert await stored(endpoint) == new
        # other secrets for the stored generation, or a generation that is not the next: 4.09
        other = fresh(old)
        resp = await again.req("POST", PATH, body_for(other), 60)
        assert resp.dotted == "4.09" and b"other secrets" in resp.payload
        for generation in (4, 7):
            skip = dataclasses.replace(fresh(new), generation=generation)
            resp = await again.req("POST", PATH, body_for(skip), 60)
            assert resp.dotted == "4.09" and b"a rotation names 3" in resp.payload
        assert await stored(endpoint) == new
    finally:
        await again.close()


@pytest.mark.timeout(120)
async def test_nobody_but_the_device_itself_may_post_its_credential(
    endpoint: CloudServer, tmp_path: Path
) -> None:
    """Forged rotations: another device, an operator, the device's gateway: 4.03; a device
    attached to a gateway (which holds its credential): 4.03 with the reason. Nothing stored."""
    device = await Principal(endpoint, tmp_path, DEVICE).open()
    other = await Principal(endpoint, tmp_path, "pump-02").open()
    op = await Principal(endpoint, tmp_path, "alice").open("operator")
    gw = await Principal(endpoint, tmp_path, "gw-1").open("gateway")
    before = await stored(endpoint)
    body = body_for(fresh(before))
    try:
        for who in (other, op, gw):
            resp = await who.req("POST", PATH, body, 60)
            assert resp.dotted == "4.03", (who.name, resp.dotted, resp.payload)
        await endpoint.db(lambda s: s.attach("gw-1", [DEVICE], 0.0))
        await endpoint.reload_principals()
        resp = await gw.req("POST", PATH, body, 60)  # its own device: still not its credential
        assert resp.dotted == "4.03"
        resp = await device.req("POST", PATH, body, 60)
        assert resp.dotted == "4.03" and b"attached to gateway gw-1" in resp.payload
        # a gateway's own server (its copy of the credentials) refuses every rotation
        await endpoint.db(lambda s: s.detach([DEVICE]))
        await endpoint.reload_principals()
        endpoint.rotation_refusal = "gateway gw-1 holds a copy of this device's credential"
        try:
            resp = await device.req("POST", PATH, body, 60)
        finally:
            endpoint.rotation_refusal = None
        assert resp.dotted == "4.03" and b"holds a copy" in resp.payload
        assert await stored(endpoint) == before
    finally:
        for p in (device, other, op, gw):
            await p.close()


@pytest.mark.timeout(120)
async def test_hostile_rotation_bodies_are_refused_and_nothing_is_stored(
    endpoint: CloudServer, tmp_path: Path
) -> None:
    device = await Principal(endpoint, tmp_path, DEVICE).open()
    before = await stored(endpoint)
    good = body_for(fresh(before))
    doc = records.loads(good)
    try:
        for body, cf, code in [
            (records.dumps({**doc, "principal": "pump-02"}), 60, "4.00"),
            (records.dumps({**doc, "generation": 1}), 60, "4.00"),
            (records.dumps({**doc, "master_secret": b"short"}), 60, "4.00"),
            (good[:-3], 60, "4.00"),
            (b"\x00" * (BODY_BYTES + 1), 60, "4.13"),
            (good, 112, "4.15"),
        ]:
            resp = await device.req("POST", PATH, body, cf)
            assert resp.dotted == code, (resp.dotted, resp.payload)
        resp = await device.req("GET", PATH)
        assert resp.dotted == "4.05"
        assert await stored(endpoint) == before
        assert (await device.req("POST", PATH, good, 60)).dotted == "2.04"
    finally:
        await device.close()


class _RekeyedBetween:
    """A storage whose credential is rekeyed (or revoked) by "another process" after the rotation
    has read it and before it writes: the interleaving that the conditional write closes."""

    def __init__(self, storage: SQLiteStorage, meanwhile: Callable[[SQLiteStorage], None]):
        self.storage, self.meanwhile = storage, meanwhile

    def credentials(self) -> list[tuple[Credential, bool]]:
        read = self.storage.credentials()
        self.meanwhile(self.storage)
        return read

    def put_credential(self, *args: Any, **kwargs: Any) -> None:
        self.storage.put_credential(*args, **kwargs)


@pytest.mark.parametrize("meanwhile", ["rekey", "revoke"])
def test_a_rotation_never_overwrites_a_rekey_or_revocation_made_meanwhile(
    tmp_path: Path, meanwhile: str
) -> None:
    storage = SQLiteStorage(tmp_path / "cloud.sqlite3")
    try:
        old = issue_credential(storage, DEVICE, "device", 1.0)
        rekeyed: list[Credential] = []

        def other_process(s: SQLiteStorage) -> None:
            if meanwhile == "rekey":
                rekeyed.append(issue_credential(s, DEVICE, "device", 2.0))
            else:
                assert s.revoke(DEVICE, 2.0)

        racing = _RekeyedBetween(storage, other_process)
        with pytest.raises(RotationRefused, match="meanwhile") as refused:
            store_rotation(racing, DEVICE, Rotation.of(fresh(old)), 3.0)
        assert refused.value.code == Code.CONFLICT
        ((kept, revoked),) = storage.credentials()
        if meanwhile == "rekey":
            assert kept == rekeyed[0] and not revoked  # the operator's rekey stands
        else:
            assert kept == old and revoked  # still refused
    finally:
        storage.close()
