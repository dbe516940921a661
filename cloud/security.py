"""Who is asking: the endpoint's principals (devices and operators), their OSCORE contexts and
DTLS pre-shared keys, and the rule of what each may do.

- :class:`Principals` holds every registered credential in memory, indexed by OSCORE key id, and
  answers aiocoap's context lookup (``get_oscore_context_for``) for incoming requests: the
  verified context of the principal for its current ID Context, or a candidate context for a new
  ID Context (a device that restarted without state) whose replay window starts uninitialised, so
  aiocoap answers 4.01 + Echo and the candidate is adopted only when a request comes back with
  the Echo (agent/wire/oscore.py). Revoked principals and unknown key ids get no context (4.01).
  Anyone who knows a key id (it is sent in clear) can make candidates, so they are few per
  principal and the oldest goes; what they cannot do is keep a device from coming back: the
  Echo value is a MAC over the key id, the ID Context and the principal's epoch
  (:class:`~agent.wire.oscore.EchoKey`), not something the dropped candidate took with it, so
  the candidate derived again when the device's request comes back accepts that Echo. Adopting
  a context starts a new epoch and drops the candidates: no Echo value handed out before is
  good any more, so a request of a replaced context that came back with its Echo cannot be
  accepted again by a candidate derived anew for its ID Context.
  The endpoint's sender sequence numbers come from one counter in the storage
  (:class:`SharedSequence`), in blocks: every endpoint process and host that shares the storage
  takes disjoint blocks, each above all earlier ones, so no two processes ever use one nonce and
  each peer sees the endpoint's numbers grow. What a process keeps in ``DATA/oscore/`` (with one
  process per data directory) is the verified ID Context and, after a clean stop, the replay
  window; without it (several processes, or a lost file) a peer goes through Echo once.
- :func:`identity` turns a request's authenticated claims (OSCORE, or DTLS-PSK) into a
  :class:`Principal`, or None for an unauthenticated request.
- :func:`allowed` is the access rule: a device reaches only its own resources (and model files);
  operators set desired state, read any device's state and registry entry, and read model files;
  a gateway does for each device attached to it what that device may do with its own resources,
  and posts to its own ``/relay`` (docs/security.md "Gateways").
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import secrets
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiocoap import oscore

from agent.files import fsync_dir, loads_json, write_atomic
from agent.wire.credentials import ENDPOINT_KID, KID_BYTES, Credential
from agent.wire.oscore import (
    MAX_SEQNO,
    WINDOW,
    EchoKey,
    PersistentContext,
    Sequence,
    StateFileError,
    read_state,
    whole_number,
)
from cloud.storage import DuplicateKeyId

log = logging.getLogger(__name__)

#: Candidate contexts (new ID Contexts not yet verified by Echo) kept per principal; the oldest
#: goes, and is derived again (accepting the same Echo) if its device comes back with the Echo.
MAX_CANDIDATES = 2
#: The endpoint's sender sequence numbers taken from the storage at a time (one transaction).
SEQUENCE_BLOCK = 4096
#: The storage's name of that counter (:meth:`cloud.storage.Storage.reserve_sequence`).
ENDPOINT_SEQUENCE = "endpoint"
#: Where a clean stop keeps the verified contexts' replay windows (in the state directory).
CLEAN_STOP_FILE = "clean-stop.json"
CLEAN_STOP_MAX_BYTES = 64 * 1024 * 1024


class Principal(str):
    """An authenticated identity: the principal's name (a str), its role, and the generation of
    the credential it authenticated with (None: not known, not checked)."""

    role: str
    generation: int | None

    def __new__(cls, name: str, role: str, generation: int | None = None) -> Principal:
        obj = super().__new__(cls, name)
        obj.role = role
        obj.generation = generation
        return obj

    def __repr__(self) -> str:
        return f"Principal({str(self)!r}, {self.role!r})"


def identity(request: Any) -> Principal | None:
    """The authenticated principal of ``request``, or None."""
    remote = getattr(request, "remote", None)
    for claim in getattr(remote, "authenticated_claims", ()) or ():
        if isinstance(claim, Principal):
            return claim
    return None


#: route name -> method -> who may: "own" (the device named in the path, or the gateway it is
#: attached to), "self" (the device named in the path only, never its gateway), "operator",
#: "gateway" (the gateway named in the path), "any" (any authenticated principal), "public"
#: (anyone).
ACCESS: dict[str, dict[str, tuple[str, ...]]] = {
    "wkc": {"GET": ("public",)},
    "ingest": {"POST": ("own",)},
    "reported": {"GET": ("own", "operator"), "PUT": ("own",)},
    "desired": {"GET": ("own", "operator"), "PUT": ("operator",)},
    "device": {"GET": ("own", "operator")},
    "models": {"GET": ("any",)},
    "releases": {"GET": ("any",)},
    "infer": {"POST": ("own",)},
    "validate": {"POST": ("own",)},
    "learn": {"POST": ("own",)},
    "logs": {"POST": ("own",)},
    "credential": {"POST": ("self",)},  # cloud/credroutes.py: a device's own rotation
    "masters": {"GET": ("any",)},
    "relay": {"POST": ("gateway",)},
}


def allowed(
    route: str,
    method: str,
    device: str | None,
    who: Principal | None,
    relays: Mapping[str, str] | None = None,
) -> int:
    """0 when ``who`` may, else the refusal: 401 (not authenticated) or 403 (not this one).
    ``device``: the principal the path names; ``relays``: device -> the gateway it is attached
    to (a gateway acts for those devices only)."""
    rules = ACCESS.get(route, {}).get(method, ())
    if "public" in rules:
        return 0
    if who is None:
        return 401
    if "any" in rules:
        return 0
    if "operator" in rules and who.role == "operator":
        return 0
    if device is None:
        return 403
    if ("own" in rules or "self" in rules) and who.role == "device" and who == device:
        return 0
    if "own" in rules and who.role == "gateway" and relays and relays.get(device) == who:
        return 0
    if "gateway" in rules and who.role == "gateway" and who == device:
        return 0
    return 403


class SharedSequence(Sequence):
    """The endpoint's sender sequence numbers, for all principals: blocks of ``block`` numbers
    from ``allocate(count) -> start``, which returns a block above every block it returned
    before to any process, durably. Numbers a process did not use before it stopped are skipped,
    never reused (RFC 8613 only asks that a number is never used twice under one key, and a
    peer's replay window only that they grow)."""

    def __init__(self, allocate: Callable[[int], int], block: int = SEQUENCE_BLOCK) -> None:
        super().__init__(0, _nothing)
        self._allocate = allocate
        self._block = block

    def take(self) -> int:
        while self.next >= self.reserved:
            start = self._allocate(self._block)
            if start + self._block > MAX_SEQNO:
                raise oscore.ContextUnavailable("sequence numbers exhausted: re-key the endpoint")
            self.next, self.reserved = max(self.next, start), start + self._block
        n = self.next
        self.next = n + 1
        return n

    def release(self) -> None:
        """Nothing to keep: the next block is above this one whatever was used of it."""


def _nothing() -> None:
    """A :class:`SharedSequence` persists through its allocator."""


@dataclass
class _Entry:
    credential: Credential
    revoked: bool = False


class _PrincipalState:
    """One principal's contexts at the endpoint: the verified one and candidates. ``saved``:
    the verified ID Context and replay window the last clean stop left (:func:`take_clean_stop`),
    with which the principal carries on without an Echo round trip. ``epochs``: the endpoint's
    counter of Echo epochs (one for all principals: a state made again never reuses one)."""

    def __init__(
        self,
        entry: _Entry,
        saved: tuple[bytes, dict[str, int]] | None,
        sequence: SharedSequence,
        echo: EchoKey,
        epochs: Iterator[int],
    ) -> None:
        self.entry = entry
        self.id_context: bytes | None = saved[0] if saved else None
        self.replay: dict[str, int] | None = saved[1] if saved else None
        self.sequence = sequence
        self.current: PersistentContext | None = None
        self.candidates: dict[bytes, PersistentContext] = {}
        self._echo = echo
        self._epochs = epochs
        self.epoch = next(epochs)  # the Echo values of this principal's candidates are bound to it

    def _make(self, id_context: bytes, replay: dict[str, int] | None) -> PersistentContext:
        cred = self.entry.credential
        return PersistentContext(
            cred,
            self.sequence,
            sender_id=ENDPOINT_KID,
            recipient_id=cred.sender_id,
            id_context=id_context,
            replay=replay,
            on_accept=self._accepted,
            claims=[Principal(cred.principal, cred.role, cred.generation)],
            echo=self._echo,
            echo_epoch=self.epoch,
        )

    def context_for(self, id_context: bytes) -> PersistentContext:
        if self.current is None and self.id_context is not None:
            self.current = self._make(self.id_context, self.replay)
            self.replay = None
        if self.current is not None and self.current.id_context == id_context:
            return self.current
        ctx = self.candidates.get(id_context)
        if ctx is None:
            # unauthenticated: anyone with the key id gets here, so the set is bounded and the
            # oldest goes; dropping one loses nothing (no window, and its Echo is a MAC)
            if len(self.candidates) >= MAX_CANDIDATES:
                self.candidates.pop(next(iter(self.candidates)))
            ctx = self.candidates[id_context] = self._make(id_context, None)
        return ctx

    def _accepted(self, ctx: PersistentContext) -> None:
        if ctx is not self.current:  # a candidate proved fresh (Echo): it is the context now
            # from the request that came back with the Echo on (the window starts there), so
            # no unauthenticated datagram can drop it; a new epoch voids every Echo value handed
            # out so far, and the candidates made under the old one go
            self.candidates.clear()
            self.epoch = next(self._epochs)
            self.current = ctx
            self.id_context = ctx.id_context
            log.info(
                "event=oscore_context principal=%s id_context=%s",
                self.entry.credential.principal,
                ctx.id_context.hex(),
            )

    def clean_stop(self) -> dict[str, Any] | None:
        """What a clean stop keeps of this principal: its verified context's window, if any."""
        cur = self.current
        if cur is not None:
            window = cur.replay_state()
            return (
                None if window is None else {"id_context": cur.id_context.hex(), "replay": window}
            )
        if self.id_context is not None and self.replay is not None:  # saved, not used since
            return {"id_context": self.id_context.hex(), "replay": self.replay}
        return None


class Principals:
    """The registered principals, for aiocoap's OSCORE context lookup and the PSK lookup.

    Put into the server's credentials map as one entry; aiocoap calls
    :meth:`get_oscore_context_for` with the unprotected header of each OSCORE request."""

    def __init__(
        self,
        state_dir: Path | None,
        allocate: Callable[[int, int], int] | None = None,
        *,
        echo: EchoKey | None = None,
    ) -> None:
        """``state_dir``: where a clean stop keeps the verified ID Contexts and replay windows
        (:data:`CLEAN_STOP_FILE`; None: nowhere, for endpoints that share a data directory).
        ``allocate(count, at_least)``: a block of the endpoint's sequence numbers from the
        storage (None: a counter in memory, for tests that never restart). ``echo``: the Echo
        values' key and clock (None: a new key, the monotonic clock)."""
        self.state_dir = state_dir
        self._by_kid: dict[bytes, _Entry] = {}
        self._by_name: dict[str, _Entry] = {}
        self._states: dict[str, _PrincipalState] = {}
        self._allocate = allocate or _InMemory()
        self._floor: int | None = None  # the highest number older releases reserved in files
        self.sequence = SharedSequence(self._take_block)
        self._saved = take_clean_stop(state_dir)  # principal -> (ID Context, replay window)
        self._echo = echo or EchoKey()  # the Echo values of all principals' candidates
        self._epochs = itertools.count(1)

    def _take_block(self, count: int) -> int:
        if self._floor is None:
            self._floor = legacy_floor(self.state_dir)
        return self._allocate(count, self._floor)

    def load(self, credentials: list[tuple[Credential, bool]]) -> set[str]:
        """Replace the registry with ``(credential, revoked)`` pairs (from the storage). Returns
        the principals whose credential was re-keyed, revoked or removed: sessions that were
        authenticated with the old one (DTLS) must end."""
        by_kid: dict[bytes, _Entry] = {}
        by_name: dict[str, _Entry] = {}
        for cred, revoked in credentials:
            entry = _Entry(cred, revoked)
            by_kid[cred.sender_id] = entry
            by_name[cred.principal] = entry
        for name, state in list(self._states.items()):
            new = by_name.get(name)
            if new is None or new.revoked or new.credential != state.entry.credential:
                del self._states[name]  # re-keyed or revoked: its contexts go
        for name in list(self._saved):
            new, old = by_name.get(name), self._by_name.get(name)
            if new is None or new.revoked or (old is not None and new.credential != old.credential):
                del self._saved[name]
        gone = set()
        for name, old in self._by_name.items():
            new = by_name.get(name)
            if not old.revoked and (new is None or new.revoked or new.credential != old.credential):
                gone.add(name)
        self._by_kid, self._by_name = by_kid, by_name
        return gone

    def __len__(self) -> int:
        return len(self._by_name)

    def credential(self, name: str) -> Credential | None:
        entry = self._by_name.get(name)
        return None if entry is None or entry.revoked else entry.credential

    def acting(self, relays: Mapping[str, str]) -> dict[str, str]:
        """``relays`` (device -> its gateway, as stored) without the devices whose own credential
        is revoked: a gateway acts for no such device (docs/security.md "Revocation")."""
        return {
            device: gateway
            for device, gateway in relays.items()
            if not ((entry := self._by_name.get(device)) is not None and entry.revoked)
        }

    def current(self, who: Principal) -> bool:
        """Whether ``who`` authenticated with its principal's credential as registered now: not
        revoked, re-keyed or rotated since (a request or an observation decrypted before the
        change is not taken as it: the endpoint answers 4.01, which ends an observation)."""
        cred = self.credential(who)
        return (
            cred is not None and cred.role == who.role and who.generation in (None, cred.generation)
        )

    def psk(self, identity_: bytes) -> bytes | None:
        """The DTLS PSK of the principal named ``identity_``, or None."""
        cred = self.credential(identity_.decode("utf-8", "replace"))
        return cred.psk if cred is not None and cred.psk else None

    # -- aiocoap's duck-typed lookup -------------------------------------------------------------

    def get_oscore_context_for(self, unprotected: dict[Any, Any]) -> PersistentContext | None:
        kid = unprotected.get(oscore.COSE_KID)
        id_context = unprotected.get(oscore.COSE_KID_CONTEXT)
        entry = self._by_kid.get(kid) if isinstance(kid, bytes) else None
        if entry is None or entry.revoked or not isinstance(id_context, bytes):
            return None
        if not 1 <= len(id_context) <= 16:
            return None
        name = entry.credential.principal
        state = self._states.get(name)
        if state is None:
            saved = self._saved.pop(name, None)
            state = self._states[name] = _PrincipalState(
                entry, saved, self.sequence, self._echo, self._epochs
            )
        return state.context_for(id_context)

    def find_all_used_contextless_oscore_kid(self) -> set[bytes]:
        return set()  # every context here has an ID Context; nothing for EDHOC to avoid

    def close(self) -> None:
        """Clean stop: every verified context's window, in one file (:func:`take_clean_stop`
        reads it at the next start), so the principals carry on without an Echo round trip."""
        kept: dict[str, Any] = {
            name: {"id_context": ctx.hex(), "replay": replay}
            for name, (ctx, replay) in self._saved.items()
        }
        for name, state in self._states.items():
            doc = state.clean_stop()
            if doc is not None:
                kept[name] = doc
        self._states.clear()
        self._saved.clear()
        if self.state_dir is None or not kept:
            return
        try:
            self.state_dir.mkdir(parents=True, exist_ok=True)
            write_atomic(
                self.state_dir / CLEAN_STOP_FILE,
                json.dumps({"principals": kept}).encode(),
                mode=0o600,
            )
        except OSError as err:  # the next start goes through Echo: slower, never unsafe
            log.warning("event=oscore_clean_stop_unsaved error=%s", err)


class _InMemory:
    """Blocks of sequence numbers from a counter in memory (one process, never restarted)."""

    def __init__(self) -> None:
        self.reserved = 0

    def __call__(self, count: int, at_least: int) -> int:
        start = max(self.reserved, at_least)
        self.reserved = start + count
        return start


def take_clean_stop(state_dir: Path | None) -> dict[str, tuple[bytes, dict[str, int]]]:
    """The windows the last clean stop saved, and the file removed (durably) before anything
    is served: after a crash there is none, and every principal goes through Echo, because a
    window saved at an earlier clean stop would let messages accepted since be replayed."""
    if state_dir is None:
        return {}
    path = state_dir / CLEAN_STOP_FILE
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return {}
    except OSError as err:
        log.warning("event=oscore_clean_stop_unreadable path=%s error=%s", path, err)
        data = b""
    out: dict[str, tuple[bytes, dict[str, int]]] = {}
    try:
        if len(data) > CLEAN_STOP_MAX_BYTES:
            raise ValueError(f"over {CLEAN_STOP_MAX_BYTES} bytes")
        for name, doc in loads_json(data)["principals"].items():
            replay = {
                "index": whole_number(doc["replay"]["index"], MAX_SEQNO, "replay index"),
                "bitfield": whole_number(
                    doc["replay"]["bitfield"], (1 << WINDOW) - 1, "replay bitfield"
                ),
            }
            out[str(name)] = (bytes.fromhex(doc["id_context"]), replay)
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        log.warning("event=oscore_clean_stop_unreadable path=%s error=%r", path, str(err)[:200])
        out = {}
    try:
        path.unlink()
        fsync_dir(state_dir)
    except OSError as err:  # it cannot be trusted after a crash: serve nothing without Echo
        log.error("event=oscore_clean_stop_not_removed path=%s error=%s", path, err)
        return {}
    return out


def legacy_floor(state_dir: Path | None) -> int:
    """The highest sender sequence number reserved in the per-principal state files of releases
    that kept one counter per principal: the shared counter starts above it."""
    floor = 0
    if state_dir is None or not state_dir.is_dir():
        return floor
    for path in state_dir.glob("*.json"):
        if path.name == CLEAN_STOP_FILE:
            continue
        try:
            doc = read_state(path)
        except (StateFileError, OSError):
            continue
        if doc is not None:
            floor = max(floor, int(doc["seq_reserved"]))
    return floor


def issue_credential(
    storage: Any, principal: str, role: str, now: float, *, psk: bytes | None = None
) -> Credential:
    """A new credential for ``principal`` (a re-key when it had one: new key id, new secrets,
    the next generation), stored only if nobody stored another since it was read
    (:class:`~cloud.storebase.CredentialChanged`); returns the principal's side."""
    old = {c.principal: c for c, _ in storage.credentials()}.get(principal)
    replaces = old.generation if old is not None else 0
    for _ in range(16):
        cred = Credential.generate(
            principal, role, secrets.token_bytes(KID_BYTES), generation=replaces + 1
        )
        if psk is not None:  # the operator's DTLS PSK (--psk-file) instead of a random one
            cred = dataclasses.replace(cred, psk=psk)
        try:  # CredentialChanged: another process rekeyed or rotated it since the read
            storage.put_credential(cred, now, replaces=replaces)
            return cred
        except DuplicateKeyId:
            continue
    raise RuntimeError("no free OSCORE key id after 16 tries")
