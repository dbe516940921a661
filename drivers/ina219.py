"""TI INA219 high-side current, bus voltage and power monitor (I2C): register map, the chip's
calibration and integer math as pure functions, and the async driver.

Channels, in the part's own units: ``bus_voltage_v`` (V at the IN- pin), ``shunt_voltage_v`` (V
across the shunt, signed), ``current_a`` (A, signed: negative when current flows from IN- to IN+)
and ``power_w`` (W, magnitude). Scaling for a divider in front of the bus input is done by the
sampler from the configuration, not here.

Every read returns a fresh conversion: the driver waits for the Conversion Ready flag (CNVR), which
reading the power register clears, so a part that stopped converting shows as DeviceTimeout rather
than as a frozen value. The chip computes current and power itself from the shunt voltage, the
bus voltage and the calibration register; the driver checks the four registers against that math,
so a corrupted transfer raises DeviceDataError instead of passing a wrong value on.

Datasheet: TI SBOS448G (INA219, rev. G, December 2015); section numbers below are rev. G's. The
worked example the tests use is table 3 of rev. F (SBOS448F, "Configure/Measure/Calculate
Example").
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from drivers.base import BaseDriver, Identity, Options
from drivers.bus import I2CBus, I2CDevice
from drivers.errors import DeviceDataError, DeviceNotFound, DeviceTimeout, DriverError
from drivers.regmap import Field, Register, RegisterMap

log = logging.getLogger(__name__)

# Timing: how long read() polls for CNVR before giving up, as a count of polls spaced a quarter of
# the conversion time apart (4 conversion times in all, the datasheet gives typical times only).
POLL_TRIES = 16
POLL_FRACTION = 0.25
# A transfer is accepted when the chip's math agrees with its inputs within this many counts plus
# 1/512 of the value (rounding and averaging differences on a real part; a flipped high bit is not).
CHECK_COUNTS = 1
CHECK_SHIFT = 9

# --------------------------------------------------------------------------------------------
# Register map. SBOS448G section 8.6 "Register Maps": 8.6.1 register set, 8.6.2.1 configuration
# register, 8.6.3 data output registers.
REGISTERS = RegisterMap(
    [
        Register("config", 0x00, width=2, reset=0x399F),  # 8.6.2.1
        Register("shunt_voltage", 0x01, width=2, signed=True, access="r"),  # 8.6.3.1
        Register("bus_voltage", 0x02, width=2, access="r"),  # 8.6.3.2
        Register("power", 0x03, width=2, access="r"),  # 8.6.3.3
        Register("current", 0x04, width=2, signed=True, access="r"),  # 8.6.3.4
        Register("calibration", 0x05, width=2, reset=0x0000),  # 8.6.3.5
    ],
    [
        # Configuration register (8.6.2.1) with its "PG Bit Settings", "ADC Settings" and
        # "Mode Settings" tables.
        Field("config", "rst", 0x8000),
        Field("config", "brng", 0x2000),  # 0 = 16 V, 1 = 32 V full scale
        Field("config", "pg", 0x1800),  # PGA: 0 = /1 40 mV ... 3 = /8 320 mV
        Field("config", "badc", 0x0780),  # bus ADC resolution / averaging, table 6
        Field("config", "sadc", 0x0078),  # shunt ADC resolution / averaging, table 6
        Field("config", "mode", 0x0007),  # table 7
        # Bus voltage register (8.6.3.2): BD12..BD0 in bits 15..3, LSB 4 mV.
        Field("bus_voltage", "bd", 0xFFF8),
        Field("bus_voltage", "cnvr", 0x0002),
        Field("bus_voltage", "ovf", 0x0001),
        # Calibration register (8.6.3.5): FS15..FS1; bit 0 is void and always reads 0.
        Field("calibration", "fs", 0xFFFE),
    ],
)
CONFIG = REGISTERS["config"]
SHUNT = REGISTERS["shunt_voltage"]
BUS = REGISTERS["bus_voltage"]
POWER = REGISTERS["power"]
CURRENT = REGISTERS["current"]
CALIBRATION = REGISTERS["calibration"]
F_RST = REGISTERS.field("config", "rst")
F_BRNG = REGISTERS.field("config", "brng")
F_PG = REGISTERS.field("config", "pg")
F_BADC = REGISTERS.field("config", "badc")
F_SADC = REGISTERS.field("config", "sadc")
F_MODE = REGISTERS.field("config", "mode")
F_BD = REGISTERS.field("bus_voltage", "bd")
F_CNVR = REGISTERS.field("bus_voltage", "cnvr")
F_OVF = REGISTERS.field("bus_voltage", "ovf")

CONFIG_RESET = 0x399F  # 8.6.2.1, POR value
SHUNT_LSB_V = 10e-6  # 8.6.3.1: shunt voltage LSB 10 uV
BUS_LSB_V = 4e-3  # 8.6.3.2: bus voltage LSB 4 mV
CAL_CONSTANT = 0.04096  # 8.5.1, calibration equation: internal fixed value
POWER_LSB_FACTOR = 20  # 8.5.1: Power_LSB = 20 x Current_LSB
CURRENT_DIVISOR = 4096  # 8.5.1 / 8.6.3.4: Current = Shunt x Cal / 4096
POWER_DIVISOR = 5000  # 8.5.1 / 8.6.3.3: Power = Current x Bus / 5000
CURRENT_MAX_COUNTS = 32767  # the current register is signed 16 bit (sign + 15 bits)
POWER_MAX_COUNTS = 0xFFFF

MIN_SHUNT_OHMS = 1e-6  # smallest shunt_ohms accepted
MIN_CURRENT_A = 1e-6  # smallest max_current_a accepted

PGA_MV = (40, 80, 160, 320)  # "PG Bit Settings": PG = 0..3 -> gain /1, /2, /4, /8
BUS_RANGES_V = {16: 0, 32: 1}  # BRNG value per full-scale range
BUS_FULL_SCALE_COUNTS = {16: 4000, 32: 8000}  # 8.6.3.2: 0x0FA0 at 16 V, 0x1F40 at 32 V

# "ADC Settings" table (8.6.2.1): resolution bits or samples averaged -> code and conversion time.
ADC_BITS_CODES = {9: 0b0000, 10: 0b0001, 11: 0b0010, 12: 0b0011}
ADC_SAMPLES_CODES = {1: 0b1000, 2: 0b1001, 4: 0b1010, 8: 0b1011, 16: 0b1100, 32: 0b1101}
ADC_SAMPLES_CODES |= {64: 0b1110, 128: 0b1111}
ADC_TIMES_S = {9: 84e-6, 10: 148e-6, 11: 276e-6, 12: 532e-6}
SAMPLE_TIMES_S = {1: 532e-6, 2: 1.06e-3, 4: 2.13e-3, 8: 4.26e-3, 16: 8.51e-3, 32: 17.02e-3}
SAMPLE_TIMES_S |= {64: 34.05e-3, 128: 68.10e-3}

# "Mode Settings" table (8.6.2.1): operating modes.
MODE_POWER_DOWN = 0b000
MODE_TRIGGERED = 0b011  # shunt and bus, triggered
MODE_ADC_OFF = 0b100
MODE_CONTINUOUS = 0b111  # shunt and bus, continuous (POR default)
MODES = {"continuous": MODE_CONTINUOUS, "triggered": MODE_TRIGGERED}


# --------------------------------------------------------------------------------------------
# Pure functions


def calibration_value(current_lsb: float, shunt_ohms: float) -> int:
    """The Calibration register value, SBOS448G 8.5.1:
    ``Cal = trunc(0.04096 / (Current_LSB * R_shunt))``.

    The chip ignores bit 0 (8.6.3.5); :func:`register_calibration` gives what it keeps.
    """
    if current_lsb <= 0 or shunt_ohms <= 0:
        raise ValueError("current_lsb and shunt_ohms must be positive")
    # A relative nudge keeps exact quotients (0.04096 / (1e-3 * 2e-3) = 20480) from truncating
    # to one below because of binary floating point.
    return math.floor(CAL_CONSTANT / (current_lsb * shunt_ohms) * (1 + 1e-12))


def register_calibration(cal: int) -> int:
    """What the calibration register holds after ``cal`` is written: bit 0 reads 0."""
    return cal & 0xFFFE


def effective_current_lsb(cal: int, shunt_ohms: float) -> float:
    """The current LSB the chip really applies with calibration ``cal``:
    ``0.04096 / (cal * R_shunt)`` (the calibration equation solved for Current_LSB)."""
    return CAL_CONSTANT / (cal * shunt_ohms)


def power_lsb(current_lsb: float) -> float:
    """SBOS448G 8.5.1: ``Power_LSB = 20 * Current_LSB``."""
    return POWER_LSB_FACTOR * current_lsb


def choose_current_lsb(max_current_a: float, shunt_ohms: float) -> float:
    """A round Current_LSB for ``max_current_a``.

    SBOS448G 8.5.1: the smallest LSB that still represents the maximum expected current is
    ``Max_Expected_Current / 2**15``; like the datasheet example we round it up to a round number
    (here the next 1-2-5 step) and go up further while the calibration would not fit 16 bits.
    """
    if max_current_a <= 0 or shunt_ohms <= 0:
        raise ValueError("max_current_a and shunt_ohms must be positive")
    minimum = max_current_a / 2**15
    exponent = math.floor(math.log10(minimum))
    while True:
        for mantissa in (1, 2, 5):
            lsb = mantissa * 10.0**exponent
            if lsb < minimum * (1 - 1e-9):
                continue
            if calibration_value(lsb, shunt_ohms) <= 0xFFFE:
                return float(f"{lsb:.6g}")
        exponent += 1


def current_register(shunt_raw: int, cal: int) -> int:
    """The chip's Current register before overflow, SBOS448G 8.5.1 / 8.6.3.4:
    ``Current = Shunt_Voltage_Register * Calibration / 4096`` (integer result, toward zero)."""
    product = shunt_raw * cal
    quotient = abs(product) // CURRENT_DIVISOR
    return quotient if product >= 0 else -quotient


def power_register(current_raw: int, bus_counts: int) -> int:
    """The chip's Power register before overflow, SBOS448G 8.5.1 / 8.6.3.3:
    ``Power = Current_Register * Bus_Voltage_Register / 5000``; power reads as a magnitude."""
    return abs(current_raw) * bus_counts // POWER_DIVISOR


def decode_bus_voltage(raw: int) -> tuple[float, bool, bool]:
    """Bus voltage register -> (volts, CNVR, OVF). SBOS448G 8.6.3.2: BD12..BD0 are bits 15..3."""
    return F_BD.get(raw) * BUS_LSB_V, bool(F_CNVR.get(raw)), bool(F_OVF.get(raw))


def decode_shunt_voltage(raw: int) -> float:
    """Shunt voltage register (signed, sign-extended for every PGA setting) -> volts."""
    return raw * SHUNT_LSB_V


def adc_code(bits: int, samples: int) -> int:
    """The 4-bit BADC/SADC value for a resolution or an averaging count ("ADC Settings")."""
    if samples > 1:
        if bits != 12:
            raise ValueError("averaging needs 12-bit resolution")
        return ADC_SAMPLES_CODES[samples]
    return ADC_BITS_CODES[bits]


def adc_setting(code: int) -> tuple[int, int]:
    """The 4-bit BADC/SADC value -> (resolution bits, samples averaged) ("ADC Settings")."""
    if code & 0b1000 == 0:
        return 9 + (code & 0b0011), 1  # 0X00..0X11: bit 2 is a don't-care
    return 12, 1 << (code & 0b0111)


def adc_conversion_time(code: int) -> float:
    """Seconds one ADC result takes with BADC/SADC value ``code`` ("ADC Settings", typical)."""
    bits, samples = adc_setting(code)
    return SAMPLE_TIMES_S[samples] if samples > 1 else ADC_TIMES_S[bits]


def adc_step_counts(code: int) -> int:
    """Register counts per ADC step: a 12-bit result fills the register's LSB, fewer bits skip
    ``2**(12 - bits)`` counts; averaging keeps 12-bit steps."""
    bits, _ = adc_setting(code)
    return 1 << (12 - bits)


def config_word(bus_range_v: int, pga_mv: int, adc: int, mode: int) -> int:
    """The configuration register for these settings (same ADC setting for bus and shunt)."""
    word = F_BRNG.set(0, BUS_RANGES_V[bus_range_v])
    word = F_PG.set(word, PGA_MV.index(pga_mv))
    word = F_BADC.set(word, adc)
    word = F_SADC.set(word, adc)
    return F_MODE.set(word, mode)


def cycle_time(config: int) -> float:
    """Seconds for one complete conversion (shunt then bus, as the mode selects)."""
    mode = F_MODE.get(config)
    seconds = 0.0
    if mode & 0b001 and mode != MODE_ADC_OFF:
        seconds += adc_conversion_time(F_SADC.get(config))
    if mode & 0b010:
        seconds += adc_conversion_time(F_BADC.get(config))
    return seconds


def _agrees(actual: int, expected: int) -> bool:
    return abs(actual - expected) <= CHECK_COUNTS + (abs(expected) >> CHECK_SHIFT)


# --------------------------------------------------------------------------------------------
# Options


@dataclass(frozen=True, slots=True)
class Ina219Options:
    """Validated ``[sensor.options]`` of an INA219 (see :meth:`Ina219.parse_options`)."""

    shunt_ohms: float = 0.1
    max_current_a: float = 3.2
    bus_range_v: int = 32
    pga_mv: int = 320  # resolved: "auto" becomes the smallest range that fits max_current_a
    adc_bits: int = 12
    samples: int = 1
    mode: str = "continuous"
    current_lsb: float = 1e-4  # the round LSB chosen for max_current_a (8.5.1)
    calibration: int = 4096  # what is written to the calibration register


# --------------------------------------------------------------------------------------------
# Driver


@dataclass(frozen=True, slots=True)
class _Raw:
    bus: int
    shunt: int
    current: int
    power: int


def _read_u16(bus: I2CBus, addr: int, reg: Register) -> int:
    return reg.decode(bus.read_i2c_block_data(addr, reg.address, 2))


def _write_u16(bus: I2CBus, addr: int, reg: Register, value: int) -> None:
    bus.write_i2c_block_data(addr, reg.address, list(reg.encode(value)))


def _read_data(bus: I2CBus, addr: int) -> _Raw:
    # Power last: reading it clears CNVR (8.6.3.2).
    return _Raw(
        bus=_read_u16(bus, addr, BUS),
        shunt=_read_u16(bus, addr, SHUNT),
        current=_read_u16(bus, addr, CURRENT),
        power=_read_u16(bus, addr, POWER),
    )


def _read_if_ready(bus: I2CBus, addr: int) -> _Raw | None:
    if not F_CNVR.get(_read_u16(bus, addr, BUS)):
        return None
    return _read_data(bus, addr)


class Ina219(BaseDriver):
    """An INA219 on an I2C bus. Build with ``Ina219(device, Ina219.parse_options(opts))``."""

    part: ClassVar[str] = "ina219"
    transport: ClassVar[str] = "i2c"
    channels: ClassVar[tuple[str, ...]] = (
        "bus_voltage_v",
        "shunt_voltage_v",
        "current_a",
        "power_w",
    )
    # A0 and A1 each tie to GND, VS+, SDA or SCL: 16 addresses.
    addresses: ClassVar[tuple[int, ...]] = tuple(range(0x40, 0x50))

    def __init__(self, device: I2CDevice, options: Ina219Options | None = None) -> None:
        self.device = device
        self.options = options if options is not None else self.parse_options(Options({}))
        opt = self.options
        adc = adc_code(opt.adc_bits, opt.samples)
        self.config = config_word(opt.bus_range_v, opt.pga_mv, adc, MODES[opt.mode])
        self.calibration = register_calibration(opt.calibration)
        self.current_lsb = effective_current_lsb(self.calibration, opt.shunt_ohms)
        self.power_lsb = power_lsb(self.current_lsb)
        self.conversion_time = cycle_time(self.config)
        self._adc_step = adc_step_counts(adc)
        self._shunt_full_scale = opt.pga_mv * 100  # counts of 10 uV
        self._bus_full_scale = BUS_FULL_SCALE_COUNTS[opt.bus_range_v]

    @classmethod
    def parse_options(cls, opts: Options) -> Ina219Options:
        """Options: ``shunt_ohms`` (0.1), ``max_current_a`` (3.2), ``bus_range_v`` (16 or 32;
        32), ``pga`` (40, 80, 160, 320 mV or "auto"; "auto"), ``adc_bits`` (9-12; 12),
        ``samples`` (1-128 averaged, needs adc_bits 12; 1), ``mode`` ("continuous" or
        "triggered"; "continuous")."""
        # The floors keep the calibration math in range (no real shunt is below a micro-ohm,
        # and the part resolves no current below a microampere through 100 ohms).
        shunt = opts.number("shunt_ohms", 0.1, minimum=MIN_SHUNT_OHMS, maximum=100.0)
        max_current = opts.number("max_current_a", 3.2, minimum=MIN_CURRENT_A, maximum=1000.0)
        bus_range = int(opts.choice("bus_range_v", 32, (16, 32)))
        pga: Any = opts.choice("pga", "auto", ("auto", *PGA_MV))
        adc_bits = int(opts.choice("adc_bits", 12, tuple(ADC_BITS_CODES)))
        samples = int(opts.choice("samples", 1, tuple(ADC_SAMPLES_CODES)))
        mode = opts.choice("mode", "continuous", tuple(MODES))
        opts.finish()
        if samples > 1 and adc_bits != 12:
            raise opts.error("samples", f"averaging {samples} samples needs adc_bits = 12")
        full_mv = max_current * shunt * 1000.0
        if pga == "auto":
            fitting = [mv for mv in PGA_MV if full_mv <= mv * (1 + 1e-9)]
            if not fitting:
                raise opts.error(
                    "max_current_a",
                    f"{max_current:g} A through {shunt:g} ohm drops {full_mv:.0f} mV, beyond the "
                    f"INA219's +-320 mV shunt range: use a shunt of at most "
                    f"{0.32 / max_current:.3g} ohm or lower max_current_a",
                )
            pga = fitting[0]
        elif full_mv > pga * (1 + 1e-9):
            raise opts.error(
                "max_current_a",
                f"{max_current:g} A through {shunt:g} ohm drops {full_mv:.0f} mV, beyond the "
                f'+-{pga} mV shunt range set by pga: raise pga or use "auto"',
            )
        lsb = choose_current_lsb(max_current, shunt)
        cal = calibration_value(lsb, shunt)
        if register_calibration(cal) < 1:
            raise opts.error(
                "shunt_ohms", f"{shunt:g} ohm is too large for a usable calibration register"
            )
        return Ina219Options(
            shunt_ohms=shunt,
            max_current_a=max_current,
            bus_range_v=bus_range,
            pga_mv=int(pga),
            adc_bits=adc_bits,
            samples=samples,
            mode=mode,
            current_lsb=lsb,
            calibration=cal,
        )

    def resolution(self, channel: str) -> float:
        shunt_step = self._adc_step * SHUNT_LSB_V
        if channel == "bus_voltage_v":
            return self._adc_step * BUS_LSB_V
        if channel == "shunt_voltage_v":
            return shunt_step
        if channel == "current_a":
            return max(self.current_lsb, shunt_step / self.options.shunt_ohms)
        if channel == "power_w":
            return self.power_lsb
        raise KeyError(channel)

    async def _transact(self, fn: Callable[[I2CBus, int], Any]) -> Any:
        return await self.device.transact(fn)

    async def open(self) -> Identity:
        """Reset the part, check it is an INA219 (no chip id: the configuration register must read
        its POR value 0x399F after a reset and calibration must read back as written), and
        program configuration and calibration."""
        config, cal = self.config, self.calibration

        def probe(bus: I2CBus, addr: int) -> tuple[int, int, int | None, int | None]:
            _write_u16(bus, addr, CONFIG, F_RST.set(0, 1))
            after_reset = _read_u16(bus, addr, CONFIG)
            cal_after_reset = _read_u16(bus, addr, CALIBRATION)
            if after_reset != CONFIG_RESET or cal_after_reset != 0:
                return after_reset, cal_after_reset, None, None
            _write_u16(bus, addr, CALIBRATION, cal)
            _write_u16(bus, addr, CONFIG, config)
            return (
                after_reset,
                cal_after_reset,
                _read_u16(bus, addr, CONFIG),
                _read_u16(bus, addr, CALIBRATION),
            )

        after_reset, cal_after_reset, config_back, cal_back = await self._transact(probe)
        if config_back is None:
            raise DeviceNotFound(
                f"{self.device}: not an INA219: after a reset the configuration register reads "
                f"0x{after_reset:04x} and calibration 0x{cal_after_reset:04x} (an INA219 reads "
                "0x399f and 0x0000); check the address"
            )
        if config_back != config or cal_back != cal:
            raise DeviceNotFound(
                f"{self.device}: not an INA219: configuration/calibration read back as "
                f"0x{config_back:04x}/0x{cal_back:04x} after writing 0x{config:04x}/0x{cal:04x}"
            )
        log.info(
            "ina219 opened device=%s config=0x%04x calibration=%d current_lsb=%g pga_mv=%d",
            self.device,
            config,
            cal,
            self.current_lsb,
            self.options.pga_mv,
        )
        return Identity(
            self.part, f"config reset 0x{CONFIG_RESET:04x}; calibration {cal} read back"
        )

    async def _wait_for_conversion(self) -> _Raw:
        interval = max(self.conversion_time * POLL_FRACTION, 1e-4)
        for _ in range(POLL_TRIES):
            raw = await self._transact(_read_if_ready)
            if raw is not None:
                return raw
            await self.device.clock.sleep(interval)
        raise DeviceTimeout(
            f"{self.device}: no new conversion (CNVR never set) within "
            f"{POLL_TRIES * interval * 1000:.1f} ms; the part stopped converting or was reset"
        )

    def _inconsistency(self, raw: _Raw) -> str | None:
        expected_current = max(
            -CURRENT_MAX_COUNTS,
            min(CURRENT_MAX_COUNTS, current_register(raw.shunt, self.calibration)),
        )
        if not _agrees(raw.current, expected_current):
            return (
                f"current register {raw.current} but shunt {raw.shunt} x calibration "
                f"{self.calibration} / 4096 = {expected_current}"
            )
        expected_power = min(POWER_MAX_COUNTS, power_register(raw.current, F_BD.get(raw.bus)))
        if not _agrees(raw.power, expected_power):
            return (
                f"power register {raw.power} but current {raw.current} x bus "
                f"{F_BD.get(raw.bus)} / 5000 = {expected_power}"
            )
        return None

    def _check_flags(self, raw: _Raw) -> None:
        if F_OVF.get(raw.bus):
            raise DeviceDataError(
                f"{self.device}: math overflow (OVF): current and power are invalid; the current "
                f"exceeds max_current_a = {self.options.max_current_a:g} A or the "
                f"+-{self.options.pga_mv} mV shunt range"
            )
        if abs(raw.shunt) >= self._shunt_full_scale:
            raise DeviceDataError(
                f"{self.device}: shunt voltage {decode_shunt_voltage(raw.shunt) * 1000:.2f} mV at "
                f"the +-{self.options.pga_mv} mV full scale"
            )
        if F_BD.get(raw.bus) >= self._bus_full_scale:
            raise DeviceDataError(
                f"{self.device}: bus voltage at the {self.options.bus_range_v} V full scale; "
                "use bus_range_v = 32 or a larger divider"
            )

    async def read(self) -> dict[str, float]:
        if self.options.mode == "triggered":
            config = self.config
            await self._transact(lambda bus, addr: _write_u16(bus, addr, CONFIG, config))
            await self.device.clock.sleep(self.conversion_time)
        raw = await self._wait_for_conversion()
        self._check_flags(raw)
        problem = self._inconsistency(raw)
        if problem is not None:
            # A conversion may have completed between two register reads: read them once more.
            raw = await self._transact(_read_data)
            self._check_flags(raw)
            problem = self._inconsistency(raw)
            if problem is not None:
                raise DeviceDataError(f"{self.device}: registers disagree: {problem}")
        return {
            "bus_voltage_v": F_BD.get(raw.bus) * BUS_LSB_V,
            "shunt_voltage_v": decode_shunt_voltage(raw.shunt),
            "current_a": raw.current * self.current_lsb,
            "power_w": raw.power * self.power_lsb,
        }

    async def close(self) -> None:
        """Put the part in power-down mode (MODE = 000)."""
        word = F_MODE.set(self.config, MODE_POWER_DOWN)
        try:
            await self._transact(lambda bus, addr: _write_u16(bus, addr, CONFIG, word))
        except DriverError as err:
            log.warning("ina219 power-down failed device=%s error=%s", self.device, err)
