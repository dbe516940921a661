"""A wall clock the gateway tests set by hand (stepped forwards and backwards at will)."""

from __future__ import annotations

from drivers.clock import RealClock


class SetClock(RealClock):
    """Real monotonic time and real sleeps; ``time()`` reads :attr:`wall`, which tests set."""

    def __init__(self, wall: float = 1_700_000_000.0) -> None:
        self.wall = wall

    def time(self) -> float:
        return self.wall
