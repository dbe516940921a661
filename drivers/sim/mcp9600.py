"""Register-level simulator of the Microchip MCP9600, built on the driver's register map.

On the wire it behaves like the chip (DS20005426): a register pointer set by a write and used by
reads, big-endian 16-bit temperature registers and 8-bit status/configuration registers, the
device ID/revision word 0x4010 at 0x20. In normal mode it converts continuously; each conversion
updates TDelta, TC, TH and the raw ADC register and sets the TH Update flag, which the host clears
by writing 0 (writing 1 has no effect; the Input Range and alert bits are read-only). A conversion
takes the slower of the thermocouple ADC time (320/80/20/5 ms for 18/16/14/12 bits) and the
cold-junction time (250 ms at 0.0625 degC, 63 ms at 0.25 degC), plus ``faults.slow``. Shutdown
mode stops conversions; burst mode makes 2**n conversions, then sets Burst Complete and stops.

Time is evaluated lazily: conversions that have come due land when the part is next accessed on
the bus, so a fault knob set between two accesses acts from the earlier one on; ``stuck`` freezes
the data registers at their last landed values.

Physical inputs: ``set_channel("hot_junction_c", degC)`` (the thermocouple's measuring junction)
and ``set_channel("cold_junction_c", degC)`` (the connector, which the on-chip sensor reads).
``delta_c`` follows from those two and cannot be driven on its own.

Fault knob beyond the common ones: :attr:`Mcp9600Sim.open_thermocouple`. An open (or shorted)
thermocouple leaves the ADC input at a rail: the part sets Input Range and TDelta/TH read the top
of the type's range.

Modelling choices (the datasheet does not pin these down): the thermocouple EMF is linear in
(hot - cold) with the type's nominal Seebeck coefficient from the driver module, digitised with
the ADC step of the selected resolution (2/8/32/128 uV) and converted back, so the sim inverts
exactly what it encodes; TH = TDelta + TC in register counts; the digital filter (coefficient
n = 1..7) is a first-order low-pass on TH, ``TH += (TH_new - TH) / 2**n`` per conversion, so TH
no longer equals TDelta + TC while it settles; the alert outputs are not modelled (their
registers store what is written, the alert status bits stay 0).
"""

from __future__ import annotations

from typing import Any

from drivers.clock import Clock
from drivers.mcp9600 import (
    ADC_BITS,
    ADC_LSB_UV,
    COLD_RESOLUTIONS,
    DEVICE_CONFIG,
    DEVICE_ID,
    F_ADC_RES,
    F_BURST_COMPLETE,
    F_BURST_SAMPLES,
    F_COLD_RES,
    F_FILTER,
    F_INPUT_RANGE,
    F_MODE,
    F_TH_UPDATE,
    F_TYPE,
    MODE_BURST,
    MODE_NORMAL,
    RAW_ADC,
    REGISTERS,
    SEEBECK_UV_PER_C,
    STATUS,
    TC,
    TDELTA,
    TEMP_LSB_C,
    TH,
    THERMOCOUPLE_TYPES,
    TYPE_RANGE_C,
    conversion_period,
)
from drivers.regmap import Register
from drivers.sim.smbus import SimDevice

RAW_LSB_UV = 2.0  # the raw ADC register counts EMF in 18-bit steps
INT16 = (-0x8000, 0x7FFF)


def _clamp16(counts: int) -> int:
    return max(INT16[0], min(INT16[1], counts))


class Mcp9600Sim(SimDevice):
    """A simulated MCP9600 with a thermocouple attached."""

    part = "mcp9600"

    def __init__(self, clock: Clock, options: Any = None) -> None:
        super().__init__(clock)
        self.hot_c = 25.0  # measuring junction
        self.cold_c = 25.0  # connector / cold junction, read by the on-chip sensor
        self.open_thermocouple = False
        self.device_id_word = DEVICE_ID.reset  # 0x40 ID, revision 1.0
        self.conversions = 0
        self._pointer = 0
        # read/write registers hold their byte values; the data registers are computed
        self._stored: dict[int, int] = {
            reg.address: 0 for reg in REGISTERS if reg.access == "rw" and reg is not STATUS
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
        return self._stored[DEVICE_CONFIG.address]

    @property
    def _sensor_config(self) -> int:
        return self._stored[REGISTERS["sensor_config"].address]

    def _start(self) -> None:
        """Apply the device configuration's mode: start, stop or begin a burst."""
        mode = F_MODE.get(self._device_config)
        if mode == MODE_NORMAL:
            if self._conv_start is None:
                self._conv_start = self.clock.monotonic()
        elif mode == MODE_BURST:
            self._burst_left = 1 << F_BURST_SAMPLES.get(self._device_config)
            self._conv_start = self.clock.monotonic()
        else:  # shutdown (or the unimplemented 11)
            self._conv_start = None
            self._burst_left = 0

    def _period(self) -> float:
        config = self._device_config
        adc_bits = ADC_BITS[F_ADC_RES.get(config)]
        cold = COLD_RESOLUTIONS[F_COLD_RES.get(config)]
        return conversion_period(adc_bits, cold) + self.faults.slow

    def _tick(self) -> None:
        while self._conv_start is not None:
            period = self._period()
            now = self.clock.monotonic()
            done = self._conv_start + period
            if now < done:
                return
            mode = F_MODE.get(self._device_config)
            if mode == MODE_BURST:
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
        thermocouple = THERMOCOUPLE_TYPES[F_TYPE.get(self._sensor_config)]
        adc_lsb = ADC_LSB_UV[ADC_BITS[F_ADC_RES.get(config)]]
        cold_step = COLD_RESOLUTIONS[F_COLD_RES.get(config)]
        seebeck = SEEBECK_UV_PER_C[thermocouple]
        low, high = TYPE_RANGE_C[thermocouple]

        tc = round(self.cold_c / cold_step) * cold_step
        self._tc = _clamp16(round(tc / TEMP_LSB_C))
        if self.open_thermocouple:
            delta = high - self.cold_c  # the input sits at a rail: the top of the range
            out_of_range = True
        else:
            delta = self.hot_c - self.cold_c
            out_of_range = not low <= self.hot_c <= high
        code = round(delta * seebeck / adc_lsb)  # the EMF in ADC steps
        emf_uv = code * adc_lsb
        self._raw = max(-(1 << 23), min((1 << 23) - 1, round(emf_uv / RAW_LSB_UV)))
        self._delta = _clamp16(round(emf_uv / seebeck / TEMP_LSB_C))
        th = float(_clamp16(self._delta + self._tc))
        n = F_FILTER.get(self._sensor_config)
        if n and self._th_filtered is not None:
            for _ in range(1 + extra_steps):
                self._th_filtered += (th - self._th_filtered) / (1 << n)
        else:
            self._th_filtered = th
        self._th = _clamp16(round(self._th_filtered))
        self._input_range = out_of_range
        self._th_update = True
        self.conversions += 1

    def _status(self) -> int:
        word = F_BURST_COMPLETE.set(0, int(self._burst_complete))
        word = F_TH_UPDATE.set(word, int(self._th_update))
        return F_INPUT_RANGE.set(word, int(self._input_range))

    def _register_value(self, reg: Register) -> int:
        if reg is TH:
            return self._th
        if reg is TDELTA:
            return self._delta
        if reg is TC:
            return self._tc
        if reg is RAW_ADC:
            return self._raw
        if reg is STATUS:
            return self._status()
        if reg is DEVICE_ID:
            return self.device_id_word
        return self._stored[reg.address]

    # ------------------------------------------------------------------------------------
    # the wire

    def read_registers(self, register: int, length: int) -> bytes:
        self._tick()
        if register >= 0:
            self._pointer = register
        reg = REGISTERS.at(self._pointer)
        if reg is None:
            return bytes(length)  # an unimplemented address reads as zeros
        data = reg.encode(self._register_value(reg))
        # No auto-increment: a longer read keeps returning the same register.
        return (data * (length // reg.width + 1))[:length]

    def write_registers(self, register: int | None, data: bytes) -> None:
        self._tick()
        if register is None:
            if data:
                self._pointer = data[0]
            return
        self._pointer = register
        reg = REGISTERS.at(register)
        if reg is None or reg.access == "r" or len(data) < reg.width:
            return  # a pointer write, a read-only register, or an incomplete write
        value = reg.decode(data[: reg.width])
        if reg is STATUS:
            # Burst Complete and TH Update clear when written 0; the other bits are read-only.
            if not F_BURST_COMPLETE.get(value):
                self._burst_complete = False
            if not F_TH_UPDATE.get(value):
                self._th_update = False
            return
        self._stored[reg.address] = value
        if reg is DEVICE_CONFIG:
            self._start()
        elif reg.address == REGISTERS["sensor_config"].address:
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
