"""Says, at start and then rarely, when the agent's records are not leaving the device, and what
to do about it: one warning line (``event=no_uplink``, ``uplink_disabled``, ``uplink_refused``,
``uplink_unreachable``), repeated every :data:`REPEAT_EVERY` while the cause stays, and one info
line (``event=uplink_ok``) when it is gone.

- no ``[uplink]`` in the config: readings stay in the queue; said at start.
- ``[uplink]`` whose credential file is missing: the uplink is off for this run (the agent keeps
  sampling and queueing); said at start, with the registration command.
- the endpoint does not answer, or refuses the device's credential (4.01/4.03): said once the
  uplink has had :data:`FIRST_AFTER` seconds without a delivery.

Logging policy: warning for the lines above (a peer, or a setting, keeps records on the device);
info when records leave again.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from agent.wire.credentials import register_command
from drivers.clock import Clock

log = logging.getLogger(__name__)

#: Seconds between checks.
CHECK_EVERY = 1.0
#: Seconds the uplink may go without a delivery before "cannot reach" is said (connection set-up,
#: the first retransmissions).
FIRST_AFTER = 30.0
#: Seconds between repeats of the same advice.
REPEAT_EVERY = 600.0


@dataclass(frozen=True)
class Problem:
    event: str  # the key of the line; a new key is said at once
    text: str  # ``key=value`` details, then ``: what to do``


class UplinkAdvisor:
    """Watches the uplink (or its absence) and logs :class:`Problem` lines.

    ``uplink``: the running :class:`~agent.sync.uplink.Uplink` or None; ``disabled``: why the
    configured uplink is off (None when it runs or none is configured); ``configured``: the
    config has an ``[uplink]``; ``queued``: the queue's depth now.
    """

    def __init__(
        self,
        clock: Clock,
        *,
        device_id: str,
        config_path: Path,
        configured: bool,
        uplink: Any = None,
        disabled: str | None = None,
        credential: Path | None = None,
        queued: Callable[[], int | None] = lambda: None,
    ) -> None:
        self.clock = clock
        self.device_id = device_id
        self.config_path = config_path
        self.configured = configured
        self.uplink = uplink
        self.disabled = disabled
        self.credential = credential
        self.queued = queued
        self.started = clock.monotonic()
        self.last_delivery = self.started
        self._said: Problem | None = None
        self._said_at = 0.0
        self._acked = 0

    def problem(self) -> Problem | None:
        """What keeps records on the device now, if anything."""
        now = self.clock.monotonic()
        if not self.configured:
            return Problem(
                "no_uplink",
                f"config={self.config_path}: no [uplink] table, so readings and alerts stay "
                "queued on this device; add one naming the endpoint (docs/config.md, [uplink])",
            )
        if self.disabled is not None:
            return Problem("uplink_disabled", self.disabled)
        up = self.uplink
        if up is None:
            return None
        acked = up.stats.records_acked
        if acked != self._acked or up.online:
            self._acked = acked
            self.last_delivery = now
            return None
        if now - self.last_delivery < FIRST_AFTER or up.not_registered:
            return None  # the uplink says "not registered" itself, with the command
        endpoint = up.endpoints.current
        silent = now - self.last_delivery
        error = up.last_error or "no answer yet"
        if re.search(r"answer 4\.0[13]\b", error):
            cred = self.credential or "FILE"
            return Problem(
                "uplink_refused",
                f"endpoint={endpoint} error={error!r} for={silent:.0f}s: the endpoint does not "
                "accept this device's credential (revoked, re-keyed, or another endpoint's); "
                "make a new one (edge-agent-cloud devices rekey --data DIR "
                f"{self.device_id} --credential-out {cred}), copy it here and restart the agent",
            )
        port = urlsplit(endpoint).port or 5683
        return Problem(
            "uplink_unreachable",
            f"endpoint={endpoint} error={error!r} for={silent:.0f}s: no delivery; check that "
            f"the endpoint runs (edge-agent-cloud serve --listen ADDR:{port} --data DIR) and "
            f"that UDP port {port} reaches it from this device; records stay queued meanwhile",
        )

    def check(self) -> None:
        """Log the current problem when it is new or was said :data:`REPEAT_EVERY` ago."""
        now = self.clock.monotonic()
        problem = self.problem()
        if problem is None:
            if self._said is not None and self._said.event != "no_uplink":
                log.info("event=uplink_ok: records leave the device again")
            self._said = None
            return
        fresh = self._said is None or self._said.event != problem.event
        if fresh or now - self._said_at >= REPEAT_EVERY:
            queued = self.queued()
            depth = "" if queued is None else f" queued={queued}"
            log.warning("event=%s%s %s", problem.event, depth, problem.text)
            self._said, self._said_at = problem, now

    async def run(self) -> None:
        while True:
            self.check()
            await self.clock.sleep(CHECK_EVERY)


def missing_credential(path: Path, device_id: str) -> str:
    """The ``uplink_disabled`` text for a credential file that does not exist."""
    return (
        f"credential={path}: the device has no credential file, so nothing is sent and records "
        f"stay queued; register it on the endpoint ({register_command(device_id, str(path))}), "
        "then restart the agent"
    )
