"""The streaming detector (agent/detect/detector.py) with the shipped int8 models in the real
interpreter.

Rows are synthetic: normal running is noise around SKAB-like levels, a fault is a step on one
channel. The real SKAB data is exercised in test_evaluate.py.
"""

from __future__ import annotations

from pathlib import Path

import cbor2
import numpy as np
import pytest

from agent.detect.changepoint import ChangeSettings
from agent.detect.detector import (
    Alert,
    AlertKind,
    Detector,
    DetectSettings,
    Hysteresis,
    Verdict,
)
from agent.detect.features import CHANNELS, calibrate, transform, windows
from agent.detect.inference import TFLiteModel, load_manifest
from agent.detect.novelty import NoveltyScore, NoveltySettings
from agent.errors import ModelError
from drivers.base import OptionError, Options

ROOT = Path(__file__).resolve().parents[3]
MODELS = ROOT / "models"
LEVEL = np.array([0.21, 0.27, 2.4, 0.1, 89.0, 28.0, 229.0, 125.0])
NOISE = np.array([0.002, 0.002, 0.45, 0.25, 0.1, 0.01, 10.0, 0.5])
FLOW = CHANNELS.index("Volume Flow RateRMS")


@pytest.fixture(scope="module")
def manifest():
    return load_manifest(MODELS)


@pytest.fixture(scope="module")
def models(manifest):
    return (
        TFLiteModel.open(manifest, "skab-ae"),
        TFLiteModel.open(manifest, "skab-clf"),
    )


def make(manifest, models, **overrides) -> Detector:
    """A detector on the shipped models. These tests are about anomaly episodes (raise and
    clear); change alerts, on by default, are tested in test_changepoint.py."""
    ae, clf = models
    overrides.setdefault("changepoint", ChangeSettings(alerts=False))
    settings = DetectSettings(**overrides)
    return Detector.from_entry(
        ae,
        manifest.entry("skab-ae").raw,
        settings=settings,
        classifier=clf if settings.classifier else None,
        classes=manifest.entry("skab-clf").raw["classes"],
    )


def normal_rows(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return LEVEL + rng.normal(size=(n, len(LEVEL))) * NOISE


def fault_run(seed: int = 0, start: int = 500, end: int = 700, n: int = 900) -> np.ndarray:
    """Normal running with the flow 15 % down between ``start`` and ``end``."""
    rows = normal_rows(n, seed)
    rows[start:end, FLOW] -= 0.15 * LEVEL[FLOW]
    return rows


# --- hysteresis ---------------------------------------------------------------------------------
def test_hysteresis_raises_after_k_and_clears_after_m() -> None:
    h = Hysteresis(raise_after=3, clear_after=4)
    seq = [1, 1, 0, 1, 1, 1, 0, 0, 1, 0, 0, 0, 0, 1]
    out = [h.update(bool(v)) for v in seq]
    assert out[5] is AlertKind.RAISE and out[12] is AlertKind.CLEAR
    assert [i for i, o in enumerate(out) if o] == [5, 12]
    active = []
    h2 = Hysteresis(3, 4)
    for v in seq:
        h2.update(bool(v))
        active.append(h2.active)
    assert active == [False] * 5 + [True] * 7 + [False, False]


def test_hysteresis_validates() -> None:
    with pytest.raises(ValueError):
        Hysteresis(0, 1)


# --- detector -----------------------------------------------------------------------------------
def test_commissioning_gives_no_alerts(manifest, models) -> None:
    det = make(manifest, models)
    n = det.spec.commissioning
    wild = normal_rows(n)
    wild[100:150, FLOW] *= 0.5  # whatever happens during commissioning is "normal"
    res = det.feed(np.arange(n, dtype=float), wild)
    assert res.alerts == [] and not res.anomalous.any() and np.isnan(res.scores).all()
    assert det.commissioned and det.calibration is not None
    assert det.calibration.samples == n
    # the next row is scored at once (the commissioning tail primes the features)
    det.push(float(n), normal_rows(1, seed=9)[0])
    assert np.isfinite(det.last_score)


def test_commissioning_length_from_settings(manifest, models) -> None:
    det = make(manifest, models, commissioning_samples=120)
    det.feed(np.arange(119.0), normal_rows(119))
    assert not det.commissioned
    det.push(119.0, normal_rows(1)[0])
    assert det.commissioned


def test_normal_running_stays_quiet(manifest, models) -> None:
    det = make(manifest, models)
    res = det.feed(np.arange(1500.0), normal_rows(1500, seed=3))
    assert res.alerts == []
    assert np.nanmax(res.scores) < det.threshold


def test_fault_raises_then_clears_with_hysteresis(manifest, models) -> None:
    det = make(manifest, models)
    rows = fault_run()
    times = np.arange(len(rows), dtype=float) + 1000.0
    res = det.feed(times, rows)
    kinds = [a.kind for a in res.alerts]
    assert kinds == [AlertKind.RAISE, AlertKind.CLEAR]
    k, m = det.hysteresis.raise_after, det.hysteresis.clear_after
    above = res.scores > det.threshold
    raise_i = int(np.searchsorted(times, res.alerts[0].time))
    clear_i = int(np.searchsorted(times, res.alerts[1].time))
    # raised on the k-th consecutive exceedance, the first such run after the fault began
    assert above[raise_i - k + 1 : raise_i + 1].all()
    runs = [i for i in range(k - 1, len(above)) if above[i - k + 1 : i + 1].all()]
    assert runs[0] == raise_i
    assert 500 <= raise_i < 560
    # cleared on the m-th consecutive non-exceedance after the fault ended
    assert (~above[clear_i - m + 1 : clear_i + 1]).all()
    assert 700 <= clear_i < 700 + m + 40
    assert res.anomalous[raise_i:clear_i].all() and not res.anomalous[:raise_i].any()
    assert not res.anomalous[clear_i:].any()


def test_top_channel_is_the_faulty_one(manifest, models) -> None:
    det = make(manifest, models)
    res = det.feed(np.arange(900.0), fault_run(seed=1))
    raised = res.alerts[0]
    assert raised.channels[0][0] == "Volume Flow RateRMS"
    assert raised.channels[0][1] > det.threshold
    assert [c for c, _ in raised.channels] == sorted(
        (c for c, _ in raised.channels), key=dict(raised.channels).get, reverse=True
    )
    assert len(raised.channels) == 3
    assert raised.score == pytest.approx(raised.channels[0][1])


def test_push_equals_feed(manifest, models) -> None:
    rows = fault_run(seed=2)
    a = make(manifest, models)
    res = a.feed(np.arange(len(rows), dtype=float), rows)
    b = make(manifest, models)
    alerts = []
    decided = []
    for t, r in enumerate(rows):
        alerts += b.push(float(t), r)
        decided.append(b.anomalous)
    assert [x.to_dict() for x in alerts] == [x.to_dict() for x in res.alerts]
    np.testing.assert_array_equal(np.array(decided), res.anomalous)
    # and in uneven blocks
    c = make(manifest, models)
    got = []
    for lo, hi in ((0, 7), (7, 399), (399, 401), (401, 650), (650, len(rows))):
        got += c.feed(np.arange(lo, hi, dtype=float), rows[lo:hi]).alerts
    assert [x.to_dict() for x in got] == [x.to_dict() for x in res.alerts]


def test_verdicts(manifest, models) -> None:
    _, clf = models
    rows = fault_run(seed=4)
    # confidence 0: whatever fault class the classifier prefers is taken as known
    # confidence 1: an int8 softmax never reaches 1.0, so the verdict is always "novel"
    sure = make(manifest, models, classifier_confidence=0.0)
    unsure = make(manifest, models, classifier_confidence=1.0)
    no_clf = make(manifest, models, classifier="")
    sure_alerts = sure.feed(np.arange(900.0), rows).alerts
    a1 = sure_alerts[0]
    a2 = unsure.feed(np.arange(900.0), rows).alerts[0]
    a3 = no_clf.feed(np.arange(900.0), rows).alerts[0]
    assert a2.verdict is Verdict.NOVEL_ANOMALY and a2.fault is None and 0 < a2.confidence < 1
    assert a3.verdict is Verdict.NOVEL_ANOMALY and a3.confidence == 0.0
    assert a1.time == a2.time == a3.time
    # recompute the classifier's view of the raising window
    spec = sure.spec
    i = int(a1.time)
    u = transform(spec, calibrate(spec, rows[:400]), rows[: i + 1])
    probs = clf.predict(windows(spec, u)[-1].reshape(1, -1))[0]
    classes = manifest.entry("skab-clf").raw["classes"]
    best = classes[int(np.argmax(probs))]
    assert a1.confidence == pytest.approx(float(probs.max()))
    if best == "normal":
        assert a1.verdict is Verdict.NOVEL_ANOMALY
    else:
        assert a1.verdict is Verdict.KNOWN_FAILURE and a1.fault == best
    # the clear repeats its episode's verdict
    assert sure_alerts[1].kind is AlertKind.CLEAR
    assert (sure_alerts[1].verdict, sure_alerts[1].fault) == (a1.verdict, a1.fault)


def test_novelty_statistics_travel_with_the_alert(manifest, models) -> None:
    det = make(manifest, models)
    res = det.feed(np.arange(900.0), fault_run(seed=5))
    nov = res.alerts[0].novelty
    assert nov is not None and nov.novel
    assert det.novelty is not None and det.novelty.model is not None
    quiet = make(manifest, models, novelty=NoveltySettings(enabled=False))
    assert quiet.feed(np.arange(900.0), fault_run(seed=5)).alerts[0].novelty is None


def test_feed_validates_rows(manifest, models) -> None:
    det = make(manifest, models)
    with pytest.raises(ValueError):
        det.feed([0.0], [[1.0, 2.0]])
    with pytest.raises(ValueError):
        det.feed([0.0], [[np.nan] * 8])


def test_alert_round_trip() -> None:
    a = Alert(
        time=1.5e9,
        kind=AlertKind.RAISE,
        score=2.5,
        threshold=1.0,
        channels=(("Volume Flow RateRMS", 2.5), ("Current", 0.25)),
        verdict=Verdict.KNOWN_FAILURE,
        fault="valve",
        confidence=0.93,
        novelty=NoveltyScore(12.0, 3.5, 9.2, 2.0),
        model="skab-ae",
    )
    d = a.to_dict()
    assert Alert.from_dict(d) == a
    assert Alert.from_dict(cbor2.loads(cbor2.dumps(d))) == a
    b = Alert(0.0, AlertKind.CLEAR, 0.1, 1.0, (), Verdict.NOVEL_ANOMALY)
    assert Alert.from_dict(cbor2.loads(cbor2.dumps(b.to_dict()))) == b
    assert d["kind"] == "raise" and d["verdict"] == "known_failure"


# --- settings -----------------------------------------------------------------------------------
def test_settings_defaults_and_full_table(tmp_path: Path) -> None:
    d = DetectSettings.from_options(Options({}, prefix="detect."))
    assert d == DetectSettings()
    s = DetectSettings.from_options(
        Options(
            {
                "models_dir": "m",
                "model": "skab-ae-lite",
                "classifier": "",
                "runtime": "tflite-runtime",
                "num_threads": 2,
                "batch_mode": "loop",
                "threshold": 1.2,
                "raise_after": 3,
                "clear_after": 30,
                "commissioning_samples": 600,
                "classifier_confidence": 0.9,
                "top_channels": 2,
                "track_samples": 0,
                "novelty": {"enabled": False, "alpha": 0.999, "buffer": 500, "min_samples": 50},
            },
            prefix="detect.",
        ),
        base_dir=tmp_path,
    )
    assert s.models_dir == tmp_path / "m" and s.model == "skab-ae-lite" and s.classifier == ""
    assert (s.threshold, s.raise_after, s.clear_after) == (1.2, 3, 30)
    assert s.commissioning_samples == 600 and s.num_threads == 2 and s.batch_mode == "loop"
    assert s.track_samples == 0
    assert s.novelty == NoveltySettings(False, 0.9, 0.999, 500, 50, 600)


@pytest.mark.parametrize(
    ("table", "key"),
    [
        ({"runtime": "tensorflow"}, "detect.runtime"),
        ({"num_threads": 0}, "detect.num_threads"),
        ({"threshold": -1}, "detect.threshold"),
        ({"raise_after": "3"}, "detect.raise_after"),
        ({"commissioning_samples": 10}, "detect.commissioning_samples"),
        ({"classifier_confidence": 1.5}, "detect.classifier_confidence"),
        ({"track_samples": 10}, "detect.track_samples"),
        ({"novelty": {"alpha": 2.0}}, "detect.novelty.alpha"),
        ({"novelty": {"alpha": 0.5}}, "detect.novelty.alpha"),  # was a bare ValueError
        ({"novelty": {"min_samples": 100, "buffer": 50}}, "detect.novelty.buffer"),
        ({"novelty": {"bogus": 1}}, "detect.novelty.bogus"),
        ({"modle": "x"}, "detect.modle"),
        ({"model": ""}, "detect.model"),
    ],
)
def test_settings_errors_name_the_key(table: dict, key: str) -> None:
    with pytest.raises(OptionError) as err:
        DetectSettings.from_options(Options(table, prefix="detect."))
    assert err.value.key == key


def test_from_settings_loads_and_checks(manifest) -> None:
    det = Detector.from_settings(DetectSettings(models_dir=MODELS))
    assert det.threshold == manifest.entry("skab-ae").raw["threshold"]["value"]
    assert det.classifier is not None
    with pytest.raises(ModelError, match="no model named"):
        Detector.from_settings(DetectSettings(models_dir=MODELS, model="nope"))


def drifting_rows(n: int, seed: int = 8) -> np.ndarray:
    """Normal running whose vibration level creeps up 6 % over ``n`` samples (wear)."""
    rows = normal_rows(n, seed)
    ramp = np.linspace(0.0, 0.06, n)
    rows[:, 0] *= 1 + ramp
    rows[:, 1] *= 1 + ramp
    return rows


def test_reference_tracking_follows_slow_drift(manifest, models) -> None:
    rows = drifting_rows(6000)
    fixed = make(manifest, models, track_samples=0)
    tracking = make(manifest, models)
    assert tracking.adapt_samples == DetectSettings().track_samples > 0
    r_fixed = fixed.feed(np.arange(6000.0), rows)
    r_track = tracking.feed(np.arange(6000.0), rows)
    assert r_fixed.anomalous[-1000:].mean() > 0.5  # a fixed reference ends up alarming
    assert not r_track.anomalous.any()
    moved = tracking.calibration.mean - fixed.calibration.mean
    assert moved[0] > 0.02 * LEVEL[0] and moved[1] > 0.02 * LEVEL[1]
    # a step fault is not absorbed: the reference stays put while the alert is active
    step = drifting_rows(3000, seed=9)
    step[1000:2500, FLOW] -= 0.15 * LEVEL[FLOW]
    det = make(manifest, models)
    res = det.feed(np.arange(3000.0), step)
    assert res.anomalous[1100:2500].all()


def test_push_equals_feed_across_tracking_moves(manifest, models) -> None:
    rows = drifting_rows(700, seed=10)
    a = make(manifest, models)
    res = a.feed(np.arange(700.0), rows)
    b = make(manifest, models)
    for t, r in enumerate(rows):
        b.push(float(t), r)
    np.testing.assert_allclose(a.calibration.mean, b.calibration.mean, rtol=0, atol=1e-12)
    assert not np.allclose(a.calibration.mean, calibrate(a.spec, rows[:400]).mean, atol=1e-9)
    assert b.last_score == pytest.approx(res.scores[-1], abs=1e-9)


def test_recommission(manifest, models) -> None:
    det = make(manifest, models)
    rows = fault_run(seed=11)
    res = det.feed(np.arange(600.0), rows[:600])
    assert det.anomalous and res.alerts[-1].kind is AlertKind.RAISE
    cleared = det.recommission(600.0)
    assert [a.kind for a in cleared] == [AlertKind.CLEAR]
    assert not det.commissioned and not det.anomalous
    # the machine now runs at the new level: it becomes the reference
    new_level = normal_rows(600, seed=12)
    new_level[:, FLOW] -= 0.15 * LEVEL[FLOW]
    after = det.feed(np.arange(600.0, 1200.0), new_level)
    assert det.commissioned and after.alerts == []


def test_a_recommission_while_the_window_refills_commissions_anew(manifest, models) -> None:
    """An operator recommissions (the machine was changed) within the half minute a detector
    restored from its saved calibration fills its window (after a restart, or a gap in the
    rows): the old calibration was still waiting and came back after 36 rows, so the changed
    machine was scored against the old one. Recommissioning forgets it."""
    det = make(manifest, models)
    det.feed(np.arange(400.0), normal_rows(400, seed=3))
    det.restore(det.calibration)  # a gap: the window fills again
    det.feed(np.arange(400.0, 410.0), normal_rows(10, seed=4))
    det.recommission(410.0)
    det.feed(np.arange(410.0, 460.0), normal_rows(50, seed=5))
    assert not det.commissioned and det.warmup_samples == det.spec.commissioning


def test_a_reading_too_large_to_scale_during_commissioning_starts_it_over(manifest, models) -> None:
    """A glitch of 1e308 among the commissioning rows overflows the channel's spread to inf: a
    calibration that divides that channel by inf reads it as 0 forever, so a fault on it is
    never raised. Commissioning starts over from the next rows instead."""
    det = make(manifest, models)
    n = det.spec.commissioning
    rows = np.vstack([normal_rows(n, seed=5), fault_run(seed=6, start=n + 200, end=n + 400)])
    rows[100, FLOW] = 1e308
    with np.errstate(over="ignore"):
        det.feed(np.arange(n, dtype=float), rows[:n])
        assert not det.commissioned
        res = det.feed(np.arange(n, len(rows), dtype=float), rows[n:])
    cal = det.calibration
    assert cal is not None and all(np.isfinite(x).all() for x in (cal.mean, cal.std, cal.scale))
    raised = [a for a in res.alerts if a.kind is AlertKind.RAISE]
    assert raised and raised[0].channels[0][0] == CHANNELS[FLOW]


def test_a_temperature_reading_near_the_float_range_does_not_clear_an_alert(
    manifest, models
) -> None:
    """During a flow fault the temperature reads 1e308 for 100 s: its rate feature was inf - inf
    = NaN, the score NaN, and NaN > threshold is never true, so the hysteresis counted those rows
    as normal and cleared the alert while the flow was still down. The reading counts as a large
    finite value instead: the episode stays raised until the flow recovers."""
    det = make(manifest, models)
    rows = fault_run(seed=7, end=1200, n=1400)
    rows[600:700, CHANNELS.index("Temperature")] = 1e308
    res = det.feed(np.arange(len(rows), dtype=float), rows)
    assert np.isfinite(res.scores[400:]).all()
    assert [(a.kind, a.time >= 1200) for a in res.alerts] == [
        (AlertKind.RAISE, False),
        (AlertKind.CLEAR, True),
    ]


def test_a_model_that_gives_nan_still_scores_and_the_fault_still_raises(
    manifest, models, caplog: pytest.LogCaptureFixture
) -> None:
    """A signed model can pass the warm-up and give NaN on real inputs (here a real float TFLite
    model whose weights are +-3e38: sums of mixed signs overflow to inf - inf): NaN > threshold
    is never true, so the detector would go quiet. Its windows are scored by their features
    alone instead, said once."""
    from cloud.tflitepatch import read_float_layers, with_float_layers

    template = (MODELS / "cloud" / "skab-ae.float32.tflite").read_bytes()
    sign = np.where(np.arange(64 * 64).reshape(64, 64) % 2, 3e38, -3e38).astype(np.float32)
    layers = [(sign[: w.shape[0], : w.shape[1]], b) for w, b in read_float_layers(template)]
    broken = TFLiteModel(with_float_layers(template, layers), name="skab-ae")
    det = make(manifest, (broken, models[1]))
    rows = fault_run()
    res = det.feed(np.arange(len(rows), dtype=float) + 1000.0, rows)
    scored = res.scores[~np.isnan(res.scores)]
    assert len(scored) == 500 and np.isfinite(scored).all()  # every row after commissioning
    raised = [a for a in res.alerts if a.kind == AlertKind.RAISE]
    assert raised and any(500 <= int(a.time) - 1000 < 560 for a in raised)
    said = [r for r in caplog.records if "event=model_output_not_finite" in r.getMessage()]
    assert len(said) == 1 and broken.nonfinite


# --- hot swap -----------------------------------------------------------------------------------
class Recording:
    """The Inference seam: a real model that keeps the inputs it is given."""

    def __init__(self, model: TFLiteModel, fail: bool = False) -> None:
        self.model, self.fail = model, fail
        self.name, self.runtime = model.name, model.runtime
        self.inputs: list[np.ndarray] = []

    def predict(self, x: np.ndarray) -> np.ndarray:
        self.inputs.append(np.array(x))
        if self.fail:
            raise RuntimeError("Invoke failed")
        return self.model.predict(x)


def test_a_swap_check_leaves_its_warm_ups_for_later_each_on_the_newest_window(
    manifest, models
) -> None:
    """``check_swap(warm=False)`` checks features and threshold without inference; each
    ``warm_up`` invokes one model on the model input newest then; install takes the check only
    once both are warm. A model that fails its warm-up is refused there."""
    det = make(manifest, models)
    rows = normal_rows(det.spec.commissioning + 3, seed=2)
    det.feed(np.arange(len(rows) - 2.0), rows[:-2])
    ae, clf = Recording(models[0]), Recording(models[1])
    entry, classes = manifest.entry("skab-ae").raw, manifest.entry("skab-clf").raw["classes"]
    checked = det.check_swap(ae, entry=entry, classifier=clf, classes=classes, warm=False)
    assert checked.cold == ("anomaly", "classifier") and not ae.inputs and not clf.inputs
    with pytest.raises(ValueError, match="warmed up"):
        det.install(checked)
    with pytest.raises(ValueError, match="checked by this detector"):
        make(manifest, models).warm_up(checked)
    det.feed([len(rows) - 2.0], rows[-2:-1])  # the detector scores between the steps
    checked = det.warm_up(checked)
    assert checked.cold == ("classifier",) and not clf.inputs
    np.testing.assert_array_equal(ae.inputs[0][0], det.last_window)
    det.feed([len(rows) - 1.0], rows[-1:])
    checked = det.warm_up(checked)
    np.testing.assert_array_equal(clf.inputs[0][0], det.last_window)
    assert checked.cold == () and det.warm_up(checked) == checked
    det.install(checked)
    assert det.anomaly is ae and det.classifier is clf
    assert det.check_swap(models[0], entry=entry).cold == ()  # warm=True: all in one call

    broken = Recording(models[0], fail=True)
    checked = det.check_swap(broken, entry=entry, warm=False)
    with pytest.raises(ModelError, match="failed on the warm-up window"):
        det.warm_up(checked)
    with pytest.raises(ModelError, match="failed on the warm-up window"):
        det.swap_models(broken, entry=entry)
    assert det.anomaly is ae
