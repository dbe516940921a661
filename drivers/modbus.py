"""Modbus RTU master for register-mapped serial instruments (flow meters, transmitters on RS-485).

The slave simulator (``drivers.sim.modbus``) is written from the specifications on its own;
``tests/hil/test_sim_protocols.py`` checks both sides against published frames. This side follows:

- CRC-16/MODBUS (reflected polynomial 0xA001, initial value 0xFFFF, low byte sent first):
  "MODBUS over Serial Line Specification and Implementation Guide V1.02", section 2.5.1.2 and
  Appendix B (its worked example: ``02 07`` carries the CRC bytes ``41 12``).
- RTU framing: 11-bit characters, a frame is preceded and ended by at least 3.5 character times of
  silence; above 19200 baud the spec fixes that silence at 1.750 ms (V1.02, section 2.5.1.1).
- Functions 0x03 Read Holding Registers and 0x04 Read Input Registers, quantity 1..125 (0x7D):
  "MODBUS Application Protocol Specification V1.1b3", sections 6.3 and 6.4.
- Exception responses (function code | 0x80, one exception code byte): V1.1b3 section 7.

The register map comes from the configuration, so the instrument's channels do too: each
``[[sensor.options.register]]`` entry is one channel named by its ``name``. Registers of the same
table that sit next to each other are read in one request.

Values: ``value = raw * scale + offset`` where ``raw`` is the register content read as ``u16``,
``s16``, ``u32``, ``s32`` or ``float32`` (32-bit types span two registers; ``word_order = "big"``
puts the high word first, ``"little"`` the low word first; bytes within a register are always
big-endian, as Modbus sends them).

Options (``[sensor.options]``):

- ``slave`` (1..247, default 1); ``timeout``: seconds to wait for an answer (default 0.5, at most
  2); ``retries``: repeats of a request that got no answer or a garbled one (default 2);
  ``max_registers``: most registers per request (default 125); ``word_order`` (default "big"):
  the default for 32-bit registers;
- ``identity = {table = "holding", address = N, value = M}`` (optional): a register that must
  hold ``M`` when the instrument is opened;
- ``[[sensor.options.register]]`` (at least one): ``name`` (the channel), ``table`` ("holding",
  the default, or "input"), ``address`` (0..65535), ``type`` (default "u16"), ``scale`` (default
  1), ``offset`` (default 0), ``word_order`` (32-bit types), ``resolution`` (float32 only, channel
  unit, default 0.001; an integer register's resolution is ``|scale|``). Registers may not
  overlap and names may not repeat.
"""

from __future__ import annotations

import logging
import math
import re
import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from drivers.base import BaseDriver, Identity, Options
from drivers.bus import AsyncSerial
from drivers.errors import DeviceDataError, DeviceIOError, DeviceNotFound, DeviceTimeout

logger = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------
# Timing and protocol constants (tests may shorten the timing ones)

#: Default time to wait for the first bytes of an answer, seconds (the spec leaves it to the
#: master; typical instruments answer within tens of milliseconds).
RESPONSE_TIMEOUT = 0.5
#: Largest accepted response timeout. One attempt waits at most this plus the time the answer
#: takes on the wire (2.3 s for 125 registers at 1200 baud): that must stay inside the serial
#: port's own per-call deadline (drivers.bus.AsyncSerial, 5 s by default).
MAX_RESPONSE_TIMEOUT = 2.0
#: Shortest wait for the rest of an answer once its first bytes are in, seconds.
MIN_READ = 0.01
#: Default number of repeats of a request that got no answer or a garbled one.
RETRIES = 2
#: Bits per RTU character: start + 8 data + parity (or a second stop bit) + stop (V1.02 2.5.1).
CHAR_BITS = 11
#: Inter-frame silence above 19200 baud, fixed by V1.02 section 2.5.1.1.
FAST_SILENCE = 0.00175

READ_HOLDING_REGISTERS = 0x03
READ_INPUT_REGISTERS = 0x04
#: Register table name (as configured) -> the function code that reads it.
TABLE_FUNCTIONS: dict[str, int] = {
    "holding": READ_HOLDING_REGISTERS,
    "input": READ_INPUT_REGISTERS,
}
FUNCTION_TABLES = {code: table for table, code in TABLE_FUNCTIONS.items()}
#: Quantity of registers one read request may ask for (V1.1b3 sections 6.3 and 6.4).
MAX_QUANTITY = 125
EXCEPTION_BIT = 0x80
REQUEST_SIZE = 8  # slave, function, address (2), quantity (2), CRC (2)
EXCEPTION_SIZE = 5  # slave, function | 0x80, code, CRC (2)

#: Exception codes, V1.1b3 section 7. 07 is not in V1.1b3; its name comes from the Modicon
#: protocol reference PI-MBUS-300, where older devices still use it. 09 is undefined.
EXCEPTION_NAMES: dict[int, str] = {
    0x01: "ILLEGAL FUNCTION",
    0x02: "ILLEGAL DATA ADDRESS",
    0x03: "ILLEGAL DATA VALUE",
    0x04: "SERVER DEVICE FAILURE",
    0x05: "ACKNOWLEDGE",
    0x06: "SERVER DEVICE BUSY",
    0x07: "NEGATIVE ACKNOWLEDGE",
    0x08: "MEMORY PARITY ERROR",
    0x0A: "GATEWAY PATH UNAVAILABLE",
    0x0B: "GATEWAY TARGET DEVICE FAILED TO RESPOND",
}
ILLEGAL_FUNCTION = 0x01
ILLEGAL_DATA_ADDRESS = 0x02
ILLEGAL_DATA_VALUE = 0x03
#: Exceptions worth repeating the request for: the slave is busy, try again later.
RETRYABLE_EXCEPTIONS = frozenset({0x06})

#: Register types: name -> registers used.
TYPES: dict[str, int] = {"u16": 1, "s16": 1, "u32": 2, "s32": 2, "float32": 2}
WORD_ORDERS = ("big", "little")
#: Resolution of a float32 channel when the register entry does not give one (channel unit).
FLOAT_RESOLUTION = 0.001

_CHANNEL_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,62}$")


def exception_name(code: int) -> str:
    return EXCEPTION_NAMES.get(code, f"UNKNOWN EXCEPTION 0x{code:02X}")


# --------------------------------------------------------------------------------------------
# CRC and timing


def _crc_table() -> tuple[int, ...]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0xA001 if crc & 1 else crc >> 1
        table.append(crc)
    return tuple(table)


_CRC_TABLE = _crc_table()


def crc16(data: bytes | bytearray) -> int:
    """CRC-16/MODBUS of ``data`` (the value; on the wire its low byte goes first)."""
    crc = 0xFFFF
    for byte in data:
        crc = (crc >> 8) ^ _CRC_TABLE[(crc ^ byte) & 0xFF]
    return crc


def with_crc(body: bytes | bytearray) -> bytes:
    """``body`` followed by its CRC, low byte first."""
    return bytes(body) + crc16(body).to_bytes(2, "little")


def crc_ok(frame: bytes | bytearray) -> bool:
    return len(frame) >= 3 and crc16(frame[:-2]) == int.from_bytes(frame[-2:], "little")


def char_time(baudrate: int) -> float:
    """Seconds to send one 11-bit RTU character."""
    return CHAR_BITS / baudrate


def silence_interval(baudrate: int) -> float:
    """The inter-frame silence t3.5: 3.5 characters, or 1.75 ms above 19200 baud."""
    return FAST_SILENCE if baudrate > 19200 else 3.5 * char_time(baudrate)


# --------------------------------------------------------------------------------------------
# Frames


class FrameError(ValueError):
    """Bytes that are not a valid frame (length, CRC, fields)."""


def _check_byte(name: str, value: int) -> None:
    if not 0 <= value <= 0xFF:
        raise ValueError(f"{name} {value} does not fit in a byte")


def _check_word(name: str, value: int) -> None:
    if not 0 <= value <= 0xFFFF:
        raise ValueError(f"{name} {value} does not fit in 16 bits")


@dataclass(frozen=True, slots=True)
class ReadRequest:
    """A 0x03/0x04 request: read ``quantity`` registers from ``address`` of ``slave``.

    The quantity is not range-checked here (a slave answers a bad one with exception 03).
    """

    slave: int
    function: int
    address: int
    quantity: int

    def __post_init__(self) -> None:
        _check_byte("slave", self.slave)
        _check_byte("function", self.function)
        _check_word("address", self.address)
        _check_word("quantity", self.quantity)

    @property
    def response_size(self) -> int:
        return 5 + 2 * self.quantity

    def to_bytes(self) -> bytes:
        return with_crc(
            bytes([self.slave, self.function])
            + self.address.to_bytes(2, "big")
            + self.quantity.to_bytes(2, "big")
        )

    @classmethod
    def from_bytes(cls, frame: bytes) -> ReadRequest:
        if len(frame) != REQUEST_SIZE:
            raise FrameError(f"a read request has {REQUEST_SIZE} bytes, got {len(frame)}")
        if not crc_ok(frame):
            raise FrameError("CRC mismatch")
        if frame[1] not in FUNCTION_TABLES:
            raise FrameError(f"function 0x{frame[1]:02X} is not a register read")
        return cls(
            frame[0],
            frame[1],
            int.from_bytes(frame[2:4], "big"),
            int.from_bytes(frame[4:6], "big"),
        )

    def describe(self) -> str:
        table = FUNCTION_TABLES.get(self.function, f"function 0x{self.function:02X}")
        last = self.address + self.quantity - 1
        return f"{table} registers {self.address}..{last}"


@dataclass(frozen=True, slots=True)
class ReadResponse:
    """The answer to a 0x03/0x04 request: the register words, in order."""

    slave: int
    function: int
    registers: tuple[int, ...]

    def __post_init__(self) -> None:
        _check_byte("slave", self.slave)
        _check_byte("function", self.function)
        if not 0 < len(self.registers) <= MAX_QUANTITY:
            raise ValueError(f"{len(self.registers)} registers do not fit in one response")
        for word in self.registers:
            _check_word("register", word)

    def to_bytes(self) -> bytes:
        data = b"".join(w.to_bytes(2, "big") for w in self.registers)
        return with_crc(bytes([self.slave, self.function, len(data)]) + data)

    @classmethod
    def from_bytes(cls, frame: bytes) -> ReadResponse:
        if len(frame) < 7:
            raise FrameError(f"a read response has at least 7 bytes, got {len(frame)}")
        if not crc_ok(frame):
            raise FrameError("CRC mismatch")
        count = frame[2]
        if count != len(frame) - 5 or count % 2:
            raise FrameError(f"byte count {count} does not match a {len(frame)}-byte frame")
        data = frame[3:-2]
        words = tuple(int.from_bytes(data[i : i + 2], "big") for i in range(0, count, 2))
        return cls(frame[0], frame[1], words)


@dataclass(frozen=True, slots=True)
class ExceptionResponse:
    """A slave's refusal: ``function`` is the request's function code (without the 0x80 bit)."""

    slave: int
    function: int
    code: int

    def __post_init__(self) -> None:
        _check_byte("slave", self.slave)
        if not 0 <= self.function < EXCEPTION_BIT:
            raise ValueError(f"function 0x{self.function:02X} is not a request function")
        _check_byte("code", self.code)

    @property
    def name(self) -> str:
        return exception_name(self.code)

    def to_bytes(self) -> bytes:
        return with_crc(bytes([self.slave, self.function | EXCEPTION_BIT, self.code]))

    @classmethod
    def from_bytes(cls, frame: bytes) -> ExceptionResponse:
        if len(frame) != EXCEPTION_SIZE:
            raise FrameError(f"an exception response has 5 bytes, got {len(frame)}")
        if not crc_ok(frame):
            raise FrameError("CRC mismatch")
        if not frame[1] & EXCEPTION_BIT:
            raise FrameError(f"function 0x{frame[1]:02X} lacks the exception bit")
        return cls(frame[0], frame[1] & ~EXCEPTION_BIT & 0xFF, frame[2])


def check_response(frame: bytes, request: ReadRequest) -> ReadResponse | ExceptionResponse:
    """Validate the bytes that came back for ``request``. Raises FrameError naming the fault."""
    shown = frame.hex(" ")
    if len(frame) < EXCEPTION_SIZE:
        raise FrameError(f"truncated answer ({len(frame)} bytes: {shown})")
    function = frame[1]
    if function == request.function and len(frame) < request.response_size:
        raise FrameError(f"truncated answer ({len(frame)} of {request.response_size} bytes)")
    if not crc_ok(frame):
        carried = int.from_bytes(frame[-2:], "little")
        raise FrameError(
            f"CRC mismatch: frame carries 0x{carried:04X}, computed 0x{crc16(frame[:-2]):04X}"
        )
    if frame[0] != request.slave:
        raise FrameError(f"answer from slave {frame[0]}, expected slave {request.slave}")
    if function == request.function | EXCEPTION_BIT:
        return ExceptionResponse.from_bytes(frame)
    if function != request.function:
        raise FrameError(
            f"function 0x{function:02X} in the answer to function 0x{request.function:02X}"
        )
    response = ReadResponse.from_bytes(frame)
    if len(response.registers) != request.quantity:
        raise FrameError(
            f"{len(response.registers)} registers in the answer, asked for {request.quantity}"
        )
    return response


# --------------------------------------------------------------------------------------------
# Register map and value conversion (pure)


@dataclass(frozen=True, slots=True)
class RegisterSpec:
    """One configured register entry: a channel and where and how its value is stored."""

    name: str
    table: str  # "holding" or "input"
    address: int
    type: str = "u16"
    scale: float = 1.0
    offset: float = 0.0
    word_order: str = "big"
    resolution: float = 1.0  # channel unit; |scale| for integer types

    @property
    def count(self) -> int:
        return TYPES[self.type]

    @property
    def end(self) -> int:
        return self.address + self.count


def _join_words(spec: RegisterSpec, words: Sequence[int]) -> bytes:
    if len(words) != spec.count:
        raise ValueError(f"{spec.name}: expected {spec.count} registers, got {len(words)}")
    ordered = list(words) if spec.word_order == "big" else list(reversed(words))
    return b"".join(w.to_bytes(2, "big") for w in ordered)


def _split_words(spec: RegisterSpec, data: bytes) -> tuple[int, ...]:
    words = [int.from_bytes(data[i : i + 2], "big") for i in range(0, len(data), 2)]
    return tuple(words if spec.word_order == "big" else reversed(words))


def raw_value(spec: RegisterSpec, words: Sequence[int]) -> int | float:
    """The register content as its type says (before scale and offset)."""
    data = _join_words(spec, words)
    if spec.type == "float32":
        return struct.unpack(">f", data)[0]
    return int.from_bytes(data, "big", signed=spec.type.startswith("s"))


def decode_value(spec: RegisterSpec, words: Sequence[int]) -> float:
    """Channel value from register words: ``raw * scale + offset``."""
    return raw_value(spec, words) * spec.scale + spec.offset


def _int_limits(spec: RegisterSpec) -> tuple[int, int]:
    bits = 16 * spec.count
    if spec.type.startswith("s"):
        return -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    return 0, (1 << bits) - 1


def encode_value(spec: RegisterSpec, value: float) -> tuple[int, ...]:
    """Register words holding ``value`` (the inverse of :func:`decode_value`).

    Integer types round to the nearest step and saturate at the type's limits, as an
    instrument's output does; float32 saturates at the largest finite float32.
    """
    raw = (value - spec.offset) / spec.scale
    if spec.type == "float32":
        limit = struct.unpack(">f", b"\x7f\x7f\xff\xff")[0]
        raw = raw if math.isnan(raw) else min(max(raw, -limit), limit)
        return _split_words(spec, struct.pack(">f", raw))
    if not math.isfinite(raw):
        raise ValueError(f"{spec.name}: {value!r} cannot be encoded")
    lo, hi = _int_limits(spec)
    code = min(max(round(raw), lo), hi)
    return _split_words(spec, code.to_bytes(2 * spec.count, "big", signed=lo < 0))


@dataclass(frozen=True, slots=True)
class ReadGroup:
    """Neighbouring registers of one table, fetched with one request."""

    table: str
    start: int
    quantity: int
    registers: tuple[RegisterSpec, ...]

    @property
    def function(self) -> int:
        return TABLE_FUNCTIONS[self.table]


def plan_reads(
    registers: Sequence[RegisterSpec], max_quantity: int = MAX_QUANTITY
) -> tuple[ReadGroup, ...]:
    """Group contiguous registers of the same table into as few requests as possible.

    Gaps are never bridged: an unmapped address in between may answer ILLEGAL DATA ADDRESS.
    """
    groups: list[ReadGroup] = []
    for table in TABLE_FUNCTIONS:
        current: list[RegisterSpec] = []
        for spec in sorted((r for r in registers if r.table == table), key=lambda r: r.address):
            if current and (
                spec.address != current[-1].end or spec.end - current[0].address > max_quantity
            ):
                groups.append(_group(table, current))
                current = []
            current.append(spec)
        if current:
            groups.append(_group(table, current))
    return tuple(groups)


def _group(table: str, specs: list[RegisterSpec]) -> ReadGroup:
    start = specs[0].address
    return ReadGroup(table, start, specs[-1].end - start, tuple(specs))


# --------------------------------------------------------------------------------------------
# Options


@dataclass(frozen=True, slots=True)
class IdentityCheck:
    """A register that must hold a known value (a model code, a firmware id)."""

    table: str
    address: int
    value: int


@dataclass(frozen=True)
class ModbusOptions:
    slave: int
    registers: tuple[RegisterSpec, ...]
    timeout: float = RESPONSE_TIMEOUT
    retries: int = RETRIES
    max_registers: int = MAX_QUANTITY
    identity: IdentityCheck | None = None


def parse_modbus_options(opts: Options) -> ModbusOptions:
    slave = opts.integer("slave", 1, minimum=1, maximum=247)
    timeout = opts.number("timeout", RESPONSE_TIMEOUT, above=0.0, maximum=MAX_RESPONSE_TIMEOUT)
    retries = opts.integer("retries", RETRIES, minimum=0, maximum=10)
    max_registers = opts.integer("max_registers", MAX_QUANTITY, minimum=2, maximum=MAX_QUANTITY)
    word_order = opts.choice("word_order", "big", WORD_ORDERS)
    identity = None
    if opts.has("identity"):
        t = opts.table("identity")
        identity = IdentityCheck(
            table=t.choice("table", "holding", tuple(TABLE_FUNCTIONS)),
            address=t.integer("address", minimum=0, maximum=0xFFFF),
            value=t.integer("value", minimum=0, maximum=0xFFFF),
        )
        t.finish()
    entries = opts.tables("register")
    if not entries:
        raise opts.error("register", "list at least one [[sensor.options.register]] table")
    registers: list[RegisterSpec] = []
    for r in entries:
        spec = _parse_register(r, word_order)
        for j, other in enumerate(registers):
            if other.name == spec.name:
                raise r.error("name", f"{spec.name!r} is already used by register[{j}]")
            if other.table == spec.table and spec.address < other.end and other.address < spec.end:
                raise r.error(
                    "address",
                    f"{spec.table} registers {spec.address}..{spec.end - 1} overlap "
                    f"register[{j}] ({other.name}, {other.address}..{other.end - 1})",
                )
        registers.append(spec)
    opts.finish()
    return ModbusOptions(
        slave=slave,
        registers=tuple(registers),
        timeout=timeout,
        retries=retries,
        max_registers=max_registers,
        identity=identity,
    )


def _parse_register(r: Options, default_word_order: str) -> RegisterSpec:
    name = r.string("name")
    if not _CHANNEL_NAME.match(name):
        raise r.error("name", f"{name!r} must be a letter then letters, digits or '_'")
    table = r.choice("table", "holding", tuple(TABLE_FUNCTIONS))
    address = r.integer("address", minimum=0, maximum=0xFFFF)
    kind = r.choice("type", "u16", tuple(TYPES))
    if address + TYPES[kind] > 0x10000:
        raise r.error("address", f"a {kind} at {address} runs past register 65535")
    scale = r.number("scale", 1.0)
    if scale == 0:
        raise r.error("scale", "must not be 0")
    offset = r.number("offset", 0.0)
    if TYPES[kind] == 1 and r.has("word_order"):
        raise r.error("word_order", f"applies to 32-bit types only, not {kind}")
    word_order = r.choice("word_order", default_word_order, WORD_ORDERS)
    if kind == "float32":
        resolution = r.number("resolution", FLOAT_RESOLUTION, above=0.0)
    elif r.has("resolution"):
        raise r.error(
            "resolution", f"applies to float32 only; a {kind} register resolves to |scale|"
        )
    else:
        resolution = abs(scale)
    r.finish()
    return RegisterSpec(name, table, address, kind, scale, offset, word_order, resolution)


# --------------------------------------------------------------------------------------------
# The driver


class ModbusExceptionError(DeviceIOError):
    """The slave answered with a Modbus exception response (``code``, ``exception_name``)."""

    def __init__(self, message: str, *, slave: int, function: int, code: int) -> None:
        super().__init__(message)
        self.slave = slave
        self.function = function
        self.code = code
        self.exception_name = exception_name(code)


class ModbusInstrument(BaseDriver):
    """A Modbus RTU slave whose registers are mapped to channels by the configuration.

    Built as ``ModbusInstrument(port, options)`` with ``port`` an :class:`AsyncSerial` and
    ``options`` what :meth:`parse_options` returned (a register map is required).
    """

    part: ClassVar[str] = "modbus"
    transport: ClassVar[str] = "serial"

    def __init__(self, port: AsyncSerial, options: ModbusOptions | None = None) -> None:
        self.port = port
        self.options = options if options is not None else parse_modbus_options(Options({}))
        self._specs = {spec.name: spec for spec in self.options.registers}
        self._plan = plan_reads(self.options.registers, self.options.max_registers)
        baudrate = getattr(port.port, "baudrate", None)
        baudrate = baudrate if isinstance(baudrate, int) and baudrate > 0 else 9600
        self._silence = silence_interval(baudrate)
        self._char_time = char_time(baudrate)
        self._last_io = 0.0  # time.monotonic() of the end of the last exchange (worker thread)

    def __str__(self) -> str:
        return f"{self.port.name} slave {self.options.slave}"

    @classmethod
    def parse_options(cls, opts: Options) -> ModbusOptions:
        return parse_modbus_options(opts)

    @classmethod
    def channels_for(cls, options: Any) -> tuple[str, ...]:
        return tuple(spec.name for spec in options.registers)

    @property
    def plan(self) -> tuple[ReadGroup, ...]:
        """The requests one :meth:`read` sends."""
        return self._plan

    async def open(self) -> Identity:
        """Check the identity register if configured and read every register once."""
        identity = self.options.identity
        detail = ""
        try:
            if identity is not None:
                request = ReadRequest(
                    self.options.slave, TABLE_FUNCTIONS[identity.table], identity.address, 1
                )
                found = (await self._request(request)).registers[0]
                if found != identity.value:
                    raise DeviceNotFound(
                        f"{self}: {identity.table} register {identity.address} holds "
                        f"0x{found:04X}, expected 0x{identity.value:04X}: another instrument "
                        "answers at this slave id; check the slave id and [sensor.options.identity]"
                    )
                detail = f", {identity.table} register {identity.address} = 0x{found:04X}"
            await self.read()
        except ModbusExceptionError as err:
            raise DeviceNotFound(f"{err}; check the register map in [sensor.options]") from err
        except DeviceTimeout as err:
            raise DeviceNotFound(
                f"{err}; check wiring, power, the slave id and the baud rate"
            ) from err
        except DeviceDataError as err:
            raise DeviceNotFound(
                f"{err}; garbled answers: check the baud rate, parity and bus termination"
            ) from err
        logger.info(
            "modbus open device=%s registers=%d requests=%d",
            self,
            len(self.options.registers),
            len(self._plan),
        )
        return Identity(
            self.part,
            f"slave {self.options.slave} at {self.port.name}: "
            f"{_count(len(self.options.registers), 'register')} in "
            f"{_count(len(self._plan), 'request')}{detail}",
        )

    async def read(self) -> dict[str, float]:
        values: dict[str, float] = {}
        for group in self._plan:
            request = ReadRequest(self.options.slave, group.function, group.start, group.quantity)
            words = (await self._request(request)).registers
            for spec in group.registers:
                at = spec.address - group.start
                values[spec.name] = decode_value(spec, words[at : at + spec.count])
        return {spec.name: values[spec.name] for spec in self.options.registers}

    def resolution(self, channel: str) -> float:
        try:
            return self._specs[channel].resolution
        except KeyError:
            raise KeyError(f"{channel!r} is not a channel of {self}") from None

    # ----------------------------------------------------------------------------------------
    async def _request(self, request: ReadRequest) -> ReadResponse:
        """Send ``request`` and return the validated answer, repeating it ``retries`` times."""
        attempts = 1 + self.options.retries
        last: DeviceTimeout | DeviceIOError | None = None
        for attempt in range(1, attempts + 1):
            try:
                frame = await self.port.transact(lambda p: self._exchange(p, request))
                return self._check(frame, request)
            except ModbusExceptionError as err:
                if err.code not in RETRYABLE_EXCEPTIONS:
                    raise
                last = err
            except (DeviceTimeout, DeviceDataError) as err:
                last = err
            if attempt < attempts:
                logger.warning(
                    "modbus retry device=%s function=0x%02X address=%d quantity=%d "
                    "attempt=%d/%d error=%s",
                    self,
                    request.function,
                    request.address,
                    request.quantity,
                    attempt,
                    attempts,
                    last,
                )
        assert last is not None
        if isinstance(last, ModbusExceptionError):
            raise last
        raise type(last)(f"{last} (gave up after {attempts} attempts)") from last

    def _exchange(self, port: Any, request: ReadRequest) -> bytes:
        """One request and its answer, on the port's worker thread (blocking)."""
        if port.timeout != self.options.timeout:
            port.timeout = self.options.timeout
        quiet = time.monotonic() - self._last_io
        if quiet < self._silence:
            time.sleep(self._silence - quiet)
        try:
            port.reset_input_buffer()  # stale bytes: late answers, line noise
            port.write(request.to_bytes())
            port.flush()
            # one deadline for the whole answer: the timeout, plus the answer's time on the wire
            deadline = (
                time.monotonic() + self.options.timeout + request.response_size * self._char_time
            )
            head = port.read(3)
            if len(head) < 3:
                return bytes(head)
            size = EXCEPTION_SIZE if head[1] == request.function | EXCEPTION_BIT else 0
            size = size or request.response_size
            port.timeout = max(deadline - time.monotonic(), MIN_READ)
            return bytes(head) + bytes(port.read(size - 3))
        finally:
            self._last_io = time.monotonic()

    def _check(self, frame: bytes, request: ReadRequest) -> ReadResponse:
        where = f"{self}: {request.describe()}"
        if not frame:
            raise DeviceTimeout(f"{where}: no answer within {self.options.timeout:g} s")
        try:
            response = check_response(frame, request)
        except FrameError as err:
            raise DeviceDataError(f"{where}: {err}") from err
        if isinstance(response, ExceptionResponse):
            raise ModbusExceptionError(
                f"{where}: exception 0x{response.code:02X} {response.name}",
                slave=response.slave,
                function=response.function,
                code=response.code,
            )
        return response


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"
