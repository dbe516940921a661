"""A simulated line-based ASCII sensor, formatting its lines on its own.

The wire format is the one ``drivers.line`` documents for the sensors it reads (its module
docstring): one line of ``key=value`` pairs separated by a comma (or a space), then optionally
``*HH``, the NMEA 0183-style checksum: the XOR of every byte before the ``*``, a leading ``$``
left out, as two upper-case hex digits; the line ends in CR LF. For example
``T=79.34,P=1.021*23\\r\\n``. The formatting and the checksum here are this module's own code, not
the driver's, so a mistake in either side's idea of the format shows in the tests.

``LineSensorSim(clock, options)`` reads the sensor's configuration (what
``LineSensor.parse_options`` returned, or any object with the same attributes: ``keys``, each
with ``wire``, ``channel`` and ``resolution``; ``checksum``; ``mode``; ``command``; ``period``)
and sends lines of the configured wire keys, each value with enough decimals for its channel's
resolution (half a step of rounding at most). In poll mode it answers every occurrence of the poll
command with one line; in stream mode it has a ``stream_period`` and the
:class:`~drivers.sim.serialport.PtyPort` calls :meth:`on_tick` every period (real time, since a
pty is real I/O), and it ignores what it receives.

Knobs on the sensor: ``checksum`` (send ``*HH``), ``separator`` (``","`` or ``" "``), ``prefix``
(``"$"`` makes NMEA-style lines; the checksum leaves it out). Fault knobs (``self.faults``):
``bad_crc`` sends a wrong ``*HH`` checksum; ``stuck`` freezes the values at those in force when
the knob was set; ``disconnect``, ``nack``, ``slow`` and ``bit_flip`` (a corrupted character) are
applied by the PtyPort.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Iterable
from typing import Any

from drivers.clock import Clock

from .faults import Faults

logger = logging.getLogger(__name__)

#: Received bytes kept while looking for the poll command.
INPUT_LIMIT = 256
#: What ends a line.
LINE_END = b"\r\n"
#: Put between the pairs and the checksum.
CHECKSUM_MARK = b"*"
#: A start character the checksum leaves out (NMEA 0183 sentences start with it).
START_MARK = b"$"
#: XORed into a right checksum to send a wrong one (any non-zero value would do).
WRONG_CHECKSUM = 0x5A


def decimals_for(resolution: float) -> int:
    """Fewest decimals whose last digit is no coarser than ``resolution`` (0.01 -> 2)."""
    return min(9, max(0, math.ceil(-math.log10(resolution) - 1e-9)))


def checksum_of(text: bytes) -> int:
    """The NMEA 0183-style checksum: every byte of ``text`` XORed together."""
    total = 0
    for byte in text:
        total ^= byte
    return total


def render_line(
    pairs: Iterable[tuple[str, str]],
    *,
    checksum: bool = True,
    separator: str = ",",
    prefix: str = "",
    wrong_checksum: bool = False,
) -> bytes:
    """One line as the sensor sends it: ``[prefix]k=v<sep>k=v[*HH]\\r\\n``."""
    text = prefix + separator.join(key + "=" + value for key, value in pairs)
    line = text.encode("ascii")
    if checksum:
        summed = line[len(START_MARK) :] if line.startswith(START_MARK) else line
        value = checksum_of(summed) ^ (WRONG_CHECKSUM if wrong_checksum else 0)
        line += CHECKSUM_MARK + f"{value:02X}".encode("ascii")
    return line + LINE_END


class LineSensorSim:
    """A ``key=value`` line sensor."""

    part = "line"

    def __init__(self, clock: Clock, options: Any) -> None:
        self.clock = clock
        self.options = options
        self.faults = Faults()
        self.checksum = str(options.checksum) != "none"  # send *HH (tests may switch it off)
        self.separator = ","
        self.prefix = ""
        self.mode = str(options.mode)
        command = options.command
        self.command = command.encode("ascii") if isinstance(command, str) else bytes(command)
        self.stream_period: float | None = float(options.period) if self.mode == "stream" else None
        self.commands = 0  # poll commands answered
        self.lines = 0  # lines produced
        self._wire = {str(k.channel): str(k.wire) for k in options.keys}
        self._decimals = {str(k.channel): decimals_for(float(k.resolution)) for k in options.keys}
        self._values = dict.fromkeys(self._wire, 0.0)
        self._frozen: dict[str, float] | None = None
        self._input = bytearray()
        self._lock = threading.Lock()

    def set_channel(self, channel: str, value: float) -> None:
        """The physical value behind ``channel``, in the channel's unit."""
        if channel not in self._wire:
            raise KeyError(f"{channel!r} is not a channel of this sensor ({', '.join(self._wire)})")
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
            (wire, f"{values[channel]:.{self._decimals[channel]}f}")
            for channel, wire in self._wire.items()
        ]
        return render_line(
            pairs,
            checksum=self.checksum,
            separator=self.separator,
            prefix=self.prefix,
            wrong_checksum=self.checksum and self.faults.crc_fails(),
        )

    # The wire ----------------------------------------------------------------------------------
    def on_bytes(self, data: bytes) -> bytes:
        if self.mode == "stream":
            return b""  # a streaming sensor does not listen
        self._input += data
        out = bytearray()
        while (at := self._input.find(self.command)) >= 0:
            del self._input[: at + len(self.command)]
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
