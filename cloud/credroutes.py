"""``POST /credential/<device>``: a device's own credential rotation (the ``rotate`` command;
docs/protocol.md "Remote commands and logs", docs/security.md "Credentials and their
lifecycle"). A mixin of :class:`cloud.server.CloudServer`, whose ``_render`` dispatches to
``_<route>_<method>``.

Only the device itself may post, under its current OSCORE context (cloud/security.py ``ACCESS``
rule ``self``: not another device, not its gateway, not an operator; an endpoint that takes plain
CoAP refuses an unauthenticated post 4.01). A device attached to a gateway is refused 4.03: its
gateway terminates its OSCORE and holds its credential, so its credential changes with
``devices rekey`` and a reflash. The body (agent/wire/rotation.py) names the new generation and
secrets; :func:`store_rotation` keeps them through the same storage write as ``devices rekey``
(``put_credential``), and the answer 2.04 comes only after that commit (and after this process
reloaded its principals: from then on the old credential's contexts are refused; the other
processes of the storage notice within a second, as after a rekey).

Idempotent: the stored generation with the same secrets again is 2.04 (a device whose 2.04 was
lost confirms under the new context). Any other generation than the stored one + 1, or other
secrets for the stored generation, is 4.09 with the reason; nothing is stored.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from typing import Any

from aiocoap import Message
from aiocoap.numbers.codes import Code

from agent.wire.batch import CF_CBOR
from agent.wire.rotation import BODY_BYTES, Rotation, RotationBodyError, decode_rotation
from cloud.protocol import _Failure, _Route
from cloud.security import identity
from cloud.serverroutes import RouteHost
from cloud.storebase import CredentialChanged

log = logging.getLogger("cloud.server")


class RotationRefused(Exception):
    """The storage holds something a rotation cannot follow; ``code`` is the answer."""

    def __init__(self, code: Code, reason: str) -> None:
        super().__init__(reason)
        self.code = code


def store_rotation(storage: Any, device: str, rotation: Rotation, now: float) -> bool:
    """Store ``rotation`` as ``device``'s credential if it is the next generation (True), or
    confirm it if it is stored already (False); :class:`RotationRefused` otherwise. Runs on the
    storage thread, and the write is conditional on the generation read and on the credential
    still being valid, so a ``devices rekey`` or ``revoke`` of another process at the same moment
    wins or loses whole (never a rotation over a rekey, never a revoked credential made valid)."""
    stored = {c.principal: (c, revoked) for c, revoked in storage.credentials()}.get(device)
    if stored is None or stored[1]:
        raise RotationRefused(Code.UNAUTHORIZED, "no valid credential")
    current = stored[0]
    if current.role != "device":
        raise RotationRefused(Code.FORBIDDEN, "only a device rotates its credential this way")
    if rotation.generation == current.generation:
        if _same(Rotation.of(current), rotation):
            return False
        raise RotationRefused(
            Code.CONFLICT, f"generation {current.generation} is stored with other secrets"
        )
    if rotation.generation != current.generation + 1:
        raise RotationRefused(
            Code.CONFLICT,
            f"the stored generation is {current.generation}: a rotation names "
            f"{current.generation + 1}, not {rotation.generation}",
        )
    try:  # the check above and this write are one condition in one transaction
        storage.put_credential(
            rotation.apply(current), now, replaces=current.generation, unrevoke=False
        )
    except CredentialChanged:
        raise RotationRefused(
            Code.CONFLICT,
            f"generation {current.generation} was rekeyed, rotated or revoked meanwhile",
        ) from None
    return True


def _same(a: Rotation, b: Rotation) -> bool:
    return hmac.compare_digest(a.to_bytes(), b.to_bytes())


class CredentialRoutes(RouteHost):
    """The handler of ``/credential/<device>``."""

    relays: dict[str, str]
    _rotation_lock: asyncio.Lock | None = None
    #: set by a gateway on its own server (agent/gateway/service.py): it holds copies of its
    #: devices' credentials, the cloud the originals, so a rotation there would split them
    rotation_refusal: str | None = None

    async def reload_principals(self) -> None:
        raise NotImplementedError

    async def _credential_post(self, request: Message, route: _Route) -> Message:
        device = await self._device(route)
        if identity(request) is None:  # only on an endpoint that takes plain CoAP
            raise _Failure(Code.UNAUTHORIZED, "a credential is posted under the device's OSCORE")
        if self.rotation_refusal is not None:
            raise _Failure(Code.FORBIDDEN, self.rotation_refusal)
        gateway = self.relays.get(device)
        if gateway is not None:
            raise _Failure(
                Code.FORBIDDEN,
                f"attached to gateway {gateway}, which holds its credential: devices rekey",
            )
        body = self._payload(request, (CF_CBOR,), BODY_BYTES)
        try:
            rotation = decode_rotation(body)
        except RotationBodyError as err:
            raise _Failure(Code.BAD_REQUEST, str(err)) from None
        if self._rotation_lock is None:
            self._rotation_lock = asyncio.Lock()
        now = self.clock.time()
        async with self._rotation_lock:  # one rotation at a time: store, then reload
            try:
                stored = await self.db(lambda s: store_rotation(s, device, rotation, now))
            except RotationRefused as err:
                log.warning(
                    "event=credential_rotation_refused device=%s generation=%d reason=%r",
                    device,
                    rotation.generation,
                    str(err),
                )
                raise _Failure(err.code, str(err)) from None
            if stored:
                await self.reload_principals()  # the old context is refused from here on
        log.info(
            "event=credential_rotated device=%s generation=%d stored=%s",
            device,
            rotation.generation,
            "new" if stored else "again",
        )
        return Message(code=Code.CHANGED)
