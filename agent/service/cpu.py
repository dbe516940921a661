"""Where the agent's threads run: by default all on one CPU.

The agent is one asyncio loop; its few threads (the store's writer, the bus workers, state
persistence) exist only so that blocking calls stay off the loop, and the loop waits for them.
When such a thread wakes on another CPU that is idle, the wake-up costs that CPU's exit from its
idle state: microseconds on a Raspberry Pi, but milliseconds on a virtual machine whose idle vCPU is
halted (measured on the build VM: the store commit of an alert took 4-5 ms at p99 instead of
1.3 ms). Pinning the process to one CPU removes those cross-CPU wake-ups; the agent uses a few
percent of one core, so it loses nothing. ``[agent] cpu_affinity = "all"`` turns this off.
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)


def pin_to_one_cpu() -> int | None:
    """Pin the calling thread, and every thread it starts from now on, to one CPU of those it may
    use (the last: the first often takes most interrupts). The CPU, or None when there is nothing
    to choose or the platform cannot pin."""
    try:
        allowed = sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return None
    if len(allowed) <= 1:
        return None
    cpu = allowed[-1]
    try:
        os.sched_setaffinity(0, {cpu})
    except OSError as err:
        log.warning("event=cpu_affinity_failed cpu=%d error=%r", cpu, str(err))
        return None
    log.debug("event=cpu_affinity cpu=%d of=%d", cpu, len(allowed))
    return cpu
