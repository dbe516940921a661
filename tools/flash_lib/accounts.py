"""The service account in a target's /etc/passwd, /etc/group, /etc/shadow and /etc/gshadow.

Pure functions on the files' text, so the same code serves a directory, a disk image and a live
device, and ``--dry-run`` can show what would change. Like ``useradd --system``: a system uid and
gid taken from the top of the SYS_UID_MIN..SYS_UID_MAX range of /etc/login.defs, a locked
password, no login shell. An account that exists already is kept as it is (its ids included); only
what is missing is added, so a second run changes nothing.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

DEFAULT_SYS_MIN = 100
DEFAULT_SYS_MAX = 999
DIALOUT_GID = 20  # Debian's static gid for dialout (base-passwd)
NOLOGIN_SHELLS = ("/usr/sbin/nologin", "/sbin/nologin", "/bin/false")


@dataclass
class AccountPlan:
    """New file texts (only for files that change), the resolved ids, and what changed."""

    files: dict[str, str] = field(default_factory=dict)
    uid: int = -1
    gid: int = -1
    changes: list[str] = field(default_factory=list)


def _rows(text: str | None) -> list[list[str]]:
    if not text:
        return []
    return [line.split(":") for line in text.splitlines() if line and not line.startswith("#")]


def _append(text: str | None, line: str) -> str:
    text = text or ""
    if text and not text.endswith("\n"):
        text += "\n"
    return text + line + "\n"


def _replace_line(text: str, name: str, new_line: str) -> str:
    out = []
    for line in text.splitlines(keepends=True):
        if line.split(":", 1)[0] == name:
            out.append(new_line + ("\n" if line.endswith("\n") else ""))
        else:
            out.append(line)
    return "".join(out)


def login_defs_range(text: str | None, kind: str) -> tuple[int, int]:
    """SYS_UID_MIN/MAX (kind "UID") or SYS_GID_MIN/MAX ("GID") from /etc/login.defs."""
    lo, hi = DEFAULT_SYS_MIN, DEFAULT_SYS_MAX
    for line in (text or "").splitlines():
        m = re.match(rf"^\s*SYS_{kind}_(MIN|MAX)\s+(\d+)\s*$", line)
        if m:
            if m.group(1) == "MIN":
                lo = int(m.group(2))
            else:
                hi = int(m.group(2))
    return lo, hi


def _free_id(used: set[int], lo: int, hi: int, also_free: set[int] | None = None) -> int:
    """The highest id in lo..hi free in ``used`` (and in ``also_free`` if one is free there)."""
    if also_free is not None:
        for n in range(hi, lo - 1, -1):
            if n not in used and n not in also_free:
                return n
    for n in range(hi, lo - 1, -1):
        if n not in used:
            return n
    raise ValueError(f"no free system id left in {lo}..{hi}")


def plan_accounts(
    files: dict[str, str | None],
    *,
    user: str,
    home: str,
    groups: tuple[str, ...],
    shell: str,
    today: int,
) -> AccountPlan:
    """What to add so that ``user`` exists with its own group and is a member of ``groups``.

    ``files`` maps "/etc/passwd", "/etc/group", "/etc/shadow", "/etc/gshadow", "/etc/login.defs"
    to their text (None when absent; shadow files that are absent stay absent). ``today`` is the
    day number written as the password's last change.
    """
    passwd = files.get("/etc/passwd") or ""
    group = files.get("/etc/group") or ""
    shadow = files.get("/etc/shadow")
    gshadow = files.get("/etc/gshadow")
    uid_lo, uid_hi = login_defs_range(files.get("/etc/login.defs"), "UID")
    gid_lo, gid_hi = login_defs_range(files.get("/etc/login.defs"), "GID")
    plan = AccountPlan()

    users = {r[0]: r for r in _rows(passwd) if len(r) >= 7}
    grps = {r[0]: r for r in _rows(group) if len(r) >= 4}
    used_uids = {int(r[2]) for r in users.values() if r[2].isdigit()}
    used_gids = {int(r[2]) for r in grps.values() if r[2].isdigit()}

    # The user's own group, then the user.
    if user in users:
        plan.uid, plan.gid = int(users[user][2]), int(users[user][3])
        if user not in grps and plan.gid not in used_gids:
            group = _append(group, f"{user}:x:{plan.gid}:")
            used_gids.add(plan.gid)
            plan.changes.append(f"add group {user} (gid {plan.gid})")
    else:
        if user in grps:
            plan.gid = int(grps[user][2])
            plan.uid = _free_id(used_uids, uid_lo, uid_hi)
            if plan.gid not in used_uids and uid_lo <= plan.gid <= uid_hi:
                plan.uid = plan.gid
        else:
            plan.uid = _free_id(used_uids, uid_lo, uid_hi, also_free=used_gids)
            plan.gid = (
                plan.uid if plan.uid not in used_gids else _free_id(used_gids, gid_lo, gid_hi)
            )
            group = _append(group, f"{user}:x:{plan.gid}:")
            used_gids.add(plan.gid)
            plan.changes.append(f"add group {user} (gid {plan.gid})")
        passwd = _append(passwd, f"{user}:x:{plan.uid}:{plan.gid}:{user} service:{home}:{shell}")
        used_uids.add(plan.uid)
        plan.changes.append(
            f"add user {user} (uid {plan.uid}, gid {plan.gid}, home {home}, shell {shell})"
        )
    if shadow is not None and user not in {r[0] for r in _rows(shadow)}:
        shadow = _append(shadow, f"{user}:!:{today}::::::")
    if gshadow is not None and user not in {r[0] for r in _rows(gshadow)}:
        gshadow = _append(gshadow, f"{user}:!::")

    # Supplementary groups: create the missing ones, add the user to each.
    for name in groups:
        if name not in grps:
            if name == "dialout" and DIALOUT_GID not in used_gids:
                gid = DIALOUT_GID
            else:
                gid = _free_id(used_gids, gid_lo, gid_hi)
            used_gids.add(gid)
            group = _append(group, f"{name}:x:{gid}:{user}")
            plan.changes.append(f"add group {name} (gid {gid}) with member {user}")
        else:
            row = grps[name]
            members = [m for m in row[3].split(",") if m]
            if user not in members:
                members.append(user)
                group = _replace_line(group, name, ":".join([*row[:3], ",".join(members)]))
                plan.changes.append(f"add {user} to group {name} (gid {row[2]})")
        if gshadow is not None:
            gsh = {r[0]: r for r in _rows(gshadow) if len(r) >= 4}
            if name not in gsh:
                gshadow = _append(gshadow, f"{name}:!::{user}")
            else:
                members = [m for m in gsh[name][3].split(",") if m]
                if user not in members:
                    members.append(user)
                    gshadow = _replace_line(
                        gshadow, name, ":".join([*gsh[name][:3], ",".join(members)])
                    )

    for path, new in (
        ("/etc/passwd", passwd),
        ("/etc/group", group),
        ("/etc/shadow", shadow),
        ("/etc/gshadow", gshadow),
    ):
        if new is not None and new != (files.get(path) or ""):
            plan.files[path] = new
    return plan
