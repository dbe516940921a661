"""A hybrid logical clock (Kulkarni, Demirbas et al., "Logical Physical Clocks", OPODIS 2014).

A :class:`Timestamp` is ``(wall ms, logical counter, node id)``, totally ordered in that order: the
wall part stays close to physical time (so "later" means what people expect), the logical counter
orders events within one millisecond and events that causally follow a timestamp from a clock
running ahead, and the node id breaks the remaining ties, so two different nodes never issue equal
timestamps.

:class:`HybridClock` issues timestamps (:meth:`~HybridClock.now`) and takes in those of other nodes
(:meth:`~HybridClock.update`), after which every timestamp it issues is greater. Two guards:

- Bounded drift: a remote timestamp more than :data:`MAX_DRIFT` seconds ahead of this node's wall
  clock is refused (:class:`ClockDriftError`). Without the guard one peer with a broken clock
  (a Raspberry Pi without a real-time clock that booted into 2038) would drag every clock of the
  site forward, and each key it wrote would win every later write for as long as the error lasts.
  Refused now is accepted later: once the local clock catches up, the same timestamp passes.
- Never backwards, across restarts too: the clock keeps a *ceiling* on disk, a wall time above
  every timestamp it has issued or taken in, reserved :data:`RESERVE` seconds ahead (one small
  atomic write per ``RESERVE`` seconds of issued time, not one per timestamp). After a restart it
  starts from the ceiling, so a clock that was stepped back (NTP, a Pi without RTC) cannot issue a
  timestamp lower than one it issued before. The same idea as OSCORE's reserved sequence numbers
  (agent/wire/oscore.py).

Wall time comes from a :class:`drivers.clock.Clock` (``clock.time()``), so tests set it.
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

from agent.errors import AgentError
from agent.files import read_json, write_atomic
from drivers.clock import Clock

log = logging.getLogger(__name__)

#: A remote timestamp may run at most this many seconds ahead of the local wall clock.
MAX_DRIFT = 60.0
#: Wall time reserved on disk ahead of the newest timestamp, seconds.
RESERVE = 10.0

WALL_LIMIT = 1 << 48  # ms: the year 10889; a wall part is below it
LOGICAL_LIMIT = 1 << 16  # a logical part is below it; on overflow the wall part moves on by 1 ms
MAX_NODE_BYTES = 64
NODE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]*\Z")


class ClockError(AgentError, ValueError):
    """A timestamp or a node id is malformed."""


class ClockDriftError(ClockError):
    """A remote timestamp runs too far ahead of the local wall clock (the peer's clock is wrong,
    or this one is: check NTP on both)."""


def check_node(node: Any) -> str:
    """``node`` if it is a valid node id (1 to 64 bytes of letters, digits and ``._:-``, starting
    with a letter or digit); :class:`ClockError` if not."""
    if not isinstance(node, str) or not NODE_ID.match(node) or len(node) > MAX_NODE_BYTES:
        raise ClockError(
            f"bad node id {str(node)[:80]!r}: 1 to {MAX_NODE_BYTES} of [A-Za-z0-9._:-]"
        )
    return node


def _bounded(value: Any, limit: int, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < limit:
        raise ClockError(f"timestamp: {what} must be an integer in 0..{limit - 1}")
    return value


@dataclass(frozen=True, order=True)
class Timestamp:
    """A hybrid logical timestamp; compares by ``(wall, logical, node)``."""

    wall: int  # milliseconds since the Unix epoch
    logical: int
    node: str

    def __post_init__(self) -> None:
        _bounded(self.wall, WALL_LIMIT, "the wall part")
        _bounded(self.logical, LOGICAL_LIMIT, "the logical part")
        check_node(self.node)

    def to_item(self) -> list[Any]:
        """The CBOR item: ``[wall, logical, node]``."""
        return [self.wall, self.logical, self.node]

    @classmethod
    def from_item(cls, item: Any) -> Self:
        """From :meth:`to_item`'s form; :class:`ClockError` when malformed."""
        if not isinstance(item, list) or len(item) != 3:
            raise ClockError("timestamp: expected [wall, logical, node]")
        return cls(item[0], item[1], item[2])

    @property
    def packed(self) -> int:
        """Wall and logical parts as one integer below 2**64, ordered as the timestamps are
        (for one node)."""
        return self.wall * LOGICAL_LIMIT + self.logical

    def __str__(self) -> str:
        return f"{self.wall}.{self.logical}@{self.node}"


def _ms(seconds: float) -> int:
    if not math.isfinite(seconds):
        raise ClockError(f"the wall clock reads {seconds!r}")
    return min(max(0, int(seconds * 1000)), WALL_LIMIT - 1)


class HybridClock:
    """The hybrid logical clock of node ``node``; wall time from ``clock``; its ceiling kept in
    ``path`` (None: in memory only, for tests)."""

    def __init__(
        self,
        node: str,
        clock: Clock,
        path: Path | None = None,
        *,
        max_drift: float = MAX_DRIFT,
        reserve: float = RESERVE,
    ) -> None:
        self.node = check_node(node)
        self.clock = clock
        self.path = path
        self.max_drift = max_drift
        self.reserve = reserve
        self._ceiling = self._load()
        self._wall = self._ceiling  # the newest (wall, logical) issued or taken in
        self._logical = 0

    @property
    def last(self) -> Timestamp:
        """The newest timestamp issued or taken in (after a restart: the persisted ceiling)."""
        return Timestamp(self._wall, self._logical, self.node)

    def now(self) -> Timestamp:
        """A new timestamp, greater than every one issued or taken in before."""
        pt = _ms(self.clock.time())
        if pt > self._wall:
            self._advance(pt, 0)
        else:
            self._advance(self._wall, self._logical + 1)
        return self.last

    def check(self, remote: Timestamp) -> None:
        """:class:`ClockDriftError` if ``remote`` runs more than ``max_drift`` ahead."""
        ahead = remote.wall - _ms(self.clock.time())
        if ahead > self.max_drift * 1000:
            raise ClockDriftError(
                f"timestamp {remote} runs {ahead / 1000:.1f} s ahead of this clock "
                f"(at most {self.max_drift:g} s): check the time (NTP) of {remote.node} and here"
            )

    def update(self, remote: Timestamp) -> Timestamp:
        """Take in a remote timestamp (the HLC receive rule) and return the new local one;
        :class:`ClockDriftError` (and no change) if it runs too far ahead."""
        self.check(remote)
        pt = _ms(self.clock.time())
        wall = max(self._wall, remote.wall, pt)
        if wall == self._wall == remote.wall:
            logical = max(self._logical, remote.logical) + 1
        elif wall == self._wall:
            logical = self._logical + 1
        elif wall == remote.wall:
            logical = remote.logical + 1
        else:
            logical = 0
        self._advance(wall, logical)
        return self.last

    def witness(self, seen: Timestamp) -> None:
        """Make every later timestamp greater than ``seen``, without the drift check: for
        timestamps this node accepted before (read back from its own state file)."""
        if (seen.wall, seen.logical) > (self._wall, self._logical):
            self._advance(seen.wall, seen.logical)

    def _advance(self, wall: int, logical: int) -> None:
        if logical >= LOGICAL_LIMIT:  # 65,536 events in one millisecond: borrow the next one
            wall, logical = wall + 1, 0
        self._wall, self._logical = wall, logical
        if wall >= self._ceiling:
            self._ceiling = min(wall + int(self.reserve * 1000) + 1, WALL_LIMIT - 1)
            self._save()

    def _load(self) -> int:
        if self.path is None:
            return 0
        try:
            doc = read_json(self.path)
            ceiling = doc["ceiling"] if isinstance(doc, dict) else None
            return _bounded(ceiling, WALL_LIMIT, "the ceiling")
        except FileNotFoundError:
            return 0
        except (OSError, ValueError, KeyError) as err:
            log.warning(
                "event=hlc_ceiling_unreadable path=%s error=%r note=starting from the wall clock "
                "and the timestamps of the peer state",
                self.path,
                str(err),
            )
            return 0

    def _save(self) -> None:
        if self.path is None:
            return
        data = (json.dumps({"node": self.node, "ceiling": self._ceiling}) + "\n").encode()
        try:
            write_atomic(self.path, data)
        except OSError as err:
            log.error(
                "event=hlc_ceiling_not_saved path=%s error=%r note=after a restart this clock "
                "may issue timestamps lower than before if the wall clock was stepped back",
                self.path,
                str(err),
            )
