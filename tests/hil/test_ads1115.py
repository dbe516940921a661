"""The ADS1115 driver against its register-level simulator on a FakeSMBus (virtual time).

Round-trip bound, and why: the simulator (like the ideal transfer function of the datasheet)
rounds the input to the nearest code, so a voltage comes back within half an LSB
(``resolution / 2`` = FSR / 65536).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, NamedTuple

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.errors import DeviceDataError, DeviceNotFound, DeviceTimeout
from drivers.ads1115 import (
    CONFIG,
    CONVERSION,
    DATA_RATES_SPS,
    FSR_CODES,
    HI_THRESH,
    LO_THRESH,
    Ads1115,
    code_to_volts,
    config_word,
    decode_config,
    is_saturated,
    lsb_volts,
)
from drivers.base import OptionError, Options
from drivers.bus import AsyncI2C
from drivers.clock import VirtualClock
from drivers.sim.ads1115 import Ads1115Sim
from drivers.sim.ina219 import Ina219Sim
from drivers.sim.smbus import FakeSMBus

ADDRESS = 0x48


class Rig(NamedTuple):
    sim: Ads1115Sim
    driver: Ads1115
    smbus: FakeSMBus


@contextmanager
def rig(clock: Any, address: int = ADDRESS, **options: Any) -> Iterator[Rig]:
    smbus = FakeSMBus()
    opts = Ads1115.parse_options(Options(options))
    sim = Ads1115Sim(clock, opts)
    smbus.attach(address, sim)
    bus = AsyncI2C(smbus, clock)
    try:
        yield Rig(sim, Ads1115(bus.device(address), opts), smbus)
    finally:
        bus.close()


def word(smbus: FakeSMBus, register: int) -> int:
    return int.from_bytes(bytes(smbus.read_i2c_block_data(ADDRESS, register, 2)), "big")


# --------------------------------------------------------------------------------------------
# Pure functions against the datasheet


def test_lsb_sizes_of_the_full_scale_ranges() -> None:
    """SBAS444D "Full-Scale Range and Corresponding LSB Size" table."""
    expected_uv = {6.144: 187.5, 4.096: 125.0, 2.048: 62.5, 1.024: 31.25}
    expected_uv |= {0.512: 15.625, 0.256: 7.8125}
    for fsr, uv in expected_uv.items():
        assert lsb_volts(fsr) * 1e6 == pytest.approx(uv)


def test_output_codes_of_the_ideal_transfer_function() -> None:
    """SBAS444D "Output Codes vs Input Signals" table, at FSR 2.048 V."""
    assert code_to_volts(0x7FFF, 2.048) == pytest.approx(2.048 * (2**15 - 1) / 2**15)
    assert code_to_volts(0x0001, 2.048) == pytest.approx(62.5e-6)
    assert code_to_volts(0, 2.048) == 0.0
    assert code_to_volts(-1, 2.048) == pytest.approx(-62.5e-6)  # 0xFFFF
    assert code_to_volts(-0x8000, 2.048) == pytest.approx(-2.048)
    assert is_saturated(0x7FFF) and is_saturated(-0x8000)
    assert not is_saturated(0x7FFE) and not is_saturated(-0x7FFF)


def test_config_register_reset_value_and_single_shot_words() -> None:
    reset = decode_config(0x8583)  # Config register POR value
    assert reset.idle and reset.single_shot
    assert (reset.mux, reset.fsr_v, reset.data_rate_sps, reset.comp_que) == (0, 2.048, 128, 3)
    # OS=1, MUX=100 (AIN0-GND), PGA=001 (4.096 V), MODE=1, DR=100 (128 SPS), COMP_QUE=00
    assert config_word(0, 4.096, 128) == 0xC380
    assert config_word(3, 6.144, 860) == 0xF1E0


def test_options() -> None:
    opts = Ads1115.parse_options(Options({}))
    assert (opts.pga, opts.data_rate, opts.inputs) == (4.096, 128, (0, 1, 2, 3))
    assert Ads1115.channels_for(opts) == ("ain0_v", "ain1_v", "ain2_v", "ain3_v")
    two = Ads1115.parse_options(Options({"inputs": [2, 0], "pga": 0.256, "data_rate": 8}))
    assert Ads1115.channels_for(two) == ("ain2_v", "ain0_v")
    for bad in ([], [4], [0, 0], "0", [True], [1.0]):
        with pytest.raises(OptionError) as err:
            Ads1115.parse_options(Options({"inputs": bad}))
        assert err.value.key == "inputs"
    with pytest.raises(OptionError):
        Ads1115.parse_options(Options({"pga": 5.0}))
    with pytest.raises(OptionError):
        Ads1115.parse_options(Options({"data_rate": 100}))


# --------------------------------------------------------------------------------------------
# Identity


def test_open_sets_alert_rdy_up_as_conversion_ready(vclock: VirtualClock) -> None:
    async def main() -> None:
        with rig(vclock) as r:
            assert r.sim.alert_rdy_level == 1  # POR: comparator disabled, pin pulled high
            identity = await r.driver.open()
            assert identity.part == "ads1115"
            assert word(r.smbus, HI_THRESH.address) == 0x8000
            assert word(r.smbus, LO_THRESH.address) == 0x0000
            assert r.sim.alert_rdy_level == 0  # ready (idle), active low
            r.smbus.write_i2c_block_data(ADDRESS, CONFIG.address, [0xC3, 0x80])  # start one
            assert r.sim.alert_rdy_level == 1  # converting
            await vclock.sleep(1 / 128 + 1e-6)
            assert r.sim.alert_rdy_level == 0

    vclock.run(main())


def test_nothing_at_the_address_is_not_found(vclock: VirtualClock) -> None:
    async def main() -> None:
        with rig(vclock) as r:
            other = Ads1115(r.driver.device.bus.device(0x49))
            with pytest.raises(DeviceNotFound, match="no acknowledge"):
                await other.open()

    vclock.run(main())


def test_another_part_at_the_address_is_not_found(vclock: VirtualClock) -> None:
    """An INA219 strapped to 0x48: its registers 2 and 3 are read-only data registers."""

    async def main() -> None:
        smbus = FakeSMBus()
        smbus.attach(ADDRESS, Ina219Sim(vclock))
        bus = AsyncI2C(smbus, vclock)
        try:
            with pytest.raises(DeviceNotFound, match="not an ADS1115"):
                await Ads1115(bus.device(ADDRESS)).open()
        finally:
            bus.close()

    vclock.run(main())


# --------------------------------------------------------------------------------------------
# Round trips


@settings(max_examples=50, deadline=None)
@given(
    pga=st.sampled_from(sorted(FSR_CODES)),
    data_rate=st.sampled_from(DATA_RATES_SPS),
    inputs=st.permutations([0, 1, 2, 3]).flatmap(lambda p: st.integers(1, 4).map(lambda n: p[:n])),
    fractions=st.lists(st.floats(-0.999, 0.999), min_size=4, max_size=4),
)
def test_round_trip_every_input(
    pga: float, data_rate: int, inputs: list[int], fractions: list[float]
) -> None:
    clock = VirtualClock()
    vdd = 5.0
    top = min(pga, vdd + 0.3)  # the PGA full scale, or the input clamp above VDD
    bottom = max(-pga, -0.3)

    async def main() -> None:
        with rig(clock, pga=pga, data_rate=data_rate, inputs=inputs) as r:
            await r.driver.open()
            expected = {}
            for ain, fraction in zip(range(4), fractions, strict=True):
                volts = fraction * (top if fraction >= 0 else -bottom)
                r.sim.set_channel(f"ain{ain}_v", volts)
                expected[f"ain{ain}_v"] = volts
            values = await r.driver.read()
            assert list(values) == [f"ain{i}_v" for i in inputs]
            bound = r.driver.resolution(f"ain{inputs[0]}_v") / 2 + 1e-12
            assert r.driver.resolution(f"ain{inputs[0]}_v") == pytest.approx(pga / 32768)
            for channel, value in values.items():
                assert abs(value - expected[channel]) <= bound

    clock.run(main())


def test_reference_rig_pressure_transducer(vclock: VirtualClock) -> None:
    """A 0.5-4.5 V transducer on AIN0 needs pga 6.144 (4.5 V is beyond the 4.096 V default)."""

    async def main() -> None:
        with rig(vclock, pga=6.144, inputs=[0]) as r:
            await r.driver.open()
            for volts in (0.5, 2.5, 4.5):
                r.sim.set_channel("ain0_v", volts)
                values = await r.driver.read()
                assert values == {"ain0_v": pytest.approx(volts, abs=187.5e-6 / 2)}
        with rig(vclock, inputs=[0]) as r:
            await r.driver.open()
            r.sim.set_channel("ain0_v", 4.5)
            with pytest.raises(DeviceDataError, match="ain0 is saturated"):
                await r.driver.read()

    vclock.run(main())


def test_saturation_and_input_clamp(vclock: VirtualClock) -> None:
    async def main() -> None:
        with rig(vclock, pga=0.256, inputs=[1, 2]) as r:
            await r.driver.open()
            r.sim.set_channel("ain1_v", 0.1)
            r.sim.set_channel("ain2_v", -1.0)  # clamps at -0.3 V: beyond -0.256 V
            with pytest.raises(DeviceDataError, match="ain2 is saturated"):
                await r.driver.read()
            r.sim.set_channel("ain2_v", -0.2)
            values = await r.driver.read()
            assert values["ain2_v"] == pytest.approx(-0.2, abs=7.8125e-6 / 2)
        with rig(vclock, pga=6.144, inputs=[3]) as r:
            await r.driver.open()
            r.sim.set_channel("ain3_v", 12.0)  # the ESD diodes hold the pin at VDD + 0.3 V
            assert (await r.driver.read())["ain3_v"] == pytest.approx(5.3, abs=187.5e-6 / 2)

    vclock.run(main())


def test_read_waits_for_a_conversion_left_running(vclock: VirtualClock) -> None:
    """A conversion still running (here an 8 SPS one of AIN3) finishes with its own MUX: the
    driver waits for it instead of taking its result for AIN0."""

    async def main() -> None:
        with rig(vclock, data_rate=860, inputs=[0]) as r:
            await r.driver.open()
            r.sim.set_channel("ain0_v", 1.0)
            r.sim.set_channel("ain3_v", 3.0)
            r.smbus.write_i2c_block_data(ADDRESS, CONFIG.address, [0xF3, 0x03])  # AIN3, 8 SPS
            assert (await r.driver.read())["ain0_v"] == pytest.approx(1.0, abs=1e-4)
            assert word(r.smbus, CONVERSION.address) == round(1.0 / 125e-6)

    vclock.run(main())


# --------------------------------------------------------------------------------------------
# The simulator's wire behaviour


def test_sim_pointer_os_bit_conversion_time_and_mux(vclock: VirtualClock) -> None:
    smbus = FakeSMBus()
    sim = Ads1115Sim(vclock)
    smbus.attach(ADDRESS, sim)
    assert word(smbus, CONFIG.address) == 0x8583
    assert word(smbus, CONVERSION.address) == 0
    sim.set_channel("ain0_v", 1.0)
    sim.set_channel("ain1_v", 0.25)
    # differential AIN0-AIN1 (MUX 000) at 2.048 V, 8 SPS, single shot, start
    smbus.write_i2c_block_data(ADDRESS, CONFIG.address, [0x85, 0x03])
    smbus.write_byte(ADDRESS, CONFIG.address)  # pointer only: reads come from Config
    assert smbus.read_byte(ADDRESS) & 0x80 == 0  # OS = 0: converting
    vclock.advance(0.120)
    assert smbus.read_byte(ADDRESS) & 0x80 == 0  # 1/8 s not over yet
    vclock.advance(0.006)
    assert smbus.read_byte(ADDRESS) & 0x80  # done: OS = 1
    assert word(smbus, CONVERSION.address) == round(0.75 / 62.5e-6)
    # continuous mode keeps converting
    smbus.write_i2c_block_data(ADDRESS, CONFIG.address, [0x44, 0xE3])  # AIN0-GND, 860 SPS
    before = sim.conversions
    vclock.advance(0.1)
    word(smbus, CONVERSION.address)
    assert sim.conversions == before + 1  # lazy model: the latest conversion lands on access
    assert word(smbus, CONVERSION.address) == round(1.0 / 62.5e-6)
    with pytest.raises(ValueError):
        sim.set_channel("ain4_v", 1.0)


# --------------------------------------------------------------------------------------------
# Fault knobs


def test_nack_and_disconnect_then_recovery(vclock: VirtualClock) -> None:
    async def main() -> None:
        with rig(vclock, inputs=[0]) as r:
            await r.driver.open()
            r.sim.set_channel("ain0_v", 1.234)
            r.sim.faults.nack = 1.0
            with pytest.raises(DeviceNotFound):
                await r.driver.read()
            r.sim.faults.clear()
            assert (await r.driver.read())["ain0_v"] == pytest.approx(1.234, abs=1e-4)
            r.sim.faults.disconnect = True
            with pytest.raises(DeviceNotFound):
                await r.driver.read()
            r.sim.faults.clear()
            assert (await r.driver.read())["ain0_v"] == pytest.approx(1.234, abs=1e-4)

    vclock.run(main())


def test_stuck_conversion_register_reads_unchanged_while_inputs_move(
    vclock: VirtualClock,
) -> None:
    """The ADS1115 has no way to show a stale result: the driver reads the frozen code."""

    async def main() -> None:
        with rig(vclock) as r:
            await r.driver.open()
            for ain in range(4):
                r.sim.set_channel(f"ain{ain}_v", 0.5 + ain)
            before = await r.driver.read()
            assert before["ain3_v"] == pytest.approx(3.5, abs=1e-4)
            r.sim.faults.stuck = True
            for ain in range(4):
                r.sim.set_channel(f"ain{ain}_v", 0.1 * ain)
            for _ in range(2):
                frozen = await r.driver.read()
                assert all(v == before["ain3_v"] for v in frozen.values())
            r.sim.faults.clear()
            after = await r.driver.read()
            assert after == {f"ain{i}_v": pytest.approx(0.1 * i, abs=1e-4) for i in range(4)}

    vclock.run(main())


def test_bit_flips_checked_config_raises_unchecked_data_reads_wrong(
    vclock: VirtualClock,
) -> None:
    async def main() -> None:
        with rig(vclock, inputs=[0]) as r:
            await r.driver.open()
            r.sim.set_channel("ain0_v", 2.0)
            r.sim.faults.bit_flip = 0.5
            errors = wrong = 0
            for _ in range(40):
                try:
                    value = (await r.driver.read())["ain0_v"]
                except DeviceDataError:
                    errors += 1  # a flip in the Config read-back: caught
                else:
                    wrong += abs(value - 2.0) > 1e-4  # a flip in the result: passes unchecked
            assert errors > 0
            assert wrong > 0
            r.sim.faults.clear()
            assert (await r.driver.read())["ain0_v"] == pytest.approx(2.0, abs=1e-4)

    vclock.run(main())


def test_slow_conversions_wait_or_time_out_then_recover(vclock: VirtualClock) -> None:
    async def main() -> None:
        with rig(vclock, data_rate=64, inputs=[0, 1]) as r:
            await r.driver.open()
            r.sim.set_channel("ain0_v", 0.3)
            r.sim.set_channel("ain1_v", 3.3)
            r.sim.faults.slow = 0.5 / 64  # half a conversion more: within the deadline
            values = await r.driver.read()
            assert values["ain1_v"] == pytest.approx(3.3, abs=1e-4)
            r.sim.faults.slow = 1.0
            with pytest.raises(DeviceTimeout, match="ain0"):
                await r.driver.read()
            r.sim.faults.clear()
            values = await r.driver.read()
            assert values["ain0_v"] == pytest.approx(0.3, abs=1e-4)
            assert values["ain1_v"] == pytest.approx(3.3, abs=1e-4)

    vclock.run(main())
