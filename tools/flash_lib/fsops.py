"""File operations on a root filesystem that is a directory: a mounted SD card, a chroot, or ``/``.

Paths are absolute paths *inside* the target (``/etc/passwd``); :class:`LocalFS` maps them under
its root and refuses to follow a symlink out of it. Owners are numbers from the target's own
/etc/passwd. Files are replaced atomically (written beside, fsynced, renamed).

A directory of the target may belong to another user who can change it while this runs as root
(the agent's user owns /var/lib/edge-agent on a live device). So every change is made relative
to a descriptor of the directory that holds the path, opened one component at a time without
following a symlink; a new file gets a random name, O_EXCL and O_NOFOLLOW; owner and mode are set
on the descriptor of what was created or opened (fchown, fchmod), never by path. Where owner and
mode are to be set, a symlink, a node that is neither a regular file nor a directory, and a file
with more than one link are refused.

This module is also the helper on the far side of ``tools/flash ssh``: the client sends its source
to the device's python3, which calls :func:`serve` and answers requests on stdin/stdout. So it is
self-contained: standard library only, no imports from the rest of flash_lib.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import platform
import secrets
import stat as statmod
import subprocess
import sys
from collections.abc import Iterable, Iterator
from typing import Any, BinaryIO

CHUNK = 1 << 20
RUN_OUTPUT_LIMIT = 8000  # characters of a command's output sent back
# A directory on the way to a path: not followed if it is a symlink; O_PATH needs no read
# permission (a descriptor for the *at calls only).
DIR_FLAGS = os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC | getattr(os, "O_PATH", os.O_RDONLY)
NEW_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
# A path whose owner and mode are set: O_NONBLOCK so that a FIFO put there does not block
# the open; fchmod needs a descriptor that is not O_PATH.
META_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC


class FsError(Exception):
    """An operation on the target failed; the message names the path."""


def check_path(path: str) -> str:
    """``path`` if it is a clean absolute path inside a target, else FsError."""
    parts = path.split("/")
    if not path.startswith("/") or "\0" in path or any(p in (".", "..") for p in parts[1:]):
        raise FsError(f"{path!r}: not a clean absolute path")
    return path


class LocalFS:
    """A root filesystem that is a directory on this machine."""

    def __init__(self, root: str) -> None:
        self.root = os.path.realpath(root)

    # -- mapping ---------------------------------------------------------------------------
    def host_path(self, path: str) -> str:
        check_path(path)
        return path if self.root == "/" else self.root + path.rstrip("/")

    def _inside(self, host: str) -> bool:
        return self.root == "/" or host == self.root or host.startswith(self.root + "/")

    def _parent_checked(self, path: str) -> str:
        """The host path for writing ``path``: its parent must resolve inside the root."""
        host = self.host_path(path)
        parent = os.path.realpath(os.path.dirname(host))
        if not self._inside(parent):
            raise FsError(f"{path}: its directory leads out of {self.root} through a symlink")
        return os.path.join(parent, os.path.basename(host))

    @contextlib.contextmanager
    def _parent(self, path: str) -> Iterator[tuple[int, str]]:
        """A descriptor of the directory that holds ``path`` (:meth:`_parent_checked`), opened
        from / one component at a time with O_NOFOLLOW, and the name of ``path`` in it; closed
        afterwards. A component that has become a symlink since the check is refused (FsError);
        other errors are the OSError of the open."""
        host = self._parent_checked(path)
        parent, name = os.path.split(host)
        try:
            dfd = open_dir_nofollow(parent)
        except OSError as err:
            if err.errno != errno.ELOOP:
                raise
            raise FsError(
                f"{path}: {parent} or a directory above it is a symlink now: not followed; "
                "check it and run again"
            ) from None
        try:
            yield dfd, name
        finally:
            os.close(dfd)

    # -- queries ---------------------------------------------------------------------------
    def info(self) -> dict[str, Any]:
        """What the running python is: used over SSH, where it is the device's python."""
        return {
            "machine": platform.machine(),
            "python": f"{sys.version_info[0]}.{sys.version_info[1]}",
            "uid": os.getuid(),
            "systemd": os.path.isdir("/run/systemd/system"),
            "root": self.root,
        }

    def stat(self, path: str) -> dict[str, Any] | None:
        host = self.host_path(path)
        try:
            st = os.lstat(host)
        except FileNotFoundError:
            return None
        except NotADirectoryError:
            return None
        mode = st.st_mode
        if statmod.S_ISLNK(mode):
            kind = "link"
        elif statmod.S_ISDIR(mode):
            kind = "dir"
        elif statmod.S_ISREG(mode):
            kind = "file"
        else:
            kind = "other"
        return {
            "kind": kind,
            "mode": statmod.S_IMODE(mode),
            "uid": st.st_uid,
            "gid": st.st_gid,
            "size": st.st_size,
            "target": os.readlink(host) if kind == "link" else None,
        }

    def read(self, path: str) -> bytes:
        try:
            with open(self._parent_checked(path), "rb") as f:
                return f.read()
        except OSError as err:
            raise FsError(f"{path}: cannot read: {err.strerror}") from None

    def digest(self, path: str) -> str:
        h = hashlib.sha256()
        try:
            with open(self._parent_checked(path), "rb") as f:
                for block in iter(lambda: f.read(CHUNK), b""):
                    h.update(block)
        except OSError as err:
            raise FsError(f"{path}: cannot read: {err.strerror}") from None
        return h.hexdigest()

    def listdir(self, path: str) -> list[str]:
        try:
            return sorted(os.listdir(self._parent_checked(path)))
        except FileNotFoundError:
            return []
        except OSError as err:
            raise FsError(f"{path}: cannot list: {err.strerror}") from None

    # -- changes ---------------------------------------------------------------------------
    def write(self, path: str, chunks: Iterable[bytes], mode: int, uid: int, gid: int) -> None:
        try:
            with self._parent(path) as (dfd, name):
                tmp = temp_name(name)
                fd = os.open(tmp, NEW_FILE_FLAGS, 0o600, dir_fd=dfd)
                try:
                    with os.fdopen(fd, "wb") as f:
                        for block in chunks:
                            f.write(block)
                        f.flush()
                        own_fd(f.fileno(), mode, uid, gid)
                        os.fsync(f.fileno())
                    if _is_dir(name, dfd):
                        raise FsError(f"{path}: is a directory")
                    os.replace(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
                except BaseException:
                    _unlink_quietly(tmp, dfd)
                    raise
        except OSError as err:
            raise FsError(f"{path}: cannot write: {err.strerror}") from None

    def mkdir(self, path: str, mode: int, uid: int, gid: int) -> None:
        try:
            with self._parent(path) as (dfd, name):
                os.mkdir(name, 0o700, dir_fd=dfd)
                fd = os.open(name, META_FLAGS | os.O_DIRECTORY, dir_fd=dfd)
                try:
                    own_fd(fd, mode, uid, gid)
                finally:
                    os.close(fd)
        except OSError as err:
            raise FsError(f"{path}: cannot create directory: {err.strerror}") from None

    def chmeta(self, path: str, mode: int, uid: int, gid: int) -> None:
        """Owner and mode of the regular file or directory at ``path``, set on its descriptor.
        Refused: a symlink, another kind of node, a regular file with more than one link (it is
        another path's file too)."""
        refused = "owner/mode not set; remove it and run again"
        try:
            with self._parent(path) as (dfd, name):
                try:
                    fd = os.open(name, META_FLAGS, dir_fd=dfd)
                except OSError as err:
                    if err.errno == errno.ELOOP:
                        raise FsError(f"{path}: is a symlink: {refused}") from None
                    raise
                try:
                    st = os.fstat(fd)
                    if not (statmod.S_ISREG(st.st_mode) or statmod.S_ISDIR(st.st_mode)):
                        raise FsError(f"{path}: not a regular file or a directory: {refused}")
                    if statmod.S_ISREG(st.st_mode) and st.st_nlink > 1:
                        raise FsError(f"{path}: has {st.st_nlink} hard links: {refused}")
                    own_fd(fd, mode, uid, gid)
                finally:
                    os.close(fd)
        except OSError as err:
            raise FsError(f"{path}: cannot set owner/mode: {err.strerror}") from None

    def symlink(self, path: str, target: str) -> None:
        try:
            with self._parent(path) as (dfd, name):
                tmp = temp_name(name)
                os.symlink(target, tmp, dir_fd=dfd)
                try:
                    os.replace(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
                except BaseException:
                    _unlink_quietly(tmp, dfd)
                    raise
        except OSError as err:
            raise FsError(f"{path}: cannot create symlink: {err.strerror}") from None

    def remove(self, path: str) -> None:
        try:
            with self._parent(path) as (dfd, name):
                os.unlink(name, dir_fd=dfd)
        except FileNotFoundError:
            pass
        except OSError as err:
            raise FsError(f"{path}: cannot remove: {err.strerror}") from None

    def run(self, argv: list[str], chroot: bool = False) -> dict[str, Any]:
        """Run a command on this machine (inside the root with ``chroot``): rc and output."""
        if chroot:
            argv = ["chroot", self.root, *argv]
        try:
            proc = subprocess.run(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                check=False,
            )
        except OSError as err:
            return {"rc": 127, "output": f"{argv[0]}: {err.strerror}"}
        output = proc.stdout.decode("utf-8", "replace")
        return {"rc": proc.returncode, "output": output[-RUN_OUTPUT_LIMIT:]}

    def sync(self) -> None:
        os.sync()


def open_dir_nofollow(path: str) -> int:
    """A descriptor (O_PATH where there is one) of the directory at the absolute ``path``,
    opened from / one component at a time: OSError ELOOP where a component is a symlink."""
    fd = os.open("/", DIR_FLAGS)
    try:
        for part in path.split("/"):
            if part:
                try:
                    child = os.open(part, DIR_FLAGS, dir_fd=fd)
                except NotADirectoryError:  # what O_DIRECTORY|O_NOFOLLOW gives for a symlink
                    if statmod.S_ISLNK(os.stat(part, dir_fd=fd, follow_symlinks=False).st_mode):
                        raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), path) from None
                    raise
                os.close(fd)
                fd = child
    except BaseException:
        os.close(fd)
        raise
    return fd


def temp_name(name: str) -> str:
    """A name beside ``name`` that nobody can know in advance."""
    return f"{name}.{secrets.token_hex(8)}.flash-tmp"


def own_fd(fd: int, mode: int, uid: int, gid: int) -> None:
    """Owner, then mode (a chown can clear set-id bits), of what ``fd`` is open on."""
    st = os.fstat(fd)
    if (st.st_uid, st.st_gid) != (uid, gid):
        os.fchown(fd, uid, gid)
    os.fchmod(fd, mode)


def _is_dir(name: str, dfd: int) -> bool:
    try:
        return statmod.S_ISDIR(os.stat(name, dir_fd=dfd, follow_symlinks=False).st_mode)
    except FileNotFoundError:
        return False


def _unlink_quietly(name: str, dfd: int) -> None:
    try:
        os.unlink(name, dir_fd=dfd)
    except OSError:
        pass


# -- the far side of an SSH connection ----------------------------------------------------------
# One request per line of JSON: {"op": NAME, "args": {...}, "size": N} followed by N bytes of
# payload (the content for "write"). One answer per request: {"ok": true, "result": ..., "size": N}
# followed by N bytes (the content for "read"), or {"ok": false, "error": "..."}.

OPS = (
    "info",
    "stat",
    "read",
    "digest",
    "listdir",
    "write",
    "mkdir",
    "chmeta",
    "symlink",
    "remove",
    "run",
)


def _payload(stream: BinaryIO, size: int) -> Iterator[bytes]:
    left = size
    while left > 0:
        block = stream.read(min(CHUNK, left))
        if not block:
            raise EOFError("connection closed in the middle of a file")
        left -= len(block)
        yield block


def serve(root: str, stdin: BinaryIO | None = None, stdout: BinaryIO | None = None) -> None:
    """Answer requests for a LocalFS at ``root`` until stdin closes."""
    rx = stdin or sys.stdin.buffer
    tx = stdout or sys.stdout.buffer
    fs = LocalFS(root)
    while True:
        line = rx.readline()
        if not line:
            return
        request = json.loads(line)
        op, args, size = request["op"], request.get("args", {}), int(request.get("size", 0))
        body = b""
        try:
            if op not in OPS:
                raise FsError(f"unknown operation {op!r}")
            if op == "write":
                chunks = _payload(rx, size)
                try:
                    fs.write(chunks=chunks, **args)
                finally:
                    for _ in chunks:  # drain what a failed write left unread
                        pass
                result: Any = None
            elif op == "read":
                body = fs.read(**args)
                result = None
            else:
                result = getattr(fs, op)(**args)
            head = {"ok": True, "result": result, "size": len(body)}
        except (FsError, OSError, TypeError, ValueError) as err:
            head = {"ok": False, "error": str(err)}
            body = b""
        tx.write(json.dumps(head).encode() + b"\n" + body)
        tx.flush()
