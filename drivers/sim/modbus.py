"""A simulated Modbus RTU slave, built from the same register map as the driver that reads it.

``ModbusSlaveSim(clock, options)`` takes what ``ModbusInstrument.parse_options`` returned and lays
out the configured registers in its holding and input tables; :meth:`set_channel` encodes a
channel value into its registers through the inverse of the driver's conversion (scale, offset,
type, word order), using the frame and conversion code of ``drivers.modbus``.

On the wire it behaves like a slave (MODBUS Application Protocol V1.1b3, section 6.3/6.4 and the
state diagram there): frames are delimited by silence (:attr:`frame_gap`, t3.5 at the baud rate;
the :class:`~drivers.sim.serialport.PtyPort` hands over bytes once the line is quiet) and, within
one quiet period, 0x03/0x04 requests are taken by their 8-byte length. It answers 0x03/0x04;
exception 01 for any other function, 03 for a quantity outside 1..125, 02 when an asked address is
not mapped. It stays silent for frames with a bad CRC, frames for another slave id, broadcasts
(reads cannot be broadcast) and runts, as a real slave does.

Fault knobs (``self.faults``): ``bad_crc`` corrupts the CRC of an answer, ``stuck`` freezes the
registers at their values when the knob was set; ``disconnect``, ``nack``, ``slow`` and
``bit_flip`` are applied by the PtyPort.
"""

from __future__ import annotations

import copy
import logging
import threading
from collections import deque

from drivers.clock import Clock
from drivers.modbus import (
    EXCEPTION_BIT,
    FUNCTION_TABLES,
    ILLEGAL_DATA_ADDRESS,
    ILLEGAL_DATA_VALUE,
    ILLEGAL_FUNCTION,
    MAX_QUANTITY,
    REQUEST_SIZE,
    TABLE_FUNCTIONS,
    ExceptionResponse,
    FrameError,
    ModbusOptions,
    ReadRequest,
    ReadResponse,
    crc_ok,
    encode_value,
    silence_interval,
)

from .faults import Faults

logger = logging.getLogger(__name__)

#: Requests kept in :attr:`ModbusSlaveSim.requests`.
REQUEST_LOG = 256


class ModbusSlaveSim:
    """A Modbus RTU slave whose register map is the configured one."""

    part = "modbus"

    def __init__(self, clock: Clock, options: ModbusOptions, *, baudrate: int = 9600) -> None:
        self.clock = clock
        self.options = options
        self.slave = options.slave
        self.faults = Faults()
        self.frame_gap = silence_interval(baudrate)
        self.requests: deque[ReadRequest] = deque(maxlen=REQUEST_LOG)  # answered or refused
        self.ignored = 0  # frames a real slave would drop silently
        self._specs = {spec.name: spec for spec in options.registers}
        self._lock = threading.Lock()
        self._tables: dict[str, dict[int, int]] = {table: {} for table in TABLE_FUNCTIONS}
        self._frozen: dict[str, dict[int, int]] | None = None
        for spec in options.registers:
            self._store(spec.table, spec.address, encode_value(spec, 0.0))
        if options.identity is not None:
            ident = options.identity
            self._tables[ident.table][ident.address] = ident.value

    # Driving the simulated instrument --------------------------------------------------------
    def set_channel(self, channel: str, value: float) -> None:
        """Put ``value`` (in the channel's unit) into the registers behind ``channel``."""
        spec = self._specs.get(channel)
        if spec is None:
            known = ", ".join(self._specs)
            raise KeyError(f"{channel!r} is not a register of this slave ({known})")
        words = encode_value(spec, value)
        with self._lock:
            self._sync_stuck()
            self._store(spec.table, spec.address, words)

    def set_register(self, table: str, address: int, word: int) -> None:
        """Poke one raw register (mapping it if it was not), e.g. a wrong identity value."""
        if table not in self._tables or not 0 <= word <= 0xFFFF:
            raise ValueError(f"cannot store {word!r} in {table!r} register {address}")
        with self._lock:
            self._sync_stuck()
            self._tables[table][address] = word

    def register(self, table: str, address: int) -> int | None:
        """The live content of one register (None: unmapped)."""
        with self._lock:
            return self._tables[table].get(address)

    # The wire ----------------------------------------------------------------------------------
    def on_bytes(self, data: bytes) -> bytes:
        """Bytes received within one quiet period -> the answers, concatenated."""
        out = bytearray()
        rest = bytes(data)
        while rest:
            size = REQUEST_SIZE if len(rest) >= 2 and rest[1] in FUNCTION_TABLES else len(rest)
            out += self.handle(rest[:size])
            rest = rest[size:]
        return bytes(out)

    def handle(self, frame: bytes) -> bytes:
        """One complete frame -> the answer bytes (``b""``: a slave would stay silent)."""
        if len(frame) < 4 or not crc_ok(frame):
            return self._ignore(frame, "runt or CRC mismatch")
        if frame[0] != self.slave:
            return self._ignore(frame, f"for slave {frame[0]}")
        function = frame[1]
        if function & EXCEPTION_BIT:
            return self._ignore(frame, "exception bit set in a request")
        if function not in FUNCTION_TABLES:
            return self._answer(
                ExceptionResponse(self.slave, function, ILLEGAL_FUNCTION).to_bytes()
            )
        try:
            request = ReadRequest.from_bytes(frame)
        except FrameError:
            return self._answer(
                ExceptionResponse(self.slave, function, ILLEGAL_DATA_VALUE).to_bytes()
            )
        self.requests.append(request)
        if not 1 <= request.quantity <= MAX_QUANTITY:
            return self._answer(
                ExceptionResponse(self.slave, function, ILLEGAL_DATA_VALUE).to_bytes()
            )
        with self._lock:
            self._sync_stuck()
            tables = self._frozen if self._frozen is not None else self._tables
            table = tables[FUNCTION_TABLES[function]]
            addresses = range(request.address, request.address + request.quantity)
            if addresses.stop > 0x10000 or any(a not in table for a in addresses):
                words = None
            else:
                words = tuple(table[a] for a in addresses)
        if words is None:
            return self._answer(
                ExceptionResponse(self.slave, function, ILLEGAL_DATA_ADDRESS).to_bytes()
            )
        return self._answer(ReadResponse(self.slave, function, words).to_bytes())

    # ----------------------------------------------------------------------------------------
    def _store(self, table: str, address: int, words: tuple[int, ...]) -> None:
        for i, word in enumerate(words):
            self._tables[table][address + i] = word

    def _sync_stuck(self) -> None:
        """Freeze a snapshot when ``stuck`` is first seen set; thaw when it is cleared."""
        if self.faults.stuck:
            if self._frozen is None:
                self._frozen = copy.deepcopy(self._tables)
        else:
            self._frozen = None

    def _answer(self, frame: bytes) -> bytes:
        if self.faults.crc_fails():
            frame = frame[:-2] + bytes([frame[-2] ^ 0xFF, frame[-1]])
        return frame

    def _ignore(self, frame: bytes, why: str) -> bytes:
        self.ignored += 1
        logger.debug("modbus sim ignores frame=%s reason=%s", frame.hex(" "), why)
        return b""
