"""OSCORE between the peer gateways of one site (``[gateway.peers] secret``): who a peer is, the
contexts of each pair of peers, and their state on disk.

Every gateway of a site holds the same **site secret** (a file of 32 random bytes, mode 0600,
made with ``edge-agent gateway-secret FILE``). From it and the node names:

- **Peer IDs**: a gateway's OSCORE sender ID is the first :data:`KID_BYTES` bytes of
  SHA-256(``"edge-agent peer id" 0 name``): stable, and distinct among the configured peers (a
  collision, or a peer named as this gateway, is refused at start: :func:`peer_ids`).
- **One direction, one context**: the requests of A to B are protected with a context whose
  master secret is the site secret and whose master salt is :func:`direction_salt` (A's ID, B's
  ID): it binds the pair and the direction, so no two directions or pairs derive the same keys.
  Its ID Context is an epoch of 8 random bytes that A picks when it has no state for B (first
  start, lost data directory) and sends with every request (the OSCORE kid context), so a
  gateway that lost its sequence numbers starts over under new keys, never under used ones.
- **A's side** (:class:`~agent.wire.oscore.ClientContext`, one per peer, ``DATA/peer-oscore/
  to-NAME.json``): the epoch and the sender sequence numbers, reserved ahead on disk, so no nonce
  is used twice across restarts, crashes and power cuts.
- **B's side** (:class:`PeerContexts`, ``DATA/peer-oscore/from-NAME.json``): A's current epoch,
  the replay window (written after each accepted request, so a replayed request is refused
  after a restart or a crash too), B's own sequence numbers (reserved ahead as A's) and the
  epochs A left (:data:`RETIRED` of them): a request under one of those is refused, a request
  under a new epoch that verifies makes it A's current one. B protects every answer under a
  sequence number of its own, never with the request's nonce (aiocoap's default), because of
  the one case the window cannot cover: B that lost ``from-NAME.json`` (or could not read it)
  takes recorded requests of A's current epoch as new, and some could be played to it once
  each (until A's own requests move the window past them); an answer under the request's nonce
  would then be a second plaintext under one nonce. B's numbers for an epoch it has none of on
  disk start at a random point below 2**39, far from any it may have used. What such a replay
  still does: the merge of state A had (idempotent and monotone, agent/gateway/crdt.py), an
  answer sealed for A. (The endpoint's Echo round trip, agent/wire/oscore.py, cannot close it:
  it rests on state of the answering side, which is what was lost.)

The peer resources are then served only through OSCORE; an unprotected request gets 4.01
(agent/gateway/peers.py :class:`~agent.gateway.peers.PeerSite`).
"""

from __future__ import annotations

import hashlib
import logging
import secrets
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from aiocoap import oscore

from agent.errors import AgentError
from agent.files import OpenToOthers, read_private, write_atomic
from agent.sync.security import uri_patterns
from agent.wire.credentials import KID_BYTES, SECRET_BYTES, Credential
from agent.wire.oscore import (
    ClientContext,
    PersistentContext,
    Sequence,
    StateFileError,
    read_state,
    write_state,
)

log = logging.getLogger(__name__)

KID_LABEL = b"edge-agent peer id\0"
SALT_LABEL = b"edge-agent peer salt\0"
SALT_BYTES = 8
#: Contexts for epochs not verified yet, per peer (anyone can put a kid context in clear into a
#: request: few, the oldest goes; a request is verified in the call that made its candidate).
CANDIDATES = 4
#: Epochs a peer left that stay refused (each is a lost state of that peer's side).
RETIRED = 64
STATE_DIR = "peer-oscore"
#: Where the answering side's own sequence numbers start for an epoch it has no numbers of on
#: disk: a random point below this (2**39: half the space of RFC 8613's 40-bit numbers).
RANDOM_START = 2**39
#: The principal name in the credentials built here (only their secrets are used).
_PRINCIPAL = "site-peer"


class PeerSecretError(AgentError, ValueError):
    """The site secret file cannot be used; the message names the fix."""


def make_secret_command(path: str = "FILE") -> str:
    return f"edge-agent gateway-secret {path}"


def read_secret(path: Path) -> bytes:
    """The site secret in ``path``: :data:`SECRET_BYTES` raw bytes, or as many hex digits (white
    space around them allowed). The file must be readable by its owner only."""
    try:
        data = read_private(path, 4 * SECRET_BYTES)
    except OpenToOthers as err:
        raise PeerSecretError(f"{err}; chmod 600 {path}") from None
    except FileNotFoundError:
        raise PeerSecretError(
            f"{path}: no site secret file; make one ({make_secret_command(str(path))}) and copy "
            "it to every gateway of the site"
        ) from None
    except OSError as err:
        raise PeerSecretError(f"{path}: cannot read the site secret: {err}") from None
    if len(data) == SECRET_BYTES:
        return data
    try:
        secret = bytes.fromhex(data.decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        secret = b""
    if len(secret) != SECRET_BYTES:
        raise PeerSecretError(
            f"{path}: a site secret is {SECRET_BYTES} bytes (raw) or {2 * SECRET_BYTES} hex "
            f"digits, not this {len(data)}-byte file; make one with {make_secret_command()}"
        )
    return secret


def write_secret(path: Path) -> None:
    """A new random site secret in ``path`` (hex, mode 0600); an existing file is kept
    (FileExistsError): replacing it would cut this gateway off from its peers."""
    if path.exists():
        raise FileExistsError(f"{path}: exists; remove it first to make a new site secret")
    write_atomic(path, (secrets.token_bytes(SECRET_BYTES).hex() + "\n").encode(), mode=0o600)


def peer_id(name: str) -> bytes:
    """The OSCORE sender ID of the gateway named ``name``."""
    return hashlib.sha256(KID_LABEL + name.encode()).digest()[:KID_BYTES]


def peer_ids(node: str, peers: Mapping[str, str]) -> dict[str, bytes]:
    """The sender ID of this gateway (``node``) and of each peer (name -> URI); ValueError (one
    line) when two of them are the same."""
    seen: dict[bytes, str] = {}
    out: dict[str, bytes] = {}
    for name in (node, *peers):
        kid = peer_id(name)
        other = seen.get(kid)
        if other is not None:
            if other == name:
                raise ValueError(f"{name!r} is this gateway's own name or named twice")
            raise ValueError(
                f"{other!r} and {name!r} have the same peer ID {kid.hex()}: rename one of them"
            )
        seen[kid], out[name] = name, kid
    return out


def direction_salt(sender: bytes, recipient: bytes) -> bytes:
    """The master salt of the requests of ``sender`` to ``recipient`` (their peer IDs)."""
    msg = SALT_LABEL + bytes((len(sender),)) + sender + bytes((len(recipient),)) + recipient
    return hashlib.sha256(msg).digest()[:SALT_BYTES]


def _credential(secret: bytes, sender: bytes, recipient: bytes, salt: bytes) -> Credential:
    return Credential(
        principal=_PRINCIPAL,
        role="gateway",
        master_secret=secret,
        master_salt=salt,
        sender_id=sender,
        recipient_id=recipient,
    )


class _AnswerContext(PersistentContext):
    """The answering side's context: every answer is protected under a sequence number of its
    own (never the request's nonce), so a request accepted twice (a replay after this side lost
    its state) is answered under a new nonce, not a second plaintext under the old one."""

    def unprotect(self, protected_message: Any, request_id: Any = None) -> tuple[Any, Any]:
        message, request_id = super().unprotect(protected_message, request_id)
        if request_id is not None:
            request_id.can_reuse_nonce = False
        return message, request_id


class _Incoming:
    """The requests of one peer: the context of its current epoch, the epochs it left (refused
    for good), and candidates for an epoch not seen yet."""

    def __init__(self, name: str, credential: Credential, path: Path) -> None:
        self.name = name
        self.credential = credential
        self.path = path
        self.current: PersistentContext | None = None
        self.retired: list[bytes] = []
        self.candidates: OrderedDict[bytes, PersistentContext] = OrderedDict()
        try:
            doc = read_state(path)
            retired = [] if doc is None else [bytes.fromhex(h) for h in doc.get("retired", [])]
        except (StateFileError, TypeError, ValueError) as err:
            log.warning("event=peer_oscore_state_unreadable path=%s error=%s", path, err)
            doc, retired = None, []
        if doc is not None:
            self.retired = retired[-RETIRED:]
            self.current = self._make(
                bytes.fromhex(doc["id_context"]), doc.get("replay"), int(doc["seq_reserved"])
            )

    def _make(
        self, id_context: bytes, replay: dict[str, int] | None, seq: int | None = None
    ) -> PersistentContext:
        # an epoch without numbers on disk may be one this side forgot (a lost or unreadable
        # file): its own numbers start at a random point, far from any it may have used
        start = secrets.randbelow(RANDOM_START) if seq is None else seq
        ctx = _AnswerContext(
            self.credential,
            Sequence(start, self.save),
            sender_id=self.credential.sender_id,
            recipient_id=self.credential.recipient_id,
            id_context=id_context,
            replay=replay,
            on_accept=self._accepted,
            claims=[f"peer:{self.name}"],
        )
        if replay is None:
            ctx.recipient_replay_window.initialize_empty()
        return ctx

    def context_for(self, id_context: bytes) -> PersistentContext | None:
        if self.current is not None and self.current.id_context == id_context:
            return self.current
        if id_context in self.retired:
            return None  # a recorded request of an epoch the peer left: 4.01
        ctx = self.candidates.get(id_context)
        if ctx is None:
            ctx = self.candidates[id_context] = self._make(id_context, None)
            while len(self.candidates) > CANDIDATES:
                self.candidates.popitem(last=False)
        return ctx

    def _accepted(self, ctx: PersistentContext) -> None:
        if ctx is not self.current:  # a request verified under a new epoch: the peer's now
            if self.current is not None:
                self.retired = [*self.retired, self.current.id_context][-RETIRED:]
            self.current = ctx
            self.candidates.clear()
            log.info(
                "event=peer_context_adopted peer=%s id_context=%s", self.name, ctx.id_context.hex()
            )
        self.save()

    def save(self) -> None:
        ctx = self.current
        if ctx is not None:
            write_state(
                self.path,
                {"id_context": ctx.id_context.hex(), "seq_reserved": ctx.sequence.reserved,
                 "replay": ctx.replay_state(), "retired": [r.hex() for r in self.retired]},
            )  # fmt: skip


class PeerContexts:
    """The OSCORE contexts of one gateway (``node``) with its ``peers`` (name -> base URI) under
    the site ``secret``, their state in ``state_dir``. Serves as aiocoap server credentials
    (:meth:`get_oscore_context_for`) and as a :class:`~agent.sync.transport.CoapTransport`'s
    protection (:meth:`configure`)."""

    def __init__(self, node: str, peers: Mapping[str, str], secret: bytes, state_dir: Path) -> None:
        ids = peer_ids(node, peers)
        me = ids[node]
        self.node = node
        self.peers = dict(peers)
        state_dir.mkdir(parents=True, exist_ok=True)
        self.outgoing: dict[str, ClientContext] = {}
        self._incoming: dict[bytes, _Incoming] = {}
        for name in peers:
            kid = ids[name]
            self.outgoing[name] = ClientContext(
                _credential(secret, me, kid, direction_salt(me, kid)),
                state_dir / f"to-{name}.json",
            )
            self._incoming[kid] = _Incoming(
                name,
                _credential(secret, me, kid, direction_salt(kid, me)),
                state_dir / f"from-{name}.json",
            )

    # -- the client side (CoapTransport's protection) ----------------------------------------

    @property
    def transports(self) -> list[str]:
        return ["oscore"]

    def configure(self, ctx: Any) -> None:
        from agent.sync import oscoreclient

        oscoreclient.install(ctx)
        for name, uri in self.peers.items():
            for pattern in uri_patterns(uri):
                ctx.client_credentials[pattern] = self.outgoing[name].context

    # -- the server side (aiocoap's duck-typed lookup) ---------------------------------------

    def get_oscore_context_for(self, unprotected: dict[Any, Any]) -> PersistentContext | None:
        kid = unprotected.get(oscore.COSE_KID)
        id_context = unprotected.get(oscore.COSE_KID_CONTEXT)
        incoming = self._incoming.get(kid) if isinstance(kid, bytes) else None
        if incoming is None or not isinstance(id_context, bytes):
            return None
        if not 1 <= len(id_context) <= 16:
            return None
        return incoming.context_for(id_context)

    def incoming_context(self, name: str) -> PersistentContext | None:
        """The context of the peer ``name``'s current epoch here (None: none verified yet)."""
        return self._incoming[peer_id(name)].current

    def find_all_used_contextless_oscore_kid(self) -> set[bytes]:
        return set()

    def close(self) -> None:
        """Clean stop: the exact next sequence numbers and the replay windows on disk."""
        for out in self.outgoing.values():
            out.close()
        for incoming in self._incoming.values():
            incoming.save()
