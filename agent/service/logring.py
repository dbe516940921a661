"""Logs on demand (docs/protocol.md "Remote commands and logs", docs/ops.md): the agent keeps its
recent log lines in a bounded ring in memory and uploads a window of them when an operator sends
the ``logs`` command.

- :class:`LogRing` is a :class:`logging.Handler` on the root logger: the formatted lines
  (``key=value``, as on stderr, which systemd puts in journald) of the last ``[logs] ring_lines``
  records, at most ``ring_bytes`` of text; the oldest go first. journald keeps the long history
  where it runs; the ring is what the agent itself can send, with or without journald.
- :class:`LogUploader` sends the lines since a time: the newest that fit
  :data:`UPLOAD_TEXT_BYTES` (older ones are left out and counted), zlib-compressed, in one CBOR
  body, ``POST /logs/<device>`` (Block1 when it is larger than a block). It is the lowest
  priority on the link: it waits until the store holds no alert and no uplink batch is in
  flight, so it never delays telemetry or alerts (at most :data:`IDLE_WAIT` seconds, then it
  reports that the link stayed busy).

The upload body is :mod:`agent.wire.logupload`'s.
"""

from __future__ import annotations

import collections
import logging
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from agent.wire.batch import CF_CBOR
from agent.wire.logupload import UPLOAD_TEXT_BYTES, encode_upload
from drivers.base import Options

DEFAULT_RING_LINES = 2000
DEFAULT_RING_BYTES = 256 * 1024
#: A line longer than this is cut (one hostile value in a log line costs only its line).
LINE_MAX = 2048
#: Seconds an upload waits for an idle link (no alert queued, no batch in flight).
IDLE_WAIT = 600.0
IDLE_POLL = 0.5
UPLOAD_DEADLINE = 120.0
LOGS_PATH = "logs"


@dataclass(frozen=True)
class LogSettings:
    """``[logs]``: the bounds of the in-memory ring of recent log lines."""

    ring_lines: int = DEFAULT_RING_LINES
    ring_bytes: int = DEFAULT_RING_BYTES

    @classmethod
    def from_options(cls, opts: Options) -> LogSettings:
        """Validate the ``[logs]`` table (errors name the key) and call ``opts.finish()``."""
        lines = opts.integer("ring_lines", DEFAULT_RING_LINES, minimum=10, maximum=1_000_000)
        size = opts.integer("ring_bytes", DEFAULT_RING_BYTES, minimum=4096, maximum=64 << 20)
        opts.finish()
        return cls(lines, size)


FORMAT = "%(asctime)s level=%(levelname)s logger=%(name)s %(message)s"


class LogRing(logging.Handler):
    """The last lines logged, bounded by count and by bytes of text."""

    def __init__(self, settings: LogSettings | None = None) -> None:
        super().__init__(logging.DEBUG)
        self.settings = settings or LogSettings()
        self.setFormatter(logging.Formatter(FORMAT))
        self._lines: collections.deque[tuple[float, str]] = collections.deque()
        self._bytes = 0
        self.dropped = 0  # lines pushed out by the bounds, ever
        self._mutex = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record).replace("\n", " | ")[:LINE_MAX]
        except Exception:  # a record that does not format must never break the caller
            return
        self.add(record.created, line)

    def add(self, created: float, line: str) -> None:
        size = len(line.encode("utf-8", "replace")) + 1
        with self._mutex:
            self._lines.append((created, line))
            self._bytes += size
            while self._lines and (
                len(self._lines) > self.settings.ring_lines
                or self._bytes > self.settings.ring_bytes
            ):
                _, old = self._lines.popleft()
                self._bytes -= len(old.encode("utf-8", "replace")) + 1
                self.dropped += 1

    def __len__(self) -> int:
        return len(self._lines)

    @property
    def bytes(self) -> int:
        return self._bytes

    def since(self, when: float | None) -> list[tuple[float, str]]:
        """The lines logged at or after ``when`` (all with None), oldest first."""
        with self._mutex:
            kept = list(self._lines)
        return kept if when is None else [item for item in kept if item[0] >= when]


def window(
    lines: list[tuple[float, str]], limit: int = UPLOAD_TEXT_BYTES
) -> tuple[list[tuple[float, str]], int]:
    """The newest of ``lines`` whose text fits ``limit`` bytes, and how many were left out."""
    kept: list[tuple[float, str]] = []
    size = 0
    for item in reversed(lines):
        n = len(item[1].encode("utf-8", "replace")) + 1
        if size + n > limit:
            break
        kept.append(item)
        size += n
    kept.reverse()
    return kept, len(lines) - len(kept)


class LogUploader:
    """Uploads a window of the ring when the link is idle (the ``logs`` command's action).

    ``alerts_queued()`` and ``uplink_busy()`` say whether the link has anything of higher
    priority; ``post(path, body)`` sends (an exception or a result code other than 2.xx is a
    failure)."""

    def __init__(
        self,
        ring: LogRing,
        *,
        alerts_queued: Callable[[], Awaitable[int]],
        uplink_busy: Callable[[], bool],
        post: Callable[[bytes], Awaitable[str]],
        sleep: Callable[[float], Awaitable[None]],
        monotonic: Callable[[], float],
    ) -> None:
        self.ring = ring
        self.alerts_queued = alerts_queued
        self.uplink_busy = uplink_busy
        self.post = post
        self.sleep = sleep
        self.monotonic = monotonic

    async def _idle(self) -> bool:
        deadline = self.monotonic() + IDLE_WAIT
        while True:
            if not self.uplink_busy() and not await self.alerts_queued():
                return True
            if self.monotonic() >= deadline:
                return False
            await self.sleep(IDLE_POLL)

    async def upload(self, since: float | None) -> dict[str, Any]:
        """Send the lines since ``since``; the command's result (``error`` when it failed)."""
        if not await self._idle():
            return {"error": f"the link stayed busy for {IDLE_WAIT:g} s: alerts first"}
        lines, left_out = window(self.ring.since(since))
        body = encode_upload(since, lines, left_out)
        try:
            code = await self.post(body)
        except Exception as err:  # a transport failure is the command's result
            return {"error": (str(err) or type(err).__name__)[:200]}
        if not code.startswith("2."):
            return {"error": f"the endpoint answered {code}"}
        return {"lines": len(lines), "left_out": left_out, "bytes": len(body)}


def coap_post(transport: Any, endpoints: Any, device: str, lane: int) -> Any:
    """``post(body)`` over the agent's transport to its current endpoint."""

    async def post(body: bytes) -> str:
        uri = f"{endpoints.current.rstrip('/')}/{LOGS_PATH}/{device}"
        resp = await transport.request(
            "POST",
            uri,
            body,
            content_format=CF_CBOR,
            deadline=UPLOAD_DEADLINE,
            lane=lane,
        )
        return str(resp.dotted)

    return post
