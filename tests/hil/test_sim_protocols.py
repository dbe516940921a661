"""Known answers from the protocol specifications, checked on both sides of the wire.

The serial simulators (``drivers.sim.modbus``, ``drivers.sim.line``) are written from the
specifications without the drivers' code; here every published frame, check value and line is
checked against the simulator *and* against the driver (``drivers.modbus``, ``drivers.line``), so
a mistake on either side fails, whichever side made it. The Modbus driver has no frame code of its
own (minimalmodbus frames, checks and times its exchanges), so its side is checked on the wire:
the bytes it sends are captured by the pty and compared with the published requests, and the
published answers are sent to it and must be decoded (or refused) as published.

Sources:

- CRC RevEng catalogue, CRC-16/MODBUS: width 16, poly 0x8005 reflected (0xA001), init 0xFFFF,
  check value 0x4B37 for the ASCII bytes "123456789".
- "MODBUS over Serial Line Specification and Implementation Guide V1.02" (SL): Appendix B, the CRC
  of ``02 07`` is sent as ``41 12``; 2.5.1.1, t3.5 is 3.5 characters of 11 bits, 1.750 ms above
  19200 baud; 2.1/2.2, address 0 is a broadcast, executed and never answered.
- "MODBUS Application Protocol Specification V1.1b3" (AP): the example PDUs of 6.3 (read holding
  registers 108..110 -> 0x022B, 0x0000, 0x0064), 6.4 (read input register 9 -> 0x000A), 6.6
  (write 0x0003 to register 2), 6.12 (write 0x000A, 0x0102 to registers 2, 3), and the exception
  codes and names of section 7. Framed for slave 1 and slave 17 (0x11), with the CRCs the Simply
  Modbus pages (simplymodbus.ca) and several public Modbus test suites publish for them; the
  exception frame ``0A 81 02 B0 53`` is Simply Modbus's exception example.
- IEEE 754 binary32: 1.0 = 0x3F800000, -10.0 = 0xC1200000.
- NMEA 0183: published sentences with their ``*HH`` checksums; the line format and its example
  ``T=79.34,P=1.021*23`` as ``drivers/line.py`` documents them.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path
from types import SimpleNamespace

import minimalmodbus
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

import drivers.line as drv_line
import drivers.modbus as drv
import drivers.sim.line as sim_line
import drivers.sim.modbus as sim
from drivers.base import Options
from drivers.bus import AsyncSerial, open_serial
from drivers.clock import RealClock
from drivers.errors import DeviceDataError, DriverError
from drivers.sim.faults import Faults
from drivers.sim.serialport import Exchange, PtyPort

ROOT = Path(__file__).resolve().parents[2]
#: What a serial simulator may import besides the standard library (CONVENTIONS.md, "Drivers").
SIM_MAY_IMPORT = ("drivers.clock", "drivers.errors", "drivers.sim")


@pytest.mark.parametrize("module", ["drivers/sim/modbus.py", "drivers/sim/line.py"])
def test_simulators_do_not_import_the_drivers(module: str) -> None:
    """The simulators share no code with the drivers they test: only the standard library,
    the clock, the errors and the other simulator helpers."""
    tree = ast.parse((ROOT / module).read_text(encoding="utf-8"))
    wrong = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = ["drivers.sim" if node.level else (node.module or "")]
        else:
            continue
        for name in names:
            top = name.partition(".")[0]
            if top in sys.stdlib_module_names or top == "__future__":
                continue
            if not any(name == ok or name.startswith(ok + ".") for ok in SIM_MAY_IMPORT):
                wrong.append(f"{module}:{node.lineno}: {name}")
    assert not wrong, "simulator imports outside the allowed set:\n" + "\n".join(wrong)


def frame(text: str) -> bytes:
    return bytes.fromhex(text)


#: Answer timeouts on the pty: generous where an answer is expected (the suite shares two cores),
#: short where the answer is shorter than a read answer (the driver waits out its deadline).
TIMEOUT = 1.0
SHORT = 0.2


def slave_sim(slave: int, **registers: dict[int, int]) -> sim.ModbusSlaveSim:
    """A slave with no configured channels and the given raw registers per table."""
    slave_ = sim.ModbusSlaveSim(RealClock(), SimpleNamespace(slave=slave, registers=()))
    for table, words in registers.items():
        for address, word in words.items():
            slave_.set_register(table, address, word)
    return slave_


def u16_map(
    slave: int, table: str, start: int, quantity: int, timeout: float = TIMEOUT
) -> drv.ModbusOptions:
    """The driver's options for ``quantity`` u16 registers from ``start``: one request."""
    registers = [{"name": f"r{i}", "table": table, "address": start + i} for i in range(quantity)]
    raw = {"slave": slave, "timeout": timeout, "retries": 0, "register": registers}
    return drv.parse_modbus_options(Options(raw))


class Canned:
    """An instrument that answers every request with the same bytes (it checks nothing)."""

    part = "canned"

    def __init__(self, answer: bytes) -> None:
        self.faults = Faults()
        self.answer = answer
        self.frame_gap = sim.t35(9600)

    def on_bytes(self, data: bytes) -> bytes:
        return self.answer


async def driver_read(
    model: object, options: drv.ModbusOptions
) -> tuple[dict[str, float] | DriverError, list[Exchange]]:
    """One read by the real driver, over a pty, from ``model``: the values (or the error) and
    the traffic the instrument saw."""
    clock = RealClock()
    with PtyPort(model, clock) as pty:  # type: ignore[arg-type]
        port = AsyncSerial(open_serial(pty.path, baudrate=9600, timeout=TIMEOUT), clock)
        try:
            result: dict[str, float] | DriverError = await drv.ModbusInstrument(
                port, options
            ).read()
        except DriverError as err:
            result = err
        finally:
            port.close()
        return result, list(pty.traffic)


# --------------------------------------------------------------------------------------------
# CRC-16/MODBUS (the driver's side: the frames it sends and accepts, below)


def test_crc_check_value() -> None:
    assert sim.crc16(b"123456789") == 0x4B37


def test_crc_serial_line_appendix_b() -> None:
    # SL Appendix B: the CRC of 02 07 is 0x1241, its low byte 41 sent first
    assert sim.adu(0x02, b"\x07") == frame("02 07 41 12")


PUBLISHED_FRAMES = {
    "AP 6.3 request, slave 1": "01 03 00 6B 00 03 74 17",
    "AP 6.3 response, slave 1": "01 03 06 02 2B 00 00 00 64 05 7A",
    "AP 6.3 request, slave 17": "11 03 00 6B 00 03 76 87",
    "Simply Modbus FC03 response": "11 03 06 AE 41 56 52 43 40 49 AD",
    "AP 6.4 request, slave 1": "01 04 00 08 00 01 B0 08",
    "AP 6.4 response, slave 1": "01 04 02 00 0A 39 37",
    "AP 6.4 request, slave 17": "11 04 00 08 00 01 B2 98",
    "AP 6.4 response, slave 17": "11 04 02 00 0A F8 F4",
    "AP 6.6 request and echo, slave 1": "01 06 00 01 00 03 98 0B",
    "AP 6.6 request and echo, slave 17": "11 06 00 01 00 03 9A 9B",
    "AP 6.12 request, slave 17": "11 10 00 01 00 02 04 00 0A 01 02 C6 F0",
    "AP 6.12 response, slave 17": "11 10 00 01 00 02 12 98",
    "Simply Modbus exception example": "0A 81 02 B0 53",
    "exception 02 to function 03, slave 1": "01 83 02 C0 F1",
}


@pytest.mark.parametrize("text", PUBLISHED_FRAMES.values(), ids=PUBLISHED_FRAMES.keys())
def test_published_frames_carry_their_crc(text: str) -> None:
    adu = frame(text)
    assert sim.adu(adu[0], adu[1:-2]) == adu
    assert sim.crc_matches(adu)
    broken = adu[:-1] + bytes([adu[-1] ^ 0x01])
    assert not sim.crc_matches(broken)


# --------------------------------------------------------------------------------------------
# Reads: the driver's request, the simulator's answer, the driver's decoding

READS = [
    # slave, function, table, start, words, request frame, response frame
    (1, 0x03, "holding", 0x6B, (0x022B, 0x0000, 0x0064), "01 03 00 6B 00 03 74 17",
     "01 03 06 02 2B 00 00 00 64 05 7A"),
    (0x11, 0x03, "holding", 0x6B, (0xAE41, 0x5652, 0x4340), "11 03 00 6B 00 03 76 87",
     "11 03 06 AE 41 56 52 43 40 49 AD"),
    (1, 0x04, "input", 0x08, (0x000A,), "01 04 00 08 00 01 B0 08", "01 04 02 00 0A 39 37"),
    (0x11, 0x04, "input", 0x08, (0x000A,), "11 04 00 08 00 01 B2 98", "11 04 02 00 0A F8 F4"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("slave", "function", "table", "start", "words", "asked_hex", "answer_hex"), READS
)
async def test_read_known_answers_both_sides(
    slave: int,
    function: int,
    table: str,
    start: int,
    words: tuple[int, ...],
    asked_hex: str,
    answer_hex: str,
) -> None:
    # the simulator answers the published request with the published response
    slave_ = slave_sim(slave, **{table: {start + i: w for i, w in enumerate(words)}})
    assert slave_.on_bytes(frame(asked_hex)) == frame(answer_hex)
    assert slave_.requests[-1] == sim.Request(slave, function, start, len(words))
    # the driver sends the published request and decodes the published response, on the wire
    slave_ = slave_sim(slave, **{table: {start + i: w for i, w in enumerate(words)}})
    got, traffic = await driver_read(slave_, u16_map(slave, table, start, len(words)))
    assert got == {f"r{i}": float(w) for i, w in enumerate(words)}
    assert [(e.request, e.response) for e in traffic] == [(frame(asked_hex), frame(answer_hex))]


@pytest.mark.parametrize(
    ("slave", "function", "table", "start", "words", "asked_hex", "answer_hex"), READS
)
async def test_driver_refuses_a_published_answer_with_a_broken_crc(
    slave: int,
    function: int,
    table: str,
    start: int,
    words: tuple[int, ...],
    asked_hex: str,
    answer_hex: str,
) -> None:
    answer = frame(answer_hex)
    options = u16_map(slave, table, start, len(words))
    got, _ = await driver_read(Canned(answer), options)
    assert got == {f"r{i}": float(w) for i, w in enumerate(words)}
    got, _ = await driver_read(Canned(answer[:-1] + bytes([answer[-1] ^ 0x01])), options)
    assert isinstance(got, DeviceDataError)
    assert "CRC mismatch" in str(got)


def test_two_requests_in_one_quiet_period_get_two_answers() -> None:
    slave_ = slave_sim(1, holding={0x6B: 0x022B, 0x6C: 0, 0x6D: 0x64}, input={8: 10})
    both = frame("01 03 00 6B 00 03 74 17") + frame("01 04 00 08 00 01 B0 08")
    answer = frame("01 03 06 02 2B 00 00 00 64 05 7A") + frame("01 04 02 00 0A 39 37")
    assert slave_.on_bytes(both) == answer


# --------------------------------------------------------------------------------------------
# Writes (the simulator only: the driver reads)


def test_write_single_register_echoes_the_request() -> None:
    for text, slave in (("01 06 00 01 00 03 98 0B", 1), ("11 06 00 01 00 03 9A 9B", 0x11)):
        slave_ = slave_sim(slave, holding={1: 0})
        assert slave_.on_bytes(frame(text)) == frame(text)
        assert slave_.register("holding", 1) == 0x0003
        assert slave_.requests[-1] == sim.Request(slave, 0x06, 1, 1, (3,))


def test_write_multiple_registers_answers_address_and_quantity() -> None:
    slave_ = slave_sim(0x11, holding={1: 0, 2: 0})
    request = frame("11 10 00 01 00 02 04 00 0A 01 02 C6 F0")
    assert slave_.on_bytes(request) == frame("11 10 00 01 00 02 12 98")
    assert (slave_.register("holding", 1), slave_.register("holding", 2)) == (0x000A, 0x0102)


@pytest.mark.parametrize(
    ("pdu", "code"),
    [
        ("10 00 01 00 00 00", 0x03),  # quantity 0
        ("10 00 01 00 7C F8" + "00" * 0xF8, 0x03),  # quantity 124 > 123
        ("10 00 01 00 02 03 00 0A 01", 0x03),  # byte count != 2 x quantity
        ("10 00 01 00 02 04 00 0A 01", 0x03),  # fewer bytes than the byte count says
        ("10 00 02 00 02 04 00 0A 01 02", 0x02),  # register 3 is not mapped
        ("06 00 05 00 01", 0x02),  # register 5 is not mapped
        ("06 00 01 00", 0x03),  # PDU too short
        ("04 00 01 00 01", 0x02),  # input register 1 is not mapped (holding register 1 is)
    ],
)
def test_write_refusals_follow_the_state_diagrams(pdu: str, code: int) -> None:
    slave_ = slave_sim(1, holding={1: 7, 2: 8})
    function = frame(pdu)[0]
    assert slave_.handle(sim.adu(1, frame(pdu))) == sim.exception_frame(1, function, code)
    assert (slave_.register("holding", 1), slave_.register("holding", 2)) == (7, 8)


# --------------------------------------------------------------------------------------------
# Exception responses: codes, layout, names (AP 7)


async def test_exception_frame_known_answer_both_sides() -> None:
    assert sim.exception_frame(10, 0x01, 0x02) == frame("0A 81 02 B0 53")  # Simply Modbus
    # the driver reads holding registers (function 03): the published refusal of that, slave 1
    published = frame("01 83 02 C0 F1")
    assert sim.exception_frame(1, 0x03, 0x02) == published
    got, _ = await driver_read(Canned(published), u16_map(1, "holding", 0, 1, timeout=SHORT))
    assert isinstance(got, drv.ModbusExceptionError)
    assert (got.slave, got.function, got.code) == (1, 0x03, 0x02)
    assert got.exception_name == "ILLEGAL DATA ADDRESS"


@pytest.mark.parametrize(
    ("request_pdu", "code", "name"),
    [
        ("01 00 13 00 25", 0x01, "ILLEGAL FUNCTION"),  # read coils: no coils here
        ("2B 0E 01 00", 0x01, "ILLEGAL FUNCTION"),  # read device identification
        ("03 00 6B 00 03", 0x02, "ILLEGAL DATA ADDRESS"),  # unmapped
        ("03 00 6A 00 02", 0x02, "ILLEGAL DATA ADDRESS"),  # partly mapped
        ("03 FF FF 00 02", 0x02, "ILLEGAL DATA ADDRESS"),  # runs past 0xFFFF
        ("03 00 00 00 00", 0x03, "ILLEGAL DATA VALUE"),  # quantity 0
        ("04 00 00 00 7E", 0x03, "ILLEGAL DATA VALUE"),  # quantity 126 > 125
        ("03 00 00 00 01 00", 0x03, "ILLEGAL DATA VALUE"),  # PDU longer than a read
    ],
)
async def test_simulator_exceptions_are_what_the_driver_names(
    request_pdu: str, code: int, name: str
) -> None:
    slave_ = slave_sim(1, holding={0x6B: 1, 0xFFFF: 2})
    pdu = frame(request_pdu)
    answer = slave_.handle(sim.adu(1, pdu))
    assert answer == sim.adu(1, bytes([pdu[0] | 0x80, code]))
    assert drv.exception_name(code) == name
    # the same refusal of the driver's own request (a holding register read), on the wire
    refusal = sim.exception_frame(1, 0x03, code)
    got, _ = await driver_read(Canned(refusal), u16_map(1, "holding", 0x6B, 1, timeout=SHORT))
    assert isinstance(got, drv.ModbusExceptionError)
    assert (got.function, got.code, got.exception_name) == (0x03, code, name)


async def test_refuse_with_answers_every_request_with_that_exception() -> None:
    slave_ = slave_sim(1, holding={0x6B: 1, 0x6C: 2, 0x6D: 3})
    request = frame("01 03 00 6B 00 03 74 17")
    slave_.refuse_with = 0x04
    assert slave_.on_bytes(request) == sim.adu(1, bytes([0x83, 0x04]))
    options = u16_map(1, "holding", 0x6B, 3, timeout=SHORT)
    for code, name in ((0x04, "SERVER DEVICE FAILURE"), (0x06, "SERVER DEVICE BUSY")):
        slave_.refuse_with = code
        got, traffic = await driver_read(slave_, options)
        assert isinstance(got, drv.ModbusExceptionError)
        assert (got.code, got.exception_name) == (code, name)
        assert traffic[-1].request == request
    slave_.refuse_with = None
    assert slave_.on_bytes(request) == sim.adu(1, frame("03 06 00 01 00 02 00 03"))
    assert (await driver_read(slave_, options))[0] == {"r0": 1.0, "r1": 2.0, "r2": 3.0}


# --------------------------------------------------------------------------------------------
# Addressing and broadcast (SL 2.1, 2.2)


def test_broadcast_writes_are_executed_and_never_answered() -> None:
    slave_ = slave_sim(0x11, holding={1: 0, 2: 0})
    assert slave_.on_bytes(sim.adu(0, frame("06 00 01 00 03"))) == b""
    assert slave_.register("holding", 1) == 3
    assert slave_.on_bytes(sim.adu(0, frame("10 00 01 00 02 04 00 0A 01 02"))) == b""
    assert (slave_.register("holding", 1), slave_.register("holding", 2)) == (0x000A, 0x0102)
    assert slave_.broadcasts == 2
    # a broadcast the slave cannot carry out is not answered either (no exception response)
    assert slave_.on_bytes(sim.adu(0, frame("06 00 09 00 03"))) == b""
    assert slave_.broadcasts == 2
    assert slave_.ignored == 0


@pytest.mark.parametrize(
    "adu",
    [
        sim.adu(0, frame("03 00 01 00 01")),  # a broadcast read: never answered
        sim.adu(0, frame("01 00 00 00 01")),  # a broadcast of an unsupported function
        sim.adu(0x12, frame("03 00 01 00 01")),  # another slave
        sim.adu(248, frame("03 00 01 00 01")),  # a reserved address
        sim.adu(0x11, frame("83 00 01 00 01")),  # the exception flag set in a request
        frame("11 03 00 01 00 01 00 00"),  # bad CRC
        frame("11 03 00"),  # runt
    ],
)
def test_slave_stays_silent(adu: bytes) -> None:
    slave_ = slave_sim(0x11, holding={1: 5})
    assert slave_.on_bytes(adu) == b""
    assert slave_.ignored == 1
    assert slave_.register("holding", 1) == 5


# --------------------------------------------------------------------------------------------
# Timing (SL 2.5.1.1) and register encoding (IEEE 754)


@pytest.mark.parametrize(
    ("baudrate", "seconds"),
    [(1200, 0.0320833), (9600, 0.0040104), (19200, 0.0020052), (38400, 0.00175), (115200, 0.00175)],
)
def test_t35(baudrate: int, seconds: float) -> None:
    assert sim.t35(baudrate) == pytest.approx(seconds, rel=1e-5)
    # the driver's silence is minimalmodbus's (a private function of the library: should it be
    # renamed in a new release, point this at its successor)
    silence = minimalmodbus._calculate_minimum_silent_period(baudrate)
    assert silence == pytest.approx(seconds, rel=1e-5)
    assert sim.ModbusSlaveSim(
        RealClock(), SimpleNamespace(slave=1, registers=()), baudrate=baudrate
    ).frame_gap == pytest.approx(seconds, rel=1e-5)


@pytest.mark.parametrize(
    ("kind", "scale", "offset", "order", "value", "words"),
    [
        ("float32", 1.0, 0.0, "big", 1.0, (0x3F80, 0x0000)),
        ("float32", 1.0, 0.0, "little", 1.0, (0x0000, 0x3F80)),
        ("float32", 1.0, 0.0, "big", -10.0, (0xC120, 0x0000)),
        ("float32", 2.0, -1.0, "big", -21.0, (0xC120, 0x0000)),
        ("u16", 1.0, 0.0, "big", 65535.0, (0xFFFF,)),
        ("s16", 1.0, 0.0, "big", -1.0, (0xFFFF,)),
        ("s16", 1.0, 0.0, "big", -32768.0, (0x8000,)),
        ("s16", 0.1, -40.0, "big", -15.0, (0x00FA,)),
        ("u32", 1.0, 0.0, "big", 65536.0, (0x0001, 0x0000)),
        ("u32", 1.0, 0.0, "little", 65536.0, (0x0000, 0x0001)),
        ("s32", 1.0, 0.0, "big", -2.0, (0xFFFF, 0xFFFE)),
        ("s32", 1.0, 0.0, "little", -2.0, (0xFFFE, 0xFFFF)),
    ],
)
def test_register_encoding_known_answers_both_sides(
    kind: str, scale: float, offset: float, order: str, value: float, words: tuple[int, ...]
) -> None:
    assert sim.register_words(kind, scale, offset, order, value) == words
    spec = drv.RegisterSpec("x", "holding", 0, kind, scale, offset, order)
    assert drv.decode_value(spec, words) == pytest.approx(value)


def test_register_encoding_saturates_like_an_instrument_output() -> None:
    assert sim.register_words("u16", 1.0, 0.0, "big", -5.0) == (0x0000,)
    assert sim.register_words("u16", 1.0, 0.0, "big", 1e9) == (0xFFFF,)
    assert sim.register_words("s16", 1.0, 0.0, "big", -1e9) == (0x8000,)
    assert sim.register_words("s32", 1.0, 0.0, "big", 1e12) == (0x7FFF, 0xFFFF)
    assert sim.register_words("float32", 1.0, 0.0, "big", 1e300) == (0x7F7F, 0xFFFF)
    assert sim.register_words("float32", 1.0, 0.0, "big", float("inf")) == (0x7F80, 0x0000)
    with pytest.raises(ValueError):
        sim.register_words("u16", 1.0, 0.0, "big", float("nan"))


# --------------------------------------------------------------------------------------------
# Properties: the two independent implementations agree everywhere


@settings(max_examples=40, deadline=None)
@given(
    slave=st.integers(1, 247),
    function=st.sampled_from([0x03, 0x04]),
    start=st.integers(0, 0xFFFF),
    words=st.lists(st.integers(0, 0xFFFF), min_size=1, max_size=125),
)
@example(slave=247, function=0x04, start=0xFFFF, words=[0xFFFF])
@example(slave=1, function=0x03, start=0, words=[0x0000] * 125)
async def test_any_read_the_driver_sends_the_simulator_answers(
    slave: int, function: int, start: int, words: list[int]
) -> None:
    """Random requests (the library's CRC) and random answers (the simulator's), on the wire."""
    table = "holding" if function == 0x03 else "input"
    start = min(start, 0x10000 - len(words))  # the driver refuses registers past 0xFFFF
    slave_ = slave_sim(slave)
    for i, word in enumerate(words):
        slave_.set_register(table, start + i, word)
    got, traffic = await driver_read(slave_, u16_map(slave, table, start, len(words)))
    assert got == {f"r{i}": float(w) for i, w in enumerate(words)}
    assert slave_.requests[-1] == sim.Request(slave, function, start, len(words))
    assert slave_.ignored == 0  # every request the driver sent had a good CRC
    assert len(traffic) == 1


# --------------------------------------------------------------------------------------------
# The line format


def line_sim(checksum: str = "xor", **resolution: float) -> sim_line.LineSensorSim:
    keys = tuple(SimpleNamespace(wire=k, channel=k, resolution=r) for k, r in resolution.items())
    options = SimpleNamespace(
        keys=keys, checksum=checksum, mode="poll", command=b"R\r\n", period=1.0
    )
    return sim_line.LineSensorSim(RealClock(), options)


def test_documented_line_both_sides() -> None:
    documented = b"T=79.34,P=1.021*23\r\n"  # drivers/line.py's own example
    sensor = line_sim(T=0.01, P=0.001)
    sensor.set_channel("T", 79.34)
    sensor.set_channel("P", 1.021)
    assert sensor.line() == documented
    assert sensor.on_bytes(b"R\r\n") == documented
    assert drv_line.format_line([("T", "79.34"), ("P", "1.021")]) == documented
    assert drv_line.parse_fields(documented, "xor") == {"T": "79.34", "P": "1.021"}


@pytest.mark.parametrize(
    ("body", "checksum"),
    [
        (b"GPGGA,123519,4807.038,N,01131.000,E,1,08,0.9,545.4,M,46.9,M,,", 0x47),
        (b"GPRMC,155123.000,A,4043.8432,N,07359.7653,W,0.15,83.25,200407,,", 0x28),
        (b"GPGLL,5300.97914,N,00259.98174,E,125926,A", 0x28),
    ],
)
def test_nmea_checksums_both_sides(body: bytes, checksum: int) -> None:
    assert sim_line.checksum_of(body) == checksum
    assert drv_line.xor_checksum(body) == checksum


def test_line_variants_both_sides() -> None:
    sensor = line_sim(T=0.01, P=0.001)
    sensor.set_channel("T", 79.34)
    sensor.set_channel("P", 1.021)
    expected = {"T": "79.34", "P": "1.021"}
    sensor.prefix = "$"  # NMEA style: the checksum leaves the '$' out
    assert sensor.line() == b"$T=79.34,P=1.021*23\r\n"
    assert drv_line.parse_fields(sensor.line(), "xor") == expected
    sensor.prefix, sensor.separator, sensor.checksum = "", " ", False
    assert sensor.line() == b"T=79.34 P=1.021\r\n"
    assert drv_line.format_line(list(expected.items()), checksum=False, separator=" ") == (
        b"T=79.34 P=1.021\r\n"
    )
    assert drv_line.parse_fields(sensor.line(), "optional") == expected
    sensor.checksum = True
    sensor.faults.bad_crc = 1.0
    with pytest.raises(drv_line.LineError, match="checksum mismatch"):
        drv_line.parse_fields(sensor.line(), "xor")


def test_decimals_follow_the_resolution() -> None:
    sensor = line_sim(checksum="none", A=1.0, B=0.1, C=0.005)
    for channel, value in (("A", 12.6), ("B", -0.04), ("C", 2.0)):
        sensor.set_channel(channel, value)
    assert sensor.line() == b"A=13,B=-0.0,C=2.000\r\n"


KEY = st.text("ABCDEFGHIJKLMNOPQRSTUVWXYZ_0123456789", min_size=1, max_size=6)


@settings(max_examples=100, deadline=None)
@given(
    fields=st.dictionaries(KEY, st.floats(-1e6, 1e6).map(lambda v: f"{v:.3f}"), min_size=1),
    checksum=st.booleans(),
    separator=st.sampled_from([",", " "]),
)
def test_line_formatters_agree(fields: dict[str, str], checksum: bool, separator: str) -> None:
    pairs = list(fields.items())
    line = sim_line.render_line(pairs, checksum=checksum, separator=separator)
    assert line == drv_line.format_line(pairs, checksum=checksum, separator=separator)
    assert drv_line.parse_fields(line, "xor" if checksum else "none") == fields
