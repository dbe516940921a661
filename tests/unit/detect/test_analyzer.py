"""The detection stage (agent/detect/analyzer.py): readings in, rows through the detector with the
shipped int8 models, one ``step`` per period on a hand-driven clock."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.detect.analyzer import Analyzer, AnalyzerSettings, LoadedModel
from agent.detect.changepoint import ChangeSettings
from agent.detect.detector import AlertKind, Detector, DetectSettings, Verdict
from agent.detect.features import CHANNELS
from agent.detect.inference import TFLiteModel, load_manifest
from agent.errors import ModelError
from drivers.base import Reading
from drivers.clock import RealClock

ROOT = Path(__file__).resolve().parents[3]
LEVEL = np.array([0.21, 0.27, 2.4, 0.1, 89.0, 28.0, 229.0, 125.0])
NOISE = np.array([0.002, 0.002, 0.45, 0.25, 0.1, 0.01, 10.0, 0.5])
TEMPERATURE = CHANNELS.index("Temperature")
FLOW = CHANNELS.index("Volume Flow RateRMS")
WALL = 1.7e9


@pytest.fixture(scope="module")
def manifest():
    return load_manifest(ROOT / "models")


def analyzer(
    manifest,
    calibration_path: Path | None = None,
    lite: dict[str, Any] | None = None,
    classifier: bool = False,
) -> Analyzer:
    """The stage on skab-ae; with ``lite`` (skab-ae-lite's manifest entry) a lite tier too; with
    ``classifier`` skab-clf, any fault class it prefers taken as known."""
    ae = TFLiteModel.open(manifest, "skab-ae")
    entry = manifest.entry("skab-ae").raw
    detect = DetectSettings(
        classifier="skab-clf" if classifier else "",
        classifier_confidence=0.0,
        changepoint=ChangeSettings(alerts=False),
    )
    settings = AnalyzerSettings(
        inputs={c: ("pump", c) for c in CHANNELS},
        detect=detect,
        max_age=3.0,
        lite_model="skab-ae-lite" if lite else "",
    )
    tiers = {"full": LoadedModel("skab-ae", ae, entry, 1.0, 0, "0" * 64, 0.0)}
    if lite is not None:
        model = TFLiteModel.open(manifest, "skab-ae-lite")
        tiers["lite"] = LoadedModel("skab-ae-lite", model, lite, 0.9, 0, "1" * 64, 0.0)
    clf = TFLiteModel.open(manifest, "skab-clf") if classifier else None
    classes = manifest.entry("skab-clf").raw["classes"] if classifier else ()
    det = Detector.from_entry(ae, entry, settings=detect, classifier=clf, classes=classes)
    store: Any = None  # step() only queues alerts; nothing here commits them
    return Analyzer(settings, det, tiers, store, RealClock(), calibration_path=calibration_path)


def queued(a: Analyzer) -> list[tuple[str, int]]:
    """The kind and window length of each alert the stage queued for the store."""
    out = []
    while not a._pending.empty():
        alert, window = a._pending.get_nowait()
        out.append((alert.kind.value, len(window)))
    return out


def run(a: Analyzer, start: int, rows: np.ndarray) -> list[tuple[int, AlertKind]]:
    """One reading and one step per second from monotonic second ``start``."""
    out = []
    for i, row in enumerate(rows, start):
        a.observe(Reading("pump", dict(zip(CHANNELS, row, strict=True)), i, float(i), WALL + i))
        out += [(i, alert.kind) for alert in a.step(float(i), WALL + i)]
    return out


def _away(a: Analyzer, start: int, end: int) -> None:
    for i in range(start, end):  # unplugged: no readings, every step skipped
        assert a.step(float(i), WALL + i) == []


def _commissioned_then_away(manifest, rng: np.random.Generator) -> Analyzer:
    """Commissioned on 1000 rows, then every input away for an hour (rows 1000 to 4600)."""
    a = analyzer(manifest)
    assert run(a, 0, LEVEL + rng.normal(size=(1000, len(LEVEL))) * NOISE) == []
    assert a.detector.commissioned
    _away(a, 1000, 4600)
    return a


def test_rows_after_an_input_was_away_for_an_hour_are_not_scored_against_rows_before_it(
    manifest,
) -> None:
    """The pump's sensors are unplugged for an hour, in which the temperature drifts by half a
    degree (5 of its standard deviations; SKAB's drifts 1.4 to 2.8 degrees an hour), and plugged
    in again. The rate of a temperature is taken over 10 rows: across the hour it read the whole
    drift as a jump in 10 s, a false raise the moment the sensor was back. The window is filled
    again from rows after the gap before the detector scores; a fault after that still raises."""
    rng = np.random.default_rng(3)
    a = _commissioned_then_away(manifest, rng)
    after = LEVEL + rng.normal(size=(600, len(LEVEL))) * NOISE
    after[:, TEMPERATURE] += 0.5
    after[300:, FLOW] -= 0.15 * LEVEL[FLOW]  # a fault, 5 minutes after the sensor is back
    alerts = run(a, 4600, after)
    assert alerts and alerts[0][1] is AlertKind.RAISE and 4900 <= alerts[0][0] < 4930
    assert a.frames_incomplete == 3600 - 3  # the last readings stand for max_age (3 s)


async def test_a_calibration_saved_after_a_model_swap_is_restored_at_the_next_start(
    manifest, tmp_path: Path
) -> None:
    """A device commissions on the shipped model, is assigned another version (a hot swap needs
    the same features, so the calibration holds for both) and saves its calibration under it.
    At the next start the agent loads the shipped model again (the assignment is swapped in
    later): the file named the other model's sha256 and was ignored, so every restart after a
    model assignment commissioned from scratch, 400 s without alerts."""
    path = tmp_path / "detect-calibration.json"
    a = analyzer(manifest, path)
    run(a, 0, LEVEL + np.random.default_rng(4).normal(size=(450, len(LEVEL))) * NOISE)
    full = a.tiers["full"]
    a.tiers["full"] = LoadedModel("skab-ae", full.model, full.entry, 1.0, 0, "f" * 64, 0.0)
    await a.save_calibration()  # as the runtime does after the swap (_model_ready)
    again = analyzer(manifest, path)
    assert again.restore_calibration()
    assert again.detector.warmup_samples == again.detector.spec.history + 1
    # a file an earlier release saved (keyed by the model's sha256 only) is still restored
    doc = json.loads(path.read_text())
    del doc["features"]
    doc["sha256"] = "0" * 64
    path.write_text(json.dumps(doc))
    assert analyzer(manifest, path).restore_calibration()
    doc["sha256"] = "f" * 64  # ... when it is the model loaded
    path.write_text(json.dumps(doc))
    assert not analyzer(manifest, path).restore_calibration()


def test_an_alert_raised_as_a_tier_switch_completes_carries_the_window_it_was_raised_on(
    manifest,
) -> None:
    """The link asks for the lite tier before the stage keeps enough rows to prime it; the
    switch completes after the row at which the full tier raises. That raise was queued with
    the newest window of the detector running after the row, the lite one (8 values instead of
    the 32 of skab-ae, which the record names), so the endpoint could not check it."""
    a = analyzer(manifest, lite=manifest.entry("skab-ae-lite").raw)
    a.set_tier("lite")
    assert a.pending_tier == "lite"
    rows = LEVEL + np.random.default_rng(5).normal(size=(421, len(LEVEL))) * NOISE
    rows[416:, FLOW] -= 0.3 * LEVEL[FLOW]
    assert run(a, 0, rows) == [(420, AlertKind.RAISE)]
    assert a.tier == "lite" and queued(a) == [("raise", 32)]


def test_a_lite_model_no_detector_can_be_made_of_is_refused_once_and_the_full_tier_goes_on(
    manifest, caplog: pytest.LogCaptureFixture
) -> None:
    """A lightweight model assigned with a threshold of -1 (its features read, so it was taken):
    the switch the link asked for failed when the stage had rows enough to prime it, and again
    at every row after, each time a ValueError out of step (a traceback a second in the journal
    for as long as the link stayed poor). It is refused once, said once; the full tier scores on
    and raises."""
    lite = dict(manifest.entry("skab-ae-lite").raw)
    lite["threshold"] = {**lite["threshold"], "value": -1.0}
    a = analyzer(manifest, lite=lite)
    a.set_tier("lite")
    rows = LEVEL + np.random.default_rng(5).normal(size=(600, len(LEVEL))) * NOISE
    rows[500:, FLOW] -= 0.3 * LEVEL[FLOW]
    assert run(a, 0, rows) == [(504, AlertKind.RAISE)]
    assert a.tier == "full" and a.pending_tier is None and a.detector.anomalous
    refused = [r for r in caplog.records if "event=model_tier_refused" in r.getMessage()]
    assert len(refused) == 1
    for _ in range(3):  # asked again (the link, at each probe): refused, not primed again
        with pytest.raises(ModelError, match="skab-ae-lite"):
            a.set_tier("lite")
    assert a.tier == "full" and a.pending_tier is None
    refused = [r for r in caplog.records if "event=model_tier_refused" in r.getMessage()]
    assert len(refused) == 1
    a.tiers["lite"] = dataclasses.replace(a.tiers["lite"])  # another model loaded: tried anew
    with pytest.raises(ModelError, match="skab-ae-lite"):
        a.set_tier("lite")
    refused = [r for r in caplog.records if "event=model_tier_refused" in r.getMessage()]
    assert len(refused) == 2


def test_an_episode_carried_over_a_tier_switch_clears_with_its_verdict(manifest) -> None:
    """The full tier raises a known failure, the link switches to the lite tier (no classifier:
    it reads the full model's window) while the fault goes on, and the fault ends. The lite
    detector carried the episode on but not its verdict, so the clear classified anew and said
    novel_anomaly, no fault, where docs/detection.md says a clear repeats its episode's
    verdict."""
    a = analyzer(manifest, lite=manifest.entry("skab-ae-lite").raw, classifier=True)
    rows = LEVEL + np.random.default_rng(5).normal(size=(1100, len(LEVEL))) * NOISE
    rows[500:800, FLOW] -= 0.3 * LEVEL[FLOW]
    assert [k for _, k in run(a, 0, rows[:600])] == [AlertKind.RAISE]
    a.set_tier("lite")
    assert a.tier == "lite" and a.detector.anomalous
    assert [k for _, k in run(a, 600, rows[600:])] == [AlertKind.CLEAR]
    raised, cleared = (alert for alert, _ in (a._pending.get_nowait() for _ in range(2)))
    assert raised.verdict is Verdict.KNOWN_FAILURE and raised.model == "skab-ae"
    assert cleared.model == "skab-ae-lite"
    assert (cleared.verdict, cleared.fault) == (raised.verdict, raised.fault)


def test_an_input_away_again_while_the_window_refills_is_not_scored_across_that_gap(
    manifest,
) -> None:
    """The pump's sensors come back after an hour away for half a minute only, then are away
    another hour (a loose connector), the temperature drifting half a degree each hour. The
    window that refilled after the first gap kept the rows before the second: the detector
    scored across that gap, as it did before it refilled after one. The refill starts over
    after a gap in it; a fault after that still raises."""
    rng = np.random.default_rng(3)
    a = _commissioned_then_away(manifest, rng)
    back = LEVEL + rng.normal(size=(30, len(LEVEL))) * NOISE
    back[:, TEMPERATURE] += 0.5
    assert run(a, 4600, back) == []  # refilling: nothing scored
    _away(a, 4600 + 30, 8200)  # away again
    after = LEVEL + rng.normal(size=(600, len(LEVEL))) * NOISE
    after[:, TEMPERATURE] += 1.0
    after[300:, FLOW] -= 0.15 * LEVEL[FLOW]  # a fault, 5 minutes after the sensor is back
    alerts = run(a, 8200, after)
    assert alerts and alerts[0][1] is AlertKind.RAISE and 8500 <= alerts[0][0] < 8530, alerts[:2]
