"""OSCORE between peer gateways (agent/gateway/peersecurity.py), against real PeerServers on
loopback: peers with the site secret converge; a client without it, or with a wrong one, can
neither read nor write the state; a replayed protected request is refused, before and after a
restart; sequence numbers only grow across restarts and crashes; a bad secret file or a peer ID
collision stops the gateway at start with one line."""

from __future__ import annotations

import asyncio
import os
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiocoap
import pytest
from aiocoap.numbers.codes import Code

from agent.errors import ConfigError, SyncError
from agent.exits import EX_CONFIG, EX_USAGE
from agent.gateway.peers import PeerServer, PeerSettings, PeerState, PeerSync
from agent.gateway.peersecurity import PeerContexts, peer_id, read_secret, write_secret
from agent.gateway.settings import load_gateway_config
from agent.service import cli
from agent.sync.transport import CoapTransport
from agent.wire import records
from drivers.base import OptionError, Options
from drivers.clock import RealClock
from tools.chaos.harness import free_udp_port

pytestmark = pytest.mark.timeout(60)

SECRET = bytes(range(32))


@dataclass
class Gw:
    name: str
    dir: Path
    uri: str
    peers: dict[str, str]
    state: PeerState
    contexts: PeerContexts
    server: PeerServer
    transport: CoapTransport
    sync: PeerSync

    async def close(self, *, clean: bool = True) -> None:
        await self.server.stop()
        await self.transport.close()
        if clean:
            self.contexts.close()


async def start_gw(
    tmp: Path, name: str, uris: dict[str, str], secret: bytes = SECRET, *, serve: bool = True
) -> Gw:
    d = tmp / name
    peers = {n: u for n, u in uris.items() if n != name}
    clock = RealClock()
    state = PeerState(name, d / "peer-state.cbor", clock)
    contexts = PeerContexts(name, peers, secret, d / "peer-oscore")
    port = int(uris[name].rsplit(":", 1)[1])
    server = await PeerServer.start(state, "127.0.0.1", port, contexts=contexts)
    transport = CoapTransport(clock, uris=list(peers.values()), security=contexts)
    sync = PeerSync(state, list(peers.values()), transport, deadline=5.0)
    return Gw(name, d, uris[name], peers, state, contexts, server, transport, sync)


def site_uris(*names: str) -> dict[str, str]:
    return {n: f"coap://127.0.0.1:{free_udp_port()}" for n in names}


@pytest.fixture
async def client() -> AsyncIterator[Any]:
    ctx = await aiocoap.Context.create_client_context(transports=["udp6"])
    yield ctx
    await ctx.shutdown()


async def test_three_peers_with_the_site_secret_converge(tmp_path: Path) -> None:
    uris = site_uris("gw-a", "gw-b", "gw-c")
    gws = [await start_gw(tmp_path, n, uris) for n in uris]
    try:
        a, b, c = gws
        a.state.set("config/rate", 10)
        b.state.add("ack/pump-1", "alert-1")
        c.state.increment("count/alerts", 3)
        for _ in range(2):
            for gw in gws:
                assert all(x is not None for x in await gw.sync.sync_all())
        assert a.state.snapshot() == b.state.snapshot() == c.state.snapshot()
        assert a.state.snapshot() == {
            "ack/pump-1": ["alert-1"],
            "config/rate": 10,
            "count/alerts": 3,
        }
        assert (a.dir / "peer-oscore" / "to-gw-b.json").exists()
        assert (b.dir / "peer-oscore" / "from-gw-a.json").exists()
    finally:
        for gw in gws:
            await gw.close()


async def test_attack_a_client_without_the_secret_can_neither_read_nor_write(
    tmp_path: Path, client: Any
) -> None:
    uris = site_uris("gw-a", "gw-b")
    a = await start_gw(tmp_path, "gw-a", uris)
    try:
        a.state.set("config/secret-plan", "x")
        before = a.state.snapshot()
        base = uris["gw-a"]
        push = {"config/evil": [[1_700_000_000_000, 0, "gw-z"], "owned"]}
        for code, path, payload in (
            (Code.GET, "peer/digest", b""),
            (Code.FETCH, "peer/state", records.dumps(["config/secret-plan"])),
            (Code.POST, "peer/state", records.dumps(push)),
        ):
            msg = aiocoap.Message(code=code, uri=f"{base}/{path}", payload=payload)
            answer = await asyncio.wait_for(client.request(msg).response, 10)
            assert answer.code == Code.UNAUTHORIZED, (code, answer)
            assert b"secret-plan" not in answer.payload
        assert a.state.snapshot() == before
        assert a.server.site.stats == {"digest": 0, "fetch": 0, "push": 0, "refused": 0}
    finally:
        await a.close()


async def test_attack_a_gateway_with_a_wrong_secret_can_neither_read_nor_write(
    tmp_path: Path,
) -> None:
    """The attacker knows everything but the secret: it claims gw-b's name (its peer ID is
    public) and speaks OSCORE with a secret of its own."""
    uris = site_uris("gw-a", "gw-b")
    a = await start_gw(tmp_path, "gw-a", uris)
    b = await start_gw(tmp_path, "gw-b", uris, secrets.token_bytes(32))
    try:
        a.state.set("config/secret-plan", "x")
        b.state.set("config/evil", "owned")
        with pytest.raises(SyncError):
            await b.sync.sync_once(uris["gw-a"])
        with pytest.raises(SyncError):  # and a's requests to the impostor fail too
            await a.sync.sync_once(uris["gw-b"])
        assert a.state.snapshot() == {"config/secret-plan": "x"}
        assert b.state.snapshot() == {"config/evil": "owned"}
        assert a.server.site.stats["push"] == a.server.site.stats["digest"] == 0
        assert not (a.dir / "peer-oscore" / "from-gw-b.json").exists()  # no epoch adopted
    finally:
        await a.close()
        await b.close()


class Recorder(asyncio.DatagramProtocol):
    """A UDP relay between one client and ``target`` that keeps every request datagram."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.requests: list[bytes] = []
        self.responses: list[bytes] = []
        self.client: Any = None
        self.transport: Any = None
        self.upstream: Any = None

    async def start(self) -> int:
        loop = asyncio.get_running_loop()
        self.transport, _ = await loop.create_datagram_endpoint(
            lambda: self, local_addr=("127.0.0.1", 0)
        )
        relay = self

        class Up(asyncio.DatagramProtocol):
            def datagram_received(self, data: bytes, addr: Any) -> None:
                relay.responses.append(data)
                relay.transport.sendto(data, relay.client)

        self.upstream, _ = await loop.create_datagram_endpoint(Up, remote_addr=self.target)
        return int(self.transport.get_extra_info("sockname")[1])

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.client = addr
        if len(data) > 1 and data[1] == Code.POST:  # OSCORE requests go out as POST
            self.requests.append(data)
        self.upstream.sendto(data)

    def close(self) -> None:
        self.transport.close()
        self.upstream.close()


async def replay(datagram: bytes, port: int) -> aiocoap.Message:
    """``datagram`` sent again from a new socket (so CoAP's deduplication does not see it)."""
    loop = asyncio.get_running_loop()
    answer: asyncio.Future[bytes] = loop.create_future()

    class Once(asyncio.DatagramProtocol):
        def datagram_received(self, data: bytes, addr: Any) -> None:
            if not answer.done():
                answer.set_result(data)

    sock, _ = await loop.create_datagram_endpoint(Once, remote_addr=("127.0.0.1", port))
    try:
        sock.sendto(datagram)
        return aiocoap.Message.decode(await asyncio.wait_for(answer, 10))
    finally:
        sock.close()


async def recorded_pair(tmp: Path) -> tuple[Gw, Gw, Recorder, str, dict[str, str], int]:
    """gw-a, and gw-b whose requests to gw-a go through a :class:`Recorder`: (a, b, the
    recorder, gw-a's URI as gw-b knows it, the site's URIs, gw-a's port)."""
    uris = site_uris("gw-a", "gw-b")
    a = await start_gw(tmp, "gw-a", uris)
    port_a = int(uris["gw-a"].rsplit(":", 1)[1])
    recorder = Recorder(("127.0.0.1", port_a))
    relay_uri = f"coap://127.0.0.1:{await recorder.start()}"
    b = await start_gw(tmp, "gw-b", {**uris, "gw-a": relay_uri})
    return a, b, recorder, relay_uri, uris, port_a


async def close_recorded(recorder: Recorder, *gws: Gw) -> None:
    recorder.close()
    for gw in gws:
        await gw.close()


async def test_attack_a_replayed_protected_post_is_refused_before_and_after_a_restart(
    tmp_path: Path,
) -> None:
    a, b, recorder, relay_uri, uris, port_a = await recorded_pair(tmp_path)
    try:
        b.state.set("config/rate", 10)
        exchange = await b.sync.sync_once(relay_uri)
        assert exchange.pushed == ["config/rate"]
        assert a.state.get("config/rate") == 10
        post = recorder.requests[-1]  # GET digest, then POST: the POST is last
        assert a.server.site.stats["push"] == 1
        answer = await replay(post, port_a)
        assert answer.code == Code.UNAUTHORIZED and b"Replay" in answer.payload
        assert a.server.site.stats["push"] == 1

        await a.close(clean=False)  # a crash: the window written at the last accepted request
        a = await start_gw(tmp_path, "gw-a", uris)
        answer = await replay(post, port_a)
        assert answer.code == Code.UNAUTHORIZED and b"Replay" in answer.payload
        assert a.server.site.stats["push"] == 0
        b.state.set("config/rate", 11)  # and b's own next request still goes through
        assert (await b.sync.sync_once(relay_uri)).pushed == ["config/rate"]
        assert a.state.get("config/rate") == 11
    finally:
        await close_recorded(recorder, a, b)


async def test_state_and_sequence_numbers_survive_restarts_and_crashes(tmp_path: Path) -> None:
    uris = site_uris("gw-a", "gw-b")
    a = await start_gw(tmp_path, "gw-a", uris)
    b = await start_gw(tmp_path, "gw-b", uris)
    a.state.set("config/rate", 10)
    await a.sync.sync_once(uris["gw-b"])
    out = a.contexts.outgoing["gw-b"]
    epoch, used = out.context.id_context, out.sequence.next
    assert used >= 2
    answers = b.contexts.incoming_context("gw-a")  # b's own numbers, for its answers
    assert answers is not None
    answered = answers.sequence.next

    await a.close()  # a clean stop: the exact next number on disk
    await b.close(clean=False)  # b crashes: its answers continue above its reservation
    a = await start_gw(tmp_path, "gw-a", uris)
    b = await start_gw(tmp_path, "gw-b", uris)
    assert b.state.get("config/rate") == 10
    answers = b.contexts.incoming_context("gw-a")
    assert answers is not None and answers.sequence.next > answered
    out = a.contexts.outgoing["gw-b"]
    assert out.context.id_context == epoch and out.sequence.next >= used
    a.state.set("config/rate", 20)
    await a.sync.sync_once(uris["gw-b"])
    assert b.state.get("config/rate") == 20
    used = out.sequence.next

    await a.close(clean=False)  # a crash: a continues above what it had reserved
    a = await start_gw(tmp_path, "gw-a", uris)
    out = a.contexts.outgoing["gw-b"]
    assert out.context.id_context == epoch and out.sequence.next > used
    a.state.set("config/rate", 30)
    await a.sync.sync_once(uris["gw-b"])
    assert b.state.get("config/rate") == 30
    await a.close()

    # its context state lost (a wiped data directory): a new epoch, so new keys; b adopts it
    # after an Echo round trip and the exchange goes on
    (a.dir / "peer-oscore" / "to-gw-b.json").unlink()
    a = await start_gw(tmp_path, "gw-a", uris)
    assert a.contexts.outgoing["gw-b"].context.id_context != epoch
    a.state.set("config/rate", 40)
    await a.sync.sync_once(uris["gw-b"])
    assert b.state.get("config/rate") == 40
    await a.close()
    await b.close()


# -- the site secret and the config ------------------------------------------------------------


def test_the_secret_file_is_made_and_read(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "site.key"
    assert cli.main(["gateway-secret", str(path)]) == 0
    assert cli.main(["gateway-secret", str(path)]) == EX_USAGE  # never overwritten
    assert "exists" in capsys.readouterr().err
    assert len(read_secret(path)) == 32
    path.unlink()
    write_secret(path)
    assert os.stat(path).st_mode & 0o777 == 0o600
    secret = read_secret(path)
    assert len(secret) == 32
    with pytest.raises(FileExistsError):
        write_secret(path)
    raw = tmp_path / "raw.key"
    raw.write_bytes(SECRET)
    raw.chmod(0o600)
    assert read_secret(raw) == SECRET


def collision() -> tuple[str, str]:
    """Two node names with the same 4-byte peer ID (a birthday search: some 10^5 hashes)."""
    seen: dict[bytes, str] = {}
    for i in range(10**7):
        name = f"gw-{i}"
        other = seen.setdefault(peer_id(name), name)
        if other != name:
            return other, name
    raise AssertionError("no collision")


def gateway_config(tmp: Path, peers: str, secret: str = 'secret = "site.key"') -> Path:
    data = tmp / "data"
    data.mkdir(exist_ok=True)
    path = tmp / "gateway.toml"
    path.write_text(
        f'[agent]\ndevice_id = "gw-a"\ndata_dir = "{data}"\n'
        '[uplink]\nendpoints = ["coap://127.0.0.1:5683"]\n'
        f'[gateway]\nlisten = "127.0.0.1:0"\n[gateway.peers]\npeers = {peers}\n{secret}\n'
    )
    return path


def refused(path: Path, capsys: pytest.CaptureFixture[str]) -> str:
    assert cli.main(["gateway", "--config", str(path)]) == EX_CONFIG
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    return err


@pytest.mark.parametrize(
    ("content", "mode", "why"),
    [
        (SECRET.hex().encode(), 0o644, "readable by group or others"),
        (SECRET.hex().encode(), 0o640, "chmod 600"),
        (b"too short", 0o600, "32 bytes"),
        (SECRET + b"x", 0o600, "32 bytes"),
        (b"", 0o600, "32 bytes"),
    ],
)
def test_attack_a_bad_secret_file_stops_the_gateway_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: bytes, mode: int, why: str
) -> None:
    path = gateway_config(tmp_path, '{ gw-b = "coap://127.0.0.1:5690" }')
    key = tmp_path / "data" / "site.key"
    key.write_bytes(content)
    key.chmod(mode)
    err = refused(path, capsys)
    assert "gateway.peers.secret" in err and why in err


def test_a_missing_secret_file_names_the_command_that_makes_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    err = refused(gateway_config(tmp_path, '{ gw-b = "coap://127.0.0.1:5690" }'), capsys)
    assert "edge-agent gateway-secret" in err


def test_attack_a_peer_id_collision_stops_the_gateway_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    one, two = collision()
    assert peer_id(one) == peer_id(two)
    key = tmp_path / "data" / "site.key"
    peers = f'{{ {one} = "coap://127.0.0.1:5690", {two} = "coap://127.0.0.1:5691" }}'
    path = gateway_config(tmp_path, peers)
    key.write_bytes(SECRET)
    key.chmod(0o600)
    err = refused(path, capsys)
    assert "same peer ID" in err and one in err and two in err
    # a peer named as this gateway: the same ID too
    path = gateway_config(tmp_path, '{ gw-a = "coap://127.0.0.1:5690" }')
    assert "own name" in refused(path, capsys)
    with pytest.raises(ConfigError, match="own name"):
        load_gateway_config(path)


def test_settings_with_a_secret(tmp_path: Path) -> None:
    key = tmp_path / "site.key"
    key.write_bytes(SECRET.hex().encode() + b"\n")
    key.chmod(0o600)
    opts = Options(
        {"peers": {"gw-b": "coap://10.0.0.2:5690"}, "secret": "site.key"}, "gateway.peers."
    )
    settings = PeerSettings.from_options(opts, tmp_path)
    assert settings.secret == SECRET and settings.named == {"gw-b": "coap://10.0.0.2:5690"}
    assert settings.oscore_state == tmp_path / "peer-oscore"
    assert SECRET.hex() not in repr(settings)
    with pytest.raises(OptionError, match="table of node name"):  # names are needed for IDs
        PeerSettings.from_options(
            Options({"peers": ["coap://10.0.0.2:5690"], "secret": "site.key"}), tmp_path
        )
    plain = PeerSettings.from_options(Options({"peers": ["coap://10.0.0.2:5690"]}), tmp_path)
    assert plain.secret is None and plain.oscore_state is None


async def test_attack_a_request_of_an_epoch_the_peer_left_is_refused(tmp_path: Path) -> None:
    """gw-b lost its context state (a new epoch, new keys); a request recorded under its old
    epoch is refused for good, even though its sequence number is new to the new window."""
    a, b, recorder, relay_uri, uris, port_a = await recorded_pair(tmp_path)
    relayed = {**uris, "gw-a": relay_uri}
    try:
        b.state.set("config/rate", 10)
        await b.sync.sync_once(relay_uri)
        old_post = recorder.requests[-1]
        await b.close()
        (b.dir / "peer-oscore" / "to-gw-a.json").unlink()
        b = await start_gw(tmp_path, "gw-b", relayed)
        b.state.set("config/rate", 20)
        await b.sync.sync_once(relay_uri)
        assert a.state.get("config/rate") == 20
        pushes = a.server.site.stats["push"]
        answer = await replay(old_post, port_a)
        assert answer.code == Code.UNAUTHORIZED
        assert a.server.site.stats["push"] == pushes
        assert a.state.get("config/rate") == 20
    finally:
        await close_recorded(recorder, a, b)


async def test_a_large_state_goes_through_oscore_in_blocks(tmp_path: Path) -> None:
    """Pushes and fetches of many kilobytes: OSCORE's inner Block1 and Block2, each block a
    request of its own under a new sequence number."""
    uris = site_uris("gw-a", "gw-b")
    a = await start_gw(tmp_path, "gw-a", uris)
    b = await start_gw(tmp_path, "gw-b", uris)
    try:
        for i in range(40):
            a.state.set(f"config/a{i}", "x" * 4000)
            b.state.set(f"config/b{i}", "y" * 4000)
        exchange = await a.sync.sync_once(uris["gw-b"])
        assert len(exchange.pulled) == len(exchange.pushed) == 40
        assert a.state.snapshot() == b.state.snapshot()
        assert len(a.state.snapshot()) == 80
        assert a.contexts.outgoing["gw-b"].sequence.next > 100  # one number per block
    finally:
        await a.close()
        await b.close()


async def test_attack_a_replay_after_the_answering_side_lost_its_state_gets_a_new_nonce(
    tmp_path: Path,
) -> None:
    """gw-a lost ``from-gw-b.json`` (the one case where a recorded request of gw-b's current
    epoch is new to it again): the replayed request is accepted, but the answer is protected
    under a sequence number of gw-a's own from a random point, never under the nonce of the
    original answer (a second plaintext under one nonce would leak both)."""
    a, b, recorder, relay_uri, uris, port_a = await recorded_pair(tmp_path)
    try:
        await b.sync.sync_once(relay_uri)  # GET digest only: both are empty
        digest_get = recorder.requests[-1]
        token = aiocoap.Message.decode(digest_get).token
        (first,) = [m for m in map(aiocoap.Message.decode, recorder.responses) if m.token == token]
        assert first.code == Code.CHANGED and first.opt.oscore  # OSCORE's outer code
        await a.close()
        (a.dir / "peer-oscore" / "from-gw-b.json").unlink()
        a = await start_gw(tmp_path, "gw-a", uris)
        a.state.set("config/new", 1)
        again = await replay(digest_get, port_a)
        assert again.code == Code.CHANGED  # accepted: documented in docs/gateway.md
        assert again.opt.oscore and first.opt.oscore
        assert bytes(again.opt.oscore) != bytes(first.opt.oscore)  # another partial IV
        assert len(bytes(first.opt.oscore)) > 1  # answers carry a partial IV of their own
    finally:
        await close_recorded(recorder, a, b)
