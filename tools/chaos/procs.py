"""The processes a chaos run starts: :class:`Managed` runs one long-lived process (the endpoint or
an agent), one log file per start, and tells the exits the harness caused from the ones it did
not (:class:`Crash`): an exit nobody asked for, a nonzero exit after SIGTERM, a process that does
not come up, a restart loop.

Every start of a process writes its stdout and stderr to ``LOGDIR/NAME-NN.log``; the harness
reads the committed sequence numbers, the salvage lines and the tracebacks from those files.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
STOP_TIMEOUT = 30.0  # seconds a SIGTERMed process may take to exit
RESTART_PAUSE = 1.0  # seconds before a process that died on its own is started again
MAX_UNASKED_EXITS = 5  # exits nobody asked for before the harness stops restarting (a loop)
POLL = 0.1  # seconds between looks at a log file


@dataclass(frozen=True)
class Crash:
    """A process exit (or a start) that the harness did not cause or that went wrong."""

    name: str
    run: int  # which start of the process (its log is NAME-NN.log)
    what: str  # "exited", "stop failed", "did not start", "restart loop"
    returncode: int | None
    log: Path

    def describe(self) -> str:
        status = f"exit status {self.returncode}"
        return f"{self.name} run {self.run}: {self.what} ({status}), {self.log}"


class Managed:
    """One process, started as often as the harness likes. ``ready`` is a text its log shows once
    it is up; ``argv(run)`` the command line of the ``run``-th start."""

    def __init__(
        self,
        name: str,
        argv: Callable[[int], Sequence[str]],
        logdir: Path,
        ready: str,
        crashes: list[Crash],
        *,
        start_timeout: float = 30.0,
        restart_unasked: bool = True,
    ) -> None:
        self.name = name
        self._argv = argv
        self.logdir = logdir
        self.ready = ready
        self.crashes = crashes
        self.start_timeout = start_timeout
        self.restart_unasked = restart_unasked
        self.runs = 0
        self.logs: list[Path] = []
        self.proc: asyncio.subprocess.Process | None = None
        self.lock = asyncio.Lock()
        self._asked: set[int] = set()  # pids the harness signalled (or power-cut)
        self._watches: list[asyncio.Task[None]] = []
        self._unasked = 0
        self._closed = False

    @property
    def pid(self) -> int | None:
        return None if self.proc is None else self.proc.pid

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    @property
    def log(self) -> Path:
        return self.logs[-1]

    # -- lifecycle (each under the lock) ---------------------------------------------------------

    async def start(self) -> bool:
        """Start the process and wait for its ready line; False (and a crash) if it does not."""
        async with self.lock:
            return await self._start()

    async def _start(self) -> bool:
        self.runs += 1
        log = self.logdir / f"{self.name}-{self.runs:02d}.log"
        self.logs.append(log)
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        with log.open("ab") as out:
            self.proc = await asyncio.create_subprocess_exec(
                *self._argv(self.runs),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                cwd=ROOT,
                env=env,
            )
        self._watches.append(asyncio.create_task(self._watcher(self.proc, self.runs, log)))
        if await self._wait_ready(self.proc, log):
            return True
        if self.proc.returncode is None:  # alive but silent: not a working process
            self.crashes.append(Crash(self.name, self.runs, "did not start", None, log))
            self._asked.add(self.proc.pid)
            self.proc.kill()
            await self.proc.wait()
        return False

    async def _wait_ready(self, proc: asyncio.subprocess.Process, log: Path) -> bool:
        deadline = asyncio.get_running_loop().time() + self.start_timeout
        while asyncio.get_running_loop().time() < deadline:
            if _contains(log, self.ready):
                return True
            if proc.returncode is not None:
                return False  # the watcher counted it
            await asyncio.sleep(POLL)
        return False

    async def _watcher(self, proc: asyncio.subprocess.Process, run: int, log: Path) -> None:
        code = await proc.wait()
        if proc.pid in self._asked or self._closed:
            return
        self._unasked += 1
        self.crashes.append(Crash(self.name, run, "exited", code, log))
        if not self.restart_unasked:
            return
        if self._unasked > MAX_UNASKED_EXITS:
            self.crashes.append(Crash(self.name, run, "restart loop", code, log))
            return
        await asyncio.sleep(RESTART_PAUSE)
        async with self.lock:
            if self.proc is proc and not self._closed:
                await self._start()

    async def kill(self) -> bool:
        """SIGKILL; False if it was not running."""
        async with self.lock:
            return await self._signal(signal.SIGKILL)

    async def _signal(self, sig: int) -> bool:
        if not self.running:
            return False
        assert self.proc is not None
        self._asked.add(self.proc.pid)
        self.proc.send_signal(sig)
        await self.proc.wait()
        return True

    async def restart_after(self, kill: Callable[[list[int]], object]) -> bool:
        """Let ``kill(pids)`` (run in a thread) end the process, as a power cut does; reap it and
        start it again. ``pids`` is empty when the process was not running."""
        async with self.lock:
            if self.running:
                assert self.proc is not None
                self._asked.add(self.proc.pid)
                await asyncio.to_thread(kill, [self.proc.pid])
                await self.proc.wait()
            else:
                await asyncio.to_thread(kill, [])
            return await self._start()

    async def stopped_for(self, work: Callable[[], object]) -> bool:
        """SIGTERM (a crash if it does not exit 0), run ``work()`` in a thread while the process
        is down, start it again."""
        async with self.lock:
            await self._terminate()
            try:
                await asyncio.to_thread(work)
            finally:
                started = await self._start()
            return started

    async def kill_and_start(self) -> bool:
        async with self.lock:
            await self._signal(signal.SIGKILL)
            return await self._start()

    async def terminate(self) -> int | None:
        """SIGTERM and wait; a nonzero exit (or none within STOP_TIMEOUT) is a crash."""
        async with self.lock:
            return await self._terminate()

    async def _terminate(self) -> int | None:
        if not self.running:
            return None
        assert self.proc is not None
        self._asked.add(self.proc.pid)
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = await asyncio.wait_for(self.proc.wait(), STOP_TIMEOUT)
        except TimeoutError:
            self.crashes.append(Crash(self.name, self.runs, "stop failed (hung)", None, self.log))
            self.proc.kill()
            return await self.proc.wait()
        if code != 0:
            self.crashes.append(Crash(self.name, self.runs, "stop failed", code, self.log))
        return code

    async def close(self) -> None:
        """Stop for good (SIGKILL if still running); used on the way out, also after errors."""
        self._closed = True
        for task in self._watches:  # a watcher may be restarting the process: stop that first
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self.running:
            assert self.proc is not None
            self._asked.add(self.proc.pid)
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
            await self.proc.wait()


def _contains(log: Path, text: str) -> bool:
    try:
        return text in log.read_text(errors="replace")
    except OSError:
        return False


def python(*args: str) -> list[str]:
    """A command line running this interpreter."""
    return [sys.executable, *args]
