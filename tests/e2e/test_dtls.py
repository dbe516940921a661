"""DTLS-PSK (coaps://), the endpoint's interop profile (docs/dtls.md), against the real thing:
`edge-agent-cloud serve --dtls-listen` as a process and libcoap's coap-client; the refusals (a
device's own state only, a wrong PSK, a revoked or re-keyed device, no authentication); the
agent's uplink over coaps:// delivering exactly once across endpoint restarts (SIGTERM and
SIGKILL); 1,000 malformed datagrams at the DTLS port.

DTLSSocket (the dtls extra) and libcoap3-bin come with ./tools/dev setup; without them these
tests fail with the fix named, they do not skip."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import random
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiocoap
import cbor2
import pytest

from agent.errors import SyncError
from agent.store.queue import NewRecord, Store
from agent.store.settings import StoreSettings
from agent.sync import state as state_mod
from agent.sync import uplink as uplink_mod
from agent.sync.security import ClientSecurity
from agent.sync.state import StateSync
from agent.sync.statedata import StateSettings
from agent.sync.transport import CoapTransport, Endpoints
from agent.sync.uplink import Uplink, UplinkSettings
from agent.wire.credentials import Credential
from agent.wire.records import Kind, TelemetryBody
from cloud import cli
from cloud import dtls as dtls_mod
from cloud.server import CloudServer
from cloud.storage import SQLiteStorage
from drivers.clock import RealClock

ROOT = Path(__file__).resolve().parents[2]
SERVE = (sys.executable, "-m", "cloud.cli", "serve")
COAP_OPENSSL = "coap-client-openssl"
COAP_NOTLS = "coap-client-notls"
DEVICE, OTHER, DOOMED = "pump-01", "pump-02", "pump-03"
PSK = b"pump01-ascii-key"  # 16 bytes, ASCII: coap-client -k takes the key's literal bytes
T0 = 1_700_000_000.0

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(autouse=True)
def dtlssocket() -> None:
    from aiocoap import defaults

    missing = defaults.dtls_missing_modules()
    if missing:
        pytest.fail(
            f"DTLS tests need the Python module(s) {', '.join(missing)}: run ./tools/dev setup "
            "(it installs autoconf and automake and builds DTLSSocket into .venv)",
            pytrace=False,
        )


@pytest.fixture
def libcoap() -> None:
    missing = [tool for tool in (COAP_OPENSSL, COAP_NOTLS) if shutil.which(tool) is None]
    if missing:
        pytest.fail(
            f"not installed: {', '.join(missing)}: run ./tools/dev setup as root "
            "(Debian package libcoap3-bin)",
            pytrace=False,
        )


def cloud_cli(*args: str | Path) -> str:
    proc = subprocess.run(
        [sys.executable, "-m", "cloud.cli", *map(str, args)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


class Served:
    """`edge-agent-cloud serve --listen ... --dtls-listen ...` as a process."""

    def __init__(
        self, data: Path, log: Path, listen: str = "127.0.0.1:0", dtls: str = "127.0.0.1:0"
    ):
        self.data = data
        self.log = log
        with open(log, "ab") as err:
            self.proc = subprocess.Popen(
                [*SERVE, "--listen", listen, "--dtls-listen", dtls, "--data", str(data)],
                cwd=ROOT,
                stdout=subprocess.PIPE,
                stderr=err,
            )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().decode()  # the test's timeout bounds this
        match = re.search(r"listening on coap://([\d.]+):(\d+), coaps://[\d.]+:(\d+),", line)
        assert match, line + log.read_text()
        self.host = match.group(1)
        self.port, self.dtls_port = int(match.group(2)), int(match.group(3))

    @property
    def coaps(self) -> str:
        return f"coaps://{self.host}:{self.dtls_port}"

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout=30)

    def restart(self, sig: int) -> Served:
        """Stop (SIGTERM: cleanly; SIGKILL: a crash) and start again on the same ports."""
        self.stop(sig)
        return Served(self.data, self.log, f"127.0.0.1:{self.port}", f"127.0.0.1:{self.dtls_port}")


@pytest.fixture
def data(tmp_path: Path) -> Path:
    """A data directory with DEVICE (PSK from a file), OTHER and DOOMED (generated PSKs)."""
    data = tmp_path / "data"
    (tmp_path / "psk").write_bytes(PSK + b"\n")
    cloud_cli("devices", "add", "--data", data, DEVICE, "--psk-file", tmp_path / "psk")
    cloud_cli("devices", "add", "--data", data, OTHER, DOOMED)
    cloud_cli("desired", "set", "--data", data, "--device", DEVICE, "sensor/motor/interval=5")
    return data


@pytest.fixture
def served(data: Path, tmp_path: Path) -> Iterator[Served]:
    srv = Served(data, tmp_path / "serve.log")
    try:
        yield srv
    finally:
        rc = srv.stop()
        log = srv.log.read_text()
        assert rc == 0, log
        assert "Traceback" not in log, log


def psk_of(data: Path, name: str) -> bytes:
    return Credential.read(data / "credentials" / f"{name}.json").psk


def coap_get(tool: str, uri: str, out: Path, *args: str, wait: int = 5) -> str:
    """coap-client's output (it exits 0 even when the request failed); the payload of a 2.xx
    answer goes to ``out``."""
    out.unlink(missing_ok=True)
    proc = subprocess.run(
        [tool, "-v", "6", "-B", str(wait), "-o", str(out), *args, "-m", "get", uri],
        capture_output=True,
        timeout=wait + 30,
        check=False,
    )
    return (proc.stdout + proc.stderr).decode("utf-8", "replace")


def answered(text: str, code: str) -> bool:
    """Whether coap-client got a response with ``code`` ("v:1 t:ACK c:2.05 ...", or the
    "4.03 reason" line it prints for an error)."""
    return f"c:{code}" in text or re.search(rf"^{re.escape(code)}\b", text, re.M) is not None


# -- libcoap interop ------------------------------------------------------------------------------


@pytest.mark.usefixtures("libcoap")
def test_libcoap_gets_its_own_state_over_coaps_and_nothing_else(
    served: Served, data: Path, tmp_path: Path
) -> None:
    out = tmp_path / "payload"
    own = f"{served.coaps}/state/{DEVICE}/desired"
    text = coap_get(COAP_OPENSSL, own, out, "-u", DEVICE, "-k", PSK.decode())
    assert answered(text, "2.05"), text
    doc = cbor2.loads(out.read_bytes())
    assert doc["keys"]["sensor/motor/interval"][1] == 5

    # another device's state: authenticated, but not this principal's resource
    text = coap_get(
        COAP_OPENSSL, f"{served.coaps}/state/{OTHER}/desired", out, "-u", DEVICE, "-k", PSK.decode()
    )
    assert answered(text, "4.03"), text
    assert not answered(text, "2.05") and not out.exists()

    # plain CoAP: no authentication, no state
    plain = f"coap://{served.host}:{served.port}/state/{DEVICE}/desired"
    text = coap_get(COAP_NOTLS, plain, out)
    assert answered(text, "4.01"), text
    assert not out.exists()

    # a generated PSK works the same (printable, so -k can carry it)
    other = psk_of(data, OTHER)
    assert other.isascii() and other.decode().isprintable() and len(other) == 16
    text = coap_get(
        COAP_OPENSSL,
        f"{served.coaps}/state/{OTHER}/desired",
        out,
        "-u",
        OTHER,
        "-k",
        other.decode(),
    )
    assert answered(text, "2.05"), text


@pytest.mark.usefixtures("libcoap")
def test_libcoap_with_a_wrong_psk_or_a_revoked_identity_is_refused(
    served: Served, data: Path, tmp_path: Path
) -> None:
    out = tmp_path / "payload"
    own = f"{served.coaps}/state/{DEVICE}/desired"
    # a wrong key: tinydtls drops the client's Finished; libcoap gives up after -B seconds
    text = coap_get(COAP_OPENSSL, own, out, "-u", DEVICE, "-k", "not-the-key", wait=3)
    assert not answered(text, "2.05") and not out.exists(), text
    # an unknown identity: refused at once
    text = coap_get(COAP_OPENSSL, own, out, "-u", "nobody", "-k", PSK.decode(), wait=3)
    assert not answered(text, "2.05") and not out.exists(), text

    doomed = f"{served.coaps}/state/{DOOMED}/desired"
    key = psk_of(data, DOOMED).decode()
    text = coap_get(COAP_OPENSSL, doomed, out, "-u", DOOMED, "-k", key)
    assert answered(text, "2.05"), text
    cloud_cli("devices", "revoke", "--data", data, DOOMED)  # the running endpoint notices
    for _ in range(120):  # the endpoint reads the registry again within a second
        time.sleep(0.25)
        text = coap_get(COAP_OPENSSL, doomed, out, "-u", DOOMED, "-k", key, wait=3)
        if not answered(text, "2.05"):
            break
    assert not answered(text, "2.05") and not out.exists(), text
    text = coap_get(COAP_OPENSSL, doomed, out, "-u", DOOMED, "-k", key, wait=3)  # at the lookup
    assert not answered(text, "2.05") and not out.exists(), text
    # ... and the others are served as before
    text = coap_get(COAP_OPENSSL, own, out, "-u", DEVICE, "-k", PSK.decode())
    assert answered(text, "2.05"), text
    assert f"event=dtls_identity_refused identity='{DOOMED}'" in served.log.read_text()


@pytest.mark.usefixtures("libcoap")
def test_libcoap_another_identity_from_the_same_port_is_served(
    served: Served, data: Path, tmp_path: Path
) -> None:
    """A client restarted on the same port, or a NAT that gives the port to another device."""
    out = tmp_path / "payload"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    for name, key in ((DEVICE, PSK.decode()), (OTHER, psk_of(data, OTHER).decode())):
        uri = f"{served.coaps}/state/{name}/desired"
        text = coap_get(COAP_OPENSSL, uri, out, "-p", port, "-u", name, "-k", key)
        assert answered(text, "2.05"), text
    # (the served fixture checks that the endpoint logged no traceback)


# -- the endpoint in-process --------------------------------------------------------------------


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[CloudServer]:
    srv = await CloudServer.start(tmp_path / "cloud", "127.0.0.1", 0, dtls_listen=("127.0.0.1", 0))
    yield srv
    await srv.stop()


async def dtls_client(cred: Credential, uri: str) -> aiocoap.Context:
    ctx = await aiocoap.Context.create_client_context(transports=["tinydtls"])
    entry = {"dtls": {"psk": cred.psk, "client-identity": cred.principal.encode()}}
    ctx.client_credentials.load_from_dict({f"{uri}/*": entry})
    return ctx


async def get_code(ctx: aiocoap.Context, uri: str, within: float = 5.0) -> str:
    """The answer's code, or the name of the error."""
    request = ctx.request(aiocoap.Message(code=aiocoap.GET, uri=uri))
    try:
        async with asyncio.timeout(within):
            response = await request.response
    except (TimeoutError, aiocoap.error.Error) as err:
        request.response.cancel()
        return type(err).__name__
    return str(response.code)


async def test_revoked_and_rekeyed_devices_lose_their_sessions(server: CloudServer) -> None:
    assert server.dtls is not None
    cred = await server.register(DEVICE)
    uri = f"{server.dtls.uri}/state/{DEVICE}/desired"
    ctx = await dtls_client(cred, server.dtls.uri)
    try:
        assert await get_code(ctx, uri) == "2.05 Content"
        await server.revoke(DEVICE)  # the live session ends (close_notify), new ones are refused
        assert await get_code(ctx, uri) != "2.05 Content"
        assert await get_code(ctx, uri) != "2.05 Content"
        assert server.dtls.ended == 1
    finally:
        await ctx.shutdown()

    new = await server.register(DEVICE)  # re-keyed: the new key works, the old one does not
    ctx = await dtls_client(new, server.dtls.uri)
    try:
        assert await get_code(ctx, uri) == "2.05 Content"
    finally:
        await ctx.shutdown()
    stale = dataclasses.replace(cred, psk=b"0123456789abcdef")
    ctx = await dtls_client(stale, server.dtls.uri)
    try:
        assert await get_code(ctx, uri, within=3.0) != "2.05 Content"
    finally:
        await ctx.shutdown()
    assert server.dtls.credentials.refused >= 2


async def test_any_address_is_refused_with_the_fix(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="any-address"):
        await CloudServer.start(tmp_path / "a", "127.0.0.1", 0, dtls_listen=("0.0.0.0", 0))
    proc = await asyncio.to_thread(
        subprocess.run,
        [*SERVE, "--listen", "127.0.0.1:0", "--dtls-listen", "[::]:5684", "--data", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == cli.EX_USAGE, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "--dtls-listen" in lines[0] and "e.g." in lines[0], lines


def malformed(i: int, rnd: random.Random) -> bytes:
    """Random bytes, and DTLS 1.2 shaped records with wrong lengths, epochs and ClientHellos."""
    kind = i % 4
    if kind == 0:
        return rnd.randbytes(rnd.randrange(0, 1400))
    body = rnd.randbytes(rnd.randrange(0, 300))
    ctype = rnd.choice([20, 21, 22, 23, 24, 25, 0, 255])
    epoch = rnd.choice([0, 0, 1, 0xFFFF])
    seq = rnd.randrange(0, 2**48).to_bytes(6, "big")
    length = len(body) if kind != 3 else rnd.randrange(0, 65536)
    if kind == 2:  # a handshake record holding a ClientHello with a garbage tail
        body = (
            bytes([1])
            + rnd.randrange(0, 2**24).to_bytes(3, "big")
            + rnd.randbytes(5)
            + rnd.randrange(0, 2**24).to_bytes(3, "big")
            + b"\xfe\xfd"
            + rnd.randbytes(rnd.randrange(0, 200))
        )
        ctype, epoch, length = 22, 0, len(body)
    return struct.pack("!BHH", ctype, 0xFEFD, epoch) + seq + struct.pack("!H", length) + body


async def test_malformed_datagrams_leave_the_endpoint_serving(
    server: CloudServer, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert server.dtls is not None
    caplog.set_level(logging.INFO)
    monkeypatch.setattr(dtls_mod, "MAX_PEERS", 50)  # the peer table is bounded: LRU first out
    cred = await server.register(DEVICE)
    uri = f"{server.dtls.uri}/state/{DEVICE}/desired"
    target = ("127.0.0.1", server.dtls.port)
    rnd = random.Random(1234)
    one = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        for i in range(1000):
            if i % 2:
                one.sendto(malformed(i, rnd), target)
            else:  # from a new source port each: a new peer state each
                with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as fresh:
                    fresh.sendto(malformed(i, rnd), target)
            if i % 50 == 49:
                await asyncio.sleep(0.01)  # let the endpoint read them
    finally:
        one.close()
    assert server.dtls.peers <= 50 and server.dtls.evicted > 0
    ctx = await dtls_client(cred, server.dtls.uri)
    try:
        assert await get_code(ctx, uri) == "2.05 Content"
    finally:
        await ctx.shutdown()
    bad = [r for r in caplog.records if r.exc_info or "Traceback" in r.getMessage()]
    assert not bad, [r.getMessage() for r in bad]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


# -- the agent ----------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def fast_idle(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(uplink_mod, "IDLE_POLL", 0.2)


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    st = await Store.open(StoreSettings(path=tmp_path / "queue.db", budget_bytes=64 << 20))
    yield st
    await st.close()


def telemetry(i: int) -> NewRecord:
    body = TelemetryBody("motor", T0 + i, {"current_a": 1.0 + i / 1000, "supply_v": 230.0})
    return NewRecord(Kind.TELEMETRY, body.to_cbor(), created=T0 + i)


async def drained(store: Store, within: float = 60.0) -> None:
    async with asyncio.timeout(within):
        while (await store.stats()).depth:  # noqa: ASYNC110
            await asyncio.sleep(0.05)


async def test_agent_uplink_over_coaps_delivers_exactly_once_across_restarts(
    data: Path, tmp_path: Path, store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="agent.sync.transport")
    cred = Credential.read(data / "credentials" / f"{DEVICE}.json")
    srv = await asyncio.to_thread(Served, data, tmp_path / "serve.log")
    uris = (srv.coaps,)
    security = ClientSecurity("dtls", uris, cred, tmp_path / "oscore.json")
    clock = RealClock()
    cfg = UplinkSettings(
        endpoints=uris,
        security="dtls",
        batch_records=40,
        deadline=2.0,
        backoff_base=0.05,
        backoff_max=1.0,
        max_inflight=4,
    )
    transport = CoapTransport(clock, lanes=cfg.max_inflight, uris=uris, security=security)
    endpoints = Endpoints(cfg.endpoints, clock, primary_retry=cfg.primary_retry)
    uplink = Uplink(cfg, store, transport, endpoints, clock, device_id=DEVICE, rng=random.Random(1))
    task = asyncio.create_task(uplink.run())
    seqs: list[int] = []
    try:
        seqs += await store.put([telemetry(i) for i in range(300)])
        await drained(store)
        # a clean restart (close_notify to the agent), then a crash: the agent's sessions go
        # stale without a word, and it recovers either with new contexts after a missed deadline
        # (event=lane_reset) or with a new handshake when its transport saw the port closed
        # while the endpoint was down, whichever the timing gives; what must hold either way is
        # below: every record delivered, once
        for n, sig in enumerate((signal.SIGTERM, signal.SIGKILL), start=1):
            srv = await asyncio.to_thread(srv.restart, sig)
            seqs += await store.put([telemetry(1000 * n + i) for i in range(300)])
            await drained(store, within=90)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await transport.close()
        assert await asyncio.to_thread(srv.stop) == 0
    storage = SQLiteStorage.in_dir(data)
    try:
        assert storage.seqs(DEVICE) == sorted(seqs)  # every record, once
    finally:
        storage.close()
    assert "Traceback" not in srv.log.read_text()


async def test_an_observation_after_an_endpoint_crash_gets_a_new_session(
    data: Path, tmp_path: Path
) -> None:
    cred = Credential.read(data / "credentials" / f"{DEVICE}.json")
    srv = await asyncio.to_thread(Served, data, tmp_path / "serve.log")
    uris = (srv.coaps,)
    security = ClientSecurity("dtls", uris, cred, tmp_path / "oscore.json")
    transport = CoapTransport(RealClock(), lanes=1, uris=uris, security=security)
    uri = f"{srv.coaps}/state/{DEVICE}/desired"

    async def first_answer() -> str:
        stream = transport.observe(uri, deadline=2.0)
        try:
            return (await anext(stream)).dotted
        finally:
            await stream.aclose()

    try:
        assert await first_answer() == "2.05"
        srv = await asyncio.to_thread(srv.restart, signal.SIGKILL)
        with pytest.raises(SyncError, match="no answer"):
            await first_answer()  # the endpoint drops the old session's records
        assert await first_answer() == "2.05"  # the lane's new context made a new handshake
    finally:
        await transport.close()
        assert await asyncio.to_thread(srv.stop) == 0


class Applied:
    """The runtime's side of state sync: records the desired values applied."""

    def __init__(self) -> None:
        self.values: dict[str, Any] = {}

    def reported(self) -> dict[str, Any]:
        return {"agent/version": "0.1.0", "sensor/motor/interval": 1.0}

    def apply(self, key: str, value: Any) -> None:
        self.values[key] = value


async def test_state_sync_over_coaps_recovers_from_an_endpoint_crash(
    data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(state_mod, "BACKOFF_BASE", 0.05)
    monkeypatch.setattr(state_mod, "BACKOFF_CAP", 0.5)
    cred = Credential.read(data / "credentials" / f"{DEVICE}.json")
    srv = await asyncio.to_thread(Served, data, tmp_path / "serve.log")
    uris = (srv.coaps,)
    clock = RealClock()
    security = ClientSecurity("dtls", uris, cred, tmp_path / "oscore.json")
    transport = CoapTransport(clock, lanes=1, uris=uris, security=security)
    hooks = Applied()
    sync = StateSync(
        StateSettings(report_interval=0.5, min_put_interval=0.02, deadline=2.0),
        transport,
        Endpoints(uris, clock),
        clock,
        device_id=DEVICE,
        hooks=hooks,
        state_path=tmp_path / "state.cbor",
    )
    task = asyncio.create_task(sync.run())

    async def applied(value: int) -> None:
        async with asyncio.timeout(60):  # well below the observation's Max-Age (300 s)
            while hooks.values.get("sensor/motor/interval") != value:  # noqa: ASYNC110
                await asyncio.sleep(0.05)

    try:
        await applied(5)  # observed over coaps
        # a crash: the observation and the lane's session are dead; the next missed deadline
        # replaces the lane's context, the observation ends, and is registered again
        srv = await asyncio.to_thread(srv.restart, signal.SIGKILL)
        cloud_cli("desired", "set", "--data", data, "--device", DEVICE, "sensor/motor/interval=7")
        await applied(7)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await transport.close()
        assert await asyncio.to_thread(srv.stop) == 0
