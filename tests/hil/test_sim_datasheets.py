"""Known answers from the datasheets, for each part's simulator and for its driver reading it.

Every simulator in ``drivers/sim/`` is written from its part's datasheet alone (it imports
nothing of the driver), so each check here runs twice, once per side: the simulator's forward
conversion (physical value -> register bytes) against the datasheet's worked example or table,
and the driver decoding the simulator's registers against the same numbers. A mistake on either
side fails a test here even when the two sides happen to agree with each other.

Sources, with the values used:

- BME280: the Bosch compensation example of the BMP280 data sheet (BST-BMP280-DS001, section 3.12;
  the BME280 shares the temperature and pressure routines): dig_T1..dig_P9 = 27504, 26435,
  -1000, 36477, -10685, 3024, 2855, 140, -7, 15500, -14600, 6000; adc_T = 519888 gives
  var1 = 128793.1787, var2 = -370.8917052, t_fine = 128422, T = 25.08 degC; adc_P = 415148 gives
  p = 100653.27 Pa. Bosch publishes no humidity example (neither data sheet has one); the
  humidity value is computed by hand from the BME280 formula (DS002 section 8.1), see
  :func:`test_bme280_humidity_hand_computed_from_the_double_formula`.
- INA219: SBOS448F table 3, "Configure/Measure/Calculate Example" (rev. G section 8.5.1 gives the
  same equations): 10 A through 2 mOhm, VCM 12 V, 40 mV shunt range, 16 V bus range.
- ADS1115: SBAS444 "Full-Scale Range and Corresponding LSB Size" and the ideal output codes.
- ADXL345: data sheet rev. D, table 1 (3.9 mg/LSB in full resolution) and register 0x31 (10 to
  13 significant bits, sign-extended when right justified, left justified on request).
- MCP9600: DS20005426 registers 5-2 to 5-4 and equations 5-1 to 5-3 (0.0625 degC/LSB, two's
  complement), register 5-12 (device ID 0x40, revision 1.0).
"""

from __future__ import annotations

import ast
import math
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.errors import DeviceDataError
from drivers import bme280 as drv_bme280
from drivers.ads1115 import Ads1115
from drivers.adxl345 import Adxl345, Adxl345Options
from drivers.base import Options
from drivers.bme280 import Bme280, Bme280Options
from drivers.bus import AsyncI2C
from drivers.clock import VirtualClock
from drivers.ina219 import Ina219, Ina219Options, calibration_value, choose_current_lsb
from drivers.mcp9600 import Mcp9600
from drivers.sim import ads1115 as sim_ads1115
from drivers.sim import adxl345 as sim_adxl345
from drivers.sim import bme280 as sim_bme280
from drivers.sim import ina219 as sim_ina219
from drivers.sim import mcp9600 as sim_mcp9600
from drivers.sim.smbus import FakeSMBus, SimDevice

ROOT = Path(__file__).resolve().parents[2]
SIMULATORS = ("bme280", "adxl345", "ads1115", "ina219", "mcp9600")


def run_driver(clock: VirtualClock, part: SimDevice, address: int, make: Any, go: Any) -> Any:
    """Attach ``part`` to a fake bus, build the driver with ``make(device)`` and run ``go``."""
    fake = FakeSMBus()
    fake.attach(address, part)
    bus = AsyncI2C(fake, clock)
    try:
        return clock.run(go(make(bus.device(address))))
    finally:
        bus.close()


def word(fake: FakeSMBus, address: int, register: int) -> int:
    return int.from_bytes(bytes(fake.read_i2c_block_data(address, register, 2)), "big")


# --------------------------------------------------------------------------------------------
# The rule these tests rely on


@pytest.mark.parametrize("part", SIMULATORS)
def test_simulator_imports_nothing_of_its_driver(part: str) -> None:
    """A simulator may import the standard library, numpy and the simulation seams only."""
    tree = ast.parse((ROOT / "drivers" / "sim" / f"{part}.py").read_text(encoding="utf-8"))
    allowed = ("drivers.clock", "drivers.errors", "drivers.sim.")
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, "relative imports hide what is imported"
            names = [node.module or ""]
        else:
            continue
        for name in names:
            top = name.split(".")[0]
            if top in ("drivers", "agent", "cloud"):
                assert name.startswith(allowed), f"drivers/sim/{part}.py imports {name}"


# --------------------------------------------------------------------------------------------
# BME280 (BMP280 DS001 section 3.12 example; BME280 DS002 sections 4.2.2, 4.2.3, 8.1, 9.1)

BOSCH_EXAMPLE = sim_bme280.Calibration(
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
    # Not part of the BMP280 example: typical BME280 humidity trimming, for the hand example.
    dig_H1=75,
    dig_H2=370,
    dig_H3=0,
    dig_H4=313,
    dig_H5=50,
    dig_H6=30,
)
ADC_T, ADC_P, T_FINE, DEG_C, PASCAL = 519888, 415148, 128422, 25.08, 100653.27
#: The hand-computed humidity example (see the test below).
ADC_H, HUMIDITY_RH = 30000, 56.2063


def test_bme280_sim_double_formulas_give_the_worked_example() -> None:
    t_fine, deg_c = sim_bme280.temperature_double(ADC_T, BOSCH_EXAMPLE)
    assert t_fine == T_FINE
    assert deg_c * 5120 == pytest.approx(128793.1787 - 370.8917052, abs=1e-4)  # var1 + var2
    assert round(deg_c, 2) == DEG_C
    # The example's 100653.27 Pa keeps t_fine = var1 + var2 unrounded; the code of DS 8.1
    # passes the truncated t_fine, which moves the result by 0.01 Pa.
    assert round(sim_bme280.pressure_double(ADC_P, deg_c * 5120, BOSCH_EXAMPLE), 2) == PASCAL
    assert sim_bme280.pressure_double(ADC_P, t_fine, BOSCH_EXAMPLE) == pytest.approx(
        PASCAL, abs=0.02
    )


def test_bme280_sim_integer_routines_give_the_worked_example() -> None:
    """DS 4.2.3: the 32-bit temperature routine in 0.01 degC, the 64-bit pressure routine in
    Q24.8 Pa; they agree with the double-precision example within their output steps."""
    assert sim_bme280.temperature_int32(ADC_T, BOSCH_EXAMPLE) == (T_FINE, 2508)
    q24_8 = sim_bme280.pressure_int64(ADC_P, T_FINE, BOSCH_EXAMPLE)
    assert q24_8 / 256 == pytest.approx(PASCAL, abs=0.02)


def test_bme280_humidity_hand_computed_from_the_double_formula() -> None:
    """No worked humidity example exists in Bosch's data sheets, so this one is computed by hand
    from DS002 section 8.1 (bme280_compensate_H_double) with t_fine = 128422 from the
    temperature example, adc_H = 30000 and dig_H1..dig_H6 = 75, 370, 0, 313, 50, 30:

    - var_H = t_fine - 76800 = 51622
    - dig_H4 * 64 + dig_H5 / 16384 * var_H = 20032 + 157.53784 = 20189.53784
    - adc_H - that = 9810.46216
    - dig_H2 / 65536 * (1 + dig_H6 / 67108864 * var_H * (1 + dig_H3 / 67108864 * var_H))
      = 0.00564575 * (1 + 0.02307683 * 1) = 0.00577604
    - var_H = 9810.46216 * 0.00577604 = 56.66560
    - var_H * (1 - dig_H1 * var_H / 524288) = 56.66560 * (1 - 0.00810608) = 56.2063 %RH

    The 32-bit integer routine (DS 4.2.3) gives 57552 / 1024 = 56.2031 %RH for the same input:
    it drops the lowest ADC bit and truncates, within 0.005 %RH of the double result.
    """
    assert sim_bme280.humidity_double(ADC_H, T_FINE, BOSCH_EXAMPLE) == pytest.approx(
        HUMIDITY_RH, abs=1e-4
    )
    assert sim_bme280.humidity_int32(ADC_H, T_FINE, BOSCH_EXAMPLE) / 1024 == pytest.approx(
        HUMIDITY_RH, abs=0.005
    )
    driver_cal = drv_bme280.Calibration(**asdict(BOSCH_EXAMPLE))
    assert drv_bme280.compensate_humidity(ADC_H, T_FINE, driver_cal) == pytest.approx(
        HUMIDITY_RH, abs=0.005
    )


def test_bme280_sim_forward_conversion_lands_on_the_example_codes(vclock: VirtualClock) -> None:
    part = sim_bme280.Bme280Sim(vclock, calibration=BOSCH_EXAMPLE)
    part.set_channel("temperature_c", DEG_C)
    part.set_channel("pressure_hpa", PASCAL / 100)
    part.set_channel("humidity_rh", HUMIDITY_RH)
    # 25.08 degC is a plateau of about 30 codes in the 0.01 degC routine; 519888 is on it.
    adc_t = part.adc_temperature()
    assert abs(adc_t - ADC_T) < 32
    assert sim_bme280.temperature_int32(adc_t, BOSCH_EXAMPLE)[1] == 2508
    assert part.adc_pressure(T_FINE) == ADC_P
    assert part.adc_humidity(T_FINE) == ADC_H


def test_bme280_sim_nvm_layout_is_table_16() -> None:
    nvm = sim_bme280.encode_calibration(BOSCH_EXAMPLE)
    assert [nvm[a] for a in range(0x88, 0x8E)] == [0x70, 0x6B, 0x43, 0x67, 0x18, 0xFC]
    assert [nvm[0x9C], nvm[0x9D]] == [0xF8, 0xC6]  # dig_P8 = -14600 = 0xC6F8, LSB first
    assert [nvm[a] for a in range(0xE1, 0xE8)] == [0x72, 0x01, 0x00, 0x13, 0x29, 0x03, 0x1E]
    negative = sim_bme280.Calibration(**{**asdict(BOSCH_EXAMPLE), "dig_H4": -20, "dig_H5": -30})
    nvm = sim_bme280.encode_calibration(negative)
    assert [nvm[0xE4], nvm[0xE5], nvm[0xE6]] == [0xFE, 0x2C, 0xFE]  # 0xFEC and 0xFE2


def test_bme280_sim_timing_and_reset_values(vclock: VirtualClock) -> None:
    # DS 9.1 example: osrs_t x1, osrs_p x4, humidity skipped: 13.325 ms maximum (11.5 typical).
    assert sim_bme280.measurement_time_max_s(1, 4, 0) == pytest.approx(0.013325)
    assert sim_bme280.measurement_time_max_s(16, 16, 16) == pytest.approx(0.1128)
    fake = FakeSMBus()
    fake.attach(0x76, sim_bme280.Bme280Sim(vclock))
    assert fake.read_byte_data(0x76, 0xD0) == 0x60  # DS 5.4.1
    assert fake.read_i2c_block_data(0x76, 0xF7, 8) == [0x80, 0, 0, 0x80, 0, 0, 0x80, 0]


def test_bme280_driver_reads_the_example_through_the_simulator(vclock: VirtualClock) -> None:
    part = sim_bme280.Bme280Sim(vclock, calibration=BOSCH_EXAMPLE)
    part.set_channel("temperature_c", DEG_C)
    part.set_channel("pressure_hpa", PASCAL / 100)
    part.set_channel("humidity_rh", HUMIDITY_RH)
    options = Bme280Options(oversampling_t=16, oversampling_p=16, oversampling_h=16)

    async def go(driver: Bme280) -> dict[str, float]:
        await driver.open()
        assert driver.calibration is not None
        assert asdict(driver.calibration) == asdict(BOSCH_EXAMPLE)  # decoded from the NVM
        values = await driver.read()
        assert abs(values["pressure_hpa"] - PASCAL / 100) <= driver.resolution("pressure_hpa")
        assert abs(values["humidity_rh"] - HUMIDITY_RH) <= driver.resolution("humidity_rh")
        return values

    values = run_driver(vclock, part, 0x76, lambda d: Bme280(d, options), go)
    assert values["temperature_c"] == DEG_C


# --------------------------------------------------------------------------------------------
# INA219 (SBOS448F table 3; SBOS448G 8.5.1 and 8.6)

SHUNT_OHMS, MAX_AMPS, LOAD_AMPS, BUS_V = 0.002, 10.0, 10.0, 11.98
EXAMPLE_CONFIG, EXAMPLE_CAL = 0x019F, 0x5000
EXAMPLE_SHUNT, EXAMPLE_BUS, EXAMPLE_CURRENT, EXAMPLE_POWER = 0x07D0, 0x5D98, 0x2710, 0x1766


def test_ina219_calibration_equations() -> None:
    """8.5.1: Current_LSB between Max_Expected_Current / 2**15 (305.2 uA) and / 2**12
    (2.44 mA); the example picks 1 mA; Cal = trunc(0.04096 / (Current_LSB x R_shunt)) = 20480;
    Power_LSB = 20 x Current_LSB = 20 mW."""
    minimum_lsb, maximum_lsb = MAX_AMPS / 2**15, MAX_AMPS / 2**12
    assert (minimum_lsb, maximum_lsb) == pytest.approx((305.18e-6, 2.4414e-3), rel=1e-4)
    assert math.trunc(0.04096 / (1e-3 * SHUNT_OHMS) + 1e-9) == 20480 == EXAMPLE_CAL
    assert calibration_value(1e-3, SHUNT_OHMS) == EXAMPLE_CAL  # the driver's equation
    chosen = choose_current_lsb(MAX_AMPS, SHUNT_OHMS)  # the driver's own pick for 10 A
    assert minimum_lsb <= chosen <= maximum_lsb


def test_ina219_sim_chip_math_is_the_example() -> None:
    assert sim_ina219.current_counts(0x07D0, EXAMPLE_CAL) == EXAMPLE_CURRENT  # 2000*20480/4096
    assert sim_ina219.power_counts(EXAMPLE_CURRENT, 0x0BB3) == EXAMPLE_POWER  # 10000*2995/5000
    assert sim_ina219.current_counts(-0x07D0, EXAMPLE_CAL) == -EXAMPLE_CURRENT


def test_ina219_sim_registers_after_the_example_conversion(vclock: VirtualClock) -> None:
    fake = FakeSMBus()
    part = fake.attach(0x40, sim_ina219.Ina219Sim(vclock, shunt_ohms=SHUNT_OHMS))
    assert word(fake, 0x40, 0x00) == 0x399F  # POR
    fake.write_i2c_block_data(0x40, 0x05, list(EXAMPLE_CAL.to_bytes(2, "big")))  # step 4
    fake.write_i2c_block_data(0x40, 0x00, list(EXAMPLE_CONFIG.to_bytes(2, "big")))  # step 1
    part.set_channel("current_a", LOAD_AMPS)
    part.set_channel("bus_voltage_v", BUS_V)
    vclock.advance(2 * 532e-6 + 1e-6)  # 12-bit shunt then bus conversion
    assert word(fake, 0x40, 0x01) == EXAMPLE_SHUNT  # step 2: 2000 x 10 uV = 20 mV
    assert word(fake, 0x40, 0x04) == EXAMPLE_CURRENT  # step 5: 10000 x 1 mA
    assert word(fake, 0x40, 0x03) == EXAMPLE_POWER  # step 6: 5990 x 20 mW; clears CNVR
    assert word(fake, 0x40, 0x02) == EXAMPLE_BUS  # step 3: 2995 x 4 mV in bits 15..3
    assert word(fake, 0x40, 0x05) == EXAMPLE_CAL


def test_ina219_driver_reads_the_example_through_the_simulator(vclock: VirtualClock) -> None:
    options = Ina219Options(
        shunt_ohms=SHUNT_OHMS,
        max_current_a=MAX_AMPS,
        bus_range_v=16,
        pga_mv=40,
        current_lsb=1e-3,
        calibration=EXAMPLE_CAL,
    )
    part = sim_ina219.Ina219Sim(vclock, options)

    async def go(driver: Ina219) -> dict[str, float]:
        assert driver.config == EXAMPLE_CONFIG
        await driver.open()
        part.set_channel("current_a", LOAD_AMPS)
        part.set_channel("bus_voltage_v", BUS_V)
        await vclock.sleep(driver.conversion_time)
        return await driver.read()

    values = run_driver(vclock, part, 0x40, lambda d: Ina219(d, options), go)
    assert values["shunt_voltage_v"] == pytest.approx(0.020, abs=1e-9)
    assert values["bus_voltage_v"] == pytest.approx(11.98, abs=1e-9)
    assert values["current_a"] == pytest.approx(10.0, abs=1e-9)
    assert values["power_w"] == pytest.approx(119.8, abs=1e-9)


# --------------------------------------------------------------------------------------------
# ADS1115 (SBAS444 "Full-Scale Range and Corresponding LSB Size", "Data Format")

LSB_UV = {6.144: 187.5, 4.096: 125.0, 2.048: 62.5, 1.024: 31.25, 0.512: 15.625, 0.256: 7.8125}


def test_ads1115_sim_lsb_table_and_output_codes() -> None:
    assert {fsr: sim_ads1115.lsb_volts(fsr) * 1e6 for fsr in LSB_UV} == pytest.approx(LSB_UV)
    assert sim_ads1115.FSR_VOLTS[:6] == tuple(LSB_UV)  # PGA codes 000..101
    fs = 2.048
    code = sim_ads1115.output_code
    assert code(fs * (2**15 - 1) / 2**15, fs) == 0x7FFF
    assert code(fs, fs) == 0x7FFF and code(3.0, fs) == 0x7FFF  # at and beyond +FS
    assert code(fs / 2**15, fs) == 0x0001
    assert code(0.0, fs) == 0
    assert code(-fs / 2**15, fs) & 0xFFFF == 0xFFFF
    assert code(-fs, fs) & 0xFFFF == 0x8000 and code(-3.0, fs) & 0xFFFF == 0x8000


def test_ads1115_sim_conversion_register_bytes(vclock: VirtualClock) -> None:
    fake = FakeSMBus()
    part = fake.attach(0x48, sim_ads1115.Ads1115Sim(vclock))
    assert word(fake, 0x48, 0x01) == 0x8583  # Config POR
    assert (word(fake, 0x48, 0x02), word(fake, 0x48, 0x03)) == (0x8000, 0x7FFF)
    # MUX 000 (AIN0 - AIN1), PGA 010 (+-2.048 V), single shot, 860 SPS: 0x85E3 with OS = 1.
    for ain0, ain1, expected in (
        (2.048, 0.0, 0x7FFF),
        (62.5e-6, 0.0, 0x0001),
        (0.0, 62.5e-6, 0xFFFF),
        (0.0, 2.048, 0x8000),
        (1.0, 0.25, 12000),  # 0.75 V / 62.5 uV
    ):
        part.set_channel("ain0_v", ain0)
        part.set_channel("ain1_v", ain1)
        fake.write_i2c_block_data(0x48, 0x01, [0x85, 0xE3])
        vclock.advance(1 / 860 + 1e-6)
        assert word(fake, 0x48, 0x00) == expected


def test_ads1115_driver_reads_the_codes_through_the_simulator(vclock: VirtualClock) -> None:
    options = Ads1115.parse_options(Options({"pga": 2.048, "inputs": [0], "data_rate": 860}))
    part = sim_ads1115.Ads1115Sim(vclock, options)

    async def go(driver: Ads1115) -> list[float]:
        await driver.open()
        read = []
        for volts in (62.5e-6, -62.5e-6, 1.0, 2.048 * (2**15 - 2) / 2**15):
            part.set_channel("ain0_v", volts)
            read.append((await driver.read())["ain0_v"])
        part.set_channel("ain0_v", 2.048)  # code 0x7FFF: at full scale, not a value
        with pytest.raises(DeviceDataError, match="saturated"):
            await driver.read()
        return read

    read = run_driver(vclock, part, 0x48, lambda d: Ads1115(d, options), go)
    # -62.5 uV is below GND: the input clamp allows 0.3 V, so the code is 0xFFFF.
    assert read == pytest.approx([62.5e-6, -62.5e-6, 1.0, 2.048 * 32766 / 32768], abs=1e-12)


# --------------------------------------------------------------------------------------------
# ADXL345 (data sheet rev. D: table 1, register 0x31, "Data formatting of upper data rates")


def test_adxl345_sim_scale_and_word_width_table() -> None:
    for range_g, bits in ((2, 10), (4, 11), (8, 12), (16, 13)):
        assert sim_adxl345.word_format(range_g, True) == (bits, 0.0039)
    assert [sim_adxl345.word_format(r, False)[1] for r in (2, 4, 8, 16)] == pytest.approx(
        [0.0039, 0.0078, 0.0156, 0.0312]
    )
    assert {sim_adxl345.word_format(r, False)[0] for r in (2, 4, 8, 16)} == {10}
    assert sim_adxl345.output_data_rate(0x0A) == 100.0  # BW_RATE reset value
    assert sim_adxl345.output_data_rate(0x0F) == 3200.0


def _adxl345_words(vclock: VirtualClock, data_format: int, axes: tuple[float, ...]) -> bytes:
    fake = FakeSMBus()
    part = fake.attach(0x53, sim_adxl345.Adxl345Sim(vclock))
    for name, g in zip(("x_g", "y_g", "z_g"), axes, strict=True):
        part.set_channel(name, g)
    fake.write_byte_data(0x53, 0x2C, 0x0D)  # 800 Hz: every bit valid
    fake.write_byte_data(0x53, 0x31, data_format)
    fake.write_byte_data(0x53, 0x2D, 0x08)  # measure
    vclock.advance(2 / 800)
    return bytes(fake.read_i2c_block_data(0x53, 0x32, 6))


def test_adxl345_sim_output_words(vclock: VirtualClock) -> None:
    # Full resolution +-16 g, right justified: 3.9 mg/LSB, 13 bits sign-extended to 16.
    raw = _adxl345_words(vclock, 0x0B, (0.5, -0.25, -1.0))
    assert raw == bytes([0x80, 0x00, 0xC0, 0xFF, 0x00, 0xFF])  # 128, -64, -256 LSB
    raw = _adxl345_words(vclock, 0x0B, (16.0, -16.0, 0.0))  # saturated: 4095 and -4096
    assert raw[:4] == bytes([0xFF, 0x0F, 0x00, 0xF0])
    # Left justified: the 13-bit code in bits 15..3.
    raw = _adxl345_words(vclock, 0x0B | 0x04, (0.0, 0.0, -1.0))
    assert int.from_bytes(raw[4:], "little", signed=True) == -256 << 3
    # 10-bit +-2 g: 3.9 mg/LSB, saturating at 511 / -512.
    raw = _adxl345_words(vclock, 0x00, (1.0, -3.0, 3.0))
    assert [int.from_bytes(raw[i : i + 2], "little", signed=True) for i in (0, 2, 4)] == [
        256,
        -512,
        511,
    ]
    # 10-bit +-16 g: 31.2 mg/LSB.
    raw = _adxl345_words(vclock, 0x03, (1.0, 0.0, -1.0))
    assert int.from_bytes(raw[:2], "little", signed=True) == round(1.0 / 0.0312)


def test_adxl345_driver_reads_the_codes_through_the_simulator(vclock: VirtualClock) -> None:
    options = Adxl345Options(range_g=16, full_resolution=True, data_rate_hz=800.0, window=32)
    part = sim_adxl345.Adxl345Sim(vclock)
    part.set_channel("x_g", 0.5)
    part.set_channel("y_g", -0.25)
    part.set_channel("z_g", -1.0)

    async def go(driver: Adxl345) -> dict[str, float]:
        await driver.open()
        return await driver.read()

    values = run_driver(vclock, part, 0x53, lambda d: Adxl345(d, options), go)
    assert values["x_g"] == pytest.approx(128 * 0.0039)
    assert values["y_g"] == pytest.approx(-64 * 0.0039)
    assert values["z_g"] == pytest.approx(-256 * 0.0039)
    assert values["vibration_rms_g"] == pytest.approx(0.0, abs=1e-12)


# --------------------------------------------------------------------------------------------
# MCP9600 (DS20005426 registers 5-2 to 5-4, equations 5-1 to 5-3, register 5-12)

#: (degrees Celsius, register word) pairs that follow from equation 5-1.
TEMPERATURE_WORDS = (
    (25.0, 0x0190),
    (-9.0, 0xFF70),
    (-0.0625, 0xFFFF),
    (1365.75, 0x555C),
    (-25.25, 0xFE6C),
    (2047.9375, 0x7FFF),
    (-2048.0, 0x8000),
)


def equation_5_1(upper: int, lower: int) -> float:
    """DS20005426 equation 5-1, as printed: UpperByte x 16 + LowerByte / 16, less 4096 below 0."""
    value = upper * 16 + lower / 16
    return value - 4096 if upper & 0x80 else value


def test_mcp9600_sim_temperature_encoding() -> None:
    for deg_c, expected in TEMPERATURE_WORDS:
        raw = sim_mcp9600.temperature_bytes(sim_mcp9600.temperature_counts(deg_c))
        assert raw == expected.to_bytes(2, "big")
        assert equation_5_1(raw[0], raw[1]) == deg_c


@settings(max_examples=200, deadline=None)
@given(counts=st.integers(-(1 << 15), (1 << 15) - 1))
def test_mcp9600_sim_encoding_is_equation_5_1_inverted(counts: int) -> None:
    raw = sim_mcp9600.temperature_bytes(sim_mcp9600.temperature_counts(counts * 0.0625))
    assert equation_5_1(raw[0], raw[1]) == counts * 0.0625


def test_mcp9600_sim_registers(vclock: VirtualClock) -> None:
    fake = FakeSMBus()
    part = fake.attach(0x60, sim_mcp9600.Mcp9600Sim(vclock))
    assert word(fake, 0x60, 0x20) == 0x4010  # device ID 0x40, revision 1.0
    part.set_channel("cold_junction_c", -9.0)
    part.set_channel("hot_junction_c", 25.0)
    vclock.advance(0.321)  # 18-bit ADC: 320 ms
    assert word(fake, 0x60, 0x02) == 0xFF70  # TC: sign bits 15..12 set
    assert word(fake, 0x60, 0x00) == 0x0190  # TH = 25.0 degC
    assert word(fake, 0x60, 0x01) == 0x0220  # TDelta = 34.0 degC
    assert fake.read_i2c_block_data(0x60, 0x04, 1)[0] & 0x40  # TH Update


def test_mcp9600_driver_reads_the_words_through_the_simulator(vclock: VirtualClock) -> None:
    options = Mcp9600.parse_options(Options({}))
    part = sim_mcp9600.Mcp9600Sim(vclock, options)
    part.set_channel("cold_junction_c", -9.0)
    part.set_channel("hot_junction_c", 25.0)

    async def go(driver: Mcp9600) -> tuple[str, dict[str, float]]:
        identity = await driver.open()
        await vclock.sleep(driver.conversion_period)
        return identity.detail, await driver.read()

    detail, values = run_driver(vclock, part, 0x60, lambda d: Mcp9600(d, options), go)
    assert "revision 1.0" in detail
    assert values == {"hot_junction_c": 25.0, "cold_junction_c": -9.0, "delta_c": 34.0}
