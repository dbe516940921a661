"""A register-level BME280 simulator, built on the register map of :mod:`drivers.bme280`.

It behaves like the chip on the wire (datasheet BST-BME280-DS002 rev 1.6, "DS"):

- chip id 0x60 at 0xD0, reset values, soft reset (0xB6 to 0xE0) with a 2 ms NVM copy during which
  status.im_update is set and the calibration registers are not yet valid (they read 0x00);
- calibration NVM at 0x88..0xA1 and 0xE1..0xE7 laid out as DS table 16 says, including the
  dig_H4/dig_H5 12-bit packing; the default constants are realistic and several are negative;
- I2C reads auto-increment; I2C writes are register/data pairs (DS 6.2.1);
- ctrl_hum only takes effect after a write to ctrl_meas (DS 5.4.3); config writes are ignored in
  normal mode (DS 5.4.6) and reset the IIR filter (DS 3.4.4);
- forced mode converts once (status.measuring set for the maximum measurement time of DS 9.1,
  plus ``faults.slow``) and returns to sleep; normal mode converts every t_measure + t_standby;
- resolution: without the IIR filter a 20-bit temperature/pressure output has 16 + (osrs - 1)
  significant bits, with it 20 bits (DS 3.4.2/3.4.3); the IIR filter is initialised with the first
  value after a reset or config write and then applies DS equation (3.4.4);
- skipped measurements read 0x80000 / 0x8000 and keep the filter memory (DS 3.4.4);
- ``set_channel`` takes a physical value and finds the raw ADC code whose compensated value is
  nearest to it, by bisection on the (monotonic) integer compensation of the driver module.

Fault knobs: ``stuck`` freezes the data registers (conversions still run and status still
toggles, so the driver cannot tell); ``slow`` lengthens each conversion; ``nack``,
``disconnect`` and ``bit_flip`` are applied by :class:`~drivers.sim.smbus.SimDevice`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from drivers import bme280 as chip
from drivers.bme280 import REGISTERS, Calibration
from drivers.clock import Clock
from drivers.sim.smbus import SimDevice

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

_ADDR = {reg.name: reg.address for reg in REGISTERS}
_OSRS_T = REGISTERS.field("ctrl_meas", "osrs_t")
_OSRS_P = REGISTERS.field("ctrl_meas", "osrs_p")
_MODE = REGISTERS.field("ctrl_meas", "mode")
_OSRS_H = REGISTERS.field("ctrl_hum", "osrs_h")
_FILTER = REGISTERS.field("config", "filter")
_T_SB = REGISTERS.field("config", "t_sb")
_MEASURING = REGISTERS.field("status", "measuring")
_IM_UPDATE = REGISTERS.field("status", "im_update")
_CALIB_ADDRESSES = frozenset(
    a for reg in chip.CALIBRATION_REGISTERS for a in range(reg.address, reg.address + reg.width)
)
_DATA_ADDRESSES = range(chip.DATA_BLOCK[0], chip.DATA_BLOCK[0] + chip.DATA_BLOCK[1])


def encode_calibration(cal: Calibration) -> dict[int, int]:
    """The NVM bytes of ``cal`` by register address, as a real part stores them (DS table 16)."""
    out: dict[int, int] = {}
    packed = {"dig_H4_msb": cal.dig_H4 >> 4, "dig_H5_msb": cal.dig_H5 >> 4}
    lsb = REGISTERS.field("dig_H45_lsb", "dig_H4_lsb").set(0, cal.dig_H4 & 0x0F)
    packed["dig_H45_lsb"] = REGISTERS.field("dig_H45_lsb", "dig_H5_lsb").set(lsb, cal.dig_H5 & 0x0F)
    for reg in chip.CALIBRATION_REGISTERS:
        value = packed[reg.name] if reg.name in packed else getattr(cal, reg.name)
        for i, byte in enumerate(reg.encode(value)):
            out[reg.address + i] = byte
    return out


def nearest_code(
    fn: Callable[[int], float], target: float, step: int, limit: int, *, increasing: bool
) -> int:
    """The multiple of ``step`` in ``[0, limit)`` whose ``fn`` value is nearest ``target``.

    ``fn`` must be monotonic over the codes (the Bosch compensation is, over the part's range).
    """
    sign = 1.0 if increasing else -1.0
    lo, hi = 0, (limit - 1) // step
    while lo < hi:  # first index with sign*fn >= sign*target
        mid = (lo + hi) // 2
        if sign * fn(mid * step) < sign * target:
            lo = mid + 1
        else:
            hi = mid
    candidates = [i for i in (lo - 1, lo, lo + 1) if 0 <= i <= (limit - 1) // step]
    best = min(candidates, key=lambda i: abs(fn(i * step) - target))
    return best * step


@dataclass
class _Conversion:
    """The settings a measurement cycle runs with (captured at its start)."""

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
        calibration: Calibration = DEFAULT_CALIBRATION,
        chip_id: int = chip.CHIP_ID,
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
        self._power_on_reset(ready_at=clock.monotonic())

    # -- state ---------------------------------------------------------------------------
    def _power_on_reset(self, ready_at: float) -> None:
        self._regs = bytearray(256)
        for reg in REGISTERS:
            if reg.access != "w" and reg.address not in _CALIB_ADDRESSES:
                for i, byte in enumerate(reg.reset.to_bytes(reg.width, "big")):
                    self._regs[reg.address + i] = byte
        self._osrs_h_latched = 0
        self._filter_t: float | None = None
        self._filter_p: float | None = None
        self._nvm_ready_at = ready_at
        self._forced: tuple[float, _Conversion] | None = None  # (start, settings)
        self._normal: tuple[float, _Conversion] | None = None  # (cycle start, settings)

    def _settings(self) -> _Conversion:
        meas = self._regs[_ADDR["ctrl_meas"]]
        return _Conversion(
            osrs_t=chip.oversampling_factor(_OSRS_T.get(meas)),
            osrs_p=chip.oversampling_factor(_OSRS_P.get(meas)),
            osrs_h=chip.oversampling_factor(self._osrs_h_latched),
            filter=chip.filter_coefficient(_FILTER.get(self._regs[_ADDR["config"]])),
        )

    def _duration(self, s: _Conversion) -> float:
        return chip.measurement_time_s(s.osrs_t, s.osrs_p, s.osrs_h, maximum=True) + max(
            0.0, self.faults.slow
        )

    def _standby(self) -> float:
        return chip.STANDBY_MS_BY_CODE[_T_SB.get(self._regs[_ADDR["config"]])] / 1000.0

    def _advance(self) -> None:
        """Finish the conversions that have ended by now."""
        now = self.clock.monotonic()
        if self._forced is not None:
            start, settings = self._forced
            if now >= start + self._duration(settings):
                self._forced = None
                self._complete(settings)
                self._regs[_ADDR["ctrl_meas"]] = _MODE.set(
                    self._regs[_ADDR["ctrl_meas"]], chip.MODE_SLEEP
                )
        if self._normal is not None:
            start, settings = self._normal
            if now >= start + self._duration(settings):
                # The cycle that was running ends with the settings it started with; the
                # following cycles run with the settings at their start (the current ones).
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
        for running in (self._forced, self._normal):
            if running is not None and running[0] <= now < running[0] + self._duration(running[1]):
                return True
        return False

    # -- conversion ----------------------------------------------------------------------
    def _complete(self, s: _Conversion, repeats: int = 1) -> None:
        """A measurement cycle ends: results (through the IIR filter) go to the data registers.

        ``repeats`` cycles with the same input are applied at once (normal mode catching up).
        """
        self.conversions += repeats
        if self.faults.stuck:
            return
        cal = self.calibration
        decay = ((s.filter - 1) / s.filter) ** repeats if s.filter else 0.0
        if s.osrs_t:
            adc = self.adc_temperature(chip.adc_step(s.osrs_t, s.filter))
            if s.filter:
                self._filter_t = (
                    adc if self._filter_t is None else adc + (self._filter_t - adc) * decay
                )
                adc_t = round(self._filter_t)
            else:
                adc_t = adc
            t_fine = chip.compensate_temperature(adc_t, cal)[0]
        else:
            adc_t = chip.SKIPPED_20BIT
            t_fine = chip.compensate_temperature(self.adc_temperature(1), cal)[0]
        if s.osrs_p:
            adc = self.adc_pressure(t_fine, chip.adc_step(s.osrs_p, s.filter))
            if s.filter:
                self._filter_p = (
                    adc if self._filter_p is None else adc + (self._filter_p - adc) * decay
                )
                adc_p = round(self._filter_p)
            else:
                adc_p = adc
        else:
            adc_p = chip.SKIPPED_20BIT
        adc_h = self.adc_humidity(t_fine) if s.osrs_h else chip.SKIPPED_16BIT
        for name, value in (("press", adc_p << 4), ("temp", adc_t << 4), ("hum", adc_h)):
            reg = REGISTERS[name]
            self._regs[reg.address : reg.address + reg.width] = reg.encode(value)

    def adc_temperature(self, step: int = 1) -> int:
        """The raw 20-bit code (a multiple of ``step``) nearest the physical temperature."""
        cal = self.calibration
        return nearest_code(
            lambda a: chip.compensate_temperature(a, cal)[1],
            self.temperature_c,
            step,
            1 << 20,
            increasing=True,
        )

    def adc_pressure(self, t_fine: int, step: int = 1) -> int:
        """The raw 20-bit code nearest the physical pressure at temperature ``t_fine``."""
        cal = self.calibration
        return nearest_code(
            lambda a: chip.compensate_pressure(a, t_fine, cal),
            self.pressure_hpa,
            step,
            1 << 20,
            increasing=False,
        )

    def adc_humidity(self, t_fine: int) -> int:
        """The raw 16-bit code nearest the physical humidity at temperature ``t_fine``."""
        cal = self.calibration
        return nearest_code(
            lambda a: chip.compensate_humidity(a, t_fine, cal),
            self.humidity_rh,
            1,
            1 << 16,
            increasing=True,
        )

    # -- the wire ------------------------------------------------------------------------
    def read_registers(self, register: int, length: int) -> bytes:
        self._advance()
        start = self._pointer if register < 0 else register
        copying = self.clock.monotonic() < self._nvm_ready_at
        out = bytearray()
        for addr in range(start, start + length):
            if addr > 0xFF or addr == _ADDR["reset"]:
                out.append(0x00)
            elif addr == _ADDR["id"]:
                out.append(self.chip_id)
            elif addr == _ADDR["status"]:
                status = _MEASURING.set(0, int(self._measuring()))
                out.append(_IM_UPDATE.set(status, int(copying)))
            elif addr in _CALIB_ADDRESSES:
                out.append(0x00 if copying else self._nvm[addr])
            else:
                out.append(self._regs[addr])
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
        for addr, value in pairs:
            self._write(addr, value)
        self._pointer = register

    def _write(self, addr: int, value: int) -> None:
        now = self.clock.monotonic()
        if addr == _ADDR["reset"]:
            if value == chip.SOFT_RESET:
                self._power_on_reset(ready_at=now + chip.STARTUP_S)
        elif addr == _ADDR["ctrl_hum"]:
            self._regs[addr] = value & 0x07  # takes effect at the next ctrl_meas write
        elif addr == _ADDR["ctrl_meas"]:
            self._regs[addr] = value
            self._osrs_h_latched = _OSRS_H.get(self._regs[_ADDR["ctrl_hum"]])
            mode = _MODE.get(value)
            if mode == chip.MODE_NORMAL:
                if self._normal is None:
                    self._normal = (now, self._settings())
            else:
                self._normal = None
                if mode != chip.MODE_SLEEP and self._forced is None:
                    self._forced = (now, self._settings())
        elif addr == _ADDR["config"] and self._normal is None:
            # DS 5.4.6: writes to config in normal mode may be ignored; this part ignores them.
            self._regs[addr] = value
            self._filter_t = self._filter_p = None  # DS 3.4.4: writing filter resets it
        # Calibration, id, status and data registers are read-only: writes are ignored.

    # -- physical input ------------------------------------------------------------------
    def set_channel(self, channel: str, value: float) -> None:
        self._advance()  # conversions that ended before the change saw the old value
        if channel == "temperature_c":
            self.temperature_c = float(value)
        elif channel == "humidity_rh":
            self.humidity_rh = float(value)
        elif channel == "pressure_hpa":
            self.pressure_hpa = float(value)
        else:
            raise KeyError(f"bme280 has no channel {channel!r}")
