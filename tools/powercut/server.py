"""The filesystem process: mounts the power-cut filesystem and obeys its control socket.

Started by :class:`~.client.PowerCutFS` as ``python -m <package>.server --control-fd N MOUNTPOINT
BACKING``. It runs libfuse's loop in the main thread and reads commands, one JSON object a line,
on the control socket in another; each gets one JSON line back. It says ``{"event": "ready"}``
when the kernel has the mount.

- ``stats``: the counters.
- ``sync``: make everything durable, as sync(1) would.
- ``cut`` (``kill``: pids, ``torn``: [seed, fraction] or null): freeze, SIGKILL the pids, lose
  what was not durable, detach the mount, answer, and exit (closing /dev/fuse aborts the
  connection, so requests that were waiting, and the killed processes blocked in them, end).
- ``close``: freeze, make everything durable, detach the mount, answer, and exit.

End of file on the control socket (the controlling process died) is a cut with no kills, so no
mount is left behind.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
from typing import Any

from .ops import PowerCutFUSE, PowerCutOps

log = logging.getLogger(__name__)

MNT_DETACH = 2


def detach(mountpoint: str) -> None:
    """Lazy unmount: the name goes now, the superblock when its last user lets go."""
    if os.geteuid() == 0:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.umount2(os.fsencode(mountpoint), MNT_DETACH) == 0:
            return
        log.warning("event=umount_failed mountpoint=%s errno=%d", mountpoint, ctypes.get_errno())
    subprocess.run(["fusermount3", "-u", "-z", mountpoint], check=False)


class Server:
    def __init__(self, ops: PowerCutOps, mountpoint: str, control: socket.socket) -> None:
        self.ops = ops
        self.mountpoint = mountpoint
        self.control = control
        self._send_lock = threading.Lock()
        self.stopping = threading.Event()  # a cut or close is detaching the mount

    def send(self, obj: dict[str, Any]) -> None:
        with self._send_lock, contextlib.suppress(OSError):
            self.control.sendall((json.dumps(obj) + "\n").encode())

    def control_loop(self) -> None:
        with self.control.makefile("rb") as rfile:
            for line in rfile:
                cmd = json.loads(line)
                try:
                    self.handle(cmd)
                except Exception as err:  # reported to the client, which raises it
                    log.exception("event=control_failed op=%s", cmd.get("op"))
                    self.send({"ok": False, "error": f"{type(err).__name__}: {err}"})
                    if cmd.get("op") in ("cut", "close"):  # frozen: never leave a dead mount
                        detach(self.mountpoint)
                        self.stop()
        try:
            self.cut([], None)  # the controlling process is gone: leave no mount behind
        finally:
            detach(self.mountpoint)
            self.stop()

    def handle(self, cmd: dict[str, Any]) -> None:
        op = cmd.get("op")
        if op == "stats":
            self.send({"ok": True, "stats": self.ops.stats()})
        elif op == "sync":
            self.send({"ok": True, "stats": self.ops.sync_all()})
        elif op == "cut":
            torn = cmd.get("torn")
            stats = self.cut(
                cmd.get("kill") or [], (int(torn[0]), float(torn[1])) if torn else None
            )
            self.send({"ok": True, "stats": stats})
            self.stop()
        elif op == "close":
            self.stopping.set()
            self.ops.freeze()
            stats = self.ops.final_sync()
            detach(self.mountpoint)
            self.ops.finish()
            self.send({"ok": True, "stats": stats})
            self.stop()
        else:
            raise ValueError(f"unknown command {op!r}")

    def cut(self, kill: list[int], torn: tuple[int, float] | None) -> dict[str, int]:
        self.stopping.set()
        self.ops.freeze()
        for pid in kill:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        stats = self.ops.power_cut(torn)
        detach(self.mountpoint)
        self.ops.finish()
        return stats

    def stop(self) -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)  # libfuse's threads may be blocked in the frozen filesystem: do not join them


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="powercut-server")
    parser.add_argument("--control-fd", type=int, required=True)
    parser.add_argument("--no-host-fsync", action="store_true")
    parser.add_argument("mountpoint")
    parser.add_argument("backing")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="powercut-server: %(message)s")
    os.umask(0)  # the kernel has applied the caller's umask to every mode it sends
    control = socket.socket(fileno=args.control_fd)
    ops = PowerCutOps(args.backing, host_fsync=not args.no_host_fsync)
    server = Server(ops, args.mountpoint, control)
    ops.on_init = lambda: server.send({"event": "ready", "pid": os.getpid()})
    threading.Thread(target=server.control_loop, name="powercut-control", daemon=True).start()
    try:
        PowerCutFUSE(
            ops,
            args.mountpoint,
            foreground=True,
            hard_remove=True,  # unlink an open file for real, not as a .fuse_hidden rename
            use_ino=True,
            max_idle_threads=4,  # libfuse 3.14 warns about its own default otherwise
            fsname=f"powercut:{ops.root}",
            subtype="powercut",
        )
    except Exception as err:
        if not server.stopping.is_set():
            server.send({"event": "error", "error": f"{type(err).__name__}: {err}"})
            return 1
    if server.stopping.is_set():  # the control thread answers and ends the process
        threading.Event().wait()
    server.send({"event": "exited"})
    return 0


if __name__ == "__main__":
    sys.exit(main())
