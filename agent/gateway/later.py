"""Records the cloud asked the gateway to send later (docs/gateway.md "Forwarding", docs/protocol.md
"Gateways"): a ``/relay`` entry answered ``[163, reason, max-age]`` (5.03: that device is over
its rate limit at the endpoint, cloud/ratelimit.py) is kept and sent again after max-age, while
the other devices' records go on and the forwarding cursor moves past it. An entry refused with
any other code (4.03: the device is not attached to this gateway at the cloud, 4.04: the cloud
does not know it, ...) is kept the same way and its device paused for :data:`REFUSED_PAUSE`,
doubled at each refusal that follows up to :data:`REFUSED_MAX_PAUSE` (the operator may attach it
again: its records are never dropped), said once until the cloud takes the device's records.

- The records of such an entry are written to ``relay_later`` (device, seq, 1 for a features
  record) in the gateway's store before the cursor passes them; the prune keeps them
  (``relay_held``: those and the conflicts of ``relay_kept``) until the cloud acknowledges them.
- The device is paused for max-age (:data:`DEFAULT_PAUSE` without one, as a device does for a
  5.03 without Max-Age), or after a refusal as above: its new records of a pass are held the
  same way, not sent. The pauses are in memory: a restarted gateway sends the held records at
  its first pass (a device still refused is paused again).
- At each pass after the pause, its held records go first (at most the pass's records, oldest
  first), and each leaves ``relay_later`` once the cloud acknowledged it (or held it as a
  conflict). A crash between the two writes sends some records twice: the cloud stores each
  once.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Collection, Iterable, Sequence
from typing import Any

from agent.gateway import aside
from agent.wire.batch import FEATURES, CodecError, WireRecord
from agent.wire.features import FeaturesBody

log = logging.getLogger("agent.gateway")

#: The refusal of an entry that is to be sent again later (5.03 Service Unavailable).
CODE_LATER = 5 * 32 + 3
#: Seconds a device is paused after a 5.03 without max-age, and at most.
DEFAULT_PAUSE = 60.0
MAX_PAUSE = 3600.0
#: Seconds a device is paused after the first refusal of another code (4.03, 4.04, ...), and at
#: most after the refusals that follow (each doubles it)
REFUSED_PAUSE = 300.0
REFUSED_MAX_PAUSE = 3600.0
#: What the operator can do about a refusal, by its code
REFUSED_HINT = {
    "4.03": "attach it to this gateway: edge-agent-cloud gateways attach",
    "4.04": "register it at the cloud: edge-agent-cloud devices add",
}

Key = tuple[str, int, int]  # (device, seq, 1 for a features record)


def prepare(db: Any) -> None:
    """The table and the view the prune reads (in :func:`agent.gateway.storeparts.prepare_store`'s
    transaction, after ``relay_kept``)."""
    db.execute(
        "CREATE TABLE IF NOT EXISTS relay_later (device TEXT NOT NULL, seq INTEGER NOT NULL, "
        "features INTEGER NOT NULL, PRIMARY KEY (device, seq, features)) WITHOUT ROWID"
    )
    db.execute(
        "CREATE VIEW IF NOT EXISTS relay_held AS SELECT device, seq, features FROM relay_kept "
        "UNION ALL SELECT device, seq, features FROM relay_later"
    )


def features_record(body: Any) -> WireRecord:
    """A stored features record as the device sent it (its bytes, as they are); CodecError for
    one damaged at rest (SQLite gives back whatever type the column was given: text too)."""
    if not isinstance(body, bytes):
        raise CodecError(f"the features record's body is not bytes: {type(body).__name__}")
    f = FeaturesBody.from_cbor(body)
    return WireRecord(f.first, FEATURES, float(f.t1), body, float(f.t1))


def key(device: str, rec: WireRecord) -> Key:
    return device, rec.seq, int(rec.kind == FEATURES)


def _order(item: tuple[str, WireRecord]) -> int:
    """A device's alerts of a pass lead its entry, its features records last."""
    kind = item[1].kind
    return 0 if kind == "alert" else 2 if kind == FEATURES else 1


def _due(
    s: Any, paused: Collection[str], limit: int, damaged: list[aside.Aside]
) -> list[tuple[str, WireRecord]]:
    """Held records of the devices not paused, at most ``limit``, oldest first; one damaged at
    rest goes into ``damaged`` (agent/gateway/aside.py). A device whose rows name nothing
    stored any more loses them."""
    out: list[tuple[str, WireRecord]] = []
    devices = [d for (d,) in s.db.execute("SELECT DISTINCT device FROM relay_later")]
    for device in (d for d in devices if d not in paused):
        if len(out) >= limit:
            break
        rows = s.db.execute(
            "SELECT r.seq, r.kind, r.created, r.body FROM relay_later AS l JOIN records AS r "
            "ON r.device = l.device AND r.seq = l.seq WHERE l.device = ? AND l.features = 0 "
            "ORDER BY r.arrival LIMIT ?",
            (device, limit - len(out)),
        ).fetchall()
        found: list[tuple[str, WireRecord]] = []
        for q, k, c, b in rows:
            try:
                found.append((device, aside.record(q, k, c, b)))
            except ValueError as err:
                damaged.append((device, q, 0, str(err)))
        bodies = s.db.execute(
            "SELECT l.seq, f.body FROM relay_later AS l JOIN features AS f ON f.device = "
            "l.device AND f.first_seq = l.seq WHERE l.device = ? AND l.features = 1 ORDER BY "
            "l.seq LIMIT ?",
            (device, max(0, limit - len(out) - len(found))),
        ).fetchall()
        for first, body in bodies:
            try:
                found.append((device, features_record(body)))
            except CodecError as err:  # the store held it decoded once: damaged at rest
                _unreadable(s, device, int(first), err)
        if not found and not bodies and not rows:
            s.db.execute("DELETE FROM relay_later WHERE device = ?", (device,))
        out += found
    return out


def _unreadable(s: Any, device: str, first: int, err: CodecError) -> None:
    """A held features record that does not decode is never sent (as one of the features queue,
    agent/gateway/relay.py): said, and no longer held."""
    log.warning(
        "event=forward_features_unreadable device=%s first=%d error=%r", device, first, str(err)
    )
    s.db.execute(
        "DELETE FROM relay_later WHERE device = ? AND seq = ? AND features = 1", (device, first)
    )


def _save(s: Any, sent: Iterable[Key], held: Iterable[Key]) -> None:
    with s._tx() as db:  # a failed statement (a full disk) may have ended the transaction
        db.executemany(
            "DELETE FROM relay_later WHERE device = ? AND seq = ? AND features = ?", sent
        )
        db.executemany("INSERT OR IGNORE INTO relay_later VALUES (?, ?, ?)", held)


class Later:
    """The devices paused and the records held for them (module docstring). ``now``: a
    monotonic clock (tests set it)."""

    def __init__(self, now: Callable[[], float] = time.monotonic) -> None:
        self.now = now
        self.until: dict[str, float] = {}  # device -> when its pause ends
        self.entries = 0  # entries the cloud answered "later"
        self.refused: dict[str, float] = {}  # device refused (another code) -> its last pause
        self.refusals = 0  # entries the cloud refused with another code

    def paused(self) -> set[str]:
        """The devices paused now."""
        now = self.now()
        for device in [d for d, end in self.until.items() if end <= now]:
            del self.until[device]
        return set(self.until)

    def pause(self, device: str, max_age: int | None, records: int) -> None:
        """The cloud answered an entry of ``device`` with 5.03 and ``max_age``."""
        self.entries += 1
        seconds = DEFAULT_PAUSE if max_age is None else min(max(1.0, float(max_age)), MAX_PAUSE)
        if device not in self.until:
            log.info(
                "event=forward_later device=%s records=%d retry_in=%g: the cloud takes this "
                "device's records more slowly (its rate limit); the gateway keeps them",
                device, records, seconds,
            )  # fmt: skip
        self.until[device] = max(self.until.get(device, 0.0), self.now() + seconds)

    def refuse(self, device: str, code: str, reason: str, records: int) -> None:
        """The cloud refused an entry of ``device`` with ``code`` (not 5.03): its records are
        held, the device paused; said at the first refusal of an episode."""
        self.refusals += 1
        now = self.now()
        if self.until.get(device, -math.inf) > now:
            return  # another entry of this pass: paused already
        last = self.refused.get(device)
        seconds = REFUSED_PAUSE if last is None else min(2.0 * last, REFUSED_MAX_PAUSE)
        if last is None:
            log.warning(
                "event=forward_refused device=%s code=%s reason=%r records=%d retry_in=%g: "
                "the cloud does not take this device's records from this gateway; the gateway "
                "keeps them (%s)",
                device, code, reason[:200], records, seconds,
                REFUSED_HINT.get(code, "see the cloud's reason"),
            )  # fmt: skip
        else:
            log.debug("event=forward_refused_again device=%s code=%s", device, code)
        self.refused[device] = seconds
        self.until[device] = now + seconds

    def taken(self, device: str) -> None:
        """The cloud acknowledged an entry of ``device``: a refusal episode is over."""
        if self.refused.pop(device, None) is not None:
            log.info("event=forward_refused_over device=%s: the cloud takes its records", device)

    async def due(
        self, db: Any, limit: int, damaged: list[aside.Aside]
    ) -> list[tuple[str, WireRecord]]:
        paused = self.paused()
        return list(await db(lambda s: _due(s, paused, limit, damaged)))

    @staticmethod
    async def save(db: Any, sent: Sequence[Key], held: Sequence[Key]) -> None:
        """``sent``: held records sent in this pass; ``held``: those to send later (again)."""
        if sent or held:
            await db(lambda s: _save(s, sent, held))

    def gather(
        self, items: Iterable[tuple[str, WireRecord]], held: list[Key]
    ) -> dict[str, list[WireRecord]]:
        """A pass's records by device (alerts first, then in the order given, features records
        last; each once), those of a paused device set apart in ``held``."""
        paused = self.paused()
        by_device: dict[str, list[WireRecord]] = {}
        seen: set[Key] = set()
        for device, rec in sorted(items, key=_order):  # stable: the order given within a kind
            k = key(device, rec)
            if k in seen:
                continue
            seen.add(k)
            if device in paused:
                held.append(k)
            else:
                by_device.setdefault(device, []).append(rec)
        return by_device
