"""tinydtls's clock, which DTLS retransmissions are timed on: one class for the agent's DTLS
client connections (agent/sync/dtlsclient.py) and the endpoint's DTLS peers (cloud/dtls.py).

aiocoap 0.4.17 waits for the next retransmission of a handshake flight for ``when - now``:
``when`` from tinydtls (milliseconds since the whole second at which the process's newest DTLS
context was made), ``now`` from aiocoap's own clock, started when its transport module was
imported. Once a process has been up longer than a retransmission timeout (2 s) that wait comes
out negative and the task spins, a core's worth of CPU, until tinydtls's retransmission is due.
Both sides wait on :class:`TinydtlsClock` instead.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

#: The shortest wait between two looks at a connection's retransmissions: a DTLS context made
#: elsewhere in the process moves tinydtls's clock without this module knowing; the wait then
#: comes out short, never negative.
RETRANSMIT_FLOOR = 0.05
TICKS_PER_SECOND = 1000  # tinydtls's clock (DTLS_TICKS_PER_SECOND)


class TinydtlsClock:
    """The clock tinydtls times retransmissions on, as far as the agent can tell.

    tinydtls (DTLSSocket 0.2.3) counts milliseconds from ``time(NULL)`` (a whole second) at the
    making of the process's newest DTLS context: one origin for the whole process, set again by
    every context made. :meth:`context_made` is called just before a connection makes its
    context. A context made elsewhere moves the origin later than the one kept here: the waits
    then come out too short, never too long, and RETRANSMIT_FLOOR keeps them from spinning."""

    def __init__(self, wall: Callable[[], float] = time.time) -> None:
        self._wall = wall
        self._origin = math.floor(wall())

    def context_made(self) -> None:
        self._origin = math.floor(self._wall())

    def now(self) -> float:
        """tinydtls's time now, in seconds."""
        return self._wall() - self._origin

    def delay(self, due: int) -> float:
        """Seconds to wait for the retransmission that checkRetransmit() says is due at
        ``due`` (tinydtls ticks); checkRetransmit() has just sent all that were due."""
        return max(due / TICKS_PER_SECOND - self.now(), RETRANSMIT_FLOOR)
