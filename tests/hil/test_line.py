"""The line sensor: checksum and parsing, options, and the real driver through pyserial on a pty
against the simulated sensor, in poll and stream mode, with every fault knob."""

from __future__ import annotations

import asyncio
import itertools
import random
import socket
import threading
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.errors import ConfigError, DeviceDataError, DeviceNotFound, DeviceTimeout
from agent.service.config import loads
from drivers.base import OptionError, Options
from drivers.bus import AsyncSerial, open_serial
from drivers.clock import RealClock
from drivers.line import (
    LineBuffer,
    LineError,
    LineKey,
    LineSensor,
    extract,
    format_line,
    parse_fields,
    xor_checksum,
)
from drivers.registry import driver_class
from drivers.sim.line import LineSensorSim, decimals_for
from drivers.sim.serialport import PtyPort

# Line timeouts: a rig expecting lines waits up to TIMEOUT (the suite shares two cores with other
# work); a test expecting silence pays its whole timeout, so it uses SHORT.
TIMEOUT = 1.0
SHORT = 0.2
PERIOD = 0.02  # stream period of the simulated sensor

POLL = {
    "keys": ["T", "P", "humidity_pct"],
    "rename": {"T": "temperature_c", "RH": "humidity_pct"},
    "checksum": "xor",
    "timeout": TIMEOUT,
    "resolution": {"P": 0.001, "humidity_pct": 0.1},
}
STREAM = {**POLL, "mode": "stream", "period": PERIOD}


def parse(raw: dict) -> object:
    return LineSensor.parse_options(Options(raw))


class Scripted(random.Random):
    """A Faults rng: random() walks a fixed cycle; randrange() picks the bit to flip."""

    def __init__(self, values: list[float], bit: int = 0) -> None:
        super().__init__(0)
        self._cycle = itertools.cycle(values)
        self._bit = bit

    def random(self) -> float:
        return next(self._cycle)

    def randrange(self, *args: object, **kwargs: object) -> int:
        return self._bit


# --------------------------------------------------------------------------------------------
# Pure: checksum, parsing, line assembly


@pytest.mark.parametrize(
    ("body", "checksum"),
    [
        # published NMEA 0183 sentences (checksum over the bytes between '$' and '*')
        (b"GPGGA,123519,4807.038,N,01131.000,E,1,08,0.9,545.4,M,46.9,M,,", 0x47),
        (b"GPRMC,155123.000,A,4043.8432,N,07359.7653,W,0.15,83.25,200407,,", 0x28),
        (b"GPGLL,5300.97914,N,00259.98174,E,125926,A", 0x28),
    ],
)
def test_xor_checksum_known_sentences(body: bytes, checksum: int) -> None:
    assert xor_checksum(body) == checksum


def test_format_line_fixed_bytes() -> None:
    assert format_line([("T", "79.34"), ("P", "1.021")]) == b"T=79.34,P=1.021*23\r\n"
    assert format_line([("T", "1")], checksum=False, separator=" ") == b"T=1\r\n"
    assert format_line([("T", "1"), ("P", "2")], checksum=False, separator=" ") == b"T=1 P=2\r\n"


def test_parse_fields_accepts_the_documented_forms() -> None:
    expected = {"T": "79.34", "P": "1.021"}
    assert parse_fields(b"T=79.34,P=1.021*23\r\n", "xor") == expected
    assert parse_fields(b"T=79.34,P=1.021*23\n", "xor") == expected
    assert parse_fields(b"T=79.34 P=1.021", "optional") == expected
    assert parse_fields(b"T=79.34, P=1.021", "none") == expected
    assert parse_fields(b"T=79.34,P=1.021*ff", "none") == expected  # ignored when "none"
    line = b"T=79.34 P=1.021"
    assert parse_fields(line + b"*%02x\r\n" % xor_checksum(line), "xor") == expected  # lower hex
    nmea = b"T=5,P=6"
    assert parse_fields(b"$" + nmea + b"*%02X" % xor_checksum(nmea), "xor") == {"T": "5", "P": "6"}


@pytest.mark.parametrize(
    ("line", "mode", "message"),
    [
        (b"T=79.34,P=1.021*5C\r\n", "xor", "checksum mismatch: line carries 5C, computed 23"),
        (b"T=79.34,P=1.021*5C\r\n", "optional", "checksum mismatch"),
        (b"T=79.34,P=1.021\r\n", "xor", "no *HH checksum"),
        (b"T=79.34,P=1.021*2\r\n", "xor", "not two hex digits"),
        (b"T=79.34,P=1.021*ZZ\r\n", "optional", "not two hex digits"),
        (b"\r\n", "none", "empty line"),
        (b"T79.34", "none", "'T79.34' is not key=value"),
        (b"=5", "none", "not key=value"),
        (b"T=", "none", "not key=value"),
        (b"T=1=2", "none", "not key=value"),
        (b"T=1,T=2", "none", "appears twice"),
        (b"T=1\xff", "none", "non-ASCII"),
    ],
)
def test_parse_fields_rejects(line: bytes, mode: str, message: str) -> None:
    with pytest.raises(LineError) as info:
        parse_fields(line, mode)
    assert message in str(info.value)


def test_extract_checks_keys_and_numbers() -> None:
    keys = (LineKey("T", "temperature_c"), LineKey("P", "P"))
    assert extract({"T": "1.5", "P": "-2e3", "ID": "abc"}, keys) == {
        "temperature_c": 1.5,
        "P": -2000.0,
    }
    for fields, message in [
        ({"T": "1.5"}, "key 'P' is missing (keys in the line: T)"),
        ({"T": "1.5", "P": "high"}, "P='high' is not a number"),
        ({"T": "nan", "P": "1"}, "T='nan' is not a number"),
        ({"T": "1", "P": "inf"}, "P='inf' is not a number"),
        ({"T": "1", "P": "1e999"}, "not a finite number"),
    ]:
        with pytest.raises(LineError) as info:
            extract(fields, keys)
        assert message in str(info.value)


@pytest.mark.parametrize(
    "text", ["1_0", "1_000.5", " 1", "1 ", "+-1", "1e", "0x10", "١٢", "Infinity", "-NaN", "."]
)
def test_extract_refuses_what_float_takes_but_no_instrument_sends(text: str) -> None:
    """Attack: digit separators, padding, hex and non-ASCII digits, which Python's float()
    accepts (``T=1_0`` read as 10.0), are refused as not a number."""
    with pytest.raises(LineError, match="is not a number"):
        extract({"T": text}, (LineKey("T", "T"),))


@pytest.mark.parametrize(
    ("text", "value"), [("10", 10.0), ("+.5", 0.5), ("-2.", -2.0), ("1E3", 1e3)]
)
def test_extract_takes_decimal_numbers(text: str, value: float) -> None:
    assert extract({"T": text}, (LineKey("T", "T"),)) == {"T": value}


KEY = st.text("ABCDEFGHIJKLMNOPQRSTUVWXYZ_", min_size=1, max_size=6)


@settings(max_examples=50, deadline=None)
@given(
    fields=st.dictionaries(KEY, st.floats(-1e6, 1e6).map(lambda v: f"{v:.4f}"), min_size=1),
    checksum=st.booleans(),
    separator=st.sampled_from([",", " ", ", "]),
)
def test_format_parse_round_trip(fields: dict, checksum: bool, separator: str) -> None:
    line = format_line(list(fields.items()), checksum=checksum, separator=separator)
    assert parse_fields(line, "xor" if checksum else "optional") == fields


def test_line_buffer_skips_the_partial_first_line_and_keeps_the_newest() -> None:
    buffer = LineBuffer()
    buffer.feed(b"9.34,P=1.0")  # the middle of a line: no line end yet
    assert buffer.newest() is None
    buffer.feed(b"21*23\r\nT=1.00,P=1.000\r\nT=2.00,")
    assert buffer.newest() == b"T=1.00,P=1.000\r\n"
    assert buffer.pending == len(b"T=2.00,")  # the start of the next line is kept
    buffer = LineBuffer()
    buffer.feed(b"=5,P=1.021*23\r\nT=1.00\r\nT=2.00\r\nT=3.")
    assert buffer.newest() == b"T=2.00\r\n"  # the partial first line is skipped, T=1 dropped
    assert buffer.newest() is None  # nothing complete left; "T=3." waits for its end
    buffer.feed(b"00\r\n")
    assert buffer.newest() == b"T=3.00\r\n"
    buffer.resync()
    buffer.feed(b"T=4.00\r\nT=5.00\r\n")
    assert buffer.newest() == b"T=5.00\r\n"  # after a resync the first line is again suspect
    buffer.feed(b"T=6.00\r\n\r\n\n")
    assert buffer.newest() == b"T=6.00\r\n"  # blank lines are not readings
    buffer.feed(b"\r\n")
    assert buffer.newest() is None


def test_line_buffer_drops_a_run_without_line_ends() -> None:
    buffer = LineBuffer()
    buffer.feed(b"\n" + b"x" * 1000)
    assert buffer.pending == 0  # not a line: dropped, and the next line end resyncs
    buffer.feed(b"yyy\nT=1\n")
    assert buffer.newest() == b"T=1\n"


@pytest.mark.parametrize(
    ("resolution", "decimals"), [(1.0, 0), (5.0, 0), (0.1, 1), (0.01, 2), (0.005, 3), (1e-3, 3)]
)
def test_sim_decimals_cover_the_resolution(resolution: float, decimals: int) -> None:
    assert decimals_for(resolution) == decimals


# --------------------------------------------------------------------------------------------
# Options


def test_options_map_keys_to_channels() -> None:
    options = parse(POLL)
    assert [(k.wire, k.channel, k.resolution) for k in options.keys] == [
        ("T", "temperature_c", 0.01),
        ("P", "P", 0.001),
        ("RH", "humidity_pct", 0.1),
    ]
    assert LineSensor.channels_for(options) == ("temperature_c", "P", "humidity_pct")
    assert options.mode == "poll"
    assert options.command == b"R\r\n"
    assert options.timeout == TIMEOUT
    stream = parse({"keys": ["T"], "mode": "stream", "period": 2.0})
    assert stream.timeout == 6.0  # three periods by default
    assert parse({"keys": ["T"]}).checksum == "optional"
    assert parse({"keys": ["T"]}).timeout == 1.0


@pytest.mark.parametrize(
    ("raw", "key", "message"),
    [
        ({}, "keys", "is required"),
        ({"keys": []}, "keys", "at least one"),
        ({"keys": ["T", "T"]}, "keys[1]", "repeats keys[0]"),
        ({"keys": ["T", "temp"], "rename": {"T": "temp"}}, "keys[1]", "repeats keys[0]"),
        ({"keys": ["T-1"]}, "keys[0]", "add it to rename"),
        ({"keys": ["T"], "rename": {"P": "p"}}, "rename.P", "not in keys"),
        ({"keys": ["T"], "rename": {"T": "1t"}}, "rename.T", "must be a letter"),
        ({"keys": ["T"], "resolution": {"P": 0.1}}, "resolution.P", "not one of the channels"),
        ({"keys": ["T"], "resolution": {"T": 0}}, "resolution.T", "greater than 0"),
        ({"keys": ["T"], "checksum": "crc"}, "checksum", "not one of"),
        ({"keys": ["T"], "mode": "stream", "command": "R\n"}, "command", "poll' only"),
        ({"keys": ["T"], "period": 1.0}, "period", "stream' only"),
        ({"keys": ["T"], "mode": "stream", "period": 1.0, "timeout": 2.0}, "timeout", "two"),
        ({"keys": ["T"], "command": ""}, "command", "is empty"),
        ({"keys": ["T"], "baud": 9600}, "baud", "unknown key"),
    ],
)
def test_bad_options_name_their_key(raw: dict, key: str, message: str) -> None:
    with pytest.raises(OptionError) as info:
        parse(raw)
    assert info.value.key == key
    assert message in info.value.message


def test_config_paths_and_channels() -> None:
    text = """
[agent]
device_id = "pump-1"

[[sensor]]
name = "probe"
driver = "line"
interval = 1.0
port = "socket://localhost:7000"
channels = ["temperature_c"]

[sensor.options]
keys = ["T"]
rename = { T = "temperature_c" }
"""
    assert driver_class("line") is LineSensor
    assert LineSensor.transport == "serial"
    sensor = loads(text).sensor("probe")
    assert LineSensor.channels_for(sensor.options) == ("temperature_c",)
    with pytest.raises(ConfigError) as info:
        loads(text.replace('T = "temperature_c"', 'X = "temperature_c"'))
    assert info.value.path == "sensor[0].options.rename.X"


# --------------------------------------------------------------------------------------------
# The driver against the simulated sensor, through a pty


@dataclass
class Rig:
    sim: LineSensorSim
    pty: PtyPort
    port: AsyncSerial
    driver: LineSensor

    def close(self) -> None:
        self.port.close()
        self.pty.close()

    async def fresh_line(self) -> None:
        """Wait until a line formatted after now has been written (stream mode)."""
        target = self.sim.lines + 2  # line n+1 is fully written once line n+2 is formatted
        for _ in range(1000):
            if self.sim.lines >= target:
                return
            await asyncio.sleep(PERIOD / 4)
        raise AssertionError("the simulated sensor stopped streaming")

    async def wait_input(self, size: int) -> None:
        for _ in range(400):
            if self.port.port.in_waiting >= size:
                return
            await asyncio.sleep(0.005)
        raise AssertionError(f"{size} bytes never arrived")


@pytest.fixture
def make_rig():
    made: list[Rig] = []
    clock = RealClock()

    def make(raw: dict = POLL, sim_raw: dict | None = None) -> Rig:
        options = parse(raw)
        sim = LineSensorSim(clock, parse(sim_raw) if sim_raw is not None else options)
        pty = PtyPort(sim, clock)
        port = AsyncSerial(open_serial(pty.path, baudrate=9600, timeout=TIMEOUT), clock)
        rig = Rig(sim, pty, port, LineSensor(port, options))
        made.append(rig)
        return rig

    yield make
    for rig in made:
        rig.close()


@pytest.fixture
def poll(make_rig) -> Rig:
    return make_rig(POLL)


@pytest.fixture
def stream(make_rig) -> Rig:
    return make_rig(STREAM)


VALUES = st.fixed_dictionaries(
    {
        "temperature_c": st.floats(-200.0, 1500.0),
        "P": st.floats(-1e3, 1e3),
        "humidity_pct": st.floats(0.0, 100.0),
    }
)


def assert_close(driver: LineSensor, got: dict, values: dict) -> None:
    """Within half a step: the sim prints enough decimals that rounding moves a value by at most
    half its resolution (plus the float error of parsing the decimal text, 1e-9 here)."""
    assert list(got) == list(LineSensor.channels_for(driver.options))
    for channel, value in values.items():
        assert abs(got[channel] - value) <= driver.resolution(channel) / 2 + 1e-9, channel


@settings(
    max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(values=VALUES)
async def test_poll_round_trip(poll: Rig, values: dict) -> None:
    for channel, value in values.items():
        poll.sim.set_channel(channel, value)
    commands = poll.sim.commands
    assert_close(poll.driver, await poll.driver.read(), values)
    assert poll.sim.commands == commands + 1


@settings(
    max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(values=VALUES)
async def test_stream_round_trip(stream: Rig, values: dict) -> None:
    for channel, value in values.items():
        stream.sim.set_channel(channel, value)
    await stream.fresh_line()
    assert_close(stream.driver, await stream.driver.read(), values)


async def test_open_reports_identity(poll: Rig, stream: Rig) -> None:
    identity = await poll.driver.open()
    assert identity.part == "line"
    assert "poll sensor" in identity.detail and "T, P, RH" in identity.detail
    assert "stream sensor" in (await stream.driver.open()).detail


async def test_open_fails_when_the_lines_lack_a_key(make_rig) -> None:
    rig = make_rig({**POLL, "keys": ["T", "P", "humidity_pct", "Q"]}, sim_raw=POLL)
    with pytest.raises(DeviceNotFound, match="key 'Q' is missing"):
        await rig.driver.open()


async def test_open_fails_when_nothing_answers(make_rig) -> None:
    rig = make_rig({**POLL, "timeout": SHORT})
    rig.sim.faults.disconnect = True
    with pytest.raises(DeviceNotFound, match="no answer"):
        await rig.driver.open()


async def test_custom_command_and_space_separated_lines(make_rig) -> None:
    rig = make_rig({**POLL, "command": "MEAS?\n"})
    rig.sim.separator = " "
    rig.sim.set_channel("P", 0.5)
    assert (await rig.driver.read())["P"] == 0.5
    assert rig.pty.traffic[-1].request == b"MEAS?\n"
    assert b" P=0.500 " in rig.pty.traffic[-1].response


async def test_optional_checksum_accepts_lines_without_one(make_rig) -> None:
    rig = make_rig({**POLL, "checksum": "optional"})
    rig.sim.checksum = False
    rig.sim.set_channel("temperature_c", 21.5)
    assert (await rig.driver.read())["temperature_c"] == 21.5
    strict = LineSensor(rig.port, parse(POLL))
    with pytest.raises(DeviceDataError, match="no \\*HH checksum"):
        await strict.read()


def line_of(t: float) -> bytes:
    return format_line([("T", f"{t:.2f}"), ("P", "1.000"), ("RH", "50.0")])


async def pause(rig: Rig) -> None:
    """Stop the simulated stream and empty the driver's input, so a test sends its own lines."""
    rig.sim.stream_period = None
    assert await asyncio.to_thread(rig.pty.wait_idle, 5.0)
    await asyncio.sleep(0.05)  # let bytes already written reach the tty before flushing them
    rig.port.port.reset_input_buffer()


async def test_stream_reads_the_newest_line_and_drops_older_ones(stream: Rig) -> None:
    await pause(stream)
    stream.pty.send(b"\n" + line_of(1))  # the driver syncs on the first line end
    await stream.wait_input(1 + len(line_of(1)))
    assert (await stream.driver.read())["temperature_c"] == 1.0
    lines = b"".join(line_of(t) for t in (2, 3, 4))
    stream.pty.send(lines)
    await stream.wait_input(len(lines))
    assert (await stream.driver.read())["temperature_c"] == 4.0


async def test_stream_skips_a_partial_first_line(stream: Rig) -> None:
    await pause(stream)
    fresh = LineSensor(stream.port, parse(STREAM))  # just started listening: not in sync
    whole = line_of(7)
    partial = format_line([("T", "99.00"), ("P", "9.000"), ("RH", "9.0")])[3:]
    stream.pty.send(partial + whole)
    await stream.wait_input(len(partial) + len(whole))
    assert (await fresh.read())["temperature_c"] == 7.0


async def test_a_reader_slower_than_the_stream_gets_the_newest_line_not_an_old_one(
    make_rig,
) -> None:
    """A stream that outruns the reader (a sensor at 200 lines a second, read after 2 s) leaves
    more in the input than the kernel's tty buffer hands over at once (4 KiB): the read took the
    newest line of that first, oldest part, a value seconds old, reported as now, and fell
    further behind at each read. Now a full buffer is known to be behind: the driver drops the
    input and takes the next whole line."""
    rig = make_rig({**STREAM, "period": 0.005, "timeout": TIMEOUT})
    await rig.driver.open()
    rig.sim.set_channel("temperature_c", 1.0)
    await asyncio.sleep(2.0)  # about 9 KiB of lines reading 1.0 wait for the reader
    rig.sim.set_channel("temperature_c", 2.0)
    await rig.fresh_line()
    assert (await rig.driver.read())["temperature_c"] == 2.0


class TcpStream:
    """A stream sensor behind a TCP serial server (ser2net style, ``socket://host:port``): it
    sends ``T=<value>`` lines every ``period`` seconds to the one client."""

    def __init__(self, period: float) -> None:
        self.value = 0.0
        self.sent = 0
        self._server = socket.create_server(("127.0.0.1", 0))
        self.url = f"socket://127.0.0.1:{self._server.getsockname()[1]}"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(period,), daemon=True)
        self._thread.start()

    def _run(self, period: float) -> None:
        conn, _ = self._server.accept()
        with conn:
            while not self._stop.wait(period):
                try:
                    conn.sendall(format_line([("T", f"{self.value:.2f}")]))
                except OSError:
                    return
                self.sent += 1

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._server.close()


async def test_a_stream_over_tcp_read_slowly_gets_the_newest_line() -> None:
    """Over socket:// pyserial's in_waiting says 1 whenever anything is waiting, so a read
    took one byte and then the oldest line in the socket's buffer: a slow reader got values
    seconds old, and fell further behind at each read."""
    sensor = TcpStream(0.002)
    options = parse({"keys": ["T"], "mode": "stream", "period": 0.002, "timeout": TIMEOUT})
    port = AsyncSerial(open_serial(sensor.url, timeout=TIMEOUT), RealClock())
    try:
        driver = LineSensor(port, options)
        sensor.value = 1.0
        await driver.open()
        await asyncio.sleep(1.0)  # lines reading 1.0 wait for the reader
        sensor.value = 2.0
        sent = sensor.sent
        while sensor.sent < sent + 3:  # noqa: ASYNC110 (the sensor's thread)
            await asyncio.sleep(0.01)
        assert (await driver.read())["T"] == 2.0
    finally:
        port.close()
        sensor.close()


# Fault knobs ---------------------------------------------------------------------------------


@pytest.mark.parametrize("raw", [POLL, STREAM], ids=["poll", "stream"])
async def test_disconnect_times_out_then_recovers(make_rig, raw: dict) -> None:
    rig = make_rig({**raw, "timeout": SHORT})
    rig.sim.set_channel("P", 0.25)
    rig.sim.faults.disconnect = True
    await asyncio.to_thread(rig.pty.wait_idle, 5.0)
    rig.port.port.reset_input_buffer()
    with pytest.raises(DeviceTimeout, match=r"within 0\.2 s"):
        await rig.driver.read()
    rig.sim.faults.clear()
    assert (await rig.driver.read())["P"] == 0.25


async def test_nack_is_no_answer(make_rig) -> None:
    rig = make_rig({**POLL, "timeout": SHORT})
    rig.sim.faults.nack = 1.0
    with pytest.raises(DeviceTimeout):
        await rig.driver.read()
    rig.sim.faults.rng = Scripted([0.1, 0.9])
    rig.sim.faults.nack = 0.5
    with pytest.raises(DeviceTimeout):
        await rig.driver.read()
    await rig.driver.read()
    assert [e.note for e in rig.pty.traffic][-3:] == ["nack", "nack", ""]


@pytest.mark.parametrize("raw", [POLL, STREAM], ids=["poll", "stream"])
async def test_bad_checksum_is_a_data_error(make_rig, raw: dict) -> None:
    rig = make_rig(raw)
    rig.sim.faults.bad_crc = 1.0
    if raw is STREAM:
        await rig.fresh_line()
    with pytest.raises(DeviceDataError, match="checksum mismatch"):
        await rig.driver.read()
    rig.sim.faults.clear()
    if raw is STREAM:
        await rig.fresh_line()
    await rig.driver.read()


def test_no_single_bit_flip_of_a_checked_line_reads_wrong() -> None:
    """Every one-bit corruption of a line is either refused or harmless (a hex digit's case, a
    CR turned into other white space): never a wrong value."""
    keys = (LineKey("T", "T"), LineKey("P", "P"))
    line = format_line([("T", "79.34"), ("P", "1.021")])
    refused = 0
    for bit in range(len(line) * 8):
        flipped = bytearray(line)
        flipped[bit // 8] ^= 1 << (bit % 8)
        try:
            values = extract(parse_fields(bytes(flipped), "xor"), keys)
        except LineError:
            refused += 1
        else:
            assert values == {"T": 79.34, "P": 1.021}, bytes(flipped)
    assert refused > len(line) * 8 * 3 // 4


@pytest.mark.parametrize("raw", [POLL, STREAM], ids=["poll", "stream"])
async def test_bit_flip_is_caught_by_the_checksum(make_rig, raw: dict) -> None:
    rig = make_rig(raw)
    rig.sim.set_channel("humidity_pct", 42.0)
    rig.sim.faults.bit_flip = 1.0
    rig.sim.faults.rng = Scripted([0.0], bit=2 * 8)  # a digit of the first value
    if raw is STREAM:
        await rig.fresh_line()
    with pytest.raises(DeviceDataError, match="checksum mismatch"):
        await rig.driver.read()
    rig.sim.faults.rng = random.Random(7)  # any bit: refused or harmless, never wrong
    for _ in range(5):
        if raw is STREAM:
            await rig.fresh_line()
        try:
            got = await rig.driver.read()
        except DeviceDataError:
            continue
        assert got["humidity_pct"] == 42.0
    rig.sim.faults.clear()
    rig.sim.set_channel("humidity_pct", 43.0)
    if raw is STREAM:
        await rig.fresh_line()
    assert (await rig.driver.read())["humidity_pct"] == 43.0


async def test_bit_flip_without_a_checksum_reads_wrong(make_rig) -> None:
    rig = make_rig({"keys": ["T"], "checksum": "none", "timeout": TIMEOUT})
    rig.sim.set_channel("T", 79.34)  # the line is b"T=79.34\r\n"
    rig.sim.faults.bit_flip = 1.0
    rig.sim.faults.rng = Scripted([0.0], bit=2 * 8 + 4)  # '7' 0x37 -> 0x27 "'": malformed
    with pytest.raises(DeviceDataError, match="not a number"):
        await rig.driver.read()
    rig.sim.faults.rng = Scripted([0.0], bit=2 * 8)  # '7' 0x37 -> '6' 0x36: still a number
    assert (await rig.driver.read())["T"] == 69.34  # nothing can tell: why checksums exist
    rig.sim.faults.clear()
    assert (await rig.driver.read())["T"] == 79.34


async def test_slow_answer_beyond_the_timeout(make_rig) -> None:
    rig = make_rig({**POLL, "timeout": SHORT})
    rig.sim.faults.slow = 3 * SHORT
    with pytest.raises(DeviceTimeout):
        await rig.driver.read()
    rig.sim.faults.clear()
    assert await asyncio.to_thread(rig.pty.wait_idle, 5.0)
    rig.sim.set_channel("P", 0.75)
    # the late line is in the input buffer; a poll flushes it before asking
    assert (await LineSensor(rig.port, parse(POLL)).read())["P"] == 0.75


async def test_slow_answer_within_the_timeout(poll: Rig) -> None:
    poll.sim.faults.slow = SHORT / 2  # well inside TIMEOUT
    poll.sim.set_channel("P", 0.5)
    assert (await poll.driver.read())["P"] == 0.5


async def test_slow_stream_beyond_the_timeout(make_rig) -> None:
    rig = make_rig({**STREAM, "timeout": SHORT})
    await rig.driver.open()
    rig.sim.faults.slow = 3 * SHORT  # every line now leaves 0.6 s late
    with pytest.raises(DeviceTimeout, match="no complete line"):
        for _ in range(4):  # lines already on their way are still read, then none in time
            await rig.driver.read()
    rig.sim.faults.clear()
    assert await asyncio.to_thread(rig.pty.wait_idle, 5.0)
    await rig.driver.read()


@pytest.mark.parametrize("raw", [POLL, STREAM], ids=["poll", "stream"])
async def test_stuck_values_freeze_until_cleared(make_rig, raw: dict) -> None:
    rig = make_rig(raw)

    async def read_t() -> float:
        if raw is STREAM:
            await rig.fresh_line()
        return (await rig.driver.read())["temperature_c"]

    rig.sim.set_channel("temperature_c", 20.0)
    assert await read_t() == 20.0
    rig.sim.faults.stuck = True
    rig.sim.set_channel("temperature_c", 25.0)
    assert await read_t() == 20.0
    rig.sim.faults.clear()
    assert await read_t() == 25.0


async def test_long_waits_are_cut_into_hops_within_the_ports_deadline(
    make_rig, monkeypatch
) -> None:
    """A line timeout longer than the port's per-call deadline still works: the driver waits in
    hops of HOP seconds (shortened here, as the module allows)."""
    monkeypatch.setattr("drivers.line.HOP", 0.05)
    rig = make_rig({**POLL, "timeout": 1.5})
    tight = AsyncSerial(rig.port.port, RealClock(), timeout=0.3)  # each call: at most 0.3 s
    driver = LineSensor(tight, rig.driver.options)
    rig.sim.set_channel("P", 0.125)
    rig.sim.faults.slow = 0.6  # longer than one call may take, shorter than the line timeout
    assert (await driver.read())["P"] == 0.125

    stream = make_rig({**STREAM, "timeout": 0.6})
    tight = AsyncSerial(stream.port.port, RealClock(), timeout=0.3)
    driver = LineSensor(tight, stream.driver.options)
    stream.sim.faults.disconnect = True
    with pytest.raises(DeviceTimeout, match=r"no complete line within 0\.6 s"):
        await driver.read()


async def test_poll_skips_blank_lines_before_the_answer(make_rig) -> None:
    rig = make_rig()
    real_line = rig.sim.line
    rig.sim.line = lambda: b"\r\n\r\n" + real_line()  # a sensor that answers CR LF first
    rig.sim.set_channel("P", 0.5)
    assert (await rig.driver.read())["P"] == 0.5
