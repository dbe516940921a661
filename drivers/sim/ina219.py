"""Register-level simulator of the TI INA219, written from the datasheet alone.

Source: TI SBOS448G (INA219, rev. G); section numbers are rev. G's. The register table, the ADC
settings table and the chip's integer math below are this module's own transcription of the
datasheet; nothing comes from the driver (:mod:`drivers.ina219`).

It behaves like the chip on the wire: a register pointer that a write sets and reads use,
big-endian 16-bit registers, the configuration POR value 0x399F and the RST bit, the void bit 0 of
the calibration register, continuous and triggered modes with the conversion times of the "ADC
Settings" table, the Conversion Ready flag (set when a conversion completes, cleared by reading
the power register or by writing a new mode), and current and power computed by the chip's
integer math from the shunt voltage, bus voltage and calibration registers (8.5.1):
``Current = Shunt x Calibration / 4096`` and ``Power = Current x Bus / 5000``, with the Math
Overflow flag.

Forward conversion: shunt voltage -> counts of 10 uV (8.6.3.1), bus voltage -> counts of 4 mV in
bits 15..3 (8.6.3.2), both rounded to the nearest ADC step.

Time is evaluated lazily: conversions that have come due land when the part is next accessed on
the bus, so a fault knob set between two accesses acts from the earlier one on; ``stuck`` freezes
the data registers at their last landed values.

Physical inputs: :meth:`Ina219Sim.set_channel` takes ``current_a`` (turned into a shunt voltage
through :attr:`Ina219Sim.shunt_ohms`), ``shunt_voltage_v`` or ``bus_voltage_v``. ``power_w`` is
computed by the chip and cannot be driven.

Modelling choices (the datasheet does not pin these down): a conversion samples the inputs when
it completes; a 12-bit result has a 10 uV (shunt) or 4 mV (bus) step at every PGA setting and 9-11
bit results are coarser by ``2**(12 - bits)``; averaging a noiseless input gives the 12-bit
result; the shunt result saturates at the PGA full scale (and sets OVF), the bus result at the
range's full scale (4000 or 8000 counts); a current or power that overflows its register sets OVF
and saturates; the current division truncates toward zero.
"""

from __future__ import annotations

from typing import Any

from drivers.clock import Clock
from drivers.sim.smbus import SimDevice

# --------------------------------------------------------------------------------------------
# Register table (8.6.1 "Register Information")

#: pointer -> (name, POR value); the data registers are read-only.
REGISTERS: dict[int, tuple[str, int]] = {
    0x00: ("configuration", 0x399F),
    0x01: ("shunt_voltage", 0x0000),
    0x02: ("bus_voltage", 0x0000),
    0x03: ("power", 0x0000),
    0x04: ("current", 0x0000),
    0x05: ("calibration", 0x0000),
}
CONFIGURATION, SHUNT_VOLTAGE, BUS_VOLTAGE, POWER, CURRENT, CALIBRATION = range(6)
CONFIG_POR = 0x399F

#: Configuration register fields (8.6.2.1): name -> mask. Bit 14 is unused.
CONFIG_FIELDS: dict[str, int] = {
    "rst": 0x8000,
    "brng": 0x2000,  # 0 = 16 V, 1 = 32 V bus full scale
    "pg": 0x1800,  # PGA gain /1 /2 /4 /8: +-40, 80, 160, 320 mV
    "badc": 0x0780,
    "sadc": 0x0078,
    "mode": 0x0007,
}
#: Bus voltage register (8.6.3.2): BD12..BD0 in bits 15..3, CNVR bit 1, OVF bit 0.
BUS_DATA_SHIFT = 3
CNVR = 0x0002
OVF = 0x0001
#: Calibration register (8.6.4.1): FS15..FS1; bit 0 is void and reads 0.
CALIBRATION_MASK = 0xFFFE

SHUNT_LSB_V = 10e-6  # 8.6.3.1
BUS_LSB_V = 4e-3  # 8.6.3.2
PGA_FULL_SCALE_MV = (40, 80, 160, 320)  # "PG Bit Settings", by PG value
BUS_FULL_SCALE_COUNTS = (4000, 8000)  # 8.6.3.2: 0x0FA0 at 16 V, 0x1F40 at 32 V, by BRNG
CURRENT_DIVISOR = 4096  # 8.5.1 equation: Current = Shunt x Cal / 4096
POWER_DIVISOR = 5000  # 8.5.1 equation: Power = Current x Bus / 5000
CURRENT_LIMIT = 0x7FFF  # the current register is signed 16 bit
POWER_LIMIT = 0xFFFF

#: "ADC Settings" table: BADC/SADC value -> (resolution bits, samples averaged, seconds, typ.).
#: Values 0X00..0X11 ignore bit 2; 1000 is 12 bits like 0X11.
ADC_SETTINGS: dict[int, tuple[int, int, float]] = {
    0b0000: (9, 1, 84e-6),
    0b0001: (10, 1, 148e-6),
    0b0010: (11, 1, 276e-6),
    0b0011: (12, 1, 532e-6),
    0b1000: (12, 1, 532e-6),
    0b1001: (12, 2, 1.06e-3),
    0b1010: (12, 4, 2.13e-3),
    0b1011: (12, 8, 4.26e-3),
    0b1100: (12, 16, 8.51e-3),
    0b1101: (12, 32, 17.02e-3),
    0b1110: (12, 64, 34.05e-3),
    0b1111: (12, 128, 68.10e-3),
}
#: "Mode Settings" table: bit 0 converts the shunt, bit 1 the bus, bit 2 continuous; 000 is
#: power-down and 100 ADC off.
MODE_SHUNT, MODE_BUS, MODE_CONTINUOUS = 0b001, 0b010, 0b100
MODE_POWER_DOWN, MODE_ADC_OFF = 0b000, 0b100


def config_get(name: str, word: int) -> int:
    mask = CONFIG_FIELDS[name]
    return (word & mask) >> ((mask & -mask).bit_length() - 1)


def adc_setting(code: int) -> tuple[int, int, float]:
    """``(bits, samples, seconds)`` of a 4-bit BADC/SADC value."""
    return ADC_SETTINGS[code if code & 0b1000 else code & 0b0011]


def adc_counts(volts: float, lsb: float, code: int) -> int:
    """The register counts of a voltage: the nearest ADC step; fewer than 12 bits skip
    ``2**(12 - bits)`` counts per step."""
    step = 1 << (12 - adc_setting(code)[0])
    return round(volts / lsb / step) * step


def current_counts(shunt: int, calibration: int) -> int:
    """8.5.1: Current = Shunt_Voltage_Register x Calibration_Register / 4096 (toward zero)."""
    product = shunt * calibration
    magnitude = abs(product) // CURRENT_DIVISOR
    return -magnitude if product < 0 else magnitude


def power_counts(current: int, bus: int) -> int:
    """8.5.1: Power = Current_Register x Bus_Voltage_Register / 5000 (a magnitude)."""
    return abs(current) * bus // POWER_DIVISOR


def cycle_seconds(config: int) -> float:
    """One complete conversion: the shunt and/or bus ADC times the mode selects."""
    mode = config_get("mode", config)
    if mode in (MODE_POWER_DOWN, MODE_ADC_OFF):
        return 0.0
    seconds = 0.0
    if mode & MODE_SHUNT:
        seconds += adc_setting(config_get("sadc", config))[2]
    if mode & MODE_BUS:
        seconds += adc_setting(config_get("badc", config))[2]
    return seconds


DEFAULT_SHUNT_OHMS = 0.1


class Ina219Sim(SimDevice):
    """A simulated INA219.

    ``shunt_ohms`` is the shunt resistor the simulated board carries (it turns ``current_a`` into
    a shunt voltage). It defaults to the ``shunt_ohms`` attribute of ``options`` when there is
    one (the driver's parsed options), else to 0.1 ohm; it can be changed later as an attribute.
    """

    part = "ina219"

    def __init__(
        self, clock: Clock, options: Any = None, *, shunt_ohms: float | None = None
    ) -> None:
        super().__init__(clock)
        if shunt_ohms is None:
            shunt_ohms = getattr(options, "shunt_ohms", DEFAULT_SHUNT_OHMS)
        self.shunt_ohms = float(shunt_ohms)
        self.shunt_voltage = 0.0  # volts across the shunt (IN+ minus IN-)
        self.bus_voltage = 0.0  # volts at IN- against GND
        self.conversions = 0  # completed conversions whose results reached the registers
        self._pointer = CONFIGURATION
        self._reset()

    # ------------------------------------------------------------------------------------
    # chip state

    def _reset(self) -> None:
        """Power-on / RST state: every register at its POR value, converting continuously."""
        self.config = CONFIG_POR
        self.calibration = REGISTERS[CALIBRATION][1]
        self._shunt = 0  # signed counts of 10 uV
        self._bus = 0  # counts of 4 mV
        self._current = 0  # signed
        self._power = 0
        self._cnvr = False
        self._ovf = False
        self._start_conversion()

    def _start_conversion(self) -> None:
        mode = config_get("mode", self.config)
        self._conv_start: float | None = None
        if mode not in (MODE_POWER_DOWN, MODE_ADC_OFF):
            self._conv_start = self.clock.monotonic()

    def _tick(self) -> None:
        """Complete the conversion in progress if its time has come."""
        if self._conv_start is None:
            return
        period = cycle_seconds(self.config) + self.faults.slow
        now = self.clock.monotonic()
        done = self._conv_start + period
        if now < done:
            return
        self._latch()
        if config_get("mode", self.config) & MODE_CONTINUOUS:  # the next one is under way
            behind = now - done
            self._conv_start = now - (behind % period) if period > 0 else now
        else:  # triggered: one conversion, then idle
            self._conv_start = None

    def _latch(self) -> None:
        if self.faults.stuck:
            return  # the data registers freeze and CNVR never sets again
        config = self.config
        mode = config_get("mode", config)
        overflow = False
        if mode & MODE_SHUNT:
            full_scale = PGA_FULL_SCALE_MV[config_get("pg", config)] * 100  # counts of 10 uV
            counts = adc_counts(self.shunt_voltage, SHUNT_LSB_V, config_get("sadc", config))
            overflow = abs(self.shunt_voltage) > full_scale * SHUNT_LSB_V
            self._shunt = max(-full_scale, min(full_scale, counts))
        if mode & MODE_BUS:
            full_scale = BUS_FULL_SCALE_COUNTS[config_get("brng", config)]
            counts = adc_counts(self.bus_voltage, BUS_LSB_V, config_get("badc", config))
            self._bus = max(0, min(full_scale, counts))
        if self.calibration:
            current = current_counts(self._shunt, self.calibration)
            if abs(current) > CURRENT_LIMIT:
                overflow = True
                current = max(-CURRENT_LIMIT, min(CURRENT_LIMIT, current))
            power = power_counts(current, self._bus)
            if power > POWER_LIMIT:
                overflow = True
                power = POWER_LIMIT
            self._current, self._power = current, power
        else:  # 8.5.3: current and power need a programmed calibration register
            self._current = self._power = 0
        self._ovf = overflow
        self._cnvr = True
        self.conversions += 1

    def _register_value(self, pointer: int) -> int:
        if pointer == CONFIGURATION:
            return self.config
        if pointer == SHUNT_VOLTAGE:
            return self._shunt & 0xFFFF  # two's complement, sign-extended
        if pointer == BUS_VOLTAGE:
            return (self._bus << BUS_DATA_SHIFT) | (CNVR * self._cnvr) | (OVF * self._ovf)
        if pointer == POWER:
            return self._power
        if pointer == CURRENT:
            return self._current & 0xFFFF
        if pointer == CALIBRATION:
            return self.calibration
        return 0xFFFF  # no such register: the bus floats high

    # ------------------------------------------------------------------------------------
    # the wire

    def read_registers(self, register: int, length: int) -> bytes:
        self._tick()
        if register >= 0:
            self._pointer = register
        word = self._register_value(self._pointer).to_bytes(2, "big")
        if self._pointer == POWER:
            self._cnvr = False  # 8.6.3.2: reading the power register clears CNVR
        # No auto-increment: a longer read keeps returning the same register.
        return (word * (length // 2 + 1))[:length]

    def write_registers(self, register: int | None, data: bytes) -> None:
        self._tick()
        if register is None:  # a single byte with no register: it sets the pointer
            if data:
                self._pointer = data[0]
            return
        self._pointer = register
        if len(data) < 2:
            return  # a pointer write (or an incomplete word, which the chip drops)
        value = int.from_bytes(data[:2], "big")
        if register == CONFIGURATION:
            if value & CONFIG_FIELDS["rst"]:
                self._reset()  # RST self-clears
                return
            self.config = value & 0x3FFF  # bit 14 is unused and reads 0
            if config_get("mode", self.config) not in (MODE_POWER_DOWN, MODE_ADC_OFF):
                self._cnvr = False  # 8.6.3.2: writing a new mode clears CNVR and restarts
            self._start_conversion()
        elif register == CALIBRATION:
            self.calibration = value & CALIBRATION_MASK
        # the data registers are read-only: writes to them are ignored

    # ------------------------------------------------------------------------------------
    # physical inputs

    def set_channel(self, channel: str, value: float) -> None:
        if channel == "current_a":
            self.shunt_voltage = float(value) * self.shunt_ohms
        elif channel == "shunt_voltage_v":
            self.shunt_voltage = float(value)
        elif channel == "bus_voltage_v":
            self.bus_voltage = float(value)
        elif channel == "power_w":
            raise ValueError(
                "power_w is computed by the INA219 from current and bus voltage; "
                "drive current_a and bus_voltage_v instead"
            )
        else:
            raise ValueError(f"the INA219 has no channel {channel!r}")
