"""The endpoint's full-precision inference (/infer) and alert validation (/validate) over real CoAP
on loopback, with the float32 models of models/cloud in the real interpreter."""

from __future__ import annotations

import asyncio
import shutil
import sqlite3
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import aiocoap
import cbor2
import numpy as np
import pytest

from agent.detect.inference import TFLiteModel, load_manifest
from agent.sync.transport import CoapTransport, Response, code
from agent.wire import records
from agent.wire.batch import CF_CBOR
from agent.wire.validation import window_digest
from cloud.server import CloudServer, Limits
from drivers.clock import RealClock

DEVICE = "pump-11"
ROOT = Path(__file__).resolve().parents[2]
CLOUD_MODELS = ROOT / "models" / "cloud"

pytestmark = pytest.mark.timeout(60)


def window(seed: int, fault: bool) -> list[float]:
    """A model input (4 steps x 8 channels, standardised): noise, or the flow channel far
    below its reference in the newest three steps."""
    w = np.random.default_rng(seed).normal(0.0, 0.3, (4, 8))
    if fault:
        w[1:, 7] = -5.0
    return [float(v) for v in w.reshape(-1).astype(np.float32)]


def alert(confidence: float = 0.5) -> dict:
    return {
        "time": 1_700_000_000.0,
        "kind": "raise",
        "score": 1.4,
        "threshold": 1.0,
        "channels": [["Volume Flow RateRMS", 1.4]],
        "verdict": "novel_anomaly",
        "fault": None,
        "confidence": confidence,
        "novelty": None,
        "model": "skab-ae",
    }


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[CloudServer]:
    srv = await CloudServer.start(tmp_path / "cloud", "127.0.0.1", 0, allow_plain=True)
    await srv.add_device(DEVICE)
    yield srv
    await srv.stop()


@pytest.fixture
async def transport() -> AsyncIterator[CoapTransport]:
    t = CoapTransport(RealClock(), lanes=4)
    yield t
    await t.close()


async def post(
    t: CoapTransport,
    srv: CloudServer,
    path: str,
    body: object,
    *,
    cf: int | None = CF_CBOR,
    lane: int = 0,
    raw: bytes | None = None,
) -> Response:
    payload = raw if raw is not None else cbor2.dumps(body)
    return await t.request(
        "POST", f"{srv.uri}{path}", payload, content_format=cf, deadline=20.0, lane=lane
    )


async def test_infer_answers_the_full_precision_output(
    server: CloudServer, transport: CoapTransport
) -> None:
    w = window(1, fault=True)
    resp = await post(transport, server, f"/infer/{DEVICE}", {"model": "skab-ae", "window": w})
    assert resp.dotted == "2.05" and resp.content_format == CF_CBOR
    got = cbor2.loads(resp.payload)
    ref = TFLiteModel.open(load_manifest(CLOUD_MODELS), "skab-ae")
    want = ref.predict(np.asarray(w, dtype=np.float32))
    assert got["model"] == "skab-ae" and got["precision"] == "float32"
    np.testing.assert_allclose(got["output"], want, rtol=1e-5, atol=1e-6)
    newest = np.abs(np.asarray(w[-8:]) - want[-8:]).max()
    assert got["score"] == pytest.approx(float(newest), rel=1e-5)

    resp = await post(transport, server, f"/infer/{DEVICE}", {"model": "skab-clf", "window": w})
    probs = cbor2.loads(resp.payload)
    assert probs["classes"] == ["normal", "valve", "other"]
    assert sum(probs["output"]) == pytest.approx(1.0, abs=1e-4)
    assert server.inference.infer_runs == 2


async def test_validate_runs_the_model_once_per_alert(
    server: CloudServer, transport: CoapTransport, tmp_path: Path
) -> None:
    body = {"seq": 41, "alert": alert(), "window": window(2, fault=True)}
    first = cbor2.loads((await post(transport, server, f"/validate/{DEVICE}", body)).payload)
    assert first["seq"] == 41 and first["anomalous"] is True and first["score"] > 1.0
    assert first["verdict"] in ("known_failure", "novel_anomaly")
    assert first["model"] == "skab-ae" and first["precision"] == "float32"
    # repeated, and concurrently from other sockets: the stored verdict, no second run
    answers = await asyncio.gather(
        *(post(transport, server, f"/validate/{DEVICE}", body, lane=i) for i in range(4))
    )
    assert all(cbor2.loads(a.payload) == first for a in answers)
    assert server.inference.validation_runs == {(DEVICE, 41): 1}
    assert server.inference.repeats == 4

    # a normal window: not anomalous under the full model
    calm = {"seq": 42, "alert": alert(), "window": window(3, fault=False)}
    verdict = cbor2.loads((await post(transport, server, f"/validate/{DEVICE}", calm)).payload)
    assert verdict["anomalous"] is False and verdict["verdict"] == "false_alarm"

    # the verdicts outlive the endpoint
    await server.stop()
    again = await CloudServer.start(tmp_path / "cloud", "127.0.0.1", 0, allow_plain=True)
    try:
        resp = await post(transport, again, f"/validate/{DEVICE}", body)
        assert cbor2.loads(resp.payload) == first
        assert again.inference.validation_runs == {}
        assert await again.inference.verdict(DEVICE, 42) == verdict
    finally:
        await again.stop()


async def test_bad_requests_get_4xx_and_the_endpoint_keeps_serving(
    server: CloudServer, transport: CoapTransport
) -> None:
    good = {"seq": 7, "alert": alert(), "window": window(4, fault=True)}
    v = f"/validate/{DEVICE}"
    cases: list[tuple[str, dict, str]] = [
        ("4.15", {"path": v, "body": good, "cf": None}, "no Content-Format"),
        ("4.15", {"path": v, "body": good, "cf": 112}, "SenML is not a request body here"),
        ("4.00", {"path": v, "raw": b"\xff\x00garbage"}, "not CBOR"),
        ("4.00", {"path": v, "body": [1, 2, 3]}, "not a map"),
        ("4.00", {"path": v, "body": {**good, "window": []}}, "empty window"),
        ("4.00", {"path": v, "body": {**good, "window": ["x"] * 32}}, "window of text"),
        ("4.00", {"path": v, "body": {**good, "window": [0.1] * 31}}, "wrong window length"),
        ("4.00", {"path": v, "body": {**good, "seq": -1}}, "negative seq"),
        ("4.00", {"path": v, "body": {**good, "extra": 1}}, "unknown key"),
        ("4.00", {"path": v, "body": {**good, "alert": {"model": "skab-ae", "threshold": 0}}}, ""),
        ("4.04", {"path": v, "body": {**good, "alert": {**alert(), "model": "nope"}}}, "model"),
        ("4.04", {"path": "/validate/ghost-1", "body": good}, "unregistered device"),
        ("4.04", {"path": "/infer/ghost-1", "body": {"model": "skab-ae", "window": []}}, ""),
        ("4.04", {"path": f"/infer/{DEVICE}", "body": {"model": "nope", "window": [0.0]}}, ""),
        ("4.00", {"path": f"/infer/{DEVICE}", "body": {"model": 3, "window": [0.0]}}, ""),
        (
            "4.13",
            {"path": v, "raw": b"\xa0" * (Limits().state_bytes + 100)},
            "larger than the limit",
        ),
    ]
    for want, case, why in cases:
        resp = await post(
            transport,
            server,
            case["path"],
            case.get("body"),
            cf=case.get("cf", CF_CBOR),
            raw=case.get("raw"),
        )
        assert resp.dotted == want, (why, case["path"], resp.payload)
    resp = await transport.request("GET", f"{server.uri}{v}", deadline=10.0)
    assert resp.code == code("4.05")
    assert server.inference.validation_runs == {}
    resp = await post(transport, server, v, good)
    assert resp.dotted == "2.05"
    assert server.inference.validation_runs == {(DEVICE, 7): 1}


# -- verdicts in the storage ---------------------------------------------------------------------


async def test_verdicts_of_an_older_endpoint_are_imported_once(
    tmp_path: Path, transport: CoapTransport
) -> None:
    """An endpoint before verdicts moved into the storage kept them in DATA/verdicts.db: the
    next start imports them (and answers them) and renames the file."""
    w = window(5, fault=True)
    legacy = {"seq": 41, "verdict": "known_failure", "digest": window_digest(w), "old": True}
    data, old = tmp_path / "cloud", tmp_path / "old"
    data.mkdir()
    old.mkdir()
    db = sqlite3.connect(old / "verdicts.db")  # as the older endpoint had it: WAL mode
    db.execute("PRAGMA journal_mode=WAL")
    db.execute(
        "CREATE TABLE window_verdicts (device TEXT NOT NULL, seq INTEGER NOT NULL, "
        "digest TEXT NOT NULL, body BLOB NOT NULL, PRIMARY KEY (device, seq, digest))"
    )
    db.execute(
        "INSERT INTO window_verdicts VALUES (?, ?, ?, ?)",
        (DEVICE, 41, window_digest(w), records.dumps(legacy)),
    )
    db.commit()
    for name in ("verdicts.db", "verdicts.db-wal"):  # the older endpoint killed: its WAL stays
        shutil.copy(old / name, data / name)
    db.close()
    srv = await CloudServer.start(data, "127.0.0.1", 0, allow_plain=True)
    try:
        await srv.add_device(DEVICE)
        assert not (data / "verdicts.db").exists() and (data / "verdicts.db.imported").is_file()
        assert not (data / "verdicts.db-wal").exists()
        body = {"seq": 41, "alert": alert(), "window": w}
        resp = await post(transport, srv, f"/validate/{DEVICE}", body)
        assert cbor2.loads(resp.payload) == legacy
        assert srv.inference.validation_runs == {}
        assert await srv.db(lambda s: s.table_count("verdicts")) == 1
    finally:
        await srv.stop()


async def test_a_verdict_stored_through_one_host_is_answered_by_another(
    tmp_path: Path, transport: CoapTransport, pg_dsn: str
) -> None:
    """Two endpoint hosts (each its own --data) on one PostgreSQL storage."""
    hosts = [
        await CloudServer.start(tmp_path / name, "127.0.0.1", 0, allow_plain=True, storage=pg_dsn)
        for name in ("host-a", "host-b")
    ]
    try:
        await hosts[0].add_device(DEVICE)
        body = {"seq": 3, "alert": alert(), "window": window(6, fault=True)}
        first = cbor2.loads((await post(transport, hosts[0], f"/validate/{DEVICE}", body)).payload)
        again = cbor2.loads((await post(transport, hosts[1], f"/validate/{DEVICE}", body)).payload)
        assert again == first and first["anomalous"] is True
        assert hosts[0].inference.validation_runs == {(DEVICE, 3): 1}
        assert hosts[1].inference.validation_runs == {} and hosts[1].inference.repeats == 1
        assert await hosts[1].inference.verdict(DEVICE, 3) == first
    finally:
        for srv in hosts:
            await srv.stop()


async def test_attack_a_device_posting_windows_without_pause_queues_a_bounded_amount(
    server: CloudServer,
) -> None:
    """A compromised device posts /infer as fast as its link allows, while the one model worker
    is busy: every request waited its turn in the worker's queue (work and memory without bound,
    and every other device's /validate behind them). Now a device has at most
    MAX_QUEUED_PER_DEVICE runs waiting; the others are answered 5.03 with Max-Age at once, and
    another device still gets its run."""
    from cloud import inference

    busy = threading.Event()
    server.inference._executor.submit(busy.wait)  # the worker on a long run
    await server.add_device("pump-12")
    ctx = await aiocoap.Context.create_client_context(transports=["udp6"])
    try:
        body = cbor2.dumps({"model": "skab-ae", "window": window(1, fault=True)})

        def infer(device: str) -> asyncio.Future[aiocoap.Message]:
            msg = aiocoap.Message(
                code=aiocoap.POST, uri=f"{server.uri}/infer/{device}", payload=body
            )
            msg.opt.content_format = CF_CBOR
            return asyncio.ensure_future(ctx.request(msg).response)

        flood = [infer(DEVICE) for _ in range(inference.MAX_QUEUED_PER_DEVICE + 6)]
        refused = []
        pending = set(flood)
        while len(refused) < 6:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            refused += [f.result() for f in done]
        assert all(str(r.code) == "5.03 Service Unavailable" for r in refused)
        assert all(r.opt.max_age is not None and r.opt.max_age > 0 for r in refused)
        other = infer("pump-12")
        busy.set()
        answers = await asyncio.gather(*pending, other)
        assert [str(a.code) for a in answers] == ["2.05 Content"] * len(answers)
    finally:
        busy.set()
        await ctx.shutdown()
