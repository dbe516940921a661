"""Bosch BME280 ambient sensor (temperature, humidity, pressure) on I2C.

Reference: Bosch Sensortec BME280 datasheet BST-BME280-DS002 rev 1.6 (cited below as "DS").

The module holds three things, as every driver here does:

- the register map as data (the simulator in :mod:`drivers.sim.bme280` has its own);
- pure conversion functions: calibration decoding and Bosch's integer compensation routines
  (DS section 4.2.3: 32-bit temperature, 64-bit pressure, 32-bit humidity), no I/O;
- :class:`Bme280`, a thin async driver on an :class:`drivers.bus.I2CDevice`.

Skipped measurements: an oversampling option of 0 skips that measurement (DS 5.4.3/5.4.5, the
data registers then read 0x80000 / 0x8000). The driver omits such a channel: it is absent from
:meth:`Bme280.channels_for` (so configuration cannot ask for it) and from :meth:`Bme280.read`. A
channel that is configured but reads the skip marker raises DeviceDataError. Temperature cannot be
skipped: pressure and humidity compensation need its ``t_fine``.

Logging policy: debug for each conversion, info when the part is opened or closed. A part that
misbehaves raises a DriverError saying what happened; the caller decides how loudly to log it.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from drivers.base import BaseDriver, Identity, Options
from drivers.bus import I2CBus, I2CDevice
from drivers.errors import DeviceDataError, DeviceNotFound, DeviceTimeout
from drivers.regmap import Field, Register, RegisterMap

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------
# Timing constants (module level so tests can shorten them)

#: Start-up / NVM copy time after power-on or soft reset (DS table 1, t_startup = 2 ms).
STARTUP_S = 0.002
#: Interval between polls of status.measuring / status.im_update.
POLL_INTERVAL_S = 0.001
#: Extra time, beyond the datasheet's maximum measurement time, before a conversion times out.
CONVERSION_MARGIN_S = 0.010
#: Polls of status.im_update after a soft reset before giving up.
RESET_POLLS = 10

# --------------------------------------------------------------------------------------------
# Register map

CHIP_ID = 0x60  # DS 5.4.1
#: Chip ids of the BMP280 (no humidity), which shares the register layout (DS table 17).
BMP280_IDS = (0x56, 0x57, 0x58)
SOFT_RESET = 0xB6  # DS 5.4.2: writing 0xB6 to "reset" performs a power-on reset
SKIPPED_20BIT = 0x80000  # DS 5.4.7/5.4.8: output of a skipped temperature/pressure measurement
SKIPPED_16BIT = 0x8000  # DS 5.4.9: output of a skipped humidity measurement
#: DS 5.4.9: hum_msb/hum_lsb hold an unsigned 16-bit code; 0x0000 and 0xFFFF are the ends of its
#: range, a saturated (wet or failed) humidity element rather than a measurement.
HUMIDITY_ADC_MAX = 0xFFFF

# Calibration NVM, DS section 4.2.2, table 16: calib00..calib25 at 0x88..0xA1 and
# calib26..calib41 at 0xE1..0xF0 (only 0xE1..0xE7 are used). Words are little-endian.
CALIBRATION_REGISTERS = (
    Register("dig_T1", 0x88, 2, "little", signed=False, access="r"),
    Register("dig_T2", 0x8A, 2, "little", signed=True, access="r"),
    Register("dig_T3", 0x8C, 2, "little", signed=True, access="r"),
    Register("dig_P1", 0x8E, 2, "little", signed=False, access="r"),
    Register("dig_P2", 0x90, 2, "little", signed=True, access="r"),
    Register("dig_P3", 0x92, 2, "little", signed=True, access="r"),
    Register("dig_P4", 0x94, 2, "little", signed=True, access="r"),
    Register("dig_P5", 0x96, 2, "little", signed=True, access="r"),
    Register("dig_P6", 0x98, 2, "little", signed=True, access="r"),
    Register("dig_P7", 0x9A, 2, "little", signed=True, access="r"),
    Register("dig_P8", 0x9C, 2, "little", signed=True, access="r"),
    Register("dig_P9", 0x9E, 2, "little", signed=True, access="r"),
    Register("dig_H1", 0xA1, 1, signed=False, access="r"),
    Register("dig_H2", 0xE1, 2, "little", signed=True, access="r"),
    Register("dig_H3", 0xE3, 1, signed=False, access="r"),
    # dig_H4 and dig_H5 are 12-bit signed values packed into three bytes (DS table 16):
    # dig_H4 = 0xE4[7:0] (bits 11:4, signed) | 0xE5[3:0] (bits 3:0);
    # dig_H5 = 0xE6[7:0] (bits 11:4, signed) | 0xE5[7:4] (bits 3:0).
    Register("dig_H4_msb", 0xE4, 1, signed=True, access="r"),
    Register("dig_H45_lsb", 0xE5, 1, signed=False, access="r"),
    Register("dig_H5_msb", 0xE6, 1, signed=True, access="r"),
    Register("dig_H6", 0xE7, 1, signed=True, access="r"),
)
CALIB_BLOCK1 = (0x88, 26)  # 0x88..0xA1
CALIB_BLOCK2 = (0xE1, 7)  # 0xE1..0xE7

# Control, status and data registers, DS section 5.3 (memory map, table 18) and 5.4.
CONTROL_REGISTERS = (
    Register("id", 0xD0, access="r", reset=CHIP_ID),
    Register("reset", 0xE0, access="w"),
    Register("ctrl_hum", 0xF2),
    Register("status", 0xF3, access="r"),
    Register("ctrl_meas", 0xF4),
    Register("config", 0xF5),
    # DS 5.4.7-5.4.9: press and temp are 20-bit values in bits 23:4 of three big-endian
    # bytes (msb, lsb, xlsb[7:4]); hum is 16 bits in two big-endian bytes.
    Register("press", 0xF7, 3, "big", access="r", reset=SKIPPED_20BIT << 4),
    Register("temp", 0xFA, 3, "big", access="r", reset=SKIPPED_20BIT << 4),
    Register("hum", 0xFD, 2, "big", access="r", reset=SKIPPED_16BIT),
)
DATA_BLOCK = (0xF7, 8)  # press, temp, hum in one burst read (DS 4: "burst read 0xF7..0xFE")

FIELDS = (
    Field("dig_H45_lsb", "dig_H4_lsb", 0x0F),
    Field("dig_H45_lsb", "dig_H5_lsb", 0xF0),
    Field("ctrl_hum", "osrs_h", 0x07),  # DS 5.4.3, table 19
    Field("status", "measuring", 0x08),  # DS 5.4.4, table 21
    Field("status", "im_update", 0x01),
    Field("ctrl_meas", "osrs_t", 0xE0),  # DS 5.4.5, tables 22-24
    Field("ctrl_meas", "osrs_p", 0x1C),
    Field("ctrl_meas", "mode", 0x03),
    Field("config", "t_sb", 0xE0),  # DS 5.4.6, tables 26-28
    Field("config", "filter", 0x1C),
    Field("config", "spi3w_en", 0x01),
)

REGISTERS = RegisterMap(CALIBRATION_REGISTERS + CONTROL_REGISTERS, FIELDS)

# Field codes. DS table 20/23/24: osrs 0 = skipped, 1..5 = x1..x16 (6, 7 also mean x16).
OVERSAMPLING_CODES: dict[int, int] = {0: 0, 1: 1, 2: 2, 4: 3, 8: 4, 16: 5}
# DS table 25: mode 00 sleep, 01 and 10 forced, 11 normal.
MODE_SLEEP, MODE_FORCED, MODE_NORMAL = 0b00, 0b01, 0b11
# DS table 28: IIR filter coefficient codes (5..7 also mean 16).
FILTER_CODES: dict[int, int] = {0: 0, 2: 1, 4: 2, 8: 3, 16: 4}
# DS table 27: t_standby in normal mode, milliseconds, by t_sb code.
STANDBY_MS_BY_CODE: dict[int, float] = {
    0: 0.5,
    1: 62.5,
    2: 125.0,
    3: 250.0,
    4: 500.0,
    5: 1000.0,
    6: 10.0,
    7: 20.0,
}
STANDBY_CODES: dict[float, int] = {ms: code for code, ms in STANDBY_MS_BY_CODE.items()}


def oversampling_factor(code: int) -> int:
    """The oversampling factor of an osrs field code (0 for skipped)."""
    return 0 if code == 0 else 1 << (min(code, 5) - 1)


def filter_coefficient(code: int) -> int:
    """The IIR filter coefficient of a filter field code (0 for off)."""
    return 0 if code == 0 else 1 << min(code, 4)


# --------------------------------------------------------------------------------------------
# Calibration and compensation (pure functions)


@dataclass(frozen=True, slots=True)
class Calibration:
    """The trimming parameters of one part, as named in DS table 16."""

    dig_T1: int
    dig_T2: int
    dig_T3: int
    dig_P1: int
    dig_P2: int
    dig_P3: int
    dig_P4: int
    dig_P5: int
    dig_P6: int
    dig_P7: int
    dig_P8: int
    dig_P9: int
    dig_H1: int
    dig_H2: int
    dig_H3: int
    dig_H4: int
    dig_H5: int
    dig_H6: int


_H4_LSB = REGISTERS.field("dig_H45_lsb", "dig_H4_lsb")
_H5_LSB = REGISTERS.field("dig_H45_lsb", "dig_H5_lsb")


def _field(data: bytes, base: int, name: str) -> int:
    reg = REGISTERS[name]
    offset = reg.address - base
    return reg.decode(data[offset : offset + reg.width])


def decode_calibration(block1: bytes, block2: bytes) -> Calibration:
    """Decode the NVM blocks read from 0x88..0xA1 (26 bytes) and 0xE1..0xE7 (7 bytes)."""
    if len(block1) != CALIB_BLOCK1[1] or len(block2) != CALIB_BLOCK2[1]:
        raise ValueError(
            f"calibration blocks must be {CALIB_BLOCK1[1]} and {CALIB_BLOCK2[1]} bytes, "
            f"got {len(block1)} and {len(block2)}"
        )
    b1, b2 = CALIB_BLOCK1[0], CALIB_BLOCK2[0]
    words = {
        reg.name: _field(block1, b1, reg.name)
        for reg in CALIBRATION_REGISTERS
        if reg.address < CALIB_BLOCK2[0]
    }
    lsb = _field(block2, b2, "dig_H45_lsb")
    # (msb << 4) keeps the sign of the signed msb byte: the results are 12-bit signed values.
    h4 = (_field(block2, b2, "dig_H4_msb") << 4) | _H4_LSB.get(lsb)
    h5 = (_field(block2, b2, "dig_H5_msb") << 4) | _H5_LSB.get(lsb)
    return Calibration(
        **words,
        dig_H2=_field(block2, b2, "dig_H2"),
        dig_H3=_field(block2, b2, "dig_H3"),
        dig_H4=h4,
        dig_H5=h5,
        dig_H6=_field(block2, b2, "dig_H6"),
    )


def _cdiv(a: int, b: int) -> int:
    """C integer division (truncates toward zero), as the datasheet's int64 code does."""
    q = abs(a) // abs(b)
    return q if (a >= 0) == (b >= 0) else -q


def compensate_temperature(adc_t: int, cal: Calibration) -> tuple[int, float]:
    """DS 4.2.3 BME280_compensate_T_int32: returns ``(t_fine, degrees Celsius)``.

    The integer result has a resolution of 0.01 degC; ``t_fine`` carries the fine temperature to
    the pressure and humidity compensation.
    """
    var1 = (((adc_t >> 3) - (cal.dig_T1 << 1)) * cal.dig_T2) >> 11
    d = (adc_t >> 4) - cal.dig_T1
    var2 = (((d * d) >> 12) * cal.dig_T3) >> 14
    t_fine = var1 + var2
    centi = (t_fine * 5 + 128) >> 8
    return t_fine, centi / 100.0


def compensate_pressure_q24_8(adc_p: int, t_fine: int, cal: Calibration) -> int:
    """DS 4.2.3 BME280_compensate_P_int64: pressure in Pa as Q24.8 (divide by 256 for Pa).

    Returns 0 when the calibration would divide by zero (the datasheet's guard).
    """
    var1 = t_fine - 128000
    var2 = var1 * var1 * cal.dig_P6
    var2 = var2 + ((var1 * cal.dig_P5) << 17)
    var2 = var2 + (cal.dig_P4 << 35)
    var1 = ((var1 * var1 * cal.dig_P3) >> 8) + ((var1 * cal.dig_P2) << 12)
    var1 = (((1 << 47) + var1) * cal.dig_P1) >> 33
    if var1 == 0:
        return 0
    p = 1048576 - adc_p
    p = _cdiv(((p << 31) - var2) * 3125, var1)
    var1 = (cal.dig_P9 * (p >> 13) * (p >> 13)) >> 25
    var2 = (cal.dig_P8 * p) >> 19
    return ((p + var1 + var2) >> 8) + (cal.dig_P7 << 4)


def compensate_pressure(adc_p: int, t_fine: int, cal: Calibration) -> float:
    """Pressure in hPa from the 64-bit routine (resolution 1/256 Pa = 1/25600 hPa)."""
    return compensate_pressure_q24_8(adc_p, t_fine, cal) / 25600.0


def compensate_humidity_q22_10(adc_h: int, t_fine: int, cal: Calibration) -> int:
    """DS 4.2.3 bme280_compensate_H_int32: relative humidity in %RH as Q22.10 (divide by 1024).

    The datasheet writes this as one expression; the steps below keep its operations and order.
    """
    x = t_fine - 76800
    offset = (((adc_h << 14) - (cal.dig_H4 << 20) - (cal.dig_H5 * x)) + 16384) >> 15
    gain = ((((x * cal.dig_H6) >> 10) * (((x * cal.dig_H3) >> 11) + 32768)) >> 10) + 2097152
    gain = (gain * cal.dig_H2 + 8192) >> 14
    h = offset * gain
    h = h - (((((h >> 15) * (h >> 15)) >> 7) * cal.dig_H1) >> 4)
    h = min(max(h, 0), 419430400)
    return h >> 12


def compensate_humidity(adc_h: int, t_fine: int, cal: Calibration) -> float:
    """Relative humidity in %RH from the 32-bit routine (resolution 1/1024 %RH, 0..100)."""
    return compensate_humidity_q22_10(adc_h, t_fine, cal) / 1024.0


def adc_step(oversampling: int, iir_filter: int) -> int:
    """Counts between adjacent 20-bit temperature/pressure outputs (DS 3.4.2/3.4.3).

    Without the IIR filter the resolution is 16 + (osrs - 1) bits, so at x1 the low 4 bits of the
    20-bit value do not change; with the filter on it is always 20 bits.
    """
    if iir_filter:
        return 1
    return 1 << (5 - (oversampling.bit_length()))


def measurement_time_s(osrs_t: int, osrs_p: int, osrs_h: int, *, maximum: bool = False) -> float:
    """Measurement time from oversampling factors (DS appendix 9.1), typical or maximum."""
    if maximum:
        ms = 1.25 + 2.3 * osrs_t
        ms += (2.3 * osrs_p + 0.575) if osrs_p else 0.0
        ms += (2.3 * osrs_h + 0.575) if osrs_h else 0.0
    else:
        ms = 1.0 + 2.0 * osrs_t
        ms += (2.0 * osrs_p + 0.5) if osrs_p else 0.0
        ms += (2.0 * osrs_h + 0.5) if osrs_h else 0.0
    return ms / 1000.0


def decode_data(block: bytes) -> tuple[int, int, int]:
    """Split the 8-byte burst from 0xF7 into raw ``(adc_p, adc_t, adc_h)``."""
    base = DATA_BLOCK[0]

    def raw(name: str) -> int:
        reg = REGISTERS[name]
        return reg.decode(block[reg.address - base : reg.address - base + reg.width])

    return raw("press") >> 4, raw("temp") >> 4, raw("hum")


# --------------------------------------------------------------------------------------------
# Driver

#: Plausibility limits: the operating range (DS table 1) with a margin; values beyond come from
#: corrupted data, not from the air around a pump.
TEMPERATURE_LIMITS_C = (-45.0, 90.0)
PRESSURE_LIMITS_HPA = (250.0, 1150.0)
#: Typical steps before the calibration is known: DS table 3 gives 0.16 Pa for a 20-bit pressure
#: (2.62 Pa at 16 bit, x1); the integer humidity routine moves in steps of about 0.012 %RH.
NOMINAL_PRESSURE_STEP_PA = 0.16
NOMINAL_HUMIDITY_STEP_RH = 0.012


@dataclass(frozen=True, slots=True)
class Bme280Options:
    mode: str = "forced"
    oversampling_t: int = 1
    oversampling_p: int = 1
    oversampling_h: int = 1
    iir_filter: int = 0
    standby_ms: float = 62.5


class Bme280(BaseDriver):
    """BME280 on I2C: ``temperature_c``, ``humidity_rh``, ``pressure_hpa``.

    Options (``[sensor.options]``):

    - ``mode``: ``"forced"`` (default; one conversion per read, the part sleeps in between) or
      ``"normal"`` (the part converts periodically, a read fetches the latest result);
    - ``oversampling_t``, ``oversampling_p``, ``oversampling_h``: 1, 2, 4, 8, 16 or 0 (skip;
      temperature cannot be skipped); default 1 each (Bosch's weather-monitoring setting);
    - ``iir_filter``: IIR filter coefficient 0 (off, default), 2, 4, 8, 16;
    - ``standby_ms``: standby time between conversions in normal mode: 0.5, 10, 20, 62.5
      (default), 125, 250, 500, 1000.
    """

    part: ClassVar[str] = "bme280"
    transport: ClassVar[str] = "i2c"
    channels: ClassVar[tuple[str, ...]] = ("temperature_c", "humidity_rh", "pressure_hpa")
    addresses: ClassVar[tuple[int, ...]] = (0x76, 0x77)

    def __init__(self, device: I2CDevice, options: Bme280Options | None = None) -> None:
        self.device = device
        self.options = options or Bme280Options()
        self.calibration: Calibration | None = None
        self._t_fine: int | None = None
        self._resolution_cache: dict[tuple[str, int], float] = {}
        o = self.options
        self._ctrl_hum = REGISTERS.field("ctrl_hum", "osrs_h").set(
            0, OVERSAMPLING_CODES[o.oversampling_h]
        )
        meas = REGISTERS.field("ctrl_meas", "osrs_t").set(0, OVERSAMPLING_CODES[o.oversampling_t])
        meas = REGISTERS.field("ctrl_meas", "osrs_p").set(
            meas, OVERSAMPLING_CODES[o.oversampling_p]
        )
        self._ctrl_meas_sleep = meas
        mode = MODE_NORMAL if o.mode == "normal" else MODE_FORCED
        self._ctrl_meas_run = REGISTERS.field("ctrl_meas", "mode").set(meas, mode)
        config = REGISTERS.field("config", "t_sb").set(0, STANDBY_CODES[o.standby_ms])
        self._config = REGISTERS.field("config", "filter").set(config, FILTER_CODES[o.iir_filter])
        self._t_typ = measurement_time_s(o.oversampling_t, o.oversampling_p, o.oversampling_h)
        self._t_max = measurement_time_s(
            o.oversampling_t, o.oversampling_p, o.oversampling_h, maximum=True
        )

    # -- options -------------------------------------------------------------------------
    @classmethod
    def parse_options(cls, opts: Options) -> Bme280Options:
        mode = opts.choice("mode", "forced", ("forced", "normal"))
        osrs = {
            key: opts.choice(f"oversampling_{key}", 1, tuple(OVERSAMPLING_CODES))
            for key in ("t", "p", "h")
        }
        if osrs["t"] == 0:
            raise opts.error(
                "oversampling_t",
                "temperature cannot be skipped: pressure and humidity compensation need it; "
                "use 1, 2, 4, 8 or 16",
            )
        iir = opts.choice("iir_filter", 0, tuple(FILTER_CODES))
        standby = opts.choice("standby_ms", 62.5, tuple(STANDBY_CODES))
        opts.finish()
        return Bme280Options(
            mode=mode,
            oversampling_t=int(osrs["t"]),
            oversampling_p=int(osrs["p"]),
            oversampling_h=int(osrs["h"]),
            iir_filter=int(iir),
            standby_ms=float(standby),
        )

    @classmethod
    def channels_for(cls, options: Any) -> tuple[str, ...]:
        o = options or Bme280Options()
        skipped = {"humidity_rh": o.oversampling_h == 0, "pressure_hpa": o.oversampling_p == 0}
        return tuple(ch for ch in cls.channels if not skipped.get(ch, False))

    # -- lifecycle -----------------------------------------------------------------------
    async def open(self) -> Identity:
        dev = self.device
        chip_id = await dev.read_u8(REGISTERS["id"].address)
        if chip_id != CHIP_ID:
            hint = " (a BMP280: it has no humidity sensor)" if chip_id in BMP280_IDS else ""
            raise DeviceNotFound(
                f"{dev}: chip id 0x{chip_id:02x}{hint} where a BME280 reads 0x{CHIP_ID:02x}; "
                "check the part and the address (0x76 or 0x77)"
            )
        await dev.write_u8(REGISTERS["reset"].address, SOFT_RESET)
        await dev.clock.sleep(STARTUP_S)
        im_update = REGISTERS.field("status", "im_update")
        for _ in range(RESET_POLLS):
            if not im_update.get(await dev.read_u8(REGISTERS["status"].address)):
                break
            await dev.clock.sleep(POLL_INTERVAL_S)
        else:
            raise DeviceTimeout(f"{dev}: BME280 still copying its NVM after a soft reset")

        def load(bus: I2CBus, addr: int) -> list[tuple[bytes, bytes]]:
            # twice: every reading depends on it, and I2C carries no checksum
            return [
                (
                    bytes(bus.read_i2c_block_data(addr, *CALIB_BLOCK1)),
                    bytes(bus.read_i2c_block_data(addr, *CALIB_BLOCK2)),
                )
                for _ in range(2)
            ]

        (block1, block2), again = await dev.transact(load)
        if (block1, block2) != again:
            raise DeviceDataError(
                f"{dev}: BME280 calibration NVM reads differently twice: the bus corrupts "
                "transfers; check the wiring and pull-ups"
            )
        if all(b == 0x00 for b in block1) or all(b == 0xFF for b in block1):
            raise DeviceDataError(f"{dev}: BME280 calibration NVM reads blank; replace the part")
        try:
            cal = decode_calibration(block1, block2)
        except ValueError as err:  # a short block read
            raise DeviceDataError(f"{dev}: BME280 {err}; check the wiring and pull-ups") from err
        if cal.dig_T1 == 0 or cal.dig_P1 == 0:
            raise DeviceDataError(f"{dev}: BME280 calibration is invalid (dig_T1/dig_P1 zero)")
        self.calibration = cal
        await self._configure()
        if self.options.mode == "normal":
            # The first result lands one measurement time after normal mode starts.
            await dev.clock.sleep(self._t_max + CONVERSION_MARGIN_S)
        log.info(
            "bme280 opened device=%s mode=%s osrs_t=%d osrs_p=%d osrs_h=%d filter=%d",
            dev,
            self.options.mode,
            self.options.oversampling_t,
            self.options.oversampling_p,
            self.options.oversampling_h,
            self.options.iir_filter,
        )
        return Identity(self.part, f"chip id 0x{chip_id:02x}")

    async def _configure(self) -> None:
        """Write config in sleep mode (DS 5.4.6: writes in normal mode may be ignored), then
        ctrl_hum and ctrl_meas; ctrl_hum only takes effect after the ctrl_meas write (DS 5.4.3).
        In forced mode ctrl_meas stays in sleep here; each read starts its own conversion."""
        config, hum = self._config, self._ctrl_hum
        meas = self._ctrl_meas_run if self.options.mode == "normal" else self._ctrl_meas_sleep

        def configure(bus: I2CBus, addr: int) -> None:
            bus.write_byte_data(addr, REGISTERS["ctrl_meas"].address, self._ctrl_meas_sleep)
            bus.write_byte_data(addr, REGISTERS["config"].address, config)
            bus.write_byte_data(addr, REGISTERS["ctrl_hum"].address, hum)
            bus.write_byte_data(addr, REGISTERS["ctrl_meas"].address, meas)

        await self.device.transact(configure)

    async def close(self) -> None:
        await self.device.write_u8(REGISTERS["ctrl_meas"].address, self._ctrl_meas_sleep)
        log.info("bme280 closed device=%s", self.device)

    # -- reading -------------------------------------------------------------------------
    async def read(self) -> dict[str, float]:
        if self.calibration is None:
            raise RuntimeError("Bme280.read() before open()")
        if self.options.mode == "forced":
            block = await self._forced_conversion()
        else:
            block = await self.device.read_block(*DATA_BLOCK)
        return self._convert(block)

    async def _forced_conversion(self) -> bytes:
        dev = self.device
        # One I2C write of register/data pairs (DS 6.2.1): ctrl_hum, then ctrl_meas with
        # mode = forced, which also latches ctrl_hum.
        pairs = [self._ctrl_hum, REGISTERS["ctrl_meas"].address, self._ctrl_meas_run]
        await dev.transact(
            lambda bus, addr: bus.write_i2c_block_data(addr, REGISTERS["ctrl_hum"].address, pairs)
        )
        await dev.clock.sleep(self._t_typ)
        measuring = REGISTERS.field("status", "measuring")

        def poll(bus: I2CBus, addr: int) -> bytes | None:
            if measuring.get(bus.read_byte_data(addr, REGISTERS["status"].address)):
                return None
            return bytes(bus.read_i2c_block_data(addr, *DATA_BLOCK))

        polls = math.ceil((self._t_max - self._t_typ + CONVERSION_MARGIN_S) / POLL_INTERVAL_S) + 1
        for _ in range(polls):
            block = await dev.transact(poll)
            if block is not None:
                return block
            await dev.clock.sleep(POLL_INTERVAL_S)
        raise DeviceTimeout(
            f"{dev}: BME280 conversion not finished after "
            f"{(self._t_max + CONVERSION_MARGIN_S) * 1000:.1f} ms (status.measuring stays set)"
        )

    def _convert(self, block: bytes) -> dict[str, float]:
        cal = self.calibration
        assert cal is not None
        dev = self.device
        adc_p, adc_t, adc_h = decode_data(block)
        # DS 5.4.7-5.4.9: a skipped measurement reads 0x80000 (0x8000 for humidity), and so do
        # the data registers after a reset. Each marker is also a valid code (0x80000 is a
        # temperature near 20 degC with typical trimming), so only all configured channels at
        # their marker together mean "no conversion has written these registers".
        markers = [adc_t == SKIPPED_20BIT]
        if self.options.oversampling_h:
            markers.append(adc_h == SKIPPED_16BIT)
        if self.options.oversampling_p:
            markers.append(adc_p == SKIPPED_20BIT)
        if all(markers):
            raise DeviceDataError(
                f"{dev}: BME280 data registers hold the 'skipped' marker (0x80000): "
                "no conversion has run since the part was reset"
            )
        if self.options.oversampling_h and adc_h in (0, HUMIDITY_ADC_MAX):
            raise DeviceDataError(
                f"{dev}: BME280 humidity ADC at the end of its range (0x{adc_h:04x}): the "
                "humidity element may be wet or failed; check the part"
            )
        t_fine, temp_c = compensate_temperature(adc_t, cal)
        if not TEMPERATURE_LIMITS_C[0] <= temp_c <= TEMPERATURE_LIMITS_C[1]:
            raise DeviceDataError(f"{dev}: BME280 temperature {temp_c:.2f} degC is impossible")
        self._t_fine = t_fine
        values = {"temperature_c": temp_c}
        if self.options.oversampling_h:
            values["humidity_rh"] = compensate_humidity(adc_h, t_fine, cal)
        if self.options.oversampling_p:
            hpa = compensate_pressure(adc_p, t_fine, cal)
            if not PRESSURE_LIMITS_HPA[0] <= hpa <= PRESSURE_LIMITS_HPA[1]:
                raise DeviceDataError(f"{dev}: BME280 pressure {hpa:.2f} hPa is impossible")
            values["pressure_hpa"] = hpa
        log.debug("bme280 read device=%s adc_t=%d adc_p=%d adc_h=%d", dev, adc_t, adc_p, adc_h)
        return values

    # -- resolution ----------------------------------------------------------------------
    def resolution(self, channel: str) -> float:
        """The largest change of the output when the raw ADC value moves by one step, with the
        current settings (oversampling and filter set the ADC step, DS 3.4.2/3.4.3).

        temperature_c: 0.01 degC (the compensation output step; one ADC step is finer).
        pressure_hpa, humidity_rh: found from the calibration at the last temperature read,
        rounded to a whole degree (25 degC before the first read): about 0.027 hPa at x1 and
        0.0017 hPa at x16 or with the filter; about 0.012 %RH (the humidity routine drops the
        lowest ADC bit). Before :meth:`open` has read the calibration, typical values are
        returned.
        """
        o = self.options
        if channel == "temperature_c":
            return 0.01
        cal = self.calibration
        if cal is None:  # before open(): the typical values of DS table 3 / section 3.4
            if channel == "pressure_hpa":
                return NOMINAL_PRESSURE_STEP_PA * adc_step(o.oversampling_p, o.iir_filter) / 100
            if channel == "humidity_rh":
                return NOMINAL_HUMIDITY_STEP_RH
            raise KeyError(channel)
        # The step hardly changes with temperature: evaluate it per whole degree (t_fine / 5120
        # is degC), which also bounds the cache to the ~130 degrees of the operating range.
        t_fine = round((self._t_fine if self._t_fine is not None else 25 * 5120) / 5120) * 5120
        key = (channel, t_fine)
        cached = self._resolution_cache.get(key)
        if cached is not None:
            return cached
        if channel == "pressure_hpa":
            step = adc_step(o.oversampling_p, o.iir_filter)
            jump = _max_jump(
                lambda a: compensate_pressure(a, t_fine, cal), step, 1 << 20, PRESSURE_LIMITS_HPA
            )
            value = max(1 / 25600, jump)
        elif channel == "humidity_rh":
            jump = _max_jump(lambda a: compensate_humidity(a, t_fine, cal), 1, 1 << 16, (0.0, 100))
            value = max(1 / 1024, jump)
        else:
            raise KeyError(channel)
        self._resolution_cache[key] = value
        return value


def _max_jump(
    fn: Callable[[int], float], step: int, span: int, limits: tuple[float, float]
) -> float:
    """Largest change of ``fn`` between neighbouring codes (``step`` apart), sampled at 63
    places across ``[0, span)`` where ``fn`` is inside ``limits``."""
    best = 0.0
    for i in range(1, 64):
        a = (span * i // 64) // step * step
        values = [fn(a + k * step) for k in range(33)]
        if limits[0] < min(values) and max(values) < limits[1]:
            best = max(best, max(abs(v1 - v0) for v0, v1 in itertools.pairwise(values)))
    return best
