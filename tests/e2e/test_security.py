"""Trust on the network: the attacks that worked against plain CoAP, tried against the endpoint
as it runs by default (OSCORE required), each refused with the code named; hostile OSCORE
messages; nonces never reused across SIGKILLs of a device. A real endpoint on loopback, the
agent's real transport and security code, raw UDP for the attacker."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import signal
import socket
import sys
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiocoap
import pytest
from aiocoap import Code, Message, oscore
from aiocoap.numbers.optionnumbers import OptionNumber
from aiocoap.optiontypes import OpaqueOption

from agent.errors import SyncError
from agent.sync.security import ClientSecurity
from agent.sync.transport import CoapTransport, Response
from agent.wire import records
from agent.wire.batch import IngestAck, WireRecord
from agent.wire.codec import encode_batch
from agent.wire.credentials import Credential
from agent.wire.records import TelemetryBody
from cloud.protocol import AMPLIFICATION_LIMIT, wire_size
from cloud.server import CloudServer
from drivers.clock import RealClock

T0 = 1_700_000_000.0
A, B = "pump-01", "pump-02"


def batch(device: str, seqs: range, value: float = 1.0) -> bytes:
    recs = [
        WireRecord(
            s,
            "telemetry",
            T0 + s,
            TelemetryBody("motor", T0 + s, {"current_a": value}).to_cbor(),
        )
        for s in seqs
    ]
    return encode_batch(device, recs)


class Principal:
    """A principal's side: its credential file, its OSCORE state, its transport."""

    def __init__(self, server: CloudServer, cred_dir: Path, name: str) -> None:
        self.server, self.name, self.dir = server, name, cred_dir / name
        self.dir.mkdir(parents=True)
        self.transport: CoapTransport | None = None
        self.security: ClientSecurity | None = None

    async def open(self, role: str = "device") -> Principal:
        cred = await self.server.register(self.name, role)
        cred.write(self.dir / "credential.json")
        return self.connect()

    def connect(self) -> Principal:
        uris = (self.server.uri,)
        self.security = ClientSecurity.open(
            "oscore", uris, self.dir / "credential.json", self.dir / "oscore.json"
        )
        self.transport = CoapTransport(RealClock(), uris=uris, security=self.security)
        return self

    async def req(
        self, method: str, path: str, payload: bytes = b"", cf: int | None = None
    ) -> Response:
        assert self.transport is not None
        return await self.transport.request(
            method, f"{self.server.uri}/{path}", payload, content_format=cf, deadline=20
        )

    async def close(self) -> None:
        if self.transport is not None:
            await self.transport.close()
        if self.security is not None:
            self.security.close()


@pytest.fixture
async def plain() -> AsyncIterator[aiocoap.Context]:
    ctx = await aiocoap.Context.create_client_context(transports=["udp6"])
    yield ctx
    await ctx.shutdown()


async def ask(ctx: aiocoap.Context, msg: Message) -> Message:
    async with asyncio.timeout(20):
        return await ctx.request(msg).response


@pytest.mark.timeout(90)
async def test_unauthenticated_peer_reads_nothing_and_writes_nothing(
    server: CloudServer, plain: aiocoap.Context, tmp_path: Path
) -> None:
    """Attacks from an unrelated UDP port (plain CoAP): registry, reported and desired state,
    the device list, a desired PUT, a forged batch, /validate: all 4.01; discovery lists nothing
    device-specific; no answer is larger than 3x its request."""
    a = await Principal(server, tmp_path, A).open()
    try:
        u = server.uri
        attacks = [
            Message(code=Code.GET, uri=f"{u}/devices/{A}"),
            Message(code=Code.GET, uri=f"{u}/state/{A}/reported"),
            Message(code=Code.GET, uri=f"{u}/state/{A}/desired"),
            Message(
                code=Code.PUT,
                uri=f"{u}/state/{A}/desired",
                payload=records.dumps({"sensor/motor/enabled": False, "detect/x/threshold": 1e300}),
                content_format=60,
            ),
            Message(
                code=Code.POST,
                uri=f"{u}/ingest/{A}",
                payload=batch(A, range(1, 50)),
                content_format=112,
            ),
            Message(
                code=Code.POST,
                uri=f"{u}/validate/{A}",
                payload=records.dumps({"seq": 9}),
                content_format=60,
            ),
            Message(code=Code.GET, uri=f"{u}/models/skab-ae"),
        ]
        for msg in attacks:
            resp = await ask(plain, msg)
            assert resp.code == Code.UNAUTHORIZED, (msg.code, msg.opt.uri_path, resp.code)
            assert wire_size(resp, msg.token) <= AMPLIFICATION_LIMIT * wire_size(msg)
        wkc = await ask(plain, Message(code=Code.GET, uri=f"{u}/.well-known/core"))
        assert wkc.code == Code.CONTENT and A.encode() not in wkc.payload
        assert wire_size(wkc, b"") <= AMPLIFICATION_LIMIT * wire_size(
            Message(code=Code.GET, uri=f"{u}/.well-known/core")
        )
        assert await server.seqs(A) == []  # the forged batch stored nothing
        doc = await server.desired(A)
        assert doc.rev == 0  # the desired PUT changed nothing
    finally:
        await a.close()


@pytest.mark.timeout(90)
async def test_a_device_reaches_only_its_own_resources(server: CloudServer, tmp_path: Path) -> None:
    """Device B with its own valid credential: posting as A, reading A's state, putting A's
    reported state (a forged failure report), asking /validate for A, setting desired state:
    4.03. Its own ingest works; an operator sets desired state."""
    a = await Principal(server, tmp_path, A).open()
    b = await Principal(server, tmp_path, B).open()
    op = await Principal(server, tmp_path, "alice").open("operator")
    try:
        own = await b.req("POST", f"ingest/{B}", batch(B, range(1, 4)), 112)
        assert own.dotted == "2.04" and set(IngestAck.from_cbor(own.payload).seqs()) == {1, 2, 3}
        forged_report = records.dumps({"model/anomaly": [5, {"status": "failed"}]})
        for method, path, body, cf in [
            ("POST", f"ingest/{A}", batch(A, range(1, 4)), 112),
            ("GET", f"state/{A}/desired", b"", None),
            ("GET", f"devices/{A}", b"", None),
            ("PUT", f"state/{A}/reported", forged_report, 60),
            ("POST", f"validate/{A}", records.dumps({"seq": 1}), 60),
            ("PUT", f"state/{B}/desired", records.dumps({"sensor/motor/interval": 9.0}), 60),
        ]:
            resp = await b.req(method, path, body, cf)
            assert resp.dotted == "4.03", (method, path, resp.dotted, resp.payload)
        assert await server.seqs(A) == []
        put = await op.req(
            "PUT", f"state/{A}/desired", records.dumps({"sensor/motor/interval": 2.0}), 60
        )
        assert put.dotted == "2.04"
        seen = await a.req("GET", f"state/{A}/desired")
        assert seen.dotted == "2.05" and b"sensor/motor/interval" in seen.payload
    finally:
        for p in (a, b, op):
            await p.close()


async def refused(p: Principal, path: str, caplog: pytest.LogCaptureFixture, why: str) -> None:
    """The endpoint refuses ``p``'s request with an unprotected OSCORE error (RFC 8613 8.2: 4.01
    for an unknown context, 4.00 when decryption fails): the device cannot take it for an
    answer, and the endpoint logged why."""
    caplog.clear()
    with pytest.raises(SyncError, match="NotAProtectedMessage"):
        await p.req("GET", path)
    assert why in caplog.text, caplog.text[-2000:]


@pytest.mark.timeout(90)
async def test_unknown_revoked_rekeyed_and_borrowed_identities_are_refused(
    server: CloudServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A message with another device's key id but the sender's own key (4.00), a revoked
    device, an expired (re-keyed) credential's context and a credential the endpoint never
    issued (4.01)."""
    caplog.set_level(logging.INFO)
    a = await Principal(server, tmp_path, A).open()
    b = await Principal(server, tmp_path, B).open()
    try:
        assert (await a.req("GET", f"devices/{A}")).dotted == "2.05"
        assert a.security is not None and a.security.credential is not None
        assert b.security is not None
        b.security.context.sender_id = a.security.credential.sender_id
        await refused(b, f"devices/{A}", caplog, "Decryption failed")
        assert await server.revoke(A)
        await refused(a, f"devices/{A}", caplog, "Security context not found")
        fresh = await Principal(server, tmp_path / "new", A).open()  # re-key: a new credential
        try:
            assert (await fresh.req("GET", f"devices/{A}")).dotted == "2.05"
            await refused(a, f"devices/{A}", caplog, "Security context not found")
        finally:
            await fresh.close()
        stranger = Principal(server, tmp_path / "x", "pump-99")
        await server.add_device("pump-99")
        bogus = Credential.generate("pump-99", "device", b"\xde\xad\xbe\xef")
        bogus.write(stranger.dir / "credential.json")
        stranger.connect()
        try:
            await refused(stranger, "devices/pump-99", caplog, "Security context not found")
        finally:
            await stranger.close()
    finally:
        await a.close()
        await b.close()


class Recorder:
    """A UDP relay between a device and the endpoint that keeps every datagram the device sent
    and the OSCORE Partial IVs in them."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.datagrams: list[bytes] = []
        self.pivs: list[tuple[int, int]] = []  # (message id, partial iv)
        self.port = 0
        self._transports: list[asyncio.DatagramTransport] = []
        self._pending: set[asyncio.Future[None]] = set()

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        rec = self
        clients: dict[tuple[str, int], asyncio.DatagramTransport] = {}
        pending: set[asyncio.Future[None]] = self._pending

        class Up(asyncio.DatagramProtocol):
            def __init__(self, addr: tuple[str, int]) -> None:
                self.addr = addr

            def datagram_received(self, data: bytes, _addr: tuple[str, int]) -> None:
                front.sendto(data, self.addr)

        class Front(asyncio.DatagramProtocol):
            def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
                rec.datagrams.append(data)
                try:
                    msg = Message.decode(data)
                    piv = oscore.verify_start(msg).get(oscore.COSE_PIV)
                    if piv is not None:
                        rec.pivs.append((msg.mid, int.from_bytes(piv, "big")))
                except Exception:  # not ours to judge: relay it
                    pass
                up = clients.get(addr)
                if up is None:
                    task = loop.create_datagram_endpoint(lambda: Up(addr), remote_addr=rec.target)
                    pending.add(asyncio.ensure_future(self._send_later(task, addr, data)))
                    return
                up.sendto(data)

            async def _send_later(self, task: object, addr: tuple[str, int], data: bytes) -> None:
                transport, _ = await task  # type: ignore[misc]
                clients[addr] = transport
                rec._transports.append(transport)
                transport.sendto(data)

        front, _ = await loop.create_datagram_endpoint(Front, local_addr=("127.0.0.1", 0))
        self._transports.append(front)
        self.port = front.get_extra_info("sockname")[1]

    def close(self) -> None:
        for t in self._transports:
            t.close()


_DEVICE_SCRIPT = r"""
import asyncio, sys
from pathlib import Path
from typing import Any
from agent.errors import SyncError
from agent.sync.security import ClientSecurity
from agent.sync.transport import CoapTransport
from drivers.clock import RealClock
d, uri = Path(sys.argv[1]), sys.argv[2]
async def main():
    sec = ClientSecurity.open("oscore", (uri,), d / "credential.json", d / "oscore.json")
    t = CoapTransport(RealClock(), uris=(uri,), security=sec)
    print("ready", flush=True)
    while True:
        await t.request("GET", f"{uri}/devices/pump-01", deadline=10)
asyncio.run(main())
"""


@pytest.mark.timeout(240)
async def test_fifty_sigkills_never_reuse_a_sequence_number(
    server: CloudServer, tmp_path: Path
) -> None:
    """A device process is SIGKILLed 50 times at random moments while it makes requests; the
    endpoint side (a relay in front of it) sees every Partial IV once (a retransmission repeats
    its message id too), and old datagrams replayed afterwards are refused."""
    a = Principal(server, tmp_path, A)
    (await server.register(A)).write(a.dir / "credential.json")
    relay = Recorder(("127.0.0.1", server.port))
    await relay.start()
    uri = f"coap://127.0.0.1:{relay.port}"
    rng = random.Random(50)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    try:
        for _ in range(50):
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-c",
                _DEVICE_SCRIPT,
                str(a.dir),
                uri,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.DEVNULL,
                env=env,
            )
            assert proc.stdout is not None
            await asyncio.wait_for(proc.stdout.readline(), 30)
            await asyncio.sleep(rng.uniform(0.05, 0.4))
            proc.send_signal(signal.SIGKILL)
            await proc.wait()
        uses: dict[int, set[int]] = {}
        for mid, piv in relay.pivs:
            uses.setdefault(piv, set()).add(mid)
        reused = {piv: mids for piv, mids in uses.items() if len(mids) > 1}
        assert len(uses) > 50 and not reused, f"partial IVs sent in different messages: {reused}"
        # the endpoint answered them: the device's data is intact and replays are refused
        replay = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        replay.setblocking(False)
        loop = asyncio.get_running_loop()
        refused: Counter[str] = Counter()
        requests = [d for d in relay.datagrams if Message.decode(d).code.is_request()]
        before = await server.seqs(A)
        for data in requests[:: max(1, len(requests) // 40)]:
            raw = bytearray(data)
            raw[2:4] = ((int.from_bytes(raw[2:4], "big") + 1) % 65536).to_bytes(2, "big")
            replay.sendto(bytes(raw), ("127.0.0.1", server.port))  # a new message id
            try:
                answer = Message.decode(await asyncio.wait_for(loop.sock_recv(replay, 2048), 5))
            except TimeoutError:
                continue
            refused[str(answer.code)] += 1
        replay.close()
        assert await server.seqs(A) == before
        assert refused and set(refused) <= {"4.01 Unauthorized", "2.04 Changed"}, refused
        # a 2.04 here can only be an OSCORE-protected error (Echo) with no effect; a new
        # request of the device still works
        a.connect()
        assert (await a.req("GET", f"devices/{A}")).dotted == "2.05"
    finally:
        relay.close()
        await a.close()


@pytest.mark.timeout(240)
async def test_ten_thousand_mutated_oscore_messages(
    server: CloudServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Real protected requests captured and mutated (bit flips, truncation, option bytes,
    another kid, random bytes): no 5.00, no traceback, stored data unchanged, the endpoint
    answers the device afterwards."""
    caplog.set_level(logging.DEBUG)
    a = Principal(server, tmp_path, A)
    (await server.register(A)).write(a.dir / "credential.json")
    relay = Recorder(("127.0.0.1", server.port))
    await relay.start()
    a.server_uri = f"coap://127.0.0.1:{relay.port}"  # type: ignore[attr-defined]
    uris = (a.server_uri,)  # type: ignore[attr-defined]
    a.security = ClientSecurity.open(
        "oscore", uris, a.dir / "credential.json", a.dir / "oscore.json"
    )
    a.transport = CoapTransport(RealClock(), uris=uris, security=a.security)
    try:
        for i in range(5):
            resp = await a.transport.request(
                "POST",
                f"{a.server_uri}/ingest/{A}",
                batch(A, range(i * 3 + 1, i * 3 + 4)),  # type: ignore[attr-defined]
                content_format=112,
                deadline=20,
            )
            assert resp.dotted == "2.04"
        before = await server.seqs(A)
        samples = [d for d in relay.datagrams if len(d) > 12]
        rng = random.Random(10_000)
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.setblocking(False)
        codes: Counter[str] = Counter()
        loop = asyncio.get_running_loop()
        for n in range(10_000):
            data = bytearray(rng.choice(samples))
            kind = n % 5
            if kind == 0:
                for _ in range(rng.randint(1, 4)):
                    data[rng.randrange(4, len(data))] ^= 1 << rng.randrange(8)
            elif kind == 1:
                data = data[: rng.randrange(4, len(data))]
            elif kind == 2:
                data[rng.randrange(4, min(len(data), 16))] = rng.randrange(256)
            elif kind == 3:
                data = bytearray(os.urandom(rng.randrange(1, 200)))
            else:
                data[2:4] = rng.randrange(65536).to_bytes(2, "big")  # fresh mid: a replay
            sock.sendto(bytes(data), ("127.0.0.1", server.port))
            if n % 50 == 49:
                await asyncio.sleep(0.01)
                while True:
                    try:
                        reply = sock.recv(4096)
                    except BlockingIOError:
                        break
                    try:
                        codes[str(Message.decode(reply).code)] += 1
                    except Exception:
                        codes["undecodable"] += 1
        await asyncio.sleep(0.5)
        sock.close()
        del loop
        assert not any(c.startswith("5.") for c in codes), codes
        assert not any(r.exc_info for r in caplog.records), [
            r.getMessage() for r in caplog.records if r.exc_info
        ][:3]
        assert "Traceback" not in caplog.text
        assert await server.seqs(A) == before
        resp = await a.transport.request("GET", f"{a.server_uri}/devices/{A}", deadline=20)  # type: ignore[attr-defined]
        assert resp.dotted == "2.05"
    finally:
        relay.close()
        await a.close()


@pytest.mark.timeout(90)
async def test_operator_sets_desired_state_over_the_network_with_its_credential(
    server: CloudServer, tmp_path: Path
) -> None:
    """`edge-agent-cloud desired set --server URI --credential FILE` as an operator: 2.04 and the
    change is stored; the same without a credential, or with a device's credential, is refused."""
    await server.register(A)
    op = tmp_path / "alice.json"
    (await server.register("alice", "operator")).write(op)
    dev = tmp_path / "device.json"
    (await server.register(B)).write(dev)

    async def desired_set(*extra: str) -> tuple[int, str]:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            *("-m", "cloud.cli", "desired", "set", "--server", server.uri, "--device", A),
            *extra,
            "sensor/motor/interval=2.5",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        out, _ = await proc.communicate()
        return proc.returncode or 0, out.decode()

    rc, out = await desired_set("--credential", str(op))
    assert rc == 0, out
    assert (await server.desired(A)).entries["sensor/motor/interval"].value == 2.5
    rc, out = await desired_set()
    assert rc != 0 and "4.01" in out, out
    rc, out = await desired_set("--credential", str(dev))
    assert rc != 0 and "4.03" in out, out


@pytest.mark.timeout(60)
async def test_the_smallest_hostile_datagrams_get_no_more_than_three_times_back(
    server: CloudServer,
) -> None:
    """Raw datagrams without a token: a bare GET of /, POSTs with an empty, a malformed and an
    unknown OSCORE option, a Block1 upload: each answer is at most 3x the datagram."""
    mid = iter(range(1, 1000))

    def con(code: int, options: bytes = b"", payload: bytes = b"") -> bytes:
        head = bytes([0x40, code]) + next(mid).to_bytes(2, "big")  # CON, no token
        return head + options + (b"\xff" + payload if payload else b"")

    ingest = b"\xb6ingest\x07" + A.encode()  # Uri-Path (11) "ingest", then the device
    datagrams = [
        con(0x01),  # GET /
        con(0x02, b"\x90"),  # POST, OSCORE option (9) empty
        con(0x02, b"\x91\xff"),  # POST, OSCORE flags with reserved bits
        con(0x02, b"\x94\x09\x00\x99\x99"),  # POST, OSCORE: PIV 0, an unknown kid
        con(0x02, ingest + b"\xd1\x0e\x08", b"x" * 16),  # POST Block1 (27) #0 more
    ]
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    try:
        for data in datagrams:
            sock.sendto(data, ("127.0.0.1", server.port))
            answer = await asyncio.wait_for(loop.sock_recv(sock, 2048), 5)
            assert len(answer) <= AMPLIFICATION_LIMIT * len(data), (data.hex(), answer.hex())
            assert Message.decode(answer).code in (
                Code.UNAUTHORIZED,
                Code.BAD_OPTION,
                Code.BAD_REQUEST,
                Code.NOT_FOUND,  # GET /: no such resource, 4 bytes
            )
    finally:
        sock.close()
    assert server.stats["block1_uploads"] == 0  # nothing spooled for an unknown peer


@pytest.mark.timeout(60)
async def test_protected_request_with_invalid_utf8_inside_gets_4_00_and_no_traceback(
    server: CloudServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A device's own OSCORE request whose inner Uri-Path is not UTF-8 (bytes 0xff 0xfe, only
    visible after decryption): aiocoap 0.4.17's unprotection raises a UnicodeDecodeError; the
    endpoint answers 4.00 through its rate-limited warning, and serves the device on."""
    a = await Principal(server, tmp_path, A).open()
    try:
        assert (await a.req("GET", f"devices/{A}")).dotted == "2.05"
        assert a.security is not None
        context = a.security.context
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.setblocking(False)
        loop = asyncio.get_running_loop()
        try:
            for i in range(3):
                inner = Message(code=Code.GET)
                inner.opt.add_option(OpaqueOption(OptionNumber.URI_PATH, b"devices"))
                inner.opt.add_option(OpaqueOption(OptionNumber.URI_PATH, b"\xff\xfe"))
                outer, _ = context.protect(inner)
                outer.mid, outer.token, outer.mtype = 4000 + i, bytes([i + 1]), aiocoap.CON
                sock.sendto(outer.encode(), ("127.0.0.1", server.port))
                answer = Message.decode(await asyncio.wait_for(loop.sock_recv(sock, 2048), 5))
                assert answer.code == Code.BAD_REQUEST
        finally:
            sock.close()
        assert (await a.req("GET", f"devices/{A}")).dotted == "2.05"
    finally:
        await a.close()
    assert [r.getMessage()[:100] for r in caplog.records if r.exc_info] == []
    assert "undecodable request: UnicodeDecodeError" in caplog.text


async def _changed_to(observation: AsyncIterator[Response], interval: float) -> None:
    note = await anext(observation)
    assert note.dotted == "2.05"
    assert records.loads(note.payload)["keys"]["sensor/motor/interval"][1] == interval


@pytest.mark.timeout(90)
async def test_an_operator_observing_a_devices_desired_state_does_not_end_the_devices_own(
    server: CloudServer, tmp_path: Path
) -> None:
    """One observation per device was kept: any new registration of a device's desired state
    replaced the older ones, whoever made them. An operator watching a device's desired state
    (it may read it) took the device's own observation, which then heard of no change until its
    Max-Age ran out (300 s), and the device's registration again took the operator's. Now a
    registration replaces only those of the same principal: both hear of the change."""
    device = await Principal(server, tmp_path, A).open()
    operator = await Principal(server, tmp_path, "alice").open("operator")
    assert device.transport is not None and operator.transport is not None
    uri = f"{server.uri}/state/{A}/desired"
    mine = device.transport.observe(uri, deadline=20)
    theirs = operator.transport.observe(uri, deadline=20)
    try:
        await _registered(mine, theirs)
        assert server.observers(A) == 2
        await server.set_desired(A, {"sensor/motor/interval": 2.5})
        async with asyncio.timeout(20):
            await _changed_to(mine, 2.5)
            await _changed_to(theirs, 2.5)
    finally:
        await mine.aclose()
        await theirs.aclose()
        await device.close()
        await operator.close()


async def _registered(*observations: Any) -> None:
    """Each observation's first answer: its registration taken, 2.05 with the document."""
    for observation in observations:
        assert (await anext(observation)).dotted == "2.05"


@pytest.mark.timeout(90)
async def test_a_devices_registration_ends_its_older_observation(
    server: CloudServer, tmp_path: Path
) -> None:
    """A device registers its observation again (after a lost notification, a network error):
    the older one was taken out of the endpoint's set with aiocoap's deregister(), which after
    the first answer does nothing in aiocoap 0.4.17: the older observation was never ended (its
    task and pipe stayed for as long as the endpoint ran, one more per registration, and a
    client still holding it heard nothing). Now it ends with a last notification."""
    device = await Principal(server, tmp_path, A).open()
    assert device.transport is not None
    uri = f"{server.uri}/state/{A}/desired"
    older = device.transport.observe(uri, deadline=20)
    newer = device.transport.observe(uri, deadline=20, lane=1)
    try:
        await _registered(older, newer)
        async with asyncio.timeout(20):
            async for _ in older:  # its last notification, then it ends
                pass
        assert server.observers(A) == 1
        await server.set_desired(A, {"sensor/motor/interval": 3.5})
        async with asyncio.timeout(20):
            await _changed_to(newer, 3.5)
    finally:
        await older.aclose()
        await newer.aclose()
        await device.close()


@pytest.mark.timeout(90)
async def test_attack_a_devices_discovery_reads_no_other_devices_records(
    server: CloudServer, tmp_path: Path
) -> None:
    """GET /.well-known/core by a device: the endpoint read the registry entry of every device,
    each with a count of its records (SQLite: a count over every device's records, PostgreSQL
    the same over record_keys), on its one storage thread, to answer the device with its own
    links. Any device could make it scan every record of the fleet, as often as it liked, with
    a 20-byte request, and every ingest of that process waited behind it. Now a device's
    discovery reads nothing of the others, and no discovery counts records: the statements
    run do not grow with the fleet."""
    a = await Principal(server, tmp_path, A).open()
    statements: list[str] = []

    def trace(storage: Any) -> None:
        storage.db.set_trace_callback(statements.append)

    async def discovery() -> tuple[str, list[str]]:
        statements.clear()
        response = await a.req("GET", ".well-known/core")
        assert response.dotted == "2.05"
        return response.payload.decode(), [s for s in statements if "records" in s]

    try:
        await server.db(trace)
        for i in range(3):
            await server.add_device(f"other-{i}")
        small, read_small = await discovery()
        for i in range(3, 40):
            await server.add_device(f"other-{i}")
        large, read_large = await discovery()
        assert small == large and f"</ingest/{A}>" in large and "other-" not in large
        assert read_small == read_large == []
    finally:
        await server.db(lambda s: s.db.set_trace_callback(None))
        await a.close()


@pytest.mark.timeout(90)
async def test_attack_a_revoked_device_hears_nothing_more_of_its_desired_state(
    server: CloudServer, tmp_path: Path
) -> None:
    """A stolen device is revoked while it observes its desired state. Its requests were
    refused from then on, but the observation it had went on: every change (and the refresh
    every 240 s) was rendered and sent to it, protected under the revoked credential, for as
    long as it acknowledged them. Now a request or notification under a credential that is no
    longer the principal's (revoked, re-keyed, rotated) is answered 4.01, which ends the
    observation."""
    a = await Principal(server, tmp_path, A).open()
    assert a.transport is not None
    mine = a.transport.observe(f"{server.uri}/state/{A}/desired", deadline=20)
    try:
        assert (await anext(mine)).dotted == "2.05"
        await server.revoke(A)
        await server.set_desired(A, {"sensor/motor/interval": 4.5})
        heard = []
        async with asyncio.timeout(20):
            with contextlib.suppress(SyncError):
                async for note in mine:
                    heard.append(note.dotted)
                    assert note.dotted != "2.05", "a revoked device heard its desired state"
        assert heard in ([], ["4.01"])
    finally:
        await mine.aclose()
        await a.close()
