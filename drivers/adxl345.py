"""Analog Devices ADXL345 3-axis accelerometer on I2C, read through its FIFO for vibration.

Reference: ADXL345 data sheet, Analog Devices, rev. D ("DS"): table 19 (register map), the
"Register definitions" section, "FIFO" and "Data formatting of upper data rates".

A reading is a window of ``window`` consecutive samples taken from the FIFO in stream mode:

- ``vibration_rms_g``: AC RMS of the acceleration vector over the window,
  ``sqrt(mean_k |a_k - mean(a)|^2)`` with the mean removed per axis (gravity does not count);
- ``x_g``, ``y_g``, ``z_g``: the mean acceleration per axis over the window (static tilt, gravity).

At the start of a read the FIFO is flushed (bypass, then stream again), so the window holds only
samples taken after the read began; the driver then drains the FIFO (at most 32 entries per bus
transaction, one 6-byte burst per entry as DS "FIFO" requires) and sleeps on the clock while it
refills. At 3200 Hz a 256-sample window takes 80 ms. The overrun bit of INT_SOURCE shows samples
lost while the FIFO was full (the host was too slow): the driver counts them in ``overruns``.

Note (DS table 7): on I2C at 400 kHz the part is only specified to keep up at 800 Hz and below;
3200 Hz works from the FIFO when the host drains it in time, and ``overruns`` says when it did not.

Logging policy: info when opened or closed, warning on FIFO overruns, debug for each window.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from drivers.base import BaseDriver, Identity, Options
from drivers.bus import I2CBus, I2CDevice
from drivers.errors import DeviceDataError, DeviceNotFound, DeviceTimeout
from drivers.regmap import Field, Register, RegisterMap

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------
# Timing constants (module level so tests can shorten them)

#: Entries to let the FIFO collect between drains: half of its 32, so the other half is slack
#: for the event loop's and the shared bus's latency (20 ms at 800 Hz; with 24 the 10 ms left
#: were overrun now and then on the reference rig, two ADXL345s on one bus beside the detector).
DRAIN_ENTRIES = 16
#: A read fails with DeviceTimeout when no sample arrives for this many sample periods ...
STALL_SAMPLE_PERIODS = 40
#: ... or for this many seconds, whichever is longer.
STALL_MIN_S = 0.25

# --------------------------------------------------------------------------------------------
# Register map, DS table 19 and "Register definitions"

DEVID = 0xE5
FIFO_DEPTH = 32
#: DS FIFO_STATUS: the FIFO holds 32 entries and one more sits in the output registers.
MAX_ENTRIES = 33
#: DS table 1: scale factor in full resolution (all ranges) and in 10-bit mode at +-2 g.
SCALE_G_PER_LSB = 0.0039
#: DS OFSX/OFSY/OFSZ: offset registers, two's complement, 15.6 mg/LSB.
OFFSET_G_PER_LSB = 0.0156

REGISTERS = RegisterMap(
    (
        Register("DEVID", 0x00, access="r", reset=DEVID),
        Register("THRESH_TAP", 0x1D),
        Register("OFSX", 0x1E, signed=True),
        Register("OFSY", 0x1F, signed=True),
        Register("OFSZ", 0x20, signed=True),
        Register("DUR", 0x21),
        Register("LATENT", 0x22),
        Register("WINDOW", 0x23),
        Register("THRESH_ACT", 0x24),
        Register("THRESH_INACT", 0x25),
        Register("TIME_INACT", 0x26),
        Register("ACT_INACT_CTL", 0x27),
        Register("THRESH_FF", 0x28),
        Register("TIME_FF", 0x29),
        Register("TAP_AXES", 0x2A),
        Register("ACT_TAP_STATUS", 0x2B, access="r"),
        Register("BW_RATE", 0x2C, reset=0x0A),
        Register("POWER_CTL", 0x2D),
        Register("INT_ENABLE", 0x2E),
        Register("INT_MAP", 0x2F),
        Register("INT_SOURCE", 0x30, access="r", reset=0x02),
        Register("DATA_FORMAT", 0x31),
        # DATAX0..DATAZ1: two's complement, DATAx0 is the least significant byte.
        Register("DATAX", 0x32, 2, "little", signed=True, access="r"),
        Register("DATAY", 0x34, 2, "little", signed=True, access="r"),
        Register("DATAZ", 0x36, 2, "little", signed=True, access="r"),
        Register("FIFO_CTL", 0x38),
        Register("FIFO_STATUS", 0x39, access="r"),
    ),
    (
        Field("BW_RATE", "LOW_POWER", 0x10),  # DS register 0x2C
        Field("BW_RATE", "RATE", 0x0F),
        Field("POWER_CTL", "LINK", 0x20),  # DS register 0x2D
        Field("POWER_CTL", "AUTO_SLEEP", 0x10),
        Field("POWER_CTL", "MEASURE", 0x08),
        Field("POWER_CTL", "SLEEP", 0x04),
        Field("POWER_CTL", "WAKEUP", 0x03),
        # DS registers 0x2E-0x30: the same bit layout in INT_ENABLE, INT_MAP and INT_SOURCE.
        Field("INT_SOURCE", "DATA_READY", 0x80),
        Field("INT_SOURCE", "SINGLE_TAP", 0x40),
        Field("INT_SOURCE", "DOUBLE_TAP", 0x20),
        Field("INT_SOURCE", "ACTIVITY", 0x10),
        Field("INT_SOURCE", "INACTIVITY", 0x08),
        Field("INT_SOURCE", "FREE_FALL", 0x04),
        Field("INT_SOURCE", "WATERMARK", 0x02),
        Field("INT_SOURCE", "OVERRUN", 0x01),
        Field("DATA_FORMAT", "SELF_TEST", 0x80),  # DS register 0x31
        Field("DATA_FORMAT", "SPI", 0x40),
        Field("DATA_FORMAT", "INT_INVERT", 0x20),
        Field("DATA_FORMAT", "FULL_RES", 0x08),
        Field("DATA_FORMAT", "JUSTIFY", 0x04),
        Field("DATA_FORMAT", "RANGE", 0x03),
        Field("FIFO_CTL", "FIFO_MODE", 0xC0),  # DS register 0x38
        Field("FIFO_CTL", "TRIGGER", 0x20),
        Field("FIFO_CTL", "SAMPLES", 0x1F),
        Field("FIFO_STATUS", "FIFO_TRIG", 0x80),  # DS register 0x39
        Field("FIFO_STATUS", "ENTRIES", 0x3F),
    ),
)
DATA_START = REGISTERS["DATAX"].address
DATA_LEN = 6

#: DS table 7: output data rate (Hz) by BW_RATE rate code (codes below 6 exist, < 6.25 Hz).
RATE_CODES: dict[float, int] = {
    6.25: 0x6,
    12.5: 0x7,
    25.0: 0x8,
    50.0: 0x9,
    100.0: 0xA,
    200.0: 0xB,
    400.0: 0xC,
    800.0: 0xD,
    1600.0: 0xE,
    3200.0: 0xF,
}
#: DS table 21: g range by the RANGE bits of DATA_FORMAT.
RANGE_CODES: dict[int, int] = {2: 0b00, 4: 0b01, 8: 0b10, 16: 0b11}
#: DS table 22: FIFO modes.
FIFO_BYPASS, FIFO_FIFO, FIFO_STREAM, FIFO_TRIGGER = 0b00, 0b01, 0b10, 0b11


def rate_hz(code: int) -> float:
    """Output data rate of a BW_RATE rate code (DS table 7: 3200 Hz at 0xF, halving per code)."""
    return 3200.0 / (1 << (0xF - (code & 0x0F)))


def data_bits(range_g: int, full_resolution: bool) -> int:
    """Significant bits of each output word: 10, or 10..13 in full resolution (DS 0x31)."""
    return 10 + int(math.log2(range_g // 2)) if full_resolution else 10


def scale_g(range_g: int, full_resolution: bool) -> float:
    """g per LSB: 3.9 mg in full resolution at every range, else 3.9 mg * range / 2."""
    return SCALE_G_PER_LSB if full_resolution else SCALE_G_PER_LSB * range_g / 2


def lsb_always_zero(rate: float, range_g: int, full_resolution: bool) -> bool:
    """DS "Data formatting of upper data rates": at 3200 and 1600 Hz, in full resolution or in
    10-bit +-2 g mode, the LSB of the output word is always 0."""
    return rate >= 1600.0 and (full_resolution or range_g == 2)


def output_step_g(rate: float, range_g: int, full_resolution: bool) -> float:
    """The smallest change of one output sample, in g, with these settings."""
    step = scale_g(range_g, full_resolution)
    return 2 * step if lsb_always_zero(rate, range_g, full_resolution) else step


def decode_samples(
    data: bytes, bits: int, *, left_justified: bool = False, even: bool = False
) -> np.ndarray:
    """FIFO entries (6 bytes each: X, Y, Z little-endian words) to an ``(n, 3)`` array of codes.

    Raises ValueError for words that cannot come from the part: right-justified words whose
    bits above ``bits`` are not copies of the sign bit, left-justified words with the unused low
    bits set, or odd codes where the LSB is always 0 (``even``).
    """
    if len(data) % DATA_LEN:
        raise ValueError(f"{len(data)} bytes is not a whole number of 6-byte FIFO entries")
    words = np.frombuffer(data, dtype="<i2").astype(np.int32).reshape(-1, 3)
    if left_justified:
        shift = 16 - bits
        if np.any(words & ((1 << shift) - 1)):
            raise ValueError("left-justified sample with unused low bits set")
        codes = words >> shift
    else:
        lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
        if np.any((words < lo) | (words > hi)):
            raise ValueError(f"sample outside the {bits}-bit range (bad sign extension)")
        codes = words
    if even and np.any(codes & 1):
        raise ValueError("odd sample where the data sheet says the LSB is always 0")
    return codes


def full_scale_codes(bits: int, even: bool) -> tuple[int, int]:
    """The lowest and highest output codes: the part saturates there at full scale (DS "Data
    formatting"), so a sample at either end is clipped. The highest is even where the LSB is
    always 0."""
    return -(1 << (bits - 1)), (1 << (bits - 1)) - (2 if even else 1)


def window_stats(codes: np.ndarray, scale: float) -> tuple[float, float, float, float]:
    """``(vibration RMS, mean x, mean y, mean z)`` in g of an ``(n, 3)`` array of codes."""
    accel = codes.astype(np.float64) * scale
    mean = accel.mean(axis=0)
    ac = accel - mean
    rms = float(np.sqrt(np.mean(np.sum(ac * ac, axis=1))))
    return rms, float(mean[0]), float(mean[1]), float(mean[2])


# --------------------------------------------------------------------------------------------
# Driver


@dataclass(frozen=True, slots=True)
class Adxl345Options:
    range_g: int = 16
    full_resolution: bool = True
    data_rate_hz: float = 3200.0
    window: int = 256


class Adxl345(BaseDriver):
    """ADXL345 on I2C: ``vibration_rms_g``, ``x_g``, ``y_g``, ``z_g``.

    Options (``[sensor.options]``):

    - ``range_g``: 2, 4, 8 or 16 (default 16);
    - ``full_resolution``: true (default; 3.9 mg/LSB at every range) or false (10-bit words);
    - ``data_rate_hz``: 6.25, 12.5, 25, 50, 100, 200, 400, 800, 1600 or 3200 (default 3200);
    - ``window``: samples per reading, a multiple of 32 from 32 to 4096 (default 256).
    """

    part: ClassVar[str] = "adxl345"
    transport: ClassVar[str] = "i2c"
    channels: ClassVar[tuple[str, ...]] = ("vibration_rms_g", "x_g", "y_g", "z_g")
    addresses: ClassVar[tuple[int, ...]] = (0x53, 0x1D)

    def __init__(self, device: I2CDevice, options: Adxl345Options | None = None) -> None:
        self.device = device
        self.options = options or Adxl345Options()
        o = self.options
        self.overruns = 0  # drains that found the overrun bit set (samples lost), since open
        self.samples = 0  # samples read since open
        self._bits = data_bits(o.range_g, o.full_resolution)
        self._scale = scale_g(o.range_g, o.full_resolution)
        self._even = lsb_always_zero(o.data_rate_hz, o.range_g, o.full_resolution)
        fmt = REGISTERS.field("DATA_FORMAT", "RANGE").set(0, RANGE_CODES[o.range_g])
        self._data_format = REGISTERS.field("DATA_FORMAT", "FULL_RES").set(
            fmt, int(o.full_resolution)
        )
        self._bw_rate = REGISTERS.field("BW_RATE", "RATE").set(0, RATE_CODES[o.data_rate_hz])
        fifo = REGISTERS.field("FIFO_CTL", "FIFO_MODE").set(0, FIFO_STREAM)
        self._fifo_stream = REGISTERS.field("FIFO_CTL", "SAMPLES").set(fifo, DRAIN_ENTRIES)
        self._measure = REGISTERS.field("POWER_CTL", "MEASURE").set(0, 1)

    # -- options -------------------------------------------------------------------------
    @classmethod
    def parse_options(cls, opts: Options) -> Adxl345Options:
        range_g = opts.choice("range_g", 16, tuple(RANGE_CODES))
        full = opts.boolean("full_resolution", True)
        rate = opts.choice("data_rate_hz", 3200.0, tuple(RATE_CODES))
        window = opts.integer("window", 256, minimum=FIFO_DEPTH, maximum=4096)
        if window % FIFO_DEPTH:
            raise opts.error(
                "window",
                f"{window} is not a multiple of {FIFO_DEPTH}: windows are whole FIFO loads "
                "(the RMS bound holds for windows of whole multiples of 32 samples)",
            )
        opts.finish()
        return Adxl345Options(
            range_g=int(range_g), full_resolution=full, data_rate_hz=float(rate), window=window
        )

    # -- lifecycle -----------------------------------------------------------------------
    async def open(self) -> Identity:
        dev = self.device
        devid = await dev.read_u8(REGISTERS["DEVID"].address)
        if devid != DEVID:
            raise DeviceNotFound(
                f"{dev}: DEVID 0x{devid:02x} where an ADXL345 reads 0x{DEVID:02x}; "
                "check the part and the address (0x53 with ALT low, 0x1D with ALT high)"
            )
        wanted = {
            "BW_RATE": self._bw_rate,
            "DATA_FORMAT": self._data_format,
            "FIFO_CTL": self._fifo_stream,
            "POWER_CTL": self._measure,
        }

        def configure(bus: I2CBus, addr: int) -> dict[str, int]:
            a = {name: REGISTERS[name].address for name in REGISTERS_TO_CONFIGURE}
            bus.write_byte_data(addr, a["POWER_CTL"], 0)  # standby while configuring
            bus.write_byte_data(addr, a["INT_ENABLE"], 0)  # the driver polls; no interrupts
            for ofs in ("OFSX", "OFSY", "OFSZ"):
                bus.write_byte_data(addr, a[ofs], 0)
            bus.write_byte_data(addr, a["BW_RATE"], self._bw_rate)
            bus.write_byte_data(addr, a["DATA_FORMAT"], self._data_format)
            bus.write_byte_data(addr, a["FIFO_CTL"], 0)  # bypass: empties the FIFO
            bus.write_byte_data(addr, a["FIFO_CTL"], self._fifo_stream)
            bus.write_byte_data(addr, a["POWER_CTL"], self._measure)
            return {name: bus.read_byte_data(addr, a[name]) for name in wanted}

        readback = await dev.transact(configure)
        wrong = {k: v for k, v in readback.items() if v != wanted[k]}
        if wrong:
            shown = ", ".join(f"{k}=0x{v:02x} (wrote 0x{wanted[k]:02x})" for k, v in wrong.items())
            raise DeviceDataError(f"{dev}: ADXL345 configuration did not stick: {shown}")
        self.overruns = 0
        self.samples = 0
        o = self.options
        log.info(
            "adxl345 opened device=%s range_g=%d full_res=%s rate_hz=%g window=%d",
            dev,
            o.range_g,
            o.full_resolution,
            o.data_rate_hz,
            o.window,
        )
        return Identity(self.part, f"DEVID 0x{devid:02x}")

    async def close(self) -> None:
        def standby(bus: I2CBus, addr: int) -> None:
            bus.write_byte_data(addr, REGISTERS["POWER_CTL"].address, 0)
            bus.write_byte_data(addr, REGISTERS["FIFO_CTL"].address, 0)

        await self.device.transact(standby)
        log.info("adxl345 closed device=%s", self.device)

    # -- reading -------------------------------------------------------------------------
    async def read(self) -> dict[str, float]:
        dev = self.device
        clock = dev.clock
        o = self.options
        rate = o.data_rate_hz
        fifo_ctl = REGISTERS["FIFO_CTL"].address
        stream = self._fifo_stream

        def flush(bus: I2CBus, addr: int) -> None:
            bus.write_byte_data(addr, fifo_ctl, 0)  # bypass empties the FIFO ...
            bus.write_byte_data(addr, fifo_ctl, stream)  # ... stream collects fresh samples

        await dev.transact(flush)
        chunks: list[bytes] = []
        have = 0
        lost = 0
        stall_s = self._stall_s()
        last_progress = clock.monotonic()
        while have < o.window:
            await clock.sleep(min(o.window - have, DRAIN_ENTRIES) / rate)
            need = o.window - have
            int_source, entries, data = await dev.transact(lambda b, a, n=need: _drain(b, a, n))
            if entries > MAX_ENTRIES:
                raise DeviceDataError(f"{dev}: ADXL345 FIFO_STATUS reports {entries} entries")
            if _OVERRUN.get(int_source):
                lost += 1
            if data:
                chunks.append(data)
                have += len(data) // DATA_LEN
                last_progress = clock.monotonic()
            elif clock.monotonic() - last_progress > stall_s:
                raise DeviceTimeout(
                    f"{dev}: ADXL345 delivered no sample for {stall_s:g} s "
                    f"(FIFO empty at {rate:g} Hz); the part may be stuck or in standby"
                )
        try:
            codes = decode_samples(b"".join(chunks), self._bits, even=self._even)
        except ValueError as err:
            raise DeviceDataError(f"{dev}: ADXL345 {err}") from err
        if lost:
            self.overruns += lost
            log.warning(
                "adxl345 fifo overrun device=%s drains=%d total=%d (samples lost; drain faster "
                "or lower data_rate_hz)",
                dev,
                lost,
                self.overruns,
            )
        self.samples += len(codes)
        lo, hi = full_scale_codes(self._bits, self._even)
        if np.any((codes <= lo) | (codes >= hi)):  # clipped: the mean and the RMS are wrong
            raise DeviceDataError(
                f"{dev}: ADXL345 samples clipped at +-{o.range_g} g: use a larger range_g"
            )
        rms, mx, my, mz = window_stats(codes, self._scale)
        log.debug("adxl345 window device=%s n=%d rms_g=%.5f", dev, len(codes), rms)
        return {"vibration_rms_g": rms, "x_g": mx, "y_g": my, "z_g": mz}

    def _stall_s(self) -> float:
        """Seconds without a new sample after which a read gives up."""
        return max(STALL_SAMPLE_PERIODS / self.options.data_rate_hz, STALL_MIN_S)

    def longest_attempt(self) -> float:
        """A read takes its window of samples (82 s for 1024 at 12.5 Hz), and may wait one stall
        time more."""
        return self.options.window / self.options.data_rate_hz + self._stall_s()

    # -- resolution ----------------------------------------------------------------------
    def resolution(self, channel: str) -> float:
        """The step of one output sample for ``x_g``/``y_g``/``z_g`` (3.9 mg at most rates in
        full resolution, 7.8 mg at 1600/3200 Hz where the LSB is always 0; the window mean is
        within half of it of the true mean).

        For ``vibration_rms_g``: one eighth of that step (0.975 mg at the defaults), the bound on
        |RMS read - vibration RMS| the simulator's synthesis keeps for RMS values from
        max(5 mg, step) up to 2 g without clipping, windows being whole multiples of 32. (Near
        half a step, with the axes offset by a fraction of a step, samples quantize to 0 or one
        step and the error reaches 0.18 step: measured at 16 g, 10 bits, 6.25 and 12.5 Hz.)
        """
        o = self.options
        step = output_step_g(o.data_rate_hz, o.range_g, o.full_resolution)
        if channel in ("x_g", "y_g", "z_g"):
            return step
        if channel == "vibration_rms_g":
            return step / 8
        raise KeyError(channel)


REGISTERS_TO_CONFIGURE = (
    "POWER_CTL",
    "INT_ENABLE",
    "OFSX",
    "OFSY",
    "OFSZ",
    "BW_RATE",
    "DATA_FORMAT",
    "FIFO_CTL",
)
_OVERRUN = REGISTERS.field("INT_SOURCE", "OVERRUN")
_ENTRIES = REGISTERS.field("FIFO_STATUS", "ENTRIES")


def _drain(bus: I2CBus, addr: int, need: int) -> tuple[int, int, bytes]:
    """One bus transaction: INT_SOURCE, FIFO_STATUS, then up to ``need`` (at most 32) entries,
    each a 6-byte burst from DATAX0 (a burst pops one entry, DS "FIFO")."""
    int_source = bus.read_byte_data(addr, REGISTERS["INT_SOURCE"].address)
    entries = _ENTRIES.get(bus.read_byte_data(addr, REGISTERS["FIFO_STATUS"].address))
    if entries > MAX_ENTRIES:
        return int_source, entries, b""
    count = min(entries, need, FIFO_DEPTH)
    data = b"".join(
        bytes(bus.read_i2c_block_data(addr, DATA_START, DATA_LEN)) for _ in range(count)
    )
    return int_source, entries, data
