"""BME280: the real driver against its register-level simulator on a FakeSMBus.

Round-trip bounds: a read equals the physical value given to the simulator within
``driver.resolution(channel)``: 0.01 degC for temperature; for pressure and humidity the larger of
the compensation output step (1/25600 hPa, 1/1024 %RH) and the change one ADC step makes at the
current settings (e.g. ~0.027 hPa at x1, ~0.0017 hPa at x16, ~0.006 %RH). The simulator picks the
ADC code whose compensated value is nearest, so the error is at most half a step; the tests allow
one full step.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import asdict
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.errors import DeviceDataError, DeviceNotFound, DeviceTimeout
from drivers import bme280 as chip
from drivers.base import OptionError, Options
from drivers.bme280 import Bme280, Bme280Options, Calibration
from drivers.bus import AsyncI2C
from drivers.clock import VirtualClock
from drivers.sim import bme280 as sim_chip
from drivers.sim.bme280 import DEFAULT_CALIBRATION, Bme280Sim, encode_calibration
from drivers.sim.smbus import FakeSMBus

ADDR = 0x76
HYPO = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])

#: A calibration with negative values in every signed word that real parts may have negative,
#: including the 12-bit packed dig_H4 and dig_H5 and the signed char dig_H6. The simulator has its
#: own Calibration type (it shares no code with the driver); the driver's pure functions get the
#: same values in the driver's type.
NEGATIVE_CALIBRATION = sim_chip.Calibration(
    dig_T1=27504,
    dig_T2=26435,
    dig_T3=-1000,
    dig_P1=36477,
    dig_P2=-10685,
    dig_P3=3024,
    dig_P4=2855,
    dig_P5=140,
    dig_P6=-7,
    dig_P7=15500,
    dig_P8=-14600,
    dig_P9=6000,
    dig_H1=75,
    dig_H2=370,
    dig_H3=0,
    dig_H4=-20,
    dig_H5=-30,
    dig_H6=-7,
)
NEGATIVE_CAL_DRIVER = Calibration(**asdict(NEGATIVE_CALIBRATION))
DEFAULT_CAL_DRIVER = Calibration(**asdict(DEFAULT_CALIBRATION))


class Rig:
    """A simulated BME280 on a fake bus, with the driver built on it."""

    def __init__(
        self,
        clock: VirtualClock,
        options: Bme280Options | None = None,
        fake: FakeSMBus | None = None,
        **sim: Any,
    ):
        self.clock = clock
        self.fake = fake if fake is not None else FakeSMBus()
        self.sim = self.fake.attach(ADDR, Bme280Sim(clock, **sim))
        self.bus = AsyncI2C(self.fake, clock)
        self.driver = Bme280(self.bus.device(ADDR), options)

    def set(self, **values: float) -> None:
        for channel, value in values.items():
            self.sim.set_channel(channel, value)

    def run(self, fn: Callable[[Rig], Awaitable[Any]]) -> Any:
        try:
            return self.clock.run(fn(self))
        finally:
            self.bus.close()


def assert_close(read: dict[str, float], driver: Bme280, expected: dict[str, float]) -> None:
    for channel, value in expected.items():
        bound = driver.resolution(channel)
        assert abs(read[channel] - value) <= bound + 1e-9, (channel, read[channel], value, bound)


# --------------------------------------------------------------------------------------------
# Pure conversion functions


def test_compensation_matches_the_bosch_worked_example() -> None:
    # BMP280 data sheet (BST-BMP280-DS001), section 3.12 worked example; the BME280 uses the
    # identical temperature and pressure routines. The example's double-precision pressure is
    # 100653.27 Pa; the 64-bit integer routine agrees within its 1/256 Pa step plus rounding.
    t_fine, deg_c = chip.compensate_temperature(519888, NEGATIVE_CAL_DRIVER)
    assert t_fine == 128422
    assert deg_c == 25.08
    pa = chip.compensate_pressure_q24_8(415148, t_fine, NEGATIVE_CAL_DRIVER) / 256
    assert abs(pa - 100653.27) < 0.05


def test_measurement_time_matches_the_datasheet_example() -> None:
    # DS appendix 9.1: osrs_t x1, osrs_p x4, no humidity -> 11.5 ms typical.
    assert chip.measurement_time_s(1, 4, 0) == pytest.approx(0.0115)
    assert chip.measurement_time_s(1, 4, 0, maximum=True) == pytest.approx(0.013325)
    # All x16: the 112.8 ms maximum that drivers commonly wait for.
    assert chip.measurement_time_s(16, 16, 16, maximum=True) == pytest.approx(0.1128)


def test_adc_step_follows_oversampling_and_filter() -> None:
    assert [chip.adc_step(o, 0) for o in (1, 2, 4, 8, 16)] == [16, 8, 4, 2, 1]
    assert chip.adc_step(1, 4) == 1  # the IIR filter output is always 20 bit


def test_humidity_compensation_clamps_to_0_and_100_percent() -> None:
    t_fine = 25 * 5120
    cal = DEFAULT_CAL_DRIVER
    assert chip.compensate_humidity(0, t_fine, cal) == 0.0
    assert chip.compensate_humidity(0xFFFF, t_fine, cal) == 100.0
    values = [chip.compensate_humidity(a, t_fine, cal) for a in range(0, 65536, 97)]
    assert values == sorted(values)


def test_h4_h5_packing_and_sign_extension_from_raw_bytes() -> None:
    # 0xE1..0xE7: H2 = 0x0172 (370), H3 = 0, then H4 = -20 = 0xFEC (0xE4 = 0xFE, 0xE5[3:0] = 0xC),
    # H5 = -30 = 0xFE2 (0xE6 = 0xFE, 0xE5[7:4] = 0x2), H6 = -7 = 0xF9.
    block2 = bytes([0x72, 0x01, 0x00, 0xFE, 0x2C, 0xFE, 0xF9])
    nvm = encode_calibration(NEGATIVE_CALIBRATION)
    block1 = bytes(nvm.get(a, 0) for a in range(0x88, 0xA2))
    cal = chip.decode_calibration(block1, block2)
    assert (cal.dig_H2, cal.dig_H3, cal.dig_H4, cal.dig_H5, cal.dig_H6) == (370, 0, -20, -30, -7)
    # Positive 12-bit values: H4 = 313 = 0x139, H5 = 50 = 0x032 -> E4=0x13, E5=0x29, E6=0x03.
    block2 = bytes([0x6A, 0x01, 0x00, 0x13, 0x29, 0x03, 0x1E])
    cal = chip.decode_calibration(block1, block2)
    assert (cal.dig_H2, cal.dig_H4, cal.dig_H5, cal.dig_H6) == (362, 313, 50, 30)
    assert (cal.dig_T3, cal.dig_P2, cal.dig_P8) == (-1000, -10685, -14600)


# --------------------------------------------------------------------------------------------
# Options


def test_parse_options_defaults_and_errors() -> None:
    assert Bme280.parse_options(Options({})) == Bme280Options()
    opts = Bme280.parse_options(
        Options(
            {
                "mode": "normal",
                "oversampling_p": 16,
                "oversampling_h": 0,
                "iir_filter": 4,
                "standby_ms": 0.5,
            }
        )
    )
    assert opts == Bme280Options("normal", 1, 16, 0, 4, 0.5)
    assert Bme280.channels_for(opts) == ("temperature_c", "pressure_hpa")
    for bad, key in (
        ({"mode": "continuous"}, "mode"),
        ({"oversampling_p": 3}, "oversampling_p"),
        ({"oversampling_t": 0}, "oversampling_t"),
        ({"iir_filter": 1}, "iir_filter"),
        ({"standby_ms": 2000}, "standby_ms"),
        ({"osrs_t": 1}, "osrs_t"),
    ):
        with pytest.raises(OptionError) as err:
            Bme280.parse_options(Options(bad))
        assert err.value.key == key


# --------------------------------------------------------------------------------------------
# Round trips: physical value -> simulator -> registers -> driver


@HYPO
@given(
    t=st.floats(-40, 85),
    p=st.floats(300, 1100),
    h=st.floats(0, 100),
)
def test_round_trip_default_settings(t: float, p: float, h: float) -> None:
    rig = Rig(VirtualClock())

    async def go(r: Rig) -> None:
        await r.driver.open()
        r.set(temperature_c=t, pressure_hpa=p, humidity_rh=h)
        read = await r.driver.read()
        assert_close(read, r.driver, {"temperature_c": t, "pressure_hpa": p, "humidity_rh": h})

    rig.run(go)


@HYPO
@given(
    mode=st.sampled_from(["forced", "normal"]),
    osrs_t=st.sampled_from([1, 2, 4, 8, 16]),
    osrs_p=st.sampled_from([0, 1, 2, 4, 8, 16]),
    osrs_h=st.sampled_from([0, 1, 2, 4, 8, 16]),
    iir=st.sampled_from([0, 2, 4, 8, 16]),
    standby=st.sampled_from([0.5, 10.0, 62.5, 1000.0]),
    t=st.floats(-40, 85),
    p=st.floats(300, 1100),
    h=st.floats(0, 100),
)
def test_round_trip_all_settings(
    mode: str,
    osrs_t: int,
    osrs_p: int,
    osrs_h: int,
    iir: int,
    standby: float,
    t: float,
    p: float,
    h: float,
) -> None:
    options = Bme280Options(mode, osrs_t, osrs_p, osrs_h, iir, standby)
    rig = Rig(VirtualClock(), options)
    # Set before open: the first conversion after the filter reset initialises the IIR filter.
    rig.set(temperature_c=t, pressure_hpa=p, humidity_rh=h)

    async def go(r: Rig) -> None:
        await r.driver.open()
        read = await r.driver.read()
        assert set(read) == set(Bme280.channels_for(options))
        expected = {"temperature_c": t, "pressure_hpa": p, "humidity_rh": h}
        assert_close(read, r.driver, {k: v for k, v in expected.items() if k in read})

    rig.run(go)


def test_resolution_tracks_oversampling(vclock: VirtualClock) -> None:
    async def go(r: Rig) -> tuple[float, float]:
        await r.driver.open()
        await r.driver.read()
        return r.driver.resolution("pressure_hpa"), r.driver.resolution("humidity_rh")

    bus = AsyncI2C(FakeSMBus(), vclock)
    unopened = Bme280(bus.device(ADDR), Bme280Options())  # typical values until open()
    assert [unopened.resolution(c) for c in Bme280.channels] == pytest.approx([0.01, 0.012, 0.0256])
    bus.close()
    p1, h1 = Rig(vclock, Bme280Options()).run(go)
    p16, h16 = Rig(vclock, Bme280Options(oversampling_p=16, oversampling_h=16)).run(go)
    # DS table 3: 2.62 Pa at x1 and 0.16 Pa at x16 (20 bit). Humidity: DS quotes 0.008 %RH for
    # the 16-bit ADC, but the integer routine drops the lowest ADC bit ((adc_H << 14) >> 15), so
    # its output moves in steps of two ADC codes, ~0.012 %RH.
    assert 0.020 < p1 < 0.032
    assert 0.0012 < p16 < 0.0020
    assert 0.008 < h1 == h16 < 0.014


def test_calibration_is_decoded_through_the_simulated_registers(vclock: VirtualClock) -> None:
    for cal in (DEFAULT_CALIBRATION, NEGATIVE_CALIBRATION):
        rig = Rig(vclock, calibration=cal)
        rig.set(temperature_c=23.5, pressure_hpa=987.6, humidity_rh=55.5)

        async def go(r: Rig) -> dict[str, float]:
            await r.driver.open()
            return await r.driver.read()

        read = rig.run(go)
        assert rig.driver.calibration is not None
        assert asdict(rig.driver.calibration) == asdict(cal)
        assert_close(
            read, rig.driver, {"temperature_c": 23.5, "pressure_hpa": 987.6, "humidity_rh": 55.5}
        )


# --------------------------------------------------------------------------------------------
# Chip behaviour seen through the driver and on the wire


def test_forced_mode_converts_once_and_returns_to_sleep(vclock: VirtualClock) -> None:
    async def go(r: Rig) -> None:
        await r.driver.open()
        before = r.sim.conversions
        await r.driver.read()
        assert r.sim.conversions == before + 1
        meas = r.fake.read_byte_data(ADDR, 0xF4)
        assert meas & 0x03 == chip.MODE_SLEEP
        await r.clock.sleep(1.0)  # asleep: no conversions on its own
        assert r.sim.conversions == before + 1

    Rig(vclock).run(go)


def test_normal_mode_reads_the_latest_periodic_result(vclock: VirtualClock) -> None:
    options = Bme280Options(mode="normal", standby_ms=62.5)

    async def go(r: Rig) -> None:
        await r.driver.open()
        r.set(temperature_c=10.0)
        await r.clock.sleep(0.2)  # a cycle is ~9 ms + 62.5 ms
        first = r.sim.conversions
        assert (await r.driver.read())["temperature_c"] == 10.0
        r.set(temperature_c=31.0)
        await r.clock.sleep(0.2)
        assert (await r.driver.read())["temperature_c"] == 31.0
        assert r.sim.conversions >= first + 2
        await r.driver.close()
        assert r.fake.read_byte_data(ADDR, 0xF4) & 0x03 == chip.MODE_SLEEP

    Rig(vclock, options).run(go)


def test_iir_filter_step_response(vclock: VirtualClock) -> None:
    # DS 3.4.4: data_filtered = (data_filtered_old * (c - 1) + data_adc) / c, on the raw values.
    rig = Rig(vclock, Bme280Options(iir_filter=4))
    rig.set(temperature_c=20.0)

    async def go(r: Rig) -> list[float]:
        await r.driver.open()
        assert (await r.driver.read())["temperature_c"] == 20.0
        r.set(temperature_c=30.0)
        return [(await r.driver.read())["temperature_c"] for _ in range(40)]

    temps = rig.run(go)
    assert 22.0 < temps[0] < 23.0  # a quarter of the raw step, about 2.5 degC
    assert temps == sorted(temps)
    assert temps[-1] == 30.0


def test_ctrl_hum_takes_effect_only_after_a_ctrl_meas_write(vclock: VirtualClock) -> None:
    fake = FakeSMBus()
    sim = fake.attach(ADDR, Bme280Sim(vclock))
    fake.write_byte_data(ADDR, 0xF2, 0b001)  # humidity x1
    fake.write_byte_data(ADDR, 0xF4, 0b001_001_11)  # t x1, p x1, normal mode
    vclock.advance(0.1)
    assert fake.read_i2c_block_data(ADDR, 0xFD, 2) != [0x80, 0x00]
    fake.write_byte_data(ADDR, 0xF2, 0b000)  # skip humidity ... not yet effective
    vclock.advance(0.2)
    conversions = sim.conversions
    assert fake.read_i2c_block_data(ADDR, 0xFD, 2) != [0x80, 0x00]
    assert sim.conversions > conversions
    fake.write_byte_data(ADDR, 0xF4, 0b001_001_11)  # ... until ctrl_meas is written
    vclock.advance(0.2)
    assert fake.read_i2c_block_data(ADDR, 0xFD, 2) == [0x80, 0x00]


def test_soft_reset_copies_nvm_with_im_update_set(vclock: VirtualClock) -> None:
    fake = FakeSMBus()
    fake.attach(ADDR, Bme280Sim(vclock))
    fake.write_byte_data(ADDR, 0xF5, 0b010_100_00)
    fake.write_byte_data(ADDR, 0xE0, chip.SOFT_RESET)
    assert fake.read_byte_data(ADDR, 0xF3) & 0x01 == 1  # im_update
    assert fake.read_i2c_block_data(ADDR, 0x88, 4) == [0, 0, 0, 0]
    vclock.advance(chip.STARTUP_S)
    assert fake.read_byte_data(ADDR, 0xF3) == 0
    assert fake.read_i2c_block_data(ADDR, 0x88, 2) == list(
        DEFAULT_CALIBRATION.dig_T1.to_bytes(2, "little")
    )
    assert fake.read_byte_data(ADDR, 0xF5) == 0  # registers back to their reset values
    assert fake.read_i2c_block_data(ADDR, 0xF7, 8) == [0x80, 0, 0, 0x80, 0, 0, 0x80, 0]
    assert fake.read_byte_data(ADDR, 0xD0) == chip.CHIP_ID


# --------------------------------------------------------------------------------------------
# Identity


def test_wrong_chip_id_is_device_not_found(vclock: VirtualClock) -> None:
    rig = Rig(vclock, chip_id=0x58)
    with pytest.raises(DeviceNotFound, match="BMP280"):
        rig.run(lambda r: r.driver.open())


def test_nothing_at_the_address_is_device_not_found(vclock: VirtualClock) -> None:
    fake = FakeSMBus()
    bus = AsyncI2C(fake, vclock)
    try:
        with pytest.raises(DeviceNotFound, match="no acknowledge"):
            vclock.run(Bme280(bus.device(0x77)).open())
    finally:
        bus.close()


# --------------------------------------------------------------------------------------------
# Fault knobs


@pytest.mark.parametrize("knob", ["nack", "disconnect"])
def test_nack_and_disconnect_then_recovery(vclock: VirtualClock, knob: str) -> None:
    async def go(r: Rig) -> None:
        await r.driver.open()
        if knob == "nack":
            r.sim.faults.nack = 1.0
        else:
            r.sim.faults.disconnect = True
        with pytest.raises(DeviceNotFound):
            await r.driver.read()
        r.sim.faults.clear()
        r.set(temperature_c=12.34)
        assert (await r.driver.read())["temperature_c"] == 12.34

    Rig(vclock).run(go)


def test_intermittent_nack_fails_some_reads_only(vclock: VirtualClock) -> None:
    async def go(r: Rig) -> tuple[int, int]:
        await r.driver.open()
        r.set(temperature_c=18.0)
        r.sim.faults.nack = 0.2
        ok = failed = 0
        for _ in range(30):
            try:
                assert (await r.driver.read())["temperature_c"] == 18.0
                ok += 1
            except DeviceNotFound:
                failed += 1
        return ok, failed

    ok, failed = Rig(vclock).run(go)
    assert ok > 0 and failed > 0


def test_stuck_data_reads_back_unchanged_while_the_input_moves(vclock: VirtualClock) -> None:
    async def go(r: Rig) -> None:
        await r.driver.open()
        r.set(temperature_c=20.0, pressure_hpa=1000.0)
        assert (await r.driver.read())["temperature_c"] == 20.0
        r.sim.faults.stuck = True
        r.set(temperature_c=30.0, pressure_hpa=950.0)
        stuck = await r.driver.read()  # the driver cannot tell: status still toggles
        assert stuck["temperature_c"] == 20.0
        assert abs(stuck["pressure_hpa"] - 1000.0) < 0.05
        r.sim.faults.clear()
        fresh = await r.driver.read()
        assert fresh["temperature_c"] == 30.0
        assert abs(fresh["pressure_hpa"] - 950.0) < 0.05

    Rig(vclock).run(go)


def test_bit_flips_raise_data_errors_or_read_wrong(vclock: VirtualClock) -> None:
    truth = {"temperature_c": 21.0, "pressure_hpa": 1005.0, "humidity_rh": 40.0}

    async def go(r: Rig) -> tuple[int, int]:
        await r.driver.open()
        r.set(**truth)
        r.sim.faults.bit_flip = 1.0  # one flipped bit in every read payload
        checked = wrong = 0
        for _ in range(40):
            try:
                read = await r.driver.read()
            except DeviceDataError:
                checked += 1  # out of range or the skip marker: caught
                continue
            if any(abs(read[k] - v) > r.driver.resolution(k) for k, v in truth.items()):
                wrong += 1  # unchecked: a flip in a low bit reads wrong
        r.sim.faults.clear()
        assert_close(await r.driver.read(), r.driver, truth)
        return checked, wrong

    checked, wrong = Rig(vclock).run(go)
    assert checked > 0
    assert wrong > 0


class FlipsOnce(FakeSMBus):
    """A noisy bus that flips one bit of the first read of the calibration block at 0x88:
    bit 0 of dig_T2's high byte (0x8B), so dig_T2 is off by 256."""

    flipped = False

    def read_i2c_block_data(self, i2c_addr, register, length, force=None):  # type: ignore[no-untyped-def]
        data = super().read_i2c_block_data(i2c_addr, register, length, force)
        if register == 0x88 and not self.flipped:
            self.flipped = True
            data[0x8B - 0x88] ^= 0x01
        return data


def test_a_calibration_read_corrupted_on_the_bus_is_not_kept(vclock: VirtualClock) -> None:
    """The calibration is read once, at open, and used for every reading after it: one bit
    flipped on the way (no CRC on I2C) made every temperature 0.2 degC off, within the
    plausibility limits, for as long as the agent ran. Now it is read twice and must agree."""
    truth = {"temperature_c": 21.0, "pressure_hpa": 1005.0, "humidity_rh": 40.0}

    async def go(r: Rig) -> None:
        r.set(**truth)
        with pytest.raises(DeviceDataError, match="calibration NVM reads differently"):
            await r.driver.open()
        await r.driver.open()  # the sampler opens it again before its next read
        assert_close(await r.driver.read(), r.driver, truth)

    Rig(vclock, fake=FlipsOnce()).run(go)


def test_slow_conversion_is_waited_for_then_times_out(vclock: VirtualClock) -> None:
    async def go(r: Rig) -> None:
        await r.driver.open()
        r.set(temperature_c=-5.5)
        r.sim.faults.slow = 0.005  # within the polling budget
        polls_before = r.sim.transactions
        assert (await r.driver.read())["temperature_c"] == -5.5
        assert r.sim.transactions - polls_before > 3
        r.sim.faults.slow = 1.0
        with pytest.raises(DeviceTimeout):
            await r.driver.read()
        r.sim.faults.clear()
        r.set(temperature_c=44.0)
        assert (await r.driver.read())["temperature_c"] == 44.0

    Rig(vclock).run(go)


def test_skip_marker_on_a_configured_channel_is_a_data_error(vclock: VirtualClock) -> None:
    async def go(r: Rig) -> None:
        await r.driver.open()
        # Something else reset the part behind the driver's back: normal-mode data registers
        # hold their reset value (the skip marker) until a conversion runs.
        r.fake.write_byte_data(ADDR, 0xE0, chip.SOFT_RESET)
        with pytest.raises(DeviceDataError, match="skipped"):
            await r.driver.read()

    Rig(vclock, Bme280Options(mode="normal")).run(go)


def test_a_temperature_whose_code_equals_the_skip_marker_is_data(vclock: VirtualClock) -> None:
    """0x80000 is also the raw code of a real temperature (about 20 degC with typical trimming):
    with pressure and humidity converted, it must read as data, not as a skipped measurement.
    The temperature of that code comes from the simulator's own compensation, not the driver's."""

    async def go(r: Rig) -> None:
        await r.driver.open()
        t_marker = sim_chip.temperature_int32(sim_chip.SKIPPED_20BIT, r.sim.calibration)[1] / 100
        r.set(temperature_c=t_marker)
        assert r.sim.adc_temperature() == chip.SKIPPED_20BIT
        values = await r.driver.read()
        assert values["temperature_c"] == t_marker

    Rig(vclock).run(go)


@pytest.mark.parametrize("code", [0x0000, 0xFFFF])
def test_humidity_code_at_the_end_of_its_range_is_refused(vclock: VirtualClock, code: int) -> None:
    """Hostile input: a wet or failed humidity element drives its ADC to an end of the range,
    which the compensation would report as 0 or 100 %RH."""

    async def go(r: Rig) -> None:
        await r.driver.open()
        r.sim.adc_humidity = lambda t_fine: code  # the element fails
        with pytest.raises(DeviceDataError, match="humidity ADC at the end of its range"):
            await r.driver.read()
        del r.sim.adc_humidity  # it dries out
        r.set(humidity_rh=0.0)  # a dry room reads 0 %RH, well inside the ADC's range
        assert_close(await r.driver.read(), r.driver, {"humidity_rh": 0.0})

    Rig(vclock).run(go)
