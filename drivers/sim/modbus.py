"""A simulated Modbus RTU slave, written from the Modbus specifications on its own.

Nothing here comes from ``drivers.modbus``: the CRC, the frame layouts, the exception codes, the
timing and the register encoding are this module's own, taken from

- "MODBUS over Serial Line Specification and Implementation Guide V1.02" (cited as SL): the RTU
  frame (section 2.5.1: address, PDU, CRC-16 low byte first), the inter-frame silence t3.5
  (2.5.1.1: 3.5 characters of 11 bits, fixed at 1.750 ms above 19200 baud), addressing (2.2: 0
  is the broadcast address, 1..247 a slave, 248..255 reserved) and broadcast (2.1: broadcast
  requests are writes, every slave executes them, none answers), the CRC (6.2.2 and Appendix B:
  polynomial 0xA001 reflected, preset 0xFFFF);
- "MODBUS Application Protocol Specification V1.1b3" (cited as AP): the PDUs and state diagrams
  of 0x03 Read Holding Registers (6.3), 0x04 Read Input Registers (6.4), 0x06 Write Single
  Register (6.6) and 0x10 Write Multiple Registers (6.12), and the exception responses (section
  7: function code | 0x80 and one exception code byte).

So a mistake in the driver's frame code (a CRC table, a byte order, an exception code) makes the
hardware-in-the-loop tests fail instead of hiding in a simulator that shares it.

``ModbusSlaveSim(clock, options)`` reads the instrument's configuration (what
``ModbusInstrument.parse_options`` returned, or any object with the same attributes: ``slave``;
``registers``, each with ``name``, ``table``, ``address``, ``type``, ``scale``, ``offset``,
``word_order``; optionally ``identity`` with ``table``, ``address``, ``value``) and lays out the
configured registers in its holding and input tables. :meth:`set_channel` puts a channel value
into its registers with this module's own encoding (``raw = (value - offset) / scale``, stored as
u16, s16, u32, s32 or float32, 32-bit types high word first for ``word_order = "big"``).

On the wire (AP 6.3, 6.4, 6.6, 6.12 state diagrams, checked in this order): an unsupported
function gets exception 01 ILLEGAL FUNCTION; a bad quantity, byte count or PDU length 03 ILLEGAL
DATA VALUE; an address range that is not all mapped 02 ILLEGAL DATA ADDRESS. Reads take 1..125
registers, writes 1..123; 0x06 and 0x10 write holding registers only. Frames are delimited by
silence (:attr:`frame_gap`; the :class:`~drivers.sim.serialport.PtyPort` hands over bytes once the
line has been quiet that long); should two requests come in one quiet period, each is cut at the
length its PDU implies. The slave stays silent, as a real one does, for runts, bad CRCs, frames
for another address, requests with the exception bit set, and anything broadcast (address 0):
broadcast writes are executed without an answer, broadcast reads are dropped.

Fault knobs (``self.faults``): ``bad_crc`` corrupts the CRC of an answer; ``stuck`` freezes the
registers a read sees at their values when the knob was set (writes still land); ``disconnect``,
``nack``, ``slow`` and ``bit_flip`` are applied by the PtyPort. One more, on the slave itself:
:attr:`ModbusSlaveSim.refuse_with`, an exception code (04 SERVER DEVICE FAILURE, 06 SERVER DEVICE
BUSY, ...) that answers every well-formed request addressed to this slave until it is set back to
None; the request is not executed.
"""

from __future__ import annotations

import copy
import logging
import math
import struct
import threading
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from drivers.clock import Clock

from .faults import Faults

logger = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------
# Protocol constants

#: SL 2.5.1: 1 start bit, 8 data bits, 1 parity bit (or a second stop bit), 1 stop bit.
BITS_PER_CHARACTER = 11
#: SL 2.5.1.1: above 19200 baud t3.5 is fixed at 1.750 ms (t1.5 at 750 us).
FIXED_T35 = 1.750e-3
FIXED_T35_ABOVE = 19200
#: SL 2.2: address 0 reaches every slave; 248..255 are reserved.
BROADCAST_ADDRESS = 0
#: Shortest RTU frame: address, function code, CRC (2).
MIN_FRAME = 4

READ_HOLDING_REGISTERS = 0x03  # AP 6.3
READ_INPUT_REGISTERS = 0x04  # AP 6.4
WRITE_SINGLE_REGISTER = 0x06  # AP 6.6
WRITE_MULTIPLE_REGISTERS = 0x10  # AP 6.12
#: AP 6.3/6.4: 0x0001 <= quantity of registers <= 0x007D.
READ_QUANTITY_MAX = 0x007D
#: AP 6.12: 0x0001 <= quantity of registers <= 0x007B.
WRITE_QUANTITY_MAX = 0x007B
#: AP 7: an exception response carries the request's function code with this bit set.
ERROR_FLAG = 0x80
WRITE_FUNCTIONS = frozenset({WRITE_SINGLE_REGISTER, WRITE_MULTIPLE_REGISTERS})

#: AP 7, exception codes this slave sends (and 06 when ``refuse_with`` asks for it).
ILLEGAL_FUNCTION = 0x01
ILLEGAL_DATA_ADDRESS = 0x02
ILLEGAL_DATA_VALUE = 0x03
SERVER_DEVICE_FAILURE = 0x04
SERVER_DEVICE_BUSY = 0x06

#: Which table each function works on.
FUNCTION_TABLE = {
    READ_HOLDING_REGISTERS: "holding",
    READ_INPUT_REGISTERS: "input",
    WRITE_SINGLE_REGISTER: "holding",
    WRITE_MULTIPLE_REGISTERS: "holding",
}

#: Register types: name -> (registers, signed); float32 is IEEE 754 binary32.
REGISTER_TYPES: dict[str, tuple[int, bool]] = {
    "u16": (1, False),
    "s16": (1, True),
    "u32": (2, False),
    "s32": (2, True),
    "float32": (2, True),
}
#: Largest finite binary32 value, (2 - 2**-23) * 2**127.
FLOAT32_MAX = (2.0 - 2.0**-23) * 2.0**127

#: Requests kept in :attr:`ModbusSlaveSim.requests`.
REQUEST_LOG = 256


# --------------------------------------------------------------------------------------------
# CRC, frames, timing


def crc16(data: bytes | bytearray) -> int:
    """CRC-16/MODBUS of ``data``, bit by bit as SL 6.2.2 describes it.

    Preset 0xFFFF; for each byte: XOR it into the low byte, then eight times shift right and,
    when the bit shifted out was 1, XOR 0xA001.
    """
    register = 0xFFFF
    for byte in data:
        register ^= byte
        for _ in range(8):
            carry = register & 0x0001
            register >>= 1
            if carry:
                register ^= 0xA001
    return register


def adu(address: int, pdu: bytes) -> bytes:
    """An RTU frame: address, PDU, CRC low byte then high byte (SL 2.5.1.2)."""
    body = bytes([address]) + pdu
    crc = crc16(body)
    return body + bytes([crc & 0xFF, crc >> 8])


def crc_matches(frame: bytes) -> bool:
    """Whether the last two bytes of ``frame`` are the CRC of the rest, low byte first."""
    if len(frame) < 3:
        return False
    crc = crc16(frame[:-2])
    return frame[-2] == crc & 0xFF and frame[-1] == crc >> 8


def exception_frame(address: int, function: int, code: int) -> bytes:
    """An exception response (AP 7): function | 0x80, then the exception code."""
    return adu(address, bytes([function | ERROR_FLAG, code]))


def t35(baudrate: int) -> float:
    """The inter-frame silence t3.5 in seconds at ``baudrate`` (SL 2.5.1.1)."""
    if baudrate > FIXED_T35_ABOVE:
        return FIXED_T35
    return 3.5 * BITS_PER_CHARACTER / baudrate


def request_length(data: bytes) -> int | None:
    """The length of the request frame ``data`` starts with, as its PDU implies (None: unknown).

    0x03, 0x04, 0x06: address, function, two 16-bit fields, CRC = 8 bytes. 0x10: address,
    function, address, quantity, byte count N, N bytes, CRC = 9 + N.
    """
    if len(data) < 2:
        return None
    function = data[1]
    if function in (READ_HOLDING_REGISTERS, READ_INPUT_REGISTERS, WRITE_SINGLE_REGISTER):
        return 8
    if function == WRITE_MULTIPLE_REGISTERS and len(data) >= 7:
        return 9 + data[6]
    return None


# --------------------------------------------------------------------------------------------
# Register encoding (this module's own: value -> register words)


def _words_of(bits: int, count: int) -> list[int]:
    """``bits`` as ``count`` 16-bit words, most significant word first."""
    return [(bits >> (16 * (count - 1 - i))) & 0xFFFF for i in range(count)]


def register_words(
    kind: str, scale: float, offset: float, word_order: str, value: float
) -> tuple[int, ...]:
    """The register words an instrument holding ``value`` presents.

    ``raw = (value - offset) / scale``; integer types round half up and saturate at the type's
    range (an instrument's output pins at its limits); float32 keeps infinities and NaN and
    saturates finite values beyond binary32's range. ``word_order = "little"`` puts the low
    word of a 32-bit type at the lower address.
    """
    count, signed = REGISTER_TYPES[kind]
    raw = (value - offset) / scale
    if kind == "float32":
        if math.isfinite(raw):
            raw = max(-FLOAT32_MAX, min(FLOAT32_MAX, raw))
        bits = int.from_bytes(struct.pack(">f", raw), "big")
    else:
        if not math.isfinite(raw):
            raise ValueError(f"{value!r} cannot be held by a {kind} register")
        width = 16 * count
        low = -(2 ** (width - 1)) if signed else 0
        high = 2 ** (width - 1) - 1 if signed else 2**width - 1
        code = max(low, min(high, math.floor(raw + 0.5)))
        bits = code % 2**width  # two's complement
    words = _words_of(bits, count)
    if word_order == "little":
        words.reverse()
    return tuple(words)


@dataclass(frozen=True, slots=True)
class _Channel:
    """One configured register entry, as this module reads the configuration."""

    name: str
    table: str
    address: int
    kind: str
    scale: float
    offset: float
    word_order: str

    @classmethod
    def read(cls, entry: Any) -> _Channel:
        kind = str(entry.type)
        if kind not in REGISTER_TYPES:
            raise ValueError(
                f"{entry.name}: register type {kind!r} is not one of {list(REGISTER_TYPES)}"
            )
        table = str(entry.table)
        if table not in ("holding", "input"):
            raise ValueError(f"{entry.name}: table {table!r} is not 'holding' or 'input'")
        return cls(
            str(entry.name),
            table,
            int(entry.address),
            kind,
            float(entry.scale),
            float(entry.offset),
            str(getattr(entry, "word_order", "big")),
        )

    def words(self, value: float) -> tuple[int, ...]:
        return register_words(self.kind, self.scale, self.offset, self.word_order, value)


@dataclass(frozen=True, slots=True)
class Request:
    """A request the slave took in: ``slave`` is the address it was sent to (0: broadcast);
    ``values`` are the words a write carried."""

    slave: int
    function: int
    address: int
    quantity: int
    values: tuple[int, ...] = ()


# --------------------------------------------------------------------------------------------
# The slave


class ModbusSlaveSim:
    """A Modbus RTU slave whose register map is the configured one."""

    part = "modbus"

    def __init__(self, clock: Clock, options: Any, *, baudrate: int = 9600) -> None:
        self.clock = clock
        self.options = options
        self.slave = int(options.slave)
        if not 1 <= self.slave <= 247:
            raise ValueError(f"slave address {self.slave} is not in 1..247 (SL 2.2)")
        self.faults = Faults()
        self.refuse_with: int | None = None  # an exception code answering every request
        self.frame_gap = t35(baudrate)
        self.requests: deque[Request] = deque(maxlen=REQUEST_LOG)  # answered, refused or broadcast
        self.ignored = 0  # frames a real slave drops silently
        self.broadcasts = 0  # broadcast writes executed
        self._channels = {c.name: c for c in map(_Channel.read, options.registers)}
        self._lock = threading.Lock()
        self._tables: dict[str, dict[int, int]] = {"holding": {}, "input": {}}
        self._frozen: dict[str, dict[int, int]] | None = None
        for channel in self._channels.values():
            self._put(channel.table, channel.address, channel.words(0.0))
        identity = getattr(options, "identity", None)
        if identity is not None:
            self._put(str(identity.table), int(identity.address), (int(identity.value),))

    # Driving the simulated instrument --------------------------------------------------------
    def set_channel(self, channel: str, value: float) -> None:
        """Put ``value`` (in the channel's unit) into the registers behind ``channel``."""
        spec = self._channels.get(channel)
        if spec is None:
            known = ", ".join(self._channels)
            raise KeyError(f"{channel!r} is not a register of this slave ({known})")
        words = spec.words(value)
        with self._lock:
            self._sync_stuck()
            self._put(spec.table, spec.address, words)

    def set_register(self, table: str, address: int, word: int) -> None:
        """Poke one raw register (mapping it if it was not), e.g. a wrong identity value."""
        if table not in self._tables or not 0 <= word <= 0xFFFF or not 0 <= address <= 0xFFFF:
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
        """Bytes received within one quiet period -> the answers, concatenated.

        One quiet period normally holds one frame. Should it hold more (the master sent again
        before the line went quiet), a frame is cut where its PDU says it ends when the CRC
        there matches; otherwise the whole rest is one frame.
        """
        out = bytearray()
        rest = bytes(data)
        while rest:
            size = request_length(rest)
            if size is None or size >= len(rest) or not crc_matches(rest[:size]):
                size = len(rest)
            out += self.handle(rest[:size])
            rest = rest[size:]
        return bytes(out)

    def handle(self, frame: bytes) -> bytes:
        """One complete frame -> the answer bytes (``b""``: the slave stays silent)."""
        if len(frame) < MIN_FRAME:
            return self._ignore(frame, "runt")
        if not crc_matches(frame):
            return self._ignore(frame, "CRC mismatch")
        address, function, data = frame[0], frame[1], frame[2:-2]
        broadcast = address == BROADCAST_ADDRESS
        if address != self.slave and not broadcast:
            return self._ignore(frame, f"for address {address}")
        if function & ERROR_FLAG:
            return self._ignore(frame, "exception flag set in a request")
        if broadcast and function not in WRITE_FUNCTIONS:
            return self._ignore(frame, "broadcast of a function that is not a write")
        if function not in FUNCTION_TABLE:
            return self._reply(exception_frame(self.slave, function, ILLEGAL_FUNCTION))
        request = self._parse(address, function, data)
        code: int | None = ILLEGAL_DATA_VALUE
        pdu = b""
        if request is not None:
            self.requests.append(request)
            if self.refuse_with is not None:
                code = self.refuse_with  # refused: not executed
            else:
                code, pdu = self._serve(request)
        if broadcast:
            # SL 2.1: a broadcast is executed by every slave and answered by none
            if code is None:
                self.broadcasts += 1
            return b""
        if code is not None:
            return self._reply(exception_frame(self.slave, function, code))
        return self._reply(adu(self.slave, pdu))

    # ----------------------------------------------------------------------------------------
    def _parse(self, address: int, function: int, data: bytes) -> Request | None:
        """The request in a PDU's data field (None: its length is not what the PDU implies)."""
        if function == WRITE_MULTIPLE_REGISTERS:
            if len(data) < 5:
                return None
            start, quantity, count = (data[0] << 8) | data[1], (data[2] << 8) | data[3], data[4]
            values = data[5:]
            if count != len(values) or count != 2 * quantity:
                return None  # AP 6.12: byte count must be 2 x quantity
            words = tuple((values[i] << 8) | values[i + 1] for i in range(0, count, 2))
            return Request(address, function, start, quantity, words)
        if len(data) != 4:
            return None
        first, second = (data[0] << 8) | data[1], (data[2] << 8) | data[3]
        if function == WRITE_SINGLE_REGISTER:
            return Request(address, function, first, 1, (second,))
        return Request(address, function, first, second)

    def _serve(self, request: Request) -> tuple[int | None, bytes]:
        """Check a parsed request against the state diagrams and carry it out.

        ``(None, response PDU)``, or ``(exception code, b"")`` when it is refused.
        """
        function, start, quantity = request.function, request.address, request.quantity
        limit = WRITE_QUANTITY_MAX if function == WRITE_MULTIPLE_REGISTERS else READ_QUANTITY_MAX
        if not 1 <= quantity <= limit:
            return ILLEGAL_DATA_VALUE, b""
        head = bytes([function]) + start.to_bytes(2, "big")
        stop = start + quantity
        with self._lock:
            self._sync_stuck()
            writing = function in WRITE_FUNCTIONS
            tables = self._tables if writing or self._frozen is None else self._frozen
            table = tables[FUNCTION_TABLE[function]]
            if stop > 0x10000 or any(a not in table for a in range(start, stop)):
                return ILLEGAL_DATA_ADDRESS, b""
            if writing:
                for i, word in enumerate(request.values):
                    table[start + i] = word
            else:
                words = [table[a] for a in range(start, stop)]
        if function == WRITE_SINGLE_REGISTER:
            return None, head + request.values[0].to_bytes(2, "big")  # AP 6.6: an echo
        if function == WRITE_MULTIPLE_REGISTERS:
            return None, head + quantity.to_bytes(2, "big")
        data = b"".join(w.to_bytes(2, "big") for w in words)
        return None, bytes([function, len(data)]) + data

    def _put(self, table: str, address: int, words: Iterable[int]) -> None:
        for i, word in enumerate(words):
            self._tables[table][address + i] = word

    def _sync_stuck(self) -> None:
        """Freeze a snapshot when ``stuck`` is first seen set; thaw when it is cleared."""
        if self.faults.stuck:
            if self._frozen is None:
                self._frozen = copy.deepcopy(self._tables)
        else:
            self._frozen = None

    def _reply(self, frame: bytes) -> bytes:
        if self.faults.crc_fails():
            frame = frame[:-2] + bytes([frame[-2] ^ 0xFF, frame[-1]])
        return frame

    def _ignore(self, frame: bytes, why: str) -> bytes:
        self.ignored += 1
        logger.debug("modbus sim ignores frame=%s reason=%s", frame.hex(" "), why)
        return b""
