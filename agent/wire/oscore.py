"""OSCORE (RFC 8613) security contexts as both sides keep them: derived from a credential and an
ID Context, with sender sequence numbers reserved on disk so that no nonce is ever used twice.

How contexts are established (docs/security.md has the whole argument):

- Each principal shares a master secret and salt with the endpoint (its credential). A device
  that starts without context state (first start, reflashed, state lost) picks a random 8-byte
  **ID Context** and derives fresh keys from it (RFC 8613 section 3.2.1), so its sequence numbers
  can start at 0 again without reusing a nonce under any earlier key. This is the device half of
  Appendix B.2; aiocoap 0.4.17 has no B.2 exchange, so the endpoint's half is an RFC 9175 Echo
  round trip instead: the endpoint derives the context for an ID Context it has not verified with
  an uninitialised replay window, answers the first request with 4.01 + Echo, and accepts requests
  only once one comes back with that Echo (a replayed message of an old boot cannot). The
  endpoint's Echo values are an :class:`EchoKey` MAC over the context, not state of the context
  object: a context derived again for the same ID Context (its predecessor dropped to bound
  memory) accepts the Echo its predecessor handed out.
- Sender sequence numbers come from a :class:`Sequence`, reserved ahead in a state file
  (:data:`RESERVE` numbers per write, the file written atomically with an fsync of the file and of
  its directory) before a number of the reservation is used; after a crash or a power cut the
  side continues above the reservation.
- The endpoint keeps one :class:`Sequence` per principal for all of that principal's contexts, so
  even a context derived again for an old ID Context never repeats one of the endpoint's nonces.

A state file is JSON: ``{"id_context": HEX, "seq_reserved": N, "replay": {...} | null}``
(``replay`` null: the window was in use when the process stopped, so the next request goes through
Echo). Contexts are used from the event loop thread only.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aiocoap import FETCH, POST, Message, oscore
from aiocoap.numbers.optionnumbers import OptionNumber
from aiocoap.options import Options

from agent.files import loads_json, write_atomic
from agent.wire.credentials import Credential

log = logging.getLogger(__name__)

#: Sequence numbers reserved per write of the state file (one fsync per this many messages).
RESERVE = 256
#: Replay window size (RFC 8613 section 7.4: at least 32).
WINDOW = 32
ID_CONTEXT_BYTES = 8
STATE_MAX_BYTES = 4096
MAX_SEQNO = 2**40 - 1  # RFC 8613 section 7.2.1
#: An endpoint's Echo value (RFC 9175) is good in the period of this many seconds it was made in
#: and the next one (60 to 120 s: a device repeats its request as soon as the 4.01 arrives).
ECHO_PERIOD = 60.0
ECHO_BYTES = 8
#: Requests the endpoint's short way decrypted and left to aiocoap, kept per context until
#: aiocoap unprotects them (:meth:`PersistentContext.hand_on`); the oldest goes.
HANDED_ON = 8
#: A request's options that aiocoap's ``_split_message`` leaves out of the encrypted inner
#: message (Uri-Host goes to the outer one; RFC 8613 section 4.1.3).
_OUTER_ONLY = frozenset(
    {
        OptionNumber.URI_HOST,
        OptionNumber.URI_PORT,
        OptionNumber.PROXY_URI,
        OptionNumber.PROXY_SCHEME,
    }
)


class StateFileError(ValueError):
    """The context state file is malformed."""


def read_state(path: Path) -> dict[str, Any] | None:
    """The state file's document, or None when there is none."""
    try:
        with open(path, "rb") as f:
            data = f.read(STATE_MAX_BYTES + 1)
    except FileNotFoundError:
        return None
    if len(data) > STATE_MAX_BYTES:
        raise StateFileError(f"{path}: too large for a context state file")
    try:
        doc = loads_json(data)
        # Sequence.take reserves up to RESERVE numbers past the last one it may hand out
        whole_number(doc["seq_reserved"], MAX_SEQNO + RESERVE, "seq_reserved")
        bytes.fromhex(doc["id_context"])
        replay = doc.get("replay")
        if replay is not None:
            doc["replay"] = {
                "index": whole_number(replay["index"], MAX_SEQNO, "replay index"),
                "bitfield": whole_number(replay["bitfield"], (1 << WINDOW) - 1, "replay bitfield"),
            }
    except (ValueError, KeyError, TypeError) as err:
        raise StateFileError(f"{path}: not a context state file: {err!r}") from None
    return doc  # type: ignore[no-any-return]


def whole_number(value: Any, most: int, what: str) -> int:
    """``value`` if it is an integer in [0, ``most``]; ValueError otherwise (a number out of range
    would hand out sequence numbers past the limit, or fail every request until re-keyed)."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= most:
        raise ValueError(f"{what}: an integer in [0, {most}] is required, not {value!r}")
    return value


def write_state(path: Path, doc: dict[str, Any]) -> None:
    write_atomic(path, json.dumps(doc).encode(), mode=0o600)


class Sequence:
    """Sender sequence numbers, reserved ahead: ``persist()`` is called (and must make the new
    ``reserved`` durable) before any number at or above the old reservation is handed out."""

    def __init__(self, start: int, persist: Callable[[], None], reserve: int = RESERVE) -> None:
        self.next = start
        self.reserved = start  # numbers below this may have been used
        self._persist = persist
        self._reserve = reserve

    def take(self) -> int:
        n = self.next
        if n >= MAX_SEQNO:
            raise oscore.ContextUnavailable("sequence numbers exhausted: re-key this principal")
        if n >= self.reserved:
            old, self.reserved = self.reserved, n + 1 + self._reserve
            try:
                self._persist()
            except BaseException:  # not durable (a full disk): not reserved, nothing handed out
                self.reserved = old
                raise
        self.next = n + 1
        return n

    def release(self) -> None:
        """Clean stop: the next start may begin at the next number."""
        self.reserved = self.next


class ReplayWindow(oscore.ReplayWindow):
    """aiocoap's replay window, whose whole state (not initialised included) can be taken and put
    back: the endpoint's short way (cloud/fastpath.py) unprotects a request and, when it leaves
    the request to aiocoap, puts the window back as it was. A window started by a request that
    came back with the Echo (aiocoap's ``initialize_from_freshlyseen``, which marks that request
    seen) counts as an accepted message, as a window struck out by any later one does."""

    def initialize_from_freshlyseen(self, seen: int) -> None:
        super().initialize_from_freshlyseen(seen)
        self.strike_out_callback()

    def state(self) -> dict[str, int] | None:
        """``persist()``'s document, or None while not initialised."""
        return self.persist() if self.is_initialized() else None

    def put_back(self, state: dict[str, int] | None) -> None:
        """Back to ``state`` (of :meth:`state`): None makes the window not initialised."""
        if state is None:
            self._index = self._bitfield = None
        else:
            self.initialize_from_persisted(state)


class EchoKey:
    """Echo values (RFC 9175) for the Echo round trip of a context whose replay window is not
    initialised, kept in no object: a MAC under a key of this process over the context's
    recipient ID and ID Context, an ``epoch`` its owner picks (a new one voids every Echo value
    handed out under the old one), and the period of ``clock`` (:data:`ECHO_PERIOD`). A value
    is fresh in the period it was made in and the next one. The key lives as long as the
    process, so a restarted endpoint accepts no Echo value of its predecessor."""

    def __init__(
        self, clock: Callable[[], float] = time.monotonic, period: float = ECHO_PERIOD
    ) -> None:
        self._key = secrets.token_bytes(32)
        self._clock = clock
        self._period = period

    @staticmethod
    def binding(recipient_id: bytes, id_context: bytes, epoch: int) -> bytes:
        """What a value is bound to, unambiguously (each part with its length)."""
        return b"".join(
            (
                len(recipient_id).to_bytes(2, "big"),
                recipient_id,
                len(id_context).to_bytes(2, "big"),
                id_context,
                epoch.to_bytes(8, "big"),
            )
        )

    def _mac(self, binding: bytes, period: int) -> bytes:
        msg = binding + period.to_bytes(8, "big", signed=True)
        return hmac.new(self._key, msg, hashlib.sha256).digest()[:ECHO_BYTES]

    def _period_now(self) -> int:
        return int(self._clock() // self._period)

    def value(self, binding: bytes) -> bytes:
        """The Echo value to hand out now."""
        return self._mac(binding, self._period_now())

    def fresh(self, binding: bytes, echo: bytes) -> bool:
        """``echo`` was made for ``binding`` in this period or the last one."""
        now = self._period_now()
        return any(hmac.compare_digest(echo, self._mac(binding, p)) for p in (now, now - 1))


def _inner_echo(plaintext: bytes) -> bytes | None:
    """The Echo option of a decrypted OSCORE plaintext (code, options, payload), or None."""
    try:
        inner = Message(code=plaintext[0])
        inner.opt.decode(plaintext[1:])
        echo = inner.opt.echo
    except Exception:  # aiocoap's own decoding of the plaintext refuses it right after this
        return None
    return bytes(echo) if echo is not None else None


class PersistentContext(oscore.CanProtect, oscore.CanUnprotect, oscore.SecurityContextUtils):
    """An OSCORE context drawing its sender sequence numbers from a durable :class:`Sequence`.

    ``replay``: the persisted replay window, or None (uninitialised: the next accepted request
    needs an Echo round trip). ``on_accept(ctx)`` is called when a message was accepted (the
    first call means the context is verified: the request that came back with the Echo).
    ``claims`` is what the endpoint's resources see as ``request.remote.authenticated_claims``.
    ``echo``: where the endpoint's Echo values come from (bound to ``echo_epoch``); without it
    (a device's context, whose window is always initialised) a random value per object.
    """

    def __init__(
        self,
        credential: Credential,
        sequence: Sequence,
        *,
        sender_id: bytes,
        recipient_id: bytes,
        id_context: bytes,
        replay: dict[str, int] | None = None,
        on_accept: Callable[[PersistentContext], None] | None = None,
        claims: list[Any] | None = None,
        echo: EchoKey | None = None,
        echo_epoch: int = 0,
    ) -> None:
        self.alg_aead = oscore.algorithms[credential.aead]
        self.hashfun = oscore.hashfunctions[credential.hkdf]
        self.sender_id = sender_id
        self.recipient_id = recipient_id
        self.id_context = id_context
        self.derive_keys(credential.master_salt, credential.master_secret)
        self.authenticated_claims = list(claims or [])  # never the class-level shared list
        self._echo = echo
        self._echo_binding = EchoKey.binding(recipient_id, id_context, echo_epoch)
        # aiocoap compares a request's Echo with this (and sends it in the 4.01); with ``echo``
        # it is set again for each request before that (_post_decrypt_checks)
        self.echo_recovery = (
            echo.value(self._echo_binding) if echo is not None else secrets.token_bytes(ECHO_BYTES)
        )
        self.recipient_replay_window = ReplayWindow(WINDOW, self._accepted)
        if replay is not None:
            self.recipient_replay_window.initialize_from_persisted(replay)
        self.sequence = sequence
        self.on_accept = on_accept
        self._label = f"<PersistentContext kid={sender_id.hex()} peer={recipient_id.hex()}>"
        self.accepted = 0
        # OSCORE option -> (payload, code, sequence number, inner message, request id)
        self._handed_on: OrderedDict[bytes, tuple[bytes, Any, int, Message, Any]] = OrderedDict()

    @property
    def sender_sequence_number(self) -> int:  # type: ignore[override]
        return self.sequence.next

    @sender_sequence_number.setter
    def sender_sequence_number(self, value: int) -> None:
        self.sequence.next = max(self.sequence.next, value)

    def new_sequence_number(self) -> int:
        return self.sequence.take()

    def post_seqnoincrease(self) -> None:
        """Not used: :class:`Sequence` reserves before it hands out a number."""

    def hand_on(self, protected: Message, inner: Message, request_id: Any) -> None:
        """The endpoint's short way (cloud/fastpath.py) unprotected the request ``protected``
        into ``inner``, put the replay window back as it was and leaves the datagram to aiocoap:
        aiocoap's :meth:`unprotect` of the same message (the same OSCORE option, code and
        payload) takes ``inner`` instead of decrypting it again. Decryption is deterministic, so
        only the replay check is left to do, and it is done then as it would be."""
        handed, key = self._handed_on, bytes(protected.opt.oscore)
        handed[key] = (
            bytes(protected.payload),
            protected.code,
            int.from_bytes(request_id.partial_iv, "big"),
            inner,
            request_id,
        )
        handed.move_to_end(key)
        while len(handed) > HANDED_ON:
            handed.popitem(last=False)

    def unprotect(self, protected_message: Message, request_id: Any = None) -> tuple[Message, Any]:
        """aiocoap's, or for a request :meth:`hand_on` gave the result of: that result, once,
        if the request's sequence number is still new to the replay window (aiocoap's check, and
        its strike-out, which counts the request as accepted)."""
        if self._handed_on and request_id is None and protected_message.opt.observe is None:
            option = protected_message.opt.oscore
            handed = self._handed_on.pop(bytes(option), None) if option is not None else None
            if handed is not None:
                payload, code, seqno, inner, handed_id = handed
                window = self.recipient_replay_window
                if (
                    payload == protected_message.payload
                    and code == protected_message.code
                    and window.is_initialized()
                    and window.is_valid(seqno)
                ):
                    window.strike_out(seqno)
                    return inner, handed_id
        return super().unprotect(protected_message, request_id)  # type: ignore[no-any-return]

    def _split_message(self, message: Message, request_id: Any) -> tuple[Message, bytes]:
        """aiocoap's split of ``message`` into the outer message and the inner plaintext, without
        its deep copy of every option of the message (some 40 % of the cost of protecting a
        1 KiB block): the inner options are the message's own option objects, encoded as they are.
        A Proxy-Uri, which aiocoap splits into options first, goes through aiocoap's own."""
        opt = message.opt
        if opt.proxy_uri is not None:
            return super()._split_message(message, request_id)  # type: ignore[no-any-return]
        inner = Options()
        if message.code.is_request():
            for option in opt.option_list():
                if option.number not in _OUTER_ONLY:
                    inner.add_option(option)
            observe = opt.observe
            outer = Message(
                code=POST if observe is None else FETCH, uri_host=opt.uri_host, observe=observe
            )
        else:
            for option in opt.option_list():
                inner.add_option(option)
            outer = Message(code=request_id.code_style.response)
        plaintext = bytes((message.code,)) + inner.encode()
        if message.payload:
            plaintext += b"\xff" + message.payload
        return outer, plaintext

    def _construct_nonce(self, partial_iv_short: bytes, piv_generator_id: bytes, alg: Any) -> bytes:
        """The AEAD nonce (RFC 8613 section 5.2) as aiocoap builds it, the XOR with the Common IV
        done as one of integers: aiocoap XORs byte by byte in a generator and formats a debug
        line of three hex strings, twice per exchange on each side."""
        components = b"".join(
            (
                bytes((len(piv_generator_id),)),
                b"\0" * (alg.iv_bytes - 6 - len(piv_generator_id)),
                piv_generator_id,
                b"\0" * (5 - len(partial_iv_short)),
                partial_iv_short,
            )
        )
        n = len(components)
        common_iv = self.common_iv[:n]
        if len(common_iv) != n:  # aiocoap's refusal of an inconsistent length, as it raises it
            return super()._construct_nonce(partial_iv_short, piv_generator_id, alg)  # type: ignore[no-any-return]
        nonce = int.from_bytes(common_iv, "big") ^ int.from_bytes(components, "big")
        return nonce.to_bytes(n, "big")

    def _post_decrypt_checks(
        self, aad: bytes, plaintext: bytes, protected_message: Any, request_id: Any
    ) -> None:
        """aiocoap's hook after a message decrypted and verified, just before it compares the
        request's Echo with ``echo_recovery`` (only while the window is not initialised): the
        request's own Echo when it is fresh for this context, else the one to hand out now."""
        super()._post_decrypt_checks(aad, plaintext, protected_message, request_id)
        if self._echo is None or self.recipient_replay_window.is_initialized():
            return
        if not protected_message.code.is_request():
            return
        echo = _inner_echo(plaintext)
        if echo is not None and self._echo.fresh(self._echo_binding, echo):
            self.echo_recovery = echo
        else:
            self.echo_recovery = self._echo.value(self._echo_binding)

    def _accepted(self) -> None:
        self.accepted += 1
        if self.on_accept is not None:
            self.on_accept(self)

    def replay_state(self) -> dict[str, int] | None:
        return self.recipient_replay_window.state()

    def __repr__(self) -> str:  # aiocoap formats it into a task name on every request: cheap
        return self._label


class ClientContext:
    """A principal's own (client) context and its state file.

    From the state file, or with a new random ID Context when there is none (first start,
    reflash, lost or unreadable state). The window checks only the endpoint's notifications
    (numbered from the endpoint's counter) and is written after each, so a replayed old
    notification is refused after a restart too.
    """

    def __init__(self, credential: Credential, state_path: Path) -> None:
        self.path = state_path
        self.retired = False
        try:
            doc = read_state(state_path)
        except StateFileError as err:
            log.warning("event=oscore_state_unreadable path=%s error=%s", state_path, err)
            doc = None
        if doc is None:
            id_context, seq, replay = secrets.token_bytes(ID_CONTEXT_BYTES), 0, None
            log.info("event=oscore_new_context id_context=%s", id_context.hex())
        else:
            id_context, seq = bytes.fromhex(doc["id_context"]), doc["seq_reserved"]
            replay = doc.get("replay")
        self.sequence = Sequence(int(seq), self.save)
        self.context = PersistentContext(
            credential,
            self.sequence,
            sender_id=credential.sender_id,
            recipient_id=credential.recipient_id,
            id_context=id_context,
            replay=replay,
            on_accept=lambda _ctx: self.save(),
        )
        if replay is None:
            self.context.recipient_replay_window.initialize_empty()
        self.save()  # the ID Context is on disk before any message uses it

    def state(self) -> dict[str, Any]:
        return {
            "id_context": self.context.id_context.hex(),
            "seq_reserved": self.sequence.reserved,
            "replay": self.context.replay_state(),
        }

    def save(self) -> None:
        if not self.retired:
            write_state(self.path, self.state())

    def retire(self) -> None:
        """The credential was replaced (agent/sync/rotation.py): this context's state is never
        written again, so the new credential starts a new context. Its key is never used again
        either, so numbers it hands out from here on need no reservation."""
        self.retired = True

    def close(self) -> None:
        """Clean stop: the exact next number, so no numbers are skipped."""
        self.sequence.release()
        self.save()
