"""The MCP9600 driver against its register-level simulator on a FakeSMBus (virtual time).

Round-trip bounds, and why: the cold junction is rounded to its resolution (0.0625 or 0.25 degC),
so it comes back within half of it. The junction delta goes through the ADC (rounded to one EMF
step, ``ADC LSB / Seebeck coefficient`` in degC) and then into the 0.0625 degC register (rounded
again): within half an ADC step plus half a register LSB, which is at most
``resolution("delta_c") / 2 + 1/32``. TH is TDelta + TC in register counts, so its error is at
most the sum of the two.
"""

from __future__ import annotations

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
from drivers.mcp9600 import (
    ADC_BITS,
    COLD_RESOLUTIONS,
    DEVICE_CONFIG,
    DEVICE_ID,
    MODE_BURST,
    MODE_SHUTDOWN,
    SENSOR_CONFIG,
    STATUS,
    TC,
    TH,
    THERMOCOUPLE_TYPES,
    TYPE_RANGE_C,
    Mcp9600,
    conversion_period,
    decode_status,
    decode_temperature,
    delta_step_c,
    device_config_word,
    encode_temperature,
    sensor_config_word,
)
from drivers.sim.mcp9600 import Mcp9600Sim
from drivers.sim.smbus import FakeSMBus

ADDRESS = 0x60


class Rig(NamedTuple):
    sim: Mcp9600Sim
    driver: Mcp9600
    smbus: FakeSMBus


@contextmanager
def rig(clock: Any, address: int = ADDRESS, **options: Any) -> Iterator[Rig]:
    smbus = FakeSMBus()
    opts = Mcp9600.parse_options(Options(options))
    sim = Mcp9600Sim(clock, opts)
    smbus.attach(address, sim)
    bus = AsyncI2C(smbus, clock)
    try:
        yield Rig(sim, Mcp9600(bus.device(address), opts), smbus)
    finally:
        bus.close()


def read_byte(smbus: FakeSMBus, register: int) -> int:
    return smbus.read_i2c_block_data(ADDRESS, register, 1)[0]


def read_word(smbus: FakeSMBus, register: int) -> int:
    return int.from_bytes(bytes(smbus.read_i2c_block_data(ADDRESS, register, 2)), "big")


# --------------------------------------------------------------------------------------------
# Pure functions against the datasheet


@settings(max_examples=100, deadline=None)
@given(upper=st.integers(0, 255), lower=st.integers(0, 255))
def test_temperature_decoding_is_equation_5_1(upper: int, lower: int) -> None:
    """DS20005426C equation 5-1: UpperByte x 16 + LowerByte / 16, minus 4096 below 0 degC."""
    expected = upper * 16 + lower / 16 - (4096 if upper & 0x80 else 0)
    assert decode_temperature([upper, lower]) == expected
    assert encode_temperature(expected) == bytes([upper, lower])


def test_temperature_examples() -> None:
    assert decode_temperature([0x01, 0x90]) == 25.0
    assert decode_temperature([0xFF, 0x70]) == -9.0
    assert decode_temperature([0xFF, 0xFF]) == -0.0625
    assert decode_temperature([0x55, 0x5C]) == 1365.75  # type K near its top
    # TC at 0.25 degC resolution: "ssss xxxx xxxx xx00" (table 5-2)
    assert decode_temperature([0xFE, 0x6C]) == -25.25


def test_status_and_configuration_words() -> None:
    assert decode_status(0x50).th_updated and decode_status(0x50).input_range
    status = decode_status(0x8F)
    assert status.burst_complete and not status.th_updated and not status.input_range
    assert status.alerts == (True, True, True, True)
    assert decode_status(0x05).alerts == (True, False, True, False)
    assert sensor_config_word("K", 0) == 0x00
    assert sensor_config_word("J", 3) == 0x13
    assert sensor_config_word("R", 7) == 0x77
    assert device_config_word(0.0625, 18) == 0x00  # the POR value
    assert device_config_word(0.25, 12, MODE_SHUTDOWN) == 0xE1
    assert device_config_word(0.0625, 16, MODE_BURST, burst_samples=128) == 0x3E
    assert DEVICE_ID.reset == 0x4010  # ID 0x40, revision 1.0 (register 5-12)


def test_conversion_periods_and_resolutions() -> None:
    assert conversion_period(18, 0.0625) == pytest.approx(0.320)
    assert conversion_period(12, 0.0625) == pytest.approx(0.250)  # the cold junction is slower
    assert conversion_period(12, 0.25) == pytest.approx(0.063)
    assert delta_step_c("K", 18) == 0.0625  # 2 uV / 41 uV/degC is below the register LSB
    assert delta_step_c("K", 12) == pytest.approx(128 / 41)
    assert delta_step_c("S", 18) == pytest.approx(2 / 6)


def test_options() -> None:
    opts = Mcp9600.parse_options(Options({}))
    assert (opts.thermocouple, opts.filter, opts.adc_bits, opts.cold_junction_resolution) == (
        "K",
        0,
        18,
        0.0625,
    )
    for key, bad in (("thermocouple", "X"), ("filter", 8), ("adc_bits", 10)):
        with pytest.raises(OptionError) as err:
            Mcp9600.parse_options(Options({key: bad}))
        assert err.value.key == key
    with pytest.raises(OptionError):
        Mcp9600.parse_options(Options({"cold_junction_resolution": 0.5}))


# --------------------------------------------------------------------------------------------
# Identity


def test_open_identifies_and_configures(vclock: VirtualClock) -> None:
    async def main() -> None:
        with rig(vclock, thermocouple="J", filter=0, adc_bits=16) as r:
            identity = await r.driver.open()
            assert identity.part == "mcp9600"
            assert "revision 1.0" in identity.detail
            assert read_byte(r.smbus, SENSOR_CONFIG.address) == 0x10
            assert read_byte(r.smbus, DEVICE_CONFIG.address) == 0x20
            assert r.driver.resolution("cold_junction_c") == 0.0625
            assert r.driver.resolution("delta_c") == pytest.approx(8 / 52)

    vclock.run(main())


def test_wrong_device_id_is_not_found(vclock: VirtualClock) -> None:
    """An MCP9601 (device ID 0x41) answers at the same addresses."""

    async def main() -> None:
        with rig(vclock) as r:
            r.sim.device_id_word = 0x4110
            with pytest.raises(DeviceNotFound, match="device ID 0x41"):
                await r.driver.open()

    vclock.run(main())


def test_nothing_at_the_address_is_not_found(vclock: VirtualClock) -> None:
    async def main() -> None:
        with rig(vclock) as r:
            other = Mcp9600(r.driver.device.bus.device(0x67))
            with pytest.raises(DeviceNotFound, match="no acknowledge"):
                await other.open()

    vclock.run(main())


# --------------------------------------------------------------------------------------------
# Round trips


@settings(max_examples=50, deadline=None)
@given(
    thermocouple=st.sampled_from(THERMOCOUPLE_TYPES),
    adc_bits=st.sampled_from(ADC_BITS),
    cold_resolution=st.sampled_from(COLD_RESOLUTIONS),
    points=st.lists(
        st.tuples(st.floats(0.0, 1.0), st.floats(-40.0, 125.0)), min_size=1, max_size=3
    ),
)
def test_round_trip_every_channel(
    thermocouple: str,
    adc_bits: int,
    cold_resolution: float,
    points: list[tuple[float, float]],
) -> None:
    clock = VirtualClock()
    low, high = TYPE_RANGE_C[thermocouple]
    options = {
        "thermocouple": thermocouple,
        "adc_bits": adc_bits,
        "cold_junction_resolution": cold_resolution,
    }

    async def main() -> None:
        with rig(clock, **options) as r:
            d = r.driver
            await d.open()
            cold_err = d.resolution("cold_junction_c") / 2 + 1e-9
            delta_err = d.resolution("delta_c") / 2 + 1 / 32 + 1e-9
            for fraction, cold in points:
                hot = low + fraction * (high - low)
                r.sim.set_channel("hot_junction_c", hot)
                r.sim.set_channel("cold_junction_c", cold)
                await clock.sleep(d.conversion_period)  # let a conversion see the new inputs
                values = await d.read()
                assert abs(values["cold_junction_c"] - cold) <= cold_err
                assert abs(values["delta_c"] - (hot - cold)) <= delta_err
                assert abs(values["hot_junction_c"] - hot) <= delta_err + cold_err

    clock.run(main())


def test_reference_rig_fluid_thermocouple(vclock: VirtualClock) -> None:
    """Type K in the loop fluid, 20-100 degC, the connector at pump-room temperature."""

    async def main() -> None:
        with rig(vclock) as r:
            await r.driver.open()
            for fluid, room in ((20.0, 18.5), (63.7, 24.0), (100.0, 31.2), (12.0, 18.0)):
                r.sim.set_channel("hot_junction_c", fluid)
                r.sim.set_channel("cold_junction_c", room)
                await vclock.sleep(r.driver.conversion_period)
                values = await r.driver.read()
                assert values["hot_junction_c"] == pytest.approx(fluid, abs=0.0625)
                assert values["cold_junction_c"] == pytest.approx(room, abs=0.0625 / 2)
                assert values["delta_c"] == pytest.approx(fluid - room, abs=0.0625)

    vclock.run(main())


# --------------------------------------------------------------------------------------------
# Status flags, conversion timing, filter, modes


def test_th_update_sets_after_the_conversion_time_and_clears_on_write_0(
    vclock: VirtualClock,
) -> None:
    async def main() -> None:
        with rig(vclock, adc_bits=14, cold_junction_resolution=0.25) as r:  # 63 ms per update
            await r.driver.open()
            await r.driver.read()
            assert not decode_status(read_byte(r.smbus, STATUS.address)).th_updated  # cleared
            await vclock.sleep(0.060)
            assert not decode_status(read_byte(r.smbus, STATUS.address)).th_updated
            await vclock.sleep(0.010)
            assert decode_status(read_byte(r.smbus, STATUS.address)).th_updated
            r.smbus.write_i2c_block_data(ADDRESS, STATUS.address, [0xFF])  # 1s do nothing
            assert decode_status(read_byte(r.smbus, STATUS.address)).th_updated
            r.smbus.write_i2c_block_data(ADDRESS, STATUS.address, [0x00])
            assert not decode_status(read_byte(r.smbus, STATUS.address)).th_updated

    vclock.run(main())


def test_out_of_range_and_open_thermocouple_are_data_errors(vclock: VirtualClock) -> None:
    async def main() -> None:
        with rig(vclock, thermocouple="T") as r:  # type T ends at 400 degC
            await r.driver.open()
            r.sim.set_channel("hot_junction_c", 450.0)
            with pytest.raises(DeviceDataError, match="out of range"):
                await r.driver.read()
            assert r.driver.last_status is not None and r.driver.last_status.input_range
            r.sim.set_channel("hot_junction_c", 80.0)
            assert (await r.driver.read())["hot_junction_c"] == pytest.approx(80.0, abs=0.07)
            r.sim.open_thermocouple = True
            with pytest.raises(DeviceDataError, match="open or shorted"):
                await r.driver.read()
            r.sim.open_thermocouple = False
            assert (await r.driver.read())["hot_junction_c"] == pytest.approx(80.0, abs=0.07)

    vclock.run(main())


def test_filter_smooths_th_and_settles(vclock: VirtualClock) -> None:
    async def main() -> None:
        with rig(vclock, filter=2, adc_bits=12, cold_junction_resolution=0.25) as r:
            await r.driver.open()
            r.sim.set_channel("cold_junction_c", 25.0)
            r.sim.set_channel("hot_junction_c", 25.0)
            await r.driver.read()
            r.sim.set_channel("hot_junction_c", 125.0)  # a 100 degC step
            readings = [(await r.driver.read())["hot_junction_c"] for _ in range(40)]
            assert 25.0 < readings[0] < 75.0  # a quarter of the step per conversion
            assert readings == sorted(readings)
            assert readings[-1] == pytest.approx(125.0, abs=3.2)  # ADC step ~3.1 degC at 12 bit

    vclock.run(main())


def test_burst_mode_converts_n_samples_then_stops(vclock: VirtualClock) -> None:
    async def main() -> None:
        with rig(vclock, adc_bits=12, cold_junction_resolution=0.25) as r:
            await r.driver.open()
            r.smbus.write_i2c_block_data(
                ADDRESS, DEVICE_CONFIG.address, [device_config_word(0.25, 12, MODE_BURST, 4)]
            )
            start = r.sim.conversions
            await vclock.sleep(3 * 0.063 + 0.001)
            assert not decode_status(read_byte(r.smbus, STATUS.address)).burst_complete
            await vclock.sleep(0.063)
            assert decode_status(read_byte(r.smbus, STATUS.address)).burst_complete
            assert r.sim.conversions == start + 4
            await vclock.sleep(1.0)
            read_byte(r.smbus, STATUS.address)
            assert r.sim.conversions == start + 4

    vclock.run(main())


def test_close_shuts_the_part_down(vclock: VirtualClock) -> None:
    async def main() -> None:
        with rig(vclock) as r:
            await r.driver.open()
            await r.driver.read()
            await r.driver.close()
            assert read_byte(r.smbus, DEVICE_CONFIG.address) & 0x03 == MODE_SHUTDOWN
            done = r.sim.conversions
            await vclock.sleep(2.0)
            read_byte(r.smbus, STATUS.address)
            assert r.sim.conversions == done

    vclock.run(main())


# --------------------------------------------------------------------------------------------
# Fault knobs


def test_nack_and_disconnect_then_recovery(vclock: VirtualClock) -> None:
    async def main() -> None:
        with rig(vclock) as r:
            await r.driver.open()
            r.sim.set_channel("hot_junction_c", 55.0)
            r.sim.faults.nack = 1.0
            with pytest.raises(DeviceNotFound):
                await r.driver.read()
            r.sim.faults.clear()
            assert (await r.driver.read())["hot_junction_c"] == pytest.approx(55.0, abs=0.07)
            r.sim.faults.disconnect = True
            with pytest.raises(DeviceNotFound):
                await r.driver.read()
            r.sim.faults.clear()
            assert (await r.driver.read())["hot_junction_c"] == pytest.approx(55.0, abs=0.07)

    vclock.run(main())


def test_stuck_registers_freeze_and_th_update_never_sets(vclock: VirtualClock) -> None:
    async def main() -> None:
        with rig(vclock) as r:
            await r.driver.open()
            r.sim.set_channel("hot_junction_c", 40.0)
            await r.driver.read()
            r.sim.faults.stuck = True
            r.sim.set_channel("hot_junction_c", 90.0)
            frozen = read_word(r.smbus, TH.address), read_word(r.smbus, TC.address)
            await vclock.sleep(5.0)
            # the registers read back unchanged although the thermocouple moved...
            assert (read_word(r.smbus, TH.address), read_word(r.smbus, TC.address)) == frozen
            assert decode_temperature(frozen[0].to_bytes(2, "big")) == pytest.approx(40.0, abs=0.07)
            # ...and the driver sees no new conversion
            with pytest.raises(DeviceTimeout, match="TH Update"):
                await r.driver.read()
            r.sim.faults.clear()
            assert (await r.driver.read())["hot_junction_c"] == pytest.approx(90.0, abs=0.07)

    vclock.run(main())


def test_bit_flips_are_caught_by_the_status_and_sum_checks(vclock: VirtualClock) -> None:
    async def main() -> None:
        with rig(vclock) as r:
            await r.driver.open()
            r.sim.set_channel("hot_junction_c", 70.0)
            r.sim.set_channel("cold_junction_c", 22.0)
            r.sim.faults.bit_flip = 1.0  # every read has one bit flipped
            for _ in range(10):
                with pytest.raises(DeviceDataError):
                    await r.driver.read()
            r.sim.faults.clear()
            values = await r.driver.read()
            assert values["hot_junction_c"] == pytest.approx(70.0, abs=0.07)
            assert values["delta_c"] == pytest.approx(48.0, abs=0.07)

    vclock.run(main())


def test_slow_conversions_wait_or_time_out_then_recover(vclock: VirtualClock) -> None:
    async def main() -> None:
        with rig(vclock) as r:
            await r.driver.open()
            r.sim.set_channel("hot_junction_c", 33.0)
            r.sim.faults.slow = r.driver.conversion_period  # twice as slow: within the deadline
            assert (await r.driver.read())["hot_junction_c"] == pytest.approx(33.0, abs=0.07)
            r.sim.faults.slow = 5.0
            with pytest.raises(DeviceTimeout):
                await r.driver.read()
            r.sim.faults.clear()
            assert (await r.driver.read())["hot_junction_c"] == pytest.approx(33.0, abs=0.07)

    vclock.run(main())


def test_a_part_reset_behind_the_driver_is_a_data_error_not_a_wrong_type(
    vclock: VirtualClock,
) -> None:
    """A brown-out resets the part to its power-on configuration (type K, 18 bits) and it goes
    on converting: a type J thermocouple at 300 degC then read as about 374 degC, and kept so,
    with nothing wrong in STATUS or in TH = TDelta + TC. Now the read sees the configuration
    changed, says so, and the part is configured again when it is opened (the sampler does)."""

    async def main() -> None:
        with rig(vclock, thermocouple="J") as r:
            r.sim.thermocouple = "J"
            await r.driver.open()
            r.sim.set_channel("hot_junction_c", 300.0)
            assert (await r.driver.read())["hot_junction_c"] == pytest.approx(300.0, abs=0.2)
            fresh = Mcp9600Sim(vclock)  # the same chip after a power-on reset
            fresh.thermocouple = "J"
            fresh.set_channel("hot_junction_c", 300.0)
            r.smbus.devices[ADDRESS] = fresh
            await vclock.sleep(1.0)
            with pytest.raises(DeviceDataError, match="configuration"):
                await r.driver.read()
            await r.driver.open()
            assert (await r.driver.read())["hot_junction_c"] == pytest.approx(300.0, abs=0.2)

    vclock.run(main())
