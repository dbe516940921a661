"""TI ADS1115 16-bit four-input delta-sigma ADC (I2C): register map, pure code conversions and the
async driver.

Channels: ``ain0_v`` .. ``ain3_v``, each input measured single-ended against GND, in volts; the
``inputs`` option selects which of them a sensor reads (and so which channels it reports).
Transducer scaling (a 0.5-4.5 V pressure sensor to bar, say) is done by the sampler from the
configuration, not here.

Each input is read in single-shot mode: write the Config register with OS = 1 and the input's
MUX setting, wait one conversion time (1 / data rate, plus the oscillator's 10 % tolerance), poll
the OS bit until the conversion is done, read the Conversion register. The polls also read back
the rest of the Config register, so a part that was reset or reconfigured behind the driver's
back raises DeviceDataError instead of returning a sample of the wrong input. The driver sets the
ALERT/RDY pin up as a conversion-ready output (Hi_thresh MSB = 1, Lo_thresh MSB = 0, comparator
queue enabled), so a board that wires the pin to a GPIO can wait on it; the driver itself polls.

A result at the end of the code range (0x7FFF or 0x8000) means the input is at or beyond the PGA
full scale: the value cannot be trusted and read() raises DeviceDataError naming the input. The
whole read fails, not only that channel: a saturated input usually means wrong ``pga`` setting or
a wiring fault, which the operator should see.

Datasheet: TI SBAS444 (ADS111x, rev. D), sections "Register Map" (Address Pointer, Conversion,
Config, Lo_thresh and Hi_thresh registers), "Conversion Ready Pin" and "Electrical
Characteristics" (data-rate tolerance).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from drivers.base import BaseDriver, Identity, Options
from drivers.bus import I2CBus, I2CDevice
from drivers.errors import DeviceDataError, DeviceNotFound, DeviceTimeout
from drivers.regmap import Field, Register, RegisterMap

log = logging.getLogger(__name__)

# Timing: wait this multiple of the nominal conversion time before the first poll (the internal
# oscillator may run 10 % slow), plus the wake-up from power-down; then poll POLL_TRIES times,
# POLL_FRACTION of a conversion time apart.
WAIT_FACTOR = 1.1
WAKE_UP_S = 50e-6
POLL_TRIES = 10
POLL_FRACTION = 0.1
# Before starting, wait at most this long for a conversion left running (the slowest, 8 SPS).
BUSY_WAIT_S = WAIT_FACTOR / 8 + WAKE_UP_S

# --------------------------------------------------------------------------------------------
# Register map. SBAS444D "Register Map": Address Pointer register (P[1:0] selects one of four
# 16-bit registers), Conversion register, Config register, Lo_thresh and Hi_thresh registers.
REGISTERS = RegisterMap(
    [
        Register("conversion", 0x00, width=2, signed=True, access="r", reset=0x0000),
        Register("config", 0x01, width=2, reset=0x8583),
        Register("lo_thresh", 0x02, width=2, signed=True, reset=-0x8000),
        Register("hi_thresh", 0x03, width=2, signed=True, reset=0x7FFF),
    ],
    [
        # Config register field descriptions.
        Field("config", "os", 0x8000),  # write 1: start single shot; read 0: converting
        Field("config", "mux", 0x7000),  # input multiplexer
        Field("config", "pga", 0x0E00),  # full-scale range
        Field("config", "mode", 0x0100),  # 1 = single-shot / power-down, 0 = continuous
        Field("config", "dr", 0x00E0),  # data rate
        Field("config", "comp_mode", 0x0010),  # 0 = traditional, 1 = window comparator
        Field("config", "comp_pol", 0x0008),  # ALERT/RDY polarity: 0 = active low
        Field("config", "comp_lat", 0x0004),  # latching comparator
        Field("config", "comp_que", 0x0003),  # assert after 1/2/4 conversions; 3 = disable
        # Threshold registers: their MSBs select the conversion-ready function of ALERT/RDY.
        Field("lo_thresh", "msb", 0x8000),
        Field("hi_thresh", "msb", 0x8000),
    ],
)
CONVERSION = REGISTERS["conversion"]
CONFIG = REGISTERS["config"]
LO_THRESH = REGISTERS["lo_thresh"]
HI_THRESH = REGISTERS["hi_thresh"]
F_OS = REGISTERS.field("config", "os")
F_MUX = REGISTERS.field("config", "mux")
F_PGA = REGISTERS.field("config", "pga")
F_MODE = REGISTERS.field("config", "mode")
F_DR = REGISTERS.field("config", "dr")
F_COMP_POL = REGISTERS.field("config", "comp_pol")
F_COMP_QUE = REGISTERS.field("config", "comp_que")

CONFIG_RESET = 0x8583
# MUX[2:0]: 000..011 differential pairs, 100..111 AINx against GND.
MUX_PAIRS: dict[int, tuple[int, int | None]] = {
    0b000: (0, 1),
    0b001: (0, 3),
    0b010: (1, 3),
    0b011: (2, 3),
    0b100: (0, None),
    0b101: (1, None),
    0b110: (2, None),
    0b111: (3, None),
}
MUX_SINGLE_ENDED = {0: 0b100, 1: 0b101, 2: 0b110, 3: 0b111}
# PGA[2:0] -> full-scale range in volts (101, 110 and 111 are all +-0.256 V).
PGA_FSR_V = {0: 6.144, 1: 4.096, 2: 2.048, 3: 1.024, 4: 0.512, 5: 0.256, 6: 0.256, 7: 0.256}
FSR_CODES = {6.144: 0, 4.096: 1, 2.048: 2, 1.024: 3, 0.512: 4, 0.256: 5}
# DR[2:0] -> samples per second.
DATA_RATES_SPS = (8, 16, 32, 64, 128, 250, 475, 860)
MODE_CONTINUOUS = 0
MODE_SINGLE_SHOT = 1
COMP_QUE_DISABLED = 0b11
COMP_QUE_ONE = 0b00  # assert after one conversion: keeps ALERT/RDY enabled as a ready output
CODE_MAX = 0x7FFF
CODE_MIN = -0x8000
RDY_HI_THRESH = -0x8000  # MSB = 1 (0x8000 as a signed value)
RDY_LO_THRESH = 0x0000  # MSB = 0


# --------------------------------------------------------------------------------------------
# Pure functions


def lsb_volts(fsr_v: float) -> float:
    """Volts per code: the FSR spans 2**15 codes on either side of zero."""
    return fsr_v / 32768


def code_to_volts(code: int, fsr_v: float) -> float:
    """A Conversion register value (signed) -> volts at the input."""
    return code * lsb_volts(fsr_v)


def is_saturated(code: int) -> bool:
    """The code is at an end of the range: the input is at or beyond the full scale."""
    return code >= CODE_MAX or code <= CODE_MIN


def conversion_time(data_rate_sps: int) -> float:
    """Nominal seconds per conversion: 1 / data rate."""
    return 1.0 / data_rate_sps


def config_word(
    ain: int,
    fsr_v: float,
    data_rate_sps: int,
    *,
    start: bool = True,
    mode: int = MODE_SINGLE_SHOT,
    comp_que: int = COMP_QUE_ONE,
) -> int:
    """The Config register to measure ``ain`` against GND. ``comp_que`` other than 3 with the
    conversion-ready thresholds makes ALERT/RDY a ready output; COMP_POL 0 = active low."""
    word = F_OS.set(0, int(start))
    word = F_MUX.set(word, MUX_SINGLE_ENDED[ain])
    word = F_PGA.set(word, FSR_CODES[fsr_v])
    word = F_MODE.set(word, mode)
    word = F_DR.set(word, DATA_RATES_SPS.index(data_rate_sps))
    return F_COMP_QUE.set(word, comp_que)


@dataclass(frozen=True, slots=True)
class ConfigFields:
    """The Config register decoded."""

    idle: bool  # OS read back: True when no conversion is in progress
    mux: int
    fsr_v: float
    single_shot: bool
    data_rate_sps: int
    comp_que: int


def decode_config(word: int) -> ConfigFields:
    return ConfigFields(
        idle=bool(F_OS.get(word)),
        mux=F_MUX.get(word),
        fsr_v=PGA_FSR_V[F_PGA.get(word)],
        single_shot=F_MODE.get(word) == MODE_SINGLE_SHOT,
        data_rate_sps=DATA_RATES_SPS[F_DR.get(word)],
        comp_que=F_COMP_QUE.get(word),
    )


# --------------------------------------------------------------------------------------------
# Options


@dataclass(frozen=True, slots=True)
class Ads1115Options:
    """Validated ``[sensor.options]`` of an ADS1115 (see :meth:`Ads1115.parse_options`)."""

    pga: float = 4.096  # full-scale range, volts
    data_rate: int = 128  # samples per second
    inputs: tuple[int, ...] = (0, 1, 2, 3)


def _read_u16(bus: I2CBus, addr: int, reg: Register) -> int:
    return reg.decode(bus.read_i2c_block_data(addr, reg.address, 2))


def _write_u16(bus: I2CBus, addr: int, reg: Register, value: int) -> None:
    bus.write_i2c_block_data(addr, reg.address, list(reg.encode(value)))


class Ads1115(BaseDriver):
    """An ADS1115 on an I2C bus. Build with ``Ads1115(device, Ads1115.parse_options(opts))``."""

    part: ClassVar[str] = "ads1115"
    transport: ClassVar[str] = "i2c"
    channels: ClassVar[tuple[str, ...]] = ("ain0_v", "ain1_v", "ain2_v", "ain3_v")
    addresses: ClassVar[tuple[int, ...]] = (0x48, 0x49, 0x4A, 0x4B)  # ADDR to GND/VDD/SDA/SCL

    def __init__(self, device: I2CDevice, options: Ads1115Options | None = None) -> None:
        self.device = device
        self.options = options if options is not None else self.parse_options(Options({}))
        opt = self.options
        self.conversion_time = conversion_time(opt.data_rate)
        self._configs = {
            ain: config_word(ain, opt.pga, opt.data_rate) for ain in range(4)
        }  # OS = 1: writing one starts a conversion of that input

    @classmethod
    def parse_options(cls, opts: Options) -> Ads1115Options:
        """Options: ``pga`` (full scale 6.144, 4.096, 2.048, 1.024, 0.512 or 0.256 V; 4.096),
        ``data_rate`` (8, 16, 32, 64, 128, 250, 475 or 860 SPS; 128), ``inputs`` (list of the
        inputs 0-3 to read; all four)."""
        pga = float(opts.choice("pga", 4.096, tuple(FSR_CODES)))
        data_rate = int(opts.choice("data_rate", 128, DATA_RATES_SPS))
        raw_inputs = opts.value("inputs", [0, 1, 2, 3])
        opts.finish()
        if (
            not isinstance(raw_inputs, Sequence)
            or isinstance(raw_inputs, str)
            or not raw_inputs
            or not all(isinstance(i, int) and not isinstance(i, bool) for i in raw_inputs)
        ):
            raise opts.error("inputs", f"expected a list of input numbers 0-3, got {raw_inputs!r}")
        inputs = tuple(raw_inputs)
        if any(not 0 <= i <= 3 for i in inputs):
            raise opts.error("inputs", f"{list(inputs)}: the ADS1115 has inputs 0 to 3")
        if len(set(inputs)) != len(inputs):
            raise opts.error("inputs", f"{list(inputs)} lists an input twice")
        return Ads1115Options(pga=pga, data_rate=data_rate, inputs=inputs)

    @classmethod
    def channels_for(cls, options: Any) -> tuple[str, ...]:
        inputs = options.inputs if options is not None else Ads1115Options().inputs
        return tuple(f"ain{i}_v" for i in inputs)

    def resolution(self, channel: str) -> float:
        if channel not in self.channels_for(self.options):
            raise KeyError(channel)
        return lsb_volts(self.options.pga)

    async def open(self) -> Identity:
        """Check it is an ADS1115 (no chip id: the threshold registers must hold what is written
        and the Config register must read back as written) and set ALERT/RDY up as a
        conversion-ready output. No conversion is started."""
        idle_config = F_OS.set(self._configs[self.options.inputs[0]], 0)

        def probe(bus: I2CBus, addr: int) -> tuple[int, int, int]:
            _write_u16(bus, addr, HI_THRESH, RDY_HI_THRESH)
            _write_u16(bus, addr, LO_THRESH, RDY_LO_THRESH)
            _write_u16(bus, addr, CONFIG, idle_config)
            return (
                _read_u16(bus, addr, HI_THRESH),
                _read_u16(bus, addr, LO_THRESH),
                _read_u16(bus, addr, CONFIG),
            )

        hi, lo, config = await self.device.transact(probe)
        if hi != RDY_HI_THRESH or lo != RDY_LO_THRESH:
            raise DeviceNotFound(
                f"{self.device}: not an ADS1115: the threshold registers read back "
                f"0x{hi & 0xFFFF:04x}/0x{lo & 0xFFFF:04x} after writing 0x8000/0x0000; "
                "check the address"
            )
        if F_OS.set(config, 0) != idle_config:
            raise DeviceNotFound(
                f"{self.device}: not an ADS1115: the Config register reads back 0x{config:04x} "
                f"after writing 0x{idle_config:04x}; check the address"
            )
        log.info(
            "ads1115 opened device=%s pga=%g data_rate=%d inputs=%s",
            self.device,
            self.options.pga,
            self.options.data_rate,
            ",".join(str(i) for i in self.options.inputs),
        )
        return Identity(self.part, "threshold and config registers read back as written")

    async def read(self) -> dict[str, float]:
        inputs = self.options.inputs
        configs = self._configs
        await self._start(configs[inputs[0]])
        values: dict[str, float] = {}
        for k, ain in enumerate(inputs):
            following = configs[inputs[k + 1]] if k + 1 < len(inputs) else None
            code = await self._finish(ain, following)
            if is_saturated(code):
                raise DeviceDataError(
                    f"{self.device}: ain{ain} is saturated (code 0x{code & 0xFFFF:04x}): the "
                    f"input is at or beyond the +-{self.options.pga:g} V full scale; choose a "
                    "larger pga or check the wiring"
                )
            values[f"ain{ain}_v"] = code_to_volts(code, self.options.pga)
        return values

    async def _start(self, config: int) -> None:
        """Start a conversion once the part is idle: a conversion still running (left by a read
        that failed half-way) would otherwise land in the Conversion register under the new MUX
        setting, and a start request while busy is ignored."""

        def start_if_idle(bus: I2CBus, addr: int) -> bool:
            if not F_OS.get(_read_u16(bus, addr, CONFIG)):
                return False
            _write_u16(bus, addr, CONFIG, config)
            return True

        # The running conversion may be at any data rate: wait up to the slowest one.
        interval = min(self.conversion_time, BUSY_WAIT_S / 4)
        for attempt in range(math.ceil(BUSY_WAIT_S / interval) + 1):
            if attempt:
                await self.device.clock.sleep(interval)
            if await self.device.transact(start_if_idle):
                return
        raise DeviceTimeout(
            f"{self.device}: still busy with an earlier conversion after "
            f"{BUSY_WAIT_S * 1000:.0f} ms"
        )

    async def _finish(self, ain: int, following: int | None) -> int:
        """Wait for the conversion of ``ain``, read it and start ``following`` (one bus hop)."""
        expected = F_OS.set(self._configs[ain], 0)

        def collect(bus: I2CBus, addr: int) -> tuple[int, int | None]:
            config = _read_u16(bus, addr, CONFIG)
            if not F_OS.get(config):
                return config, None  # still converting
            code = _read_u16(bus, addr, CONVERSION)
            if following is not None and F_OS.set(config, 0) == expected:
                _write_u16(bus, addr, CONFIG, following)
            return config, code

        clock = self.device.clock
        await clock.sleep(self.conversion_time * WAIT_FACTOR + WAKE_UP_S)
        for attempt in range(POLL_TRIES):
            if attempt:
                await clock.sleep(self.conversion_time * POLL_FRACTION)
            config, code = await self.device.transact(collect)
            if F_OS.set(config, 0) != expected:
                raise DeviceDataError(
                    f"{self.device}: the Config register reads 0x{config:04x} while converting "
                    f"ain{ain} with 0x{expected | 0x8000:04x}: the part was reset or the "
                    "transfer was corrupted"
                )
            if code is not None:
                return code
        waited = self.conversion_time * (WAIT_FACTOR + POLL_FRACTION * (POLL_TRIES - 1))
        raise DeviceTimeout(
            f"{self.device}: conversion of ain{ain} not done after {waited * 1000:.1f} ms "
            f"(data rate {self.options.data_rate} SPS)"
        )

    async def close(self) -> None:
        """Nothing to do: in single-shot mode the part powers down after every conversion."""
        return None
