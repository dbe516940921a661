"""Register-level simulator of the TI INA219, built on the driver's register map.

It behaves like the chip on the wire (SBOS448G): a register pointer that a write sets and reads
use, big-endian 16-bit registers, the configuration POR value 0x399F and the RST bit, the void
bit 0 of the calibration register, continuous and triggered modes with the conversion times of
the "ADC Settings" table, the Conversion Ready flag (set when a conversion completes, cleared by
reading the power register or by writing a new mode), and current and power computed by the
chip's integer math from the shunt voltage, bus voltage and calibration registers, with the Math
Overflow flag.

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
and saturates.
"""

from __future__ import annotations

from typing import Any

from drivers.clock import Clock
from drivers.ina219 import (
    BUS,
    BUS_FULL_SCALE_COUNTS,
    BUS_LSB_V,
    CALIBRATION,
    CONFIG,
    CONFIG_RESET,
    CURRENT,
    CURRENT_MAX_COUNTS,
    F_BADC,
    F_BD,
    F_BRNG,
    F_CNVR,
    F_MODE,
    F_OVF,
    F_PG,
    F_RST,
    F_SADC,
    MODE_ADC_OFF,
    MODE_POWER_DOWN,
    PGA_MV,
    POWER,
    POWER_MAX_COUNTS,
    REGISTERS,
    SHUNT,
    SHUNT_LSB_V,
    adc_step_counts,
    current_register,
    cycle_time,
    power_register,
)
from drivers.sim.smbus import SimDevice

DEFAULT_SHUNT_OHMS = 0.1


class Ina219Sim(SimDevice):
    """A simulated INA219.

    ``shunt_ohms`` is the shunt resistor the simulated board carries (it turns ``current_a`` into
    a shunt voltage). It defaults to the ``shunt_ohms`` of ``options`` when those are the driver's
    parsed options, else to 0.1 ohm; it can be changed later as an attribute.
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
        self._pointer = 0
        self._reset()

    # ------------------------------------------------------------------------------------
    # chip state

    def _reset(self) -> None:
        """Power-on / RST state: every register at its POR value, converting continuously."""
        self.config = CONFIG_RESET
        self.calibration = 0
        self._shunt_raw = 0
        self._bus_counts = 0
        self._current_raw = 0
        self._power_raw = 0
        self._cnvr = False
        self._ovf = False
        self._start_conversion()

    def _start_conversion(self) -> None:
        mode = F_MODE.get(self.config)
        self._conv_start: float | None = None
        if mode not in (MODE_POWER_DOWN, MODE_ADC_OFF):
            self._conv_start = self.clock.monotonic()

    def _tick(self) -> None:
        """Complete the conversion in progress if its time has come."""
        if self._conv_start is None:
            return
        period = cycle_time(self.config) + self.faults.slow
        now = self.clock.monotonic()
        done = self._conv_start + period
        if now < done:
            return
        self._latch()
        if F_MODE.get(self.config) & 0b100:  # continuous: the next conversion is under way
            behind = now - done
            self._conv_start = now - (behind % period) if period > 0 else now
        else:  # triggered: one conversion, then idle
            self._conv_start = None

    def _latch(self) -> None:
        if self.faults.stuck:
            return  # the data registers freeze and CNVR never sets again
        mode = F_MODE.get(self.config)
        ovf = False
        if mode & 0b001:
            step = adc_step_counts(F_SADC.get(self.config))
            full_scale = PGA_MV[F_PG.get(self.config)] * 100  # counts of 10 uV
            counts = round(self.shunt_voltage / SHUNT_LSB_V / step) * step
            if abs(self.shunt_voltage) > full_scale * SHUNT_LSB_V:
                ovf = True
            self._shunt_raw = max(-full_scale, min(full_scale, counts))
        if mode & 0b010:
            step = adc_step_counts(F_BADC.get(self.config))
            full_scale = BUS_FULL_SCALE_COUNTS[32 if F_BRNG.get(self.config) else 16]
            counts = round(self.bus_voltage / BUS_LSB_V / step) * step
            self._bus_counts = max(0, min(full_scale, counts))
        if self.calibration:
            current = current_register(self._shunt_raw, self.calibration)
            if abs(current) > CURRENT_MAX_COUNTS:
                ovf = True
                current = max(-CURRENT_MAX_COUNTS, min(CURRENT_MAX_COUNTS, current))
            power = power_register(current, self._bus_counts)
            if power > POWER_MAX_COUNTS:
                ovf = True
                power = POWER_MAX_COUNTS
            self._current_raw, self._power_raw = current, power
        else:  # 8.5.3: current and power need a programmed calibration register
            self._current_raw = self._power_raw = 0
        self._ovf = ovf
        self._cnvr = True
        self.conversions += 1

    def _register_value(self, address: int) -> int:
        if address == CONFIG.address:
            return self.config
        if address == SHUNT.address:
            return self._shunt_raw & 0xFFFF
        if address == BUS.address:
            word = F_BD.set(0, self._bus_counts)
            word = F_CNVR.set(word, int(self._cnvr))
            return F_OVF.set(word, int(self._ovf))
        if address == POWER.address:
            return self._power_raw
        if address == CURRENT.address:
            return self._current_raw & 0xFFFF
        if address == CALIBRATION.address:
            return self.calibration
        return 0xFFFF  # no such register: the bus floats high

    # ------------------------------------------------------------------------------------
    # the wire

    def read_registers(self, register: int, length: int) -> bytes:
        self._tick()
        if register >= 0:
            self._pointer = register
        word = self._register_value(self._pointer).to_bytes(2, "big")
        if self._pointer == POWER.address:
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
        if register == CONFIG.address:
            if F_RST.get(value):
                self._reset()
                return
            self.config = value & 0x3FFF  # bit 14 is unused; RST self-clears
            if F_MODE.get(self.config) not in (MODE_POWER_DOWN, MODE_ADC_OFF):
                self._cnvr = False  # writing a new mode clears CNVR and restarts
            self._start_conversion()
        elif register == CALIBRATION.address:
            self.calibration = REGISTERS.field("calibration", "fs").get(value) << 1
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
