"""The Python API: :class:`PowerCutFS` mounts the power-cut filesystem in its own process and cuts
the power on it.

    with PowerCutFS(backing_dir) as fs:
        ...  # run something that keeps files under fs.mountpoint
        fs.stats()                       # pending bytes, fsyncs seen, ...
        fs.cut(kill=[child.pid])         # the power goes; the mount comes back as it was durable
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

MOUNT_TIMEOUT = 15.0  # seconds for the filesystem process to start and mount
COMMAND_TIMEOUT = 60.0  # seconds for a command (a sync writes out every pending byte)


class PowerCutError(RuntimeError):
    """The filesystem process failed to mount, to answer, or to carry out a command."""


@dataclass(frozen=True)
class Stats:
    """Counters of one mount (they start again at zero after each cut)."""

    pending_files: int = 0  # files with data not yet durable
    pending_bytes: int = 0  # bytes not yet durable, in whole 4 KiB pages
    journal_ops: int = 0  # namespace operations not yet durable (no fsync of their directory)
    open_handles: int = 0
    writes: int = 0
    fsyncs: int = 0
    fdatasyncs: int = 0
    dirsyncs: int = 0
    rolled_back: int = 0  # cut: namespace operations undone
    torn_pages: int = 0  # cut with torn=...: dirty pages written anyway
    torn_ops_kept: int = 0  # cut with torn=...: un-synced namespace operations kept anyway

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Stats:
        names = {f.name for f in fields(cls)}
        return cls(**{k: int(v) for k, v in d.items() if k in names})


def _package_root() -> str:
    """The directory to put on PYTHONPATH so ``python -m <this package>.server`` imports."""
    depth = len(__package__.split("."))
    return str(Path(__file__).resolve().parents[depth])


class PowerCutFS:
    """A power-cut filesystem over ``backing`` mounted at ``mountpoint`` (a new temporary
    directory if None). ``host_fsync=False`` skips the fsyncs of the backing files (the
    simulation does not need them: the backing directory stands for the disk)."""

    def __init__(
        self,
        backing: str | os.PathLike[str],
        mountpoint: str | os.PathLike[str] | None = None,
        *,
        host_fsync: bool = True,
    ) -> None:
        self.backing = Path(backing).resolve()
        self._own_mountpoint = mountpoint is None
        self._mountpoint = None if mountpoint is None else Path(mountpoint)
        self.host_fsync = host_fsync
        self.cuts = 0
        self._proc: subprocess.Popen[bytes] | None = None
        self._ctl: socket.socket | None = None
        self._rfile: Any = None

    @property
    def mountpoint(self) -> Path:
        if self._mountpoint is None:
            raise PowerCutError("not mounted")
        return self._mountpoint

    @property
    def pid(self) -> int | None:
        """The filesystem process (None when not mounted)."""
        return None if self._proc is None else self._proc.pid

    # -- mounting -------------------------------------------------------------------------------

    def mount(self) -> Path:
        if self._proc is not None:
            raise PowerCutError("already mounted")
        if not self.backing.is_dir():
            raise PowerCutError(f"backing directory {self.backing} does not exist")
        if self._mountpoint is None:
            self._mountpoint = Path(tempfile.mkdtemp(prefix="powercut-mnt-"))
        ours, theirs = socket.socketpair()
        cmd = [sys.executable, "-m", f"{__package__}.server", "--control-fd", str(theirs.fileno())]
        if not self.host_fsync:
            cmd.append("--no-host-fsync")
        cmd += [str(self._mountpoint), str(self.backing)]
        env = dict(os.environ)
        env.setdefault("FUSE_LIBRARY_NAME", "fuse3")  # mfusepy would take libfuse2 if installed
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (_package_root(), env.get("PYTHONPATH")) if p
        )
        try:
            self._proc = subprocess.Popen(
                cmd, pass_fds=(theirs.fileno(),), env=env, stdin=subprocess.DEVNULL
            )
        finally:
            theirs.close()
        self._ctl = ours
        self._rfile = ours.makefile("rb")
        try:
            msg = self._receive(MOUNT_TIMEOUT)
        except PowerCutError:
            self._abandon()
            raise
        if msg.get("event") != "ready":
            self._abandon()
            raise PowerCutError(f"cannot mount {self._mountpoint}: {msg.get('error', msg)}")
        return self._mountpoint

    def _receive(self, timeout: float) -> dict[str, Any]:
        assert self._ctl is not None
        self._ctl.settimeout(timeout)
        try:
            line = self._rfile.readline()
        except TimeoutError as err:
            raise PowerCutError(f"the filesystem process did not answer in {timeout} s") from err
        if not line:
            rc = None if self._proc is None else self._proc.poll()
            raise PowerCutError(f"the filesystem process ended (exit status {rc})")
        return json.loads(line)

    def _request(self, op: str, timeout: float = COMMAND_TIMEOUT, **args: Any) -> dict[str, Any]:
        if self._ctl is None:
            raise PowerCutError("not mounted")
        self._ctl.sendall((json.dumps({"op": op, **args}) + "\n").encode())
        reply = self._receive(timeout)
        if not reply.get("ok"):
            raise PowerCutError(f"{op} failed: {reply.get('error', reply)}")
        return reply

    def _reap(self) -> None:
        """Wait for the filesystem process to exit and forget it."""
        if self._rfile is not None:
            self._rfile.close()
        if self._ctl is not None:
            self._ctl.close()
        self._rfile = self._ctl = None
        if self._proc is not None:
            try:
                self._proc.wait(COMMAND_TIMEOUT)
            finally:
                self._proc = None

    def _abandon(self) -> None:
        """The filesystem process misbehaved: kill it and detach whatever mount it left."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
        self._reap()
        if self._mountpoint is not None:
            subprocess.run(
                ["fusermount3", "-u", "-z", str(self._mountpoint)],
                check=False,
                capture_output=True,
            )

    # -- the API --------------------------------------------------------------------------------

    def stats(self) -> Stats:
        return Stats.from_dict(self._request("stats")["stats"])

    def sync(self) -> Stats:
        """Make everything durable, as sync(1) would; returns the counters from before."""
        return Stats.from_dict(self._request("sync")["stats"])

    def cut(
        self,
        kill: Iterable[int] = (),
        *,
        torn: tuple[int, float] | None = None,
        remount: bool = True,
    ) -> Stats:
        """Cut the power: freeze the filesystem (no operation completes after this), SIGKILL
        ``kill`` (processes using the mount; reaping them is the caller's business), lose every
        write and namespace operation that was not made durable, unmount, and (``remount``)
        mount the backing directory again, so the view is what was durable.

        ``torn=(seed, fraction)`` makes the cut less kind: a random prefix of the un-synced
        namespace operations survives, and about ``fraction`` of the dirty pages that overwrite
        durable data reach the disk. Returns the counters as they were at the cut."""
        reply = self._request("cut", kill=[int(p) for p in kill], torn=torn)
        self._reap()
        self.cuts += 1
        if remount:
            self.mount()
        return Stats.from_dict(reply["stats"])

    def close(self) -> Stats | None:
        """A clean unmount: everything becomes durable (as at a shutdown). Returns the counters
        from before, or None when nothing was mounted."""
        if self._proc is None:
            return None
        try:
            reply = self._request("close")
        except PowerCutError:
            self._abandon()
            raise
        finally:
            self._reap()
            if self._own_mountpoint and self._mountpoint is not None:
                with contextlib.suppress(OSError):  # rmdir: never through a live mount
                    self._mountpoint.rmdir()
                self._mountpoint = None
        return Stats.from_dict(reply["stats"])

    def __enter__(self) -> PowerCutFS:
        self.mount()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
