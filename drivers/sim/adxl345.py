"""A register-level ADXL345 simulator, written from the data sheet alone.

Source: Analog Devices ADXL345 data sheet rev. D ("DS"). The register table, the data formats and
the rate table below are this module's own transcription of the data sheet; nothing comes from
the driver (:mod:`drivers.adxl345`), so a mistake there shows up as a disagreement here.

On the wire it behaves like the part:

- DEVID 0xE5, reset values (BW_RATE 0x0A, INT_SOURCE 0x02; DS table 19), multi-byte reads and
  writes that auto-increment;
- measurement starts when POWER_CTL.MEASURE is set: samples are taken at the BW_RATE output data
  rate from ``clock.monotonic()`` (sample n is ready at start + (n + 1) / rate, plus
  ``faults.slow``);
- a 32-entry FIFO in bypass, FIFO, stream and trigger mode (trigger is treated as stream: no
  trigger events are simulated). Stream mode drops the oldest entry when full and sets the
  overrun bit; entering bypass empties the FIFO. A read that touches DATAX0..DATAZ1 pops one
  entry (DS "FIFO": read all six bytes in one burst); with the FIFO empty the data registers keep
  the last entry. FIFO_STATUS reports the entries; INT_SOURCE has DATA_READY, watermark
  (entries >= FIFO_CTL.SAMPLES) and overrun, cleared by reading the data registers;
- output words as DATA_FORMAT says (DS register 0x31): the range, full resolution (10 to 13 bits
  at 3.9 mg/LSB) or 10 bits (3.9 mg/LSB times range / 2), right justified with sign extension or
  left justified, saturating at full scale; at 1600/3200 Hz in full resolution or 10-bit +-2 g
  the LSB is 0 (DS "Data formatting of upper data rates"); OFSX/OFSY/OFSZ offsets (15.6 mg/LSB)
  are added.

Forward conversion: code = round(acceleration / scale factor), with the typical scale factor of
DS table 1 (3.9 mg/LSB; the sensitivity row of the same table gives 256 LSB/g, 0.16 % apart and
far inside the part-to-part spread of 230..282 LSB/g).

Physical signal: a static acceleration (gravity; ``x_g``, ``y_g``, ``z_g``, default 0, 0, 1 g)
plus a vibration in the x-y plane: an elliptical orbit (a rotating imbalance), periodic with
32 samples (so the tone is at rate / 32: 100 Hz at 3200 Hz), whose AC RMS is the value given to
``set_channel("vibration_rms_g", v)``. Because the part quantises to 3.9 mg (7.8 mg at the top
rates) and SKAB's vibration is only a few LSB, the amplitude, phase and ellipse ratio are chosen
by :func:`tune_vibration` so that the RMS of the *quantised* period equals ``v`` as closely as the
codes allow: within 1/8 of the output step (0.975 mg at 3200 Hz, full resolution; typically under
0.2 mg) for v from max(5 mg, step / 2) to 2 g, without clipping. Any window of a multiple of 32
consecutive samples holds whole periods, so the RMS over it equals the tuned value.

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

from drivers.clock import Clock
from drivers.sim.smbus import SimDevice

# --------------------------------------------------------------------------------------------
# Register table (DS table 19 and "Register definitions")

DEVID = 0xE5
#: name -> (address, access, reset value). 0x01..0x1C are reserved.
REGISTERS: dict[str, tuple[int, str, int]] = {
    "DEVID": (0x00, "r", DEVID),
    "THRESH_TAP": (0x1D, "rw", 0x00),
    "OFSX": (0x1E, "rw", 0x00),
    "OFSY": (0x1F, "rw", 0x00),
    "OFSZ": (0x20, "rw", 0x00),
    "DUR": (0x21, "rw", 0x00),
    "LATENT": (0x22, "rw", 0x00),
    "WINDOW": (0x23, "rw", 0x00),
    "THRESH_ACT": (0x24, "rw", 0x00),
    "THRESH_INACT": (0x25, "rw", 0x00),
    "TIME_INACT": (0x26, "rw", 0x00),
    "ACT_INACT_CTL": (0x27, "rw", 0x00),
    "THRESH_FF": (0x28, "rw", 0x00),
    "TIME_FF": (0x29, "rw", 0x00),
    "TAP_AXES": (0x2A, "rw", 0x00),
    "ACT_TAP_STATUS": (0x2B, "r", 0x00),
    "BW_RATE": (0x2C, "rw", 0x0A),
    "POWER_CTL": (0x2D, "rw", 0x00),
    "INT_ENABLE": (0x2E, "rw", 0x00),
    "INT_MAP": (0x2F, "rw", 0x00),
    "INT_SOURCE": (0x30, "r", 0x02),
    "DATA_FORMAT": (0x31, "rw", 0x00),
    "DATAX0": (0x32, "r", 0x00),
    "DATAX1": (0x33, "r", 0x00),
    "DATAY0": (0x34, "r", 0x00),
    "DATAY1": (0x35, "r", 0x00),
    "DATAZ0": (0x36, "r", 0x00),
    "DATAZ1": (0x37, "r", 0x00),
    "FIFO_CTL": (0x38, "rw", 0x00),
    "FIFO_STATUS": (0x39, "r", 0x00),
}
ADDRESS = {name: spec[0] for name, spec in REGISTERS.items()}
BY_ADDRESS = {spec[0]: name for name, spec in REGISTERS.items()}
DATA = range(ADDRESS["DATAX0"], ADDRESS["DATAZ1"] + 1)  # X, Y, Z words, LSB first

#: Fields: name -> (register, mask), DS "Register definitions".
FIELDS: dict[str, tuple[str, int]] = {
    "RATE": ("BW_RATE", 0x0F),
    "MEASURE": ("POWER_CTL", 0x08),
    "FULL_RES": ("DATA_FORMAT", 0x08),
    "JUSTIFY": ("DATA_FORMAT", 0x04),
    "RANGE": ("DATA_FORMAT", 0x03),
    "FIFO_MODE": ("FIFO_CTL", 0xC0),
    "SAMPLES": ("FIFO_CTL", 0x1F),
    "DATA_READY": ("INT_SOURCE", 0x80),
    "WATERMARK": ("INT_SOURCE", 0x02),
    "OVERRUN": ("INT_SOURCE", 0x01),
    "ENTRIES": ("FIFO_STATUS", 0x3F),
}

FIFO_DEPTH = 32  # DS "FIFO"
#: DS table 22: FIFO modes.
FIFO_BYPASS, FIFO_FIFO, FIFO_STREAM, FIFO_TRIGGER = 0b00, 0b01, 0b10, 0b11
#: DS table 21: g range by the RANGE bits.
RANGE_G = (2, 4, 8, 16)
#: DS table 1: scale factor, full resolution (every range) and 10-bit +-2 g, g per LSB.
SCALE_G_PER_LSB = 0.0039
#: DS registers 0x1E-0x20: offset registers, two's complement, 15.6 mg/LSB.
OFFSET_G_PER_LSB = 0.0156


def field_get(name: str, byte: int) -> int:
    mask = FIELDS[name][1]
    return (byte & mask) >> ((mask & -mask).bit_length() - 1)


def field_put(name: str, byte: int, value: int) -> int:
    mask = FIELDS[name][1]
    return (byte & ~mask) | ((value << ((mask & -mask).bit_length() - 1)) & mask)


def output_data_rate(code: int) -> float:
    """DS table 7: 3200 Hz at rate code 1111, halving with each code below (0.10 Hz at 0000)."""
    return 3200.0 / (1 << (15 - code))


def word_format(range_g: int, full_resolution: bool) -> tuple[int, float]:
    """``(significant bits, g per LSB)`` of an output word (DS register 0x31, table 1): full
    resolution keeps 3.9 mg/LSB and grows from 10 bits at +-2 g to 13 bits at +-16 g; 10-bit mode
    spans the range with 10 bits (3.9, 7.8, 15.6, 31.2 mg/LSB)."""
    steps = RANGE_G.index(range_g)  # 0 at +-2 g ... 3 at +-16 g
    if full_resolution:
        return 10 + steps, SCALE_G_PER_LSB
    return 10, SCALE_G_PER_LSB * (1 << steps)


def lsb_is_zero(rate_hz: float, range_g: int, full_resolution: bool) -> bool:
    """DS "Data formatting of upper data rates": at 3200 and 1600 Hz the LSB of the word is
    always 0 in full resolution and in 10-bit +-2 g mode."""
    return rate_hz >= 1600.0 and (full_resolution or range_g == 2)


PERIOD = 32  # samples per vibration period
#: Ellipse ratios (y amplitude / x amplitude) the tuning tries, in order.
ELLIPSE_RATIOS = (1.0, 0.9, 0.8, 0.6, 0.4)
#: Phases tried per ratio (spread over one sample interval).
PHASES = 16
#: The tuning stops early once the error is below this fraction of the output step.
GOOD_ENOUGH = 1 / 64
#: Amplitudes whose orbits the tuning quantises at once (bounds its temporaries).
TUNE_ROWS = 8

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
        err = np.empty((len(amplitudes), len(phases)))
        # A few amplitudes at a time: the orbits of all 121 at once took ~3 MB of temporaries,
        # the peak memory of an agent on the simulated rig. Row by row, the same values.
        for lo in range(0, len(amplitudes), TUNE_ROWS):
            x, y = _orbit(amplitudes[lo : lo + TUNE_ROWS], phases, ratio, static)
            err[lo : lo + TUNE_ROWS] = np.abs(_quantized_rms(x, y, scale, step, bits) - rms_g)
        i, j = np.unravel_index(int(np.argmin(err)), err.shape)
        if err[i, j] < best[0]:
            best = (float(err[i, j]), float(amplitudes[i]), float(phases[j]), ratio)
        if best[0] <= q * GOOD_ENOUGH:
            break
    return best[1], best[2], best[3]


class Adxl345Sim(SimDevice):
    """The simulated ADXL345. ``static_g`` and ``vibration_rms_g`` hold the physical motion."""

    part = "adxl345"

    def __init__(self, clock: Clock, options: Any = None, *, devid: int = DEVID) -> None:
        super().__init__(clock)
        self.devid = devid
        self.static_g = [0.0, 0.0, 1.0]
        self.vibration_rms_g = 0.0
        self.samples_taken = 0
        self._regs = bytearray(0x40)
        for address, _access, reset in REGISTERS.values():
            self._regs[address] = reset
        self._fifo: deque[bytes] = deque()
        self._output = bytes(len(DATA))  # the data registers
        self._ready = False  # bypass mode: an unread sample in the data registers
        self._overrun = False
        self._start: float | None = None  # time the sample count starts from (measure on)
        self._next = 0  # index of the next sample to take
        self._table_key: tuple[Any, ...] | None = None
        self._table: list[bytes] = []

    # -- settings ------------------------------------------------------------------------
    def _reg(self, name: str) -> int:
        return self._regs[ADDRESS[name]]

    def _rate(self) -> float:
        return output_data_rate(field_get("RATE", self._reg("BW_RATE")))

    def _format(self) -> tuple[int, bool, bool]:
        fmt = self._reg("DATA_FORMAT")
        return (
            RANGE_G[field_get("RANGE", fmt)],
            bool(field_get("FULL_RES", fmt)),
            bool(field_get("JUSTIFY", fmt)),
        )

    def _fifo_mode(self) -> int:
        return field_get("FIFO_MODE", self._reg("FIFO_CTL"))

    def _period_table(self) -> list[bytes]:
        """The 32 encoded samples of one vibration period with the current settings."""
        range_g, full, left = self._format()
        offsets = [
            int.from_bytes([self._reg(name)], "little", signed=True) * OFFSET_G_PER_LSB
            for name in ("OFSX", "OFSY", "OFSZ")
        ]
        static = tuple(float(s + o) for s, o in zip(self.static_g, offsets, strict=True))
        bits, scale = word_format(range_g, full)
        step = 2 if lsb_is_zero(self._rate(), range_g, full) else 1
        key = (static, self.vibration_rms_g, bits, scale, step, left)
        if key != self._table_key:
            amp, phase, ratio = tune_vibration(self.vibration_rms_g, static, scale, step, bits)
            x, y = _orbit(np.array([amp]), np.array([phase]), ratio, static)
            axes = (
                quantize(x[0, 0], scale, step, bits),
                quantize(y[0, 0], scale, step, bits),
                quantize(np.full(PERIOD, static[2]), scale, step, bits),
            )
            # Right justified: the two's complement code sign-extended to 16 bits; left
            # justified: the code in the top bits, the unused low bits 0 (DS register 0x31).
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
        first = max(self._next, due - (FIFO_DEPTH + 1))
        if first > self._next and self._fifo_mode() != FIFO_BYPASS:
            self._overrun = True  # samples came and went while the FIFO was full
        table = self._period_table()
        for n in range(first, due):
            self._push(table[n % PERIOD])
        self.samples_taken += due - self._next
        self._next = due

    def _push(self, entry: bytes) -> None:
        mode = self._fifo_mode()
        if mode == FIFO_BYPASS:
            if self._ready:
                self._overrun = True
            self._output = entry
            self._ready = True
        elif len(self._fifo) < FIFO_DEPTH:
            self._fifo.append(entry)
        elif mode == FIFO_FIFO:
            self._overrun = True  # FIFO mode stops collecting when full
        else:  # stream (and trigger, simulated as stream): the oldest entry goes
            self._fifo.popleft()
            self._fifo.append(entry)
            self._overrun = True

    def _restart_sampling(self) -> None:
        measuring = field_get("MEASURE", self._reg("POWER_CTL"))
        self._start = self.clock.monotonic() if measuring else None
        self._next = 0

    # -- the wire ------------------------------------------------------------------------
    def read_registers(self, register: int, length: int) -> bytes:
        self._catch_up()
        start = max(register, 0)
        touches_data = start < DATA.stop and start + length > DATA.start
        entry = self._fifo[0] if (self._fifo and touches_data) else self._output
        out = bytearray()
        for address in range(start, start + length):
            name = BY_ADDRESS.get(address)
            if address in DATA:
                out.append(entry[address - DATA.start])
            elif name == "DEVID":
                out.append(self.devid)
            elif name == "INT_SOURCE":
                out.append(self._int_source())
            elif name == "FIFO_STATUS":
                entries = 0 if self._fifo_mode() == FIFO_BYPASS else len(self._fifo)
                out.append(field_put("ENTRIES", 0, entries))
            elif name is None or name == "ACT_TAP_STATUS":
                out.append(0)  # reserved addresses, and no tap or activity is simulated
            else:
                out.append(self._regs[address])
        if touches_data:
            if self._fifo:
                self._output = self._fifo.popleft()
            self._ready = False
            self._overrun = False
        return bytes(out)

    def _int_source(self) -> int:
        if self._fifo_mode() == FIFO_BYPASS:
            ready, entries = self._ready, 0
        else:
            ready, entries = bool(self._fifo), len(self._fifo)
        value = field_put("DATA_READY", 0, int(ready))
        watermark = entries >= field_get("SAMPLES", self._reg("FIFO_CTL"))
        value = field_put("WATERMARK", value, int(watermark))
        return field_put("OVERRUN", value, int(self._overrun))

    def write_registers(self, register: int | None, data: bytes) -> None:
        self._catch_up()
        if register is None:
            return
        for offset, value in enumerate(data):  # multi-byte writes auto-increment
            self._write(register + offset, value)

    def _write(self, address: int, value: int) -> None:
        name = BY_ADDRESS.get(address)
        if name is None or REGISTERS[name][1] == "r":
            return  # reserved or read-only: ignored
        old = self._regs[address]
        self._regs[address] = value
        if name == "POWER_CTL":
            if field_get("MEASURE", old) != field_get("MEASURE", value):
                self._restart_sampling()
        elif name == "BW_RATE":
            if self._start is not None and value != old:
                self._restart_sampling()
        elif name == "FIFO_CTL" and (
            field_get("FIFO_MODE", value) == FIFO_BYPASS
            or field_get("FIFO_MODE", old) != field_get("FIFO_MODE", value)
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
