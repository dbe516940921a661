"""Modbus RTU: published frames on the wire, conversions, options, and the real master driver
(minimalmodbus over pyserial) on a pty against the simulated slave, with every fault knob."""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
from dataclasses import dataclass, replace
from types import SimpleNamespace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.errors import (
    ConfigError,
    DeviceDataError,
    DeviceIOError,
    DeviceNotFound,
    DeviceTimeout,
)
from agent.sense.hardware import Hardware
from agent.service.config import loads
from drivers.base import Options
from drivers.bus import AsyncSerial, open_serial
from drivers.clock import RealClock
from drivers.modbus import (
    EXCEPTION_NAMES,
    ModbusExceptionError,
    ModbusInstrument,
    RegisterSpec,
    decode_value,
    encode_value,
    exception_name,
    plan_reads,
)
from drivers.registry import driver_class
from drivers.sim.faults import Faults
from drivers.sim.modbus import ModbusSlaveSim
from drivers.sim.modbus import adu as sim_adu
from drivers.sim.serialport import PtyPort

# Response timeouts. Answers normally come within milliseconds, but the suite shares two cores
# with other work, so a rig expecting answers waits up to TIMEOUT; a test that expects silence
# (each silent attempt costs its whole timeout) uses SHORT.
TIMEOUT = 1.0
SHORT = 0.2

REGISTERS = [
    {"name": "flow_lpm", "table": "input", "address": 0, "type": "float32"},
    {"name": "totalizer_l", "table": "input", "address": 2, "type": "u32", "scale": 0.1},
    {
        "name": "pressure_bar",
        "table": "input",
        "address": 4,
        "type": "s16",
        "scale": 0.001,
        "offset": 1.0,
    },
    {"name": "level_pct", "table": "input", "address": 10, "type": "u16", "scale": 0.01},
    {
        "name": "setpoint",
        "table": "holding",
        "address": 100,
        "type": "float32",
        "word_order": "little",
        "scale": 2.0,
        "offset": -1.0,
        "resolution": 0.01,
    },
    {"name": "delta", "table": "holding", "address": 102, "type": "s32", "word_order": "little"},
]
MAP = {"slave": 7, "timeout": TIMEOUT, "register": REGISTERS}


def parse(raw: dict) -> object:
    return ModbusInstrument.parse_options(Options(raw))


class Scripted(random.Random):
    """A Faults rng whose random() walks a fixed cycle, so intermittent faults are exact."""

    def __init__(self, values: list[float]) -> None:
        super().__init__(0)
        self._cycle = itertools.cycle(values)

    def random(self) -> float:
        return next(self._cycle)


@dataclass
class Rig:
    sim: ModbusSlaveSim
    pty: PtyPort
    port: AsyncSerial
    driver: ModbusInstrument

    def close(self) -> None:
        self.port.close()
        self.pty.close()

    def notes(self) -> list[str]:
        return [e.note for e in self.pty.traffic]


@pytest.fixture
def make_rig():
    """Build driver + pty + simulated slave; ``sim_raw`` lets the slave differ from the driver."""
    made: list[Rig] = []
    clock = RealClock()

    def make(raw: dict = MAP, sim_raw: dict | None = None) -> Rig:
        options = parse(raw)
        sim = ModbusSlaveSim(clock, parse(sim_raw) if sim_raw is not None else options)
        pty = PtyPort(sim, clock)
        port = AsyncSerial(open_serial(pty.path, baudrate=9600, timeout=TIMEOUT), clock)
        rig = Rig(sim, pty, port, ModbusInstrument(port, options))
        made.append(rig)
        return rig

    yield make
    for rig in made:
        rig.close()


@pytest.fixture
def rig(make_rig) -> Rig:
    return make_rig()


# --------------------------------------------------------------------------------------------
# Frames on the wire. The driver has no frame code of its own (minimalmodbus builds and checks
# the frames): what it sends is captured by the pty, and the expected bytes are published ones.


def u16_map(slave: int, table: str, address: int, quantity: int, **extra: object) -> dict:
    """A register map of ``quantity`` u16 registers from ``address``: one request."""
    registers = [{"name": f"r{i}", "table": table, "address": address + i} for i in range(quantity)]
    return {"slave": slave, "timeout": TIMEOUT, "register": registers, **extra}


@pytest.mark.parametrize(
    ("slave", "table", "address", "quantity", "published"),
    [
        # the classic read request (10 holding registers from 0 of slave 1)
        (1, "holding", 0, 10, "01 03 00 00 00 0A C5 CD"),
        # Beckhoff BC8x50 "Function 3: READ HOLDING REGISTERS" example
        (11, "holding", 0x0800, 2, "0B 03 08 00 00 02 C6 C1"),
        # read input register 10 of slave 7 (the rig's level_pct)
        (7, "input", 10, 1, "07 04 00 0A 00 01 11 AE"),
    ],
)
async def test_request_frames_on_the_wire(
    make_rig, slave: int, table: str, address: int, quantity: int, published: str
) -> None:
    rig = make_rig(u16_map(slave, table, address, quantity))
    rig.sim.set_channel("r0", 0x1234)
    got = await rig.driver.read()
    assert got["r0"] == 0x1234
    assert [e.request for e in rig.pty.traffic] == [bytes.fromhex(published)]


async def test_published_answer_is_decoded(make_rig) -> None:
    # Wikipedia "Modbus" RTU frame example: a read input registers response, 0xFFFF
    rig = make_rig(u16_map(1, "input", 0, 1))
    rig.sim.set_channel("r0", 0xFFFF)
    assert (await rig.driver.read())["r0"] == 65535.0
    assert rig.pty.traffic[-1].response == bytes.fromhex("01 04 02 FF FF B8 80")


class Canned:
    """An instrument that answers every request with the same bytes (it checks nothing)."""

    part = "canned"

    def __init__(self, answer: bytes) -> None:
        self.faults = Faults()
        self.answer = answer
        self.frame_gap = 0.004  # t3.5 at 9600 baud
        self.seen: list[bytes] = []

    def on_bytes(self, data: bytes) -> bytes:
        self.seen.append(data)
        return self.answer


@pytest.fixture
def canned_driver():
    """A driver reading input registers 0..1 of slave 5 from a :class:`Canned` instrument."""
    opened: list[tuple[PtyPort, AsyncSerial]] = []
    clock = RealClock()

    def make(answer: bytes) -> ModbusInstrument:
        pty = PtyPort(Canned(answer), clock)
        port = AsyncSerial(open_serial(pty.path, baudrate=9600, timeout=SHORT), clock)
        opened.append((pty, port))
        options = parse({**u16_map(5, "input", 0, 2), "retries": 0, "timeout": SHORT})
        return ModbusInstrument(port, options)

    yield make
    for pty, port in opened:
        port.close()
        pty.close()


GOOD = sim_adu(5, bytes.fromhex("04 04 00 01 00 02"))


async def test_canned_good_answer_is_decoded(canned_driver) -> None:
    driver = canned_driver(GOOD)
    assert await driver.read() == {"r0": 1.0, "r1": 2.0}


@pytest.mark.parametrize(
    ("expected", "answer"),
    [
        ("answer from another slave", sim_adu(6, bytes.fromhex("04 04 00 01 00 02"))),
        ("answer to another function", sim_adu(5, bytes.fromhex("03 04 00 01 00 02"))),
        ("answer to another function", sim_adu(5, bytes.fromhex("83 02"))),
        ("register count does not match", sim_adu(5, bytes.fromhex("04 02 00 01"))),
        ("byte count does not match", sim_adu(5, bytes.fromhex("04 02 00 01 00 02"))),
        ("CRC mismatch", GOOD[:5]),
        ("CRC mismatch", GOOD[:-1] + bytes([GOOD[-1] ^ 1])),
        ("truncated answer", GOOD[:2]),
    ],
)
async def test_answers_that_do_not_answer_the_request_are_data_errors(
    canned_driver, expected: str, answer: bytes
) -> None:
    driver = canned_driver(answer)
    with pytest.raises(DeviceDataError, match=expected) as info:
        await driver.read()
    assert "input registers 0..1" in str(info.value)
    assert answer[:4].hex(" ") in str(info.value)  # the bytes that came back are quoted


@pytest.mark.parametrize("code", [*sorted(EXCEPTION_NAMES), 0x09])
async def test_exception_answers_are_reported_by_name(make_rig, code: int) -> None:
    rig = make_rig({**MAP, "register": [REGISTERS[3]], "retries": 0, "timeout": SHORT})
    rig.sim.refuse_with = code
    with pytest.raises(ModbusExceptionError) as info:
        await rig.driver.read()
    err = info.value
    assert isinstance(err, DeviceIOError)
    assert (err.slave, err.function, err.code) == (7, 4, code)
    assert err.exception_name == exception_name(code)
    assert f"exception 0x{code:02X} {exception_name(code)}" in str(err)
    assert "input registers 10..10" in str(err)


@pytest.mark.parametrize(
    ("code", "hint"),
    [
        (0x01, "table"),
        (0x02, "register map"),
        (0x04, "fault of its own"),
        (0x06, "busy"),
        (0x0B, "gateway"),
        (0x09, "manual"),
    ],
)
async def test_an_exception_at_open_says_what_to_look_at_for_its_code(
    make_rig, code: int, hint: str
) -> None:
    """An exception answer at open is said with what its code points at: a slave device failure
    or a busy instrument is not a wrong register map (the hint said so for every code)."""
    rig = make_rig({**MAP, "register": [REGISTERS[3]], "retries": 0, "timeout": SHORT})
    rig.sim.refuse_with = code
    with pytest.raises(DeviceNotFound) as info:
        await rig.driver.open()
    text = str(info.value)
    assert f"exception 0x{code:02X}" in text and hint in text.rpartition(";")[2]
    assert ("register map" in text) == (code in (0x02, 0x03, 0x09))


def test_exception_names_follow_the_spec() -> None:
    assert EXCEPTION_NAMES[0x01] == "ILLEGAL FUNCTION"
    assert EXCEPTION_NAMES[0x02] == "ILLEGAL DATA ADDRESS"
    assert EXCEPTION_NAMES[0x03] == "ILLEGAL DATA VALUE"
    assert EXCEPTION_NAMES[0x04] == "SERVER DEVICE FAILURE"
    assert EXCEPTION_NAMES[0x0B] == "GATEWAY TARGET DEVICE FAILED TO RESPOND"
    assert 0x09 not in EXCEPTION_NAMES
    assert exception_name(0x09) == "UNKNOWN EXCEPTION 0x09"


async def test_busy_is_retried_then_reported(make_rig) -> None:
    rig = make_rig({**MAP, "register": [REGISTERS[3]], "timeout": SHORT})
    rig.sim.refuse_with = 0x06
    with pytest.raises(ModbusExceptionError, match="SERVER DEVICE BUSY") as info:
        await rig.driver.read()
    assert info.value.code == 0x06
    assert len(rig.sim.requests) == 3  # 1 try + 2 retries


async def test_busy_once_is_asked_again(make_rig) -> None:
    rig = make_rig({**MAP, "register": [REGISTERS[3]], "timeout": SHORT})
    rig.sim.set_channel("level_pct", 7.5)
    rig.sim.refuse_with = 0x06
    answer = rig.sim.on_bytes

    def busy_once(data: bytes) -> bytes:
        out = answer(data)
        rig.sim.refuse_with = None
        return out

    rig.sim.on_bytes = busy_once  # type: ignore[method-assign]
    assert (await rig.driver.read())["level_pct"] == pytest.approx(7.5)
    assert len(rig.sim.requests) == 2


# --------------------------------------------------------------------------------------------
# Conversions (pure)


def spec(kind: str, **kw: object) -> RegisterSpec:
    return RegisterSpec("x", "holding", 0, kind, **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("register", "words", "value"),
    [
        (spec("u16"), (0xFFFF,), 65535.0),
        (spec("s16"), (0xFFFF,), -1.0),
        (spec("s16"), (0x8000,), -32768.0),
        (spec("u32"), (0x0001, 0x0000), 65536.0),
        (spec("u32", word_order="little"), (0x0000, 0x0001), 65536.0),
        (spec("s32"), (0xFFFF, 0xFFFE), -2.0),
        (spec("s32", word_order="little"), (0xFFFE, 0xFFFF), -2.0),
        (spec("float32"), (0x3F80, 0x0000), 1.0),
        (spec("float32", word_order="little"), (0x0000, 0x3F80), 1.0),
        (spec("float32"), (0xC120, 0x0000), -10.0),
        (spec("s16", scale=0.1, offset=-40.0), (0x00FA,), -15.0),
    ],
)
def test_decode_known_words(register: RegisterSpec, words: tuple[int, ...], value: float) -> None:
    assert decode_value(register, words) == pytest.approx(value)
    assert encode_value(register, value) == words


@pytest.mark.parametrize(
    ("register", "words", "message"),
    [
        (spec("float32"), (0x7FC0, 0x0000), "x: register holds nan"),
        (spec("float32"), (0x7F80, 0x0000), "x: register holds inf"),
        (spec("float32", word_order="little"), (0x0000, 0xFF80), "x: register holds -inf"),
        (
            spec("float32", scale=1e300),
            (0x7F7F, 0xFFFF),
            r"x: 3.4\d*e\+38 \* 1e\+300 \+ 0 overflows",
        ),
    ],
)
def test_decode_refuses_values_that_are_no_number(
    register: RegisterSpec, words: tuple[int, ...], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        decode_value(register, words)


def test_encode_saturates_integer_types() -> None:
    assert encode_value(spec("u16"), -5.0) == (0,)
    assert encode_value(spec("u16"), 1e9) == (0xFFFF,)
    assert encode_value(spec("s16"), -1e9) == (0x8000,)
    assert encode_value(spec("s32"), 1e12) == (0x7FFF, 0xFFFF)


def test_plan_groups_neighbours_of_one_table() -> None:
    options = parse(MAP)
    plan = plan_reads(options.registers)
    assert [(g.table, g.start, g.quantity) for g in plan] == [
        ("holding", 100, 4),
        ("input", 0, 5),
        ("input", 10, 1),
    ]
    assert [r.name for r in plan[1].registers] == ["flow_lpm", "totalizer_l", "pressure_bar"]


def test_plan_respects_max_registers() -> None:
    registers = [RegisterSpec(f"r{i}", "input", 2 * i, "u32") for i in range(10)]
    plan = plan_reads(registers, max_quantity=6)
    assert [(g.start, g.quantity) for g in plan] == [(0, 6), (6, 6), (12, 6), (18, 2)]
    assert sum(len(g.registers) for g in plan) == 10


# --------------------------------------------------------------------------------------------
# Options, through the configuration loader so the key paths are the operator's


def config_text(registers: str, extra: str = "") -> str:
    return f"""
[agent]
device_id = "pump-1"

[[sensor]]
name = "flow"
driver = "modbus"
interval = 1.0
port = "/dev/ttyUSB0"
baudrate = 19200
channels = ["flow_lpm"]

[sensor.options]
slave = 3
{extra}
{registers}
"""


FLOW = """
[[sensor.options.register]]
name = "flow_lpm"
table = "input"
address = 0
type = "float32"
"""


def test_config_builds_channels_from_the_register_map() -> None:
    config = loads(config_text(FLOW))
    sensor = config.sensor("flow")
    assert driver_class("modbus") is ModbusInstrument
    assert ModbusInstrument.transport == "serial"
    assert ModbusInstrument.channels_for(sensor.options) == ("flow_lpm",)
    assert sensor.options.slave == 3
    assert sensor.options.timeout == 0.5
    assert sensor.options.retries == 2
    assert sensor.options.registers[0].resolution == 0.001


@pytest.mark.parametrize(
    ("registers", "path", "message"),
    [
        ("", "sensor[0].options.register", "at least one"),
        (
            FLOW + '[[sensor.options.register]]\nname = "flow_lpm"\naddress = 9\n',
            "sensor[0].options.register[1].name",
            "already used by register[0]",
        ),
        (
            FLOW + '[[sensor.options.register]]\nname = "t"\ntable = "input"\naddress = 1\n',
            "sensor[0].options.register[1].address",
            "overlap register[0]",
        ),
        (
            '[[sensor.options.register]]\nname = "flow_lpm"\naddress = 0\ntype = "f64"\n',
            "sensor[0].options.register[0].type",
            "not one of",
        ),
        (
            '[[sensor.options.register]]\nname = "flow_lpm"\naddress = 0\nresolution = 0.5\n',
            "sensor[0].options.register[0].resolution",
            "float32 only",
        ),
        (
            '[[sensor.options.register]]\nname = "flow_lpm"\naddress = 0\nword_order = "big"\n',
            "sensor[0].options.register[0].word_order",
            "32-bit types only",
        ),
        (
            '[[sensor.options.register]]\nname = "flow_lpm"\naddress = 0\nscale = 0\n',
            "sensor[0].options.register[0].scale",
            "must not be 0",
        ),
        (
            '[[sensor.options.register]]\nname = "flow_lpm"\naddress = 65535\ntype = "u32"\n',
            "sensor[0].options.register[0].address",
            "runs past",
        ),
        (
            '[[sensor.options.register]]\nname = "flow_lpm"\naddress = 0\nunit = "l"\n',
            "sensor[0].options.register[0].unit",
            "unknown key",
        ),
    ],
)
def test_bad_register_entries_name_their_path(registers: str, path: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        loads(config_text(registers))
    assert info.value.path == path
    assert message in info.value.message


async def test_an_instrument_at_the_modbus_default_framing_8e1_can_be_configured() -> None:
    """The serial line standard makes even parity the default (SL 2.5.1: 8E1; no parity needs
    two stop bits), and the driver counts 11 bits a character, but the port always opened 8N1
    and no key could change it: an instrument at its factory framing never answered, while
    the error said to check the parity. Now ``framing`` (default "8N1") sets it."""
    text = config_text(FLOW).replace("baudrate = 19200", 'baudrate = 19200\nframing = "8E1"')
    sensor = loads(text).sensor("flow")
    clock = RealClock()
    sim = ModbusSlaveSim(clock, sensor.options)
    sim.set_channel("flow_lpm", 12.5)
    pty = PtyPort(sim, clock)
    hardware = Hardware(SimpleNamespace(sensors=(sensor,), simulation=None), clock)
    try:
        driver = hardware.driver(replace(sensor, port=pty.path))
        await driver.open()
        assert (await driver.read())["flow_lpm"] == 12.5
        line = driver.port.port._serial
        assert (line.bytesize, line.parity, line.stopbits) == (8, "E", 1)
    finally:
        hardware.close()
        pty.close()
    for framing in ("8X1", "9N1", "8E3", "8e1"):
        with pytest.raises(ConfigError) as info:
            loads(text.replace('"8E1"', f'"{framing}"'))
        assert info.value.path == "sensor[0].framing"


def test_bad_identity_and_slave_name_their_path() -> None:
    with pytest.raises(ConfigError) as info:
        loads(config_text(FLOW, 'identity = { table = "coil", address = 1, value = 2 }'))
    assert info.value.path == "sensor[0].options.identity.table"
    with pytest.raises(ConfigError) as info:
        loads(config_text(FLOW).replace("slave = 3", "slave = 248"))
    assert info.value.path == "sensor[0].options.slave"


def test_resolution_per_channel(rig: Rig) -> None:
    driver = rig.driver
    assert driver.resolution("flow_lpm") == 0.001  # float32 default
    assert driver.resolution("setpoint") == 0.01  # float32, configured
    assert driver.resolution("totalizer_l") == pytest.approx(0.1)  # |scale|
    assert driver.resolution("pressure_bar") == pytest.approx(0.001)
    with pytest.raises(KeyError):
        driver.resolution("nope")


# --------------------------------------------------------------------------------------------
# The driver against the simulated slave, through a pty

F32_MAX = 1e4  # float32 channels tested over +-1e4: rounding (2^-24 relative) stays < resolution

VALUES = st.fixed_dictionaries(
    {
        "flow_lpm": st.floats(-F32_MAX, F32_MAX),
        "totalizer_l": st.floats(0.0, (2**32 - 1) * 0.1),
        "pressure_bar": st.floats(-32.768 + 1.0, 32.767 + 1.0),
        "level_pct": st.floats(0.0, 655.35),
        "setpoint": st.floats(-F32_MAX, F32_MAX),
        "delta": st.integers(-(2**31), 2**31 - 1).map(float),
    }
)


def bound(register: RegisterSpec, value: float) -> float:
    """How far a read may be from the value set.

    Integer types round to the nearest step: half a step (|scale|/2). float32 rounds the raw
    value to a 24-bit significand: |raw| * 2^-24 * |scale|. Plus double rounding of the scale
    arithmetic, 1e-12 relative.
    """
    if register.type == "float32":
        raw = (value - register.offset) / register.scale
        step = abs(raw) * 2.0**-24 * abs(register.scale)
    else:
        step = abs(register.scale) / 2
    return step + 1e-12 * max(1.0, abs(value))


@settings(
    max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(values=VALUES)
async def test_round_trip_every_type_scale_and_word_order(rig: Rig, values: dict) -> None:
    for name, value in values.items():
        rig.sim.set_channel(name, value)
    got = await rig.driver.read()
    assert list(got) == [r["name"] for r in REGISTERS]
    for register in rig.driver.options.registers:
        value = values[register.name]
        assert abs(got[register.name] - value) <= bound(register, value), register.name
        assert abs(got[register.name] - value) <= rig.driver.resolution(register.name)


@pytest.mark.parametrize(
    ("words", "shown"),
    [((0x7FC0, 0x0000), "nan"), ((0x7F80, 0x0000), "inf"), ((0xFF80, 0), "-inf")],
)
async def test_float32_nan_or_infinity_is_a_data_error_naming_the_channel(
    rig: Rig, words: tuple[int, int], shown: str
) -> None:
    """Hostile input: a flow meter's "no value" (NaN) or an overrange (inf) in a float32
    register is refused, never passed on as a measured value."""
    rig.sim.set_register("input", 0, words[0])
    rig.sim.set_register("input", 1, words[1])
    identity = await rig.driver.open()  # the instrument answers: it is there
    assert "slave 7" in identity.detail
    with pytest.raises(DeviceDataError, match=f"flow_lpm: register holds {shown}; check"):
        await rig.driver.read()
    rig.sim.set_channel("flow_lpm", 12.5)
    assert (await rig.driver.read())["flow_lpm"] == 12.5


async def test_one_read_sends_one_request_per_group(rig: Rig) -> None:
    await rig.driver.read()
    sent = list(rig.sim.requests)
    assert [(r.function, r.address, r.quantity) for r in sent] == [
        (3, 100, 4),
        (4, 0, 5),
        (4, 10, 1),
    ]
    assert all(r.slave == 7 for r in sent)


async def test_open_reads_the_map_and_reports_identity(rig: Rig) -> None:
    identity = await rig.driver.open()
    assert identity.part == "modbus"
    assert "slave 7" in identity.detail
    assert "6 registers in 3 requests" in identity.detail


async def test_identity_register_checked_on_open(make_rig) -> None:
    raw = {**MAP, "identity": {"table": "holding", "address": 200, "value": 0x1234}}
    rig = make_rig(raw)
    identity = await rig.driver.open()
    assert "0x1234" in identity.detail
    rig.sim.set_register("holding", 200, 0x4321)
    with pytest.raises(DeviceNotFound, match="0x4321, expected 0x1234"):
        await rig.driver.open()


async def test_wrong_slave_id_is_not_found(make_rig) -> None:
    rig = make_rig({**MAP, "slave": 8, "retries": 0, "timeout": SHORT}, sim_raw=MAP)
    with pytest.raises(DeviceNotFound, match=r"no answer.*slave id"):
        await rig.driver.open()
    assert rig.sim.ignored >= 1  # the slave saw the frame and kept quiet, as it must


async def test_unmapped_register_gives_illegal_data_address(make_rig) -> None:
    ghost = {"name": "ghost", "table": "input", "address": 50}
    rig = make_rig({**MAP, "register": [*REGISTERS, ghost]}, sim_raw=MAP)
    with pytest.raises(ModbusExceptionError) as info:
        await rig.driver.read()
    err = info.value
    assert isinstance(err, DeviceIOError)
    assert err.code == 0x02
    assert err.exception_name == "ILLEGAL DATA ADDRESS"
    assert "ILLEGAL DATA ADDRESS" in str(err)
    assert "input registers 50..50" in str(err)
    assert len(rig.sim.requests) == 4  # exceptions are final: no retry
    with pytest.raises(DeviceNotFound, match=r"ILLEGAL DATA ADDRESS.*register map"):
        await rig.driver.open()


def exchange(rig: Rig, frame: bytes, size: int) -> bytes:
    """Send raw bytes to the slave through the pty and read up to ``size`` bytes back."""
    port = rig.port.port
    port.reset_input_buffer()
    port.write(frame)
    return port.read(size)


@pytest.mark.parametrize(
    ("frame", "answer"),
    [
        # read coils: this slave has no coils -> 01 ILLEGAL FUNCTION
        ("07 01 00 00 00 08 3D AA", "07 81 01 61 91"),
        # write single register to an unmapped holding register -> 02 ILLEGAL DATA ADDRESS
        ("07 06 00 00 00 01 48 6C", "07 86 02 23 A0"),
        # quantity 0 and 126 -> 03 ILLEGAL DATA VALUE
        ("07 03 00 64 00 00 04 73", "07 83 03 E1 30"),
        ("07 04 00 00 00 7E 70 4C", "07 84 03 E3 00"),
        # unmapped and partly mapped ranges -> 02 ILLEGAL DATA ADDRESS
        ("07 04 00 06 00 01 D1 AD", "07 84 02 22 C0"),
        ("07 04 00 04 00 02 30 6C", "07 84 02 22 C0"),
        ("07 03 00 00 00 01 84 6C", "07 83 02 20 F0"),
    ],
)
def test_slave_exceptions_on_the_wire(rig: Rig, frame: str, answer: str) -> None:
    assert exchange(rig, bytes.fromhex(frame), 5) == bytes.fromhex(answer)


@pytest.mark.parametrize(
    "frame",
    [
        "07 04 00 00 00 01 31 00",  # bad CRC (31 AC)
        "09 04 00 00 00 01 30 82",  # another slave
        "00 04 00 00 00 01 30 1B",  # broadcast: reads are never answered
        "07",  # runt
    ],
)
def test_slave_stays_silent(rig: Rig, frame: str) -> None:
    rig.port.port.timeout = SHORT
    assert exchange(rig, bytes.fromhex(frame), 16) == b""
    assert rig.sim.ignored == 1


def test_slave_answers_mapped_registers_on_the_wire(rig: Rig) -> None:
    rig.sim.set_channel("level_pct", 12.34)
    answer = exchange(rig, bytes.fromhex("07 04 00 0A 00 01 11 AE"), 7)
    assert answer == bytes.fromhex("07 04 02 04 D2 B3 AD")  # 1234


# Fault knobs ---------------------------------------------------------------------------------


async def test_disconnect_times_out_after_retries_then_recovers(make_rig) -> None:
    rig = make_rig({**MAP, "timeout": SHORT})
    rig.sim.set_channel("level_pct", 5.0)
    rig.sim.faults.disconnect = True
    with pytest.raises(DeviceTimeout, match="after 3 attempts"):
        await rig.driver.read()
    assert rig.notes().count("disconnect") == 3  # first group: 1 try + 2 retries
    assert not rig.sim.requests
    rig.sim.faults.clear()
    assert (await rig.driver.read())["level_pct"] == pytest.approx(5.0)


async def test_nack_is_no_answer(make_rig) -> None:
    rig = make_rig({**MAP, "timeout": SHORT})
    rig.sim.faults.nack = 1.0
    with pytest.raises(DeviceTimeout, match="after 3 attempts"):
        await rig.driver.read()
    assert rig.notes().count("nack") == 3
    rig.sim.faults.clear()
    await rig.driver.read()


async def test_intermittent_nack_is_recovered_by_a_retry(make_rig) -> None:
    # one group, so one lost try; its timeout is paid in full, so keep it moderate
    rig = make_rig({**MAP, "register": [REGISTERS[0]], "timeout": 2 * SHORT})
    rig.sim.set_channel("flow_lpm", 3.25)
    rig.sim.faults.nack = 0.5
    rig.sim.faults.rng = Scripted([0.1, 0.9])  # the first try is lost, the retry answered
    assert (await rig.driver.read())["flow_lpm"] == 3.25
    assert rig.notes() == ["nack", ""]
    assert len(rig.sim.requests) == 1


async def test_bad_crc_is_a_data_error(rig: Rig) -> None:
    rig.sim.faults.bad_crc = 1.0
    with pytest.raises(DeviceDataError, match=r"CRC mismatch.*after 3 attempts"):
        await rig.driver.read()
    assert len(rig.sim.requests) == 3
    rig.sim.faults.clear()
    await rig.driver.read()


async def test_intermittent_bad_crc_is_recovered_by_a_retry(rig: Rig) -> None:
    rig.sim.set_channel("pressure_bar", 1.5)
    rig.sim.faults.bad_crc = 0.5
    rig.sim.faults.rng = Scripted([0.1, 0.9])  # every other answer corrupted
    got = await rig.driver.read()
    assert got["pressure_bar"] == pytest.approx(1.5)
    assert len(rig.sim.requests) == 6  # three groups, each answered on its second try


async def test_a_retry_warning_does_not_quote_the_answer(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    """Attack on the data policy: a garbled answer holds the registers' values (a `local`
    channel's among them); the driver's retry warning goes to the log ring, which the `logs`
    command uploads. It says what was wrong and how long the answer was, not its bytes; the
    error of a read that gave up quotes them (the sampler withholds it for such a sensor)."""
    caplog.set_level(logging.WARNING, logger="drivers.modbus")
    rig.sim.set_channel("pressure_bar", 1.5)  # s16 register 500 = 01 F4
    rig.sim.faults.bad_crc = 0.5
    rig.sim.faults.rng = Scripted([0.1, 0.9])  # every other answer corrupted
    assert (await rig.driver.read())["pressure_bar"] == pytest.approx(1.5)
    retries = [r.getMessage() for r in caplog.records if "modbus retry" in r.getMessage()]
    assert len(retries) == 3 and all("CRC mismatch (answer of " in m for m in retries)
    assert not any("01 f4" in m for m in retries), retries
    rig.sim.faults.bad_crc = 1.0
    rig.sim.faults.rng = random.Random(1)
    with pytest.raises(DeviceDataError, match=r"CRC mismatch \(\d+ bytes: 07 0[34] .*after 3"):
        await rig.driver.read()


async def test_without_retries_one_bad_answer_fails_the_read(make_rig) -> None:
    rig = make_rig({**MAP, "retries": 0})
    rig.sim.faults.bad_crc = 1.0
    with pytest.raises(DeviceDataError, match="after 1 attempts"):
        await rig.driver.read()
    assert len(rig.sim.requests) == 1


async def test_bit_flip_is_caught_by_the_crc(rig: Rig) -> None:
    rig.sim.faults.bit_flip = 1.0
    with pytest.raises(DeviceDataError):
        await rig.driver.read()
    rig.sim.faults.clear()
    rig.sim.set_channel("delta", -7.0)
    assert (await rig.driver.read())["delta"] == -7.0


async def test_slow_answer_beyond_the_timeout(make_rig) -> None:
    rig = make_rig({**MAP, "retries": 0, "timeout": SHORT})
    rig.sim.set_channel("level_pct", 1.0)
    rig.sim.faults.slow = 3 * SHORT
    with pytest.raises(DeviceTimeout, match=r"no answer within 0\.2 s"):
        await rig.driver.read()
    rig.sim.faults.clear()
    assert await asyncio.to_thread(rig.pty.wait_idle, 5.0)
    rig.sim.set_channel("level_pct", 2.0)
    # the late answer sits in the input buffer now; the master flushes it before asking again
    patient = ModbusInstrument(rig.port, parse(MAP))
    assert (await patient.read())["level_pct"] == pytest.approx(2.0)


async def test_slow_answer_within_the_timeout(rig: Rig) -> None:
    rig.sim.faults.slow = SHORT / 2  # well inside TIMEOUT
    rig.sim.set_channel("level_pct", 3.0)
    assert (await rig.driver.read())["level_pct"] == pytest.approx(3.0)
    assert "busy" not in rig.notes()


async def test_stuck_registers_freeze_until_cleared(rig: Rig) -> None:
    rig.sim.set_channel("flow_lpm", 10.0)
    assert (await rig.driver.read())["flow_lpm"] == 10.0
    rig.sim.faults.stuck = True
    rig.sim.set_channel("flow_lpm", 20.0)
    assert (await rig.driver.read())["flow_lpm"] == 10.0  # the driver cannot tell by itself
    rig.sim.set_channel("flow_lpm", 30.0)
    assert (await rig.driver.read())["flow_lpm"] == 10.0
    rig.sim.faults.clear()
    assert (await rig.driver.read())["flow_lpm"] == 30.0


async def test_stale_input_is_flushed_before_a_request(rig: Rig) -> None:
    rig.sim.set_channel("level_pct", 4.0)
    rig.pty.send(bytes.fromhex("07 04 02 27 0F 6A C4") + b"\x00noise")  # 9999
    for _ in range(200):  # wait until the bytes sit in the driver's input buffer
        if rig.port.port.in_waiting:
            break
        await asyncio.sleep(0.005)
    assert rig.port.port.in_waiting
    assert (await rig.driver.read())["level_pct"] == pytest.approx(4.0)
