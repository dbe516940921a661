"""Logs on demand (docs/protocol.md "Remote commands and logs", docs/ops.md): the agent keeps its
recent log lines in a bounded ring in memory and uploads a window of them when an operator sends
the ``logs`` command.

- :class:`LogRing` is a :class:`logging.Handler` on the root logger: the formatted lines
  (``key=value``, as on stderr, which systemd puts in journald) of the last ``[logs] ring_lines``
  records, at most ``ring_bytes`` of text; the oldest go first. journald keeps the long history
  where it runs; the ring is what the agent itself can send, with or without journald (the
  service's sandbox does not let it read the journal).
- With a directory (``DATA/logs``), the ring is also kept on disk, so the lines before a crash
  or a restart can still be sent after it: two segment files of at most ``ring_bytes / 2``
  each, appended line by line (flushed, not fsynced: a process crash keeps every line, a power
  cut may lose the last ones), the older segment truncated and reused when the newer is full.
  Each segment begins with a line ``#gen N``, N one more than the other segment's when it was
  begun: which segment is newer is known from N, not from the wall-clock times of the lines
  (a device without a real-time clock stamps the lines of a boot 1970 until NTP sets the clock;
  the newer segment then ended earlier than the older one, and was truncated after the next
  start). Segments without one (an older release's) are ordered by the time of their last line.
  At start the segments are read back into the ring (a torn or malformed line is skipped, and
  a torn last line is cut off before the segment is appended to); a disk that fails or fills
  stops the writing (the ring goes on in memory) and it is tried again :data:`PERSIST_RETRY`
  lines later.
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
import contextlib
import logging
import math
import os
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from agent.logsetup import SHIPPED
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
#: The ring's directory in the data directory, and its files there (module docstring).
LOG_DIR = "logs"
SEGMENTS = ("ring.0", "ring.1")
#: A segment's first line: this and its generation (module docstring); not a line of the ring.
GEN_MARK = "#gen "
#: Lines after a failed write before the files are tried again.
PERSIST_RETRY = 500


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


def _line_bytes(line: str) -> int:
    return len(line.encode("utf-8", "replace")) + 1


def _generation(first: bytes) -> int:
    """A segment's generation from its first line (``#gen N``); 0 without one."""
    if not first.startswith(GEN_MARK.encode()):
        return 0
    try:
        return max(0, int(first[len(GEN_MARK) :].strip()))
    except ValueError:
        return 0


def parse_segment(data: bytes) -> list[tuple[float, str]]:
    """The ``created<TAB>line`` lines of a segment file; a torn last line (no newline), a bad
    time or an overlong line is skipped."""
    out = []
    for raw in data.split(b"\n")[:-1]:  # the part after the last newline is torn
        stamp, tab, text = raw.decode("utf-8", "replace").partition("\t")
        try:
            created = float(stamp)
        except ValueError:
            continue
        if tab and math.isfinite(created) and len(text) <= LINE_MAX:
            out.append((created, text))
    return out


def _cut_torn_tail(fd: int) -> None:
    """Cut a segment back to its last whole line (a power cut or a full disk may have torn the
    last one), so that the next line appended starts a line of its own."""
    size = os.lseek(fd, 0, os.SEEK_END)
    start = max(0, size - 4 * LINE_MAX - 64)  # more than the longest line a ring writes
    tail = os.pread(fd, size - start, start)
    if tail and not tail.endswith(b"\n"):
        newline = tail.rfind(b"\n")
        os.ftruncate(fd, start + newline + 1 if newline >= 0 else start)


class LogRing(logging.Handler):
    """The last lines logged, bounded by count and by bytes of text; also on disk when given a
    directory (module docstring)."""

    def __init__(self, settings: LogSettings | None = None, directory: Path | None = None) -> None:
        super().__init__(logging.DEBUG)
        self.settings = settings or LogSettings()
        self.setFormatter(logging.Formatter(FORMAT))
        self._lines: collections.deque[tuple[float, str]] = collections.deque()
        self._bytes = 0
        self.dropped = 0  # lines pushed out by the bounds, ever
        self._mutex = threading.Lock()
        self.directory = directory
        self._file: IO[bytes] | None = None
        self._active = 0  # the segment appended to
        self._gen = 0  # the newest segment's generation (its first line, module docstring)
        self._written = 0  # its size
        self._retry = 0  # lines until the files are tried again after a failure
        self.persist_error: str | None = None  # why the files are not written, if they are not
        if directory is not None:
            self._load()

    # -- the files ---------------------------------------------------------------------------

    def _segment_limit(self) -> int:
        return max(LINE_MAX + 64, self.settings.ring_bytes // 2)

    def _load(self) -> None:
        """Read the segments back (older first) and open the newer one for appending."""
        assert self.directory is not None
        found = []
        for i, name in enumerate(SEGMENTS):
            try:
                with open(self.directory / name, "rb") as f:
                    gen = _generation(f.readline(64))
                    self._gen = max(self._gen, gen)
                    size = f.seek(0, os.SEEK_END)
                    start = max(0, size - self._segment_limit() - LINE_MAX - 64)
                    f.seek(start)
                    data = f.read()
                if start > 0:  # a larger file than this ring keeps: from a whole line on
                    data = data[data.find(b"\n") + 1 :] if b"\n" in data else b""
            except FileNotFoundError:
                continue
            except OSError as err:
                self.persist_error = f"{self.directory / name}: {err}"
                continue
            items = parse_segment(data)
            if items:
                found.append((gen, items[-1][0], i, items))
        found.sort()  # by generation, then by the time of its last line: the newest last
        for _, _, _, items in found:
            for created, line in items:
                self._remember(created, line)
        if found:
            self._active = found[-1][2]  # appended to from its end on (_open measures it)
        self._open(truncate=False)

    def _open(self, truncate: bool) -> None:
        assert self.directory is not None
        try:
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            path = self.directory / SEGMENTS[self._active]
            fd = os.open(path, os.O_RDWR | os.O_CREAT | (os.O_TRUNC if truncate else 0), 0o600)
            try:
                _cut_torn_tail(fd)
            except OSError:
                os.close(fd)
                raise
            self._file = os.fdopen(fd, "ab")
            self._written = 0 if truncate else self._file.seek(0, os.SEEK_END)
            if self._written == 0:  # a segment begun: one generation after the other one
                self._gen += 1
                self._file.write(f"{GEN_MARK}{self._gen}\n".encode())
                self._written = self._file.tell()
            self.persist_error = None
        except OSError as err:
            self._failed(err)

    def _close_file(self) -> None:
        if self._file is not None:
            with contextlib.suppress(OSError):
                self._file.close()
            self._file = None

    def _failed(self, err: OSError) -> None:
        self._close_file()
        self._retry = PERSIST_RETRY
        self.persist_error = str(err)

    def _persist(self, created: float, line: str) -> None:
        if self.directory is None:
            return
        if self._file is None:
            self._retry -= 1
            if self._retry > 0:
                return
            self._open(truncate=False)
            if self._file is None:
                return
        data = f"{created!r}\t{line}\n".encode("utf-8", "replace")
        try:
            if self._written + len(data) > self._segment_limit():
                self._close_file()
                self._active = 1 - self._active
                self._open(truncate=True)
                if self._file is None:
                    return
            self._file.write(data)
            self._file.flush()
            self._written += len(data)
        except OSError as err:
            self._failed(err)

    def close(self) -> None:
        with self._mutex:
            self._close_file()
        super().close()

    def emit(self, record: logging.LogRecord) -> None:
        shipped = getattr(record, SHIPPED, None)  # the line that may leave the device
        if isinstance(shipped, str):
            record = logging.makeLogRecord({**record.__dict__, "msg": shipped, "args": None})
        try:
            line = self.format(record).replace("\n", " | ")[:LINE_MAX]
        except Exception:  # a record that does not format must never break the caller
            return
        self.add(record.created, line)

    def add(self, created: float, line: str) -> None:
        with self._mutex:
            self._remember(created, line)
            self._persist(created, line)

    def _remember(self, created: float, line: str) -> None:
        self._lines.append((created, line))
        self._bytes += _line_bytes(line)
        while self._lines and (
            len(self._lines) > self.settings.ring_lines or self._bytes > self.settings.ring_bytes
        ):
            _, old = self._lines.popleft()
            self._bytes -= _line_bytes(old)
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
        n = _line_bytes(item[1])
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


def coap_post(
    transport: Any,
    endpoints: Any,
    device: str,
    lane: int,
    *,
    path: str = LOGS_PATH,
    deadline: float = UPLOAD_DEADLINE,
) -> Any:
    """``post(body)`` over the agent's transport to ``/<path>/<device>`` at its current
    endpoint (the log upload's; the credential rotation's too, agent/sync/rotation.py)."""

    async def post(body: bytes) -> str:
        uri = f"{endpoints.current.rstrip('/')}/{path}/{device}"
        resp = await transport.request(
            "POST",
            uri,
            body,
            content_format=CF_CBOR,
            deadline=deadline,
            lane=lane,
        )
        return str(resp.dotted)

    return post
