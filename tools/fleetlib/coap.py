"""CoAP over UDP, the client side, for many simulated devices sharing one socket.

aiocoap's client context does this for one application; a fleet of thousands cannot afford a
context per device (a socket, a message manager, tasks and timers each), so this module does the
message layer of RFC 7252 (sections 4 and 5.2) itself, with aiocoap's :class:`~aiocoap.Message`
for the bytes. One :class:`CoapEndpoint` is one UDP socket, connected to the target:

- message IDs: sequential per socket from a random start. The endpoint treats a (peer, ID) it
  saw within EXCHANGE_LIFETIME (247 s) as a duplicate, so a socket should start at most
  :data:`MID_RATE` new messages per second (65536 IDs last 437 s at that rate); IDs used again
  sooner are counted (``mid_reused_early``, checked per block of 256).
- tokens: 4 bytes, sequential per socket from a random start: unique among its exchanges.
- a CON request is sent again with the same bytes (same ID) after ACK_TIMEOUT times a random
  factor in [1, ACK_RANDOM_FACTOR], the timeout doubling each time, at most MAX_RETRANSMIT times;
  no answer after the last: a timeout (``MAX_TRANSMIT_WAIT`` after the first send).
- answers: a piggybacked response (an ACK with a code and the token); or an empty ACK (sending
  stops) and later a separate response, a CON acknowledged with an empty ACK, again for every
  copy the endpoint retransmits (the copies are recognised by ID and token and answered, not
  delivered twice). An RST ends the exchange. A CON that matches no exchange gets an RST.

Cost per request (a worker runs hundreds a second beside its encoder): no task, future or
asyncio timer of its own. :meth:`CoapEndpoint.send` calls back when the exchange ends (the
:class:`Outcome` is the exchange itself); the retransmission and response deadlines of all
exchanges live in one :class:`Timers` heap (shared with the worker's device ticks), which keeps
one asyncio timer for its earliest entry, and an exchange that ends only marks its deadline
cancelled. :meth:`CoapEndpoint.request` is the same as a future, for tests and single requests.

A request's :class:`Outcome` says what came back and when: ``first_sent`` to ``finished`` is the
exchange's latency, retransmissions included. Logging: none per message (thousands a second);
the counters in :class:`LinkStats` say what happened.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import random
import socket
import struct
import time
from array import array
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, fields
from heapq import heappop, heappush
from typing import Any

from aiocoap import Message
from aiocoap.numbers.codes import Code
from aiocoap.numbers.types import Type

# RFC 7252 section 4.8 transmission parameters.
ACK_TIMEOUT = 2.0
ACK_RANDOM_FACTOR = 1.5
MAX_RETRANSMIT = 4
MAX_LATENCY = 100.0


def max_transmit_span(ack_timeout: float) -> float:
    """Seconds from a CON's first transmission to its last retransmission, at most."""
    return ack_timeout * (2**MAX_RETRANSMIT - 1) * ACK_RANDOM_FACTOR


def max_transmit_wait(ack_timeout: float) -> float:
    """Seconds from a CON's first transmission until the sender gives up (93 s by default)."""
    return ack_timeout * (2 ** (MAX_RETRANSMIT + 1) - 1) * ACK_RANDOM_FACTOR


#: How long a peer remembers a message ID (RFC 7252 section 4.8.2): 247 s.
EXCHANGE_LIFETIME = max_transmit_span(ACK_TIMEOUT) + 2 * MAX_LATENCY + ACK_TIMEOUT
MID_SPACE = 1 << 16
MID_BLOCK = 256  # early reuse of IDs is checked (and counted) per block of this many
#: New messages per second one socket may start so that its IDs come round only after
#: EXCHANGE_LIFETIME, with room for bursts (65536 / 150 = 437 s).
MID_RATE = 150.0
TOKEN_BYTES = 4
RCVBUF = 1 << 20  # best effort: room for a burst of answers

_CON, _NON, _ACK, _RST = Type.CON, Type.NON, Type.ACK, Type.RST
_EMPTY = Code.EMPTY
_TOKEN_MASK = (1 << (8 * TOKEN_BYTES)) - 1
_EMPTY_HEADER = struct.Struct("!BBH")  # an empty message: version 1, type, no token; code 0.00
#: asyncio runs a timer this much before its time (its clock's resolution): so does Timers
_EARLY = time.get_clock_info("monotonic").resolution


class Timers:
    """Many timers on one asyncio timer: a heap of ``[when, n, callback, arg]`` entries (compared
    in C, unlike asyncio's TimerHandles) with one ``loop.call_at`` for the earliest. Due entries
    run in time order, ``callback(arg)``; :meth:`cancel` only marks an entry, which leaves the
    heap when it comes to the top (so a cancelled entry costs no wake-up unless it was the
    earliest when the timer was set)."""

    __slots__ = ("_armed", "_count", "_handle", "_heap", "_loop")

    def __init__(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self._loop = loop if loop is not None else asyncio.get_running_loop()
        self._heap: list[list[Any]] = []
        self._count = itertools.count()
        self._handle: asyncio.TimerHandle | None = None
        self._armed = math.inf  # when the asyncio timer is set for

    def call_at(self, when: float, callback: Callable[[Any], None], arg: Any) -> list[Any]:
        """Run ``callback(arg)`` at loop time ``when``; the entry is for :meth:`cancel`."""
        entry = [when, next(self._count), callback, arg]
        heappush(self._heap, entry)
        if when < self._armed:
            self._arm(when)
        return entry

    @staticmethod
    def cancel(entry: list[Any]) -> None:
        entry[2] = None
        entry[3] = None

    def _arm(self, when: float) -> None:
        if self._handle is not None:
            self._handle.cancel()
        self._armed = when
        self._handle = self._loop.call_at(when, self._fire)

    def _fire(self) -> None:
        self._handle = None
        self._armed = -math.inf  # entries added by the callbacks wait for the end
        heap = self._heap
        try:
            now = self._loop.time() + _EARLY
            while heap:
                entry = heap[0]
                if entry[2] is None:
                    heappop(heap)
                elif entry[0] <= now:
                    heappop(heap)
                    entry[2](entry[3])
                else:
                    break
        finally:
            self._armed = math.inf
            if heap:
                self._arm(heap[0][0])


@dataclass
class LinkStats:
    """What the message layer did, summed over a worker's sockets."""

    datagrams_sent: int = 0
    datagrams_received: int = 0
    retransmissions: int = 0
    empty_acks: int = 0  # an empty ACK: the answer comes as a separate response
    separate_responses: int = 0
    duplicate_responses: int = 0  # copies of a separate response (our ACK was lost): ACKed again
    stray: int = 0  # answers matching no exchange in flight (late copies)
    resets_received: int = 0
    resets_sent: int = 0
    timeouts: int = 0
    undecodable: int = 0
    socket_errors: int = 0  # ICMP errors (port unreachable while the endpoint is not up)
    mid_reused_early: int = 0

    def add(self, other: LinkStats) -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    def as_dict(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


class Outcome:
    """How a request ended: ``response`` (None when ``error`` is "timeout", "reset" or
    "closed"), loop times of the first send and of the end, transmissions (1: no
    retransmission), and whether the answer was a separate response."""

    __slots__ = ("error", "finished", "first_sent", "response", "separate", "transmissions")

    def __init__(
        self,
        response: Message | None,
        error: str,
        first_sent: float,
        finished: float,
        transmissions: int,
        separate: bool,
    ) -> None:
        self.response = response
        self.error = error
        self.first_sent = first_sent
        self.finished = finished
        self.transmissions = transmissions
        self.separate = separate

    @property
    def latency(self) -> float:
        return self.finished - self.first_sent


#: ``callback(arg, outcome)``: how :meth:`CoapEndpoint.send` reports the end of an exchange
Callback = Callable[[Any, Outcome], None]


class _Exchange(Outcome):
    """One CON request in flight; once it ends, its own :class:`Outcome`."""

    __slots__ = ("acked", "arg", "callback", "data", "mid", "timeout", "timer", "token")

    def __init__(self, mid: int, token: bytes, data: bytes, callback: Callback, arg: Any):
        self.mid = mid
        self.token = token
        self.data = data
        self.callback: Callback | None = callback
        self.arg = arg
        self.response = None
        self.error = ""
        self.first_sent = 0.0
        self.finished = 0.0
        self.transmissions = 0
        self.separate = False
        self.timeout = 0.0
        self.timer: list[Any] | None = None  # the Timers entry of the next deadline
        self.acked = False


def _resolve(future: asyncio.Future[Outcome], outcome: Outcome) -> None:
    if not future.done():
        future.set_result(outcome)


class CoapEndpoint(asyncio.DatagramProtocol):
    """One UDP socket towards one peer, carrying the confirmable requests of many devices.

    ``ack_timeout``: RFC 7252's ACK_TIMEOUT for this socket's requests (tests shorten it).
    ``stats``: the counters to add to (shared by a worker's sockets). ``timers``: the heap
    of deadlines (a worker shares one between its sockets and its devices; default: its own)."""

    def __init__(
        self,
        rng: random.Random,
        *,
        ack_timeout: float = ACK_TIMEOUT,
        stats: LinkStats | None = None,
        timers: Timers | None = None,
    ) -> None:
        self._rng = rng
        self.ack_timeout = ack_timeout
        self._random_span = ack_timeout * (ACK_RANDOM_FACTOR - 1.0)
        self.response_timeout = max_transmit_wait(ack_timeout)
        self.lifetime = max_transmit_span(ack_timeout) + 2 * MAX_LATENCY + ack_timeout
        self.stats = stats if stats is not None else LinkStats()
        self._transport: asyncio.DatagramTransport | None = None
        self._loop = asyncio.get_running_loop()
        self._timers = timers if timers is not None else Timers(self._loop)
        self._mid = rng.randrange(MID_SPACE)
        self._token = rng.randrange(1 << (8 * TOKEN_BYTES))
        # loop time each block of MID_BLOCK IDs was last entered (a cheap check of reuse)
        self._block_sent = array("d", [-1e18]) * (MID_SPACE // MID_BLOCK)
        self._by_mid: dict[int, _Exchange] = {}
        self._by_token: dict[bytes, _Exchange] = {}
        # separate responses received, by (ID, token), to ACK their copies: and when
        self._answered: set[tuple[int, bytes]] = set()
        self._answered_at: deque[tuple[float, tuple[int, bytes]]] = deque()

    @classmethod
    async def open(
        cls,
        remote: tuple[str, int],
        rng: random.Random,
        *,
        ack_timeout: float = ACK_TIMEOUT,
        stats: LinkStats | None = None,
        timers: Timers | None = None,
    ) -> CoapEndpoint:
        """A socket connected to ``remote`` (host, port)."""
        loop = asyncio.get_running_loop()
        _, endpoint = await loop.create_datagram_endpoint(
            lambda: cls(rng, ack_timeout=ack_timeout, stats=stats, timers=timers),
            remote_addr=remote,
        )
        return endpoint

    # -- asyncio's protocol ----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)

    def error_received(self, exc: Exception) -> None:
        self.stats.socket_errors += 1  # the retransmissions go on: the peer may come up

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        for ex in list(self._by_mid.values()):
            self._finish(ex, None, "closed")

    @property
    def in_flight(self) -> int:
        return len(self._by_mid)

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    # -- requests --------------------------------------------------------------------------------

    def send(self, message: Message, callback: Callback, arg: Any = None) -> Outcome:
        """Send ``message`` (a request, its options and payload set) as a CON with this socket's
        next ID and token; ``callback(arg, outcome)`` runs once, when the exchange ends (from
        the loop's callbacks: the answer's datagram, a deadline). The returned exchange is the
        outcome to be, and what :meth:`abandon` takes."""
        if self._transport is None:
            raise ConnectionError("the socket is closed")
        mid = self._next_mid()
        token = self._next_token()
        message.mtype = _CON
        message.mid = mid
        message.token = token
        ex = _Exchange(mid, token, message.encode(), callback, arg)
        self._by_mid[mid] = ex
        self._by_token[token] = ex
        now = self._loop.time()
        ex.first_sent = now
        ex.timeout = timeout = self.ack_timeout + self._rng.random() * self._random_span
        ex.timer = self._timers.call_at(now + timeout, self._retransmit, ex)
        ex.transmissions = 1
        self.stats.datagrams_sent += 1
        self._transport.sendto(ex.data)
        return ex

    def request(self, message: Message) -> asyncio.Future[Outcome]:
        """:meth:`send` with a future for the :class:`Outcome`. Cancelling it abandons the
        exchange (nothing more is sent)."""
        future: asyncio.Future[Outcome] = self._loop.create_future()
        ex = self.send(message, _resolve, future)
        future.add_done_callback(lambda f: self.abandon(ex) if f.cancelled() else None)
        return future

    def abandon(self, outcome: Outcome) -> None:
        """Give up an exchange of :meth:`send`: nothing more is sent, its callback never runs."""
        if isinstance(outcome, _Exchange) and outcome.callback is not None:
            outcome.callback = outcome.arg = None
            self._forget(outcome)

    def _next_mid(self) -> int:
        mid = self._mid
        self._mid = (mid + 1) & 0xFFFF
        if mid % MID_BLOCK == 0:
            now = self._loop.time()
            block = mid // MID_BLOCK
            if now - self._block_sent[block] < self.lifetime:
                self.stats.mid_reused_early += MID_BLOCK
            self._block_sent[block] = now
        old = self._by_mid.get(mid)
        if old is not None:  # still in flight after 65535 newer messages: give it up
            self.stats.mid_reused_early += 1
            self._forget(old)
            self._loop.call_soon(self._finish, old, None, "timeout")  # not inside send()
        return mid

    def _next_token(self) -> bytes:
        self._token = token = (self._token + 1) & _TOKEN_MASK
        return token.to_bytes(TOKEN_BYTES, "big")

    def _retransmit(self, ex: _Exchange) -> None:
        ex.timer = None
        if ex.transmissions > MAX_RETRANSMIT:
            self.stats.timeouts += 1
            self._finish(ex, None, "timeout")
            return
        st = self.stats
        st.retransmissions += 1
        ex.transmissions += 1
        st.datagrams_sent += 1
        if self._transport is not None:
            self._transport.sendto(ex.data)  # the same bytes, the same message ID
        ex.timeout *= 2
        ex.timer = self._timers.call_at(self._loop.time() + ex.timeout, self._retransmit, ex)

    def _no_response(self, ex: _Exchange) -> None:
        """An empty ACK came, the separate response did not."""
        ex.timer = None
        self.stats.timeouts += 1
        self._finish(ex, None, "timeout")

    def _forget(self, ex: _Exchange) -> None:
        if ex.timer is not None:
            Timers.cancel(ex.timer)
            ex.timer = None
        if self._by_mid.get(ex.mid) is ex:
            del self._by_mid[ex.mid]
        if self._by_token.get(ex.token) is ex:
            del self._by_token[ex.token]

    def _finish(
        self, ex: _Exchange, response: Message | None, error: str, separate: bool = False
    ) -> None:
        self._forget(ex)
        callback = ex.callback
        if callback is not None:
            ex.response = response
            ex.error = error
            ex.separate = separate
            ex.finished = self._loop.time()
            arg = ex.arg
            ex.callback = ex.arg = None
            callback(arg, ex)

    # -- answers ---------------------------------------------------------------------------------

    def datagram_received(self, data: bytes, addr: Any) -> None:
        st = self.stats
        st.datagrams_received += 1
        try:
            msg = Message.decode(data, addr)
        except Exception:  # aiocoap raises several kinds for bytes that are not CoAP
            st.undecodable += 1
            return
        mtype = msg.mtype
        if mtype is _ACK:
            ex = self._by_mid.get(msg.mid)
            if ex is None:
                st.stray += 1  # an answer to a retransmission of a finished exchange
                return
            if msg.code == _EMPTY:
                if not ex.acked:
                    ex.acked = True
                    st.empty_acks += 1
                    if ex.timer is not None:
                        Timers.cancel(ex.timer)
                    ex.timer = self._timers.call_at(
                        ex.first_sent + self.response_timeout, self._no_response, ex
                    )
                return
            if msg.token != ex.token:
                st.stray += 1
                return
            self._finish(ex, msg, "")
        elif mtype is _CON:
            if not msg.code.is_response():  # a request or a ping: this side serves nothing
                self._reply(_RST, msg.mid)
                st.resets_sent += 1
                return
            key = (msg.mid, msg.token)
            if key in self._answered:
                st.duplicate_responses += 1
                self._reply(_ACK, msg.mid)
                return
            ex = self._by_token.get(msg.token)
            if ex is None:
                self._reply(_RST, msg.mid)
                st.resets_sent += 1
                return
            self._reply(_ACK, msg.mid)
            self._remember(key)
            st.separate_responses += 1
            self._finish(ex, msg, "", separate=True)
        elif mtype is _NON:
            ex = self._by_token.get(msg.token) if msg.code.is_response() else None
            if ex is None:
                st.stray += 1
                return
            self._finish(ex, msg, "", separate=True)
        else:  # RST
            ex = self._by_mid.get(msg.mid)
            if ex is None:
                st.stray += 1
                return
            st.resets_received += 1
            self._finish(ex, None, "reset")

    def _reply(self, mtype: Type, mid: int) -> None:
        """An empty ACK or RST (4 bytes: version 1, the type, no token, code 0.00, the ID)."""
        self.stats.datagrams_sent += 1
        if self._transport is not None:
            self._transport.sendto(_EMPTY_HEADER.pack(0x40 | (mtype << 4), 0, mid))

    def _remember(self, key: tuple[int, bytes]) -> None:
        now = self._loop.time()
        answered, at = self._answered, self._answered_at
        while at and now - at[0][0] > self.lifetime:
            answered.discard(at.popleft()[1])
        answered.add(key)
        at.append((now, key))
