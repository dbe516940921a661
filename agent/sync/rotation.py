"""The device's credential rotation: the ``rotate`` command's work and its recovery
(docs/security.md "Credentials and their lifecycle", docs/protocol.md "Remote commands and logs").

1. The device makes the next credential itself (:func:`fresh`: new random master secret, salt
   and DTLS PSK; the same principal, role and key ids; generation + 1) and writes it durably
   beside its credential file as ``<credential>.next`` (0600) before it sends anything.
2. It posts the new secrets (agent/wire/rotation.py) to ``/credential/<device>`` under its
   *current* OSCORE context; the endpoint answers 2.04 once it has stored them.
3. Without that 2.04 (no answer, or the current context refused: the endpoint may have stored
   them and the answer got lost), it posts the same body under a fresh context of the *new*
   credential (:meth:`Rotator.confirm`): only an endpoint that holds the new secrets can answer
   that exchange, so a 2.04 there proves the commit. An unprotected refusal proves nothing (anyone
   on the path can forge one), so nothing is ever promoted or discarded on one.
4. :func:`promote`: the running context is retired (its state file is never written again), the
   OSCORE state file is removed (the new credential starts a new context, with a new random ID
   Context, so its sequence numbers start at 0 without reusing a nonce), the credential file is
   replaced (atomically) and ``.next`` removed. The agent then restarts into the new credential.

Recovery: a ``.next`` that is the current generation + 1 of the same principal and key ids is
*pending*. While one is, the agent tries :meth:`Rotator.settle` (confirm, then promote and
restart) at start and then with a growing interval (:data:`SETTLE_FIRST` to :data:`SETTLE_MAX`):
a power cut between the endpoint's commit and the file replacement ends there. A pending
``.next`` the endpoint never stored harms nothing: the device keeps using its current
credential, and a re-run ``rotate`` sends that same ``.next`` again rather than new secrets (so a
late copy of an earlier request can never make the endpoint hold secrets the device dropped). A
``.next`` is removed when the endpoint refuses it in a protected 4.xx answer under the current
context (it read the request and kept nothing; a device behind a gateway gets that), and when it
is not pending (another principal, a generation already reached, unreadable).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from agent.errors import AgentError, SyncError
from agent.files import fsync_dir
from agent.sync.security import ClientSecurity
from agent.sync.transport import CoapTransport
from agent.wire.batch import CF_CBOR
from agent.wire.credentials import (
    SALT_BYTES,
    SECRET_BYTES,
    Credential,
    CredentialError,
    generate_psk,
)
from agent.wire.rotation import Rotation

log = logging.getLogger(__name__)

#: The new credential, beside the credential file, until the endpoint confirmed it.
NEXT_SUFFIX = ".next"
#: The state file of the short-lived context :meth:`Rotator.confirm` uses.
PROBE_SUFFIX = ".probe"
CREDENTIAL_PATH = "credential"
#: Seconds one exchange of a rotation may take.
ROTATE_DEADLINE = 60.0
#: Seconds before the first settle try after start, and the longest interval between tries.
SETTLE_FIRST = 1.0
SETTLE_MAX = 3600.0

#: ``send(body)``: post under the agent's current context; the answer's code ("2.04").
Send = Callable[[bytes], Awaitable[str]]
#: ``send_with(credential, body)``: post under a fresh context of ``credential``.
SendWith = Callable[[Credential, bytes], Awaitable[str]]


class RotationFailed(AgentError):
    """The endpoint did not confirm the new credential; the message says what happened."""


def next_path(credential_path: Path) -> Path:
    return credential_path.with_name(credential_path.name + NEXT_SUFFIX)


def fresh(current: Credential) -> Credential:
    """The next credential: new random secrets, the same principal, role and key ids."""
    return Credential(
        principal=current.principal,
        role=current.role,
        master_secret=secrets.token_bytes(SECRET_BYTES),
        master_salt=secrets.token_bytes(SALT_BYTES),
        sender_id=current.sender_id,
        recipient_id=current.recipient_id,
        psk=generate_psk(),
        generation=current.generation + 1,
    )


def _discard(path: Path, why: str) -> None:
    log.info("event=credential_next_discarded path=%s reason=%s", path, why)
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    fsync_dir(path.parent)


def pending(credential_path: Path) -> Credential | None:
    """The pending next credential, if there is one (a ``.next`` that is not pending is
    removed; with an unreadable current credential nothing is judged or removed)."""
    path = next_path(credential_path)
    if not path.exists():
        return None
    try:
        current = Credential.read(credential_path)
    except CredentialError:
        return None
    try:
        nxt = Credential.read(path)
    except CredentialError as err:
        _discard(path, f"unreadable: {str(err)[:120]!r}")
        return None
    same = (nxt.principal, nxt.role, nxt.sender_id, nxt.recipient_id) == (
        current.principal,
        current.role,
        current.sender_id,
        current.recipient_id,
    )
    if not same:
        _discard(path, "another principal or key id")
        return None
    if nxt.generation != current.generation + 1:
        _discard(path, f"generation {nxt.generation} after {current.generation}")
        return None
    return nxt


def promote(credential_path: Path, state_path: Path, nxt: Credential, security: Any = None) -> None:
    """Make ``nxt`` the credential (see the module docstring for the order: every crash point
    leaves a state the next start handles). ``security``: the running
    :class:`~agent.sync.security.ClientSecurity`, retired first."""
    if security is not None:
        security.retire()
    with contextlib.suppress(FileNotFoundError):
        state_path.unlink()  # old credential + no state = a new context: still safe
    fsync_dir(state_path.parent)
    nxt.write(credential_path)
    with contextlib.suppress(FileNotFoundError):
        next_path(credential_path).unlink()
    fsync_dir(credential_path.parent)
    log.info("event=credential_promoted generation=%d", nxt.generation)


class Rotator:
    """Rotates the credential of ``security`` (a :class:`~agent.sync.security.ClientSecurity`
    with ``credential_path`` and ``state``) over ``send`` and ``send_with``."""

    def __init__(
        self,
        security: Any,
        send: Send,
        send_with: SendWith,
        sleep: Callable[[float], Awaitable[None]],
    ) -> None:
        self.security = security
        self.credential_path: Path = security.credential_path
        self.state_path: Path = security.state
        self.send = send
        self.send_with = send_with
        self.sleep = sleep
        self._lock = asyncio.Lock()

    async def rotate(self) -> Credential:
        """The ``rotate`` command's exchange: the new credential, confirmed stored by the
        endpoint but not promoted yet (:meth:`promote`); :class:`RotationFailed` otherwise."""
        async with self._lock:
            current: Credential = self.security.credential
            nxt = pending(self.credential_path)
            if nxt is not None and nxt.generation != current.generation + 1:
                raise RotationFailed("the credential file changed since the start: restart")
            if nxt is None:
                try:
                    on_disk = Credential.read(self.credential_path)
                except CredentialError as err:
                    raise RotationFailed(str(err)) from None
                if on_disk != current:
                    raise RotationFailed("the credential file changed since the start: restart")
                nxt = fresh(current)
                nxt.write(next_path(self.credential_path))  # durable before it is sent
            log.info("event=credential_rotation generation=%d", nxt.generation)
            body = Rotation.of(nxt).to_bytes()
            try:
                answer = await self.send(body)
            except SyncError as err:  # no answer, or the current context refused
                why = str(err)
            else:
                if answer == "2.04":
                    return nxt
                if answer.startswith("4."):  # a protected refusal: read, and nothing kept (a
                    # copy of this request is a replay the endpoint refuses): .next can go
                    _discard(next_path(self.credential_path), f"refused {answer}")
                raise RotationFailed(f"the endpoint answered {answer}")
            if await self._confirm(nxt):
                return nxt
            raise RotationFailed(
                f"not confirmed ({why[:120]}); the new credential stays pending and is used "
                "once the endpoint confirms it"
            )

    async def _confirm(self, nxt: Credential) -> bool:
        try:
            answer = await self.send_with(nxt, Rotation.of(nxt).to_bytes())
        except SyncError as err:
            log.debug("event=credential_next_unconfirmed error=%r", str(err)[:200])
            return False
        return answer == "2.04"

    def promote(self, nxt: Credential) -> None:
        promote(self.credential_path, self.state_path, nxt, self.security)

    async def settle(self) -> Credential | None:
        """Promote a pending ``.next`` the endpoint confirms; the promoted credential or None."""
        async with self._lock:
            nxt = pending(self.credential_path)
            if nxt is None or not await self._confirm(nxt):
                return None
            self.promote(nxt)
            return nxt

    async def settle_loop(self) -> Credential | None:
        """:meth:`settle` while a ``.next`` is pending, at growing intervals; the promoted
        credential (the agent restarts into it), or None when nothing is pending (any more)."""
        delay = SETTLE_FIRST
        while pending(self.credential_path) is not None:
            await self.sleep(delay)
            nxt = await self.settle()
            if nxt is not None:
                return nxt
            delay = min(delay * 2, SETTLE_MAX)
        return None


def coap_send_with(clock: Any, endpoints: Any, device: str, state_path: Path) -> SendWith:
    """``send_with`` over a transport of its own, with a fresh context (a new random ID Context)
    of the given credential; its state file is removed afterwards."""

    async def send_with(credential: Credential, body: bytes) -> str:
        probe = state_path.with_name(state_path.name + PROBE_SUFFIX)
        with contextlib.suppress(FileNotFoundError):
            probe.unlink()
        uris = tuple(endpoints.uris)
        security = ClientSecurity("oscore", uris, credential, probe)
        transport = CoapTransport(clock, uris=uris, security=security)
        try:
            uri = f"{endpoints.current.rstrip('/')}/{CREDENTIAL_PATH}/{device}"
            resp = await transport.request(
                "POST", uri, body, content_format=CF_CBOR, deadline=ROTATE_DEADLINE
            )
            return str(resp.dotted)
        finally:
            await transport.close()
            security.retire()
            with contextlib.suppress(FileNotFoundError):
                probe.unlink()

    return send_with
