"""`edge-agent-cloud export` and `devices`: what a user sees of the records that arrived."""

from __future__ import annotations

import asyncio
import csv
import io
import json
from pathlib import Path

import aiocoap
import pytest
from aiocoap import Code, Message

from agent.wire.batch import WireRecord
from agent.wire.codec import encode_batch
from agent.wire.records import AlertBody, EventBody, TelemetryBody
from cloud import cli
from cloud.server import CloudServer
from tests.e2e import older_endpoint

DEVICE = "pump-01"
T0 = 1_700_000_000.0


@pytest.fixture
async def data_dir(tmp_path: Path) -> Path:
    """A data directory holding what a device sent over CoAP: readings, an alert, an event, and
    a telemetry record whose body is not CBOR."""
    server = await CloudServer.start(tmp_path, "127.0.0.1", 0, allow_plain=True)
    ctx = await aiocoap.Context.create_client_context(transports=["udp6"])
    try:
        await server.add_device(DEVICE)
        records = [
            WireRecord(
                1,
                "telemetry",
                T0 + 0.01,
                TelemetryBody("motor", T0, {"current_a": 1.25, "supply_v": 229.5}).to_cbor(),
            ),
            WireRecord(
                2,
                "telemetry",
                T0 + 10.01,
                TelemetryBody("loop", T0 + 10, {"pressure_bar": 2.5}).to_cbor(),
            ),
            WireRecord(
                3,
                "alert",
                T0 + 20,
                AlertBody(T0 + 20, {"score": 0.97, "verdict": "anomaly"}).to_cbor(),
            ),
            WireRecord(
                4,
                "event",
                T0 + 30,
                EventBody(T0 + 30, {"what": "sensor_degraded", "sensor": "loop"}).to_cbor(),
            ),
            WireRecord(5, "telemetry", T0 + 40, b"\xff\xfe"),
        ]
        msg = Message(
            code=Code.POST,
            uri=f"{server.uri}/ingest/{DEVICE}",
            payload=encode_batch(DEVICE, records),
            content_format=112,
        )
        async with asyncio.timeout(10):
            assert (await ctx.request(msg).response).code == Code.CHANGED
    finally:
        await ctx.shutdown()
        await server.stop()
    return tmp_path


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    rc = cli.main(list(argv))
    return rc, capsys.readouterr().out


def test_export_csv(data_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out = run(capsys, "export", "--data", str(data_dir), "--device", DEVICE)
    assert rc == 0
    rows = list(csv.DictReader(io.StringIO(out)))
    assert list(rows[0]) == ["seq", "kind", "time", "sensor", "channel", "value"]
    assert [(r["seq"], r["kind"], r["sensor"], r["channel"]) for r in rows] == [
        ("1", "telemetry", "motor", "current_a"),
        ("1", "telemetry", "motor", "supply_v"),
        ("2", "telemetry", "loop", "pressure_bar"),
        ("3", "alert", "", ""),
        ("4", "event", "", ""),
        ("5", "telemetry", "", ""),
    ]
    assert float(rows[0]["time"]) == T0 and float(rows[0]["value"]) == 1.25
    assert float(rows[2]["time"]) == T0 + 10 and float(rows[2]["value"]) == 2.5
    assert json.loads(rows[3]["value"]) == {"score": 0.97, "verdict": "anomaly"}
    assert json.loads(rows[5]["value"]) == {"raw": "fffe"}
    assert float(rows[5]["time"]) == T0 + 40  # no time in the body: the record's created


def test_export_json_since(data_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out = run(
        capsys,
        "export",
        "--data",
        str(data_dir),
        "--device",
        DEVICE,
        "--format",
        "json",
        "--since",
        str(T0 + 10),
    )
    assert rc == 0
    rows = json.loads(out)
    assert rows[0] == {
        "seq": 2,
        "kind": "telemetry",
        "time": T0 + 10,
        "sensor": "loop",
        "channel": "pressure_bar",
        "value": 2.5,
    }
    assert rows[1]["value"] == {"score": 0.97, "verdict": "anomaly"}
    assert [r["seq"] for r in rows] == [2, 3, 4, 5]
    rc, out = run(
        capsys,
        "export",
        "--data",
        str(data_dir),
        "--device",
        DEVICE,
        "--format",
        "json",
        "--since",
        "2023-11-14T22:13:50+00:00",  # T0 + 30
    )
    assert [r["seq"] for r in json.loads(out)] == [4, 5]


def test_export_to_file_and_errors(
    data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = tmp_path / "out.csv"
    rc, _ = run(
        capsys, "export", "--data", str(data_dir), "--device", DEVICE, "--output", str(target)
    )
    assert rc == 0 and len(target.read_text().splitlines()) == 7
    assert run(capsys, "export", "--data", str(data_dir), "--device", "nobody")[0] == cli.EX_NOINPUT
    assert run(capsys, "export", "--data", str(data_dir), "--device=-x")[0] == cli.EX_USAGE
    args = ("export", "--data", str(data_dir), "--device", DEVICE, "--since", "yesterday")
    assert run(capsys, *args)[0] == cli.EX_USAGE


def test_export_goes_on_past_stored_bignums(
    data_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Attack: records an older endpoint stored before it refused CBOR bignums: an event whose
    map holds 2**15000 (an integer of 4516 digits, over Python's printing limit) and 2**70, an
    alert whose time is 2**1100, a reading whose value is 2**1100. The export writes every row
    (CSV and JSON, exit 0): the huge integer as text, one beyond 64 bits as its digits, a body no
    float can read as its raw bytes; the rows before and after are as they were."""
    huge = 2**15000
    older_endpoint.put_record(
        data_dir, DEVICE, 6, "event", T0 + 50, [T0 + 50, {"note": huge, "n": 2**70, "ok": 1}]
    )
    older_endpoint.put_record(data_dir, DEVICE, 7, "alert", T0 + 60, [2**1100, {"score": 1.0}])
    reading = ["motor", T0 + 70, {"current_a": 2**1100}]
    older_endpoint.put_record(data_dir, DEVICE, 8, "telemetry", T0 + 70, reading)
    rc, out = run(capsys, "export", "--data", str(data_dir), "--device", DEVICE, "--format", "json")
    assert rc == 0
    rows = {r["seq"]: r for r in json.loads(out)}
    assert sorted(rows) == [1, 2, 3, 4, 5, 6, 7, 8]
    event = rows[6]["value"]
    # as stored; or its raw bytes where the decoder refuses bignums (agent/wire/records.py)
    assert event == {"note": "<integer of 15001 bits>", "n": str(2**70), "ok": 1} or "raw" in event
    assert "raw" in rows[7]["value"] and "raw" in rows[8]["value"]
    rc, out = run(capsys, "export", "--data", str(data_dir), "--device", DEVICE)
    assert rc == 0
    cells = list(csv.DictReader(io.StringIO(out)))
    assert [c["seq"] for c in cells][-3:] == ["6", "7", "8"] and len(cells) == 9
    assert json.loads(cells[-3]["value"]) == event


def test_devices_add_and_list(data_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out = run(capsys, "devices", "add", "--data", str(data_dir), "rig-2", DEVICE)
    assert rc == 0
    creds = data_dir / "credentials"
    assert out.splitlines() == [  # DEVICE was registered before credentials existed: it gets one
        f"rig-2: credential (generation 1) written to {creds / 'rig-2.json'}",
        f"{DEVICE}: credential (generation 1) written to {creds / (DEVICE + '.json')}",
    ]
    assert (creds / "rig-2.json").stat().st_mode & 0o777 == 0o600
    rc, out = run(capsys, "devices", "add", "--data", str(data_dir), "rig-2")
    assert out.splitlines() == ["rig-2: already registered (devices rekey rig-2 makes a new one)"]
    rc, out = run(capsys, "devices", "list", "--data", str(data_dir), "--json")
    listed = {d["id"]: d for d in json.loads(out)}
    assert listed[DEVICE]["records"] == 5 and listed[DEVICE]["last_seq"] == 5
    assert listed["rig-2"]["records"] == 0 and listed["rig-2"]["last_seen"] is None
    assert run(capsys, "devices", "add", "--data", str(data_dir), "9bad")[0] == cli.EX_USAGE


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0.0.0.0:6000", ("0.0.0.0", 6000)),
        ("[::1]:5684", ("::1", 5684)),
        ("::1", ("::1", 5683)),
        (":0", ("127.0.0.1", 0)),
        ("localhost", ("localhost", 5683)),
    ],
)
def test_parse_listen(text: str, expected: tuple[str, int]) -> None:
    assert cli.parse_listen(text) == expected


@pytest.mark.parametrize("text", ["host:port", "[::1", "h:70000"])
def test_parse_listen_refuses(text: str) -> None:
    with pytest.raises(cli.UsageError):
        cli.parse_listen(text)
