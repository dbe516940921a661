"""File operations on a root filesystem that is a directory: a mounted SD card, a chroot, or ``/``.

Paths are absolute paths *inside* the target (``/etc/passwd``); :class:`LocalFS` maps them under
its root and refuses to follow a symlink out of it. Owners are numbers from the target's own
/etc/passwd. Files are replaced atomically (written beside, fsynced, renamed).

This module is also the helper on the far side of ``tools/flash ssh``: the client sends its source
to the device's python3, which calls :func:`serve` and answers requests on stdin/stdout. So it is
self-contained: standard library only, no imports from the rest of flash_lib.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import stat as statmod
import subprocess
import sys
from collections.abc import Iterable, Iterator
from typing import Any, BinaryIO

CHUNK = 1 << 20
RUN_OUTPUT_LIMIT = 8000  # characters of a command's output sent back


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
        host = self._parent_checked(path)
        tmp = f"{host}.flash-tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
            with os.fdopen(fd, "wb") as f:
                for block in chunks:
                    f.write(block)
                f.flush()
                os.fsync(f.fileno())
            self._own(tmp, mode, uid, gid)
            if os.path.isdir(host) and not os.path.islink(host):
                raise FsError(f"{path}: is a directory")
            os.replace(tmp, host)
        except OSError as err:
            _unlink_quietly(tmp)
            raise FsError(f"{path}: cannot write: {err.strerror}") from None
        except BaseException:
            _unlink_quietly(tmp)
            raise

    def mkdir(self, path: str, mode: int, uid: int, gid: int) -> None:
        host = self._parent_checked(path)
        try:
            os.mkdir(host, 0o700)
            self._own(host, mode, uid, gid)
        except OSError as err:
            raise FsError(f"{path}: cannot create directory: {err.strerror}") from None

    def chmeta(self, path: str, mode: int, uid: int, gid: int) -> None:
        try:
            self._own(self._parent_checked(path), mode, uid, gid)
        except OSError as err:
            raise FsError(f"{path}: cannot set owner/mode: {err.strerror}") from None

    def symlink(self, path: str, target: str) -> None:
        host = self._parent_checked(path)
        tmp = f"{host}.flash-tmp"
        try:
            _unlink_quietly(tmp)
            os.symlink(target, tmp)
            os.replace(tmp, host)
        except OSError as err:
            _unlink_quietly(tmp)
            raise FsError(f"{path}: cannot create symlink: {err.strerror}") from None

    def remove(self, path: str) -> None:
        try:
            os.unlink(self._parent_checked(path))
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

    @staticmethod
    def _own(host: str, mode: int, uid: int, gid: int) -> None:
        st = os.lstat(host)
        if (st.st_uid, st.st_gid) != (uid, gid):
            os.lchown(host, uid, gid)
        os.chmod(host, mode)


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
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
