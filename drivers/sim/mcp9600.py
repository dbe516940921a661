"""Register-level simulator of the Microchip MCP9600, written from the datasheet alone.

Source: Microchip DS20005426 (MCP9600, rev. C), section 5 (register map, registers 5-1 to 5-12,
equations 5-1 to 5-3, table 5-2) and section 1 (conversion times). The register table, the field
tables and the temperature encoding below are this module's own; nothing comes from the driver
(:mod:`drivers.mcp9600`).

On the wire it behaves like the chip: a register pointer set by a write and used by reads,
big-endian 16-bit temperature registers and 8-bit status/configuration registers, the device
ID/revision word 0x4010 at 0x20. In normal mode it converts continuously; each conversion updates
TDelta, TC, TH and the raw ADC register and sets the TH Update flag, which the host clears by
writing 0 (writing 1 has no effect; the Input Range and alert bits are read-only). A conversion
takes the slower of the thermocouple ADC time (320/80/20/5 ms for 18/16/14/12 bits) and the
cold-junction time (250 ms at 0.0625 degC, 63 ms at 0.25 degC, table 5-2), plus ``faults.slow``.
Shutdown mode stops conversions; burst mode makes 2**n conversions, then sets Burst Complete and
stops. Unimplemented bits read 0 (sensor configuration bits 7 and 3, alert limit bits 1-0).

Forward conversion (equations 5-1 to 5-3): a temperature register holds degrees Celsius as a
16-bit two's complement number of 0.0625 degC steps (TC keeps 12 data bits below 4 sign bits; at
0.25 degC resolution its two lowest bits are 0).

Time is evaluated lazily: conversions that have come due land when the part is next accessed on
the bus, so a fault knob set between two accesses acts from the earlier one on; ``stuck`` freezes
the data registers at their last landed values.

Physical inputs: ``set_channel("hot_junction_c", degC)`` (the thermocouple's measuring junction)
and ``set_channel("cold_junction_c", degC)`` (the connector, which the on-chip sensor reads).
``delta_c`` follows from those two and cannot be driven on its own.

Fault knob beyond the common ones: :attr:`Mcp9600Sim.open_thermocouple`. An open (or shorted)
thermocouple leaves the ADC input at a rail: the part sets Input Range and TDelta/TH read the top
of the type's range. :attr:`Mcp9600Sim.thermocouple` names the type of the thermocouple wired to
the part (None: whatever type the part is configured for); a part configured for another type
(after a power-on reset, say) converts its EMF with the wrong sensitivity.

Modelling choices (the datasheet does not pin these down): the thermocouple EMF is linear in
(hot - cold) with a nominal sensitivity per type (:data:`SENSITIVITY_UV_PER_C`, NIST ITS-90 values
near where each type is used; real sensitivities vary with temperature), digitised with the ADC
step of the selected resolution (2/8/32/128 uV) and converted back with the same sensitivity; the
measurement range of a type is the range of its NIST ITS-90 reference function
(:data:`MEASUREMENT_RANGE_C`), beyond which Input Range is set; the raw ADC register counts the
EMF in 2 uV steps; TH = TDelta + TC in register counts; the digital filter (coefficient
n = 1..7) is a first-order low-pass on TH, ``TH += (TH_new - TH) / 2**n`` per conversion, so TH
no longer equals TDelta + TC while it settles; the alert outputs are not modelled (their
registers store what is written, the alert status bits stay 0).
"""

from __future__ import annotations

from typing import Any

from drivers.clock import Clock
from drivers.sim.smbus import SimDevice

# --------------------------------------------------------------------------------------------
# Register table (DS20005426 section 5)

#: pointer -> (name, width in bytes, access, writable mask). Registers 5-2..5-12. Every register
#: resets to 0 (the "R-0" / "R/W-0" of each register diagram) except the device ID word.
REGISTERS: dict[int, tuple[str, int, str, int]] = {
    0x00: ("hot_junction", 2, "r", 0),  # TH, register 5-2
    0x01: ("junctions_delta", 2, "r", 0),  # TDelta, register 5-3
    0x02: ("cold_junction", 2, "r", 0),  # TC, register 5-4
    0x03: ("raw_adc", 3, "r", 0),  # raw ADC data, register 5-5
    0x04: ("status", 1, "rw", 0xC0),  # register 5-6: only bits 7 and 6 are writable
    0x05: ("sensor_config", 1, "rw", 0x77),  # register 5-7: bits 7 and 3 unimplemented
    0x06: ("device_config", 1, "rw", 0xFF),  # register 5-8
    **{0x07 + n: (f"alert{n}_config", 1, "rw", 0xFF) for n in range(1, 5)},  # register 5-11
    **{0x0B + n: (f"alert{n}_hysteresis", 1, "rw", 0xFF) for n in range(1, 5)},  # 5-10
    **{0x0F + n: (f"alert{n}_limit", 2, "rw", 0xFFFC) for n in range(1, 5)},  # 5-9
    0x20: ("device_id", 2, "r", 0),  # register 5-12
}
TH, TDELTA, TC, RAW_ADC, STATUS, SENSOR_CONFIG, DEVICE_CONFIG = range(7)
DEVICE_ID = 0x20
DEVICE_ID_WORD = 0x4010  # device ID 0x40, revision 1.0 (register 5-12)

#: Fields, as masks within the register the comment names.
STATUS_BURST_COMPLETE = 0x80  # register 5-6
STATUS_TH_UPDATE = 0x40
STATUS_INPUT_RANGE = 0x10
SENSOR_TYPE = 0x70  # register 5-7
SENSOR_FILTER = 0x07
DEVICE_COLD_RES = 0x80  # register 5-8
DEVICE_ADC_RES = 0x60
DEVICE_BURST = 0x1C
DEVICE_MODE = 0x03

TYPES = ("K", "J", "T", "N", "S", "E", "B", "R")  # thermocouple type by sensor config code
ADC_BITS = (18, 16, 14, 12)  # by device config ADC resolution code
ADC_STEP_UV = {18: 2.0, 16: 8.0, 14: 32.0, 12: 128.0}  # EMF per ADC step
ADC_TIME_S = {18: 0.320, 16: 0.080, 14: 0.020, 12: 0.005}  # section 1, typical
COLD_STEP_C = (0.0625, 0.25)  # by device config cold-junction resolution code
COLD_TIME_S = (0.250, 0.063)  # table 5-2, typical
MODE_NORMAL, MODE_SHUTDOWN, MODE_BURST = 0b00, 0b01, 0b10
REGISTER_LSB_C = 0.0625  # equations 5-1 to 5-3
RAW_LSB_UV = 2.0

#: Nominal thermocouple sensitivity (uV/degC) near where each type is used (NIST ITS-90).
SENSITIVITY_UV_PER_C = {"K": 41.0, "J": 52.0, "T": 41.0, "N": 27.0}
SENSITIVITY_UV_PER_C |= {"S": 6.0, "E": 61.0, "B": 9.0, "R": 6.0}
#: Range of each type's NIST ITS-90 reference function, degC: beyond it, Input Range is set.
MEASUREMENT_RANGE_C = {"K": (-270.0, 1372.0), "J": (-210.0, 1200.0), "T": (-270.0, 400.0)}
MEASUREMENT_RANGE_C |= {"N": (-270.0, 1300.0), "S": (-50.0, 1768.0), "E": (-270.0, 1000.0)}
MEASUREMENT_RANGE_C |= {"B": (0.0, 1820.0), "R": (-50.0, 1768.0)}


def _get(mask: int, byte: int) -> int:
    return (byte & mask) >> ((mask & -mask).bit_length() - 1)


def temperature_counts(deg_c: float, low_bits: int = 15) -> int:
    """Degrees Celsius -> register counts of 0.0625 degC, saturated to a two's complement number
    of ``low_bits`` data bits plus sign (15 for TH/TDelta, 12 for TC)."""
    limit = 1 << low_bits
    return max(-limit, min(limit - 1, round(deg_c / REGISTER_LSB_C)))


def temperature_bytes(counts: int) -> bytes:
    """Register counts -> the two register bytes, upper byte first (equation 5-1 inverted)."""
    return (counts & 0xFFFF).to_bytes(2, "big")


class Mcp9600Sim(SimDevice):
    """A simulated MCP9600 with a thermocouple attached."""

    part = "mcp9600"

    def __init__(self, clock: Clock, options: Any = None) -> None:
        super().__init__(clock)
        self.hot_c = 25.0  # measuring junction
        self.cold_c = 25.0  # connector / cold junction, read by the on-chip sensor
        self.open_thermocouple = False
        self.thermocouple: str | None = None  # the type wired to the part (None: as configured)
        self.device_id_word = DEVICE_ID_WORD
        self.conversions = 0
        self._pointer = TH
        # The configuration and alert registers hold what is written (POR 0); the status and
        # data registers are computed.
        self._stored = {
            pointer: 0
            for pointer, (_name, _width, access, _mask) in REGISTERS.items()
            if access == "rw" and pointer != STATUS
        }
        self._th = self._delta = self._tc = self._raw = 0
        self._th_filtered: float | None = None
        self._th_update = False
        self._burst_complete = False
        self._input_range = False
        self._burst_left = 0
        self._conv_start: float | None = None
        self._start()

    # ------------------------------------------------------------------------------------
    # chip state

    @property
    def _device_config(self) -> int:
        return self._stored[DEVICE_CONFIG]

    @property
    def _sensor_config(self) -> int:
        return self._stored[SENSOR_CONFIG]

    def _start(self) -> None:
        """Apply the device configuration's mode: start, stop or begin a burst."""
        mode = _get(DEVICE_MODE, self._device_config)
        if mode == MODE_NORMAL:
            if self._conv_start is None:
                self._conv_start = self.clock.monotonic()
        elif mode == MODE_BURST:
            self._burst_left = 1 << _get(DEVICE_BURST, self._device_config)
            self._conv_start = self.clock.monotonic()
        else:  # shutdown (or the unimplemented 11)
            self._conv_start = None
            self._burst_left = 0

    def _period(self) -> float:
        """TH needs both conversions: the slower of the thermocouple ADC and the cold junction."""
        config = self._device_config
        adc = ADC_TIME_S[ADC_BITS[_get(DEVICE_ADC_RES, config)]]
        cold = COLD_TIME_S[_get(DEVICE_COLD_RES, config)]
        return max(adc, cold) + self.faults.slow

    def _tick(self) -> None:
        while self._conv_start is not None:
            period = self._period()
            now = self.clock.monotonic()
            done = self._conv_start + period
            if now < done:
                return
            if _get(DEVICE_MODE, self._device_config) == MODE_BURST:
                self._latch()
                self._burst_left -= 1
                if self._burst_left > 0:
                    self._conv_start = done  # the next sample of the burst
                    continue
                if not self.faults.stuck:
                    self._burst_complete = True
                self._conv_start = None
                return
            # normal mode: the latest conversion lands; missed ones are simply overtaken
            steps = int((now - done) // period) if period > 0 else 0
            self._latch(extra_steps=steps)
            self._conv_start = done + steps * period

    def _latch(self, extra_steps: int = 0) -> None:
        if self.faults.stuck:
            return  # data registers freeze and TH Update never sets again
        config = self._device_config
        kind = TYPES[_get(SENSOR_TYPE, self._sensor_config)]
        adc_step_uv = ADC_STEP_UV[ADC_BITS[_get(DEVICE_ADC_RES, config)]]
        cold_step = COLD_STEP_C[_get(DEVICE_COLD_RES, config)]
        sensitivity = SENSITIVITY_UV_PER_C[kind]
        wire = SENSITIVITY_UV_PER_C[self.thermocouple or kind]  # what the junction makes
        low, high = MEASUREMENT_RANGE_C[kind]

        # TC: the on-chip sensor at its resolution, 12 data bits (register 5-4).
        self._tc = temperature_counts(round(self.cold_c / cold_step) * cold_step, 12)
        if self.open_thermocouple:
            delta = high - self.cold_c  # the input sits at a rail: the top of the range
            out_of_range = True
        else:
            delta = self.hot_c - self.cold_c
            out_of_range = not low <= self.hot_c <= high
        emf_uv = round(delta * wire / adc_step_uv) * adc_step_uv  # the digitised EMF
        self._raw = max(-(1 << 23), min((1 << 23) - 1, round(emf_uv / RAW_LSB_UV)))
        self._delta = temperature_counts(emf_uv / sensitivity)
        th = float(max(-(1 << 15), min((1 << 15) - 1, self._delta + self._tc)))
        n = _get(SENSOR_FILTER, self._sensor_config)
        if n and self._th_filtered is not None:
            for _ in range(1 + extra_steps):
                self._th_filtered += (th - self._th_filtered) / (1 << n)
        else:
            self._th_filtered = th
        self._th = round(self._th_filtered)
        self._input_range = out_of_range
        self._th_update = True
        self.conversions += 1

    def _status(self) -> int:
        return (
            (STATUS_BURST_COMPLETE if self._burst_complete else 0)
            | (STATUS_TH_UPDATE if self._th_update else 0)
            | (STATUS_INPUT_RANGE if self._input_range else 0)
        )

    def _register_bytes(self, pointer: int) -> bytes | None:
        spec = REGISTERS.get(pointer)
        if spec is None:
            return None
        width = spec[1]
        if pointer == TH:
            return temperature_bytes(self._th)
        if pointer == TDELTA:
            return temperature_bytes(self._delta)
        if pointer == TC:
            return temperature_bytes(self._tc)
        if pointer == RAW_ADC:
            return (self._raw & 0xFFFFFF).to_bytes(3, "big")  # 24-bit two's complement
        if pointer == STATUS:
            return bytes([self._status()])
        if pointer == DEVICE_ID:
            return self.device_id_word.to_bytes(2, "big")
        return self._stored[pointer].to_bytes(width, "big")

    # ------------------------------------------------------------------------------------
    # the wire

    def read_registers(self, register: int, length: int) -> bytes:
        self._tick()
        if register >= 0:
            self._pointer = register
        data = self._register_bytes(self._pointer)
        if data is None:
            return bytes(length)  # an unimplemented address reads as zeros
        # No auto-increment: a longer read keeps returning the same register.
        return (data * (length // len(data) + 1))[:length]

    def write_registers(self, register: int | None, data: bytes) -> None:
        self._tick()
        if register is None:
            if data:
                self._pointer = data[0]
            return
        self._pointer = register
        spec = REGISTERS.get(register)
        if spec is None or spec[2] == "r" or len(data) < spec[1]:
            return  # a pointer write, a read-only register, or an incomplete write
        _name, width, _access, writable = spec
        value = int.from_bytes(data[:width], "big")
        if register == STATUS:
            # Burst Complete and TH Update clear when written 0; the other bits are read-only.
            if not value & STATUS_BURST_COMPLETE:
                self._burst_complete = False
            if not value & STATUS_TH_UPDATE:
                self._th_update = False
            return
        self._stored[register] = value & writable
        if register == DEVICE_CONFIG:
            self._start()
        elif register == SENSOR_CONFIG:
            self._th_filtered = None  # a new type or filter restarts the filter

    # ------------------------------------------------------------------------------------
    # physical inputs

    def set_channel(self, channel: str, value: float) -> None:
        if channel == "hot_junction_c":
            self.hot_c = float(value)
        elif channel == "cold_junction_c":
            self.cold_c = float(value)
        elif channel == "delta_c":
            raise ValueError(
                "delta_c is hot minus cold junction: drive hot_junction_c and cold_junction_c"
            )
        else:
            raise ValueError(f"the MCP9600 has no channel {channel!r}")
