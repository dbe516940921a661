"""Microchip MCP9600 thermocouple EMF-to-temperature converter (I2C): register map, pure
conversions and the async driver.

Channels, in degrees Celsius: ``hot_junction_c`` (the TH register: cold-junction compensated
thermocouple temperature), ``cold_junction_c`` (TC: the device's own ambient sensor at the
thermocouple connector) and ``delta_c`` (TDelta: hot minus cold junction).

Every read returns a fresh conversion: the driver polls the TH Update flag of the STATUS register,
reads TH, TDelta and TC, and clears the flag as the datasheet describes, so a part that stopped
converting shows as DeviceTimeout rather than as a frozen value. The Input Range flag (thermocouple
EMF beyond the selected type's range: an open or shorted thermocouple, or a temperature the type
cannot measure) raises DeviceDataError. With the digital filter off, TH must equal TDelta + TC
(datasheet 5.1.1); a transfer that breaks that sum raises DeviceDataError. The configuration
registers are read with the data: a part reset behind the driver (a brown-out) goes on converting
with its power-on defaults, a type K thermocouple, so a changed configuration raises
DeviceDataError, and the sampler opens (configures) the part again.

Datasheet: Microchip DS20005426 (MCP9600, rev. C), section 5: 5.1 temperature registers
(registers 5-2 to 5-4, equations 5-1 to 5-3, table 5-2), 5.2.1 STATUS (register 5-6), the sensor
and device configuration registers (registers 5-7 and 5-8), 5.3 alert registers (registers 5-9 to
5-11), 5.3.4 device ID and revision (register 5-12); conversion times from section 1 "Electrical
Characteristics".
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import ClassVar

from drivers.base import BaseDriver, Identity, Options
from drivers.bus import I2CBus, I2CDevice
from drivers.errors import DeviceDataError, DeviceNotFound, DeviceTimeout, DriverError
from drivers.regmap import Field, Register, RegisterMap

log = logging.getLogger(__name__)

# Timing: poll the TH Update flag POLL_TRIES times, POLL_FRACTION of a conversion period apart
# (four conversion periods in all: the datasheet conversion times are typical values).
POLL_TRIES = 17
POLL_FRACTION = 0.25
# TH may differ from TDelta + TC by this many LSBs (rounding inside the part) before a transfer
# counts as corrupted.
SUM_TOLERANCE_COUNTS = 1

# --------------------------------------------------------------------------------------------
# Register map: DS20005426C section 5, registers 5-2 to 5-12.
REGISTERS = RegisterMap(
    [
        # 5.1: temperature registers, two's complement, 0.0625 degC per LSB (registers 5-2 to 5-4)
        Register("hot_junction", 0x00, width=2, signed=True, access="r"),  # TH
        Register("junction_delta", 0x01, width=2, signed=True, access="r"),  # TDelta
        Register("cold_junction", 0x02, width=2, signed=True, access="r"),  # TC
        Register("raw_adc", 0x03, width=3, signed=True, access="r"),  # 5.1.4, 24-bit EMF
        # 5.2: status and configuration (registers 5-6 to 5-8)
        Register("status", 0x04, width=1),
        Register("sensor_config", 0x05, width=1),
        Register("device_config", 0x06, width=1),
        # 5.3: alert configuration, hysteresis and limits (registers 5-9 to 5-11)
        *(Register(f"alert{n}_config", 0x07 + n, width=1) for n in range(1, 5)),
        *(Register(f"alert{n}_hysteresis", 0x0B + n, width=1) for n in range(1, 5)),
        *(Register(f"alert{n}_limit", 0x0F + n, width=2, signed=True) for n in range(1, 5)),
        # 5.3.4: device ID (upper byte, 0x40) and revision (register 5-12)
        Register("device_id", 0x20, width=2, access="r", reset=0x4010),
    ],
    [
        Field("status", "burst_complete", 0x80),
        Field("status", "th_update", 0x40),
        Field("status", "input_range", 0x10),
        Field("status", "alerts", 0x0F),  # alert 4..1 status
        Field("sensor_config", "type", 0x70),
        Field("sensor_config", "filter", 0x07),
        Field("device_config", "cold_resolution", 0x80),  # 0 = 0.0625 degC, 1 = 0.25 degC
        Field("device_config", "adc_resolution", 0x60),  # 00 = 18 ... 11 = 12 bit
        Field("device_config", "burst_samples", 0x1C),  # 2**n samples per burst
        Field("device_config", "mode", 0x03),  # 00 normal, 01 shutdown, 10 burst
        Field("device_id", "id", 0xFF00),
        Field("device_id", "revision", 0x00FF),
    ],
)
TH = REGISTERS["hot_junction"]
TDELTA = REGISTERS["junction_delta"]
TC = REGISTERS["cold_junction"]
RAW_ADC = REGISTERS["raw_adc"]
STATUS = REGISTERS["status"]
SENSOR_CONFIG = REGISTERS["sensor_config"]
DEVICE_CONFIG = REGISTERS["device_config"]
DEVICE_ID = REGISTERS["device_id"]
F_BURST_COMPLETE = REGISTERS.field("status", "burst_complete")
F_TH_UPDATE = REGISTERS.field("status", "th_update")
F_INPUT_RANGE = REGISTERS.field("status", "input_range")
F_ALERTS = REGISTERS.field("status", "alerts")
F_TYPE = REGISTERS.field("sensor_config", "type")
F_FILTER = REGISTERS.field("sensor_config", "filter")
F_COLD_RES = REGISTERS.field("device_config", "cold_resolution")
F_ADC_RES = REGISTERS.field("device_config", "adc_resolution")
F_BURST_SAMPLES = REGISTERS.field("device_config", "burst_samples")
F_MODE = REGISTERS.field("device_config", "mode")
F_ID = REGISTERS.field("device_id", "id")
F_REVISION = REGISTERS.field("device_id", "revision")

DEVICE_ID_MCP9600 = 0x40
TEMP_LSB_C = 0.0625
THERMOCOUPLE_TYPES = ("K", "J", "T", "N", "S", "E", "B", "R")  # sensor config type codes 0..7
ADC_BITS = (18, 16, 14, 12)  # device config ADC resolution codes 0..3
ADC_LSB_UV = {18: 2.0, 16: 8.0, 14: 32.0, 12: 128.0}  # EMF per ADC step
ADC_TIME_S = {18: 0.320, 16: 0.080, 14: 0.020, 12: 0.005}  # typical conversion times
COLD_RESOLUTIONS = (0.0625, 0.25)  # device config cold-junction resolution codes 0..1
COLD_TIME_S = {0.0625: 0.250, 0.25: 0.063}  # table 5-2, typical
MODE_NORMAL = 0b00
MODE_SHUTDOWN = 0b01
MODE_BURST = 0b10

# Thermocouple sensitivity (Seebeck coefficient, uV/degC) near where each type is used, from the
# NIST ITS-90 tables: it turns the ADC's EMF step into a temperature step. Type B is nearly
# insensitive below 100 degC; its figure is for ~1000 degC, where it is used.
SEEBECK_UV_PER_C = {"K": 41.0, "J": 52.0, "T": 41.0, "N": 27.0, "S": 6.0, "E": 61.0}
SEEBECK_UV_PER_C |= {"B": 9.0, "R": 6.0}
# The hot-junction range of each type (NIST ITS-90): beyond it the part sets Input Range.
TYPE_RANGE_C = {"K": (-200.0, 1372.0), "J": (-210.0, 1200.0), "T": (-200.0, 400.0)}
TYPE_RANGE_C |= {"N": (-200.0, 1300.0), "S": (-50.0, 1768.0), "E": (-200.0, 1000.0)}
TYPE_RANGE_C |= {"B": (250.0, 1820.0), "R": (-50.0, 1768.0)}


# --------------------------------------------------------------------------------------------
# Pure functions


def decode_temperature(data: bytes | bytearray | list[int]) -> float:
    """A TH, TDelta or TC register (two bytes, MSB first) -> degrees Celsius.

    DS20005426C equation 5-1: ``UpperByte * 16 + LowerByte / 16``, minus 4096 when the sign bit
    is set; that is the two's complement value times 0.0625.
    """
    return TH.decode(data) * TEMP_LSB_C


def encode_temperature(deg_c: float) -> bytes:
    """Degrees Celsius -> the two register bytes (nearest 0.0625 degC step)."""
    return TH.encode(round(deg_c / TEMP_LSB_C))


@dataclass(frozen=True, slots=True)
class Status:
    """The STATUS register (register 5-6)."""

    burst_complete: bool
    th_updated: bool
    input_range: bool  # EMF beyond the selected type's range: open/short or out of range
    alerts: tuple[bool, bool, bool, bool]  # alert 1..4 status


def decode_status(value: int) -> Status:
    alerts = F_ALERTS.get(value)
    return Status(
        burst_complete=bool(F_BURST_COMPLETE.get(value)),
        th_updated=bool(F_TH_UPDATE.get(value)),
        input_range=bool(F_INPUT_RANGE.get(value)),
        alerts=(bool(alerts & 1), bool(alerts & 2), bool(alerts & 4), bool(alerts & 8)),
    )


def sensor_config_word(thermocouple: str, filter_coefficient: int) -> int:
    """Thermocouple sensor configuration register (register 5-7)."""
    word = F_TYPE.set(0, THERMOCOUPLE_TYPES.index(thermocouple))
    return F_FILTER.set(word, filter_coefficient)


def device_config_word(
    cold_resolution: float, adc_bits: int, mode: int = MODE_NORMAL, burst_samples: int = 1
) -> int:
    """Device configuration register (register 5-8)."""
    word = F_COLD_RES.set(0, COLD_RESOLUTIONS.index(cold_resolution))
    word = F_ADC_RES.set(word, ADC_BITS.index(adc_bits))
    word = F_BURST_SAMPLES.set(word, burst_samples.bit_length() - 1)
    return F_MODE.set(word, mode)


def conversion_period(adc_bits: int, cold_resolution: float) -> float:
    """Seconds between TH updates: the slower of the thermocouple ADC conversion and the
    cold-junction conversion (TH needs both)."""
    return max(ADC_TIME_S[adc_bits], COLD_TIME_S[cold_resolution])


def delta_step_c(thermocouple: str, adc_bits: int) -> float:
    """The hot-minus-cold temperature step one ADC LSB makes, at least the register LSB."""
    return max(TEMP_LSB_C, ADC_LSB_UV[adc_bits] / SEEBECK_UV_PER_C[thermocouple])


# --------------------------------------------------------------------------------------------
# Options


@dataclass(frozen=True, slots=True)
class Mcp9600Options:
    """Validated ``[sensor.options]`` of an MCP9600 (see :meth:`Mcp9600.parse_options`)."""

    thermocouple: str = "K"
    filter: int = 0
    adc_bits: int = 18
    cold_junction_resolution: float = 0.0625


@dataclass(frozen=True, slots=True)
class _Raw:
    status: int
    th: int
    delta: int
    tc: int
    config: tuple[int, int] | None = None  # sensor and device configuration, read with them


def _read(bus: I2CBus, addr: int, reg: Register) -> int:
    return reg.decode(bus.read_i2c_block_data(addr, reg.address, reg.width))


def _write(bus: I2CBus, addr: int, reg: Register, value: int) -> None:
    bus.write_i2c_block_data(addr, reg.address, list(reg.encode(value)))


def _read_temperatures(bus: I2CBus, addr: int, status: int) -> _Raw:
    return _Raw(status, _read(bus, addr, TH), _read(bus, addr, TDELTA), _read(bus, addr, TC))


def _read_if_updated(bus: I2CBus, addr: int) -> _Raw | None:
    status = _read(bus, addr, STATUS)
    if not F_TH_UPDATE.get(status):
        return None
    raw = _read_temperatures(bus, addr, status)
    # read back with the data: a part reset behind the driver converts with its defaults
    config = (_read(bus, addr, SENSOR_CONFIG), _read(bus, addr, DEVICE_CONFIG))
    _write(bus, addr, STATUS, 0x00)  # clear TH Update (and Burst Complete): 5.2.1
    return replace(raw, config=config)


class Mcp9600(BaseDriver):
    """An MCP9600 on an I2C bus. Build with ``Mcp9600(device, Mcp9600.parse_options(opts))``."""

    part: ClassVar[str] = "mcp9600"
    transport: ClassVar[str] = "i2c"
    channels: ClassVar[tuple[str, ...]] = ("hot_junction_c", "cold_junction_c", "delta_c")
    addresses: ClassVar[tuple[int, ...]] = tuple(range(0x60, 0x68))  # ADDR pin levels 0..7

    def __init__(self, device: I2CDevice, options: Mcp9600Options | None = None) -> None:
        self.device = device
        self.options = options if options is not None else self.parse_options(Options({}))
        opt = self.options
        self.sensor_config = sensor_config_word(opt.thermocouple, opt.filter)
        self.device_config = device_config_word(opt.cold_junction_resolution, opt.adc_bits)
        self.conversion_period = conversion_period(opt.adc_bits, opt.cold_junction_resolution)
        self.revision: int | None = None
        self.last_status: Status | None = None

    @classmethod
    def parse_options(cls, opts: Options) -> Mcp9600Options:
        """Options: ``thermocouple`` (K, J, T, N, S, E, B or R; "K"), ``filter`` (digital filter
        coefficient 0-7; 0 = off), ``adc_bits`` (18, 16, 14 or 12; 18),
        ``cold_junction_resolution`` (0.0625 or 0.25 degC; 0.0625)."""
        thermocouple = opts.choice("thermocouple", "K", THERMOCOUPLE_TYPES)
        filter_coefficient = opts.integer("filter", 0, minimum=0, maximum=7)
        adc_bits = int(opts.choice("adc_bits", 18, ADC_BITS))
        cold = float(opts.choice("cold_junction_resolution", 0.0625, COLD_RESOLUTIONS))
        opts.finish()
        return Mcp9600Options(
            thermocouple=thermocouple,
            filter=filter_coefficient,
            adc_bits=adc_bits,
            cold_junction_resolution=cold,
        )

    def resolution(self, channel: str) -> float:
        opt = self.options
        delta = delta_step_c(opt.thermocouple, opt.adc_bits)
        if channel == "delta_c":
            return delta
        if channel == "cold_junction_c":
            return opt.cold_junction_resolution
        if channel == "hot_junction_c":
            return max(delta, opt.cold_junction_resolution)
        raise KeyError(channel)

    async def open(self) -> Identity:
        """Check the device ID (0x40 in the upper byte of register 0x20), configure the
        thermocouple type, filter and resolutions, start continuous conversions."""
        sensor_config, device_config = self.sensor_config, self.device_config

        def probe(bus: I2CBus, addr: int) -> tuple[int, int | None, int | None]:
            ident = _read(bus, addr, DEVICE_ID)
            if F_ID.get(ident) != DEVICE_ID_MCP9600:
                return ident, None, None
            _write(bus, addr, SENSOR_CONFIG, sensor_config)
            _write(bus, addr, DEVICE_CONFIG, device_config)
            _write(bus, addr, STATUS, 0x00)
            return ident, _read(bus, addr, SENSOR_CONFIG), _read(bus, addr, DEVICE_CONFIG)

        ident, sensor_back, device_back = await self.device.transact(probe)
        if sensor_back is None:
            raise DeviceNotFound(
                f"{self.device}: not an MCP9600: device ID 0x{F_ID.get(ident):02x} "
                f"(register 0x20 reads 0x{ident:04x}; an MCP9600 has ID 0x40); check the address"
            )
        if sensor_back != sensor_config or device_back != device_config:
            raise DeviceNotFound(
                f"{self.device}: not an MCP9600: configuration read back as "
                f"0x{sensor_back:02x}/0x{device_back:02x} after writing "
                f"0x{sensor_config:02x}/0x{device_config:02x}"
            )
        self.revision = F_REVISION.get(ident)
        major, minor = self.revision >> 4, self.revision & 0x0F
        log.info(
            "mcp9600 opened device=%s revision=%d.%d type=%s adc_bits=%d filter=%d",
            self.device,
            major,
            minor,
            self.options.thermocouple,
            self.options.adc_bits,
            self.options.filter,
        )
        return Identity(self.part, f"device ID 0x40, revision {major}.{minor}")

    async def read(self) -> dict[str, float]:
        raw = await self._wait_for_update()
        if raw.config != (self.sensor_config, self.device_config):
            sensor, device = raw.config or (0, 0)
            raise DeviceDataError(
                f"{self.device}: the configuration reads 0x{sensor:02x}/0x{device:02x} where "
                f"0x{self.sensor_config:02x}/0x{self.device_config:02x} was written: the part "
                "was reset (a power loss?) and converts with its defaults (a type K "
                "thermocouple); it is configured again when it is opened"
            )
        status = decode_status(raw.status)
        self.last_status = status
        if status.input_range:
            raise DeviceDataError(
                f"{self.device}: thermocouple input out of range (STATUS 0x{raw.status:02x}): "
                f"open or shorted thermocouple, or a temperature beyond the type "
                f"{self.options.thermocouple} range; check the thermocouple and its type"
            )
        if self.options.filter == 0 and not self._sums(raw):
            # TC may have been updated between the TH conversion and this read: read once more.
            status_byte = raw.status
            raw = await self.device.transact(
                lambda bus, addr: _read_temperatures(bus, addr, status_byte)
            )
            if not self._sums(raw):
                raise DeviceDataError(
                    f"{self.device}: TH {raw.th * TEMP_LSB_C:g} degC is not TDelta "
                    f"{raw.delta * TEMP_LSB_C:g} + TC {raw.tc * TEMP_LSB_C:g} degC: corrupted "
                    "transfer"
                )
        return {
            "hot_junction_c": raw.th * TEMP_LSB_C,
            "cold_junction_c": raw.tc * TEMP_LSB_C,
            "delta_c": raw.delta * TEMP_LSB_C,
        }

    @staticmethod
    def _sums(raw: _Raw) -> bool:
        return abs(raw.th - (raw.delta + raw.tc)) <= SUM_TOLERANCE_COUNTS

    async def _wait_for_update(self) -> _Raw:
        interval = self.conversion_period * POLL_FRACTION
        for attempt in range(POLL_TRIES):
            if attempt:
                await self.device.clock.sleep(interval)
            raw = await self.device.transact(_read_if_updated)
            if raw is not None:
                return raw
        raise DeviceTimeout(
            f"{self.device}: no new temperature (TH Update never set) within "
            f"{(POLL_TRIES - 1) * interval:.2f} s; the part stopped converting or was reset"
        )

    async def close(self) -> None:
        """Put the part in shutdown mode (device configuration mode bits 01)."""
        word = F_MODE.set(self.device_config, MODE_SHUTDOWN)
        try:
            await self.device.transact(lambda bus, addr: _write(bus, addr, DEVICE_CONFIG, word))
        except DriverError as err:
            log.warning("mcp9600 shutdown failed device=%s error=%s", self.device, err)
