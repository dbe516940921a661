"""The web dashboard (`edge-agent-cloud serve --http`): its JSON API over data that came in
through the real ingest and reported-state paths (CoAP on loopback, real SQLite), the HTTP server
against hostile input, operator authentication, and the page itself in headless Chromium
(Debian's chromium and chromium-driver, driven by Selenium): no console errors, charts holding
the points the device sent, the alert marked, and a screenshot that is not blank."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime as dt
import json
import logging
import re
import shutil
import signal
import ssl
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiocoap
import pytest
from aiocoap import Code, Message

from agent.wire import records
from agent.wire.batch import WireRecord
from agent.wire.codec import encode_batch
from agent.wire.records import AlertBody, TelemetryBody
from cloud import dashdata, dashlearn, httpserve, linkhistory
from cloud.cli import main as cloud_main
from cloud.dashboard import Dashboard, DashboardRefused, exposure, is_loopback, tls_context
from cloud.learnjob import Job, JobSpec, JobState
from cloud.server import CloudServer
from cloud.storage import Storage, StorageUnavailable
from cloud.webauth import dashboard_token
from drivers.clock import RealClock
from tests.e2e import older_endpoint

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "test-artifacts"
DEVICE = "pump-01"
IDLE = "pump-02"  # registered, never sent anything
SECONDS = 600  # telemetry: one reading per second per sensor over the last ten minutes
SPIKE_AT = 450  # seconds into the data: a spike of motor/current_a


class ShiftedClock(RealClock):
    """The real clock, moved by ``offset`` seconds: reported state "taken in the past"."""

    offset = 0.0

    def time(self) -> float:
        return time.time() + self.offset


def current(i: int) -> float:
    return 9.5 if i == SPIKE_AT else 1.5 + 0.2 * ((i % 60) / 60)


def readings(t0: float) -> list[WireRecord]:
    out = []
    for i in range(SECONDS):
        t = t0 + i
        motor = TelemetryBody("motor", t, {"current_a": current(i), "supply_v": 230.0 + i % 7})
        vib = TelemetryBody("vib1", t + 0.5, {"rms_g": 0.05 + 0.001 * (i % 13)})
        out.append(WireRecord(2 * i, "telemetry", t, motor.to_cbor()))
        out.append(WireRecord(2 * i + 1, "telemetry", t + 0.5, vib.to_cbor()))
    return out


def alert(seq: int, t: float, kind: str, score: float) -> WireRecord:
    data = {
        "time": t,
        "kind": kind,
        "score": score,
        "threshold": 1.0,
        "channels": [["motor.current_a", score * 0.8], ["vib1.rms_g", 0.2]],
        "verdict": "known_failure",
        "fault": "valve_closing",
        "confidence": 0.91,
        "novelty": None,
        "model": "skab-ae",
    }
    return WireRecord(seq, "alert", t, AlertBody(t, data).to_cbor())


async def coap(ctx: aiocoap.Context, msg: Message) -> Message:
    async with asyncio.timeout(30):
        return await ctx.request(msg).response


async def post_batch(ctx: aiocoap.Context, server: CloudServer, batch: list[WireRecord]) -> None:
    msg = Message(code=Code.POST, uri=f"{server.uri}/ingest/{DEVICE}")
    msg.payload = encode_batch(DEVICE, batch)
    msg.opt.content_format = 112
    response = await coap(ctx, msg)
    assert response.code == Code.CHANGED, response


async def put_reported(
    ctx: aiocoap.Context, server: CloudServer, doc: dict[str, Any], version: int
) -> None:
    body = {key: [version, value] for key, value in doc.items()}
    msg = Message(code=Code.PUT, uri=f"{server.uri}/state/{DEVICE}/reported")
    msg.payload = records.dumps(body)
    msg.opt.content_format = 60
    response = await coap(ctx, msg)
    assert response.code == Code.CHANGED, response


LINK_STEPS = [  # (seconds before now, state, rtt_ms, loss)
    (-560, "high", 38.0, 0.0),
    (-420, "medium", 160.0, 0.04),
    (-300, "low", 640.0, 0.22),
    (-240, "medium", 210.0, 0.05),
    (-120, "high", 45.0, 0.01),
    (-20, "high", 41.0, 0.0),
]


#: The data endpoints run on both storages: the dashboard's SQL is written once for both.
BOTH_STORAGES = pytest.mark.parametrize("cloud", ["sqlite", "postgresql"], indirect=True)


@pytest.fixture
async def cloud(
    tmp_path: Path, request: pytest.FixtureRequest
) -> AsyncIterator[tuple[CloudServer, dict[str, float]]]:
    """An endpoint (plain CoAP allowed, so the test posts as the device) with a dashboard on
    loopback and ten minutes of a device's data: telemetry, three alerts, reported state and a
    link that changed state five times. On SQLite in its --data, or (parameter "postgresql") on
    a PostgreSQL database of its own."""
    clock = ShiftedClock()
    kind = getattr(request, "param", "sqlite")
    storage = request.getfixturevalue("pg_dsn") if kind == "postgresql" else None
    server = await CloudServer.start(
        tmp_path / "cloud", "127.0.0.1", 0, allow_plain=True, clock=clock, storage=storage
    )
    ctx = await aiocoap.Context.create_client_context(transports=["udp6"])
    try:
        await server.add_device(DEVICE)
        await server.add_device(IDLE)
        now = time.time()
        t0 = now - SECONDS
        data = readings(t0)
        for start in range(0, len(data), 300):
            await post_batch(ctx, server, data[start : start + 300])
        raised, cleared, again = now - 300, now - 200, now - 60
        await post_batch(
            ctx,
            server,
            [
                alert(5000, raised, "raise", 2.4),
                alert(5001, cleared, "clear", 0.6),
                alert(5002, again, "raise", 1.8),
            ],
        )
        version = int(now * 1000) - 600_000
        for offset, state, rtt, loss in LINK_STEPS:
            clock.offset = offset
            version += 1000
            doc = {"link/state": state, "link/rtt_ms": rtt, "link/loss": loss}
            await put_reported(ctx, server, doc, version)
        clock.offset = 0.0
        await put_reported(
            ctx,
            server,
            {
                "queue/depth": 12,
                "agent/version": "0.1.0",
                "model/anomaly": {"name": "skab-ae", "version": "3", "status": "active"},
                "sensor/motor/health": "ok",
                "sensor/vib1/health": "degraded",
            },
            version + 1000,
        )
        await Dashboard.start(server, "127.0.0.1", 0)
        yield server, {"t0": t0, "now": now, "raised": raised, "cleared": cleared, "again": again}
    finally:
        await ctx.shutdown()
        await server.stop()


async def http_get(
    server: CloudServer, path: str, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    assert server.dashboard is not None
    request = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{server.dashboard.http.port}\r\n"
    for name, value in (headers or {}).items():
        request += f"{name}: {value}\r\n"
    return await raw(server, (request + "\r\n").encode())


async def raw(
    server: CloudServer, data: bytes, ssl_context: ssl.SSLContext | None = None
) -> tuple[int, dict[str, str], bytes]:
    """Send ``data`` as it is; the status, headers and body of the answer (the server closes)."""
    assert server.dashboard is not None
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", server.dashboard.http.port, ssl=ssl_context
    )
    try:
        writer.write(data)
        await writer.drain()
        async with asyncio.timeout(20):
            answer = await reader.read()  # to the end: every answer closes the connection
    finally:
        writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    fields = dict(line.split(": ", 1) for line in lines[1:])
    return status, {k.lower(): v for k, v in fields.items()}, body


async def get_json(server: CloudServer, path: str) -> Any:
    status, fields, body = await http_get(server, path)
    assert status == 200, (path, status, body)
    assert fields["content-type"] == "application/json"
    return json.loads(body)


# -- the JSON API ---------------------------------------------------------------------------------


@BOTH_STORAGES
@pytest.mark.timeout(120)
async def test_fleet_lists_devices_with_queue_link_models_and_alerts(cloud: Any) -> None:
    server, times = cloud
    fleet = await get_json(server, "/api/fleet")
    by_id = {d["id"]: d for d in fleet["devices"]}
    assert sorted(by_id) == [DEVICE, IDLE]
    pump = by_id[DEVICE]
    assert pump["queue_depth"] == 12
    assert pump["link"] == {"state": "high", "rtt_ms": 41.0, "loss": 0.0}
    assert pump["models"] == {
        "anomaly": {"name": "skab-ae", "version": "3", "status": "active", "error": None}
    }
    assert pump["sensors"] == {"motor": "ok", "vib1": "degraded"}
    assert pump["agent_version"] == "0.1.0"
    assert pump["alerts_24h"] == 3 and pump["alert_active"] is True
    assert pump["last_alert"]["t"] == pytest.approx(times["again"])
    assert pump["last_seen"] == pytest.approx(time.time(), abs=120)
    assert pump["last_seq"] == 5002
    idle = by_id[IDLE]
    assert idle["last_seen"] is None and idle["alert_active"] is False
    assert idle["queue_depth"] is None and idle["link"]["state"] is None


@BOTH_STORAGES
@pytest.mark.timeout(120)
async def test_device_series_hold_what_the_device_sent(cloud: Any) -> None:
    server, times = cloud
    answer = await get_json(server, f"/api/devices/{DEVICE}/series?window=900")
    assert answer["anchor"] == "now" and answer["sampled"] == 1
    assert answer["until"] - answer["since"] == 900
    got = {(s["sensor"], s["channel"]): s for s in answer["series"]}
    assert sorted(got) == [("motor", "current_a"), ("motor", "supply_v"), ("vib1", "rms_g")]
    cur = got[("motor", "current_a")]
    assert cur["points"] == SECONDS and len(cur["t"]) == SECONDS
    assert cur["t"][0] == pytest.approx(times["t0"])
    assert cur["v"] == [pytest.approx(current(i)) for i in range(SECONDS)]
    # a shorter window: only the last minute
    minute = await get_json(server, f"/api/devices/{DEVICE}/series?window=60")
    assert all(len(s["t"]) <= 61 for s in minute["series"])
    assert all(t >= minute["since"] for s in minute["series"] for t in s["t"])


@BOTH_STORAGES
@pytest.mark.timeout(120)
async def test_long_windows_are_downsampled_server_side(
    cloud: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """At most MAX_POINTS per series (min and max per bucket: the spike stays), and beyond
    MAX_SCAN records a hashed sample that still covers every sensor."""
    server, _ = cloud
    monkeypatch.setattr(dashdata, "MAX_POINTS", 50)
    answer = await get_json(server, f"/api/devices/{DEVICE}/series?window=3600")
    for s in answer["series"]:
        assert len(s["t"]) <= 50 and s["points"] == SECONDS
        assert s["t"] == sorted(s["t"])
    cur = next(s for s in answer["series"] if s["channel"] == "current_a")
    assert max(cur["v"]) == pytest.approx(9.5)  # the one-second spike survives
    monkeypatch.setattr(dashdata, "MAX_SCAN", 200)
    sampled = await get_json(server, f"/api/devices/{DEVICE}/series?window=3600")
    assert sampled["sampled"] == 7  # 1203 records / 200
    assert {s["sensor"] for s in sampled["series"]} == {"motor", "vib1"}
    for s in sampled["series"]:
        assert 0.05 * SECONDS < s["points"] < 0.3 * SECONDS


@BOTH_STORAGES
@pytest.mark.timeout(120)
async def test_alerts_carry_scores_and_the_threshold_source(cloud: Any) -> None:
    server, times = cloud
    answer = await get_json(server, f"/api/devices/{DEVICE}/alerts?window=900")
    assert [(a["kind"], a["score"], a["seq"]) for a in answer["alerts"]] == [
        ("raise", 2.4, 5000),
        ("clear", 0.6, 5001),
        ("raise", 1.8, 5002),
    ]
    first = answer["alerts"][0]
    assert first["t"] == pytest.approx(times["raised"])
    assert first["fault"] == "valve_closing" and first["verdict"] == "known_failure"
    assert first["channels"][0] == ["motor.current_a", pytest.approx(2.4 * 0.8)]
    assert answer["active_at_start"] is False
    assert answer["threshold"] == {"model": "skab-ae", "value": 1.0, "source": "alert"}
    # a window that starts inside the first episode knows it was active at its start
    until = times["cleared"] + 10
    inside = await get_json(server, f"/api/devices/{DEVICE}/alerts?window=60&until={until}")
    assert inside["active_at_start"] is True and [a["seq"] for a in inside["alerts"]] == [5001]
    # desired, then reported (the value in effect) take precedence over the alert's
    await server.set_desired(DEVICE, {"detect/skab-ae/threshold": 1.2})
    desired = await get_json(server, f"/api/devices/{DEVICE}/alerts?window=900")
    assert desired["threshold"] == {"model": "skab-ae", "value": 1.2, "source": "desired"}
    ctx = await aiocoap.Context.create_client_context(transports=["udp6"])
    try:
        await put_reported(ctx, server, {"detect/skab-ae/threshold": 1.3}, int(time.time() * 1e3))
    finally:
        await ctx.shutdown()
    reported = await get_json(server, f"/api/devices/{DEVICE}/alerts?window=900")
    assert reported["threshold"] == {"model": "skab-ae", "value": 1.3, "source": "reported"}
    assert {t["source"] for t in reported["thresholds"]} == {"reported", "desired", "alert"}


@BOTH_STORAGES
@pytest.mark.timeout(120)
async def test_link_history_is_kept_and_bounded(
    cloud: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    server, times = cloud
    answer = await get_json(server, f"/api/devices/{DEVICE}/link?window=900")
    hist = answer["history"]
    assert hist["state"]["v"] == ["high", "medium", "low", "medium", "high"]  # changes only
    assert hist["rtt_ms"]["v"] == [38.0, 160.0, 640.0, 210.0, 45.0, 41.0]
    assert hist["loss"]["v"] == [0.0, 0.04, 0.22, 0.05, 0.01, 0.0]
    assert hist["rtt_ms"]["t"][0] == pytest.approx(times["now"] - 560, abs=30)
    assert answer["current"] == {"state": "high", "rtt_ms": 41.0, "loss": 0.0}
    # a window after the last change starts with the value in effect at its start
    late = await get_json(server, f"/api/devices/{DEVICE}/link?window=60")
    assert late["history"]["state"]["v"] == ["high"]
    assert late["history"]["state"]["t"] == [late["since"]]
    # bounded: the oldest values go
    monkeypatch.setattr(linkhistory, "MAX_ROWS", 3)
    monkeypatch.setattr(linkhistory, "MIN_SPACING", 0.0)
    ctx = await aiocoap.Context.create_client_context(transports=["udp6"])
    try:
        version = int(time.time() * 1000)
        for i in range(6):
            await put_reported(ctx, server, {"link/rtt_ms": 100.0 + i}, version + i)
    finally:
        await ctx.shutdown()

    def count(s: Any) -> int:
        with s.reader() as db:
            sql = "SELECT count(*) FROM link_history WHERE device = ? AND key = 'link/rtt_ms'"
            return int(db.execute(sql, (DEVICE,)).fetchone()[0])

    assert await server.db(count) == 3
    bounded = await get_json(server, f"/api/devices/{DEVICE}/link?window=900")
    assert bounded["history"]["rtt_ms"]["v"][-3:] == [103.0, 104.0, 105.0]


@BOTH_STORAGES
@pytest.mark.timeout(60)
async def test_api_refusals(cloud: Any) -> None:
    server, _ = cloud
    for path, status in [
        ("/api/devices/nobody/series", 404),
        ("/api/devices/bad%20id/series", 404),
        (f"/api/devices/{DEVICE}/nothing", 404),
        ("/api/elsewhere", 404),
        (f"/api/devices/{DEVICE}/series?window=abc", 400),
        (f"/api/devices/{DEVICE}/series?window=nan", 400),
        (f"/api/devices/{DEVICE}/series?window=1", 400),
        (f"/api/devices/{DEVICE}/series?window=1e12", 400),
        (f"/api/devices/{DEVICE}/series?until=inf", 400),
    ]:
        got, _, body = await http_get(server, path)
        assert got == status, (path, got, body)
    summary = await get_json(server, f"/api/devices/{DEVICE}")
    assert summary["id"] == DEVICE and summary["alert_active"] is True


# -- hostile stored data --------------------------------------------------------------------------

EVIL = "pump-66"
BIG = 2**1100  # a CBOR bignum: no float holds it


@pytest.fixture
async def bignums(tmp_path: Path) -> AsyncIterator[CloudServer]:
    """An endpoint with a dashboard on loopback: DEVICE sent an alert and reported state over
    CoAP; EVIL's numbers are CBOR bignums (2**1100), stored as an endpoint did before its
    decoder refused them (tests/e2e/older_endpoint.py)."""
    server = await CloudServer.start(tmp_path / "cloud", "127.0.0.1", 0, allow_plain=True)
    ctx = await aiocoap.Context.create_client_context(transports=["udp6"])
    try:
        await server.add_device(DEVICE)
        await server.add_device(EVIL)
        now = time.time()
        await post_batch(ctx, server, [alert(1, now - 60, "raise", 1.8)])
        doc = {"queue/depth": 12, "agent/version": "0.1.0"}
        await put_reported(ctx, server, doc, int(now * 1000))
        data = tmp_path / "cloud"
        model = {"name": "ae", "version": BIG, "status": "active", 2**15000: 1}
        reported = {
            "queue/depth": BIG,
            "agent/version": "1.0",
            "link/state": "high",
            "link/rtt_ms": BIG,
            "detect/ae/threshold": BIG,
            "model/ae": model,
        }
        older_endpoint.put_reported(data, EVIL, reported, now)
        body = {"kind": "raise", "score": BIG, "threshold": 1.0, "channels": [["x", BIG]]}
        older_endpoint.put_record(data, EVIL, 1, "alert", now - 30, [now - 30, body])
        reading = ["motor", now - 20, {"current_a": BIG}]
        older_endpoint.put_record(data, EVIL, 2, "telemetry", now - 20, reading)
        await Dashboard.start(server, "127.0.0.1", 0)
        yield server
    finally:
        await ctx.shutdown()
        await server.stop()


@pytest.mark.timeout(60)
async def test_one_device_reporting_bignums_cannot_blank_the_fleet_view(
    bignums: CloudServer, caplog: pytest.LogCaptureFixture
) -> None:
    """Attack: a device reports its queue depth, link RTT, a threshold and a model version as
    CBOR bignums (2**1100) and sends an alert scored with one. The fleet view every operator
    polls, and that device's own views, answer 200: each bad number is left out (null), the
    rest of its entry is shown, the other device's entry is whole; no traceback is logged."""
    server = bignums
    caplog.set_level(logging.WARNING)
    fleet = await get_json(server, "/api/fleet")
    by_id = {d["id"]: d for d in fleet["devices"]}
    good, evil = by_id[DEVICE], by_id[EVIL]
    assert good["queue_depth"] == 12 and good["agent_version"] == "0.1.0"
    assert good["alerts_24h"] == 1 and good["last_alert"]["score"] == 1.8
    assert evil["queue_depth"] is None and evil["agent_version"] == "1.0"
    assert evil["link"] == {"state": "high", "rtt_ms": None, "loss": None}
    assert evil["thresholds"].get("ae") is None
    assert evil["models"].get("ae", {}).get("version") is None
    assert evil["alerts_24h"] == 1 and (evil["last_alert"] or {}).get("score") is None
    summary = await get_json(server, f"/api/devices/{EVIL}")
    assert summary["queue_depth"] is None and summary["link"]["state"] == "high"
    alerts = await get_json(server, f"/api/devices/{EVIL}/alerts?window=900")
    assert all(a["score"] is None for a in alerts["alerts"])
    assert [t for t in alerts["thresholds"] if t["source"] == "reported"] == []  # 2**1100
    series = await get_json(server, f"/api/devices/{EVIL}/series?window=900")
    assert series["series"] == [] and series["undecodable"] == 1
    link = await get_json(server, f"/api/devices/{EVIL}/link?window=900")
    assert link["current"] == {"state": "high", "rtt_ms": None, "loss": None}
    assert [r.getMessage() for r in caplog.records if r.exc_info] == []
    assert not [r for r in caplog.records if "internal_error" in r.getMessage()]


@pytest.mark.timeout(30)
def test_fleet_entry_of_a_device_whose_data_breaks_a_view_goes_without_that_part(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A device's data that a view did not foresee (here: its summary raises) leaves that
    part of its own entry empty and is logged in one line, without a traceback; the other
    devices are shown as they are."""
    from cloud.storage import SQLiteStorage

    storage = SQLiteStorage.in_dir(tmp_path)
    try:
        now = time.time()
        for name in (DEVICE, EVIL):
            storage.add_device(name, now)
        older_endpoint.put_reported(tmp_path, DEVICE, {"queue/depth": 3}, now)
        older_endpoint.put_reported(tmp_path, EVIL, {"queue/depth": 4}, now)
        summary = dashdata._summary

        def breaks_on_4(reported: dict[str, Any]) -> dict[str, Any]:
            if reported.get("queue/depth") == 4:
                raise OverflowError("int too large to convert to float")
            return summary(reported)

        monkeypatch.setattr(dashdata, "_summary", breaks_on_4)
        caplog.set_level(logging.WARNING, logger="cloud.dashdata")
        by_id = {d["id"]: d for d in dashdata.fleet(storage, now)["devices"]}
    finally:
        storage.close()
    assert by_id[DEVICE]["queue_depth"] == 3.0 and "unreadable" not in by_id[DEVICE]
    assert by_id[EVIL]["unreadable"] == ["reported"] and by_id[EVIL]["queue_depth"] is None
    assert by_id[EVIL]["registered"] == pytest.approx(now)
    (line,) = [r for r in caplog.records if r.name == "cloud.dashdata"]
    assert "event=fleet_entry_unreadable" in line.getMessage() and line.exc_info is None
    assert f"{EVIL}/reported:OverflowError" in line.getMessage()


# -- hostile HTTP ---------------------------------------------------------------------------------


@pytest.mark.timeout(120)
async def test_hostile_http_gets_4xx_and_no_traceback(
    cloud: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    server, _ = cloud
    monkeypatch.setattr(httpserve, "HEAD_TIMEOUT", 0.5)
    caplog.set_level(logging.DEBUG)
    host = f"Host: 127.0.0.1:{server.dashboard.http.port}\r\n"
    attacks: list[tuple[str, bytes, int]] = [
        ("garbage request line", b"\x00\xff\xfe garbage\r\n\r\n", 400),
        ("binary noise", bytes(range(256)) * 4 + b"\r\n\r\n", 400),
        ("no version", b"GET /\r\n\r\n", 400),
        ("lower-case version", b"GET / http/1.1\r\n" + host.encode() + b"\r\n", 400),
        ("HTTP/2.0 request line", b"GET / HTTP/2.0\r\n" + host.encode() + b"\r\n", 505),
        ("request line over 8 KiB", b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\n\r\n", 414),
        ("one huge header", b"GET / HTTP/1.1\r\n" + host.encode() + b"X: " + b"a" * 9000, 431),
        (
            "headers over 16 KiB",
            b"GET / HTTP/1.1\r\n"
            + host.encode()
            + b"".join(b"X-%d: %s\r\n" % (i, b"b" * 4000) for i in range(5))
            + b"\r\n",
            431,
        ),
        (
            "too many header fields",
            b"GET / HTTP/1.1\r\n" + host.encode() + b"X: y\r\n" * 100 + b"\r\n",
            431,
        ),
        ("no Host", b"GET / HTTP/1.1\r\n\r\n", 400),
        ("two Hosts", b"GET / HTTP/1.1\r\n" + host.encode() * 2 + b"\r\n", 400),
        ("obsolete folding", b"GET / HTTP/1.1\r\n" + host.encode() + b" folded\r\n\r\n", 400),
        ("space before colon", b"GET / HTTP/1.1\r\n" + host.encode() + b"X : y\r\n\r\n", 400),
        ("NUL in a field", b"GET / HTTP/1.1\r\n" + host.encode() + b"X: a\x00b\r\n\r\n", 400),
        (
            "a body on GET",
            b"GET / HTTP/1.1\r\n" + host.encode() + b"Content-Length: 5\r\n\r\nhello",
            400,
        ),
        (
            "chunked GET",
            b"GET / HTTP/1.1\r\n" + host.encode() + b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            400,
        ),
        ("absolute-form target", b"GET http://evil/ HTTP/1.1\r\n" + host.encode() + b"\r\n", 400),
        (
            "slowloris: head never ends",
            b"GET / HTTP/1.1\r\n" + host.encode() + b"X-Slow: 1\r\n",
            408,
        ),
    ]
    traversals = [
        "/../../etc/passwd",
        "/vendor/../../cloud/server.py",
        "/%2e%2e/%2e%2e/etc/passwd",
        "/vendor/uplot/%2E%2E/%2E%2E/dashboard.py",
        "/..%2f..%2fetc%2fpasswd",
        "/.%2e/cloud/server.py",
        "/vendor\\..\\..\\server.py",
        "/%c0%ae%c0%ae/etc/passwd",  # overlong UTF-8 dots: not UTF-8 at all
        "/index.html%00.js",
        "/./index.html",
    ]
    for path in traversals:
        attacks.append(
            (f"path traversal {path}", f"GET {path} HTTP/1.1\r\n{host}\r\n".encode(), 400)
        )
    for name in (
        "/etc/passwd",
        "//etc/passwd",
        "/dashboard.py",
        "/web/index.html",
        "/cloud.sqlite3",
    ):
        attacks.append(
            (
                f"a file that is not served {name}",
                f"GET {name} HTTP/1.1\r\n{host}\r\n".encode(),
                404,
            )
        )
    for method in ("POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "CONNECT", "BREW"):
        body = b"Content-Length: 4\r\n\r\nabcd" if method in ("POST", "PUT") else b"\r\n"
        attacks.append((f"method {method}", f"{method} / HTTP/1.1\r\n{host}".encode() + body, 405))
    for name, data, expected in attacks:
        status, fields, body = await raw(server, data)
        assert status == expected, (name, status, body)
        assert fields["connection"] == "close"
        assert b"Traceback" not in body and len(body) < 200, name
        if expected == 405:
            assert fields["allow"] == "GET, HEAD"
    # a peer that connects and closes, or sends half a line and closes: nothing breaks
    for data in (b"", b"GET / HT"):
        _, writer = await asyncio.open_connection("127.0.0.1", server.dashboard.http.port)
        writer.write(data)
        writer.close()
        await writer.wait_closed()
    # a connection flood: over MAX_CONNECTIONS at once, the next gets 503 at once
    monkeypatch.setattr(httpserve, "MAX_CONNECTIONS", 3)
    monkeypatch.setattr(httpserve, "HEAD_TIMEOUT", 5.0)
    idle = [
        await asyncio.open_connection("127.0.0.1", server.dashboard.http.port) for _ in range(3)
    ]
    await asyncio.sleep(0.2)  # the server has accepted them
    status, _, _ = await http_get(server, "/")
    assert status == 503
    for _, writer in idle:
        writer.close()
        await writer.wait_closed()
    await asyncio.sleep(0.2)
    # HEAD is GET without the body; the page and the API still answer after all of it
    status, fields, body = await raw(server, f"HEAD / HTTP/1.1\r\n{host}\r\n".encode())
    assert status == 200 and body == b"" and int(fields["content-length"]) > 500
    status, fields, body = await http_get(server, "/")
    assert status == 200 and b"<title>edge-agent fleet</title>" in body
    assert "default-src 'none'" in fields["content-security-policy"]
    assert fields["x-content-type-options"] == "nosniff"
    await get_json(server, "/api/fleet")
    assert server.dashboard.http.answered.get(500, 0) == 0
    for record in caplog.records:
        assert record.exc_info is None, record.getMessage()
        assert "Traceback" not in record.getMessage()
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


@pytest.mark.timeout(60)
async def test_loopback_dashboard_answers_loopback_host_names_only(cloud: Any) -> None:
    """DNS rebinding: a page on evil.example whose name now points at 127.0.0.1 sends
    Host: evil.example, and gets nothing."""
    server, _ = cloud
    for host in ("evil.example", "evil.example:8080", "192.168.1.5", "[2001:db8::1]:80", ""):
        request = f"GET /api/fleet HTTP/1.1\r\nHost: {host}\r\n\r\n"
        status, _, body = await raw(server, request.encode())
        assert status == 421 and b"pump" not in body, host
    for host in ("localhost:8080", "127.0.0.1", "[::1]:8080", "127.1.2.3:1"):
        status, _, _ = await raw(server, f"GET / HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        assert status == 200, host


# -- who may look ---------------------------------------------------------------------------------


@pytest.mark.timeout(10)
def test_a_network_address_needs_operators_and_tls() -> None:
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert is_loopback("127.8.9.10") and is_loopback("[::1]")
    assert not is_loopback("0.0.0.0") and not is_loopback("::") and not is_loopback("10.0.0.1")
    assert not is_loopback("dashboard.example.net")
    assert exposure("127.0.0.1", operators=0, tls=False) is False
    with pytest.raises(DashboardRefused, match="operators add"):
        exposure("0.0.0.0", operators=0, tls=True)
    with pytest.raises(DashboardRefused, match="--http-cert"):
        exposure("192.0.2.10", operators=1, tls=False)
    assert exposure("0.0.0.0", operators=1, tls=True) is True


@pytest.mark.timeout(60)
def test_serve_refuses_a_network_dashboard_without_operators(tmp_path: Path) -> None:
    args = ["serve", "--listen", "127.0.0.1:0", "--data", str(tmp_path), "--http", "0.0.0.0:0"]
    done = subprocess.run(
        [sys.executable, "-m", "cloud.cli", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=50,
        check=False,
    )
    assert done.returncode == 64, done.stderr
    assert "operators add" in done.stderr and "Traceback" not in done.stderr
    assert "listening" not in done.stdout


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
@pytest.mark.timeout(90)
async def test_serve_http_as_a_process(
    tmp_path: Path, kind: str, request: pytest.FixtureRequest
) -> None:
    """`serve --http 127.0.0.1:0` (and `--storage postgresql://...`) prints the dashboard's
    address, serves it, and stops cleanly on SIGTERM with the endpoint."""
    storage = ["--storage", request.getfixturevalue("pg_dsn")] if kind == "postgresql" else []
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        *("-m", "cloud.cli", "serve", "--listen", "127.0.0.1:0", "--data", str(tmp_path)),
        *("--http", "127.0.0.1:0", *storage),
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        async with asyncio.timeout(30):
            first = (await proc.stdout.readline()).decode()
            second = (await proc.stdout.readline()).decode()
        assert "listening on coap://" in first, first
        match = re.fullmatch(r"dashboard on http://127\.0\.0\.1:(\d+)/\n", second)
        assert match, second
        reader, writer = await asyncio.open_connection("127.0.0.1", int(match.group(1)))
        writer.write(b"GET /api/fleet HTTP/1.1\r\nHost: localhost\r\n\r\n")
        async with asyncio.timeout(20):
            answer = await reader.read()
        writer.close()
        assert answer.startswith(b"HTTP/1.1 200 OK\r\n")
        assert json.loads(answer.partition(b"\r\n\r\n")[2])["devices"] == []
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(30):
            code = await proc.wait()
    assert code == 0
    assert proc.stderr is not None
    err = (await proc.stderr.read()).decode()
    assert "event=dashboard_listening" in err and "Traceback" not in err


def self_signed(tmp_path: Path) -> tuple[Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "dash.crt", tmp_path / "dash.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def test_a_tls_file_at_fault_is_named_with_its_code(tmp_path: Path) -> None:
    """The refusal named both files with OpenSSL's text ("[SSL] PEM lib") and was always 64."""
    cert, key = self_signed(tmp_path)
    (tmp_path / "other").mkdir()
    _, other_key = self_signed(tmp_path / "other")
    assert tls_context(cert, key) is not None
    cases = [
        (tmp_path / "missing.crt", key, 66, f"--http-cert {tmp_path / 'missing.crt'}: "),
        (cert, tmp_path / "missing.key", 66, f"--http-key {tmp_path / 'missing.key'}: "),
        (key, key, 65, f"--http-cert {key}: no PEM certificate in it"),
        (cert, cert, 65, f"--http-key {cert}: no PEM private key in it"),
        (cert, other_key, 65, f"--http-key {other_key} is not the private key of --http-cert"),
    ]
    for c, k, code, line in cases:
        with pytest.raises(DashboardRefused) as refused:
            tls_context(c, k)
        assert refused.value.code == code and str(refused.value).startswith(line), refused.value


@pytest.mark.timeout(120)
async def test_operators_sign_in_with_their_dashboard_token_over_tls(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Basic with the operator's token over TLS: no header or a wrong token 401 (with the
    challenge), a device's token 401, the operator's 200; re-keyed or revoked, refused at once.
    The token `operators token` prints is the one the dashboard takes."""
    server = await CloudServer.start(tmp_path / "cloud", "127.0.0.1", 0)
    try:
        operator = await server.register("alice", "operator")
        device = await server.register(DEVICE)
        cert, key = self_signed(tmp_path)
        await Dashboard.start(server, "127.0.0.1", 0, tls_cert=cert, tls_key=key, auth=True)
        assert server.dashboard is not None and server.dashboard.url.startswith("https://")
        client = ssl.create_default_context(cafile=str(cert))
        client.check_hostname = False

        async def get(user: str | None, password: str = "") -> tuple[int, dict[str, str]]:
            auth = ""
            if user is not None:
                token = base64.b64encode(f"{user}:{password}".encode()).decode()
                auth = f"Authorization: Basic {token}\r\n"
            request = f"GET /api/fleet HTTP/1.1\r\nHost: dash.example\r\n{auth}\r\n"
            status, fields, _ = await raw(server, request.encode(), client)
            return status, fields

        status, fields = await get(None)
        assert status == 401 and fields["www-authenticate"].startswith('Basic realm="edge-agent')
        assert (await get("alice", "wrong"))[0] == 401
        assert (await get("mallory", dashboard_token(operator)))[0] == 401
        assert (await get(DEVICE, dashboard_token(device)))[0] == 401  # devices do not look
        status, _, _ = await raw(
            server, b"GET / HTTP/1.1\r\nHost: x\r\nAuthorization: Basic !!!\r\n\r\n", client
        )
        assert status == 401
        assert (await get("alice", dashboard_token(operator)))[0] == 200  # any Host with auth
        code = await asyncio.to_thread(
            cloud_main, ["operators", "token", "--data", str(tmp_path / "cloud"), "alice"]
        )
        assert code == 0 and capsys.readouterr().out.strip() == dashboard_token(operator)
        rekeyed = await server.register("alice", "operator")
        assert (await get("alice", dashboard_token(operator)))[0] == 401
        assert (await get("alice", dashboard_token(rekeyed)))[0] == 200
        await server.revoke("alice")
        assert (await get("alice", dashboard_token(rekeyed)))[0] == 401
        # plain HTTP to the TLS port gets no answer worth the name, and the server goes on
        reader, writer = await asyncio.open_connection("127.0.0.1", server.dashboard.http.port)
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        try:
            async with asyncio.timeout(10):
                assert b"200 OK" not in await reader.read()
        except ConnectionError:
            pass
        writer.close()
        assert (await get("bob", "x"))[0] == 401  # still serving
    finally:
        await server.stop()


# -- the page in a real browser -------------------------------------------------------------------

BROWSER_WAIT = 30.0  # seconds for the page to show what the test looks for


def browser_paths() -> tuple[str, str]:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if chromium is None or driver is None:
        pytest.fail(
            "headless Chromium is needed for the dashboard test and was not found "
            f"(chromium: {chromium}, chromedriver: {driver}): `./tools/dev setup` installs the "
            "Debian packages chromium and chromium-driver (as root)"
        )
    return chromium, driver


def open_browser() -> Any:
    """Headless Chromium under chromedriver, its console log kept (a ``webdriver.Chrome``)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chromium, driver_path = browser_paths()
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in (
        "--headless=new",
        "--no-sandbox",  # root in a container
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=1440,1500",
        "--force-device-scale-factor=1",
        "--no-first-run",
        "--disable-extensions",
    ):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    browser = webdriver.Chrome(options=options, service=Service(executable_path=driver_path))
    browser.set_page_load_timeout(BROWSER_WAIT)
    return browser


@contextlib.contextmanager
def fleet_page(url: str, ready: str) -> Iterator[tuple[Any, Any]]:
    """The fleet view in a headless Chromium once the script ``ready`` returns true; yields the
    browser and its wait (BROWSER_WAIT); the browser is closed after."""
    from selenium.webdriver.support.ui import WebDriverWait

    browser = open_browser()
    try:
        wait = WebDriverWait(browser, BROWSER_WAIT)
        browser.get(url + "#/")
        wait.until(lambda b: b.execute_script(ready))
        yield browser, wait
    finally:
        browser.quit()


def finish(browser: Any, shot: Path, out: dict[str, Any]) -> dict[str, Any]:
    """``out`` with the browser's console log, the page's screenshot saved as ``shot``."""
    browser.save_screenshot(str(shot))
    return {**out, "console": browser.get_log("browser")}


def drive_browser(url: str, shot: Path) -> dict[str, Any]:
    """Open the fleet view, then the device's; return what the page holds (run in a thread)."""
    out: dict[str, Any] = {}
    with fleet_page(url, "return document.querySelectorAll('.card').length") as (browser, wait):
        browser.save_screenshot(str(shot.with_name("fleet.png")))
        out["cards"] = browser.execute_script(
            "return [...document.querySelectorAll('.card')]"
            ".map(c => [c.dataset.device, c.className])"
        )
        browser.get(url + f"#/device/{DEVICE}?window=900")
        wait.until(
            lambda b: b.execute_script(
                "const d = window.dashboard; return d && d.state.view === 'device' && "
                "d.state.polls >= 1 && d.charts.has('score') && d.charts.size >= 5"
            )
        )
        out["charts"] = browser.execute_script(
            """
            const out = {};
            for (const [name, u] of window.dashboard.charts) {
              out[name] = {
                series: u.data.slice(1).map(s => s.filter(v => v != null).length),
                xs: u.data[0].length, first: u.data[0][0], last: u.data[0][u.data[0].length - 1],
                canvas: u.root.querySelector('canvas') !== null,
                max: u.data.slice(1).map(s => Math.max(...s.filter(v => v !== null))),
              };
            }
            return out;
            """
        )
        out["marks"] = browser.execute_script("return window.dashboard.state.marks")
        out["episodes"] = browser.execute_script("return window.dashboard.state.episodes")
        out["alert_rows"] = browser.execute_script(
            "return [...document.querySelectorAll('#alerts tbody tr')].map(r => [r.className, "
            "r.dataset.seq, r.cells[1].textContent])"
        )
        out["badge"] = browser.execute_script(
            "return document.querySelector('#device-head .badge').textContent"
        )
        out["status"] = browser.execute_script("return document.getElementById('status').className")
        # the canvas of the current chart has red pixels where the alerts are marked
        out["red_pixels"] = browser.execute_script(
            """
            const u = window.dashboard.charts.get('telemetry:motor/current_a');
            const ctx = u.ctx, {left, top, width, height} = u.bbox;
            const px = ctx.getImageData(left, top, width, height).data;
            let red = 0;
            for (let i = 0; i < px.length; i += 4)
              if (px[i] > 200 && px[i + 1] < 120 && px[i + 2] < 120) red++;
            return red;
            """
        )
        return finish(browser, shot, out)


@pytest.mark.timeout(180)
async def test_the_page_in_headless_chromium(cloud: Any, tmp_path: Path) -> None:
    server, times = cloud
    browser_paths()  # fails (not skips) with what to install
    assert server.dashboard is not None
    shot = tmp_path / "dashboard.png"
    seen = await asyncio.to_thread(drive_browser, server.dashboard.url, shot)
    ARTIFACTS.mkdir(exist_ok=True)
    shutil.copyfile(shot, ARTIFACTS / "dashboard.png")
    shutil.copyfile(tmp_path / "fleet.png", ARTIFACTS / "fleet.png")

    severe = [e for e in seen["console"] if e.get("level") in ("SEVERE", "ERROR")]
    assert not severe, severe
    cards = dict(seen["cards"])
    assert "alerting" in cards[DEVICE] and "silent" in cards[IDLE]
    charts = seen["charts"]
    assert set(charts) >= {
        "score",
        "link",
        "telemetry:motor/current_a",
        "telemetry:motor/supply_v",
        "telemetry:vib1/rms_g",
    }
    current = charts["telemetry:motor/current_a"]
    assert current["canvas"] and current["series"] == [SECONDS]  # every reading, as points
    assert current["max"][0] == pytest.approx(9.5)
    assert charts["telemetry:vib1/rms_g"]["series"] == [SECONDS]
    # the score chart: the threshold line, two raised and one cleared alert
    assert charts["score"]["series"][1:] == [2, 1]
    assert charts["score"]["max"][1] == pytest.approx(2.4)
    assert charts["link"]["series"][0] >= len(LINK_STEPS)
    # the alert is marked: raise lines and shaded episodes on the telemetry charts, and rows
    assert sorted(m["kind"] for m in seen["marks"]) == ["clear", "raise", "raise"]
    assert seen["marks"][0]["t"] == pytest.approx(times["raised"])
    assert len(seen["episodes"]) == 2
    assert seen["episodes"][0]["from"] == pytest.approx(times["raised"])
    assert seen["episodes"][0]["to"] == pytest.approx(times["cleared"])
    assert seen["red_pixels"] > 100
    assert [row[0] for row in seen["alert_rows"]] == ["raise", "clear", "raise"]
    assert seen["badge"] == "alerting" and "live" in seen["status"]

    for png in (shot, tmp_path / "fleet.png"):
        assert_not_blank(png)


def assert_not_blank(png: Path) -> None:
    """A page that rendered: its pixels vary (a blank or one-colour page has no variance) and
    it has many colours (text, charts, antialiasing)."""
    from PIL import Image, ImageStat

    with Image.open(png) as image:
        assert image.format == "PNG" and image.size[0] >= 1000 and image.size[1] >= 800
        gray = image.convert("L")
        assert ImageStat.Stat(gray).stddev[0] > 10, f"{png.name}: the screenshot is blank"
        colours = image.convert("RGB").getcolors(maxcolors=1 << 20)
        assert colours is not None and len(colours) > 200, f"{png.name}: too few colours"


# -- the learning section -------------------------------------------------------------------------

#: A job's error as the page must show it: as text (documents are the coordinator's; a damaged
#: one's error quotes what the document held).
MARKUP = '<img src=x onerror="window.pwned=1">'


def learning_jobs(s: Storage, now: float) -> list[int]:
    """Three jobs as the coordinator stores them: one running (round 2 open, one upload, the
    other device's attempt expired), one failed after a check passed and one failed (its error
    with markup), and one whose document is corrupted at rest (a key with markup)."""
    spec = JobSpec("skab-ae", "anomaly", "1.0.0", 3, 1.0, 1, 600.0)
    closed = {"attempts": 1, "selected": 2, "uploads": 2, "refused": [], "missing": []}
    check = {"round": 1, "passed": True, "devices": 2, "recall": 0.9, "recall_incumbent": 0.9}
    passed = {**closed, "round": 2, "check": {**check, "margin": 0.0}, "version": "1.0.0+fl1.1"}
    failed = {**closed, "round": 3, "check": {**check, "round": 2, "passed": False}}
    failed["check"]["margin"] = -0.1
    running = JobState(
        round=2,
        open=True,
        selected=[DEVICE, IDLE],
        deadline=now + 300,
        out={IDLE: "expired"},
        version="1.0.0+fl1.1",
        history=[{**closed, "round": 1}],
    )
    ended = JobState(
        state="failed",
        round=3,
        version="1.0.0+fl1.1",
        history=[{**closed, "round": 1}, passed, failed],
        error=MARKUP,
    )
    ids = [
        s.create_learn_job("skab-ae", lambda n, st=st: Job(n, spec, st).to_cbor(), now)
        for st in (ended, running)
    ]
    s.put_learn_update(ids[1], 2, DEVICE, b"an upload", now)
    bad = records.dumps({"spec": {"devices": [], MARKUP: 1}, "state": {}})
    ids.append(s.create_learn_job("skab-ae", lambda n: bad, now))
    return ids


def drive_learning(url: str, shot: Path) -> dict[str, Any]:
    """Open the fleet view; return the learning table's rows once they show (run in a thread)."""
    out: dict[str, Any] = {}
    ready = "return document.querySelectorAll('#learning tbody tr').length >= 3"
    with fleet_page(url, ready) as (browser, _):
        out["rows"] = browser.execute_script(
            "return [...document.querySelectorAll('#learning tbody tr')]"
            ".map(r => [r.dataset.job, r.className, [...r.cells].map(c => c.textContent)])"
        )
        out["rounds"] = browser.execute_script(
            "return [...document.querySelectorAll('#learning tbody tr')]"
            ".map(r => [...r.querySelectorAll('.round')].map(x => [x.className, x.textContent]))"
        )
        out["shown"] = browser.execute_script(
            "return !document.getElementById('learning-view').hidden"
        )
        out["elements"] = browser.execute_script(
            "return document.querySelectorAll('#learning img, #learning script').length"
        )
        out["pwned"] = browser.execute_script("return window.pwned === undefined ? null : 1")
        return finish(browser, shot, out)


@pytest.mark.timeout(180)
async def test_the_learning_section_shows_the_jobs(cloud: Any, tmp_path: Path) -> None:
    server, times = cloud
    browser_paths()  # fails (not skips) with what to install
    assert server.dashboard is not None
    ended, running, damaged = await server.db(lambda s: learning_jobs(s, times["now"]))
    answer = await get_json(server, "/api/learning")
    assert [j["id"] for j in answer["jobs"]] == [damaged, running, ended]
    assert answer["jobs"][1]["attempt"]["uploads"] == 1
    assert answer["jobs"][1]["attempt"]["out"] == {"expired": 1}
    assert answer["jobs"][2]["error"] == MARKUP

    shot = tmp_path / "learning.png"
    seen = await asyncio.to_thread(drive_learning, server.dashboard.url, shot)
    ARTIFACTS.mkdir(exist_ok=True)
    shutil.copyfile(shot, ARTIFACTS / "learning.png")
    severe = [e for e in seen["console"] if e.get("level") in ("SEVERE", "ERROR")]
    assert not severe, severe
    assert seen["shown"]
    rows = {int(job): (cls, cells) for job, cls, cells in seen["rows"]}
    assert list(rows) == [damaged, running, ended]
    cls, cells = rows[running]
    assert cls == "running"
    assert cells[:4] == ["2", "skab-ae from 1.0.0", "running", "round 2/3 open"]
    assert cells[4].startswith("1/2 uploads · deadline in ")
    assert cells[5] == "expired 1"
    assert cells[7] == "1.0.0+fl1.1"
    cls, cells = rows[ended]
    assert cls == "failed" and cells[2] == "failed" + MARKUP  # the error, as text
    assert cells[6] == "failed round 2's model, margin -0.1 over 2 devices"
    assert seen["rounds"][2] == [
        ["round", "1: 2/2"],
        ["round passed", "2: 2/2 ✓ → 1.0.0+fl1.1"],
        ["round failed", "3: 2/2 ✗"],
    ]
    cls, cells = rows[damaged]
    assert cls == "damaged" and MARKUP in cells[1] and "does not read" in cells[1]
    # markup from the documents stays text: no element made of it, no script run
    assert seen["elements"] == 0 and seen["pwned"] is None
    assert_not_blank(shot)


def drive_learning_failing(url: str) -> dict[str, Any]:
    """Open the fleet view while ``GET /api/learning`` fails; return the fleet's cards and the
    learning section's note once it says so (run in a thread)."""
    ready = (
        "return document.getElementById('learning-note').textContent.length > 0"
        " && document.querySelectorAll('#fleet .card').length > 0"
    )
    with fleet_page(url, ready) as (browser, _):
        return browser.execute_script(
            "return {cards: document.querySelectorAll('#fleet .card').length,"
            " note: document.getElementById('learning-note').textContent,"
            " shown: !document.getElementById('learning-view').hidden,"
            " status: document.getElementById('status').className}"
        )


@pytest.mark.timeout(180)
async def test_the_fleet_view_goes_on_when_the_learning_jobs_cannot_be_read(
    cloud: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The storage fails reading the learning jobs (503). Was: the fleet view's poll failed as a
    whole (both read at once), so the fleet was not shown either. Now the learning section says
    it is not updated and the fleet is shown."""
    server, _ = cloud
    browser_paths()
    assert server.dashboard is not None

    def failing(s: Storage, now: float) -> Any:
        raise StorageUnavailable("the database is locked")

    monkeypatch.setattr(dashlearn, "learning", failing)
    seen = await asyncio.to_thread(drive_learning_failing, server.dashboard.url)
    assert seen["cards"] == 2 and seen["shown"]
    assert seen["note"] == "not updated: /api/learning: 503 Service Unavailable"
    assert seen["status"] == "status live"
