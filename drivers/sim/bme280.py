"""A register-level BME280 simulator, written from the datasheet alone.

Source: Bosch Sensortec BME280 datasheet BST-BME280-DS002 rev 1.6 ("DS"). Nothing here comes
from the driver (:mod:`drivers.bme280`): the register table, the NVM layout, the timing tables and
the compensation formulas are this module's own transcription of the datasheet, so a mistake in
the driver shows up as a disagreement instead of hiding in shared code.

On the wire it behaves like the chip:

- chip id 0x60 at 0xD0, reset values (DS 5.3 table 18), soft reset (0xB6 to 0xE0) with a 2 ms
  NVM copy during which status.im_update is set and the calibration registers read 0x00;
- calibration NVM at 0x88..0xA1 and 0xE1..0xE7 laid out as DS table 16 says, including the
  12-bit dig_H4/dig_H5 packing; the default constants are realistic and several are negative;
- I2C reads auto-increment; I2C writes are register/data pairs (DS 6.2.1);
- ctrl_hum only takes effect after a write to ctrl_meas (DS 5.4.3); config writes are ignored in
  normal mode (DS 5.4.6) and reset the IIR filter (DS 3.4.4);
- forced mode converts once (status.measuring set for the maximum measurement time of DS 9.1,
  plus ``faults.slow``) and returns to sleep; normal mode converts every t_measure + t_standby;
- resolution: without the IIR filter a 20-bit temperature/pressure output has 16 + (osrs - 1)
  significant bits, with it 20 bits (DS 3.4.2/3.4.3); the IIR filter is initialised with the first
  value after a reset or config write and then applies DS equation (3.4.4);
- skipped measurements read 0x80000 / 0x8000 and keep the filter memory (DS 3.4.4).

Forward conversion (physical value -> ADC code): the part's transfer function is defined by the
datasheet's compensation, so the simulator searches (bisection over the monotonic compensation)
for the ADC code whose compensated value is nearest the physical value. It inverts its own
implementation of the datasheet's integer routines (DS 4.2.3: 32-bit temperature, 64-bit
pressure, 32-bit humidity), the routines a driver is expected to run. The double-precision
formulas of DS 8.1 are implemented too (:func:`temperature_double` and friends): the known-answer
tests check both against the datasheet's worked example. Inverting the double formulas instead
would leave a driver running the integer routines up to about 0.5 Pa off at x16 oversampling,
three ADC steps there (measured over the operating range): the 32-bit temperature routine
resolves t_fine only every 8 ADC codes, and the pressure routine moves about 0.03 Pa per unit
of t_fine.

Fault knobs: ``stuck`` freezes the data registers (conversions still run and status still
toggles, so the driver cannot tell); ``slow`` lengthens each conversion; ``nack``,
``disconnect`` and ``bit_flip`` are applied by :class:`~drivers.sim.smbus.SimDevice`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from drivers.clock import Clock
from drivers.sim.smbus import SimDevice

# --------------------------------------------------------------------------------------------
# Register table (DS 5.3 memory map, table 18; register descriptions DS 5.4)

CHIP_ID = 0x60  # DS 5.4.1
SOFT_RESET_WORD = 0xB6  # DS 5.4.2
STARTUP_S = 0.002  # DS table 1: t_startup, the NVM copy after power-on or soft reset

REG_ID = 0xD0
REG_RESET = 0xE0  # write-only, reads 0x00
REG_CTRL_HUM = 0xF2
REG_STATUS = 0xF3
REG_CTRL_MEAS = 0xF4
REG_CONFIG = 0xF5
REG_PRESS = 0xF7  # press_msb, press_lsb, press_xlsb[7:4] (DS 5.4.7)
REG_TEMP = 0xFA  # temp_msb, temp_lsb, temp_xlsb[7:4] (DS 5.4.8)
REG_HUM = 0xFD  # hum_msb, hum_lsb (DS 5.4.9)

#: Reset values of the control and data registers (DS table 18): the data registers hold the
#: "skipped" output 0x80000 (0x8000 for humidity) until a conversion writes them.
RESET_VALUES: dict[int, int] = {
    REG_CTRL_HUM: 0x00,
    REG_STATUS: 0x00,
    REG_CTRL_MEAS: 0x00,
    REG_CONFIG: 0x00,
    **dict(enumerate(b"\x80\x00\x00\x80\x00\x00\x80\x00", start=REG_PRESS)),
}
SKIPPED_20BIT = 0x80000  # DS 5.4.7/5.4.8
SKIPPED_16BIT = 0x8000  # DS 5.4.9

#: Fields: name -> (register, mask). DS 5.4.3 (ctrl_hum), 5.4.4 (status), 5.4.5 (ctrl_meas),
#: 5.4.6 (config).
FIELDS: dict[str, tuple[int, int]] = {
    "osrs_h": (REG_CTRL_HUM, 0b0000_0111),
    "measuring": (REG_STATUS, 0b0000_1000),
    "im_update": (REG_STATUS, 0b0000_0001),
    "osrs_t": (REG_CTRL_MEAS, 0b1110_0000),
    "osrs_p": (REG_CTRL_MEAS, 0b0001_1100),
    "mode": (REG_CTRL_MEAS, 0b0000_0011),
    "t_sb": (REG_CONFIG, 0b1110_0000),
    "filter": (REG_CONFIG, 0b0001_1100),
    "spi3w_en": (REG_CONFIG, 0b0000_0001),
}

#: DS tables 20, 23, 24: oversampling by osrs code (0 = measurement skipped).
OVERSAMPLING = (0, 1, 2, 4, 8, 16, 16, 16)
#: DS table 25: mode 00 sleep, 01 and 10 forced, 11 normal.
MODE_SLEEP, MODE_NORMAL = 0b00, 0b11
#: DS table 28: IIR filter coefficient by filter code (0 = off).
FILTER_COEFFICIENT = (0, 2, 4, 8, 16, 16, 16, 16)
#: DS table 27: t_standby in milliseconds by t_sb code.
STANDBY_MS = (0.5, 62.5, 125.0, 250.0, 500.0, 1000.0, 10.0, 20.0)


def field_get(name: str, byte: int) -> int:
    """The value of field ``name`` in a register byte."""
    mask = FIELDS[name][1]
    return (byte & mask) >> ((mask & -mask).bit_length() - 1)


def field_put(name: str, byte: int, value: int) -> int:
    """``byte`` with field ``name`` set to ``value``."""
    mask = FIELDS[name][1]
    return (byte & ~mask) | ((value << ((mask & -mask).bit_length() - 1)) & mask)


# --------------------------------------------------------------------------------------------
# Calibration NVM (DS 4.2.2, table 16)


@dataclass(frozen=True, slots=True)
class Calibration:
    """The trimming parameters of one simulated part, named as in DS table 16."""

    dig_T1: int  # unsigned short
    dig_T2: int  # signed short
    dig_T3: int
    dig_P1: int  # unsigned short
    dig_P2: int  # signed short ...
    dig_P3: int
    dig_P4: int
    dig_P5: int
    dig_P6: int
    dig_P7: int
    dig_P8: int
    dig_P9: int
    dig_H1: int  # unsigned char
    dig_H2: int  # signed short
    dig_H3: int  # unsigned char
    dig_H4: int  # signed, 12 bits
    dig_H5: int  # signed, 12 bits
    dig_H6: int  # signed char


#: Realistic trimming constants (the magnitudes of a production part), negative where real parts
#: are: dig_T3, dig_P2, dig_P5, dig_P6, dig_P8.
DEFAULT_CALIBRATION = Calibration(
    dig_T1=28485,
    dig_T2=26735,
    dig_T3=-1000,
    dig_P1=37868,
    dig_P2=-10601,
    dig_P3=3024,
    dig_P4=7184,
    dig_P5=-90,
    dig_P6=-7,
    dig_P7=9900,
    dig_P8=-10230,
    dig_P9=4285,
    dig_H1=75,
    dig_H2=362,
    dig_H3=0,
    dig_H4=313,
    dig_H5=50,
    dig_H6=30,
)

#: DS table 16: the plain words and bytes, name -> (first address, bytes, signed). Words are
#: stored LSB first. dig_H4 and dig_H5 are packed separately (see :func:`encode_calibration`).
NVM_WORDS: dict[str, tuple[int, int, bool]] = {
    "dig_T1": (0x88, 2, False),
    "dig_T2": (0x8A, 2, True),
    "dig_T3": (0x8C, 2, True),
    "dig_P1": (0x8E, 2, False),
    "dig_P2": (0x90, 2, True),
    "dig_P3": (0x92, 2, True),
    "dig_P4": (0x94, 2, True),
    "dig_P5": (0x96, 2, True),
    "dig_P6": (0x98, 2, True),
    "dig_P7": (0x9A, 2, True),
    "dig_P8": (0x9C, 2, True),
    "dig_P9": (0x9E, 2, True),
    "dig_H1": (0xA1, 1, False),
    "dig_H2": (0xE1, 2, True),
    "dig_H3": (0xE3, 1, False),
    "dig_H6": (0xE7, 1, True),
}
#: The calibration address ranges: calib00..calib25 and calib26..calib41 (0xE1..0xF0), of which
#: 0xE1..0xE7 carry humidity trimming (0xA0 and 0xE8..0xF0 are reserved and read 0).
NVM_RANGES = (range(0x88, 0xA2), range(0xE1, 0xF1))


def encode_calibration(cal: Any) -> dict[int, int]:
    """The NVM bytes of ``cal`` by address, as a real part stores them (DS table 16).

    dig_H4 is 0xE4 (bits 11:4) and 0xE5[3:0] (bits 3:0); dig_H5 is 0xE5[7:4] (bits 3:0) and 0xE6
    (bits 11:4): both 12-bit two's complement. ``cal`` is anything with the dig_* attributes.
    """
    out = {a: 0 for r in NVM_RANGES for a in r}
    for name, (address, width, signed) in NVM_WORDS.items():
        value = int(getattr(cal, name))
        for i, byte in enumerate(value.to_bytes(width, "little", signed=signed)):
            out[address + i] = byte
    h4 = int(cal.dig_H4) & 0xFFF
    h5 = int(cal.dig_H5) & 0xFFF
    out[0xE4] = h4 >> 4
    out[0xE5] = (h4 & 0x0F) | ((h5 & 0x0F) << 4)
    out[0xE6] = h5 >> 4
    return out


# --------------------------------------------------------------------------------------------
# Compensation, the simulator's own transcription of the datasheet


def _c_div(numerator: int, denominator: int) -> int:
    """Integer division as C does it for signed operands: the quotient truncated toward 0."""
    quotient = abs(numerator) // abs(denominator)
    return -quotient if (numerator < 0) != (denominator < 0) else quotient


def temperature_int32(adc_t: int, cal: Any) -> tuple[int, int]:
    """DS 4.2.3 BME280_compensate_T_int32: ``(t_fine, temperature in 0.01 degC)``.

    Python's ``>>`` on negative numbers shifts arithmetically, as the datasheet's code assumes.
    """
    t1, t2, t3 = cal.dig_T1, cal.dig_T2, cal.dig_T3
    var1 = (((adc_t >> 3) - (t1 << 1)) * t2) >> 11
    var2 = (((((adc_t >> 4) - t1) * ((adc_t >> 4) - t1)) >> 12) * t3) >> 14
    t_fine = var1 + var2
    return t_fine, (t_fine * 5 + 128) >> 8


def pressure_int64(adc_p: int, t_fine: int, cal: Any) -> int:
    """DS 4.2.3 BME280_compensate_P_int64: pressure in Pa as Q24.8 (0 when var1 is 0)."""
    c = cal
    var1 = t_fine - 128000
    var2 = var1 * var1 * c.dig_P6
    var2 += (var1 * c.dig_P5) << 17
    var2 += c.dig_P4 << 35
    var1 = ((var1 * var1 * c.dig_P3) >> 8) + ((var1 * c.dig_P2) << 12)
    var1 = (((1 << 47) + var1) * c.dig_P1) >> 33
    if var1 == 0:
        return 0  # the datasheet's guard against a division by zero
    p = 1048576 - adc_p
    p = _c_div(((p << 31) - var2) * 3125, var1)
    var1 = (c.dig_P9 * (p >> 13) * (p >> 13)) >> 25
    var2 = (c.dig_P8 * p) >> 19
    return ((p + var1 + var2) >> 8) + (c.dig_P7 << 4)


def humidity_int32(adc_h: int, t_fine: int, cal: Any) -> int:
    """DS 4.2.3 bme280_compensate_H_int32: relative humidity in %RH as Q22.10, 0..100 %RH."""
    c = cal
    x = t_fine - 76800
    head = (((adc_h << 14) - (c.dig_H4 << 20) - (c.dig_H5 * x)) + 16384) >> 15
    inner = (((x * c.dig_H6) >> 10) * (((x * c.dig_H3) >> 11) + 32768)) >> 10
    tail = ((inner + 2097152) * c.dig_H2 + 8192) >> 14
    x = head * tail
    x -= ((((x >> 15) * (x >> 15)) >> 7) * c.dig_H1) >> 4
    x = 0 if x < 0 else min(x, 419430400)
    return x >> 12


def temperature_double(adc_t: int, cal: Any) -> tuple[int, float]:
    """DS 8.1 BME280_compensate_T_double: ``(t_fine, degrees Celsius)``; t_fine is the
    datasheet's ``(BME280_S32_t)(var1 + var2)``, truncated toward zero."""
    t1 = float(cal.dig_T1)
    var1 = (adc_t / 16384.0 - t1 / 1024.0) * cal.dig_T2
    var2 = (adc_t / 131072.0 - t1 / 8192.0) * (adc_t / 131072.0 - t1 / 8192.0) * cal.dig_T3
    return int(var1 + var2), (var1 + var2) / 5120.0


def pressure_double(adc_p: int, t_fine: int, cal: Any) -> float:
    """DS 8.1 BME280_compensate_P_double: pressure in Pa (0 when var1 is 0)."""
    c = cal
    var1 = t_fine / 2.0 - 64000.0
    var2 = var1 * var1 * c.dig_P6 / 32768.0
    var2 = var2 + var1 * c.dig_P5 * 2.0
    var2 = var2 / 4.0 + c.dig_P4 * 65536.0
    var1 = (c.dig_P3 * var1 * var1 / 524288.0 + c.dig_P2 * var1) / 524288.0
    var1 = (1.0 + var1 / 32768.0) * c.dig_P1
    if var1 == 0.0:
        return 0.0
    p = 1048576.0 - adc_p
    p = (p - var2 / 4096.0) * 6250.0 / var1
    var1 = c.dig_P9 * p * p / 2147483648.0
    var2 = p * c.dig_P8 / 32768.0
    return p + (var1 + var2 + c.dig_P7) / 16.0


def humidity_double(adc_h: int, t_fine: int, cal: Any) -> float:
    """DS 8.1 bme280_compensate_H_double: relative humidity in %RH, 0..100."""
    c = cal
    x = t_fine - 76800.0
    h = (adc_h - (c.dig_H4 * 64.0 + c.dig_H5 / 16384.0 * x)) * (
        c.dig_H2 / 65536.0 * (1.0 + c.dig_H6 / 67108864.0 * x * (1.0 + c.dig_H3 / 67108864.0 * x))
    )
    h = h * (1.0 - c.dig_H1 * h / 524288.0)
    return min(100.0, max(0.0, h))


def search_code(
    compensate: Callable[[int], float], target: float, step: int, codes: int, *, rising: bool
) -> int:
    """The multiple of ``step`` below ``codes`` whose compensated value is nearest ``target``.

    ``compensate`` must be monotonic over the codes (rising or falling). Bisection finds the
    first code at or past the target; it and its two neighbours compete, ties going to the lower.
    """
    top = (codes - 1) // step
    sign = 1.0 if rising else -1.0
    lo, hi = 0, top
    while lo < hi:
        mid = (lo + hi) // 2
        if sign * compensate(mid * step) >= sign * target:
            hi = mid
        else:
            lo = mid + 1
    best = min(
        (i for i in (lo - 1, lo, lo + 1) if 0 <= i <= top),
        key=lambda i: (abs(compensate(i * step) - target), i),
    )
    return best * step


def measurement_time_max_s(osrs_t: int, osrs_p: int, osrs_h: int) -> float:
    """DS 9.1: maximum measurement time in seconds from the oversampling factors (0 = skipped)."""
    ms = 1.25 + 2.3 * osrs_t
    if osrs_p:
        ms += 2.3 * osrs_p + 0.575
    if osrs_h:
        ms += 2.3 * osrs_h + 0.575
    return ms / 1000.0


def adc_step(oversampling: int, filter_coefficient: int) -> int:
    """Counts between neighbouring 20-bit outputs (DS 3.4.2/3.4.3): 16 + (osrs - 1) significant
    bits without the IIR filter (16 counts at x1 ... 1 at x16), all 20 with it."""
    return 1 if filter_coefficient else 16 // oversampling


# --------------------------------------------------------------------------------------------
# The part


@dataclass(frozen=True)
class _Settings:
    """What a measurement cycle runs with, captured when it starts."""

    osrs_t: int
    osrs_p: int
    osrs_h: int
    filter: int


class Bme280Sim(SimDevice):
    """The simulated BME280. ``temperature_c``, ``humidity_rh`` and ``pressure_hpa`` hold the
    physical air the part sits in (set them with :meth:`set_channel`)."""

    part = "bme280"

    def __init__(
        self,
        clock: Clock,
        options: Any = None,
        *,
        calibration: Any = DEFAULT_CALIBRATION,
        chip_id: int = CHIP_ID,
    ) -> None:
        super().__init__(clock)
        self.calibration = calibration
        self.chip_id = chip_id
        self.temperature_c = 22.0
        self.humidity_rh = 45.0
        self.pressure_hpa = 1013.25
        self.conversions = 0
        self._nvm = encode_calibration(calibration)
        self._pointer = 0
        self._reset(ready_at=clock.monotonic())

    # -- state ---------------------------------------------------------------------------
    def _reset(self, ready_at: float) -> None:
        self._regs = bytearray(256)
        for address, value in RESET_VALUES.items():
            self._regs[address] = value
        self._osrs_h_latched = 0  # ctrl_hum as of the last ctrl_meas write
        self._iir_t: float | None = None
        self._iir_p: float | None = None
        self._nvm_ready_at = ready_at
        self._forced: tuple[float, _Settings] | None = None  # (start, settings)
        self._normal: tuple[float, _Settings] | None = None  # (cycle start, settings)

    def _settings(self) -> _Settings:
        meas, config = self._regs[REG_CTRL_MEAS], self._regs[REG_CONFIG]
        return _Settings(
            osrs_t=OVERSAMPLING[field_get("osrs_t", meas)],
            osrs_p=OVERSAMPLING[field_get("osrs_p", meas)],
            osrs_h=OVERSAMPLING[self._osrs_h_latched],
            filter=FILTER_COEFFICIENT[field_get("filter", config)],
        )

    def _duration(self, s: _Settings) -> float:
        return measurement_time_max_s(s.osrs_t, s.osrs_p, s.osrs_h) + max(0.0, self.faults.slow)

    def _standby(self) -> float:
        return STANDBY_MS[field_get("t_sb", self._regs[REG_CONFIG])] / 1000.0

    def _advance(self) -> None:
        """Finish the measurement cycles that have ended by now."""
        now = self.clock.monotonic()
        if self._forced is not None:
            start, settings = self._forced
            if now >= start + self._duration(settings):
                self._forced = None
                self._complete(settings)
                meas = self._regs[REG_CTRL_MEAS]
                self._regs[REG_CTRL_MEAS] = field_put("mode", meas, MODE_SLEEP)
        if self._normal is not None:
            start, settings = self._normal
            if now >= start + self._duration(settings):
                # The running cycle ends with the settings it started with; the following
                # cycles run with the settings at their start (the current ones).
                self._complete(settings)
                start += self._duration(settings) + self._standby()
                settings = self._settings()
                duration = self._duration(settings)
                if now >= start + duration:
                    period = duration + self._standby()
                    cycles = int((now - start - duration) // period) + 1
                    self._complete(settings, repeats=cycles)
                    start += cycles * period
                self._normal = (start, settings)

    def _measuring(self) -> bool:
        now = self.clock.monotonic()
        return any(
            run is not None and run[0] <= now < run[0] + self._duration(run[1])
            for run in (self._forced, self._normal)
        )

    # -- conversion ----------------------------------------------------------------------
    def _complete(self, s: _Settings, repeats: int = 1) -> None:
        """A measurement cycle ends: the results, through the IIR filter, reach the data
        registers. ``repeats`` cycles with the same input are applied at once (normal mode
        catching up); the filter then converges as DS equation (3.4.4) applied that often."""
        self.conversions += repeats
        if self.faults.stuck:
            return
        keep = ((s.filter - 1) / s.filter) ** repeats if s.filter else 0.0
        if s.osrs_t:
            adc_t, self._iir_t = self._filtered(
                self.adc_temperature(adc_step(s.osrs_t, s.filter)), self._iir_t, s.filter, keep
            )
            t_fine = temperature_int32(adc_t, self.calibration)[0]
        else:
            adc_t = SKIPPED_20BIT
            t_fine = temperature_int32(self.adc_temperature(), self.calibration)[0]
        if s.osrs_p:
            adc_p, self._iir_p = self._filtered(
                self.adc_pressure(t_fine, adc_step(s.osrs_p, s.filter)), self._iir_p, s.filter, keep
            )
        else:
            adc_p = SKIPPED_20BIT
        adc_h = self.adc_humidity(t_fine) if s.osrs_h else SKIPPED_16BIT
        self._regs[REG_PRESS : REG_PRESS + 3] = (adc_p << 4).to_bytes(3, "big")
        self._regs[REG_TEMP : REG_TEMP + 3] = (adc_t << 4).to_bytes(3, "big")
        self._regs[REG_HUM : REG_HUM + 2] = adc_h.to_bytes(2, "big")

    @staticmethod
    def _filtered(
        adc: int, memory: float | None, coefficient: int, keep: float
    ) -> tuple[int, float | None]:
        """DS 3.4.4: ``filtered = (filtered_old * (c - 1) + adc) / c``; the first value after a
        reset initialises the filter. Returns the 20-bit output and the new filter memory."""
        if not coefficient:
            return adc, memory
        memory = float(adc) if memory is None else adc + (memory - adc) * keep
        return round(memory), memory

    def adc_temperature(self, step: int = 1) -> int:
        """The raw 20-bit code (a multiple of ``step``) nearest the physical temperature."""
        cal = self.calibration
        return search_code(
            lambda adc: temperature_int32(adc, cal)[1] / 100.0,
            self.temperature_c,
            step,
            1 << 20,
            rising=True,
        )

    def adc_pressure(self, t_fine: int, step: int = 1) -> int:
        """The raw 20-bit code nearest the physical pressure at fine temperature ``t_fine``
        (pressure falls as the code rises)."""
        cal = self.calibration
        return search_code(
            lambda adc: pressure_int64(adc, t_fine, cal) / 25600.0,
            self.pressure_hpa,
            step,
            1 << 20,
            rising=False,
        )

    def adc_humidity(self, t_fine: int) -> int:
        """The raw 16-bit code nearest the physical humidity at fine temperature ``t_fine``."""
        cal = self.calibration

        def humidity(adc: int) -> float:
            return humidity_int32(adc, t_fine, cal) / 1024.0

        if self.humidity_rh <= 0:
            # The compensation reads 0 %RH for every code below the element's zero; a dry
            # element sits at that zero (the highest such code), not at the end of the range.
            return max(0, search_code(humidity, 1 / 1024, 1, 1 << 16, rising=True) - 1)
        return search_code(humidity, self.humidity_rh, 1, 1 << 16, rising=True)

    # -- the wire ------------------------------------------------------------------------
    def read_registers(self, register: int, length: int) -> bytes:
        self._advance()
        start = self._pointer if register < 0 else register
        copying = self.clock.monotonic() < self._nvm_ready_at
        out = bytearray()
        for address in range(start, start + length):
            if address > 0xFF or address == REG_RESET:
                out.append(0x00)
            elif address == REG_ID:
                out.append(self.chip_id)
            elif address == REG_STATUS:
                status = field_put("measuring", 0, int(self._measuring()))
                out.append(field_put("im_update", status, int(copying)))
            elif address in self._nvm:
                out.append(0x00 if copying else self._nvm[address])
            else:
                out.append(self._regs[address])
        self._pointer = start
        return bytes(out)

    def write_registers(self, register: int | None, data: bytes) -> None:
        self._advance()
        if register is None:  # pointer-only write
            if data:
                self._pointer = data[0]
            return
        # DS 6.2.1: a multi-byte write is register/data pairs, not auto-increment.
        pairs = [(register, data[0])] if data else []
        pairs += [(data[i], data[i + 1]) for i in range(1, len(data) - 1, 2)]
        for address, value in pairs:
            self._write(address, value)
        self._pointer = register

    def _write(self, address: int, value: int) -> None:
        now = self.clock.monotonic()
        if address == REG_RESET:
            if value == SOFT_RESET_WORD:
                self._reset(ready_at=now + STARTUP_S)
        elif address == REG_CTRL_HUM:
            self._regs[address] = value & FIELDS["osrs_h"][1]  # effective at the next ctrl_meas
        elif address == REG_CTRL_MEAS:
            self._regs[address] = value
            self._osrs_h_latched = field_get("osrs_h", self._regs[REG_CTRL_HUM])
            mode = field_get("mode", value)
            if mode == MODE_NORMAL:
                if self._normal is None:
                    self._normal = (now, self._settings())
            else:
                self._normal = None
                if mode != MODE_SLEEP and self._forced is None:
                    self._forced = (now, self._settings())
        elif address == REG_CONFIG and self._normal is None:
            # DS 5.4.6: writes to config in normal mode may be ignored; this part ignores them.
            self._regs[address] = value
            self._iir_t = self._iir_p = None  # DS 3.4.4: writing the filter setting resets it
        # Calibration, id, status and data registers are read-only: writes are ignored.

    # -- physical input ------------------------------------------------------------------
    def set_channel(self, channel: str, value: float) -> None:
        self._advance()  # cycles that ended before the change saw the old value
        if channel == "temperature_c":
            self.temperature_c = float(value)
        elif channel == "humidity_rh":
            self.humidity_rh = float(value)
        elif channel == "pressure_hpa":
            self.pressure_hpa = float(value)
        else:
            raise KeyError(f"bme280 has no channel {channel!r}")
