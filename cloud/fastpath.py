"""The endpoint's short way for the request that dominates a fleet's traffic: an OSCORE-protected
confirmable ``POST /ingest/<device>`` that fits in one datagram.

aiocoap's server runs every request through its message manager, a token manager, a pipe, a task
for the OSCORE site wrapper and another for the resource, and keeps a Message per exchange: about
1 ms of CPU per request here, the endpoint's limit under a fleet (docs/fleet.md). This module sits
in front of aiocoap's UDP transport (it wraps the transport protocol's ``datagram_msg_received``)
and answers that one kind of request itself, with the same security context objects, the same
checks and the same resource code (``_Site.render``: path, method, options, authorisation, the
codec, the group commit), for about a third of the CPU. Everything else (other methods and
resources, Block1/Block2, Observe, NON, plain CoAP, anything that fails to decode or decrypt) is
handed to aiocoap untouched, which answers it as before. The Echo round trip (RFC 9175) of a peer
whose replay window is not initialised is answered here too: a device with a new ID Context, and
every device once after an endpoint crash or a restart of several processes (a clean stop of one
process keeps the windows), which is a whole fleet within one interval.

What the short way does, by RFC 7252 and RFC 8613:

- It looks at a datagram only when its header says CON and POST and its outer options are only
  OSCORE, Uri-Host and Uri-Port. The OSCORE option names the security context
  (``Principals.get_oscore_context_for``, the same lookup aiocoap makes); its partial IV must be
  valid in that context's replay window, else aiocoap takes it (replay refusal).
- Unprotecting strikes the sequence number out of the replay window. The inner request is taken
  only if it is a POST to ``ingest`` without Block1, Block2, Observe, No-Response or proxy
  options; otherwise the window is put back as it was (``ReplayWindow.state``/``put_back``,
  agent/wire/oscore.py) and the datagram goes to aiocoap, which unprotects it again: nothing is
  consumed twice. Nor decrypted twice (the blocks of a Block1 transfer, a device's large
  batches): the context keeps the inner request for aiocoap's unprotect of the same datagram
  (``PersistentContext.hand_on``), which checks the replay window then as it always does.
- A window that is not initialised: unprotecting (which decrypts and verifies first) raises
  aiocoap's ``ReplayErrorWithEcho`` unless the request carries the context's Echo value, and
  that error's own protected 4.01 + Echo is the answer, piggybacked on the ACK (whatever the
  inner request: the refusal does not depend on it). It is made once per context and request
  sequence number and sent again to every copy: the device's retransmissions are answered as
  duplicates (below), a captured request replayed under new message IDs costs a decryption, no
  sequence number and no remembered exchange. A request that carries the Echo initialises the
  window (aiocoap's unprotect does it) and is taken as above when it is a plain ingest; else the
  window goes back to not initialised, aiocoap takes the request, and the context's next
  requests go to aiocoap too until the window is initialised (aiocoap unprotects in a task: a
  later request taken here first would start the window above it).
- The answer is protected with the request's nonce (no new sequence number, as aiocoap does for a
  response that is not a notification; a request that came with the Echo is answered under a
  new one, as aiocoap does) and piggybacked on the ACK once the group commit holding the batch
  has committed: the ack a device gets always means "stored".
- Duplicates: each (peer, message ID) is remembered for EXCHANGE_LIFETIME (247 s, at most
  :data:`MAX_EXCHANGES` of them): a copy that arrives while the batch is being committed is
  dropped (the answer follows), a copy after the answer gets the same answer bytes again, and the
  request is processed once (section 4.5). The answer is never an empty ACK followed by a
  separate response: a commit that takes seconds means the device retransmits meanwhile.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
import weakref
from collections import OrderedDict
from typing import Any

from aiocoap import Message, oscore
from aiocoap.message import Direction
from aiocoap.numbers.codes import Code
from aiocoap.numbers.optionnumbers import OptionNumber
from aiocoap.numbers.types import Type
from aiocoap.transports.oscore import OSCOREAddress
from aiocoap.transports.udp6 import UDP6EndpointAddress

log = logging.getLogger(__name__)

#: RFC 7252 section 4.8.2: how long a peer may send copies of one message (default parameters).
EXCHANGE_LIFETIME = 247.0
#: Exchanges remembered at most (1,000 requests/s for 247 s, with room): the oldest go first.
MAX_EXCHANGES = 1 << 19
#: 4.01 + Echo answers remembered (one per context and request sequence number), at most.
MAX_CHALLENGES = 1 << 14

_CON_POST_FIRST = 0x40  # version 1, type CON (the token length is masked off)
_POST = int(Code.POST)
_OUTER_OPTIONS = frozenset(
    {int(OptionNumber.OSCORE), int(OptionNumber.URI_HOST), int(OptionNumber.URI_PORT)}
)
#: Inner options that need aiocoap's machinery (block-wise, observation, no-response, proxying).
_INNER_AIOCOAP = frozenset(
    int(o)
    for o in (
        OptionNumber.BLOCK1,
        OptionNumber.BLOCK2,
        OptionNumber.OBSERVE,
        OptionNumber.NO_RESPONSE,
        OptionNumber.PROXY_URI,
        OptionNumber.PROXY_SCHEME,
    )
)


class IngestFastPath:
    """Installed on a server's UDP transport by :meth:`install`; :meth:`close` takes it off.

    ``contexts``: the OSCORE context lookup (``Principals``); ``render(inner)``: the resource
    tree's answer to an unprotected request (``_Site.render``: never raises)."""

    def __init__(self, contexts: Any, render: Any) -> None:
        self._contexts = contexts
        self._render = render
        self._protocol: Any = None
        self._aiocoap: Any = None  # the transport protocol's own datagram_msg_received
        self._exchanges: OrderedDict[tuple[Any, int], tuple[float, bytes | None]] = OrderedDict()
        # (recipient ID, ID Context, Echo value, partial IV) -> the 4.01 + Echo sent for it
        self._challenges: OrderedDict[tuple[bytes, bytes, bytes, bytes], Message] = OrderedDict()
        # contexts whose request with the Echo went to aiocoap, until their window is initialised
        self._echo_in_aiocoap: weakref.WeakSet[Any] = weakref.WeakSet()
        self._tasks: set[asyncio.Task[None]] = set()
        self.handled = 0  # requests answered here
        self.echoes = 0  # of which 4.01 + Echo challenges (RFC 9175) to peers without a window
        self.duplicates = 0  # copies of those requests (answered again, or dropped in flight)
        self.handed_on = 0  # CON POSTs looked at and left to aiocoap

    def install(self, protocol: Any) -> None:
        """Wrap ``protocol`` (aiocoap's ``MessageInterfaceUDP6`` of the server socket)."""
        self._protocol = protocol
        self._aiocoap = protocol.datagram_msg_received
        protocol.datagram_msg_received = self._datagram

    async def close(self) -> None:
        """Stop taking requests and let those in flight answer (their commits finish)."""
        if self._protocol is not None and self._aiocoap is not None:
            self._protocol.datagram_msg_received = self._aiocoap
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        self._exchanges.clear()

    @property
    def remembered(self) -> int:
        return len(self._exchanges)

    def summary(self) -> str:
        """One log line's worth: what was answered here and what was left to aiocoap."""
        return (
            f"handled={self.handled} echoes={self.echoes} duplicates={self.duplicates} "
            f"handed_on={self.handed_on} remembered={self.remembered}"
        )

    # -- the datagram -----------------------------------------------------------------------------

    def _datagram(self, data: bytes, ancdata: Any, flags: int, address: Any) -> None:
        if len(data) < 4 or data[0] & 0xF0 != _CON_POST_FIRST or data[1] != _POST:
            self._aiocoap(data, ancdata, flags, address)
            return
        key = (address, (data[2] << 8) | data[3])
        seen = self._exchanges.get(key)
        if seen is not None:
            self.duplicates += 1
            if seen[1] is not None:
                self._send(seen[1], ancdata, address)
            return
        if not self._take(data, ancdata, address, key):
            self.handed_on += 1
            self._aiocoap(data, ancdata, flags, address)

    def _take(self, data: bytes, ancdata: Any, address: Any, key: tuple[Any, int]) -> bool:
        """Start answering the request in ``data`` here; False: aiocoap should."""
        try:
            outer = Message.decode(data)
            for option in outer.opt.option_list():
                if int(option.number) not in _OUTER_OPTIONS:
                    return False
            header = oscore.verify_start(outer)
        except Exception:  # malformed: aiocoap's path answers (or logs) it as it always has
            return False
        piv = header.get(oscore.COSE_PIV)
        ctx = self._contexts.get_oscore_context_for(header)
        if ctx is None or not isinstance(piv, bytes) or not piv:
            return False
        window = ctx.recipient_replay_window
        if window.is_initialized():
            if self._echo_in_aiocoap:  # nearly always empty: no lookup per ingest
                self._echo_in_aiocoap.discard(ctx)
            if not window.is_valid(int.from_bytes(piv, "big")):
                return False  # a replay: aiocoap's path refuses it
        elif ctx in self._echo_in_aiocoap:
            return False  # aiocoap initialises the window from an earlier request: keep the order
        before, accepted = window.state(), ctx.accepted
        outer.direction = Direction.INCOMING
        inner = None
        try:
            inner, request_id = ctx.unprotect(outer)
            ok = _plain_ingest(inner)
        except oscore.ReplayErrorWithEcho as challenge:  # decrypted, verified, no window yet
            return self._challenge(ctx, piv, challenge, outer, ancdata, key)
        except Exception:
            ok = False
        if not ok:  # as if never looked at: aiocoap unprotects it (its replay check again)
            if before is None and window.is_initialized():  # it came with the Echo
                self._echo_in_aiocoap.add(ctx)
            window.put_back(before)
            ctx.accepted = accepted
            if before is not None and inner is not None:  # e.g. a Block1 block: not decrypted
                ctx.hand_on(outer, inner, request_id)  # twice (PersistentContext.hand_on)
            return False
        remote = UDP6EndpointAddress(address, self._protocol, pktinfo=_pktinfo(ancdata))
        inner.remote = OSCOREAddress(ctx, remote)
        self._remember(key, None)
        task = asyncio.get_running_loop().create_task(
            self._answer(inner, ctx, request_id, outer, ancdata, key)
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return True

    def _challenge(
        self,
        ctx: Any,
        piv: bytes,
        challenge: Any,
        outer: Message,
        ancdata: Any,
        exchange: tuple[Any, int],
    ) -> bool:
        """Answer ``outer`` with ``challenge``'s protected 4.01 + Echo; False: aiocoap should.

        The answer to a (context, sequence number) is made once and sent again, under the
        request's message ID and token, to every copy. The exchange of the datagram that made
        it is remembered as a fresh request's, so the device's retransmissions of it are
        answered from there; a captured request replayed under other message IDs costs a
        decryption, no sequence number and no remembered exchange."""
        key = (ctx.recipient_id, ctx.id_context, ctx.echo_recovery, piv)
        challenges = self._challenges
        made = challenges.get(key)
        try:
            answer = made or challenge.to_message()
            answer.mtype = Type.ACK
            answer.mid = outer.mid
            answer.token = outer.token
            data = answer.encode()
        except Exception:  # e.g. no sequence number left: aiocoap's path answers (or logs) it
            return False
        challenges[key] = answer
        challenges.move_to_end(key)
        while len(challenges) > MAX_CHALLENGES:
            challenges.popitem(last=False)
        if made is None:
            self._remember(exchange, data)
        self.handled += 1
        self.echoes += 1
        self._send(data, ancdata, exchange[0])
        return True

    async def _answer(
        self,
        inner: Message,
        ctx: Any,
        request_id: Any,
        outer: Message,
        ancdata: Any,
        key: tuple[Any, int],
    ) -> None:
        try:
            response = await self._render(inner)
            protected, _ = ctx.context_for_response().protect(response, request_id)
            protected.mtype = Type.ACK
            protected.mid = outer.mid
            protected.token = outer.token
            data = protected.encode()
        except Exception:  # a bug: the exchange is forgotten, a retransmission goes to aiocoap
            log.exception("event=internal_error path=ingest fast_path=true")
            self._exchanges.pop(key, None)
            return
        self.handled += 1
        self._remember(key, data)
        self._send(data, ancdata, key[0])

    def _remember(self, key: tuple[Any, int], answer: bytes | None) -> None:
        exchanges = self._exchanges
        now = time.monotonic()
        exchanges[key] = (now, answer)
        exchanges.move_to_end(key)
        horizon = now - EXCHANGE_LIFETIME
        while exchanges:
            first = next(iter(exchanges.values()))
            if first[0] >= horizon and len(exchanges) <= MAX_EXCHANGES:
                break
            exchanges.popitem(last=False)

    def _send(self, data: bytes, ancdata: Any, address: Any) -> None:
        transport = getattr(self._protocol, "transport", None)
        if transport is None:
            return
        pktinfo = _pktinfo(ancdata)
        reply = [(socket.IPPROTO_IPV6, socket.IPV6_PKTINFO, pktinfo)] if pktinfo else []
        transport.sendmsg(data, reply, 0, address)  # an OSError goes to the protocol, as aiocoap's


def _pktinfo(ancdata: Any) -> bytes | None:
    """The destination address the request came to (IPV6_PKTINFO), to answer from it."""
    for level, kind, value in ancdata:
        if level == socket.IPPROTO_IPV6 and kind == socket.IPV6_PKTINFO:
            return bytes(value)
    return None


def _plain_ingest(inner: Message) -> bool:
    """An unprotected request the resource tree can answer in one go: POST to ingest, no
    options that need aiocoap's block-wise, observation or proxy handling."""
    if inner.code != Code.POST:
        return False
    path = inner.opt.uri_path
    if not path or path[0] != "ingest":
        return False
    return not any(int(o.number) in _INNER_AIOCOAP for o in inner.opt.option_list())
