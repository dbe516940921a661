"""The INA219 driver against its register-level simulator on a FakeSMBus (virtual time).

Round-trip bounds, and why: the simulator rounds each voltage to the nearest ADC step, so bus
and shunt voltage come back within half a step (``resolution / 2``). The chip's current is
``trunc(shunt * cal / 4096)``: within one current LSB of the rounded shunt voltage divided by
the shunt resistance, so within ``current_lsb + shunt_step / (2 R)``. Power is
``trunc(|current| * bus / 5000)``: one power LSB plus the current and bus errors propagated.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, NamedTuple

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.errors import DeviceDataError, DeviceNotFound, DeviceTimeout
from drivers.base import OptionError, Options
from drivers.bus import AsyncI2C
from drivers.clock import VirtualClock
from drivers.ina219 import (
    ADC_SAMPLES_CODES,
    CALIBRATION,
    CONFIG,
    MODE_CONTINUOUS,
    POWER,
    SHUNT,
    Ina219,
    adc_code,
    adc_conversion_time,
    adc_setting,
    calibration_value,
    choose_current_lsb,
    config_word,
    current_register,
    decode_bus_voltage,
    decode_shunt_voltage,
    power_lsb,
    power_register,
    register_calibration,
)
from drivers.sim.ads1115 import Ads1115Sim
from drivers.sim.ina219 import Ina219Sim
from drivers.sim.smbus import FakeSMBus

ADDRESS = 0x40


class Rig(NamedTuple):
    sim: Ina219Sim
    driver: Ina219
    smbus: FakeSMBus


@contextmanager
def rig(clock: Any, address: int = ADDRESS, **options: Any) -> Iterator[Rig]:
    smbus = FakeSMBus()
    opts = Ina219.parse_options(Options(options))
    sim = Ina219Sim(clock, opts)
    smbus.attach(address, sim)
    bus = AsyncI2C(smbus, clock)
    try:
        yield Rig(sim, Ina219(bus.device(address), opts), smbus)
    finally:
        bus.close()


def word(smbus: FakeSMBus, register: int) -> int:
    return int.from_bytes(bytes(smbus.read_i2c_block_data(ADDRESS, register, 2)), "big")


# --------------------------------------------------------------------------------------------
# Pure functions against the datasheet


def test_datasheet_configure_measure_calculate_example() -> None:
    """SBOS448F table 3: 10 A through 2 mOhm, VCM 12 V, 40 mV shunt range, 16 V bus range."""
    assert config_word(16, 40, adc_code(12, 1), MODE_CONTINUOUS) == 0x019F  # step 1
    assert decode_shunt_voltage(0x07D0) == pytest.approx(0.020)  # step 2: 2000 x 10 uV
    volts, cnvr, ovf = decode_bus_voltage(0x5D98)  # step 3: 0x0BB3 = 2995 x 4 mV
    assert volts == pytest.approx(11.98)
    assert (cnvr, ovf) == (False, False)
    assert calibration_value(1e-3, 0.002) == 20480 == 0x5000  # step 4: Current_LSB 1 mA
    assert current_register(2000, 20480) == 10000 == 0x2710  # step 5: 10.0 A
    assert power_register(10000, 2995) == 5990 == 0x1766  # step 6
    assert 5990 * power_lsb(1e-3) == pytest.approx(119.8)  # 20 mW per bit


def test_chip_math_truncates_toward_zero_for_negative_currents() -> None:
    assert current_register(-2000, 20480) == -10000
    assert current_register(-1, 3000) == 0  # -0.73 counts truncates to 0, not -1
    assert current_register(1, 3000) == 0
    assert power_register(-10000, 2995) == 5990  # power is a magnitude


def test_calibration_register_drops_bit_zero() -> None:
    assert register_calibration(20481) == 20480
    assert register_calibration(4096) == 4096


def test_adc_settings_table() -> None:
    for bits in (9, 10, 11, 12):
        assert adc_setting(adc_code(bits, 1)) == (bits, 1)
    for samples in ADC_SAMPLES_CODES:
        assert adc_setting(adc_code(12, samples)) == (12, samples)
    assert adc_setting(0b0111) == (12, 1)  # 0X11: bit 2 is a don't-care
    assert adc_conversion_time(0b0011) == pytest.approx(532e-6)
    assert adc_conversion_time(0b1111) == pytest.approx(68.10e-3)
    with pytest.raises(ValueError):
        adc_code(10, 4)


@settings(max_examples=100, deadline=None)
@given(
    max_current=st.floats(0.01, 500.0),
    shunt=st.sampled_from([0.0005, 0.002, 0.01, 0.05, 0.1, 0.5, 1.0]),
)
def test_chosen_current_lsb_is_round_covers_the_range_and_fits(
    max_current: float, shunt: float
) -> None:
    lsb = choose_current_lsb(max_current, shunt)
    assert lsb * 32768 >= max_current * (1 - 1e-9)  # SBOS448G 8.5.1: at least max / 2**15
    mantissa = lsb / 10 ** math.floor(math.log10(lsb))
    assert round(mantissa, 6) in (1.0, 2.0, 5.0)
    assert 1 <= calibration_value(lsb, shunt) <= 0xFFFE


def test_options_defaults_and_auto_pga() -> None:
    opts = Ina219.parse_options(Options({}))
    assert (opts.shunt_ohms, opts.max_current_a, opts.bus_range_v) == (0.1, 3.2, 32)
    assert (opts.pga_mv, opts.adc_bits, opts.samples, opts.mode) == (320, 12, 1, "continuous")
    assert opts.current_lsb == pytest.approx(1e-4)
    assert opts.calibration == 4096
    assert Ina219.parse_options(Options({"max_current_a": 0.4})).pga_mv == 40
    assert Ina219.parse_options(Options({"max_current_a": 0.41})).pga_mv == 80


def test_options_refuse_the_rig_current_through_a_0_1_ohm_shunt() -> None:
    """The reference rig's motor draws up to 5 A: 0.5 V across 0.1 ohm is beyond +-320 mV."""
    with pytest.raises(OptionError) as err:
        Ina219.parse_options(Options({"shunt_ohms": 0.1, "max_current_a": 5.0}))
    assert err.value.key == "max_current_a"
    assert "0.064 ohm" in err.value.message
    with pytest.raises(OptionError) as err:
        Ina219.parse_options(Options({"max_current_a": 1.0, "pga": 80}))
    assert err.value.key == "max_current_a"
    with pytest.raises(OptionError) as err:
        Ina219.parse_options(Options({"adc_bits": 10, "samples": 8}))
    assert err.value.key == "samples"
    with pytest.raises(OptionError) as err:
        Ina219.parse_options(Options({"shunt": 0.1}))
    assert err.value.key == "shunt"


@pytest.mark.parametrize(
    ("options", "key"),
    [
        ({"shunt_ohms": 1e-320}, "shunt_ohms"),  # Current_LSB x R_shunt underflowed: 1/0
        ({"max_current_a": 1e-320}, "max_current_a"),  # its 2**-15 underflowed: log10(0)
    ],
)
def test_options_too_small_to_compute_with_are_refused_naming_the_key(
    options: dict, key: str
) -> None:
    """Both passed validation (finite, above 0) and then ended check-config and start-up in a
    traceback (ZeroDivisionError, ValueError: math domain error) in the calibration math."""
    with pytest.raises(OptionError) as err:
        Ina219.parse_options(Options(options))
    assert err.value.key == key


# --------------------------------------------------------------------------------------------
# Identity and configuration through the simulated registers


def test_open_resets_identifies_and_programs_the_part(vclock: VirtualClock) -> None:
    async def main() -> None:
        with rig(vclock) as r:
            r.sim.calibration = 1234  # left over from a previous user: the reset clears it
            identity = await r.driver.open()
            assert identity.part == "ina219"
            assert word(r.smbus, CALIBRATION.address) == 4096
            assert word(r.smbus, CONFIG.address) == r.driver.config == 0x399F
            assert r.driver.resolution("current_a") == pytest.approx(1e-4)
            assert r.driver.resolution("power_w") == pytest.approx(2e-3)
            assert r.driver.resolution("bus_voltage_v") == pytest.approx(4e-3)
            assert r.driver.resolution("shunt_voltage_v") == pytest.approx(10e-6)

    vclock.run(main())


def test_nothing_at_the_address_is_not_found(vclock: VirtualClock) -> None:
    async def main() -> None:
        with rig(vclock) as r:
            other = Ina219(r.driver.device.bus.device(0x41), r.driver.options)
            with pytest.raises(DeviceNotFound, match="no acknowledge"):
                await other.open()

    vclock.run(main())


def test_another_part_at_the_address_is_not_found(vclock: VirtualClock) -> None:
    """An ADS1115 shares addresses 0x48-0x4B with the INA219; it has no 0x399F to show."""

    async def main() -> None:
        smbus = FakeSMBus()
        smbus.attach(0x48, Ads1115Sim(vclock))
        bus = AsyncI2C(smbus, vclock)
        try:
            with pytest.raises(DeviceNotFound, match="not an INA219"):
                await Ina219(bus.device(0x48)).open()
        finally:
            bus.close()

    vclock.run(main())


class _CalibrationIgnored(Ina219Sim):
    """A look-alike whose calibration register does not hold what is written."""

    def write_registers(self, register: int | None, data: bytes) -> None:
        if register == CALIBRATION.address:
            return
        super().write_registers(register, data)


def test_calibration_that_does_not_read_back_is_not_an_ina219(vclock: VirtualClock) -> None:
    async def main() -> None:
        smbus = FakeSMBus()
        smbus.attach(ADDRESS, _CalibrationIgnored(vclock))
        bus = AsyncI2C(smbus, vclock)
        try:
            with pytest.raises(DeviceNotFound, match="read back"):
                await Ina219(bus.device(ADDRESS)).open()
        finally:
            bus.close()

    vclock.run(main())


# --------------------------------------------------------------------------------------------
# Round trips: physical value -> simulator -> registers -> driver


ADC_CHOICES = [(9, 1), (10, 1), (11, 1), (12, 1), (12, 2), (12, 16), (12, 128)]


@settings(max_examples=50, deadline=None)
@given(
    shunt=st.sampled_from([0.002, 0.01, 0.05, 0.1, 0.5]),
    pga=st.sampled_from([40, 80, 160, 320]),
    adc=st.sampled_from(ADC_CHOICES),
    bus_range=st.sampled_from([16, 32]),
    mode=st.sampled_from(["continuous", "triggered"]),
    points=st.lists(
        st.tuples(st.floats(-0.98, 0.98), st.floats(0.0, 0.98)), min_size=1, max_size=4
    ),
)
def test_round_trip_every_channel(
    shunt: float,
    pga: int,
    adc: tuple[int, int],
    bus_range: int,
    mode: str,
    points: list[tuple[float, float]],
) -> None:
    clock = VirtualClock()
    max_current = pga / 1000 / shunt  # the whole shunt range
    options = {
        "shunt_ohms": shunt,
        "max_current_a": max_current,
        "pga": pga,
        "adc_bits": adc[0],
        "samples": adc[1],
        "bus_range_v": bus_range,
        "mode": mode,
    }

    async def main() -> None:
        with rig(clock, **options) as r:
            d = r.driver
            await d.open()
            bus_err = d.resolution("bus_voltage_v") / 2 + 1e-9
            shunt_err = d.resolution("shunt_voltage_v") / 2 + 1e-12
            current_err = shunt_err / shunt + d.current_lsb * (1 + 1e-9)
            for current_fraction, bus_fraction in points:
                current = current_fraction * max_current
                bus_v = bus_fraction * bus_range
                r.sim.set_channel("current_a", current)
                r.sim.set_channel("bus_voltage_v", bus_v)
                await clock.sleep(d.conversion_time)  # let a conversion see the new inputs
                values = await d.read()
                assert abs(values["bus_voltage_v"] - bus_v) <= bus_err
                assert abs(values["shunt_voltage_v"] - current * shunt) <= shunt_err
                assert abs(values["current_a"] - current) <= current_err
                power_err = (d.power_lsb + abs(current) * bus_err + bus_v * current_err) * (
                    1 + 1e-9
                ) + bus_err * current_err
                assert abs(values["power_w"] - abs(current) * bus_v) <= power_err

    clock.run(main())


def test_reference_rig_motor_current_and_supply(vclock: VirtualClock) -> None:
    """5 A through a 0.05 ohm shunt; 230 V through a /20 divider puts 11.5 V on the bus input."""

    async def main() -> None:
        with rig(vclock, shunt_ohms=0.05, max_current_a=5.0, bus_range_v=16) as r:
            await r.driver.open()
            assert r.driver.options.pga_mv == 320
            for amps, supply in ((0.0, 0.0), (2.7, 229.0), (4.9, 231.0)):
                r.sim.set_channel("current_a", amps)
                r.sim.set_channel("bus_voltage_v", supply / 20)
                await vclock.sleep(r.driver.conversion_time)
                values = await r.driver.read()
                assert values["current_a"] == pytest.approx(amps, abs=2 * r.driver.current_lsb)
                assert values["bus_voltage_v"] * 20 == pytest.approx(supply, abs=20 * 0.002)

    vclock.run(main())


def test_current_beyond_the_range_is_a_data_error(vclock: VirtualClock) -> None:
    """5 A through the default 0.1 ohm shunt is 500 mV: OVF, current and power are invalid."""

    async def main() -> None:
        with rig(vclock) as r:
            await r.driver.open()
            r.sim.set_channel("current_a", 5.0)
            r.sim.set_channel("bus_voltage_v", 11.5)
            await vclock.sleep(r.driver.conversion_time)
            with pytest.raises(DeviceDataError, match="OVF"):
                await r.driver.read()
            r.sim.set_channel("current_a", 3.0)
            await vclock.sleep(r.driver.conversion_time)
            assert (await r.driver.read())["current_a"] == pytest.approx(3.0, abs=1e-4)

    vclock.run(main())


def test_math_overflow_below_the_shunt_range(vclock: VirtualClock) -> None:
    """max_current_a 0.6 A gives a 20 uA current LSB: the current register tops out at 0.655 A
    while the 160 mV range would take 1.6 A through 0.1 ohm. 1 A overflows the chip's math."""

    async def main() -> None:
        with rig(vclock, max_current_a=0.6, pga=160) as r:
            await r.driver.open()
            assert r.driver.current_lsb == pytest.approx(20e-6)
            r.sim.set_channel("current_a", 1.0)
            r.sim.set_channel("bus_voltage_v", 5.0)
            await vclock.sleep(r.driver.conversion_time)
            with pytest.raises(DeviceDataError, match="OVF"):
                await r.driver.read()
            r.sim.set_channel("current_a", -0.6)
            await vclock.sleep(r.driver.conversion_time)
            assert (await r.driver.read())["current_a"] == pytest.approx(-0.6, abs=3e-5)

    vclock.run(main())


# --------------------------------------------------------------------------------------------
# Conversion timing, modes and the simulator's wire behaviour


def test_triggered_mode_converts_once_per_read(vclock: VirtualClock) -> None:
    async def main() -> None:
        with rig(vclock, mode="triggered", samples=8) as r:
            await r.driver.open()
            r.sim.set_channel("current_a", 1.0)
            r.sim.set_channel("bus_voltage_v", 12.0)
            first = r.sim.conversions
            for _ in range(3):
                assert (await r.driver.read())["current_a"] == pytest.approx(1.0, abs=1e-4)
            await vclock.sleep(1.0)
            assert r.sim.conversions == first + 3

    vclock.run(main())


def test_cnvr_waits_for_the_conversion_time_and_clears_on_power_read(
    vclock: VirtualClock,
) -> None:
    async def main() -> None:
        with rig(vclock, samples=128) as r:  # 68.10 ms per ADC result, shunt then bus
            await r.driver.open()
            assert r.driver.conversion_time == pytest.approx(2 * 68.10e-3)
            assert not decode_bus_voltage(word(r.smbus, 0x02))[1]  # configured: CNVR cleared
            await vclock.sleep(0.13)
            assert not decode_bus_voltage(word(r.smbus, 0x02))[1]
            await vclock.sleep(0.01)
            assert decode_bus_voltage(word(r.smbus, 0x02))[1]
            word(r.smbus, POWER.address)
            assert not decode_bus_voltage(word(r.smbus, 0x02))[1]

    vclock.run(main())


def test_sim_pointer_reset_and_shunt_option(vclock: VirtualClock) -> None:
    smbus = FakeSMBus()
    sim = Ina219Sim(vclock, Ina219.parse_options(Options({"shunt_ohms": 0.05})))
    smbus.attach(ADDRESS, sim)
    assert sim.shunt_ohms == 0.05
    assert Ina219Sim(vclock, shunt_ohms=0.2).shunt_ohms == 0.2
    assert Ina219Sim(vclock).shunt_ohms == 0.1
    smbus.write_i2c_block_data(ADDRESS, CALIBRATION.address, [0x12, 0x35])
    smbus.write_byte(ADDRESS, CALIBRATION.address)  # pointer only
    assert [smbus.read_byte(ADDRESS) for _ in range(2)] == [0x12, 0x12]  # odd bit 0 dropped
    assert word(smbus, CALIBRATION.address) == 0x1234
    smbus.write_i2c_block_data(ADDRESS, CONFIG.address, [0x80, 0x00])  # RST
    assert word(smbus, CONFIG.address) == 0x399F
    assert word(smbus, CALIBRATION.address) == 0
    sim.set_channel("shunt_voltage_v", -0.1234)
    vclock.advance(0.01)
    assert word(smbus, SHUNT.address) == (-12340) & 0xFFFF  # sign-extended two's complement
    with pytest.raises(ValueError, match="power_w"):
        sim.set_channel("power_w", 1.0)


def test_close_powers_the_part_down(vclock: VirtualClock) -> None:
    async def main() -> None:
        with rig(vclock) as r:
            await r.driver.open()
            await r.driver.read()
            await r.driver.close()
            done = r.sim.conversions
            await vclock.sleep(1.0)
            assert r.sim.conversions == done
            assert word(r.smbus, CONFIG.address) & 0x7 == 0

    vclock.run(main())


# --------------------------------------------------------------------------------------------
# Fault knobs


async def _settled_read(r: Rig, clock: Any) -> dict[str, float]:
    await clock.sleep(r.driver.conversion_time)
    return await r.driver.read()


def test_nack_and_disconnect_then_recovery(vclock: VirtualClock) -> None:
    async def main() -> None:
        with rig(vclock) as r:
            await r.driver.open()
            r.sim.set_channel("current_a", 1.5)
            r.sim.faults.nack = 1.0
            with pytest.raises(DeviceNotFound):
                await r.driver.read()
            r.sim.faults.clear()
            assert (await _settled_read(r, vclock))["current_a"] == pytest.approx(1.5, abs=1e-4)
            r.sim.faults.disconnect = True
            with pytest.raises(DeviceNotFound):
                await r.driver.read()
            with pytest.raises(DeviceNotFound):
                await r.driver.read()
            r.sim.faults.clear()
            assert (await _settled_read(r, vclock))["current_a"] == pytest.approx(1.5, abs=1e-4)

    vclock.run(main())


def test_stuck_registers_freeze_and_cnvr_never_sets_again(vclock: VirtualClock) -> None:
    async def main() -> None:
        with rig(vclock) as r:
            await r.driver.open()
            r.sim.set_channel("current_a", 1.0)
            r.sim.set_channel("bus_voltage_v", 12.0)
            await _settled_read(r, vclock)
            await vclock.sleep(r.driver.conversion_time)
            word(r.smbus, CONFIG.address)  # the sim catches up on access: 1.0 A is now latched
            r.sim.faults.stuck = True
            r.sim.set_channel("current_a", 2.0)
            await vclock.sleep(r.driver.conversion_time * 3)
            shunt_before = word(r.smbus, SHUNT.address)
            # the pending result reads back unchanged although the input moved: the driver
            # cannot tell...
            assert (await r.driver.read())["current_a"] == pytest.approx(1.0, abs=1e-4)
            await vclock.sleep(1.0)
            assert word(r.smbus, SHUNT.address) == shunt_before
            # ...until it waits for the next conversion: CNVR never sets again
            with pytest.raises(DeviceTimeout, match="CNVR"):
                await r.driver.read()
            r.sim.faults.clear()
            assert (await r.driver.read())["current_a"] == pytest.approx(2.0, abs=1e-4)

    vclock.run(main())


def test_bit_flips_are_caught_by_the_chip_math_check(vclock: VirtualClock) -> None:
    async def main() -> None:
        with rig(vclock) as r:
            await r.driver.open()
            r.sim.set_channel("current_a", 2.0)
            r.sim.set_channel("bus_voltage_v", 12.0)
            r.sim.faults.bit_flip = 1.0  # every register read has one bit flipped
            for _ in range(10):
                with pytest.raises(DeviceDataError):
                    await _settled_read(r, vclock)
            r.sim.faults.clear()
            values = await _settled_read(r, vclock)
            assert values["current_a"] == pytest.approx(2.0, abs=1e-4)
            assert values["power_w"] == pytest.approx(24.0, abs=4e-3)

    vclock.run(main())


def test_slow_conversions_wait_or_time_out_then_recover(vclock: VirtualClock) -> None:
    async def main() -> None:
        with rig(vclock, mode="triggered") as r:
            await r.driver.open()
            r.sim.set_channel("current_a", 0.5)
            r.sim.faults.slow = r.driver.conversion_time  # twice as slow: within the deadline
            assert (await r.driver.read())["current_a"] == pytest.approx(0.5, abs=1e-4)
            r.sim.faults.slow = 1.0  # far beyond four conversion times
            with pytest.raises(DeviceTimeout):
                await r.driver.read()
            r.sim.faults.clear()
            assert (await r.driver.read())["current_a"] == pytest.approx(0.5, abs=1e-4)

    vclock.run(main())
