"""``edge-agent-cloud serve --processes N``: N endpoint processes on one UDP address.

Every process binds the same address with SO_REUSEPORT (aiocoap's UDP transport sets it), and
the kernel hands each datagram to one socket by a hash of its source and destination address and
port: a device's datagrams keep going to the same process while the set of processes stays the
same, which is what the per-peer CoAP state needs (message deduplication, block-wise transfers,
OSCORE replay windows and Echo). The processes share nothing else but the storage: records,
state and credentials are in the database; a desired-state change made through one process
reaches the process holding the device's observation through the storage
(:meth:`cloud.storage.Storage.changes`); the endpoint's OSCORE sender sequence numbers come
from one counter in the storage (cloud/security.py), so no two processes use one nonce.

This parent process checks that the address is free, starts the workers, waits until each one
listens, and then supervises them: a worker that dies is started again (after a pause that grows
while it keeps dying); its devices are hashed to the other workers meanwhile, where they go
through Echo once and carry on. An ingest is acknowledged only after its commit, so a worker
killed mid-batch loses nothing a device was told is stored. SIGTERM or SIGINT stops every worker
(SIGTERM, then SIGKILL after :data:`STOP_TIMEOUT`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import selectors
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

READY_TIMEOUT = 60.0  # seconds for a worker to listen
STOP_TIMEOUT = 10.0  # seconds between SIGTERM and SIGKILL at stop
RESTART_PAUSE = (0.5, 30.0)  # pause before restarting a worker: first, longest
STABLE_AFTER = 60.0  # a worker that ran this long has its pause reset
READY_LINE = b"ready\n"


class WorkerFailed(RuntimeError):
    """A worker did not start: ``code`` is its exit status (its own error line says why), 0
    when it did not answer in time."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class _Worker:
    index: int
    proc: subprocess.Popen[bytes] | None = None
    ready_fd: int | None = None
    started: float = 0.0
    pause: float = RESTART_PAUSE[0]
    restart_at: float | None = None
    restarts: int = 0
    ready: bool = False
    buffer: bytes = field(default=b"")


class WorkerSet:
    """Starts, watches and stops the worker processes. ``command(index, ready_fd)`` is the argv
    of worker ``index``; the worker writes :data:`READY_LINE` to ``ready_fd`` once it listens."""

    def __init__(self, count: int, command: Callable[[int, int], list[str]]) -> None:
        self._command = command
        self.workers = [_Worker(i) for i in range(count)]
        self._selector = selectors.DefaultSelector()
        self._stopping = False

    # -- starting --------------------------------------------------------------------------------

    def _spawn(self, worker: _Worker) -> None:
        read, write = os.pipe()
        argv = self._command(worker.index, write)
        try:
            worker.proc = subprocess.Popen(argv, pass_fds=(write,), stdin=subprocess.DEVNULL)
        finally:
            os.close(write)
        os.set_blocking(read, False)
        worker.ready_fd, worker.ready, worker.buffer = read, False, b""
        worker.started = time.monotonic()
        worker.restart_at = None
        self._selector.register(read, selectors.EVENT_READ, worker)

    def start(self) -> None:
        """Start every worker and wait until all listen; RuntimeError (all stopped) if one
        exits or stays silent for READY_TIMEOUT."""
        for worker in self.workers:
            self._spawn(worker)
        deadline = time.monotonic() + READY_TIMEOUT
        while not all(w.ready for w in self.workers):
            for worker in self.workers:
                code = worker.proc.poll() if worker.proc is not None else None
                if code is not None and not worker.ready:
                    self.stop()
                    raise WorkerFailed(
                        code, f"worker {worker.index} exited with {code} before it listened"
                    )
            if time.monotonic() > deadline:
                self.stop()
                raise WorkerFailed(0, f"the workers did not listen within {READY_TIMEOUT:.0f} s")
            self._read_ready(0.2)

    def _read_ready(self, timeout: float) -> None:
        for key, _ in self._selector.select(timeout):
            worker: _Worker = key.data
            try:
                chunk = os.read(key.fd, 64)
            except BlockingIOError:
                continue
            if chunk:
                worker.buffer += chunk
                if READY_LINE in worker.buffer:
                    worker.ready = True
            if not chunk or worker.ready:
                self._close_ready(worker)

    def _close_ready(self, worker: _Worker) -> None:
        if worker.ready_fd is not None:
            self._selector.unregister(worker.ready_fd)
            os.close(worker.ready_fd)
            worker.ready_fd = None

    # -- supervising -----------------------------------------------------------------------------

    def pids(self) -> list[int]:
        return [w.proc.pid for w in self.workers if w.proc is not None]

    def watch(self, stop: Callable[[], bool]) -> None:
        """Restart workers that exit until ``stop()`` is true."""
        while not stop():
            self._read_ready(0.2)
            now = time.monotonic()
            for worker in self.workers:
                proc = worker.proc
                if proc is not None and proc.poll() is not None:
                    self._close_ready(worker)
                    ran = now - worker.started
                    if ran >= STABLE_AFTER:
                        worker.pause = RESTART_PAUSE[0]
                    worker.restart_at = now + worker.pause
                    log.error(
                        "event=worker_exited worker=%d pid=%d code=%s ran_s=%.1f "
                        "action=restart_in_%.1fs",
                        worker.index,
                        proc.pid,
                        proc.returncode,
                        ran,
                        worker.pause,
                    )
                    worker.pause = min(worker.pause * 2, RESTART_PAUSE[1])
                    worker.proc = None
                if (
                    worker.proc is None
                    and worker.restart_at is not None
                    and now >= worker.restart_at
                ):
                    worker.restarts += 1
                    self._spawn(worker)
                    assert worker.proc is not None
                    log.info(
                        "event=worker_restarted worker=%d pid=%d", worker.index, worker.proc.pid
                    )

    def stop(self) -> None:
        """SIGTERM every worker, SIGKILL those still running after STOP_TIMEOUT."""
        self._stopping = True
        procs = [w.proc for w in self.workers if w.proc is not None]
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT
        for proc in procs:
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("event=worker_killed pid=%d reason=stop_timeout", proc.pid)
                proc.kill()
                proc.wait()
        for worker in self.workers:
            self._close_ready(worker)
            worker.proc = None
        self._selector.close()


def run(count: int, command: Callable[[int, int], list[str]], announce: Callable[[], None]) -> int:
    """Run ``count`` workers until SIGTERM/SIGINT; ``announce()`` once all listen. Exit 0."""
    stopping = False

    def on_signal(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    old = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    workers = WorkerSet(count, command)
    try:
        workers.start()
        announce()
        workers.watch(lambda: stopping)
    finally:
        workers.stop()
        for sig, handler in old.items():
            signal.signal(sig, handler)
    return 0


def signal_ready(fd: int | None) -> None:
    """In a worker: tell the parent it listens (``--ready-fd``)."""
    if fd is None:
        return
    try:
        os.write(fd, READY_LINE)
    except OSError as err:
        print(f"warning: cannot tell the parent it listens: {err}", file=sys.stderr)
    finally:
        with contextlib.suppress(OSError):
            os.close(fd)
