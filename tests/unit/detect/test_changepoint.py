"""The streaming changepoint detector (agent/detect/changepoint.py) on hand-made residual streams
whose CUSUM is worked out by hand, and inside the detector with the shipped int8 models."""

from __future__ import annotations

from pathlib import Path

import cbor2
import numpy as np
import pytest

from agent.detect.changepoint import (
    CAUSE_HORIZON,
    ChangeDetector,
    ChangePoint,
    ChangeSettings,
)
from agent.detect.detector import Alert, AlertKind, Detector, DetectSettings, Verdict
from agent.detect.features import CHANNELS
from agent.detect.inference import TFLiteModel, load_manifest

ROOT = Path(__file__).resolve().parents[3]
LEVEL = np.array([0.21, 0.27, 2.4, 0.1, 89.0, 28.0, 229.0, 125.0])
NOISE = np.array([0.002, 0.002, 0.45, 0.25, 0.1, 0.01, 10.0, 0.5])
FLOW = CHANNELS.index("Volume Flow RateRMS")
NAMES = ("a", "b", "c")
#: no tracking, so the sums are plain arithmetic
STILL = ChangeSettings(drift=0.4, threshold=10.0, track=0.0, hold=10, settle=5)


def run(det: ChangeDetector, stream: np.ndarray, t0: float = 0.0) -> list[tuple[int, ChangePoint]]:
    out = []
    for i, e in enumerate(stream):
        cp = det.update(t0 + i, e)
        if cp is not None:
            out.append((i, cp))
    return out


def step(n: int, at: int, channel: int, size: float) -> np.ndarray:
    e = np.zeros((n, len(NAMES)))
    e[at:, channel] = size
    return e


# --- the CUSUM by hand ----------------------------------------------------------------------------
def test_a_step_is_raised_when_the_sum_crosses_and_dated_to_its_first_sample() -> None:
    # residual 0 until sample 50, then +1.0 on channel "b". Reference 0, drift 0.4: from sample 50
    # the up sum grows by 1.0 - 0.4 = 0.6 a sample: 0.6, 1.2, ..., after n samples 0.6 n.
    # 0.6 * 16 = 9.6 <= 10, 0.6 * 17 = 10.2 > 10: raised on the 17th sample, i = 50 + 16 = 66.
    # The excursion began at sample 50 (its sum left 0 there): change_time 50, delay 16 s.
    # New reference: the mean of the last 5 samples = 1.0; shift 1.0 - 0.0 = 1.0.
    # statistic = 10.2 / 10 = 1.02.
    got = run(ChangeDetector(NAMES, STILL), step(120, 50, 1, 1.0))
    assert len(got) == 1
    i, cp = got[0]
    assert i == 66 and cp.time == 66.0 and cp.change_time == 50.0 and cp.delay == 16.0
    assert cp.channels == (("b", pytest.approx(1.0)),)
    assert cp.statistic == pytest.approx(1.02)


def test_a_step_down_and_the_reference_moves_to_the_new_level() -> None:
    # -2.0 on channel "c" from sample 10: the down sum grows 2.0 - 0.4 = 1.6 a sample;
    # 1.6 * 6 = 9.6, 1.6 * 7 = 11.2 > 10: raised at i = 10 + 6 = 16, dated 10, shift -2.0.
    # Afterwards the reference is -2.0 and the residual stays there: no further change.
    det = ChangeDetector(NAMES, STILL)
    got = run(det, step(200, 10, 2, -2.0))
    assert [(i, cp.change_time) for i, cp in got] == [(16, 10.0)]
    assert got[0][1].channels == (("c", pytest.approx(-2.0)),)
    # and back to 0 at sample 100: up sum 1.6 a sample again, raised at 106, dated 100, shift +2
    back = step(200, 10, 2, -2.0)
    back[100:, 2] = 0.0
    got = run(ChangeDetector(NAMES, STILL), back)
    assert [(i, cp.change_time) for i, cp in got] == [(16, 10.0), (106, 100.0)]
    assert got[1][1].channels == (("c", pytest.approx(2.0)),)


def test_shifts_within_the_drift_allowance_never_raise() -> None:
    # +0.4 is exactly the allowance: the sum stays 0 for ever
    assert run(ChangeDetector(NAMES, STILL), step(5000, 0, 0, 0.4)) == []


def test_channels_that_moved_are_named_largest_first() -> None:
    # "a" +1.0 and "c" +0.8 from sample 0: sums 0.6 n and 0.4 n. At n = 17 (i = 16): a = 10.2
    # (crosses), c = 6.8 >= 10 / 2: both moved, "a" first; "b" stayed at 0.
    e = np.zeros((40, 3))
    e[:, 0], e[:, 2] = 1.0, 0.8
    (i, cp), *_ = run(ChangeDetector(NAMES, STILL), e)
    assert i == 16
    assert [name for name, _ in cp.channels] == ["a", "c"]


def test_hold_after_a_change() -> None:
    # +2 on "a" from 0 (raised at i = 6: 1.6 * 7 = 11.2), reference 2.0; +4 from sample 8: the sum
    # grows 2 - 0.4 = 1.6 a sample, over 10 after 7 samples (i = 14), but the hold of 10 samples
    # keeps it quiet until i = 6 + 10 = 16, where it is raised (sum 9 * 1.6 = 14.4).
    e = np.zeros((40, 3))
    e[:, 0] = 2.0
    e[8:, 0] = 4.0
    got = run(ChangeDetector(NAMES, STILL), e)
    assert [i for i, _ in got] == [6, 16]
    assert got[1][1].change_time == 8.0


def test_no_look_ahead_a_prefix_gives_the_same_changes() -> None:
    rng = np.random.default_rng(5)
    e = rng.normal(0, 0.3, size=(600, 3))
    e[200:, 1] += 1.5
    e[400:, 0] -= 1.0
    whole = run(ChangeDetector(NAMES), e)
    assert len(whole) >= 2
    for i, cp in whole:
        assert cp.change_time <= cp.time == float(i)
        head = run(ChangeDetector(NAMES), e[: i + 1])
        assert head[-1] == (i, cp)


def test_noise_alone_stays_quiet() -> None:
    # an hour of residual noise at the level normal running shows (std 0.2 in feature units)
    rng = np.random.default_rng(1)
    assert run(ChangeDetector(NAMES), rng.normal(0, 0.2, size=(3600, 3))) == []


def test_relearn_takes_the_next_sample_as_the_reference() -> None:
    det = ChangeDetector(NAMES, STILL)
    det.reset(relearn=True)
    assert run(det, np.full((200, 3), 3.0)) == []  # an offset, but no change
    fresh = ChangeDetector(NAMES, STILL)  # against zero the same offset is a change
    assert len(run(fresh, np.full((200, 3), 3.0))) == 1


def test_cause_is_the_first_of_a_chain_of_recent_changes_after_the_last_transition() -> None:
    det = ChangeDetector(NAMES, STILL)
    # a ramp followed in two steps: raised at 66 (dated 50), then dated 70, raised 86
    det.history.extend(
        [
            ChangePoint(66.0, 50.0, (("a", 1.0),), 1.1),
            ChangePoint(86.0, 70.0, (("a", 1.0),), 1.1),
        ]
    )
    # 70 - 66 = 4 s <= CHAIN_SECONDS: one chain, dated 50
    assert det.cause(90.0).change_time == 50.0
    # a transition at 70 leaves only the second
    assert det.cause(90.0, since=70.0).change_time == 70.0
    # a transition after the alert (the wall clock was set back since it) bounds nothing
    assert det.cause(90.0, since=86_400.0).change_time == 50.0
    # beyond the horizon nothing is a cause
    assert det.cause(86.0 + CAUSE_HORIZON + 1) is None
    assert det.cause(60.0) is None  # nothing raised yet at 60


def test_settings_are_checked() -> None:
    with pytest.raises(ValueError):
        ChangeSettings(threshold=0.0)
    with pytest.raises(ValueError):
        ChangeSettings(track=1.0)
    with pytest.raises(ValueError):
        ChangeSettings(settle=0)


# --- inside the detector --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def manifest():
    return load_manifest(ROOT / "models")


@pytest.fixture(scope="module")
def models(manifest):
    return TFLiteModel.open(manifest, "skab-ae"), TFLiteModel.open(manifest, "skab-clf")


def make(manifest, models, alerts: bool = True) -> Detector:
    ae, clf = models
    return Detector.from_entry(
        ae,
        manifest.entry("skab-ae").raw,
        settings=DetectSettings(changepoint=ChangeSettings(alerts=alerts)),
        classifier=clf,
        classes=manifest.entry("skab-clf").raw["classes"],
    )


def fault_run(seed: int = 0, n: int = 900) -> np.ndarray:
    """Normal running, the flow 15 % down between rows 500 and 700."""
    rows = LEVEL + np.random.default_rng(seed).normal(size=(n, len(LEVEL))) * NOISE
    rows[500:700, FLOW] -= 0.15 * LEVEL[FLOW]
    return rows


def test_a_fault_gives_changes_at_its_start_and_end_and_the_alerts_carry_them(
    manifest, models
) -> None:
    det = make(manifest, models)
    times = np.arange(900.0) + 1000.0
    res = det.feed(times, fault_run())
    kinds = [a.kind for a in res.alerts]
    assert kinds.count(AlertKind.RAISE) == 1 and kinds.count(AlertKind.CLEAR) == 1
    changes = [a for a in res.alerts if a.kind is AlertKind.CHANGE]
    raised = next(a for a in res.alerts if a.kind is AlertKind.RAISE)
    cleared = next(a for a in res.alerts if a.kind is AlertKind.CLEAR)
    first = changes[0]
    # the first change comes with or before the raise, dated to the fault's start
    assert first.time <= raised.time and 1500.0 <= first.change_time <= first.time < 1515.0
    assert first.channels[0][0] == "Volume Flow RateRMS" and first.channels[0][1] < 0
    assert first.verdict is Verdict.NORMAL and first.fault is None  # no episode yet
    # a change at the fault's end, inside the episode, repeats its verdict
    end = [a for a in changes if 1700.0 <= a.change_time < 1715.0]
    assert end and end[0].time < cleared.time
    assert (end[0].verdict, end[0].fault) == (raised.verdict, raised.fault)
    assert end[0].channels[0][1] > 0  # the flow came back up
    # raise and clear name their change: seconds from it to the alert
    assert raised.change_time == first.change_time
    assert raised.time_to_detect == raised.time - first.change_time >= 0
    assert cleared.change_time == end[0].change_time and cleared.time_to_detect > 0
    assert not any(a.time < 1500.0 for a in res.alerts)  # quiet before the fault


def test_a_raise_after_the_wall_clock_was_set_back_still_names_its_change(manifest, models) -> None:
    """A fault and its raise and clear, then the wall clock is set back a day (NTP, an
    operator) and a second fault comes. Before: the last transition (a day "ahead") hid every
    later change, so the raise named none (no change_time, no time_to_detect) until the clock
    passed it again: a day here, years after a clock that had run years ahead."""
    det = make(manifest, models)
    det.feed(np.arange(900.0) + 100_000.0, fault_run(0))
    res = det.feed(np.arange(900.0) + 100_900.0 - 86_400.0, fault_run(1))
    raised = next(a for a in res.alerts if a.kind is AlertKind.RAISE)
    first = next(a for a in res.alerts if a.kind is AlertKind.CHANGE)
    assert raised.change_time == first.change_time is not None
    assert raised.time_to_detect is not None and raised.time_to_detect >= 0


def test_change_alerts_are_on_by_default_and_the_anomaly_decisions_never_depend_on_them(
    manifest, models
) -> None:
    rows = fault_run(seed=3)
    on = make(manifest, models).feed(np.arange(900.0), rows)
    off_det = make(manifest, models, alerts=False)
    assert DetectSettings().changepoint.alerts is True  # [detect] change_alerts = true
    off = off_det.feed(np.arange(900.0), rows)
    assert [a.kind for a in off.alerts] == [AlertKind.RAISE, AlertKind.CLEAR]
    assert [a.to_dict() for a in off.alerts] == [
        a.to_dict() for a in on.alerts if a.kind is not AlertKind.CHANGE
    ]
    np.testing.assert_array_equal(on.anomalous, off.anomalous)
    np.testing.assert_array_equal(on.scores, off.scores)
    assert off.alerts[0].time_to_detect is not None  # the CUSUM runs either way


def test_push_equals_feed_with_change_alerts(manifest, models) -> None:
    rows = fault_run(seed=2)
    whole = make(manifest, models).feed(np.arange(900.0), rows).alerts
    det = make(manifest, models)
    pushed = [a for t, r in enumerate(rows) for a in det.push(float(t), r)]
    assert [a.to_dict() for a in pushed] == [a.to_dict() for a in whole]
    assert any(a.kind is AlertKind.CHANGE for a in whole)


def test_normal_running_gives_no_changes(manifest, models) -> None:
    rows = LEVEL + np.random.default_rng(7).normal(size=(2400, len(LEVEL))) * NOISE
    res = make(manifest, models).feed(np.arange(2400.0), rows)
    assert res.alerts == []


def test_a_model_swap_relearns_the_reference(manifest, models) -> None:
    det = make(manifest, models)
    rows = fault_run(seed=4)
    det.feed(np.arange(600.0), rows[:600])  # inside the fault: the residual is off zero
    det.swap_models(models[0], entry=manifest.entry("skab-ae").raw)
    after = det.feed(np.arange(600.0, 650.0), rows[600:650]).alerts
    assert not any(a.kind is AlertKind.CHANGE for a in after)


def test_one_reading_near_the_float_range_does_not_stop_the_cusum_for_good(
    manifest, models
) -> None:
    """A glitch of 1e308 on the flow: its standard score overflowed to inf, the reference took
    inf at the change it raised and NaN at the next sample, and the flow's CUSUM never raised
    again (a later fault on it gave no change). It counts as a large finite value instead."""
    det = make(manifest, models)
    rows = np.vstack([fault_run(seed=5)[:500], fault_run(seed=6)])
    rows[450, FLOW] = 1e308
    res = det.feed(np.arange(len(rows), dtype=float), rows)
    at_fault = [a for a in res.alerts if a.kind is AlertKind.CHANGE and 1000 <= a.time < 1015]
    assert at_fault and at_fault[0].channels[0][0] == "Volume Flow RateRMS"


def test_a_change_alert_round_trips() -> None:
    a = Alert(
        time=1.5e9 + 20,
        kind=AlertKind.CHANGE,
        score=0.7,
        threshold=1.0,
        channels=(("Volume Flow RateRMS", -1.25), ("Current", 0.5)),
        verdict=Verdict.NORMAL,
        change_time=1.5e9 + 4,
    )
    d = a.to_dict()
    assert d["kind"] == "change" and d["verdict"] == "normal"
    assert d["change_time"] == 1.5e9 + 4 and d["time_to_detect"] == 16.0
    assert Alert.from_dict(cbor2.loads(cbor2.dumps(d))) == a
    # records written before changepoints existed have neither key
    old = {k: v for k, v in d.items() if k not in ("change_time", "time_to_detect")}
    assert Alert.from_dict(old).change_time is None and Alert.from_dict(old).time_to_detect is None
