"""The gateway's reported-state relay (agent/gateway/relay.py StateRelay.reported_once) against the
real cloud endpoint on loopback, when the cloud refuses one device's state: that device costs no
other device and none of its own keys but the refused one.

- A value the gateway stored before the decoder refused it (a text with a NUL) makes the cloud
  answer 4.00 to the PUT holding it: the halves go again until the key is alone, which is said
  once and not sent again until the device gives it a new version; the devices after it go on.
  Before, the pass ended with SyncError at that device, every pass, for ever.
- A refusal of who asks (4.04: the cloud does not know the device) is said once and tried again
  each pass; the keys go up once the device is registered.
- No answer at all ends the pass (SyncError) and marks nothing: everything goes next pass.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import aiocoap
import aiocoap.resource
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.errors import SyncError
from agent.gateway import relay as relay_mod
from agent.gateway.relay import StateRelay
from agent.modelstore.fetch import ModelFetcher
from agent.sync.transport import CoapTransport
from agent.wire.statedoc import DesiredDoc, Entry
from cloud.models import entry_for
from cloud.server import CloudServer
from cloud.storage import SQLiteStorage
from drivers.clock import RealClock
from tools.ports import free_port

ROOT = Path(__file__).resolve().parents[3]

pytestmark = pytest.mark.timeout(60)

A, B, C = "pump-01", "pump-02", "pump-03"
BAD_KEY = "sensor/bme280/error"
T = int(time.time() * 1000)


@pytest.fixture
async def cloud(tmp_path: Path) -> AsyncIterator[CloudServer]:
    srv = await CloudServer.start(tmp_path / "cloud", "127.0.0.1", free_port(), allow_plain=True)
    for device in (A, B):
        await srv.add_device(device)
    yield srv
    await srv.stop()


@pytest.fixture
def site(tmp_path: Path) -> Iterator[SQLiteStorage]:
    """The gateway's store, holding what its devices PUT (as before the NUL was refused)."""
    store = SQLiteStorage.in_dir(tmp_path / "gateway")
    held = {
        A: {"agent/version": "1.0", BAD_KEY: "i2c\x00garbage", "queue/depth": 3},
        B: {"agent/version": "1.1", "queue/depth": 1},
        C: {"agent/version": "1.2"},
    }
    for device, values in held.items():
        store.add_device(device, time.time())
        entries = {k: Entry(T + i, v) for i, (k, v) in enumerate(values.items())}
        store.put_reported(device, entries, time.time())
    yield store
    store.close()


@pytest.fixture
async def transport() -> AsyncIterator[CoapTransport]:
    t = CoapTransport(RealClock())
    yield t
    await t.close()


def state_relay(
    site: SQLiteStorage, transport: CoapTransport, uri: Callable[[], str], *devices: str
) -> StateRelay:
    async def db(fn: Callable[[SQLiteStorage], Any]) -> Any:
        return fn(site)

    async def no_model(*_: Any) -> bool:
        raise AssertionError("reported_once touches no model")

    fetcher: Any = None  # reported_once fetches no model
    return StateRelay(
        db,
        transport,
        uri,
        lambda: devices,
        on_desired=no_model,
        fetcher=fetcher,
        put_model=no_model,
        has_model=no_model,
        scratch=Path("/nonexistent"),  # reported_once fetches no model
    )


def refusals(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [m for m in caplog.messages if "event=relay_reported_refused" in m]


async def test_attack_a_nul_value_held_by_the_gateway_costs_only_its_key(
    cloud: CloudServer,
    site: SQLiteStorage,
    transport: CoapTransport,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="agent.gateway")
    relay = state_relay(site, transport, lambda: cloud.uri, A, B)
    assert await relay.reported_once() == 4  # all but the refused key
    got_a, got_b = await cloud.reported(A), await cloud.reported(B)
    assert got_a == {"agent/version": Entry(T, "1.0"), "queue/depth": Entry(T + 2, 3)}
    assert got_b == {"agent/version": Entry(T, "1.1"), "queue/depth": Entry(T + 1, 1)}
    said = refusals(caplog)
    assert len(said) == 2, said
    assert f"device={A} code=4.00" in said[0] and "action=split" in said[0]
    assert f"keys={BAD_KEY} action=not_sent" in said[1] and "NUL character" in said[1]

    assert await relay.reported_once() == 0  # its version is settled: not sent, not said again
    assert len(refusals(caplog)) == 2

    site.put_reported(A, {BAD_KEY: Entry(T + 10, "i2c timeout")}, time.time())
    assert await relay.reported_once() == 1  # a new version goes up
    assert (await cloud.reported(A))[BAD_KEY] == Entry(T + 10, "i2c timeout")


async def test_a_device_the_cloud_does_not_know_is_tried_again_and_costs_no_other(
    cloud: CloudServer,
    site: SQLiteStorage,
    transport: CoapTransport,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="agent.gateway")
    relay = state_relay(site, transport, lambda: cloud.uri, C, B)
    assert await relay.reported_once() == 2  # B's keys; C answered 4.04
    assert await relay.reported_once() == 0
    said = refusals(caplog)
    assert len(said) == 1 and f"device={C} code=4.04" in said[0]  # said once, tried each pass
    assert "action=retry_next_pass" in said[0]
    await cloud.add_device(C)
    assert await relay.reported_once() == 1
    assert await cloud.reported(C) == {"agent/version": Entry(T, "1.2")}


async def test_no_answer_ends_the_pass_and_marks_nothing(
    cloud: CloudServer,
    site: SQLiteStorage,
    transport: CoapTransport,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(relay_mod, "REQUEST_DEADLINE", 1.0)
    nowhere = f"coap://127.0.0.1:{free_port()}"
    uri = [nowhere]
    relay = state_relay(site, transport, lambda: uri[0], B)
    with pytest.raises(SyncError):
        await relay.reported_once()
    uri[0] = cloud.uri
    assert await relay.reported_once() == 2


def desired_relay(
    transport: CoapTransport, uri: str, mirrored: dict[str, Any], scratch: Path, *devices: str
) -> StateRelay:
    """A relay of desired documents: ``mirrored`` gets each document mirrored; the cloud's
    registry is the fetcher's (the models a document assigns are fetched from it)."""

    async def no_model(*_: Any) -> bool:
        return False

    async def db(fn: Callable[[Any], Any]) -> Any:
        raise AssertionError("desired_once reads nothing of the gateway's store")

    async def mirror(device: str, doc: DesiredDoc) -> None:
        mirrored[device] = doc

    return StateRelay(
        db,
        transport,
        lambda: uri,
        lambda: devices,
        on_desired=mirror,
        fetcher=ModelFetcher(transport, uri),
        put_model=no_model,
        has_model=no_model,
        scratch=scratch,
    )


async def test_a_device_whose_desired_document_the_cloud_refuses_costs_no_other(
    cloud: CloudServer, transport: CoapTransport, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="agent.gateway")
    await cloud.set_desired(B, {"detect/anomaly/threshold": 0.7})
    mirrored: dict[str, Any] = {}
    relay = desired_relay(transport, cloud.uri, mirrored, tmp_path, C, B)  # C: 4.04 at the cloud
    assert await relay.desired_once() == 1
    assert mirrored[B].entries["detect/anomaly/threshold"].value == 0.7
    assert C not in mirrored
    assert await relay.desired_once() == 0  # tried again; said once
    said = [m for m in caplog.messages if "event=relay_desired_refused" in m]
    assert len(said) == 1 and f"device={C} code=4.04" in said[0], said
    await cloud.add_device(C)
    assert await relay.desired_once() == 1
    assert C in mirrored


async def test_attack_an_assigned_model_the_registry_lacks_costs_no_other_device(
    cloud: CloudServer, transport: CoapTransport, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="agent.gateway")
    await cloud.set_desired(A, {"model/anomaly": {"name": "ghost", "version": "9.9"}})
    await cloud.set_desired(B, {"detect/anomaly/threshold": 0.7})
    mirrored: dict[str, Any] = {}
    relay = desired_relay(transport, cloud.uri, mirrored, tmp_path, A, B)
    assert await relay.desired_once() == 1
    assert list(mirrored) == [B]  # A's assignment waits for a model the gateway has
    said = [m for m in caplog.messages if "event=relay_desired_refused" in m]
    assert len(said) == 1 and f"device={A}" in said[0] and "ghost" in said[0], said


async def test_a_model_download_cut_by_the_uplink_resumes_where_it_stopped(
    cloud: CloudServer, transport: CoapTransport, tmp_path: Path
) -> None:
    """docs/gateway.md: a model version is fetched by the gateway once (Block2, resumable).
    Before, each try downloaded into a new temporary directory: a download the uplink cut
    started again from the first block at the next poll (a model larger than what a poor
    uplink carries between two cuts never arrived, and its devices never saw the assignment)."""
    file = ROOT / "models" / "cloud" / "skab-ae.float32.tflite"
    assert cloud.models is not None
    cloud.models.publish(
        file.read_bytes(), "skab-ae", "9", entry_for(file, entry_name="skab-ae"),
        Ed25519PrivateKey.generate(),
    )  # fmt: skip
    stored: dict[tuple[str, str], bytes] = {}

    async def put_model(name: str, version: str, manifest: bytes, data: bytes) -> bool:
        stored[(name, version)] = data
        return True

    relay = desired_relay(transport, cloud.uri, {}, tmp_path / "scratch", A)
    relay.put_model = put_model
    asked: list[int] = []
    cut = [True]
    get = relay.fetcher._get

    async def cut_at_block_5(uri: str, deadline: float, block: int | None = None, lane: int = 0):
        if block is not None:
            asked.append(block)
        if block == 5 and cut:
            cut.clear()
            raise SyncError(f"GET {uri}: the uplink is down")
        return await get(uri, deadline, block, lane)

    relay.fetcher._get = cut_at_block_5  # type: ignore[method-assign]
    with pytest.raises(SyncError):
        await relay.fetch_model("skab-ae", "9")
    assert asked == [0, 1, 2, 3, 4, 5]
    asked.clear()
    await relay.fetch_model("skab-ae", "9")
    assert asked == list(range(5, 12))  # from where the cut left it
    assert stored[("skab-ae", "9")] == file.read_bytes()
    assert list(relay.scratch.iterdir()) == []  # the partial gone once the model is kept


class _Garbled(aiocoap.resource.Resource):
    """A desired document that does not parse (a damaged or foreign endpoint's answer)."""

    async def render_get(self, request: aiocoap.Message) -> aiocoap.Message:
        return aiocoap.Message(code=aiocoap.CONTENT, payload=b"\x81\x01", content_format=60)


async def test_attack_a_desired_document_that_does_not_parse_is_said_once(
    transport: CoapTransport, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A document the gateway cannot read was said as a warning at every poll (every 30 s,
    per device, for as long as the endpoint serves it); now once, as a refusal."""
    site = aiocoap.resource.Site()
    site.add_resource(["state", A, "desired"], _Garbled())
    port = free_port()
    server = await aiocoap.Context.create_server_context(site, bind=("127.0.0.1", port))
    try:
        mirrored: dict[str, Any] = {}
        relay = desired_relay(transport, f"coap://127.0.0.1:{port}", mirrored, tmp_path, A)
        caplog.set_level(logging.INFO, logger="agent.gateway")
        for _ in range(3):
            assert await relay.desired_once() == 0
        assert mirrored == {}
        said = [m for m in caplog.messages if f"device={A}" in m]
        assert len(said) == 1 and "expected {rev, keys" in said[0], said
    finally:
        await server.shutdown()
