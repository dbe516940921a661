"""Hybrid inference (agent/sync/routing.py) with the real detector and int8 models, real store
files,
the real endpoint on loopback and the impairment proxy (tools/linkem.py).

A "cloud down" endpoint is a UDP socket that never answers (a black hole)."""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import numpy as np
import pytest
from linkem import Impairment, LinkEmulator

from agent.detect.changepoint import ChangeSettings
from agent.detect.detector import Alert, AlertKind, Detector, DetectSettings, Verdict
from agent.detect.features import calibrate, transform, windows
from agent.detect.inference import TFLiteModel, load_manifest
from agent.store.queue import NewRecord, Store
from agent.store.settings import StoreSettings
from agent.sync import routing as routing_mod
from agent.sync.routing import Router, RoutingSettings
from agent.sync.transport import CoapTransport
from agent.wire.records import AlertBody, EventBody, Kind
from cloud.server import CloudServer
from drivers.base import OptionError, Options
from drivers.clock import Clock, RealClock, VirtualClock

ROOT = Path(__file__).resolve().parents[3]
MODELS = ROOT / "models"
DEVICE = "pump-21"
LEVEL = np.array([0.21, 0.27, 2.4, 0.1, 89.0, 28.0, 229.0, 125.0])
NOISE = np.array([0.002, 0.002, 0.45, 0.25, 0.1, 0.01, 10.0, 0.5])
FLOW = 7

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(autouse=True)
def fast_idle(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(routing_mod, "IDLE_POLL", 0.2)


@pytest.fixture(scope="module")
def manifest():
    return load_manifest(MODELS)


@pytest.fixture(scope="module")
def models(manifest):
    return TFLiteModel.open(manifest, "skab-ae"), TFLiteModel.open(manifest, "skab-clf")


@pytest.fixture
def black_hole() -> Iterator[str]:
    """An endpoint that takes requests and never answers."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    yield f"coap://127.0.0.1:{sock.getsockname()[1]}"
    sock.close()


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[CloudServer]:
    srv = await CloudServer.start(tmp_path / "cloud", "127.0.0.1", 0, allow_plain=True)
    await srv.add_device(DEVICE)
    yield srv
    await srv.stop()


def fault_rows(n: int = 900, start: int = 500, end: int = 700, seed: int = 0) -> np.ndarray:
    rows = LEVEL + np.random.default_rng(seed).normal(size=(n, len(LEVEL))) * NOISE
    rows[start:end, FLOW] -= 0.15 * LEVEL[FLOW]
    return rows


def detector(manifest, models, **overrides) -> Detector:
    ae, clf = models
    # no reference tracking: the raising window can be recomputed from the rows exactly; no
    # change alerts: these tests route raise and clear (change alerts: test_changepoint.py)
    overrides.setdefault("changepoint", ChangeSettings(alerts=False))
    settings = DetectSettings(track_samples=0, **overrides)
    return Detector.from_entry(
        ae,
        manifest.entry("skab-ae").raw,
        settings=settings,
        classifier=clf,
        classes=manifest.entry("skab-clf").raw["classes"],
    )


def raising_window(det: Detector, rows: np.ndarray, t: float) -> np.ndarray:
    """The model input the detector saw at row ``t`` (as the analyzer passes it on)."""
    spec = det.spec
    i = int(t)
    u = transform(spec, calibrate(spec, rows[: spec.commissioning]), rows[: i + 1])
    return windows(spec, u)[-1].reshape(-1)


def settings(tmp_path: Path, **kw) -> RoutingSettings:
    base = {"validation_deadline": 1.0, "backoff_base": 0.05, "backoff_max": 0.5}
    base.update(kw)
    return RoutingSettings(state_path=tmp_path / "agent" / "routing.json", **base)


def make_router(
    tmp_path: Path,
    store: Store | None,
    endpoint: str,
    transport: CoapTransport,
    *,
    clock: Clock | None = None,
    edge=None,
    link=lambda: True,
    **kw,
) -> Router:
    return Router(
        settings(tmp_path, **kw),
        device_id=DEVICE,
        store=store,
        transport=transport,
        endpoint=endpoint,
        edge=edge,
        link_allows_cloud=link,
        clock=clock or RealClock(),
        rng=random.Random(1),
    )


async def open_store(tmp_path: Path) -> Store:
    return await Store.open(StoreSettings(path=tmp_path / "agent" / "queue.db"))


async def commit_alert(store: Store, alert: Alert, window: np.ndarray) -> int:
    """What the analyzer does with an alert before its listeners hear of it."""
    body = AlertBody(alert.time, {**alert.to_dict(), "window": [float(v) for v in window]})
    (seq,) = await store.put([NewRecord(Kind.ALERT, body.to_cbor(), created=alert.time)])
    return seq


async def records_of(store: Store) -> list:
    return await store.batch(10_000, 1 << 24)


def an_alert(seq_time: float, confidence: float, kind: AlertKind = AlertKind.RAISE) -> Alert:
    return Alert(
        time=seq_time,
        kind=kind,
        score=1.5,
        threshold=1.0,
        channels=(("Volume Flow RateRMS", 1.5),),
        verdict=Verdict.NOVEL_ANOMALY,
        confidence=confidence,
        model="skab-ae",
    )


def fault_window(seed: int) -> np.ndarray:
    w = np.random.default_rng(seed).normal(0.0, 0.3, (4, 8))
    w[1:, FLOW] = -5.0
    return w.reshape(-1).astype(np.float32)


class Worker:
    """A router's run() task; stop() cancels it like a crash would (no final save)."""

    def __init__(self, router: Router) -> None:
        self.router = router
        self.task = asyncio.create_task(router.run())

    async def stop(self) -> None:
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task


async def until(predicate, within: float = 30.0, step: float = 0.02) -> None:
    async with asyncio.timeout(within):
        while not predicate():  # noqa: ASYNC110
            await asyncio.sleep(step)


# --- critical decisions --------------------------------------------------------------------------
async def test_routing_critical_decision_is_made_on_the_edge_with_the_cloud_down(
    tmp_path: Path, manifest, models, black_hole: str
) -> None:
    """The detector raises and clears; each alert is committed and the router's listener returns
    at once although the endpoint never answers. The alert records stay as the edge made them;
    the verdict arrives later as a separate event, once the endpoint is back."""
    rows = fault_rows()
    det = detector(manifest, models, classifier_confidence=1.0)  # always unsure of the fault
    alone = detector(manifest, models, classifier_confidence=1.0)
    store = await open_store(tmp_path)
    transport = CoapTransport(RealClock())
    router = make_router(
        tmp_path, store, black_hole, transport, confidence_threshold=1.0, validation_deadline=0.3
    )
    worker = Worker(router)
    try:
        committed: list[tuple[int, Alert]] = []
        for lo in range(0, len(rows), 50):
            block = rows[lo : lo + 50]
            times = np.arange(lo, lo + len(block), dtype=float)
            for alert in det.feed(times, block).alerts:
                window = raising_window(det, rows, alert.time)
                seq = await commit_alert(store, alert, window)
                before = alert.to_dict()
                assert router.on_alert(alert, seq, window) is None  # synchronous, no waiting
                assert alert.to_dict() == before
                committed.append((seq, alert))
            await asyncio.sleep(0.01)  # the worker runs between blocks: it tries the cloud
        # the same decisions as the detector alone, with no router
        alone_alerts = alone.feed(np.arange(len(rows), dtype=float), rows).alerts
        assert [a.to_dict() for _, a in committed] == [a.to_dict() for a in alone_alerts]
        assert [a.kind for _, a in committed] == [AlertKind.RAISE, AlertKind.CLEAR]
        raise_seq = committed[0][0]
        await until(lambda: router.stats.counts["validations_failed"] >= 2)
        assert sorted(router.pending) == [raise_seq]  # only the raise; the clear is not sent
        assert router.verdicts == {}
    finally:
        await worker.stop()

    # the endpoint comes back: the verdict is merged, the alert record is untouched
    srv = await CloudServer.start(tmp_path / "cloud", "127.0.0.1", 0, allow_plain=True)
    await srv.add_device(DEVICE)
    try:
        router2 = make_router(tmp_path, store, srv.uri, transport, confidence_threshold=1.0)
        worker = Worker(router2)
        await until(lambda: raise_seq in router2.verdicts and not router2._uncommitted)
        await worker.stop()
        assert srv.inference.validation_runs == {(DEVICE, raise_seq): 1}
    finally:
        await srv.stop()
        await transport.close()
    recs = await records_of(store)
    alerts = [r for r in recs if r.kind is Kind.ALERT]
    assert [r.seq for r in alerts] == [s for s, _ in committed]
    for rec, (_, alert) in zip(alerts, committed, strict=True):
        data = AlertBody.from_cbor(rec.payload).data
        assert {k: v for k, v in data.items() if k != "window"} == alert.to_dict()
    events = [EventBody.from_cbor(r.payload).data for r in recs if r.kind is Kind.EVENT]
    assert [(e["type"], e["seq"]) for e in events] == [("verdict", raise_seq)]
    assert events[0]["edge"]["verdict"] == "novel_anomaly"
    assert events[0]["confirmed"] is True  # the full model sees the fault too
    await store.close()


async def test_routing_sends_only_unsure_raises(tmp_path: Path, black_hole: str) -> None:
    transport = CoapTransport(RealClock())
    router = make_router(tmp_path, None, black_hole, transport, confidence_threshold=0.8)
    router.on_alert(an_alert(1.0, 0.95), 10, fault_window(1))  # sure: not sent
    router.on_alert(an_alert(2.0, 0.4, AlertKind.CLEAR), 11, fault_window(1))  # a clear
    router.on_alert(an_alert(3.0, 0.4), 12, fault_window(1))
    router.on_alert(an_alert(3.0, 0.4), 12, fault_window(1))  # the same alert again
    router.on_alert(an_alert(4.0, 0.1), 13, np.zeros((4, 8)))
    assert sorted(router.pending) == [12, 13]
    assert router.stats.counts["duplicate_alerts"] == 1
    assert router.pending[13].window == [0.0] * 32
    await transport.close()


# --- exactly one validation per alert ------------------------------------------------------------
async def test_routing_validates_each_unsure_alert_once_across_restart_loss_and_duplication(
    tmp_path: Path, server: CloudServer
) -> None:
    """Answers are lost (the endpoint runs the model, the device never hears), the agent
    crashes and restarts, then the link loses and duplicates packets both ways: every alert gets
    its verdict, the model ran once per alert, one verdict event per alert."""
    store = await open_store(tmp_path)
    seqs = []
    alerts = []
    for i in range(4):
        alert = an_alert(1000.0 + i, 0.3)
        window = fault_window(i)
        seqs.append(await commit_alert(store, alert, window))
        alerts.append((alert, window))
    async with LinkEmulator(
        listen=("127.0.0.1", 0),
        target=("127.0.0.1", server.port),
        impairment=Impairment(delay=0.005),
        seed=5,
    ) as proxy:
        uri = f"coap://127.0.0.1:{proxy.port}"
        proxy.update(direction="down", loss=1.0)  # the endpoint answers into the void
        transport = CoapTransport(RealClock())
        first = make_router(tmp_path, store, uri, transport, validation_deadline=0.5)
        for seq, (alert, window) in zip(seqs, alerts, strict=True):
            first.on_alert(alert, seq, window)
        worker = Worker(first)
        await until(lambda: len(server.inference.validation_runs) == len(seqs))
        await until(lambda: first.stats.counts["validations_failed"] >= len(seqs))
        await worker.stop()  # crash: pending requests stay in routing.json
        await transport.close()
        assert first.verdicts == {} and sorted(first.pending) == seqs

        proxy.set(Impairment(delay=0.005, loss=0.25, dup=0.3))
        transport = CoapTransport(RealClock())
        second = make_router(tmp_path, store, uri, transport, validation_deadline=0.5)
        assert sorted(second.pending) == seqs  # loaded from the state file
        for seq, (alert, window) in zip(seqs, alerts, strict=True):
            second.on_alert(alert, seq, window)  # a listener called again: no second request
        worker = Worker(second)
        await until(lambda: len(second.verdicts) == len(seqs) and not second._uncommitted)
        await worker.stop()
        await transport.close()
        assert proxy.counters("up").duplicated + proxy.counters("down").duplicated > 0

    assert server.inference.validation_runs == {(DEVICE, s): 1 for s in seqs}
    assert server.inference.repeats >= len(seqs)
    assert sorted(second.verdicts) == seqs and second.pending == {}
    assert all(v["confirmed"] and v["anomalous"] for v in second.verdicts.values())
    recs = await records_of(store)
    events = [EventBody.from_cbor(r.payload).data for r in recs if r.kind is Kind.EVENT]
    assert sorted(e["seq"] for e in events) == seqs  # one verdict event per alert
    # a third start: nothing left to send, the verdicts are remembered
    third = make_router(tmp_path, store, uri, CoapTransport(RealClock()))
    assert third.pending == {} and sorted(third.verdicts) == seqs
    third.on_alert(alerts[0][0], seqs[0], alerts[0][1])
    assert third.pending == {}
    assert third.snapshot()["verdicts"] == len(seqs)
    await store.close()


async def test_routing_refused_request_is_not_retried(tmp_path: Path, server: CloudServer) -> None:
    transport = CoapTransport(RealClock())
    router = make_router(tmp_path, None, server.uri, transport)
    router.on_alert(an_alert(1.0, 0.2), 5, np.zeros(31))  # a window the model does not take
    await router.step()
    assert router.pending == {} and router.verdicts == {}
    assert router.stats.counts["validations_refused"] == 1
    assert server.inference.validation_runs == {}
    await transport.close()


async def test_routing_waits_while_the_link_does_not_allow_the_cloud(
    tmp_path: Path, server: CloudServer
) -> None:
    allowed = False
    transport = CoapTransport(RealClock())
    router = make_router(tmp_path, None, server.uri, transport, link=lambda: allowed)
    router.on_alert(an_alert(1.0, 0.2), 9, fault_window(9))
    await router.step()
    assert 9 in router.pending and router.stats.counts["validations_sent"] == 0
    assert (tmp_path / "agent" / "routing.json").is_file()  # durable before any request
    allowed = True
    await router.step()
    assert 9 in router.verdicts and router.pending == {}
    await transport.close()


def test_routing_unreadable_state_file_is_moved_aside(tmp_path: Path) -> None:
    path = tmp_path / "agent" / "routing.json"
    path.parent.mkdir(parents=True)
    path.write_text("{not json")
    router = Router(
        settings(tmp_path), device_id=DEVICE, store=None, transport=None, endpoint="coap://x"
    )
    assert router.pending == {}
    assert (path.parent / "routing.json.corrupt").read_text() == "{not json"


# --- cloud inference with a deadline -------------------------------------------------------------
def test_routing_cloud_timeout_falls_back_to_the_edge_at_the_deadline(
    tmp_path: Path, models, black_hole: str
) -> None:
    """On virtual time: the endpoint never answers; the edge result comes back when the
    deadline has passed on the router's clock, not before and not much after."""
    clock = VirtualClock()
    ae, _ = models
    window = fault_window(3)

    async def main() -> None:
        transport = CoapTransport(clock)
        allowed = True
        router = make_router(
            tmp_path,
            None,
            black_hole,
            transport,
            clock=clock,
            edge={"skab-ae": ae},
            link=lambda: allowed,
        )
        try:
            t0 = clock.monotonic()
            res = await router.infer(window, deadline=2.5)
            t1 = clock.monotonic()
            assert res.source == "edge" and res.reason == "timeout"
            assert 2.5 <= t1 - t0 <= 2.6 and res.elapsed == pytest.approx(t1 - t0)
            np.testing.assert_array_equal(res.output, ae.predict(window))
            assert res.score is not None and res.score > 1.0
            # a link that does not allow the cloud: the edge answers, no waiting at all
            allowed = False
            t0 = clock.monotonic()
            res = await router.infer(window, deadline=2.5)
            assert (res.source, res.reason) == ("edge", "link")
            assert clock.monotonic() == t0
        finally:
            await transport.close()

    clock.run(main())


async def test_routing_good_link_uses_the_full_precision_model(
    tmp_path: Path, server: CloudServer, models
) -> None:
    ae, _ = models
    window = fault_window(4)
    transport = CoapTransport(RealClock())
    router = make_router(tmp_path, None, server.uri, transport, edge={"skab-ae": ae})
    try:
        res = await router.infer(window, deadline=10.0)
        assert (res.source, res.reason, res.model) == ("cloud", "cloud", "skab-ae")
        ref = TFLiteModel.open(load_manifest(MODELS / "cloud"), "skab-ae")
        np.testing.assert_allclose(res.output, ref.predict(window), rtol=1e-5, atol=1e-6)
        edge = ae.predict(window)
        assert not np.array_equal(res.output, edge)  # int8 on the edge, float32 in the cloud
        assert server.inference.infer_runs == 1
        # an error answer (the endpoint does not know this device): the edge answers
        other = Router(
            RoutingSettings(),
            device_id="ghost-9",
            store=None,
            transport=transport,
            endpoint=server.uri,
            edge={"skab-ae": ae},
        )
        res = await other.infer(window, deadline=10.0)
        assert res.source == "edge" and res.reason == "error: 4.04"
        np.testing.assert_array_equal(res.output, edge)
    finally:
        await transport.close()


# --- settings ------------------------------------------------------------------------------------
def test_routing_settings_from_options(tmp_path: Path) -> None:
    s = RoutingSettings.from_options(Options({}, prefix="routing."), tmp_path)
    assert s.confidence_threshold == 0.8 and s.state_path == tmp_path / "routing.json"
    s = RoutingSettings.from_options(
        Options(
            {
                "confidence_threshold": 0.6,
                "validation_deadline": 5,
                "backoff_base": 1,
                "backoff_max": 60,
                "infer_deadline": 0.2,
                "cloud_infer": False,
            },
            prefix="routing.",
        )
    )
    assert (s.confidence_threshold, s.validation_deadline, s.infer_deadline) == (0.6, 5.0, 0.2)
    assert s.cloud_infer is False and s.state_path is None


@pytest.mark.parametrize(
    ("table", "key"),
    [
        ({"confidence_threshold": 1.5}, "routing.confidence_threshold"),
        ({"validation_deadline": 0}, "routing.validation_deadline"),
        ({"backoff_base": 10, "backoff_max": 1}, "routing.backoff_max"),
        ({"infer_deadline": "fast"}, "routing.infer_deadline"),
        ({"cloud_infer": 1}, "routing.cloud_infer"),
        ({"treshold": 0.5}, "routing.treshold"),
    ],
)
def test_routing_settings_errors_name_the_key(table: dict, key: str) -> None:
    with pytest.raises(OptionError) as err:
        RoutingSettings.from_options(Options(table, prefix="routing."))
    assert err.value.key == key
