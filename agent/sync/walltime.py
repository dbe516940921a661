"""The wall time learned from the endpoint, for a device whose own clock is never set.

A device without a real-time clock boots at 1970 and waits for NTP; on a plant network that
blocks NTP it would stamp everything 1970 + uptime for ever. The endpoint it sends to has a set
clock and says its time in every ingest ack (``"now"``, docs/protocol.md "Ingest"), authenticated
as the rest of the ack is. :class:`EndpointClock` wraps the system's clock:

- while the system clock reads before :data:`drivers.clock.WALL_FLOOR`, its wall time is the
  system's plus the offset learned from the endpoint (none learned yet: the system's, unset);
- once the system clock reads the floor or later (NTP, an operator), the system clock wins: the
  learned offset is no longer applied (a step, logged by agent/service/wallclock.py);
- the system clock is never stepped (the agent has no CAP_SYS_TIME and needs none).

A sample is the endpoint's time minus the system's wall time at the middle of the exchange: the
endpoint read its clock somewhere between the request and the answer, so the sample is off by at
most half the round trip. A round trip over :data:`RTT_MAX` gives no sample. The first sample
sets the offset; later ones (every ack that says the time) are smoothed in with gain
:data:`GAIN` (the jitter of the midpoints averages out, the drift of the device's crystal, some
seconds a day, is followed), except a change over :data:`STEP`, which is taken at once (the
endpoint's clock was stepped, or the first sample was bad) and logged. The offset is kept in
memory only: after a restart the monotonic origin, and the system clock's offset to it, may have
changed (a reboot), so an offset from the last run could be wrong by anything; the first
exchange of the new run learns it again.

While the uplink holds records for the wall clock (agent/sync/uplink.py WALL_HOLD) it sends no
batch, so no ack would come: it asks with :func:`ask_time` instead, an empty batch (valid, and
answered with an empty ack, by every endpoint release), every :data:`ASK_EVERY` seconds until
the time is learned or the hold is over. An endpoint that does not say its time (an older
release, a gateway whose clock is not set) answers as before and the hold runs its course. The
hold's 120 s count from the first answer to an ask: while no endpoint answers (a modem that
attaches minutes after boot, a network that comes up after the device) nothing could be sent
anyway, and an answer that says the time then restamps every record of the run; an ask that
gets no answer moves the uplink to the next endpoint, as a batch would.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from concurrent.futures import Executor
from typing import Any, TypeVar

from agent.errors import SyncError
from agent.sync.transport import CoapTransport, code
from agent.wire.batch import CF_SENML_CBOR, CodecError, IngestAck
from drivers.clock import WALL_FLOOR, Clock

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Seconds: a longer round trip gives no sample (it would be off by up to half of it).
RTT_MAX = 2.0
#: Seconds: a sample this far or farther from the offset replaces it at once (and is logged).
STEP = 5.0
#: Weight of a sample closer than STEP (as RFC 6298's 1/8 for the smoothed round trip).
GAIN = 0.125
#: Seconds between two asks for the time while records wait for it.
ASK_EVERY = 5.0
#: Deadline of an ask (s): an answer later than RTT_MAX gives no sample anyway.
ASK_DEADLINE = 5.0
#: An empty batch (``[]``, SenML-CBOR).
EMPTY_BATCH = b"\x80"
CODE_CHANGED = code("2.04")


class EndpointClock:
    """The agent's clock on a device: the system's, or while that is not set, the system's plus
    the offset learned from the endpoint (module docstring). A :class:`drivers.clock.Clock`."""

    def __init__(self, base: Clock, *, floor: float = WALL_FLOOR) -> None:
        self.base = base
        self.floor = floor
        #: seconds to add to the system's wall time while it is not set (None: none learned)
        self.offset: float | None = None
        self.samples = 0  # samples taken (not refused)

    def monotonic(self) -> float:
        return self.base.monotonic()

    def time(self) -> float:
        wall = self.base.time()
        if self.offset is None:
            return wall
        if wall >= self.floor:  # set (NTP): what was learned is of no use any more, and would
            self.offset = None  # be wrong if the clock were ever stepped back below the floor
            return wall
        return wall + self.offset

    async def sleep(self, seconds: float) -> None:
        await self.base.sleep(seconds)

    async def run_blocking(self, executor: Executor | None, fn: Callable[..., T], *args: Any) -> T:
        return await self.base.run_blocking(executor, fn, *args)

    @property
    def system_set(self) -> bool:
        """The system clock reads the floor or later: nothing is learned, nothing applied."""
        return self.base.time() >= self.floor

    @property
    def wants_time(self) -> bool:
        """Neither the system clock is set nor an offset learned."""
        return self.offset is None and not self.system_set

    def learn(self, endpoint_now: float, sent: float, received: float) -> bool:
        """A sample: the endpoint said ``endpoint_now`` in an exchange sent at ``sent`` and
        answered at ``received`` (this clock's :meth:`monotonic`). True if it was taken."""
        if self.system_set:
            return False
        rtt = received - sent
        if not (math.isfinite(endpoint_now) and endpoint_now >= self.floor and math.isfinite(rtt)):
            log.warning("event=endpoint_time_refused now=%r rtt=%r", endpoint_now, rtt)
            return False
        if not 0.0 <= rtt <= RTT_MAX:
            log.debug(
                "event=endpoint_time_refused rtt_ms=%.0f max_ms=%.0f", rtt * 1e3, RTT_MAX * 1e3
            )
            return False
        # the system's wall time at the middle of the exchange
        middle = self.base.time() - (self.base.monotonic() - received) - rtt / 2
        sample = endpoint_now - middle
        self.samples += 1
        before = self.offset
        if before is not None and abs(sample - before) < STEP:
            self.offset = before + GAIN * (sample - before)
            return True
        self.offset = sample
        change = "" if before is None else f" change_s={sample - before:.3f}"
        log.info(
            "event=wall_clock_from_endpoint offset_s=%.3f rtt_ms=%.0f%s",
            sample,
            rtt * 1e3,
            change,
        )
        return True


async def ask_time(
    clock: EndpointClock, transport: CoapTransport, uri: str, device_id: str, lane: int
) -> bool | None:
    """Send an empty batch to ``uri``'s ingest resource and learn the time its ack says (module
    docstring). True if a sample was taken, False if the endpoint answered without one, None if
    no answer came; a failure is logged at debug (the uplink's own exchanges say what is wrong
    with the link) and changes nothing."""
    sent = clock.monotonic()
    try:
        resp = await transport.request(
            "POST",
            f"{uri}/ingest/{device_id}",
            EMPTY_BATCH,
            content_format=CF_SENML_CBOR,
            deadline=ASK_DEADLINE,
            lane=lane,
        )
    except SyncError as err:
        log.debug("event=time_ask_failed endpoint=%s error=%r", uri, str(err))
        return None
    received = clock.monotonic()
    if resp.code != CODE_CHANGED:
        log.debug("event=time_ask_failed endpoint=%s answer=%s", uri, resp.dotted)
        return False
    try:
        ack = IngestAck.from_cbor(resp.payload)
    except CodecError as err:
        log.warning("event=time_ask_unreadable endpoint=%s error=%r", uri, str(err))
        return False
    if ack.now is None:
        return False  # an endpoint that does not say (an older one, or its clock is not set)
    return clock.learn(ack.now, sent, received)
