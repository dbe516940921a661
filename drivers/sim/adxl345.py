"""A register-level ADXL345 simulator, built on the register map of :mod:`drivers.adxl345`.

It behaves like the part on the wire (ADXL345 data sheet rev. D, "DS"):

- DEVID 0xE5, reset values (BW_RATE 0x0A, INT_SOURCE 0x02), multi-byte reads and writes that
  auto-increment;
- measurement starts when POWER_CTL.MEASURE is set: samples are taken at the BW_RATE output data
  rate from ``clock.monotonic()`` (sample n is ready at start + (n + 1) / rate, plus
  ``faults.slow``);
- a 32-entry FIFO in bypass, FIFO, stream and trigger mode (trigger is treated as stream: no
  trigger events are simulated). Stream mode drops the oldest entry when full and sets the
  overrun bit; entering bypass empties the FIFO. A read that touches DATAX0..DATAZ1 pops one
  entry (DS "FIFO": read all six bytes in one burst); with the FIFO empty the data registers keep
  the last entry. FIFO_STATUS reports the entries; INT_SOURCE has DATA_READY, watermark
  (entries >= FIFO_CTL.SAMPLES) and overrun, cleared by reading the data registers;
- output words as DATA_FORMAT says: range, full resolution or 10 bits, right or left justified,
  saturating at full scale; at 1600/3200 Hz in full resolution or 10-bit +-2 g the LSB is 0 (DS
  "Data formatting of upper data rates"); OFSX/OFSY/OFSZ offsets (15.6 mg/LSB) are added.

Physical signal: a static acceleration (gravity; ``x_g``, ``y_g``, ``z_g``, default 0, 0, 1 g)
plus a vibration in the x-y plane: an elliptical orbit (a rotating imbalance), periodic with
32 samples (so the tone is at rate / 32: 100 Hz at 3200 Hz), whose AC RMS is the value given to
``set_channel("vibration_rms_g", v)``. Because the part quantises to 3.9 mg (7.8 mg at the top
rates) and SKAB's vibration is only a few LSB, the amplitude, phase and ellipse ratio are chosen
by :func:`tune_vibration` so that the RMS of the *quantised* period equals ``v`` as closely as the
codes allow: within 1/8 of the output step (0.975 mg at the driver's defaults; typically under
0.2 mg) for v from max(5 mg, step / 2) to 2 g, without clipping. Any window of a multiple of 32
consecutive samples holds whole periods, so the driver's RMS over it equals the tuned value.

Fault knobs: ``stuck`` stops new samples entering the FIFO (the data registers keep their last
values, DATA_READY and FIFO entries stay at 0 once drained: the driver sees a stall);
``slow`` delays every sample; ``nack``, ``disconnect``, ``bit_flip`` are applied by SimDevice.
"""

from __future__ import annotations

import math
from collections import deque
from functools import lru_cache
from typing import Any

import numpy as np

from drivers import adxl345 as chip
from drivers.adxl345 import REGISTERS
from drivers.clock import Clock
from drivers.sim.smbus import SimDevice

PERIOD = 32  # samples per vibration period
#: Ellipse ratios (y amplitude / x amplitude) the tuning tries, in order.
ELLIPSE_RATIOS = (1.0, 0.9, 0.8, 0.6, 0.4)
#: Phases tried per ratio (spread over one sample interval).
PHASES = 16
#: The tuning stops early once the error is below this fraction of the output step.
GOOD_ENOUGH = 1 / 64

_A = {reg.name: reg.address for reg in REGISTERS}
_DATA = range(chip.DATA_START, chip.DATA_START + chip.DATA_LEN)
_F = {
    name: REGISTERS.field(reg, name)
    for reg, name in (
        ("BW_RATE", "RATE"),
        ("POWER_CTL", "MEASURE"),
        ("DATA_FORMAT", "FULL_RES"),
        ("DATA_FORMAT", "JUSTIFY"),
        ("DATA_FORMAT", "RANGE"),
        ("FIFO_CTL", "FIFO_MODE"),
        ("FIFO_CTL", "SAMPLES"),
        ("INT_SOURCE", "DATA_READY"),
        ("INT_SOURCE", "WATERMARK"),
        ("INT_SOURCE", "OVERRUN"),
        ("FIFO_STATUS", "ENTRIES"),
    )
}
_RANGE_BY_CODE = {code: g for g, code in chip.RANGE_CODES.items()}
_THETA = 2 * np.pi * np.arange(PERIOD) / PERIOD


def quantize(accel_g: np.ndarray, scale: float, step: int, bits: int) -> np.ndarray:
    """Acceleration in g to output codes: round to ``step`` LSBs, saturate at full scale."""
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - step
    return np.clip(np.round(accel_g / (scale * step)) * step, lo, hi).astype(np.int64)


def _orbit(
    amplitude: np.ndarray, phase: np.ndarray, ratio: float, static: tuple[float, float, float]
) -> tuple[np.ndarray, np.ndarray]:
    angle = _THETA[None, None, :] + phase[None, :, None]
    x = static[0] + amplitude[:, None, None] * np.cos(angle)
    y = static[1] + ratio * amplitude[:, None, None] * np.sin(angle)
    return x, y


def _quantized_rms(x: np.ndarray, y: np.ndarray, scale: float, step: int, bits: int) -> np.ndarray:
    qx = quantize(x, scale, step, bits).astype(np.float64)
    qy = quantize(y, scale, step, bits).astype(np.float64)
    var = ((qx - qx.mean(-1, keepdims=True)) ** 2).mean(-1)
    var += ((qy - qy.mean(-1, keepdims=True)) ** 2).mean(-1)
    return np.sqrt(var) * scale


@lru_cache(maxsize=4096)
def tune_vibration(
    rms_g: float, static: tuple[float, float, float], scale: float, step: int, bits: int
) -> tuple[float, float, float]:
    """``(amplitude, phase, ratio)`` of the orbit whose quantised period has AC RMS nearest
    ``rms_g``. ``static`` is the static acceleration of each axis, which sets the rounding."""
    if rms_g <= 0:
        return 0.0, 0.0, 1.0
    q = scale * step
    phases = np.arange(PHASES) / PHASES * 2 * np.pi / PERIOD
    best = (math.inf, 0.0, 0.0, 1.0)
    # Near the unquantised amplitude first, then wider and with flatter ellipses.
    searches = [(1.0, 0.5, 41)] + [(ratio, 1.5, 121) for ratio in ELLIPSE_RATIOS]
    for ratio, span, count in searches:
        a0 = rms_g * math.sqrt(2 / (1 + ratio * ratio))
        amplitudes = a0 + np.linspace(-span, span, count) * q
        amplitudes = amplitudes[amplitudes >= 0]
        x, y = _orbit(amplitudes, phases, ratio, static)
        err = np.abs(_quantized_rms(x, y, scale, step, bits) - rms_g)
        i, j = np.unravel_index(int(np.argmin(err)), err.shape)
        if err[i, j] < best[0]:
            best = (float(err[i, j]), float(amplitudes[i]), float(phases[j]), ratio)
        if best[0] <= q * GOOD_ENOUGH:
            break
    return best[1], best[2], best[3]


class Adxl345Sim(SimDevice):
    """The simulated ADXL345. ``static_g`` and ``vibration_rms_g`` hold the physical motion."""

    part = "adxl345"

    def __init__(self, clock: Clock, options: Any = None, *, devid: int = chip.DEVID) -> None:
        super().__init__(clock)
        self.devid = devid
        self.static_g = [0.0, 0.0, 1.0]
        self.vibration_rms_g = 0.0
        self.samples_taken = 0
        self._regs = bytearray(0x40)
        for reg in REGISTERS:
            self._regs[reg.address] = reg.reset & 0xFF
        self._fifo: deque[bytes] = deque()
        self._output = bytes(chip.DATA_LEN)  # the data registers
        self._ready = False  # bypass mode: an unread sample in the data registers
        self._overrun = False
        self._start: float | None = None  # time the sample count starts from (measure on)
        self._next = 0  # index of the next sample to take
        self._table_key: tuple[Any, ...] | None = None
        self._table: list[bytes] = []

    # -- settings ------------------------------------------------------------------------
    def _rate(self) -> float:
        return chip.rate_hz(_F["RATE"].get(self._regs[_A["BW_RATE"]]))

    def _format(self) -> tuple[int, bool, bool]:
        fmt = self._regs[_A["DATA_FORMAT"]]
        return (
            _RANGE_BY_CODE[_F["RANGE"].get(fmt)],
            bool(_F["FULL_RES"].get(fmt)),
            bool(_F["JUSTIFY"].get(fmt)),
        )

    def _fifo_mode(self) -> int:
        return _F["FIFO_MODE"].get(self._regs[_A["FIFO_CTL"]])

    def _period_table(self) -> list[bytes]:
        """The 32 encoded samples of one vibration period with the current settings."""
        range_g, full, left = self._format()
        rate = self._rate()
        offsets = [
            REGISTERS[n].decode([self._regs[_A[n]]]) * chip.OFFSET_G_PER_LSB
            for n in ("OFSX", "OFSY", "OFSZ")
        ]
        static = tuple(float(s + o) for s, o in zip(self.static_g, offsets, strict=True))
        bits = chip.data_bits(range_g, full)
        scale = chip.scale_g(range_g, full)
        step = 2 if chip.lsb_always_zero(rate, range_g, full) else 1
        key = (static, self.vibration_rms_g, bits, scale, step, left)
        if key != self._table_key:
            amp, phase, ratio = tune_vibration(self.vibration_rms_g, static, scale, step, bits)
            x, y = _orbit(np.array([amp]), np.array([phase]), ratio, static)
            axes = (
                quantize(x[0, 0], scale, step, bits),
                quantize(y[0, 0], scale, step, bits),
                quantize(np.full(PERIOD, static[2]), scale, step, bits),
            )
            shift = 16 - bits if left else 0
            self._table = [
                b"".join(int(axis[k] << shift).to_bytes(2, "little", signed=True) for axis in axes)
                for k in range(PERIOD)
            ]
            self._table_key = key
        return self._table

    # -- sampling ------------------------------------------------------------------------
    def _catch_up(self) -> None:
        """Take the samples that have become ready since the last bus access."""
        if self._start is None:
            return
        now = self.clock.monotonic()
        due = math.floor((now - self._start - max(0.0, self.faults.slow)) * self._rate() + 1e-9)
        if due <= self._next:
            return
        if self.faults.stuck:
            self._next = due  # nothing reaches the FIFO or the data registers
            return
        first = max(self._next, due - (chip.FIFO_DEPTH + 1))
        if first > self._next and self._fifo_mode() != chip.FIFO_BYPASS:
            self._overrun = True  # samples came and went while the FIFO was full
        table = self._period_table()
        for n in range(first, due):
            self._push(table[n % PERIOD])
        self.samples_taken += due - self._next
        self._next = due

    def _push(self, entry: bytes) -> None:
        mode = self._fifo_mode()
        if mode == chip.FIFO_BYPASS:
            if self._ready:
                self._overrun = True
            self._output = entry
            self._ready = True
        elif len(self._fifo) < chip.FIFO_DEPTH:
            self._fifo.append(entry)
        elif mode == chip.FIFO_FIFO:
            self._overrun = True  # FIFO mode stops collecting when full
        else:  # stream (and trigger, simulated as stream): the oldest entry goes
            self._fifo.popleft()
            self._fifo.append(entry)
            self._overrun = True

    def _restart_sampling(self) -> None:
        measuring = _F["MEASURE"].get(self._regs[_A["POWER_CTL"]])
        self._start = self.clock.monotonic() if measuring else None
        self._next = 0

    # -- the wire ------------------------------------------------------------------------
    def read_registers(self, register: int, length: int) -> bytes:
        self._catch_up()
        start = max(register, 0)
        touches_data = start < _DATA.stop and start + length > _DATA.start
        entry = self._fifo[0] if (self._fifo and touches_data) else self._output
        out = bytearray()
        for addr in range(start, start + length):
            if addr in _DATA:
                out.append(entry[addr - _DATA.start])
            elif addr == _A["DEVID"]:
                out.append(self.devid)
            elif addr == _A["INT_SOURCE"]:
                out.append(self._int_source())
            elif addr == _A["FIFO_STATUS"]:
                entries = 0 if self._fifo_mode() == chip.FIFO_BYPASS else len(self._fifo)
                out.append(_F["ENTRIES"].set(0, entries))
            elif addr == _A["ACT_TAP_STATUS"] or addr >= len(self._regs):
                out.append(0)
            else:
                out.append(self._regs[addr])
        if touches_data:
            if self._fifo:
                self._output = self._fifo.popleft()
            self._ready = False
            self._overrun = False
        return bytes(out)

    def _int_source(self) -> int:
        if self._fifo_mode() == chip.FIFO_BYPASS:
            ready, entries = self._ready, 0
        else:
            ready, entries = bool(self._fifo), len(self._fifo)
        value = _F["DATA_READY"].set(0, int(ready))
        watermark = entries >= _F["SAMPLES"].get(self._regs[_A["FIFO_CTL"]])
        value = _F["WATERMARK"].set(value, int(watermark))
        return _F["OVERRUN"].set(value, int(self._overrun))

    def write_registers(self, register: int | None, data: bytes) -> None:
        self._catch_up()
        if register is None:
            return
        for offset, value in enumerate(data):  # multi-byte writes auto-increment
            self._write(register + offset, value)

    def _write(self, addr: int, value: int) -> None:
        reg = REGISTERS.at(addr)
        if reg is None or reg.access == "r" or addr >= len(self._regs):
            return
        old = self._regs[addr]
        self._regs[addr] = value
        if addr == _A["POWER_CTL"]:
            if _F["MEASURE"].get(old) != _F["MEASURE"].get(value):
                self._restart_sampling()
        elif addr == _A["BW_RATE"]:
            if self._start is not None and value != old:
                self._restart_sampling()
        elif addr == _A["FIFO_CTL"] and (
            _F["FIFO_MODE"].get(value) == chip.FIFO_BYPASS
            or _F["FIFO_MODE"].get(old) != _F["FIFO_MODE"].get(value)
        ):
            # Entering bypass (or switching modes) empties the FIFO.
            self._fifo.clear()
            self._overrun = False

    # -- physical input ------------------------------------------------------------------
    def set_channel(self, channel: str, value: float) -> None:
        self._catch_up()  # samples taken before the change saw the old motion
        value = float(value)
        if channel == "vibration_rms_g":
            if value < 0 or not math.isfinite(value):
                raise ValueError(f"vibration RMS must be finite and >= 0, got {value!r}")
            self.vibration_rms_g = value
        elif channel in ("x_g", "y_g", "z_g"):
            self.static_g["xyz".index(channel[0])] = value
        else:
            raise KeyError(f"adxl345 has no channel {channel!r}")
