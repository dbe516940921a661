"""Register-level simulator of the TI ADS1115, built on the driver's register map.

On the wire it behaves like the chip (SBAS444): a one-byte write sets the Address Pointer
register, reads come from the register it points at, registers are big-endian 16 bit, the POR
values are 0x0000 / 0x8583 / 0x8000 / 0x7FFF. Writing the Config register with OS = 1 in
single-shot mode starts one conversion; OS reads 0 while it runs and 1 when the device is idle.
A conversion takes 1 / data rate (plus ``faults.slow``); MODE = 0 converts continuously. The
result is the MUX input (or pair) at the PGA full scale set when the conversion started (new
settings apply from the next conversion), rounded to the nearest code and saturated at
0x7FFF / 0x8000. Each input voltage is first clamped to the analog input range
GND - 0.3 V .. VDD + 0.3 V, as the input ESD diodes clamp it.

Time is evaluated lazily: conversions that have come due land when the part is next accessed on
the bus (or asked for its state), so a fault knob set between two accesses acts from the earlier
one on; ``stuck`` freezes the data registers at their last landed values.

ALERT/RDY: with Hi_thresh MSB = 1, Lo_thresh MSB = 0 and COMP_QUE != 11 the pin is a
conversion-ready output: in single-shot mode it follows the OS bit (asserted when idle, active
low unless COMP_POL = 1); in continuous mode it pulses once per conversion (counted in
:attr:`Ads1115Sim.ready_pulses`, the level stays deasserted). With COMP_QUE = 11 the pin is
high-impedance and reads high through its pull-up. The threshold comparator itself is not
modelled: in comparator configurations the pin stays deasserted.

Physical inputs: ``set_channel("ain0_v", volts)`` .. ``"ain3_v"``; the supply is
:attr:`Ads1115Sim.vdd` (5.0 V by default, as a 0.5-4.5 V transducer needs).
"""

from __future__ import annotations

from typing import Any

from drivers.ads1115 import (
    CODE_MAX,
    CODE_MIN,
    COMP_QUE_DISABLED,
    CONFIG,
    CONFIG_RESET,
    CONVERSION,
    DATA_RATES_SPS,
    F_COMP_POL,
    F_COMP_QUE,
    F_DR,
    F_MODE,
    F_MUX,
    F_OS,
    F_PGA,
    HI_THRESH,
    LO_THRESH,
    MODE_SINGLE_SHOT,
    MUX_PAIRS,
    PGA_FSR_V,
    lsb_volts,
)
from drivers.clock import Clock
from drivers.sim.smbus import SimDevice

INPUT_MARGIN_V = 0.3  # the analog inputs clamp 0.3 V beyond the supply rails


class Ads1115Sim(SimDevice):
    """A simulated ADS1115 with four analog inputs."""

    part = "ads1115"

    def __init__(self, clock: Clock, options: Any = None, *, vdd: float = 5.0) -> None:
        super().__init__(clock)
        self.vdd = float(vdd)
        self.inputs = [0.0, 0.0, 0.0, 0.0]  # volts at AIN0..AIN3 against GND
        self.conversions = 0
        self.ready_pulses = 0
        self._pointer = 0
        self._conversion = CONVERSION.reset
        self._config = CONFIG_RESET & ~F_OS.mask  # OS is not stored: it reflects the state
        self._lo = LO_THRESH.reset
        self._hi = HI_THRESH.reset
        self._conv_start: float | None = None  # a conversion is in progress since then
        self._conv_config = self._config  # the settings that conversion runs with

    # ------------------------------------------------------------------------------------
    # chip state

    def _period(self) -> float:
        return 1.0 / DATA_RATES_SPS[F_DR.get(self._conv_config)] + self.faults.slow

    def _continuous(self) -> bool:
        return F_MODE.get(self._config) != MODE_SINGLE_SHOT

    def _tick(self) -> None:
        if self._conv_start is None:
            return
        period = self._period()
        now = self.clock.monotonic()
        done = self._conv_start + period
        if now < done:
            return
        self._latch()
        if self._continuous():
            behind = now - done
            self._conv_start = now - (behind % period) if period > 0 else now
            self._conv_config = self._config  # new settings apply from the next conversion
        else:
            self._conv_start = None  # single shot: back to power-down

    def _clamped(self, ain: int) -> float:
        return max(-INPUT_MARGIN_V, min(self.vdd + INPUT_MARGIN_V, self.inputs[ain]))

    def _latch(self) -> None:
        if self._continuous() and self._ready_mode():
            self.ready_pulses += 1
        if self.faults.stuck:
            return  # the conversion completes but the Conversion register keeps its value
        positive, negative = MUX_PAIRS[F_MUX.get(self._conv_config)]
        volts = self._clamped(positive) - (self._clamped(negative) if negative is not None else 0)
        code = round(volts / lsb_volts(PGA_FSR_V[F_PGA.get(self._conv_config)]))
        self._conversion = max(CODE_MIN, min(CODE_MAX, code))
        self.conversions += 1

    def _ready_mode(self) -> bool:
        return (
            self._hi < 0  # Hi_thresh MSB = 1
            and self._lo >= 0  # Lo_thresh MSB = 0
            and F_COMP_QUE.get(self._config) != COMP_QUE_DISABLED
        )

    @property
    def alert_rdy_asserted(self) -> bool:
        """Whether ALERT/RDY is asserted (in its active state)."""
        self._tick()
        if not self._ready_mode() or self._continuous():
            return False
        return self._conv_start is None  # single shot: the pin follows OS (1 = conversion done)

    @property
    def alert_rdy_level(self) -> int:
        """The electrical level of ALERT/RDY: 1 high, 0 low (open drain with a pull-up)."""
        if F_COMP_QUE.get(self._config) == COMP_QUE_DISABLED:
            return 1  # high impedance: the pull-up holds it high
        active_high = bool(F_COMP_POL.get(self._config))
        return int(self.alert_rdy_asserted == active_high)

    def _register_value(self, address: int) -> int:
        if address == CONVERSION.address:
            return self._conversion & 0xFFFF
        if address == CONFIG.address:
            return F_OS.set(self._config, int(self._conv_start is None))
        if address == LO_THRESH.address:
            return self._lo & 0xFFFF
        return self._hi & 0xFFFF

    # ------------------------------------------------------------------------------------
    # the wire

    def read_registers(self, register: int, length: int) -> bytes:
        self._tick()
        if register >= 0:
            self._pointer = register & 0x03  # P[1:0]; P[7:2] are reserved zeros
        word = self._register_value(self._pointer).to_bytes(2, "big")
        return (word * (length // 2 + 1))[:length]

    def write_registers(self, register: int | None, data: bytes) -> None:
        self._tick()
        if register is None:  # one byte: the Address Pointer register
            if data:
                self._pointer = data[0] & 0x03
            return
        self._pointer = register & 0x03
        if len(data) < 2:
            return  # a pointer write; an incomplete word is dropped
        value = int.from_bytes(data[:2], "big")
        if self._pointer == CONFIG.address:
            self._write_config(value)
        elif self._pointer == LO_THRESH.address:
            self._lo = LO_THRESH.decode(data[:2])
        elif self._pointer == HI_THRESH.address:
            self._hi = HI_THRESH.decode(data[:2])
        # the Conversion register is read-only

    def _write_config(self, value: int) -> None:
        start = bool(F_OS.get(value))
        self._config = F_OS.set(value, 0)
        if self._conv_start is not None:
            return  # a conversion is running: it finishes with its own settings
        if self._continuous() or start:  # continuous, or a single shot from power-down
            self._conv_start = self.clock.monotonic()
            self._conv_config = self._config

    # ------------------------------------------------------------------------------------
    # physical inputs

    def set_channel(self, channel: str, value: float) -> None:
        names = {f"ain{i}_v": i for i in range(4)}
        if channel not in names:
            raise ValueError(f"the ADS1115 has no channel {channel!r} (ain0_v .. ain3_v)")
        self.inputs[names[channel]] = float(value)
