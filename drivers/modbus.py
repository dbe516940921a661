"""Modbus RTU master for register-mapped serial instruments (flow meters, transmitters on RS-485).

The wire protocol is minimalmodbus's: this module keeps the register map (which registers, how
they are grouped into requests, how their words become channel values), the options, the retry
policy and the errors. minimalmodbus does the rest, on the port the agent opened:

- RTU framing and CRC-16/MODBUS (reflected polynomial 0xA001, preset 0xFFFF, low byte first:
  "MODBUS over Serial Line Specification and Implementation Guide V1.02", section 2.5.1 and
  Appendix B), the checks of an answer (length, CRC, slave address, function code, byte count);
- the inter-frame silence t3.5 (3.5 characters of 11 bits, 1.750 ms above 19200 baud, V1.02
  section 2.5.1.1): it sleeps before a request until the line has been quiet that long;
- exception responses (function code | 0x80, one exception code byte: "MODBUS Application
  Protocol Specification V1.1b3", section 7).

Only functions 0x03 Read Holding Registers and 0x04 Read Input Registers are used, quantity
1..125 (V1.1b3 sections 6.3 and 6.4). The slave simulator (``drivers.sim.modbus``) is written from
the specifications on its own; ``tests/hil/test_sim_protocols.py`` checks the frames this driver
puts on the wire, and the answers it accepts, against published ones.

Why minimalmodbus (2.1, Apache-2.0 like this project) and not pymodbus (BSD-3-Clause):

- footprint: one pure-Python module (a 32 kB wheel) whose only dependency is pyserial, which the
  agent has anyway; pymodbus is several times larger and brings client, server, simulator and
  framers we would not use;
- the threading model: its calls block, which is what the agent's one worker thread per bus wants
  (``AsyncSerial.transact`` runs the whole exchange off the event loop); pymodbus is asyncio-first,
  and its synchronous client is a layer over that design;
- ports: it accepts an already opened pyserial port (since 2.1), so the port stays the one
  ``drivers.bus.open_serial`` opened with ``serial.serial_for_url``: a device path, a URL handler
  or the simulator's pty. pymodbus's serial client opens the port itself;
- Python 3.8 to 3.12 (3.11 here). Maintenance: pymodbus is far more active (frequent releases),
  but its API moves within 3.x (``unit=`` became ``slave=``, then ``device_id=``); minimalmodbus
  changes rarely (2.1.1, 2023), which suits a protocol that does not change, and a single module
  is easy to vendor should it stop being maintained.

What minimalmodbus does not give, this module adds: the exception code itself (the library
raises one class for codes 01 to 03 and lets 05 ACKNOWLEDGE through as a wrong function code),
read from the answer it already validated; the read deadline (the library reads the predicted
answer size in one read within the port's timeout, so the timeout is stretched by the answer's
time on the wire). An exception answer is shorter than the predicted size, so it is complete only
when that deadline passes: a refusal costs one timeout, which for SERVER DEVICE BUSY doubles as
the pause before the retry.

The register map comes from the configuration, so the instrument's channels do too: each
``[[sensor.options.register]]`` entry is one channel named by its ``name``. Registers of the same
table that sit next to each other are read in one request.

Values: ``value = raw * scale + offset`` where ``raw`` is the register content read as ``u16``,
``s16``, ``u32``, ``s32`` or ``float32`` (32-bit types span two registers; ``word_order = "big"``
puts the high word first, ``"little"`` the low word first; bytes within a register are always
big-endian, as Modbus sends them).

Options (``[sensor.options]``):

- ``slave`` (1..247, default 1); ``timeout``: seconds to wait for an answer (default 0.5, at most
  2); ``retries``: repeats of a request that got no answer, a garbled one or SERVER DEVICE BUSY
  (default 2; each is logged as a warning that gives a garbled answer's length, not its bytes,
  which hold readings; the error of a read that gave up quotes them); ``max_registers``: most
  registers per request (default 125); ``word_order`` (default "big"): the default for 32-bit
  registers;
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
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import minimalmodbus

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
#: Default number of repeats of a request that got no answer, a garbled one or BUSY.
RETRIES = 2
#: Bits per RTU character: start + 8 data + parity (or a second stop bit) + stop (V1.02 2.5.1).
CHAR_BITS = 11
#: Bytes of a read answer besides the register data: slave, function, byte count, CRC (2).
ANSWER_OVERHEAD = 5
#: Characters on the line before an answer can begin: the request (8) after the silence t3.5.
REQUEST_CHARS = 8 + 4
#: Most answer bytes quoted in an error message.
QUOTED_BYTES = 16

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
#: An exception answer carries the request's function code with this bit set (V1.1b3 7).
EXCEPTION_BIT = 0x80

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

#: minimalmodbus's InvalidResponseError messages (2.1) by how they start -> what failed, in
#: this driver's words. Anything else is quoted as the library says it.
INVALID_ANSWERS: tuple[tuple[str, str], ...] = (
    ("Checksum error", "CRC mismatch"),
    ("Too short", "truncated answer"),
    ("Wrong return slave address", "answer from another slave"),
    ("Wrong functioncode", "answer to another function"),
    ("Wrong given number of bytes", "byte count does not match the answer"),
    ("The register data length is wrong", "register count does not match the request"),
)
WRONG_FUNCTION = "answer to another function"

#: Register types: name -> registers used.
TYPES: dict[str, int] = {"u16": 1, "s16": 1, "u32": 2, "s32": 2, "float32": 2}
WORD_ORDERS = ("big", "little")
#: Resolution of a float32 channel when the register entry does not give one (channel unit).
FLOAT_RESOLUTION = 0.001

_CHANNEL_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,62}$")


def exception_name(code: int) -> str:
    return EXCEPTION_NAMES.get(code, f"UNKNOWN EXCEPTION 0x{code:02X}")


#: What an exception answer at open asks the operator to look at, by code (V1.1b3 7): only
#: 0x01..0x03 are about the request the register map makes.
EXCEPTION_HINTS: dict[int, str] = {
    0x01: "the instrument does not serve this table: check each register's table in "
    "[sensor.options]",
    0x02: "check the register map in [sensor.options] (addresses)",
    0x03: "check the register map in [sensor.options] (types and counts)",
    0x04: "the instrument reports a fault of its own: check the instrument",
    0x05: "the instrument is busy with a long command: it is opened again later",
    0x06: "the instrument is busy: it is opened again later",
    0x07: "the instrument refused the request: check its manual for this exception",
    0x08: "the instrument reports a memory fault: check the instrument",
    0x0A: "a Modbus gateway answered: check the gateway's routing to this slave id",
    0x0B: "a Modbus gateway answered for a slave that did not: check the slave id, and the "
    "instrument's wiring and power behind the gateway",
}


def exception_hint(code: int) -> str:
    return EXCEPTION_HINTS.get(code, "check the instrument's manual and the register map")


def read_deadline(timeout: float, quantity: int, baudrate: int) -> float:
    """Seconds one read may take: ``timeout`` plus the answer's time on the wire."""
    return timeout + (ANSWER_OVERHEAD + 2 * quantity) * CHAR_BITS / baudrate


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
    """Channel value from register words: ``raw * scale + offset``.

    Raises ValueError naming the register when the value is NaN or infinite: float32 registers
    hold NaN as an instrument's "no value", and a large raw value can overflow the scale.
    """
    raw = raw_value(spec, words)
    if not math.isfinite(raw):
        raise ValueError(f"{spec.name}: register holds {raw!r}")
    value = raw * spec.scale + spec.offset
    if not math.isfinite(value):
        raise ValueError(f"{spec.name}: {raw!r} * {spec.scale:g} + {spec.offset:g} overflows")
    return value


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

    def describe(self) -> str:
        return f"{self.table} registers {self.start}..{self.start + self.quantity - 1}"


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


class _LibraryPort:
    """The serial port as minimalmodbus 2.1 uses it, over the port the agent hands the driver.

    That port may be a pyserial port or one with only the methods the serial drivers use
    (``agent.sense.hardware`` hands over a port that opens itself on first use and again after
    an I/O error). So the library is told the port is open and never opens or closes it itself:
    a port that is really closed fails the write, which ``AsyncSerial`` reports as a
    DeviceIOError. The library reads an answer with one ``read``; the bytes are kept here, for
    the exception code of a refusal (the library reports it by class and message only) and for
    the bytes an error message quotes.
    """

    is_open = True

    def __init__(self, port: Any) -> None:
        self.wrapped = port
        self.answer = b""

    @property
    def port(self) -> Any:  # the library's key for the time of the last answer on this line
        return getattr(self.wrapped, "port", None) or getattr(self.wrapped, "name", None)

    @property
    def baudrate(self) -> int:
        return _baudrate(self.wrapped)

    @property
    def timeout(self) -> float:
        return self.wrapped.timeout

    def open(self) -> None:
        """Never called (``is_open``); present because the library checks for it."""

    def close(self) -> None:
        """Never called (the library keeps the port open); the port is the agent's to close."""

    def reset_input_buffer(self) -> None:
        self.wrapped.reset_input_buffer()

    def reset_output_buffer(self) -> None:
        reset = getattr(self.wrapped, "reset_output_buffer", None)
        if reset is not None:
            reset()

    def write(self, data: bytes) -> int | None:
        return self.wrapped.write(data)

    def flush(self) -> None:
        self.wrapped.flush()

    def read(self, size: int = 1) -> bytes:
        data = bytes(self.wrapped.read(size))
        self.answer = data
        return data


def _baudrate(port: Any) -> int:
    baudrate = getattr(port, "baudrate", None)
    return baudrate if isinstance(baudrate, int) and baudrate > 0 else 9600


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
        self._line, self._instrument = self._instrument_on(port.port)

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
                probe = ReadGroup(identity.table, identity.address, 1, ())
                found = (await self._request(probe))[0]
                if found != identity.value:
                    raise DeviceNotFound(
                        f"{self}: {identity.table} register {identity.address} holds "
                        f"0x{found:04X}, expected 0x{identity.value:04X}: another instrument "
                        "answers at this slave id; check the slave id and [sensor.options.identity]"
                    )
                detail = f", {identity.table} register {identity.address} = 0x{found:04X}"
            for group in self._plan:  # every request answers (a NaN value is read()'s to report)
                await self._request(group)
        except ModbusExceptionError as err:
            raise DeviceNotFound(f"{err}; {exception_hint(err.code)}") from err
        except DeviceTimeout as err:
            raise DeviceNotFound(
                f"{err}; check wiring, power, the slave id and the baud rate"
            ) from err
        except DeviceDataError as err:
            raise DeviceNotFound(
                f"{err}; garbled answers: check the baud rate, the framing (parity) and bus "
                "termination"
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
            words = await self._request(group)
            for spec in group.registers:
                at = spec.address - group.start
                try:
                    values[spec.name] = decode_value(spec, words[at : at + spec.count])
                except ValueError as err:
                    raise DeviceDataError(
                        f"{self}: {err}; check the instrument for a fault, and the register map"
                    ) from err
        return {spec.name: values[spec.name] for spec in self.options.registers}

    def longest_attempt(self) -> float:
        """Each request of an open (the identity register, then the plan's) and of a read, tried
        ``1 + retries`` times, each time its request and its read deadline."""
        o = self.options
        baudrate = _baudrate(self.port.port)
        quantities = [g.quantity for g in self._plan] * 2 + ([1] if o.identity else [])
        request = REQUEST_CHARS * CHAR_BITS / baudrate
        return (1 + o.retries) * sum(
            request + read_deadline(o.timeout, q, baudrate) for q in quantities
        )

    def resolution(self, channel: str) -> float:
        try:
            return self._specs[channel].resolution
        except KeyError:
            raise KeyError(f"{channel!r} is not a channel of {self}") from None

    # ----------------------------------------------------------------------------------------
    async def _request(self, group: ReadGroup) -> tuple[int, ...]:
        """Read ``group``'s registers, repeating the request ``retries`` times."""
        attempts = 1 + self.options.retries
        last: DeviceTimeout | DeviceIOError | None = None
        for attempt in range(1, attempts + 1):
            try:
                return await self.port.transact(lambda p: self._exchange(p, group))
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
                    group.function,
                    group.start,
                    group.quantity,
                    attempt,
                    attempts,
                    self._unquoted(last),
                )
        assert last is not None
        if isinstance(last, ModbusExceptionError):
            raise last
        raise type(last)(f"{last} (gave up after {attempts} attempts)") from last

    def _exchange(self, port: Any, group: ReadGroup) -> tuple[int, ...]:
        """One request and its answer through minimalmodbus, on the port's worker thread."""
        deadline = read_deadline(self.options.timeout, group.quantity, _baudrate(port))
        if port.timeout != deadline:
            port.timeout = deadline
        where = f"{self}: {group.describe()}"
        if port is not self._line.wrapped:
            self._line, self._instrument = self._instrument_on(port)
        self._line.answer = b""
        try:
            words = self._instrument.read_registers(group.start, group.quantity, group.function)
        except minimalmodbus.NoResponseError as err:
            raise DeviceTimeout(f"{where}: no answer within {self.options.timeout:g} s") from err
        except minimalmodbus.SlaveReportedException as err:
            raise self._refusal(where, group, str(err)) from err
        except minimalmodbus.InvalidResponseError as err:
            message = str(err)
            kind = next(
                (ours for theirs, ours in INVALID_ANSWERS if message.startswith(theirs)), ""
            )
            if kind == WRONG_FUNCTION and self._refused(group):
                # 05 ACKNOWLEDGE: minimalmodbus lets it through, then finds the function wrong
                raise self._refusal(where, group, message) from err
            raise DeviceDataError(f"{where}: {kind or message}{self._quote()}") from err
        except minimalmodbus.ModbusException as err:  # any other kind the library may add
            raise DeviceIOError(f"{where}: {err}") from err
        return tuple(words)

    def _instrument_on(self, port: Any) -> tuple[_LibraryPort, minimalmodbus.Instrument]:
        """The library's instrument on ``port`` (no I/O: the port is used at the first read)."""
        line = _LibraryPort(port)
        instrument = minimalmodbus.Instrument(line, self.options.slave)
        instrument.clear_buffers_before_each_transaction = True  # late answers, line noise
        return line, instrument

    def _refused(self, group: ReadGroup) -> bool:
        """Whether the last answer is an exception answer to ``group``'s request."""
        answer = self._line.answer
        return len(answer) >= 3 and answer[1] == group.function | EXCEPTION_BIT

    def _refusal(self, where: str, group: ReadGroup, message: str) -> DeviceIOError:
        """The error for an exception answer the library validated (CRC, slave address)."""
        if not self._refused(group):  # an exception answer, but to another function
            return DeviceDataError(f"{where}: {WRONG_FUNCTION} ({message}){self._quote()}")
        code = self._line.answer[2]
        return ModbusExceptionError(
            f"{where}: exception 0x{code:02X} {exception_name(code)}",
            slave=self.options.slave,
            function=group.function,
            code=code,
        )

    def _unquoted(self, err: Exception) -> str:
        """``err``'s text with the answer's length instead of its bytes, for a retry's warning:
        the bytes hold the registers' values, and a log line may leave the device (the agent's
        ``logs`` command) where a channel's values may not. The error of a read that gave up
        quotes them (the agent withholds that text for such a sensor)."""
        text, quote = str(err), self._quote()
        if quote and text.endswith(quote):
            return f"{text.removesuffix(quote)} (answer of {len(self._line.answer)} bytes)"
        return text

    def _quote(self) -> str:
        answer = self._line.answer
        if not answer:
            return ""
        more = " ..." if len(answer) > QUOTED_BYTES else ""
        return f" ({len(answer)} bytes: {answer[:QUOTED_BYTES].hex(' ')}{more})"


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"
