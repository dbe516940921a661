"""What a chaos run does: :class:`Plan` (the counts, the seed, the pacing) and the seeded
schedule of the main lane's events (:func:`schedule`).

Two plans are named: :data:`SHORT` (the CI test, about a minute) and :data:`LONG` (the bench).
``./tools/dev chaos`` starts from :data:`LONG` and lets every count be changed on the command
line; ``--minutes`` stretches the pacing so that the run lasts about that long.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace

# Main-lane event kinds, in the order the report names them.
AGENT_KILL = "agent_sigkill"
ENDPOINT_KILL = "endpoint_sigkill"
POWER_CUT = "power_cut"
CORRUPT = "queue_corruption"
FLOOD = "malformed_datagrams"


@dataclass(frozen=True)
class Plan:
    """The counts and pacing of one chaos run. Times are real (wall-clock) seconds."""

    seed: int = 1
    agent_kills: int = 2  # SIGKILL of the agent, then a restart
    endpoint_kills: int = 1  # SIGKILL of the endpoint, then a restart on the same port
    power_cuts: int = 1  # power cut of the agent's data directory (kills the agent), restart
    corruptions: int = 1  # SIGTERM, b-tree leaf pages of queue.db overwritten, restart
    corrupt_pages: int = 2  # table leaf pages overwritten per corruption (never all of them)
    disk_fills: int = 1  # fill/empty cycles of the second agent's small disk (0: no disk lane)
    disk_full_restart: bool = False  # also SIGKILL and restart that agent while its disk is full
    datagrams: int = 1000  # malformed datagrams sent straight to the endpoint's port
    datagram_bursts: int = 1  # ... split into this many main-lane events
    documents: int = 50  # hostile desired documents written while the agent observes
    loss: float = 0.10  # packet loss of the agent's link (each way)
    time_scale: float = 8.0  # the agent's simulated clock runs this much faster
    sample_interval: float = 4.0  # seconds (agent time) between readings of a sensor
    gap: tuple[float, float] = (3.0, 5.0)  # seconds between main-lane events (uniform)
    backlog_seconds: float = 8.0  # link outage before each corruption, so the queue holds rows
    disk_tmpfs_mb: int = 4  # size of the second agent's disk
    disk_full_seconds: float = 5.0  # how long the disk stays full
    doc_spacing: float = 0.2  # seconds at least between hostile documents
    doc_wait: float = 1.0  # seconds at most for the agent to receive a document before the next
    desired_poll: float | None = 0.2  # the endpoint's desired-state poll (None: as shipped, 1 s)
    endpoint_debug: bool = False  # the endpoint logs at debug level (the log figure is then moot)
    start_timeout: float = 30.0  # seconds for a process to come up
    drain_timeout: float = 180.0  # seconds for the backlog to drain at the end
    stall_timeout: float = 30.0  # ... given up sooner when a record stays missing this long

    @property
    def events(self) -> int:
        return (
            self.agent_kills
            + self.endpoint_kills
            + self.power_cuts
            + self.corruptions
            + (self.datagram_bursts if self.datagrams else 0)
        )

    def stretched(self, minutes: float) -> Plan:
        """The same plan paced so that the main lane and the documents last about ``minutes``."""
        total = minutes * 60.0
        busy = self.corruptions * self.backlog_seconds + self.events * 2.0
        mean_gap = max(1.0, (total - busy) / max(1, self.events))
        spacing = max(self.doc_spacing, 0.8 * total / max(1, self.documents))
        return replace(self, gap=(0.6 * mean_gap, 1.4 * mean_gap), doc_spacing=spacing)


SHORT = Plan()
"""The CI plan: 2 agent SIGKILLs, 1 endpoint SIGKILL, 1 power cut, 1 corruption, 1 disk
fill/empty, 1,000 malformed datagrams, 50 hostile documents (about a minute). The endpoint polls
desired state every 0.2 s (shipped: 1 s): documents are written into its database, and the next
one waits until the agent received the last (or ``doc_wait``)."""

LONG = Plan(
    agent_kills=20,
    endpoint_kills=5,
    power_cuts=20,
    corruptions=2,
    disk_fills=2,
    disk_full_restart=True,
    datagrams=10_000,
    datagram_bursts=2,
    documents=1000,
    backlog_seconds=10.0,
    doc_spacing=0.1,
    doc_wait=0.25,
    desired_poll=0.1,
)
"""The bench plan: 20 agent SIGKILLs, 5 endpoint SIGKILLs, 20 power cuts, 2 corruptions, 2 disk
fill/empty cycles (one agent restart on the full disk each), 10,000 malformed datagrams, 1,000
hostile documents (the endpoint polls desired state every 0.1 s, so that a document written into
its database reaches the agent within a fraction of a second)."""


def schedule(plan: Plan) -> list[tuple[str, float]]:
    """The main lane: each event with the pause (seconds) before it, in a seeded random order.
    A corruption never comes first (the agent has not queued anything yet)."""
    rng = random.Random(plan.seed)
    kinds = (
        [AGENT_KILL] * plan.agent_kills
        + [ENDPOINT_KILL] * plan.endpoint_kills
        + [POWER_CUT] * plan.power_cuts
        + [CORRUPT] * plan.corruptions
        + ([FLOOD] * plan.datagram_bursts if plan.datagrams else [])
    )
    rng.shuffle(kinds)
    if kinds and kinds[0] == CORRUPT:
        swap = next((i for i, k in enumerate(kinds) if k != CORRUPT), 0)
        kinds[0], kinds[swap] = kinds[swap], kinds[0]
    return [(kind, rng.uniform(*plan.gap)) for kind in kinds]
