"""The data policy ([data], agent/sync/datapolicy.py) and the features of readings computed on
the device (agent/sync/featurize.py): the math against numpy and hand values, the policy per
link level, the source filter, and the folding of a leased batch into features records."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.sync.datapolicy import DataSettings
from agent.sync.featurize import band_energies, channel_features, fold
from agent.wire.batch import FEATURES
from agent.wire.features import FeaturesBody
from agent.wire.records import AlertBody, Kind, TelemetryBody
from drivers.base import OptionError, Options, Reading


@dataclass
class Sensor:
    name: str
    driver: str
    channels: tuple[str, ...]


SENSORS = [
    Sensor("vib_motor", "adxl345", ("vibration_rms_g",)),
    Sensor("vib_pump", "adxl345", ("vibration_rms_g",)),
    Sensor("motor", "ina219", ("current_a", "supply_v")),
    Sensor("ambient", "bme280", ("temperature_c", "humidity_rh")),
]


def data(raw: dict[str, Any]) -> DataSettings:
    return DataSettings.from_options(Options(raw, "data."), SENSORS)


# -- the math -----------------------------------------------------------------------------------


def test_hand_values() -> None:
    f = channel_features([1.0, -1.0, 1.0, -1.0])
    assert (f.mean, f.min, f.max, f.rms, f.std) == (0.0, -1.0, 1.0, 1.0, 1.0)
    assert f.kurtosis == 1.0  # a two-point distribution
    assert f.crest == 1.0
    f = channel_features([0.0, 0.0, 0.0, 4.0])
    assert (f.mean, f.rms, f.crest) == (1.0, 2.0, 2.0)
    assert f.std == pytest.approx(math.sqrt(3.0))
    # m4 / m2^2 with deviations (-1, -1, -1, 3): (1 + 1 + 1 + 81) / 4 / 3^2
    assert f.kurtosis == pytest.approx(84 / 4 / 9)
    constant = channel_features([2.5] * 10, bands=4)
    assert (constant.std, constant.kurtosis, constant.crest) == (0.0, 0.0, 1.0)
    assert constant.bands == (0.0, 0.0, 0.0, 0.0)
    zero = channel_features([0.0, 0.0])
    assert (zero.rms, zero.crest) == (0.0, 0.0)
    one = channel_features([3.0], bands=2)
    assert (one.mean, one.min, one.max, one.std, one.bands) == (3.0, 3.0, 3.0, 0.0, (0.0, 0.0))


def test_a_sine_puts_its_energy_in_its_band() -> None:
    n, fs = 256, 400.0
    t = np.arange(n) / fs
    # bin 90 (140.625 Hz, 0.70 of the 200 Hz Nyquist): band 5 of 8 (bins 81..96)
    x = 0.5 + 2.0 * np.sin(2 * np.pi * 90 * fs / n * t)
    f = channel_features(x.tolist(), bands=8)
    assert f.bands.index(max(f.bands)) == 5
    assert f.bands[5] == pytest.approx(2.0, rel=1e-5)  # amplitude^2 / 2
    assert sum(f.bands) == pytest.approx(f.std**2, rel=1e-5)


# readings as sensors give them: steps of a resolution (no denormals, whose squares vanish)
values = st.lists(st.integers(-(10**9), 10**9).map(lambda i: i / 1000), min_size=1, max_size=300)


@settings(deadline=None, max_examples=150)
@given(xs=values, bands=st.integers(1, 16))
def test_against_numpy(xs: list[float], bands: int) -> None:
    x = np.asarray(xs)
    f = channel_features(xs, bands)
    f32 = dict(rel=1e-6, abs=1e-30)  # stored as float32

    def near(got: float, want: float, scale: float) -> None:
        assert got == pytest.approx(want, rel=2e-6, abs=1e-9 * scale + 1e-30)

    scale = float(np.max(np.abs(x))) or 1.0
    assert f.min == pytest.approx(float(np.float32(x.min())), **f32)
    assert f.max == pytest.approx(float(np.float32(x.max())), **f32)
    assert f.min <= f.mean <= f.max
    near(f.mean, float(x.mean()), scale)
    near(f.rms, float(np.sqrt(np.mean(x**2))), scale)
    std = float(x.std())
    near(f.std, std, scale)
    if std > 1e-6 * scale:
        z = (x - x.mean()) / std
        assert f.kurtosis == pytest.approx(float(np.mean(z**4)), rel=1e-4)
    rms = float(np.sqrt(np.mean(x**2)))
    if rms > 0:
        assert f.crest == pytest.approx(scale / rms, rel=1e-5)
    assert len(f.bands) == bands
    # Parseval: the bands add up to the variance
    assert sum(f.bands) == pytest.approx(std**2, rel=1e-4, abs=1e-9 * scale**2 + 1e-30)


def test_band_energies_follow_the_bins() -> None:
    x = np.zeros(16)
    x[::2], x[1::2] = 1.0, -1.0  # all energy at Nyquist: the last band
    assert band_energies(x, 4) == (0.0, 0.0, 0.0, pytest.approx(1.0))


# -- the policy ---------------------------------------------------------------------------------


def test_policy_per_level() -> None:
    d = data(
        {
            "policy": {"motor/current_a": "local", "humidity_rh": "drop"},
            "low": {"policy": {"vibration_rms_g": "features"}},
            "offline": {"policy": {"vib_pump/vibration_rms_g": "features"}},
        }
    )
    assert d.policy("motor", "current_a") == "local"
    assert d.policy("motor", "current_a", "low") == "local"
    assert d.policy("ambient", "humidity_rh", "high") == "drop"
    assert d.policy("vib_motor", "vibration_rms_g", "high") == "raw"
    assert d.policy("vib_motor", "vibration_rms_g", "low") == "features"
    assert d.features_at("low") == {"vib_motor", "vib_pump"}
    assert d.features_at("offline") == {"vib_pump"}
    assert d.features_at("high") == frozenset() and d.features_at(None) == frozenset()
    assert d.vibration == {"vib_motor", "vib_pump"}
    # features in [data] hold at every level unless a level says raw
    d = data(
        {
            "policy": {"vibration_rms_g": "features"},
            "high": {"policy": {"vib_motor/vibration_rms_g": "raw"}},
        }
    )
    assert d.features_at("high") == {"vib_pump"}
    assert d.features_at("medium") == d.features_at("low") == {"vib_motor", "vib_pump"}


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"policy": {"curent_a": "local"}}, "data.policy.curent_a: no sensor has a channel"),
        ({"policy": {"current_a": "secret"}}, "data.policy.current_a: 'secret' is not"),
        ({"policy": "local"}, "data.policy: expected a table"),
        ({"low": {"policy": {"current_a": "local"}}}, "data.low.policy.current_a: 'local' is not"),
        (
            {"policy": {"current_a": "local"}, "low": {"policy": {"current_a": "raw"}}},
            "data.low.policy.current_a: motor/current_a is 'local' in [data]",
        ),
        (
            {"low": {"policy": {"current_a": "features"}}},
            "data.low.policy.motor/current_a: a features record stands for whole readings",
        ),
        ({"window": 0}, "data.window"),
        ({"bands": 65}, "data.bands"),
        ({"colour": "red"}, "data.colour"),
    ],
)
def test_bad_keys_name_their_path(raw: dict[str, Any], message: str) -> None:
    with pytest.raises(OptionError) as err:
        data(raw)
    assert message in f"{err.value.key}: {err.value.message}"


def test_a_sensor_whose_other_channels_are_local_may_be_features() -> None:
    d = data({"policy": {"supply_v": "local"}, "low": {"policy": {"current_a": "features"}}})
    assert d.features_at("low") == {"motor"}


def test_at_source() -> None:
    d = data({"policy": {"current_a": "local", "supply_v": "drop"}})
    r = Reading("motor", {"current_a": 1.5, "supply_v": 230.0}, 1, 0.0, 1.0)
    seen, queued = d.at_source(r)
    assert seen is not None and dict(seen.values) == {"current_a": 1.5}
    assert queued is None  # nothing of this reading may leave
    other = Reading("ambient", {"temperature_c": 20.0}, 2, 0.0, 1.0)
    assert d.at_source(other) == (other, other)
    assert DataSettings().at_source(r) == (r, r)
    assert d.local_channels == {("motor", "current_a")}


def test_at_send_takes_out_what_was_queued_before_a_channel_became_local() -> None:
    d = data({"policy": {"current_a": "local", "supply_v": "drop"}})
    both = TelemetryBody("motor", 1.0, {"current_a": 1.5, "supply_v": 230.0}).to_cbor()
    assert d.at_send("telemetry", both) is None  # nothing of it may leave
    amb = TelemetryBody("ambient", 1.0, {"temperature_c": 20.0}).to_cbor()
    assert d.at_send("telemetry", amb) is amb
    d = data({"policy": {"current_a": "local"}})
    sent = d.at_send("telemetry", both)
    assert sent is not None and TelemetryBody.from_cbor(sent).values == {"supply_v": 230.0}
    doc = {"score": 3.0, "channels": [["Current", 2.0], ["Pressure", 1.0]], "window": [0.5]}
    alert = AlertBody(1.0, doc).to_cbor()
    assert d.at_send("alert", alert) is alert  # no model channel read from a local one
    out = d.at_send("alert", alert, {"Current"})
    assert out is not None
    shown = AlertBody.from_cbor(out).data
    assert shown == {"score": 3.0, "channels": [["Pressure", 1.0]], "window_withheld": True}
    assert d.at_send("alert", out, {"Current"}) is out  # withheld already: sent as it is
    assert d.at_send("telemetry", b"\xff") == b"\xff"  # undecodable: the endpoint refuses it


# -- folding a batch ----------------------------------------------------------------------------


@dataclass
class Rec:
    seq: int
    kind: Kind
    created: float
    payload: bytes


def reading(seq: int, sensor: str, t: float, **values: float) -> Rec:
    return Rec(seq, Kind.TELEMETRY, t, TelemetryBody(sensor, t, values).to_cbor())


def test_fold_at_the_level_of_the_policy() -> None:
    d = data({"window": 10.0, "bands": 4, "low": {"policy": {"vibration_rms_g": "features"}}})
    batch = [reading(100 + i, "vib_motor", 1000.0 + i, vibration_rms_g=float(i)) for i in range(25)]
    batch += [reading(200, "motor", 1000.5, current_a=1.0, supply_v=230.0)]
    batch += [Rec(201, Kind.ALERT, 1001.0, AlertBody(1001.0, {"score": 1.0}).to_cbor())]
    assert [w.seq for w in fold(batch, d, "high")] == [r.seq for r in batch]  # all raw
    out = fold(batch, d, "low")
    assert [w.seq for w in out[:2]] == [200, 201]
    feats = [FeaturesBody.from_cbor(w.body) for w in out if w.kind == FEATURES]
    # windows of 10 s from the epoch: 1000..1009, 1010..1019, 1020..1024
    assert [f.seqs for f in feats] == [
        tuple(range(100, 110)),
        tuple(range(110, 120)),
        tuple(range(120, 125)),
    ]
    assert feats[0].channels["vibration_rms_g"].mean == 4.5
    assert len(feats[0].channels["vibration_rms_g"].bands) == 4
    assert (feats[0].t0, feats[0].t1) == (1000.0, 1009.0)
    assert [w.seq for w in out[2:]] == [100, 110, 120]


def test_fold_by_samples_and_by_channel_set() -> None:
    d = data(
        {
            "window_samples": 4,
            "low": {"policy": {"temperature_c": "features", "humidity_rh": "features"}},
        }
    )
    batch = [
        reading(i, "ambient", 50.0 + i, temperature_c=20.0, humidity_rh=40.0) for i in range(6)
    ]
    batch.append(reading(6, "ambient", 57.0, temperature_c=21.0))  # a partial read
    feats = [FeaturesBody.from_cbor(w.body) for w in fold(batch, d, "low")]
    assert sorted(f.seqs for f in feats) == [(0, 1, 2, 3), (4, 5), (6,)]
    assert all(not c.bands for f in feats for c in f.channels.values())  # not vibration


def test_a_window_that_does_not_summarize_goes_as_readings() -> None:
    d = data({"low": {"policy": {"vibration_rms_g": "features"}}})
    batch = [
        reading(1, "vib_pump", 10.0, vibration_rms_g=1e308),
        reading(2, "vib_pump", 11.0, vibration_rms_g=-1e308),
    ]
    out = fold(batch, d, "low")
    assert [w.kind for w in out] == ["telemetry", "telemetry"]
