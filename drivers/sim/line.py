"""A simulated line-based ASCII sensor, built from the same options as ``drivers.line``.

``LineSensorSim(clock, options)`` sends lines of the configured wire keys, formatted with
``drivers.line.format_line`` (so the driver and the simulator agree on the format), each value with
enough decimals for its channel's resolution (half a step of rounding at most). In poll mode it
answers every occurrence of the poll command with one line; in stream mode it has a
``stream_period`` and the :class:`~drivers.sim.serialport.PtyPort` calls :meth:`on_tick` every
period (real time, since a pty is real I/O), and it ignores what it receives.

Fault knobs (``self.faults``): ``bad_crc`` sends a wrong ``*HH`` checksum; ``stuck`` freezes the
values at those in force when the knob was set; ``disconnect``, ``nack``, ``slow`` and
``bit_flip`` (a corrupted character) are applied by the PtyPort.
"""

from __future__ import annotations

import logging
import math
import threading

from drivers.clock import Clock
from drivers.line import LineOptions, format_line

from .faults import Faults

logger = logging.getLogger(__name__)

#: Received bytes kept while looking for the poll command.
INPUT_LIMIT = 256


def decimals_for(resolution: float) -> int:
    """Fewest decimals whose last digit is no coarser than ``resolution`` (0.01 -> 2)."""
    return min(9, max(0, math.ceil(-math.log10(resolution) - 1e-9)))


class LineSensorSim:
    """A ``key=value`` line sensor."""

    part = "line"

    def __init__(self, clock: Clock, options: LineOptions) -> None:
        self.clock = clock
        self.options = options
        self.faults = Faults()
        self.checksum = options.checksum != "none"  # send *HH (tests may switch it off)
        self.separator = ","
        self.stream_period: float | None = options.period if options.mode == "stream" else None
        self.commands = 0  # poll commands answered
        self.lines = 0  # lines produced
        self._keys = {k.channel: k for k in options.keys}
        self._decimals = {k.channel: decimals_for(k.resolution) for k in options.keys}
        self._values = dict.fromkeys(self._keys, 0.0)
        self._frozen: dict[str, float] | None = None
        self._input = bytearray()
        self._lock = threading.Lock()

    def set_channel(self, channel: str, value: float) -> None:
        """The physical value behind ``channel``, in the channel's unit."""
        if channel not in self._keys:
            raise KeyError(f"{channel!r} is not a channel of this sensor ({', '.join(self._keys)})")
        with self._lock:
            self._sync_stuck()
            self._values[channel] = float(value)

    def line(self) -> bytes:
        """The line the sensor sends now (faults ``stuck`` and ``bad_crc`` applied)."""
        with self._lock:
            self._sync_stuck()
            values = dict(self._frozen if self._frozen is not None else self._values)
            self.lines += 1
        pairs = [
            (key.wire, f"{values[channel]:.{self._decimals[channel]}f}")
            for channel, key in self._keys.items()
        ]
        line = format_line(pairs, checksum=self.checksum, separator=self.separator)
        if self.checksum and self.faults.crc_fails():
            star = line.rindex(b"*")
            wrong = (int(line[star + 1 : star + 3], 16) ^ 0x5A) & 0xFF
            line = line[: star + 1] + b"%02X" % wrong + line[star + 3 :]
        return line

    # The wire ----------------------------------------------------------------------------------
    def on_bytes(self, data: bytes) -> bytes:
        if self.options.mode == "stream":
            return b""  # a streaming sensor does not listen
        self._input += data
        command = self.options.command
        out = bytearray()
        while (at := self._input.find(command)) >= 0:
            del self._input[: at + len(command)]
            self.commands += 1
            out += self.line()
        if len(self._input) > INPUT_LIMIT:
            del self._input[:-INPUT_LIMIT]
        return bytes(out)

    def on_tick(self) -> bytes:
        return self.line()

    def _sync_stuck(self) -> None:
        if self.faults.stuck:
            if self._frozen is None:
                self._frozen = dict(self._values)
        else:
            self._frozen = None
