"""The retry schedule of every exchange with the endpoint: exponential backoff with full jitter.

After ``failures`` failures in a row the next attempt waits a time drawn uniformly from
``[0, min(cap, base * 2**failures)]`` (AWS's "full jitter"), so a fleet that lost its endpoint
together does not come back in step. ``floor`` keeps a retry from spinning at once;
:func:`clamp_hint` bounds a wait the peer asks for.
"""

from __future__ import annotations

import random

#: Exponents above this add nothing (any cap is reached long before) and would overflow floats.
MAX_EXPONENT = 30


def full_jitter(
    failures: int, base: float, cap: float, rng: random.Random, *, floor: float = 0.0
) -> float:
    """Seconds to wait before the next attempt, after ``failures`` failures in a row."""
    top = min(cap, base * 2 ** min(max(failures, 0), MAX_EXPONENT))
    return max(floor, rng.uniform(0.0, top))


def clamp_hint(seconds: float, floor: float, cap: float) -> float:
    """A peer's wait hint (CoAP Max-Age) kept within ``[floor, cap]``: a hint of 0 must not make
    a retry spin, nor one of 2**32 - 1 seconds stop retries for a century."""
    return min(cap, max(floor, seconds))
