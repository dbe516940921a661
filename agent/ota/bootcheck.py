"""The A/B release switch and the boot counter: standard library only, so it also runs as a plain
script with the system's ``python3 -I`` when a release's own Python or venv is broken.

Layout under the release root (default /opt/edge-agent; docs/ota.md)::

    releases/<version>/      a venv built from the verified bundle, plus COMPLETE when it is whole;
                             :func:`switch` removes those neither link below names (:func:`prune`)
    current -> releases/V    the release the service runs (``venv -> current`` for the unit)
    previous -> releases/U   the release to go back to
    update.json              {"pending", "from", "attempts", "max_attempts", "health_window",
                              "pending_s", "paused_s", "step", "switch_id", "pending_index",
                              "floor", "outcome"}

Every change is a step that leaves the tree bootable: a symlink is made under a temporary name
and renamed over the old one (``os.replace``), update.json is written to a temporary file,
fsynced, renamed, and the directory fsynced. :func:`resolve` finishes or undoes a switch that a
power cut interrupted, and is run by every :func:`start`.

The boot counter (``start``, the unit's ExecStartPre): while a version is pending (switched to,
not yet confirmed), each start counts one attempt; the start after ``max_attempts`` failed ones
puts ``previous`` back and records ``rolled_back`` with the reason. The agent confirms its version
(:func:`confirm`) once it is READY (sensors read, queue open, a sync exchange succeeded); a
READY marker written in the data directory (:func:`ready_marker`) counts as a confirmation too,
for an agent that cannot write the release root. ``failed`` (the OnFailure unit) rolls a pending
version back at once.

A READY marker counts for the switch it was written in only (:func:`is_ready`): :func:`switch`
removes the version's marker, durably, before it records anything, and gives each switch a
random ``switch_id`` that the agent writes into its marker (``<version> <switch_id>``); a
marker naming another switch is stale and confirms nothing. A marker without an id (an agent of
an earlier release, which writes only the version) counts, since the switch removed any older
one.

The health window (``health``, edge-agent-health.timer every ``--interval`` seconds): a pending
release that starts and keeps running but never confirms (it sends READY=1 and then never gets a
sync exchange through, or hangs after it) is not caught by the boot counter, which only counts
starts. Each run of the timer while the pending version is current and has started adds
``--interval`` to ``pending_s``; once that reaches the ``health_window`` the switch recorded
(``[update] health_window_s``), the previous release is put back and the service restarted.
Elapsed time is counted in timer periods (a monotonic timer), never from the wall clock, which a
device without a real-time clock may set back or forward at any time. A period in which the
service does not run (``systemctl is-active`` of ``--restart-unit`` says inactive: an operator
stopped it, or the release exited by itself with status 0, which systemd does not restart) is
not counted, for at most one more window (``paused_s``): the window is the time the release ran
to prove itself, and a release that stops by itself is still rolled back, after twice the
window. ``failed`` counts (``OnFailure=`` rolls back at once anyway).

The rollback floor (agent/ota/floor.py) the root helper checks is kept here, in update.json
(``floor``: ``{"index", "version"}``), never in the data directory: :func:`switch` records the
signed ``rollback_index`` of the release it switches to (``pending_index``) and :func:`confirm`
raises the floor to it, so the floor is the highest index of a release confirmed here.

The data directory is the agent's (``edge-agent``, which may be compromised): whatever this
module and the root helper read, remove or move there goes through :func:`open_data`,
:func:`remove_data` and :func:`give_data`, which follow no link in it (every component below
the data directory is opened with ``O_NOFOLLOW``), never block (``O_NONBLOCK``: a FIFO, a
lease), take a regular file of one name only and read a bounded number of bytes
(:func:`read_data`).

Logging: one ``key=value`` line on stderr per decision (journald keeps it).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path, PurePosixPath
from typing import Any

STATE_FILE = "update.json"
RELEASES = "releases"
CURRENT = "current"
PREVIOUS = "previous"
VENV = "venv"  # the path the unit runs: venv -> current (or a plain venv before the first update)
COMPLETE = "COMPLETE"
MAX_ATTEMPTS = 3
MAX_ATTEMPTS_LIMIT = 100
HEALTH_WINDOW = 600  # seconds a pending release has to confirm once it runs
MIN_HEALTH_WINDOW, MAX_HEALTH_WINDOW = 60, 86400  # [update] health_window_s may be in between
#: A release name, as agent/modelstore/signing.py NAME_RE checks a signed manifest's version
#: (this module runs with the standard library only, so it keeps its own copy)
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}")
READY_DIR = "ota"  # DATA/ota/ready-<version>: the agent's READY marker
_SWITCH_ID = re.compile(r"[0-9a-f]{16}")  # update.json switch_id: 8 random bytes in hex
MAX_MARKER_BYTES = 256  # a READY marker is "<version> <switch_id>\n"; more is not read
MAX_ROLLBACK_INDEX = 2**31 - 1  # agent/modelstore/signing.py's (standard library only: a copy)
FLOOR = "floor"  # update.json: {"index", "version"}, the root helper's rollback floor


class BootError(Exception):
    """A release root that cannot be switched (missing release, bad name)."""


# -- durable small files ---------------------------------------------------------------------------


def fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _write_json(path: Path, doc: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as out:
        json.dump(doc, out, sort_keys=True)
        out.flush()
        os.fsync(out.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def set_link(root: Path, name: str, target: str) -> None:
    """``root/name`` -> ``target`` (relative), replaced atomically."""
    tmp = root / f".{name}.tmp"
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    os.symlink(target, tmp)
    os.replace(tmp, root / name)
    fsync_dir(root)


def link_version(root: Path, name: str) -> str | None:
    """The version ``root/name`` points at (None when it is no link into releases/)."""
    try:
        target = os.readlink(root / name)
    except OSError:
        return None
    parts = Path(target).parts
    if len(parts) == 2 and parts[0] == RELEASES:
        return parts[1]
    return None


def is_complete(root: Path, version: str) -> bool:
    return (root / RELEASES / version / COMPLETE).is_file()


def mark_complete(root: Path, version: str) -> None:
    """Written last by the installer, after everything in the release is fsynced."""
    rel = root / RELEASES / version
    path = rel / COMPLETE
    with open(path, "w", encoding="utf-8") as out:
        out.write(version + "\n")
        out.flush()
        os.fsync(out.fileno())
    fsync_dir(rel)


# -- the agent's data directory, as root reads it ----------------------------------------------

#: the last component of a path in the data directory: no link, no blocking on a FIFO or a lease
DATA_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def _data_parent(data_dir: Path, relative: str) -> tuple[int, str]:
    """An open descriptor of the directory holding ``relative`` (a path below ``data_dir``, each
    of its directories opened without following a link) and the last name. ``data_dir`` itself
    is root's setting (its parent is root's), so it is opened as it is."""
    path = PurePosixPath(relative)
    if path.is_absolute() or not path.parts or any(p in (".", "..") for p in path.parts):
        raise OSError(errno.EINVAL, "not a path inside the data directory", relative)
    fd = os.open(data_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for part in path.parts[:-1]:
            below = os.open(part, _DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = below
    except BaseException:
        os.close(fd)
        raise
    return fd, path.parts[-1]


def open_data(data_dir: Path, relative: str) -> int:
    """A read-only descriptor of the file ``data_dir/relative``, opened as root opens anything
    of the agent's: no link followed on the way or at the end (ELOOP, ENOTDIR), without
    blocking, and only a regular file (EINVAL) that has no other name (EMLINK: a hard link in
    the data directory to a file elsewhere is not the agent's). FileNotFoundError when there is
    none."""
    parent, name = _data_parent(data_dir, relative)
    try:
        return open_regular(name, dir_fd=parent, label=str(data_dir / relative))
    finally:
        os.close(parent)


def open_regular(
    path: Path | str, *, dir_fd: int | None = None, label: str = "", one_name: bool = True
) -> int:
    """A read-only descriptor of ``path`` (relative to ``dir_fd``): not followed when it is a
    link (ELOOP), opened without blocking, and a regular file (EINVAL) of one name (EMLINK; with
    ``one_name``), checked on the descriptor (fstat), so what is checked is what is read."""
    fd = os.open(path, DATA_FLAGS, dir_fd=dir_fd)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(errno.EINVAL, "not a regular file", label or str(path))
        if one_name and st.st_nlink != 1:
            raise OSError(errno.EMLINK, "a file with another name", label or str(path))
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_data(data_dir: Path, relative: str, limit: int) -> bytes:
    """The bytes of ``data_dir/relative`` (:func:`open_data`), at most ``limit``: a larger
    file (a sparse one costs the agent nothing) is refused after ``limit + 1`` bytes read, with
    OSError EFBIG."""
    fd = open_data(data_dir, relative)
    chunks, have = [], 0
    try:
        while have <= limit:
            chunk = os.read(fd, min(1 << 16, limit + 1 - have))
            if not chunk:
                break
            chunks.append(chunk)
            have += len(chunk)
    finally:
        os.close(fd)
    if have > limit:
        raise OSError(errno.EFBIG, f"more than {limit} bytes", str(data_dir / relative))
    return b"".join(chunks)


def remove_data(data_dir: Path, relative: str) -> bool:
    """Remove the name ``data_dir/relative`` (never through a linked directory: a link itself
    is removed, not what it names), durably. False when there was none."""
    try:
        parent, name = _data_parent(data_dir, relative)
    except FileNotFoundError:
        return False
    try:
        os.unlink(name, dir_fd=parent)
        with contextlib.suppress(OSError):
            os.fsync(parent)
        return True
    except FileNotFoundError:
        return False
    finally:
        os.close(parent)


def data_device(data_dir: Path, relative: str) -> int:
    """The filesystem (``st_dev``) of the directory holding ``data_dir/relative``, that directory
    opened as :func:`open_data` opens it (no link followed on the way)."""
    parent, _ = _data_parent(data_dir, relative)
    try:
        return os.fstat(parent).st_dev
    finally:
        os.close(parent)


def give_data(data_dir: Path, relative: str, src_dir: Path, src: str, mode: int) -> None:
    """Move root's file ``src_dir/src`` to ``data_dir/relative`` by rename (one filesystem: no
    room needed, atomic; OSError EXDEV else), into the directory :func:`open_data` would open
    (no link followed on the way; a link or a file at the last name is replaced, not followed).
    It gets the data directory's owner (as root) and ``mode`` (permission bits only), and is
    fsynced before the rename and both directories after it: a power cut leaves the whole file
    there, or none."""
    owner = os.stat(data_dir)
    parent, name = _data_parent(data_dir, relative)
    try:
        sfd = os.open(src_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            fd = os.open(src, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=sfd)
            try:
                if os.geteuid() == 0:
                    os.fchown(fd, owner.st_uid, owner.st_gid)
                os.fchmod(fd, stat.S_IMODE(mode) & 0o777)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(src, name, src_dir_fd=sfd, dst_dir_fd=parent)
            for directory in (parent, sfd):
                with contextlib.suppress(OSError):
                    os.fsync(directory)
        finally:
            os.close(sfd)
    finally:
        os.close(parent)


# -- the state file ---------------------------------------------------------------------------


def load(root: Path) -> dict[str, Any]:
    """update.json; empty when there is none, or (with a line saying so) when it is unreadable:
    the next change writes it anew. Its fields are read with :func:`number` and :func:`name`."""
    path = root / STATE_FILE
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(doc, dict):
            raise ValueError("not a JSON object")
        return doc
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, RecursionError) as err:
        said = str(err)[:200].replace(" ", "_")
        if said not in _SAID:  # once per process: the agent reads it at every report
            _SAID.add(said)
            _log("update_state_unreadable", path=path, error=said)
        return {}


_SAID: set[str] = set()  # unreadable update.json errors logged by this process


def floor_of(doc: Any) -> tuple[int, str | None]:
    """The root helper's rollback floor in update.json: (index, the release that set it); (0,
    None) when there is none (read as :func:`number` reads)."""
    value = doc.get(FLOOR) if isinstance(doc, dict) else None
    index = number(value, "index", 0, 0, MAX_ROLLBACK_INDEX)
    return index, name(value, "version") if index else None


def save(root: Path, doc: dict[str, Any]) -> None:
    _write_json(root / STATE_FILE, doc)


def _log(event: str, **fields: Any) -> None:
    items = " ".join(f"{k}={v}" for k, v in fields.items())
    print(f"event={event} {items}".rstrip(), file=sys.stderr, flush=True)


def _outcome(version: str | None, result: str, reason: str = "", **extra: Any) -> dict[str, Any]:
    return {"version": version, "result": result, "reason": reason, "at": time.time(), **extra}


# -- steps -----------------------------------------------------------------------------------------


def adopt(root: Path, version: str) -> None:
    """Before the first switch: a plain ``venv`` directory becomes ``releases/<version>`` and
    ``venv`` a link to ``current``. Each step leaves ``venv`` usable, or :func:`resolve` mends
    it."""
    venv = root / VENV
    rel = root / RELEASES / version
    (root / RELEASES).mkdir(parents=True, exist_ok=True)
    if venv.is_dir() and not venv.is_symlink():
        if rel.exists():
            raise BootError(f"{rel} exists; cannot adopt {venv} as release {version}")
        os.rename(venv, rel)
        fsync_dir(root)
        mark_complete(root, version)
    if link_version(root, CURRENT) is None and is_complete(root, version):
        set_link(root, CURRENT, f"{RELEASES}/{version}")
    if not venv.is_symlink():
        set_link(root, VENV, CURRENT)


def switch(
    root: Path,
    version: str,
    max_attempts: int = MAX_ATTEMPTS,
    health_window: int = HEALTH_WINDOW,
    data_dir: Path | None = None,
    rollback_index: int = 0,
) -> None:
    """Make ``version`` (installed and COMPLETE) current, the running one previous, and pending
    until confirmed. Steps: the READY marker of ``version`` in ``data_dir`` removed (durably:
    a marker of an earlier switch to it must never confirm this one) -> state ``switching``
    (with a new ``switch_id``, and ``rollback_index``, the signed index of ``version`` that
    :func:`confirm` raises the floor to) -> previous -> current -> state ``switched``."""
    if not is_complete(root, version):
        raise BootError(f"release {version} is not installed completely under {root / RELEASES}")
    running = link_version(root, CURRENT)
    if running == version:
        raise BootError(f"release {version} is already current")
    if data_dir is not None:
        drop_ready(data_dir, version)
    doc = load(root)
    doc.update(pending=version, attempts=0, max_attempts=max_attempts, step="switching")
    doc.update(health_window=health_window, pending_s=0, paused_s=0)
    doc["switch_id"] = os.urandom(8).hex()
    doc["pending_index"] = max(0, min(int(rollback_index), MAX_ROLLBACK_INDEX))
    doc["from"] = running
    doc["switched_at"] = time.time()
    save(root, doc)
    if running is not None:
        set_link(root, PREVIOUS, f"{RELEASES}/{running}")
    set_link(root, CURRENT, f"{RELEASES}/{version}")
    doc["step"] = "switched"
    save(root, doc)
    _log("release_switched", version=version, previous=running)
    prune(root, data_dir)


def prune(root: Path, data_dir: Path | None = None) -> list[str]:
    """Remove every release that neither ``current`` nor ``previous`` names (and its READY
    marker in ``data_dir``): nothing can switch back to it, and each took a whole venv and its
    bundle (~200 MB). Without this every update left one behind. ``COMPLETE`` goes first
    (durably), so a removal a power cut interrupts is never taken for a release; what is left
    of it is removed by the next switch. A failure is said, not raised: the switch is done."""
    keep = {link_version(root, CURRENT), link_version(root, PREVIOUS)}
    removed = []
    for rel in sorted((root / RELEASES).glob("*")):
        if rel.name in keep or rel.is_symlink() or not rel.is_dir():
            continue
        try:
            with contextlib.suppress(FileNotFoundError):
                (rel / COMPLETE).unlink()
            fsync_dir(rel)
            shutil.rmtree(rel)
            fsync_dir(root / RELEASES)
        except OSError as err:
            _log("release_remove_failed", version=rel.name, error=str(err)[:200].replace(" ", "_"))
            continue
        if data_dir is not None and _NAME.fullmatch(rel.name):
            with contextlib.suppress(OSError):
                drop_ready(data_dir, rel.name)
        removed.append(rel.name)
        _log("release_removed", version=rel.name)
    return removed


def rollback(root: Path, reason: str) -> str | None:
    """Put ``previous`` back as ``current``; record ``rolled_back``. The version now current."""
    doc = load(root)
    bad = name(doc, "pending") or link_version(root, CURRENT)
    back = link_version(root, PREVIOUS) or name(doc, "from")
    if back is None or not is_complete(root, back):
        _log("rollback_impossible", version=bad, reason=reason)
        return link_version(root, CURRENT)
    doc["step"] = "rolling_back"
    save(root, doc)
    set_link(root, CURRENT, f"{RELEASES}/{back}")
    doc.update(pending=None, attempts=0, step="idle", switch_id=None)
    doc["outcome"] = _outcome(bad, "rolled_back", reason, restored=back)
    save(root, doc)
    _log("release_rolled_back", version=bad, restored=back, reason=reason.replace(" ", "_"))
    return back


def ready_marker(data_dir: Path, version: str) -> Path:
    return data_dir / READY_DIR / f"ready-{version}"


def switch_id(doc: Any) -> str | None:
    """The ``switch_id`` of update.json when it is one (read as :func:`name` reads)."""
    value = doc.get("switch_id") if isinstance(doc, dict) else None
    return value if isinstance(value, str) and _SWITCH_ID.fullmatch(value) else None


def marker_text(version: str, switch: str | None) -> str:
    """What the agent on ``version`` writes into its READY marker during ``switch``."""
    return f"{version} {switch}\n" if switch else f"{version}\n"


def drop_ready(data_dir: Path, version: str) -> None:
    """Remove the READY marker of ``version``, durably (an OSError other than its absence is
    raised: a switch must not go on beside a marker it could not remove)."""
    if remove_data(data_dir, f"{READY_DIR}/ready-{version}"):
        _log("ready_marker_removed", version=version)


def is_ready(data_dir: Path | None, doc: dict[str, Any], version: str) -> bool:
    """Whether the agent on the pending ``version`` wrote its READY marker in this switch: a
    regular file (never followed through a link: the data directory is the agent's) that names
    no switch (an earlier release's agent) or the switch of ``doc``."""
    if data_dir is None:
        return False
    try:
        fd = open_data(data_dir, f"{READY_DIR}/ready-{version}")
    except OSError:
        return False
    try:
        words = os.read(fd, MAX_MARKER_BYTES).decode("ascii", "replace").split()
    except OSError:
        return False
    finally:
        os.close(fd)
    marked = words[1] if len(words) > 1 else None
    if marked is not None and marked != switch_id(doc):
        _log("ready_marker_stale", version=version, marker_switch=marked[:32])
        return False
    return True


def confirm(root: Path, version: str) -> bool:
    """The agent on ``version`` is READY: the pending switch is done. True when it was pending."""
    doc = load(root)
    if name(doc, "pending") != version or link_version(root, CURRENT) != version:
        return False
    index = number(doc, "pending_index", 0, 0, MAX_ROLLBACK_INDEX)
    if index > floor_of(doc)[0]:  # the floor: the highest index of a release confirmed here
        doc[FLOOR] = {"index": index, "version": version}
        _log("release_floor_raised", version=version, index=index)
    doc.update(pending=None, attempts=0, step="idle", switch_id=None)
    doc["outcome"] = _outcome(version, "updated", previous=doc.get("from"))
    save(root, doc)
    _log("release_confirmed", version=version)
    return True


def resolve(root: Path) -> str | None:
    """Finish or undo what a power cut interrupted; the version now current."""
    venv = root / VENV
    if venv.is_dir() and not venv.is_symlink() and not (root / RELEASES).exists():
        return None  # never updated: the first install's plain venv
    doc = load(root)
    current = link_version(root, CURRENT)
    pending = name(doc, "pending")
    step = doc.get("step")
    if step == "switching" and pending and current != pending:
        # cut before the current link moved: the old release still runs; forget the switch
        doc.update(pending=None, attempts=0, step="idle", switch_id=None)
        doc["outcome"] = _outcome(pending, "aborted", "interrupted before the switch")
        save(root, doc)
        _log("release_switch_aborted", version=pending)
    elif step == "switching" and pending == current:
        doc["step"] = "switched"  # cut after the link moved, before the state said so
        save(root, doc)
    elif step == "rolling_back" and pending:
        outcome = doc.get("outcome")
        reason = outcome.get("reason") if isinstance(outcome, dict) else None
        rollback(root, str(reason or "interrupted rollback")[:200])
    current = link_version(root, CURRENT)
    if current is None or not is_complete(root, current):
        # no usable current (a cut during adoption): the newest complete release, previous first
        complete = sorted(
            (p.name for p in (root / RELEASES).glob("*") if (p / COMPLETE).is_file()),
            key=lambda n: (root / RELEASES / n).stat().st_mtime,
            reverse=True,
        )
        candidates = [link_version(root, PREVIOUS), *complete]
        found = next((v for v in candidates if v and is_complete(root, v)), None)
        if found is not None:
            set_link(root, CURRENT, f"{RELEASES}/{found}")
            current = found
    if current is not None and not venv.is_symlink() and not venv.exists():
        set_link(root, VENV, CURRENT)
    return current


def start(root: Path, data_dir: Path | None = None) -> str | None:
    """ExecStartPre: resolve, then count this start of a pending version (or roll it back)."""
    current = resolve(root)
    doc = load(root)
    pending = name(doc, "pending")
    if not pending or pending != current:
        return current
    if is_ready(data_dir, doc, pending):
        confirm(root, pending)
        return current
    attempts = number(doc, "attempts", 0)
    limit = number(doc, "max_attempts", MAX_ATTEMPTS, 1, MAX_ATTEMPTS_LIMIT)
    if attempts >= limit:
        return rollback(root, f"did not reach READY in {attempts} starts")
    doc["attempts"] = attempts + 1
    save(root, doc)
    _log("release_start", version=pending, attempt=attempts + 1, of=limit)
    return current


def failed(root: Path, data_dir: Path | None = None) -> str | None:
    """OnFailure: the service gave up (start limit, or exit codes that are not restarted)."""
    current = resolve(root)
    doc = load(root)
    pending = name(doc, "pending")
    if pending and pending == current:
        if is_ready(data_dir, doc, pending):
            confirm(root, pending)
            return current
        return rollback(root, "the service failed while the release was pending")
    return current


def name(doc: Any, key: str) -> str | None:
    """``doc[key]`` when it is a release name (a version: letters, digits, '_', '.', '+', '-',
    starting with a letter or digit; never a path), else None: read as :func:`number` reads."""
    value = doc.get(key) if isinstance(doc, dict) else None
    return value if isinstance(value, str) and _NAME.fullmatch(value) else None


def number(doc: Any, key: str, default: int, low: int = 0, high: int | None = None) -> int:
    """``doc[key]`` when it is an integer in [low, high], else ``default``: update.json and
    staged.json are read as untrusted (a damaged file, or the unprivileged agent's)."""
    value = doc.get(key) if isinstance(doc, dict) else None
    ok = isinstance(value, int) and not isinstance(value, bool) and low <= value
    return value if ok and (high is None or value <= high) else default


def health(
    root: Path, data_dir: Path | None, interval: int, running: bool | None = None
) -> str | None:
    """edge-agent-health.timer: one period of ``interval`` seconds passed (module docstring).
    ``running``: whether the service runs (:func:`service_running`; None: not known, counted as
    running). The version now current."""
    current = resolve(root)
    doc = load(root)
    pending = name(doc, "pending")
    if not pending or pending != current or number(doc, "attempts", 0) < 1:
        return current  # nothing pending, or switched but not started yet
    if is_ready(data_dir, doc, pending):
        confirm(root, pending)
        return current
    window = number(doc, "health_window", HEALTH_WINDOW)
    paused = number(doc, "paused_s", 0)
    if running is False and paused < window:  # stopped: the window waits, one window at most
        doc["paused_s"] = paused + interval
        save(root, doc)
        _log(
            "release_health_paused",
            version=pending,
            waited_s=number(doc, "pending_s", 0),
            paused_s=paused + interval,
        )
        return current
    waited = number(doc, "pending_s", 0) + interval
    if waited >= window:
        return rollback(
            root,
            f"not READY within the health window ({window} s: sensors read, queue open, "
            "a sync exchange)",
        )
    doc["pending_s"] = waited
    save(root, doc)
    _log("release_health_wait", version=pending, waited_s=waited, window_s=window)
    return current


#: ``systemctl is-active`` states in which the service runs (or is starting or reloading), and
#: those in which it does not; anything else (no systemd, an unknown unit) is not known.
RUNNING_STATES = frozenset({"active", "activating", "reloading", "refreshing"})
STOPPED_STATES = frozenset({"inactive", "deactivating", "maintenance"})


def service_running(unit: str | None) -> bool | None:
    """Whether ``unit`` runs, as ``systemctl is-active`` says; None when it cannot say."""
    if not unit:
        return None
    try:
        proc = subprocess.run(
            ["systemctl", "is-active", unit], capture_output=True, text=True, timeout=30
        )
    except (OSError, subprocess.SubprocessError):
        return None
    state = proc.stdout.strip()
    if state in RUNNING_STATES:
        return True
    return False if state in STOPPED_STATES else None


def _restart(unit: str | None, *commands: list[str]) -> None:
    """The service runs the bad release: start it again on the restored one."""
    if unit:
        for cmd in commands:
            subprocess.run(["systemctl", *cmd, unit], check=False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="edge-agent-bootcheck", description=__doc__)
    parser.add_argument(
        "action", choices=("start", "failed", "health", "resolve", "rollback", "status")
    )
    parser.add_argument("--root", default="/opt/edge-agent")
    parser.add_argument("--data-dir", default=None, help="the agent's data dir (READY marker)")
    parser.add_argument(
        "--restart-unit", default=None, help="failed, health: start it after a rollback"
    )
    parser.add_argument(
        "--interval", type=int, default=60, help="health: seconds since the timer's last run"
    )
    args = parser.parse_args(argv)
    root = Path(args.root)
    data = Path(args.data_dir) if args.data_dir else None
    try:
        if args.action == "start":
            start(root, data)
        elif args.action == "failed":
            before = link_version(root, CURRENT)
            if failed(root, data) != before:
                _restart(args.restart_unit, ["reset-failed"], ["--no-block", "start"])
        elif args.action == "health":
            before = link_version(root, CURRENT)
            running = service_running(args.restart_unit)
            if health(root, data, max(1, args.interval), running) != before:
                _restart(args.restart_unit, ["--no-block", "restart"])
        elif args.action == "resolve":
            resolve(root)
        elif args.action == "rollback":
            rollback(root, "rolled back by the operator")
        else:
            print(json.dumps({"current": link_version(root, CURRENT), **load(root)}, indent=1))
    except (OSError, BootError) as err:
        # never stop the service from starting: it runs whatever current is
        _log("bootcheck_error", error=str(err).replace(" ", "_"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
