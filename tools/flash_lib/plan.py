"""Desired state -> the list of changes that reach it, printed (``--dry-run``) or applied.

An entry says what one path must be: a directory, a file (content, mode, owner), a symlink, or
absent. :func:`reconcile` compares each entry with the target (content by SHA-256, then mode and
owner) and keeps only what differs, so an up-to-date target gives an empty plan: "nothing to do".
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol


class TargetFS(Protocol):
    """File operations on a target's root filesystem (paths inside the target)."""

    def stat(self, path: str) -> dict[str, Any] | None: ...
    def read(self, path: str) -> bytes: ...
    def digest(self, path: str) -> str: ...
    def listdir(self, path: str) -> list[str]: ...
    def write(
        self,
        path: str,
        src: bytes | Path,
        mode: int,
        uid: int,
        gid: int,
        advance: Callable[[int], None],
    ) -> None: ...
    def mkdir(self, path: str, mode: int, uid: int, gid: int) -> None: ...
    def chmeta(self, path: str, kind: str, mode: int, uid: int, gid: int) -> None: ...
    def symlink(self, path: str, target: str) -> None: ...
    def remove(self, path: str) -> None: ...
    def commit(self) -> None: ...


@dataclass(frozen=True)
class Dir:
    path: str
    mode: int = 0o755
    uid: int = 0
    gid: int = 0
    enforce: bool = True  # False: create if missing, leave an existing one as it is


@dataclass(frozen=True)
class File:
    path: str
    data: bytes | None = None  # content, or ...
    source: Path | None = None  # ... a local file with it
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    digest: str = ""
    note: str = ""  # what the change means, for the plan ("add user edge-agent")

    @property
    def size(self) -> int:
        if self.data is not None:
            return len(self.data)
        assert self.source is not None
        return self.source.stat().st_size

    def sha256(self) -> str:
        if self.digest:
            return self.digest
        assert self.data is not None
        return hashlib.sha256(self.data).hexdigest()


@dataclass(frozen=True)
class Link:
    path: str
    target: str


@dataclass(frozen=True)
class Absent:
    path: str
    why: str = ""


Entry = Dir | File | Link | Absent


@dataclass
class Change:
    entry: Entry
    action: str  # create | update | owner/mode | replace | remove
    text: str
    size: int = 0


@dataclass
class Names:
    """uid/gid -> name, for printing owners the way ls does."""

    users: dict[int, str] = field(default_factory=dict)
    groups: dict[int, str] = field(default_factory=dict)

    def owner(self, uid: int, gid: int) -> str:
        return f"{self.users.get(uid, uid)}:{self.groups.get(gid, gid)}"


def _meta(mode: int, uid: int, gid: int, names: Names) -> str:
    return f"{mode:04o} {names.owner(uid, gid)}"


def _size(n: int) -> str:
    if n < 10_000:
        return f"{n} B"
    return f"{n / 1e3:.0f} kB" if n < 1_000_000 else f"{n / 1e6:.1f} MB"


def reconcile(fs: TargetFS, entries: list[Entry], names: Names) -> list[Change]:
    """The changes that make the target match ``entries`` (in order)."""
    changes: list[Change] = []
    for e in entries:
        st = fs.stat(e.path)
        if isinstance(e, Dir):
            if st is None:
                changes.append(
                    Change(e, "create", f"mkdir {e.path} ({_meta(e.mode, e.uid, e.gid, names)})")
                )
            elif st["kind"] != "dir":
                raise_kind(e.path, st["kind"], "a directory")
            elif e.enforce and (st["mode"], st["uid"], st["gid"]) != (e.mode, e.uid, e.gid):
                was = _meta(st["mode"], st["uid"], st["gid"], names)
                changes.append(
                    Change(
                        e,
                        "owner/mode",
                        f"chmod/chown {e.path}: {was} -> {_meta(e.mode, e.uid, e.gid, names)}",
                    )
                )
        elif isinstance(e, File):
            meta = _meta(e.mode, e.uid, e.gid, names)
            note = f": {e.note}" if e.note else ""
            if st is None:
                changes.append(
                    Change(e, "create", f"write {e.path} ({meta}, {_size(e.size)}){note}", e.size)
                )
            elif st["kind"] == "dir":
                raise_kind(e.path, "dir", "a file")
            elif st["kind"] != "file":
                changes.append(
                    Change(
                        e, "replace", f"replace {st['kind']} {e.path} by a file ({meta})", e.size
                    )
                )
            elif st["size"] != e.size or fs.digest(e.path) != e.sha256():
                changes.append(
                    Change(e, "update", f"update {e.path} ({meta}, {_size(e.size)}){note}", e.size)
                )
            elif (st["mode"], st["uid"], st["gid"]) != (e.mode, e.uid, e.gid):
                was = _meta(st["mode"], st["uid"], st["gid"], names)
                changes.append(Change(e, "owner/mode", f"chmod/chown {e.path}: {was} -> {meta}"))
        elif isinstance(e, Link):
            if st is None:
                changes.append(Change(e, "create", f"symlink {e.path} -> {e.target}"))
            elif st["kind"] == "dir":
                raise_kind(e.path, "dir", "a symlink")
            elif st["kind"] != "link" or st["target"] != e.target:
                changes.append(Change(e, "replace", f"symlink {e.path} -> {e.target} (replace)"))
        elif st is not None:
            if st["kind"] == "dir":
                raise_kind(e.path, "dir", "absent")
            why = f" ({e.why})" if e.why else ""
            changes.append(Change(e, "remove", f"remove {e.path}{why}"))
    return changes


def raise_kind(path: str, found: str, wanted: str) -> None:
    from flash_lib.errors import FlashError

    raise FlashError(f"{path} is a {found} on the target, expected {wanted}: move it away first")


def apply(fs: TargetFS, changes: list[Change], advance: Callable[[int], None]) -> None:
    """Carry out ``changes`` in order, then commit them."""
    for c in changes:
        e = c.entry
        if isinstance(e, Dir):
            if c.action == "create":
                fs.mkdir(e.path, e.mode, e.uid, e.gid)
            else:
                fs.chmeta(e.path, "dir", e.mode, e.uid, e.gid)
        elif isinstance(e, File):
            if c.action == "owner/mode":
                fs.chmeta(e.path, "file", e.mode, e.uid, e.gid)
            else:
                if c.action == "replace":
                    fs.remove(e.path)
                src: bytes | Path = e.data if e.data is not None else e.source  # type: ignore[assignment]
                fs.write(e.path, src, e.mode, e.uid, e.gid, advance)
        elif isinstance(e, Link):
            if c.action == "replace":
                fs.remove(e.path)
            fs.symlink(e.path, e.target)
        else:
            fs.remove(e.path)
    fs.commit()
