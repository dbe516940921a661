"""The running agent with its model assignment and routing stages wired in
(agent/service/runtime.py):
the simulated rig, the real endpoint on loopback with [uplink], real store, cache and interpreter.

- ``hot_swap``: an operator publishes a signed model version with the endpoint's registry and
  assigns it through desired state ``model/anomaly``; the agent downloads, verifies and swaps it
  in without stopping (on the lite tier only the full tier's model changes) and reports it; an
  assignment signed with a key the device does not trust, and one whose file was tampered with,
  are refused, the running model kept and ``failed`` reported with the desired version; a link
  failure is retried and reported ``loading``, never ``failed``, until the endpoint answers; a
  lightweight model the running lite detector's warm-up refuses is refused, never installed.
- ``routing``: with routing set to validate every raised alert, a valve fault on the rig raises
  an alert, exactly one validation reaches the endpoint and the verdict event is committed.

The agent runs on a :class:`~drivers.clock.ScaledClock` (real sockets, agent time 10x), so
commissioning (60 samples) and the fault take seconds.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

import cloud.desired
from agent.detect.detector import Detector, DetectSettings
from agent.detect.inference import load_manifest
from agent.modelstore import assignment
from agent.modelstore.assignment import Assignment, ModelManager
from agent.modelstore.cache import ModelCache
from agent.modelstore.fetch import BLOCK_WINDOW, ModelFetcher
from agent.sense.simrig import SimRig
from agent.service import config as configmod
from agent.service.config import example_config
from agent.service.runtime import Agent
from agent.sync import state as state_mod
from agent.sync.link import with_policy
from agent.sync.transport import CoapTransport
from agent.sync.uplink import UplinkSettings
from agent.wire import records
from cloud.models import MODEL_FILE, entry_for
from cloud.server import CloudServer
from drivers.clock import RealClock, ScaledClock
from drivers.sim.sources import FaultEvent

pytestmark = pytest.mark.timeout(90)

ROOT = Path(__file__).resolve().parents[2]
FLOAT_AE = ROOT / "models" / "cloud" / "skab-ae.float32.tflite"  # skab-ae's features, float32
LITE_FLOAT = ROOT / "models" / "cloud" / "skab-ae-lite.float32.tflite"
DEVICE = "pump-01"
RATE = 10.0  # agent seconds per real second
COMMISSIONING = 60
FAULT_AT = 120.0  # agent seconds after start


@pytest.fixture(autouse=True)
def fast_timing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(state_mod, "BACKOFF_BASE", 0.02)
    monkeypatch.setattr(state_mod, "BACKOFF_CAP", 0.2)
    monkeypatch.setattr(state_mod, "ENDPOINT_CHECK_INTERVAL", 0.02)
    monkeypatch.setattr(cloud.desired, "POLL_INTERVAL", 0.05)


def _key(seed: int) -> Ed25519PrivateKey:
    return Ed25519PrivateKey.from_private_bytes(bytes([seed]) * 32)


@pytest.fixture
async def server(tmp_path: Path) -> Any:
    srv = await CloudServer.start(tmp_path / "cloud", "127.0.0.1", 0, allow_plain=True)
    await srv.add_device(DEVICE)
    yield srv
    await srv.stop()


def agent_config(tmp_path: Path, uri: str, *events: FaultEvent, **routing: Any) -> Any:
    """The shipped rig config on the simulated rig with [uplink] to ``uri``, short
    commissioning, the fleet's public key and fast [state] timing."""
    sim = configmod.SimulationConfig(source="pump", seed=3, events=events)
    cfg = configmod.simulated(configmod.load(example_config()), sim)
    cfg = configmod.replace_data_dir(cfg, tmp_path / "agent")
    assert cfg.detect is not None
    pub = tmp_path / "fleet.pub"
    pub.write_bytes(
        _key(7)
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    detect = replace(
        cfg.detect, detect=replace(cfg.detect.detect, commissioning_samples=COMMISSIONING)
    )
    return replace(
        cfg,
        agent=replace(cfg.agent, device_id=DEVICE),
        uplink=UplinkSettings(endpoints=(uri,), security="none"),
        state=replace(cfg.state, report_interval=5.0, min_put_interval=0.2, deadline=2.0),
        link=with_policy(cfg.link, "low", model="full"),  # the test switches tiers itself
        detect=detect,
        models=replace(cfg.models, public_key=pub),
        routing=replace(cfg.routing, **routing),
    )


class RunningAgent:
    def __init__(self, cfg: Any) -> None:
        clock = ScaledClock(RATE)
        self.rig = SimRig(cfg, clock)
        self.agent = Agent(cfg, clock=clock, rig=self.rig, status_socket=False)
        self.task = asyncio.create_task(self.agent.run(install_signals=False))

    async def stop(self) -> None:
        self.agent.request_stop()
        try:
            await asyncio.wait_for(self.task, 20)
        finally:
            self.rig.close()


async def wait_for(
    condition: Callable[[], Awaitable[bool]] | Callable[[], bool], what: str, limit: float = 30
) -> None:
    """Poll ``condition`` until it holds (a bound on waiting, not a timing assertion)."""
    try:
        async with asyncio.timeout(limit):
            while True:
                result = condition()
                if asyncio.iscoroutine(result):
                    result = await result
                if result:
                    return
                await asyncio.sleep(0.05)
    except TimeoutError:
        raise AssertionError(f"timed out waiting for: {what}") from None


async def reported(server: CloudServer, key: str) -> Any:
    entry = (await server.reported(DEVICE)).get(key)
    return None if entry is None else entry.value


def publish(server: CloudServer, version: str, key: Ed25519PrivateKey) -> Any:
    """What ``edge-agent-cloud models publish`` does: sign and store one version."""
    entry = entry_for(FLOAT_AE, None, "skab-ae")
    return server.models.publish(FLOAT_AE.read_bytes(), "skab-ae", version, entry, key)


async def test_hot_swap_of_an_assigned_signed_model_and_refusals_keep_the_running_one(
    server: CloudServer, tmp_path: Path
) -> None:
    good = publish(server, "3.0.0", _key(7))
    publish(server, "3.0.1", _key(9))  # signed, but not with the fleet's key
    publish(server, "3.0.2", _key(7))
    tampered = server.models.directory / "skab-ae" / "3.0.2" / MODEL_FILE
    data = bytearray(tampered.read_bytes())
    data[len(data) // 2] ^= 0xFF
    tampered.write_bytes(bytes(data))

    running = RunningAgent(agent_config(tmp_path, server.uri))
    try:
        agent = running.agent
        await wait_for(lambda: agent.analyzer is not None and agent.analyzer.frames > 0, "scoring")
        a = agent.analyzer
        assert a is not None and agent.assignments is not None
        await wait_for(lambda: agent.state is not None and agent.state.status["observing"], "obs")
        shipped = await reported(server, "model/anomaly")
        assert shipped["name"] == "skab-ae" and shipped["status"] == "active"

        # on the lite tier: the assignment replaces only the full tier's model
        a.set_tier("lite")
        await wait_for(lambda: a.tier == "lite", "lite tier active (primed from kept rows)")
        lite_detector, lite_model = a.detector, a.detector.anomaly
        stand_in = agent._assignable_detector()  # the full tier's, checked against
        assert stand_in is not lite_detector and agent._assignable_detector() is stand_in
        doc, _ = await server.set_desired(
            DEVICE, {"model/anomaly": {"name": "skab-ae", "version": "3.0.0"}}
        )
        want = {"name": "skab-ae", "version": "3.0.0", "status": "active"}

        async def reported_good() -> bool:
            r = await reported(server, "model/anomaly") or {}
            return {k: r.get(k) for k in want} == want and r.get("desired") == doc.rev

        await wait_for(reported_good, "3.0.0 reported active")
        assert a.tiers["full"].sha256 == good.sha256 and a.tiers["full"].name == "skab-ae"
        assert a.detector is lite_detector and a.detector.anomaly is lite_model
        assert agent._assignable_detector() is not stand_in  # the full tier's model changed
        assert agent._assignable_detector().anomaly is a.tiers["full"].model
        assert agent.model_cache is not None
        assert agent.model_cache.lookup("skab-ae", "3.0.0") is not None  # downloaded, verified
        frames = a.frames
        await wait_for(lambda: a.frames > frames + 5, "still scoring on the lite tier")

        # back on the full tier the detector runs the assigned model
        a.set_tier("full")
        await wait_for(lambda: a.tier == "full", "full tier active (primed from kept rows)")
        swapped = a.tiers["full"].model
        assert a.detector.anomaly is swapped
        frames = a.frames
        await wait_for(lambda: a.frames > frames + 5, "scoring with 3.0.0")
        snap = agent.snapshot()
        assert snap["models"]["anomaly"]["version"] == "3.0.0"
        assert snap["models"]["anomaly"]["assignment"]["status"] == "active"
        assert snap["model_cache"]["downloads"] == 1

        # refused: a signature the device does not trust, then a tampered file
        for version, words in (("3.0.1", "signature"), ("3.0.2", "SHA-256")):
            doc, _ = await server.set_desired(
                DEVICE, {"model/anomaly": {"name": "skab-ae", "version": version}}
            )

            async def reported_failed(rev: int = doc.rev) -> bool:
                r = await reported(server, "model/anomaly") or {}
                return r.get("status") == "failed" and r.get("desired") == rev

            await wait_for(reported_failed, f"{version} reported failed")
            report = await reported(server, "model/anomaly")
            assert words in report["error"]
            assert (report["name"], report["version"]) == ("skab-ae", "3.0.0")  # kept
            assert a.detector.anomaly is swapped and a.tiers["full"].model is swapped
            assert (await server.desired(DEVICE)).blocked.get("model/anomaly") == doc.rev
            seen = a.frames
            await wait_for(lambda n=seen: a.frames > n + 5, f"still scoring after {version}")
        assert agent.model_cache.lookup("skab-ae", "3.0.2") is None
        assert agent.snapshot()["model_cache"]["refused"] == 2
    finally:
        await running.stop()


async def test_hot_swap_a_lightweight_model_its_warm_up_refuses_is_refused_not_installed(
    server: CloudServer, tmp_path: Path
) -> None:
    """On the lite tier a lightweight assignment goes into the running lite detector, whose
    warm-up runs it on the newest real window. A signed model that passes the zero-window
    warm-up of prepare but gives NaN on real inputs (a real float TFLite model, weights +-3e38,
    biases 0: sums of mixed signs overflow to inf - inf) is refused there. Was: _model_ready
    took that refusal for "other features", set pending_tier and built a new lite detector
    with that very model, reported active. Now it is refused (``failed``, blocked at the
    endpoint) and the lite tier keeps its model."""
    from cloud.tflitepatch import read_float_layers, with_float_layers

    template = LITE_FLOAT.read_bytes()
    sign = np.where(np.arange(64 * 64).reshape(64, 64) % 2, 3e38, -3e38).astype(np.float32)
    layers = [(sign[: w.shape[0], : w.shape[1]], 0 * b) for w, b in read_float_layers(template)]
    entry = entry_for(LITE_FLOAT, None, "skab-ae-lite")
    server.models.publish(
        with_float_layers(template, layers), "skab-ae-lite", "2.0.0", entry, _key(7)
    )

    running = RunningAgent(agent_config(tmp_path, server.uri))
    try:
        agent = running.agent
        await wait_for(lambda: agent.analyzer is not None and agent.analyzer.frames > 0, "scoring")
        a = agent.analyzer
        assert a is not None
        await wait_for(lambda: agent.state is not None and agent.state.status["observing"], "obs")
        a.set_tier("lite")
        await wait_for(lambda: a.tier == "lite", "lite tier active (primed from kept rows)")
        lite_detector, lite_model, lite_tier = a.detector, a.detector.anomaly, a.tiers["lite"]
        doc, _ = await server.set_desired(
            DEVICE, {"model/lightweight": {"name": "skab-ae-lite", "version": "2.0.0"}}
        )

        async def settled() -> bool:
            r = await reported(server, "model/lightweight") or {}
            return r.get("status") in ("active", "failed") and r.get("desired") == doc.rev

        await wait_for(settled, "2.0.0 applied or refused")
        report = await reported(server, "model/lightweight")
        assert report["status"] == "failed", report
        assert "non-finite output on the warm-up window" in report["error"]
        assert (report["name"], report["version"]) == ("skab-ae-lite", "1.0.0")  # kept
        assert (await server.desired(DEVICE)).blocked.get("model/lightweight") == doc.rev
        frames = a.frames
        await wait_for(lambda: a.frames > frames + 5, "still scoring on the lite tier")
        assert a.tier == "lite" and a.pending_tier is None and a.tiers["lite"] is lite_tier
        assert a.detector is lite_detector and a.detector.anomaly is lite_model
    finally:
        await running.stop()


@pytest.mark.parametrize("disk", ["index_unwritable", "directory_uncreatable"])
async def test_hot_swap_a_model_cache_the_disk_kept_shut_at_start_opens_later_and_takes_models(
    server: CloudServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    disk: str,
) -> None:
    """The model cache cannot open when the agent starts, for a cause of the device's own: its
    index cannot be written (here a directory where index.json goes: EISDIR; a full disk is the
    same NotNow) or its directory cannot be created (a file where it goes). Was:
    event=model_assignment_disabled and no model assignment for the whole run, so a device
    that booted with a full disk never took a model until restarted. Now the cache is opened
    again with backoff: an assignment meanwhile is reported ``loading`` with the reason (never
    ``failed``), and applied once the disk lets the cache open; one warning for the episode."""
    monkeypatch.setattr("agent.modelstore.stage.OPEN_RETRY_BASE", 0.5)  # agent seconds
    monkeypatch.setattr("agent.modelstore.stage.OPEN_RETRY_MAX", 2.0)
    caplog.set_level(logging.DEBUG, logger="agent.modelstore.stage")
    good = publish(server, "3.0.0", _key(7))
    cfg = agent_config(tmp_path, server.uri)
    where = cfg.models.cache_dir
    if disk == "index_unwritable":
        (where / "index.json").mkdir(parents=True)
    else:
        where.parent.mkdir(parents=True, exist_ok=True)
        where.write_bytes(b"")

    running = RunningAgent(cfg)
    try:
        agent = running.agent
        await wait_for(lambda: agent.state is not None and agent.state.status["observing"], "obs")
        a = agent.analyzer
        assert a is not None and agent.assignments is not None and agent.model_cache is None
        shipped = await reported(server, "model/anomaly")
        running_model = a.tiers["full"].model
        doc, _ = await server.set_desired(
            DEVICE, {"model/anomaly": {"name": "skab-ae", "version": "3.0.0"}}
        )

        async def loading() -> bool:
            r = await reported(server, "model/anomaly") or {}
            return r.get("status") == "loading" and r.get("desired") == doc.rev

        await wait_for(loading, "3.0.0 reported loading")
        report = await reported(server, "model/anomaly")
        assert "cannot" in report["error"] and report["loading"] == "skab-ae 3.0.0", report
        assert (report["name"], report["version"]) == (shipped["name"], shipped["version"])
        await wait_for(lambda: agent.assignments.attempts >= 3, "opened again, in vain")
        assert a.tiers["full"].model is running_model

        if disk == "index_unwritable":  # the disk lets the cache open again
            (where / "index.json").rmdir()
        else:
            where.unlink()
        want = {"name": "skab-ae", "version": "3.0.0", "status": "active", "desired": doc.rev}

        async def active() -> bool:
            r = await reported(server, "model/anomaly") or {}
            return {k: r.get(k) for k in want} == want

        await wait_for(active, "3.0.0 active once the cache opened")
        assert a.tiers["full"].sha256 == good.sha256 and a.tiers["full"].model is not running_model
        assert agent.model_cache is not None
        assert agent.model_cache.lookup("skab-ae", "3.0.0") is not None
        assert (await server.desired(DEVICE)).blocked.get("model/anomaly") is None
    finally:
        await running.stop()
    warned = [r for r in caplog.records if "model_cache_unavailable" in r.getMessage()]
    assert [r.levelno for r in warned if r.levelno >= logging.INFO] == [logging.WARNING]
    assert len(warned) >= 3
    assert len([r for r in caplog.records if "event=model_cache_opened" in r.getMessage()]) == 1
    assert not [r for r in caplog.records if "model_assignment_disabled" in r.getMessage()]


def _verdict_events(stored: list[Any]) -> list[dict[str, Any]]:
    out = []
    for r in stored:
        if r.kind == "event":
            data = records.EventBody.from_cbor(r.body).data
            if data.get("type") == "verdict":
                out.append(data)
    return out


async def test_routing_validates_a_raised_alert_once_and_commits_the_verdict(
    server: CloudServer, tmp_path: Path
) -> None:
    fault = FaultEvent("valve_closing", at=FAULT_AT, ramp=20.0)
    # every raised alert is validated (its classifier confidence is below 1)
    cfg = agent_config(tmp_path, server.uri, fault, confidence_threshold=1.0)
    running = RunningAgent(cfg)
    committed: list[int] = []
    try:
        agent = running.agent
        await wait_for(lambda: agent.router is not None, "router built")
        router = agent.router
        assert router is not None
        router.add_verdict_listener(lambda seq, verdict: committed.append(seq))
        await wait_for(lambda: committed, "a verdict committed as an event", limit=45)
        seq = committed[0]
        assert agent.snapshot()["routing"]["latest"][0]["seq"] == seq

        async def delivered() -> bool:
            got = await server.records(DEVICE)
            return any(v["seq"] == seq for v in _verdict_events(got))

        await wait_for(delivered, "the verdict event reached the endpoint")
    finally:
        await running.stop()

    stored = await server.records(DEVICE)
    raises = {
        r.seq: data
        for r in stored
        if r.kind == "alert"
        and (data := records.AlertBody.from_cbor(r.body).data)["kind"] == "raise"
    }
    assert seq in raises and raises[seq]["confidence"] < 1.0
    # the endpoint ran its model once per validated alert, and was asked once
    runs = server.inference.validation_runs
    assert runs[(DEVICE, seq)] == 1
    assert set(runs.values()) == {1} and server.inference.repeats == 0
    assert router.stats.counts["validations_sent"] == len(runs)
    assert {s for _, s in runs} <= set(raises)
    verdict = next(v for v in _verdict_events(stored) if v["seq"] == seq)
    assert verdict["edge"]["confidence"] == raises[seq]["confidence"]
    assert verdict == router.verdicts[seq] | {"type": "verdict"}


async def test_hot_swap_assignment_waits_out_a_link_failure_without_reporting_failed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(assignment, "MODEL_RETRY_BASE", 0.2)
    monkeypatch.setattr(assignment, "MODEL_RETRY_MAX", 0.5)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:  # nothing listens here yet
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    cfg = agent_config(tmp_path, f"coap://127.0.0.1:{port}")
    fetcher = ModelFetcher(
        CoapTransport(RealClock(), lanes=BLOCK_WINDOW),
        f"coap://127.0.0.1:{port}",
        ack_timeout=0.1,
        manifest_deadline=0.5,
        block_deadline=2.0,
    )
    cache = ModelCache.open(cfg.models, shipped_dir=ROOT / "models", fetcher=fetcher)
    detector = Detector.from_settings(
        DetectSettings(models_dir=ROOT / "models"), load_manifest(ROOT / "models")
    )
    running = detector.anomaly
    manager = ModelManager(cache, lambda: detector)
    manager.started_with("anomaly", "skab-ae", "1.0.0")
    changes: list[dict[str, Any]] = []
    assignments = assignment.ModelAssignments(
        manager,
        RealClock(),
        configured={"anomaly": Assignment("anomaly", "skab-ae", "1.0.0")},
        desired_version=lambda key: 17,
        changed=lambda: changes.append(assignments.reported()["model/anomaly"]),
    )
    server = None
    try:
        assignments.apply("anomaly", {"name": "skab-ae", "version": "3.0.0"})
        await wait_for(lambda: any(c.get("error") for c in changes), "a link failure")
        report = assignments.reported()["model/anomaly"]
        assert report["status"] == "loading" and report["desired"] == 17
        assert report["loading"] == "skab-ae 3.0.0"
        assert (report["name"], report["version"]) == ("skab-ae", "1.0.0")  # still running
        assert detector.anomaly is running

        # the endpoint comes up: the next retry fetches, verifies and swaps it in
        server = await CloudServer.start(tmp_path / "cloud", "127.0.0.1", port, allow_plain=True)
        good = publish(server, "3.0.0", _key(7))
        await wait_for(lambda: changes[-1]["status"] == "active", "applied after the link")
        assert not any(c["status"] == "failed" for c in changes)  # never reported failed
        assert changes[-1] == {"name": "skab-ae", "version": "3.0.0", "status": "active"} | {
            "desired": 17
        }
        assert detector.anomaly is not running
        assert cache.lookup("skab-ae", "3.0.0").entry.sha256 == good.sha256

        with pytest.raises(ValueError, match="unknown role"):
            assignments.apply("main", {"name": "skab-ae"})
        with pytest.raises(ValueError, match="expected"):
            assignments.apply("anomaly", {"version": "3.0.0"})
    finally:
        await assignments.close()
        await cache.close()
        if server is not None:
            await server.stop()
