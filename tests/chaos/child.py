"""A worker process of the power-cut tests and the lines it reported on its pipe (not a test
module itself). Workers report one event per line, each in one os.write shorter than PIPE_BUF,
so a SIGKILL at any moment never leaves half a line."""

from __future__ import annotations

import multiprocessing
import os
import select
import signal
import time
from collections.abc import Callable
from typing import Any


class Child:
    def __init__(
        self, ctx: multiprocessing.context.BaseContext, target: Callable[..., None], *args: Any
    ) -> None:
        self.reader, writer = ctx.Pipe(duplex=False)
        self.proc = ctx.Process(target=target, args=(writer, *args))  # type: ignore[attr-defined]
        self.proc.start()
        writer.close()
        self.buf = b""
        self.lines: list[tuple[str, list[str]]] = []

    @property
    def pid(self) -> int:
        return int(self.proc.pid)

    def _take(self, data: bytes) -> None:
        self.buf += data
        *complete, self.buf = self.buf.split(b"\n")
        for raw in complete:
            tag, *values = raw.decode().split()
            self.lines.append((tag, values))

    def read_for(self, seconds: float, until: str | None = None) -> None:
        """Collect output for ``seconds``, or until a line tagged ``until`` arrives."""
        fd = self.reader.fileno()
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            if not select.select([fd], [], [], left)[0]:
                break
            data = os.read(fd, 65536)
            if not data:
                break
            self._take(data)
            if until is not None and self.saw(until):
                return

    def reap(self, timeout: float = 30.0) -> None:
        """After the cut killed it: wait for it to die and read the rest of its pipe."""
        self.proc.join(timeout)
        assert self.proc.exitcode == -signal.SIGKILL, f"exit code {self.proc.exitcode}"
        fd = self.reader.fileno()
        while select.select([fd], [], [], 0)[0]:
            data = os.read(fd, 65536)
            if not data:
                break
            self._take(data)
        self.reader.close()
        assert self.buf == b"", "a line was cut by the kill"

    def kill(self) -> None:
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(30)

    def saw(self, tag: str) -> bool:
        return any(t == tag for t, _ in self.lines)

    def tagged(self, tag: str) -> list[list[str]]:
        return [values for t, values in self.lines if t == tag]
