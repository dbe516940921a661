"""A line-based ASCII serial sensor: ``key=value`` pairs on one line, optional XOR checksum.

A line looks like ``T=79.34,P=1.021*23\\r\\n``: pairs separated by commas or spaces, then
optionally ``*HH``, the NMEA 0183-style checksum: the XOR of every byte before the ``*`` (a leading
``$``, as NMEA sentences have, is left out), as two hex digits.

Two ways to get a line (option ``mode``):

- ``"stream"``: the sensor sends lines on its own every ``period`` seconds. A read takes the
  newest complete line in the input buffer and drops the older ones, so a slow reader is never
  behind; the first bytes after opening (or after a timeout) are a partial line and are skipped.
  What has arrived is taken without waiting; :data:`BEHIND_BYTES` of it or more means the reader
  is behind the stream (the kernel hands over at most 4 KiB at once, its oldest), so it is
  dropped and the read takes the next whole line instead.
- ``"poll"``: a read flushes the input, sends ``command`` (default ``"R\\r\\n"``) and reads
  one line.

Options (``[sensor.options]``):

- ``keys`` (required): the keys to report, in order. Each becomes one channel: an entry names a
  wire key (``"T"``) or the channel it is renamed to (``"temperature_c"``);
- ``rename``: table wire key -> channel name (``{T = "temperature_c"}``); a key not renamed is
  its own channel name;
- ``checksum``: ``"none"`` (never checked; a ``*HH`` suffix is ignored), ``"xor"`` (required and
  checked), ``"optional"`` (checked when present); default ``"optional"``;
- ``mode``: ``"stream"`` or ``"poll"``, default ``"poll"``; ``command``: the poll command;
- ``period``: the sensor's streaming period, seconds, default 1.0 (stream mode);
- ``timeout``: seconds to wait for a line; default 1.0 in poll mode and three periods in
  stream mode, where it must exceed two periods (after opening or a timeout, a read skips a
  partial line and then waits for a whole one);
- ``resolution``: table channel -> smallest step in the channel's unit, default 0.01.
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from drivers.base import BaseDriver, Identity, Options
from drivers.bus import AsyncSerial
from drivers.errors import DeviceDataError, DeviceNotFound, DeviceTimeout

logger = logging.getLogger(__name__)

#: Timing defaults (seconds); tests shorten them through the options.
POLL_TIMEOUT = 1.0
STREAM_PERIOD = 1.0
DEFAULT_COMMAND = "R\r\n"
DEFAULT_RESOLUTION = 0.01
#: Longest line accepted, bytes (a stream of garbage without a newline is not a line).
MAX_LINE = 256
#: Longest single blocking call on the port's worker thread, seconds.
HOP = 1.0
#: Stream input waiting at a read from which the reader counts as behind: Linux hands a reader
#: at most 4095 bytes at once (its tty buffer), the oldest; the newest lines may wait behind
#: them, or have been lost when the input overflowed.
BEHIND_BYTES = 2048

CHECKSUM_MODES = ("none", "xor", "optional")
MODES = ("stream", "poll")

_CHANNEL_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,62}$")
_WIRE_KEY = re.compile(r"^[A-Za-z0-9_.\-]{1,32}$")
_SEPARATORS = re.compile(r"[,\s]+")
_HEX2 = re.compile(r"^[0-9A-Fa-f]{2}$")
#: A value on the wire: a decimal number, optionally with an exponent (no 1_0, nan, inf, 0x1p3).
_NUMBER = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")


class LineError(ValueError):
    """A line that is malformed or fails its checksum."""


# --------------------------------------------------------------------------------------------
# Pure line handling


def xor_checksum(data: bytes) -> int:
    """XOR of ``data``'s bytes (NMEA 0183 style)."""
    value = 0
    for byte in data:
        value ^= byte
    return value


def format_line(
    pairs: Sequence[tuple[str, str]], *, checksum: bool = True, separator: str = ","
) -> bytes:
    """``k=v`` pairs as one line, with ``*HH`` when ``checksum``, ending in CR LF."""
    body = separator.join(f"{k}={v}" for k, v in pairs).encode("ascii")
    if checksum:
        body += b"*%02X" % xor_checksum(body)
    return body + b"\r\n"


def parse_fields(line: bytes, checksum: str = "optional") -> dict[str, str]:
    """Split one line (with or without its line end) into ``{key: value}`` strings.

    ``checksum`` is one of :data:`CHECKSUM_MODES`. Raises LineError.
    """
    text_bytes = line.rstrip(b"\r\n")
    if not text_bytes.strip():
        raise LineError("empty line")
    if b"*" in text_bytes:
        body, _, given = text_bytes.rpartition(b"*")
        if checksum != "none":
            given_text = given.decode("ascii", "replace").strip()
            if not _HEX2.match(given_text):
                raise LineError(f"checksum field {given!r} is not two hex digits")
            summed = body[1:] if body.startswith(b"$") else body
            if int(given_text, 16) != xor_checksum(summed):
                raise LineError(
                    f"checksum mismatch: line carries {given_text.upper()}, "
                    f"computed {xor_checksum(summed):02X}"
                )
    else:
        if checksum == "xor":
            raise LineError("no *HH checksum at the end of the line")
        body = text_bytes
    if body.startswith(b"$"):
        body = body[1:]
    try:
        text = body.decode("ascii")
    except UnicodeDecodeError:
        raise LineError(f"non-ASCII bytes in {body!r}") from None
    fields: dict[str, str] = {}
    for token in _SEPARATORS.split(text.strip()):
        key, eq, value = token.partition("=")
        if not eq or not key or not value or "=" in value:
            raise LineError(f"{token!r} is not key=value")
        if key in fields:
            raise LineError(f"key {key!r} appears twice")
        fields[key] = value
    return fields


def extract(fields: Mapping[str, str], keys: Sequence[LineKey]) -> dict[str, float]:
    """The configured keys' values as numbers, by channel. Raises LineError."""
    values: dict[str, float] = {}
    for key in keys:
        text = fields.get(key.wire)
        if text is None:
            present = ", ".join(fields) or "none"
            raise LineError(f"key {key.wire!r} is missing (keys in the line: {present})")
        if not _NUMBER.fullmatch(text):  # float() would also take 1_0, nan, inf and spaces
            raise LineError(f"{key.wire}={text!r} is not a number")
        value = float(text)
        if not math.isfinite(value):  # 1e999
            raise LineError(f"{key.wire}={text!r} is not a finite number")
        values[key.channel] = value
    return values


class LineBuffer:
    """Assembles received bytes into lines for stream mode (pure, no I/O).

    :meth:`feed` bytes as they arrive; :meth:`newest` pops the newest complete line and drops the
    older ones. Until the first line end after a :meth:`resync`, bytes are a partial line and
    are skipped.
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        self._synced = False

    def resync(self) -> None:
        self._buf.clear()
        self._synced = False

    def feed(self, data: bytes) -> None:
        if not self._synced:
            end = data.find(b"\n")
            if end < 0:
                return
            data = data[end + 1 :]
            self._synced = True
        self._buf += data
        if len(self._buf) > MAX_LINE and b"\n" not in self._buf[-MAX_LINE:]:
            # a run of bytes with no line end: not a line; wait for the next line end
            self.resync()

    def newest(self) -> bytes | None:
        """The newest complete non-blank line (None if there is none); older ones are dropped."""
        end = self._buf.rfind(b"\n")
        if end < 0:
            return None
        complete = bytes(self._buf[: end + 1])
        del self._buf[: end + 1]
        for line in reversed(complete.splitlines(keepends=True)):
            if line.strip():
                return line
        return None

    @property
    def pending(self) -> int:
        return len(self._buf)


# --------------------------------------------------------------------------------------------
# Options


@dataclass(frozen=True, slots=True)
class LineKey:
    wire: str  # the key in the line
    channel: str  # the channel it is reported as
    resolution: float = DEFAULT_RESOLUTION


@dataclass(frozen=True)
class LineOptions:
    keys: tuple[LineKey, ...]
    checksum: str = "optional"
    mode: str = "poll"
    command: bytes = DEFAULT_COMMAND.encode("ascii")
    period: float = STREAM_PERIOD
    timeout: float = POLL_TIMEOUT


def parse_line_options(opts: Options) -> LineOptions:
    entries = opts.strings("keys")
    if not entries:
        raise opts.error("keys", "list at least one key")
    rename_t = opts.table("rename")
    rename: dict[str, str] = {}
    for wire in rename_t.raw:
        if not _WIRE_KEY.match(wire):
            raise rename_t.error(wire, f"{wire!r} is not a key a line can carry")
        channel = rename_t.string(wire)
        if not _CHANNEL_NAME.match(channel):
            raise rename_t.error(wire, f"{channel!r} must be a letter then letters, digits, '_'")
        rename[wire] = channel
    rename_t.finish()
    renamed_from = {channel: wire for wire, channel in rename.items()}

    pairs: list[tuple[str, str]] = []
    for i, entry in enumerate(entries):
        key = f"keys[{i}]"
        if entry in rename:
            wire, channel = entry, rename[entry]
        elif entry in renamed_from:
            wire, channel = renamed_from[entry], entry
        else:
            if not _WIRE_KEY.match(entry):
                raise opts.error(key, f"{entry!r} is not a key a line can carry")
            if not _CHANNEL_NAME.match(entry):
                raise opts.error(key, f"{entry!r} is not a channel name: add it to rename")
            wire, channel = entry, entry
        for j, (w, c) in enumerate(pairs):
            if w == wire or c == channel:
                raise opts.error(key, f"{entry!r} repeats keys[{j}] ({w} -> {c})")
        pairs.append((wire, channel))
    used = {w for w, _ in pairs}
    for wire in rename:
        if wire not in used:
            raise rename_t.error(wire, f"{wire!r} is not in keys")

    checksum = opts.choice("checksum", "optional", CHECKSUM_MODES)
    mode = opts.choice("mode", "poll", MODES)
    command = opts.string("command", DEFAULT_COMMAND)
    if not command:
        raise opts.error("command", "is empty")
    try:
        command_bytes = command.encode("ascii")
    except UnicodeEncodeError:
        raise opts.error("command", f"{command!r} is not ASCII") from None
    if mode == "stream" and opts.has("command"):
        raise opts.error("command", "applies to mode = 'poll' only")
    period = opts.number("period", STREAM_PERIOD, above=0.0, maximum=3600.0)
    if mode == "poll" and opts.has("period"):
        raise opts.error("period", "applies to mode = 'stream' only")
    default_timeout = 3.0 * period if mode == "stream" else POLL_TIMEOUT
    timeout = opts.number("timeout", default_timeout, above=0.0, maximum=3.0 * 3600.0)
    if mode == "stream" and timeout <= 2.0 * period:
        raise opts.error(
            "timeout",
            f"{timeout:g} s must exceed two periods ({2.0 * period:g} s): a read may have to "
            "skip a partial line before a whole one",
        )

    res_t = opts.table("resolution")
    channels = [c for _, c in pairs]
    resolution = {c: res_t.number(c, above=0.0) for c in res_t.raw}
    for c in resolution:
        if c not in channels:
            raise res_t.error(c, f"{c!r} is not one of the channels ({', '.join(channels)})")
    res_t.finish()
    opts.finish()
    keys = tuple(LineKey(w, c, resolution.get(c, DEFAULT_RESOLUTION)) for w, c in pairs)
    return LineOptions(keys, checksum, mode, command_bytes, period, timeout)


# --------------------------------------------------------------------------------------------
# The driver


class LineSensor(BaseDriver):
    """An ASCII ``key=value`` sensor on a serial port, polled or streaming."""

    part: ClassVar[str] = "line"
    transport: ClassVar[str] = "serial"

    def __init__(self, port: AsyncSerial, options: LineOptions | None = None) -> None:
        self.port = port
        self.options = options if options is not None else parse_line_options(Options({}))
        self._resolution = {k.channel: k.resolution for k in self.options.keys}
        self._buffer = LineBuffer()

    def __str__(self) -> str:
        return f"{self.port.name} ({self.options.mode})"

    @classmethod
    def parse_options(cls, opts: Options) -> LineOptions:
        return parse_line_options(opts)

    @classmethod
    def channels_for(cls, options: Any) -> tuple[str, ...]:
        return tuple(k.channel for k in options.keys)

    async def open(self) -> Identity:
        """Read one line and check that it carries the configured keys."""
        self._buffer.resync()
        await self.port.transact(lambda p: p.reset_input_buffer())
        try:
            values = await self.read()
        except DeviceTimeout as err:
            raise DeviceNotFound(
                f"{err}; check wiring, power, the baud rate and the sensor's mode"
            ) from err
        except DeviceDataError as err:
            raise DeviceNotFound(
                f"{err}; check the baud rate and [sensor.options] (keys, checksum)"
            ) from err
        wire = ", ".join(k.wire for k in self.options.keys)
        logger.info("line open device=%s keys=%s", self, wire)
        noun = "key" if len(values) == 1 else "keys"
        return Identity(self.part, f"{self.options.mode} sensor at {self.port.name}: {noun} {wire}")

    async def read(self) -> dict[str, float]:
        # The line timeout runs on real time: the wait is real I/O, whatever clock the agent uses.
        deadline = time.monotonic() + self.options.timeout
        if self.options.mode == "poll":
            line = await self._poll_line(deadline)
        else:
            line = await self._stream_line(deadline)
        try:
            return extract(parse_fields(line, self.options.checksum), self.options.keys)
        except LineError as err:
            raise DeviceDataError(f"{self}: {err} in {line!r}") from err

    def longest_attempt(self) -> float:
        """An open reads one line and the read after it another: each may wait its timeout."""
        return 2 * self.options.timeout

    def resolution(self, channel: str) -> float:
        try:
            return self._resolution[channel]
        except KeyError:
            raise KeyError(f"{channel!r} is not a channel of {self}") from None

    # Each wait is cut into port-thread hops of at most HOP seconds, so a long line timeout never
    # runs into the port's own per-call deadline (drivers.bus.AsyncSerial).
    async def _poll_line(self, deadline: float) -> bytes:
        line = await self.port.transact(lambda p: self._ask(p, deadline))
        while True:
            if line.endswith(b"\n") and not line.strip():
                line = b""  # a blank line (some sensors answer CR LF first) is not the answer
            if line.endswith(b"\n") or len(line) >= MAX_LINE or time.monotonic() >= deadline:
                break
            limit = MAX_LINE - len(line)
            line += await self.port.transact(lambda p, n=limit: _read_line(p, deadline, n))
        if not line:
            raise DeviceTimeout(f"{self}: no answer within {self.options.timeout:g} s")
        if not line.endswith(b"\n"):
            raise DeviceDataError(f"{self}: incomplete line {line!r}")
        return line

    async def _stream_line(self, deadline: float) -> bytes:
        while True:
            line = await self.port.transact(lambda p: self._stream_hop(p, deadline))
            if line is not None:
                return line
            if time.monotonic() >= deadline:
                self._buffer.resync()  # the stream stopped, maybe mid-line: start clean
                raise DeviceTimeout(f"{self}: no complete line within {self.options.timeout:g} s")

    # Blocking halves, on the port's worker thread ----------------------------------------------
    def _ask(self, port: Any, deadline: float) -> bytes:
        port.reset_input_buffer()
        port.write(self.options.command)
        port.flush()
        return _read_line(port, deadline, MAX_LINE)

    def _stream_hop(self, port: Any, deadline: float) -> bytes | None:
        buffer = self._buffer
        _take_waiting(port, buffer)
        line = buffer.newest()
        if line is None:
            buffer.feed(_read_line(port, deadline, MAX_LINE))
            _take_waiting(port, buffer)
            line = buffer.newest()
        return line


def _take_waiting(port: Any, buffer: LineBuffer) -> None:
    """Feed ``buffer`` what has arrived, without waiting (a read with timeout 0: ``in_waiting``
    says only 0 or 1 on a socket:// port). :data:`BEHIND_BYTES` of it or more is old: it is
    dropped, and the buffer starts again at the next line end."""
    _set_timeout(port, 0.0)
    data = bytes(port.read(BEHIND_BYTES))
    if len(data) < BEHIND_BYTES:
        buffer.feed(data)
    else:
        port.reset_input_buffer()
        buffer.resync()


def _read_line(port: Any, deadline: float, limit: int) -> bytes:
    """Bytes up to a line end, at most ``limit``, waiting until ``deadline`` or for one HOP."""
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        return b""
    _set_timeout(port, min(remaining, HOP))
    return bytes(port.read_until(b"\n", limit))


def _set_timeout(port: Any, seconds: float) -> None:
    """Set the port's read timeout (pyserial reconfigures the tty, so only when it changes)."""
    if (
        port.timeout is None
        or abs(port.timeout - seconds) > 1e-3
        or (seconds == 0) != (port.timeout == 0)
    ):
        port.timeout = seconds
