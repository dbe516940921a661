"""Staged roll-out of an agent release to a group, and where a release stands on each device
(``releases assign V --group NAME --percent P``, ``releases status V``; docs/ota.md).

**Which devices first.** :func:`staged` orders a group's members by SHA-256 of ``version`` and
the device id and takes the first ``ceil(P % of the members)`` (at least one): the same members
for the same version every time the command runs, so raising the percentage (10, then 50, then
100) extends the set already updating and never swaps it for another; another version draws
another order, so it is not always the same devices that go first. A partial roll-out assigns
the release to those members only and leaves the group's own release as it was (a device added
to the group meanwhile gets that one); at 100 % the group takes the release, as a plain
``--group`` assignment does.

**When to stop.** Every further step of a group's roll-out (any ``--group`` assignment) first
reads where the version stands on the members (:func:`standing`): a member whose latest outcome
of that version is ``rolled_back`` or ``refused`` stops the roll-out (exit 65 with the devices
and their reasons) unless ``--force``; so a release that fails on the first tenth of a fleet
does not reach the rest because an operator ran the next step by habit.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Sequence
from typing import Any

from agent.exits import EX_DATAERR, EX_USAGE, CommandError
from cloud import terminal

#: Outcomes after which a roll-out does not go on by itself.
STOPS = ("rolled_back", "refused")
#: The order ``releases status`` prints outcomes in; "not assigned" last.
ORDER = ("updated", "pending", "staged", "waiting", "assigned", "aborted", "refused", "rolled_back")
NOT_ASSIGNED = "not assigned"


def check_percent(percent: float) -> float:
    if not (isinstance(percent, int | float) and math.isfinite(percent) and 0 < percent <= 100):
        raise CommandError(EX_USAGE, f"error: --percent {percent!r}: above 0, up to 100")
    return float(percent)


def draw(version: str, device: str) -> bytes:
    """A device's place in ``version``'s roll-out order."""
    return hashlib.sha256(f"{version}\0{device}".encode()).digest()


def staged(members: Sequence[str], version: str, percent: float) -> list[str]:
    """The members that get ``version`` at ``percent`` (module docstring), in member order."""
    if not members:
        return []
    count = max(1, math.ceil(len(members) * percent / 100 - 1e-9))
    first = set(sorted(members, key=lambda d: draw(version, d))[:count])
    return [d for d in members if d in first]


def standing(rows: Iterable[Any], devices: Sequence[str] | None = None) -> dict[str, Any]:
    """device -> its latest history row of a version (``storage.release_outcomes``), for
    ``devices`` (all with a row when None); a device without one is left out."""
    latest = {row.device: row for row in rows}
    if devices is None:
        return latest
    return {d: latest[d] for d in devices if d in latest}


def stoppers(latest: dict[str, Any]) -> dict[str, Any]:
    """The devices whose latest outcome stops a roll-out."""
    return {d: row for d, row in latest.items() if row.result in STOPS}


def refuse_to_go_on(version: str, group: str, stop: dict[str, Any]) -> CommandError:
    shown = "; ".join(
        f"{d} {row.result}" + (f" ({terminal.safe(row.reason)})" if row.reason else "")
        for d, row in sorted(stop.items())[:5]
    )
    more = f" and {len(stop) - 5} more" if len(stop) > 5 else ""
    return CommandError(
        EX_DATAERR,
        f"error: release {version} did not take on {len(stop)} device(s) of group {group}: "
        f"{shown}{more}; the roll-out stops here (releases status {version} --group {group}; "
        "--force to go on anyway)",
    )


def summary(version: str, latest: dict[str, Any], devices: Sequence[str] | None) -> dict[str, Any]:
    """``releases status``: devices by their latest outcome of ``version`` (``devices``: a
    group's members, the ones without an outcome counted as not assigned)."""
    by: dict[str, list[str]] = {}
    for device in sorted(latest if devices is None else devices):
        row = latest.get(device)
        by.setdefault(NOT_ASSIGNED if row is None else row.result, []).append(device)
    results = [r for r in (*ORDER, NOT_ASSIGNED) if r in by] + sorted(
        set(by) - {*ORDER, NOT_ASSIGNED}
    )
    return {
        "version": version,
        "devices": sum(len(v) for v in by.values()),
        "counts": {r: len(by[r]) for r in results},
        "by_result": {r: by[r] for r in results},
        "reasons": {
            d: row.reason
            for d, row in sorted(latest.items())
            if row.reason and row.result in (*STOPS, "waiting")
        },
    }


def status_lines(s: dict[str, Any], group: str | None) -> list[str]:
    where = f" in group {group}" if group else ""
    out = [f"release {s['version']}{where}: {s['devices']} device(s)"]
    for result, devices in s["by_result"].items():
        shown = " ".join(devices[:12]) + (f" (+{len(devices) - 12})" if len(devices) > 12 else "")
        out.append(f"  {result:<13} {len(devices):>5}  {shown}")
    for device, reason in s["reasons"].items():  # of rollbacks and refusals
        out.append(f"  {device}: {terminal.safe(reason)}")
    return out
