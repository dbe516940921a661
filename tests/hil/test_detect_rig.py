"""The detection stage in the running agent: simulated rig -> 1 Hz rows -> int8 model -> alerts
committed in the store (virtual time, real drivers, real interpreter, real store file)."""

from __future__ import annotations

import asyncio
import json
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from agent.detect.analyzer import CALIBRATION_FILE
from agent.errors import ConfigError
from agent.sense.simrig import SimRig
from agent.service import config as configmod
from agent.service.config import example_config
from agent.service.runtime import Agent
from agent.store.queue import Store
from agent.wire.records import AlertBody, Kind
from drivers.clock import VirtualClock
from drivers.sim.sources import FaultEvent

ROOT = Path(__file__).resolve().parents[2]
COMMISSIONING = 120
FAULT_AT = 300.0


def rig(tmp_path: Path, *events: FaultEvent, **detect: Any) -> configmod.Config:
    sim = configmod.SimulationConfig(source="pump", seed=3, events=events)
    cfg = configmod.simulated(configmod.load(example_config()), sim)
    cfg = configmod.replace_data_dir(cfg, tmp_path)
    assert cfg.detect is not None
    settings = replace(cfg.detect.detect, commissioning_samples=COMMISSIONING, **detect)
    return replace(cfg, detect=replace(cfg.detect, detect=settings))


def run(cfg: configmod.Config, seconds: float, during: Any = None) -> Agent:
    clock = VirtualClock()
    box: dict[str, Agent] = {}

    async def main() -> None:
        sim = SimRig(cfg, clock)
        agent = box["agent"] = Agent(cfg, clock=clock, rig=sim, status_socket=False)
        loop = asyncio.get_running_loop()
        loop.call_later(seconds, agent.request_stop)
        if during is not None:
            at, fn = during
            loop.call_later(at, fn, agent)
        try:
            await agent.run(install_signals=False)
        finally:
            sim.close()

    clock.run(main())
    return box["agent"]


def stored_alerts(cfg: configmod.Config) -> list[tuple[int, dict[str, Any]]]:
    """The alert records in the agent's store, read through the store's own API."""

    async def read() -> list[tuple[int, dict[str, Any]]]:
        store = await Store.open(cfg.store)
        try:
            records = await store.batch(max_records=100_000, max_bytes=1 << 30)
        finally:
            await store.close()
        return [
            (r.seq, AlertBody.from_cbor(r.payload).data) for r in records if r.kind == Kind.ALERT
        ]

    return asyncio.run(read())


@pytest.mark.timeout(180)
def test_valve_fault_raises_a_known_failure_alert_committed_in_the_store(tmp_path: Path):
    cfg = rig(tmp_path, FaultEvent("valve_closing", at=FAULT_AT, ramp=30.0))
    agent = run(cfg, FAULT_AT + 120)
    assert agent.analyzer is not None
    status = agent.snapshot()
    assert status["detect"]["commissioned"]
    assert status["detect"]["frames_incomplete"] <= 2  # only before the first readings
    alerts = stored_alerts(cfg)
    raises = [a for _, a in alerts if a["kind"] == "raise"]
    assert raises, "no alert raised for the valve fault"
    t0 = agent.clock.time() - (agent.clock.monotonic() - agent.started)  # wall time at start
    first = raises[0]
    assert first["time"] - t0 >= FAULT_AT  # nothing before the fault
    assert first["verdict"] == "known_failure" and first["fault"] == "valve"
    assert first["channels"][0][0] == "Volume Flow RateRMS"
    assert len(first["window"]) == 32
    assert status["last_alert"]["seq"] == alerts[-1][0]
    assert status["models"]["anomaly"]["name"] == "skab-ae"


@pytest.mark.timeout(180)
def test_tier_switch_mid_stream_scores_every_row_once(tmp_path: Path):
    cfg = rig(tmp_path)
    seconds = 2 * COMMISSIONING + 200

    def to_lite(agent: Agent) -> None:
        assert agent.analyzer is not None
        agent.analyzer.set_tier("lite")

    agent = run(cfg, seconds, during=(COMMISSIONING + 150, to_lite))
    a = agent.analyzer
    assert a is not None and a.tier == "lite" and a.pending_tier is None
    assert a.detector.anomaly.name == "skab-ae-lite"
    # every assembled row went through exactly one detector: the active one
    assert a.frames + a.frames_incomplete == pytest.approx(seconds, abs=2)
    assert stored_alerts(cfg) == []  # normal running raises nothing on either tier


@pytest.mark.timeout(120)
def test_a_corrupt_model_disables_detection_but_telemetry_goes_on(tmp_path: Path):
    models = tmp_path / "models"
    shutil.copytree(ROOT / "models", models, ignore=shutil.ignore_patterns("cloud"))
    data = (models / "skab-ae.tflite").read_bytes()
    (models / "skab-ae.tflite").write_bytes(data[: len(data) // 2])
    cfg = rig(tmp_path / "data", models_dir=models)
    agent = run(cfg, 30)
    assert agent.analyzer is None
    status = agent.snapshot()
    assert "skab-ae" in status["models"]["error"]
    assert status["last_alert"] is None
    assert agent.writer is not None and agent.writer.committed > 0


def test_detect_inputs_are_checked_against_the_model_and_the_sensors(tmp_path: Path):
    text = example_config().read_text()
    base = text
    bad_ref = base + '[detect.inputs]\nCurrent = "motor/nope"\n'
    bad_name = base + '[detect.inputs]\nSpeed = "motor/current_a"\n'
    no_source = base.replace('current_a = "Current"\n', "")
    for text, key, words in (
        (bad_ref, "detect.inputs.Current", "not a configured sensor/channel"),
        (bad_name, "detect.inputs.Speed", "no channel 'Speed'"),
        (no_source, "detect.inputs", "Current"),
    ):
        with pytest.raises(ConfigError) as err:
            configmod.loads(text, path=tmp_path / "agent.toml", label="agent.toml")
        assert f"agent.toml: {key}:" in str(err.value)
        assert words in str(err.value)


@pytest.mark.timeout(180)
def test_lite_tier_raises_alerts_without_the_classifier(tmp_path: Path):
    cfg = rig(tmp_path, FaultEvent("valve_closing", at=FAULT_AT, ramp=30.0))

    def to_lite(agent: Agent) -> None:
        assert agent.analyzer is not None
        agent.analyzer.set_tier("lite")

    agent = run(cfg, FAULT_AT + 120, during=(FAULT_AT - 40, to_lite))
    assert agent.analyzer is not None and agent.analyzer.errors == 0
    raises = [a for _, a in stored_alerts(cfg) if a["kind"] == "raise"]
    assert raises and all(a["model"] == "skab-ae-lite" for a in raises)
    assert raises[0]["verdict"] == "novel_anomaly" and raises[0]["fault"] is None
    assert len(raises[0]["window"]) == 8


@pytest.mark.timeout(180)
def test_calibration_survives_a_restart_so_a_fault_soon_after_is_caught(tmp_path: Path):
    run(rig(tmp_path), COMMISSIONING + 60)  # commissions, saves the calibration
    saved = tmp_path / CALIBRATION_FILE
    assert saved.exists()
    # the restarted agent meets a fault 60 s in: before its own commissioning would end
    cfg = rig(tmp_path, FaultEvent("valve_closing", at=60.0, ramp=10.0))
    agent = run(cfg, 150)
    assert agent.analyzer is not None and agent.analyzer.detector.commissioned
    t0 = agent.clock.time() - (agent.clock.monotonic() - agent.started)
    raises = [a for _, a in stored_alerts(cfg) if a["kind"] == "raise"]
    assert raises and 60 <= raises[0]["time"] - t0 < COMMISSIONING
    # a calibration of other features or other inputs is not used
    good = saved.read_text()
    assert '"smooth": 10' in good
    saved.write_text(good.replace('"smooth": 10', '"smooth": 11'))
    agent = run(rig(tmp_path), 30)
    assert agent.analyzer is not None and not agent.analyzer.detector.commissioned
    # nor a file of another shape (was an AttributeError at every start: a crash loop), nor one
    # whose scales divide by zero: the agent commissions again
    zero = json.loads(good)
    zero["calibration"]["scale"] = [0.0] * len(zero["calibration"]["scale"])
    for doc in ([], json.loads(good) | {"calibration": []}, zero):
        saved.write_text(json.dumps(doc))
        agent = run(rig(tmp_path), 30)
        assert agent.analyzer is not None and not agent.analyzer.detector.commissioned
