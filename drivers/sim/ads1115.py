"""Register-level simulator of the TI ADS1115, written from the datasheet alone.

Source: TI SBAS444 (ADS111x), sections "Register Map" (Address Pointer, Conversion, Config,
Lo_thresh and Hi_thresh registers), "Full-Scale Range (FSR) and LSB Size", "Data Format" and
"Conversion Ready Pin". The register table, the field tables and the transfer function below are
this module's own; nothing comes from the driver (:mod:`drivers.ads1115`).

On the wire it behaves like the chip: a one-byte write sets the Address Pointer register, reads
come from the register it points at, registers are big-endian 16 bit, the POR values are
0x0000 / 0x8583 / 0x8000 / 0x7FFF. Writing the Config register with OS = 1 in single-shot mode
starts one conversion; OS reads 0 while it runs and 1 when the device is idle. A conversion takes
1 / data rate (plus ``faults.slow``); MODE = 0 converts continuously. The result is the MUX input
(or pair) at the PGA full scale set when the conversion started (new settings apply from the next
conversion).

Forward conversion (the ideal transfer function, "Data Format"): code = round(V / LSB) with
LSB = FSR / 2**15, saturating at 0x7FFF for V >= +FS (2**15 - 1) / 2**15 and at 0x8000 for
V <= -FS. Each input voltage is first clamped to the analog input range GND - 0.3 V ..
VDD + 0.3 V, as the input ESD diodes clamp it.

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

from drivers.clock import Clock
from drivers.sim.smbus import SimDevice

# --------------------------------------------------------------------------------------------
# Register table (SBAS444 "Register Map")

#: P[1:0] of the Address Pointer register -> (name, POR value). P[7:2] are reserved zeros.
REGISTERS: dict[int, tuple[str, int]] = {
    0b00: ("conversion", 0x0000),  # read-only, two's complement result
    0b01: ("config", 0x8583),
    0b10: ("lo_thresh", 0x8000),
    0b11: ("hi_thresh", 0x7FFF),
}
POINTER_MASK = 0b11
CONVERSION, CONFIG, LO_THRESH, HI_THRESH = 0b00, 0b01, 0b10, 0b11

#: Config register fields: name -> mask ("Config Register Field Descriptions").
CONFIG_FIELDS: dict[str, int] = {
    "os": 0x8000,  # write 1: start a single conversion; read 0: converting, 1: idle
    "mux": 0x7000,
    "pga": 0x0E00,
    "mode": 0x0100,  # 1 = single-shot / power-down, 0 = continuous
    "dr": 0x00E0,
    "comp_mode": 0x0010,
    "comp_pol": 0x0008,  # ALERT/RDY polarity: 0 = active low
    "comp_lat": 0x0004,
    "comp_que": 0x0003,  # 11 = comparator disabled, ALERT/RDY high impedance
}
THRESH_MSB = 0x8000  # the MSBs of Lo_thresh / Hi_thresh select the conversion-ready function

#: MUX[2:0] -> (positive input, negative input or None for GND).
MUX_INPUTS: dict[int, tuple[int, int | None]] = {
    0b000: (0, 1),
    0b001: (0, 3),
    0b010: (1, 3),
    0b011: (2, 3),
    0b100: (0, None),
    0b101: (1, None),
    0b110: (2, None),
    0b111: (3, None),
}
#: PGA[2:0] -> full-scale range in volts ("Full-Scale Range and Corresponding LSB Size";
#: 101, 110 and 111 are all +-0.256 V).
FSR_VOLTS = (6.144, 4.096, 2.048, 1.024, 0.512, 0.256, 0.256, 0.256)
#: DR[2:0] -> samples per second.
DATA_RATES = (8, 16, 32, 64, 128, 250, 475, 860)
COMP_QUE_DISABLED = 0b11
CODE_MAX, CODE_MIN = 0x7FFF, -0x8000
INPUT_MARGIN_V = 0.3  # "Absolute Maximum Ratings": inputs clamp 0.3 V beyond the supply rails


def config_get(name: str, word: int) -> int:
    mask = CONFIG_FIELDS[name]
    return (word & mask) >> ((mask & -mask).bit_length() - 1)


def lsb_volts(fsr: float) -> float:
    """Volts per code: the full scale spans 2**15 codes on either side of zero."""
    return fsr / (1 << 15)


def output_code(volts: float, fsr: float) -> int:
    """The ideal transfer function ("Data Format"): the nearest code, saturated at 0x7FFF and
    0x8000 (returned as a signed integer)."""
    return max(CODE_MIN, min(CODE_MAX, round(volts / lsb_volts(fsr))))


class Ads1115Sim(SimDevice):
    """A simulated ADS1115 with four analog inputs."""

    part = "ads1115"

    def __init__(self, clock: Clock, options: Any = None, *, vdd: float = 5.0) -> None:
        super().__init__(clock)
        self.vdd = float(vdd)
        self.inputs = [0.0, 0.0, 0.0, 0.0]  # volts at AIN0..AIN3 against GND
        self.conversions = 0
        self.ready_pulses = 0
        self._pointer = CONVERSION
        # Every register as its 16-bit word; the OS bit of config is not stored: it reflects
        # the state (1 = no conversion in progress).
        self._words = {pointer: por for pointer, (_name, por) in REGISTERS.items()}
        self._words[CONFIG] &= ~CONFIG_FIELDS["os"]
        self._conv_start: float | None = None  # a conversion is in progress since then
        self._conv_config = self._words[CONFIG]  # the settings that conversion runs with

    # ------------------------------------------------------------------------------------
    # chip state

    @property
    def _config(self) -> int:
        return self._words[CONFIG]

    def _period(self) -> float:
        return 1.0 / DATA_RATES[config_get("dr", self._conv_config)] + self.faults.slow

    def _continuous(self) -> bool:
        return config_get("mode", self._config) == 0

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
        positive, negative = MUX_INPUTS[config_get("mux", self._conv_config)]
        volts = self._clamped(positive) - (self._clamped(negative) if negative is not None else 0)
        code = output_code(volts, FSR_VOLTS[config_get("pga", self._conv_config)])
        self._words[CONVERSION] = code & 0xFFFF
        self.conversions += 1

    def _ready_mode(self) -> bool:
        return (
            bool(self._words[HI_THRESH] & THRESH_MSB)
            and not self._words[LO_THRESH] & THRESH_MSB
            and config_get("comp_que", self._config) != COMP_QUE_DISABLED
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
        if config_get("comp_que", self._config) == COMP_QUE_DISABLED:
            return 1  # high impedance: the pull-up holds it high
        active_high = bool(config_get("comp_pol", self._config))
        return int(self.alert_rdy_asserted == active_high)

    def _register_value(self, pointer: int) -> int:
        if pointer == CONFIG:
            idle = self._conv_start is None
            return self._config | (CONFIG_FIELDS["os"] if idle else 0)
        return self._words[pointer]

    # ------------------------------------------------------------------------------------
    # the wire

    def read_registers(self, register: int, length: int) -> bytes:
        self._tick()
        if register >= 0:
            self._pointer = register & POINTER_MASK
        word = self._register_value(self._pointer).to_bytes(2, "big")
        return (word * (length // 2 + 1))[:length]

    def write_registers(self, register: int | None, data: bytes) -> None:
        self._tick()
        if register is None:  # one byte: the Address Pointer register
            if data:
                self._pointer = data[0] & POINTER_MASK
            return
        self._pointer = register & POINTER_MASK
        if len(data) < 2:
            return  # a pointer write; an incomplete word is dropped
        value = int.from_bytes(data[:2], "big")
        if self._pointer == CONFIG:
            self._write_config(value)
        elif self._pointer in (LO_THRESH, HI_THRESH):
            self._words[self._pointer] = value
        # the Conversion register is read-only

    def _write_config(self, value: int) -> None:
        start = bool(value & CONFIG_FIELDS["os"])
        self._words[CONFIG] = value & ~CONFIG_FIELDS["os"]
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
