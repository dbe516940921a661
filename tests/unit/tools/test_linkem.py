"""tools/linkem.py, the UDP link impairment proxy: real sockets on loopback, real subprocesses for
the CLI and the control channel. Statistical checks use a fixed seed and generous bounds; the only
time bounds are functional lower bounds (a delayed packet cannot arrive early)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import struct
import subprocess
import sys
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from drivers.clock import VirtualClock

TOOLS = Path(__file__).resolve().parents[3] / "tools"
sys.path.insert(0, str(TOOLS))

import linkem  # noqa: E402
from linkem import GilbertElliott, Impairment, LinkEmulator  # noqa: E402

LINKEM = str(TOOLS / "linkem.py")
BATCH = 50  # packets sent back to back before waiting for the link to drain (socket buffers)


class Peer(asyncio.DatagramProtocol):
    """A UDP endpoint that records what it receives and, if asked, answers ``re:`` + the data."""

    def __init__(self, echo: bool = False) -> None:
        self.echo = echo
        self.received: list[tuple[bytes, Any]] = []
        self.times: list[float] = []
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.received.append((data, addr))
        self.times.append(asyncio.get_running_loop().time())
        if self.echo:
            assert self.transport is not None
            self.transport.sendto(b"re:" + data, addr)

    def send(self, data: bytes, addr: Any = None) -> None:
        assert self.transport is not None
        self.transport.sendto(data, addr)

    @property
    def addr(self) -> tuple[str, int]:
        assert self.transport is not None
        return self.transport.get_extra_info("sockname")[:2]

    def payloads(self) -> list[bytes]:
        return [data for data, _ in self.received]


async def open_peer(echo: bool = False, remote: tuple[str, int] | None = None) -> Peer:
    loop = asyncio.get_running_loop()
    kwargs: dict[str, Any] = {"remote_addr": remote} if remote else {"local_addr": ("127.0.0.1", 0)}
    _, peer = await loop.create_datagram_endpoint(lambda: Peer(echo), **kwargs)
    return peer


async def until(predicate: Callable[[], bool], what: str = "", limit: float = 10.0) -> None:
    """Wait for a condition (a generous deadline against hangs, not a speed check)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what or predicate}")
        await asyncio.sleep(0.002)


@dataclass
class Rig:
    proxy: LinkEmulator
    server: Peer
    clients: list[Peer]

    @property
    def client(self) -> Peer:
        return self.clients[0]

    def settled(self, direction: str, sent: int) -> bool:
        """All ``sent`` packets into ``direction`` reached the proxy, then its exit or a drop."""
        c = self.proxy.counters(direction)
        return (
            c.packets_in == sent
            and c.packets_out + sum(c.dropped.values()) == c.packets_in + c.duplicated
            and self.proxy.stats()["in_flight"] == 0
        )

    async def blast(self, n: int) -> list[int]:
        """Send ``n`` numbered packets up, in batches; the numbers the server got, in order."""
        up = self.proxy.counters("up")
        for first in range(0, n, BATCH):
            sent = min(n, first + BATCH)
            for i in range(first, sent):
                self.client.send(struct.pack(">I", i) + b"-" * 60)
            await until(partial(self.settled, "up", sent), what=f"{sent} packets through")
            await until(lambda: len(self.server.received) == up.packets_out, what="the server")
        return [struct.unpack(">I", data[:4])[0] for data, _ in self.server.received]


@contextlib.asynccontextmanager
async def rig(
    impairment: Impairment | None = None, *, echo: bool = False, clients: int = 1, **kwargs: Any
) -> AsyncIterator[Rig]:
    server = await open_peer(echo=echo)
    proxy = LinkEmulator(("127.0.0.1", 0), server.addr, impairment, **kwargs)
    await proxy.start()
    peers = [await open_peer(remote=("127.0.0.1", proxy.port)) for _ in range(clients)]
    try:
        yield Rig(proxy, server, peers)
    finally:
        for peer in [*peers, server]:
            assert peer.transport is not None
            peer.transport.close()
        await proxy.stop()


def missing_runs(received: list[int], n: int) -> list[int]:
    """Lengths of the runs of consecutive packet numbers that never arrived."""
    got = set(received)
    runs, run = [], 0
    for i in range(n):
        if i in got:
            if run:
                runs.append(run)
            run = 0
        else:
            run += 1
    if run:
        runs.append(run)
    return runs


def inversions(received: list[int]) -> int:
    """How many packets arrived after one sent later than them."""
    highest, count = -1, 0
    for i in received:
        if i < highest:
            count += 1
        highest = max(highest, i)
    return count


# --------------------------------------------------------------------------------------------------
# The data path


async def test_clear_link_passes_bytes_untouched_both_ways_and_keeps_clients_apart() -> None:
    rng = random.Random(5)
    async with rig(echo=True, clients=3) as r:
        sizes = [0, 1, 7, 64, 512, 1400, 8000]
        sent: dict[int, list[bytes]] = {}
        for k, client in enumerate(r.clients):
            sent[k] = [bytes([k]) + rng.randbytes(size) for size in sizes]
            for payload in sent[k]:
                client.send(payload)
        total = len(sizes) * len(r.clients)
        await until(lambda: sum(len(c.received) for c in r.clients) == total, what="the echoes")

        # Upstream: the server got every payload, byte for byte, one source address per client.
        assert sorted(r.server.payloads()) == sorted(p for ps in sent.values() for p in ps)
        sources = {data[0]: set() for data, _ in r.server.received}
        for data, addr in r.server.received:
            sources[data[0]].add(addr)
        assert all(len(addrs) == 1 for addrs in sources.values())
        assert len({next(iter(addrs)) for addrs in sources.values()}) == 3
        # Downstream: every client got exactly the answers to its own payloads, from the proxy.
        for k, client in enumerate(r.clients):
            assert client.payloads() == [b"re:" + p for p in sent[k]]
            assert {addr[1] for _, addr in client.received} == {r.proxy.port}
        stats = r.proxy.stats()
        assert stats["flows"] == 3
        for direction in ("up", "down"):
            c = stats[direction]
            assert c["packets_in"] == c["packets_out"] == total
            assert c["bytes_in"] == c["bytes_out"]
            assert c["dropped_total"] == c["duplicated"] == c["reordered"] == 0


async def test_independent_loss_matches_the_rate_and_repeats_with_the_seed() -> None:
    n = 2000

    async def run(seed: int) -> tuple[list[int], dict[str, Any]]:
        async with rig(Impairment(loss=0.2), seed=seed) as r:
            got = await r.blast(n)
            return got, r.proxy.stats()

    got, stats = await run(seed=11)
    lost = n - len(got)
    assert 0.17 * n <= lost <= 0.23 * n
    assert stats["up"]["dropped"]["loss"] == lost
    assert stats["up"]["packets_out"] == len(got)
    assert got == sorted(got)  # loss alone never reorders
    again, _ = await run(seed=11)
    assert again == got
    other, _ = await run(seed=12)
    assert other != got


async def test_bursty_loss_comes_in_bursts_at_the_same_mean_rate() -> None:
    n = 3000
    async with rig(Impairment(loss=0.2, burst=4), seed=3) as r:
        bursty = await r.blast(n)
    async with rig(Impairment(loss=0.2), seed=3) as r:
        independent = await r.blast(n)
    bursty_runs = missing_runs(bursty, n)
    independent_runs = missing_runs(independent, n)
    assert 0.12 * n <= sum(bursty_runs) <= 0.28 * n
    assert sum(bursty_runs) / len(bursty_runs) > 2.5  # configured mean burst: 4
    assert sum(independent_runs) / len(independent_runs) < 1.6  # expected: 1 / (1 - 0.2) = 1.25


async def test_explicit_gilbert_elliott_model_loses_in_the_bad_state_only() -> None:
    n = 2000
    model = GilbertElliott(p=0.05, r=0.2, loss_bad=0.5, loss_good=0.0)
    async with rig(Impairment(gilbert=model), seed=8) as r:
        got = await r.blast(n)
    lost = n - len(got)
    assert model.mean_loss == pytest.approx(0.1)
    assert 0.05 * n <= lost <= 0.15 * n


def test_gilbert_from_burst_gives_the_asked_mean_loss_and_burst() -> None:
    model = GilbertElliott.from_burst(0.1, 3)
    assert model.r == pytest.approx(1 / 3)
    assert model.p == pytest.approx(0.1 / 3 / 0.9)
    assert model.mean_loss == pytest.approx(0.1)
    assert model.mean_burst_length == pytest.approx(3)
    assert Impairment(loss=0.1, burst=3).loss_model() == model
    assert Impairment(loss=0.1).loss_model() == 0.1
    with pytest.raises(ValueError, match="at most"):
        GilbertElliott.from_burst(0.6, 1.2)
    with pytest.raises(ValueError, match="burst"):
        Impairment(loss=0.1, burst=0.5)


async def test_duplication_sends_some_packets_twice() -> None:
    n = 1000
    async with rig(Impairment(dup=0.25), seed=4) as r:
        got = await r.blast(n)
        stats = r.proxy.stats()
    copies = Counter(got)
    assert set(copies) == set(range(n))
    assert max(copies.values()) == 2
    extra = len(got) - n
    assert 0.19 * n <= extra <= 0.31 * n
    assert stats["up"]["duplicated"] == extra


async def test_delay_holds_a_reply_back_for_the_round_trip() -> None:
    loop = asyncio.get_running_loop()
    async with rig(Impairment(delay=0.04), echo=True) as r:
        for i in range(3):
            start = loop.time()
            r.client.send(b"ping%d" % i)
            await until(lambda i=i: len(r.client.received) == i + 1, what="the echo")
            assert r.client.times[-1] - start >= 2 * 0.04 - 0.002
        # Asymmetric: only the way up is slow now; the server sees the request late.
        r.proxy.set(up=Impairment(delay=0.06), down=Impairment())
        start = loop.time()
        r.client.send(b"asym")
        await until(lambda: len(r.client.received) == 4, what="the echo")
        assert r.server.times[-1] - start >= 0.06 - 0.002
        # With jitter the bound is the smallest delay: delay - jitter each way.
        r.proxy.set(Impairment(delay=0.03, jitter=0.01))
        start = loop.time()
        r.client.send(b"jitter")
        await until(lambda: len(r.client.received) == 5, what="the echo")
        assert r.client.times[-1] - start >= 2 * 0.02 - 0.002


async def test_normal_jitter_delivers_everything() -> None:
    async with rig(Impairment(delay=0.01, jitter=0.01, distribution="normal"), seed=2) as r:
        got = await r.blast(200)
    assert sorted(got) == list(range(200))


async def test_jitter_reorders_unless_preserve_order() -> None:
    n = 200
    async with rig(Impairment(delay=0.02, jitter=0.015), seed=6) as r:
        jittered = await r.blast(n)
        reordered = r.proxy.counters("up").reordered
    assert sorted(jittered) == list(range(n))
    assert inversions(jittered) > 0
    assert reordered == inversions(jittered)

    async with rig(Impairment(delay=0.02, jitter=0.015, preserve_order=True), seed=6) as r:
        ordered = await r.blast(n)
        assert r.proxy.counters("up").reordered == 0
    assert ordered == list(range(n))


async def test_reorder_holds_some_packets_back_even_in_order_mode() -> None:
    n = 500
    imp = Impairment(reorder=0.1, reorder_gap=0.03, preserve_order=True)
    async with rig(imp, seed=9) as r:
        got = await r.blast(n)
        c = r.proxy.counters("up")
    assert sorted(got) == list(range(n))
    assert 0.05 * n <= c.held <= 0.15 * n
    assert 0 < inversions(got) <= c.held
    assert c.reordered == inversions(got)


async def test_rate_cap_spreads_a_burst_over_its_serialization_time() -> None:
    loop = asyncio.get_running_loop()
    size, rate, n = 1000, 50_000, 10
    async with rig(Impairment(rate=rate)) as r:
        start = loop.time()
        for i in range(n):
            r.client.send(bytes([i]) * size)
        await until(lambda: len(r.server.received) == n, what="the burst")
        # Each packet takes size/rate to leave: the last one cannot be there before n of those.
        assert r.server.times[-1] - start >= n * size / rate - 0.002
        assert [data[0] for data in r.server.payloads()] == list(range(n))
        assert r.proxy.counters("up").dropped["queue"] == 0


async def test_rate_cap_tail_drops_over_the_queue_limit() -> None:
    n = 12
    async with rig(Impairment(rate=20_000, queue_limit=3)) as r:
        for i in range(n):
            r.client.send(bytes([i]) * 1000)
        await until(lambda: r.settled("up", n), what="the burst to drain")
        c = r.proxy.counters("up")
        assert c.dropped["queue"] > 0
        assert c.packets_out + c.dropped["queue"] == n
        await until(lambda: len(r.server.received) == c.packets_out, what="the server")
        # Tail drop: the head of the burst always finds room; what passes keeps its order.
        got = [d[0] for d in r.server.payloads()]
        assert got[:3] == [0, 1, 2]
        assert got == sorted(got)


async def test_token_bucket_depth_lets_a_short_burst_through_unshaped() -> None:
    size, rate = 1000, 20_000
    async with rig(Impairment(rate=rate, bucket=4 * size, queue_limit=1)) as r:
        for i in range(4):
            r.client.send(bytes([i]) * size)
        await until(lambda: r.settled("up", 4), what="the burst")
        # A full bucket of 4 packets: nothing waits, so a queue of one drops nothing.
        assert r.proxy.counters("up").dropped["queue"] == 0
        assert r.proxy.counters("up").packets_out == 4


async def test_outage_drops_everything_both_ways_then_recovers() -> None:
    async with rig(Impairment(delay=0.05), echo=True) as r:
        r.client.send(b"hello")
        await until(lambda: len(r.client.received) == 1, what="the first echo")
        flow_addr = r.server.received[0][1]

        r.proxy.outage(True)
        assert r.proxy.in_outage
        for i in range(5):
            r.client.send(b"up %d" % i)
            r.server.send(b"down %d" % i, flow_addr)
        await until(lambda: r.settled("up", 6) and r.settled("down", 6), what="the drops")
        assert r.proxy.counters("up").dropped["outage"] == 5
        assert r.proxy.counters("down").dropped["outage"] == 5
        assert len(r.server.received) == 1 and len(r.client.received) == 1

        r.proxy.outage(False)
        r.client.send(b"back")
        await until(lambda: len(r.client.received) == 2, what="the echo after the outage")
        assert r.client.payloads()[-1] == b"re:back"

        # A scheduled outage ends on its own.
        r.proxy.schedule_outage(0.0, 0.2)
        assert r.proxy.in_outage
        r.client.send(b"lost")
        await until(lambda: r.settled("up", 8), what="the drop")
        assert r.proxy.counters("up").dropped["outage"] == 6
        await until(lambda: not r.proxy.in_outage, what="the scheduled outage to end")
        r.client.send(b"again")
        await until(lambda: len(r.client.received) == 3, what="the echo after the outage")
        assert r.client.payloads()[-1] == b"re:again"


def test_scheduled_two_minute_outage_runs_in_virtual_time(vclock: VirtualClock) -> None:
    async def main() -> tuple[list[bytes], dict[str, Any]]:
        loop = asyncio.get_running_loop()
        async with rig(Impairment(delay=0.15), echo=True, outages=[(10.0, 120.0)]) as r:
            start = loop.time()
            r.client.send(b"before")
            await until(lambda: len(r.client.received) == 1, what="the echo before the outage")
            # Sent before the outage, due after it starts: a packet on the wire is lost too.
            await asyncio.sleep(start + 9.9 - loop.time())
            r.client.send(b"on the wire")
            await until(lambda: r.proxy.counters("up").packets_in == 2, what="the proxy to read it")
            assert not r.proxy.in_outage
            await asyncio.sleep(start + 60.0 - loop.time())
            assert r.proxy.in_outage
            r.client.send(b"during")
            await until(lambda: r.settled("up", 3), what="the drop")
            await asyncio.sleep(start + 135.0 - loop.time())
            assert not r.proxy.in_outage
            r.client.send(b"after")
            await until(lambda: len(r.client.received) == 2, what="the echo after the outage")
            assert loop.time() - start >= 135.0 + 2 * 0.15
            return r.client.payloads(), r.proxy.stats()

    payloads, stats = vclock.run(main())
    assert payloads == [b"re:before", b"re:after"]
    assert stats["up"]["dropped"]["outage"] == 2
    assert stats["up"]["packets_out"] == 2
    assert stats["outage"] is False


def test_idle_flows_are_forgotten_like_a_nat(vclock: VirtualClock) -> None:
    async def main() -> tuple[list[tuple[bytes, Any]], dict[str, Any]]:
        async with rig(echo=True, flow_timeout=5.0) as r:
            r.client.send(b"one")
            await until(lambda: len(r.client.received) == 1, what="the echo")
            assert r.proxy.stats()["flows"] == 1
            await asyncio.sleep(4.0)
            r.client.send(b"two")  # activity keeps the flow
            await until(lambda: len(r.client.received) == 2, what="the echo")
            await asyncio.sleep(4.0)
            assert r.proxy.stats()["flows"] == 1
            await asyncio.sleep(4.0)
            assert r.proxy.stats()["flows"] == 0
            r.client.send(b"three")  # a new flow, from a new upstream port
            await until(lambda: len(r.client.received) == 3, what="the echo")
            return r.server.received, r.proxy.stats()

    received, stats = vclock.run(main())
    assert [data for data, _ in received] == [b"one", b"two", b"three"]
    assert received[0][1] == received[1][1]
    assert stats["flows_opened"] == 2 and stats["flows"] == 1


async def test_live_set_and_update_change_the_link() -> None:
    async with rig(echo=True) as r:
        r.client.send(b"a")
        await until(lambda: len(r.client.received) == 1, what="the echo")

        r.proxy.set(Impairment(loss=1.0))
        r.client.send(b"b")
        await until(lambda: r.settled("up", 2), what="the drop")
        assert r.proxy.counters("up").dropped["loss"] == 1
        assert len(r.server.received) == 1

        r.proxy.set(up=Impairment(), down=Impairment(loss=1.0))
        r.client.send(b"c")
        await until(lambda: r.settled("down", 2), what="the reply to be dropped")
        assert r.server.payloads()[-1] == b"c"
        assert len(r.client.received) == 1

        r.proxy.update(direction="down", loss=0.0, delay=0.01)
        assert r.proxy.impairment["down"] == Impairment(delay=0.01)
        assert r.proxy.impairment["up"] == Impairment()
        r.client.send(b"d")
        await until(lambda: len(r.client.received) == 2, what="the echo")
        assert r.client.payloads()[-1] == b"re:d"


async def test_handle_command_refuses_bad_requests_and_keeps_the_config() -> None:
    async with rig(Impairment(loss=0.1)) as r:
        for request in [
            {"cmd": "set", "params": {"loss": "150%"}},
            {"cmd": "set", "params": {"colour": "blue"}},
            {"cmd": "set", "dir": "sideways", "params": {"loss": 0}},
            {"cmd": "set", "params": {"loss": "60%", "burst": 1.2}},
            {"cmd": "outage"},
            {"cmd": "reboot"},
            ["not", "an", "object"],
        ]:
            with pytest.raises(ValueError):
                r.proxy.handle_command(request)  # type: ignore[arg-type]
        assert r.proxy.impairment == {"up": Impairment(loss=0.1), "down": Impairment(loss=0.1)}
        response = r.proxy.handle_command({"cmd": "set", "params": {"gemodel": "1%:30%"}})
        assert response["impairment"]["up"]["gilbert"]["r"] == 0.3
        assert r.proxy.impairment["down"].gilbert == GilbertElliott(p=0.01, r=0.3)


# --------------------------------------------------------------------------------------------------
# The control channel and the command line, from other processes


async def run_cli(*args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        LINKEM,
        *args,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_control_channel_from_another_process(tmp_path: Path) -> None:
    path = str(tmp_path / "ctl.sock")
    async with rig(Impairment(delay=0.01), echo=True, control=path) as r:
        assert r.proxy.control_address == path
        rc, out, err = await run_cli(
            "ctl", "--control", path, "--dir", "up", "set", "loss=100%", "delay=20ms"
        )
        assert (rc, err) == (0, "")
        assert json.loads(out)["ok"] is True
        assert r.proxy.impairment["up"] == Impairment(loss=1.0, delay=0.02)
        assert r.proxy.impairment["down"] == Impairment(delay=0.01)
        r.client.send(b"x")
        await until(lambda: r.settled("up", 1), what="the drop")
        assert r.proxy.counters("up").dropped["loss"] == 1

        rc, out, _ = await run_cli("ctl", "--control", path, "stats")
        assert rc == 0
        assert json.loads(out)["stats"]["up"]["dropped"]["loss"] == 1

        rc, _, _ = await run_cli("ctl", "--control", path, "outage", "on")
        assert rc == 0 and r.proxy.in_outage
        # The same channel from a coroutine.
        assert (await linkem.control(path, {"cmd": "outage", "on": False}))["outage"] is False
        assert not r.proxy.in_outage
        assert (await linkem.control(path, {"cmd": "clear"}))["ok"] is True
        assert r.proxy.impairment == {"up": Impairment(), "down": Impairment()}
        r.client.send(b"y")
        await until(lambda: r.client.payloads() == [b"re:y"], what="the echo")

    rc, _, err = await run_cli("ctl", "--control", path, "stats")
    assert rc == 69 and err.startswith("linkem: error: control channel")


async def test_control_channel_answers_garbage_and_stops_with_a_client_connected() -> None:
    async with rig(control=0) as r:
        where = r.proxy.control_address
        assert isinstance(where, tuple) and where[0] == "127.0.0.1"
        reader, writer = await asyncio.open_connection(*where)
        for line in [b"not json", b'"a string"', b'{"cmd": "set", "params": []}']:
            writer.write(line + b"\n")
            answer = json.loads(await reader.readline())
            assert answer["ok"] is False and answer["error"]
        writer.write(b'{"cmd": "show"}\n')
        answer = json.loads(await reader.readline())
        assert answer["ok"] is True and answer["impairment"]["up"]["loss"] == 0.0
        # Leaves with the client still connected: stop() must not wait for it.
    assert await reader.read() == b""
    writer.close()


async def test_cli_runs_the_proxy_controlled_over_tcp() -> None:
    server = await open_peer(echo=True)
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        LINKEM,
        "run",
        "--listen",
        "127.0.0.1:0",
        "--target",
        "{}:{}".format(*server.addr),
        "--delay",
        "10ms",
        "--dup",
        "100%",
        "--seed",
        "1",
        "--control",
        "0",
        "--stats",
        "0",
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        first = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode()
        assert first.startswith("linkem: listening on 127.0.0.1:"), first
        port = int(first.split("listening on 127.0.0.1:")[1].split()[0])
        control_port = int(first.split("control=")[1])
        client = await open_peer(remote=("127.0.0.1", port))
        client.send(b"hi")
        # dup=100% both ways: 2 copies reach the server, 4 answers come back.
        await until(lambda: len(client.received) == 4, what="the duplicated echoes")
        assert set(client.payloads()) == {b"re:hi"}

        response = await linkem.control(control_port, {"cmd": "set", "params": {"dup": 0}})
        assert response["ok"] and response["impairment"]["down"]["dup"] == 0
        stats = (await linkem.control(control_port, {"cmd": "stats"}))["stats"]
        assert stats["up"]["duplicated"] == 1 and stats["down"]["duplicated"] == 2
        assert stats["seed"] == 1
        bad = await linkem.control(control_port, {"cmd": "set", "params": {"delay": "soon"}})
        assert bad["ok"] is False and "delay" in bad["error"]
        assert client.transport is not None
        client.transport.close()
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        out, err = await asyncio.wait_for(proc.communicate(), 30)
        assert server.transport is not None
        server.transport.close()
    assert proc.returncode == 0, err.decode()
    assert "up: in=1 out=2" in out.decode().splitlines()[-1]


BAD_ARGS = [
    (["--loss", "150%"], "loss"),
    (["--delay", "fast"], "duration"),
    (["--rate", "256kbps"], "ambiguous"),
    (["--outage", "30s"], "START+DURATION"),
    (["--loss", "60%", "--burst", "1.2"], "impossible"),
    (["--up", "colour=blue"], "unknown parameter"),
    (["--queue", "0"], "count"),
    (["--distribution", "cauchy"], "distribution"),
    (["--seed", "x"], "seed"),
]


@pytest.mark.parametrize(("extra", "needle"), BAD_ARGS)
def test_run_refuses_bad_arguments_in_one_line(
    extra: list[str], needle: str, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["run", "--listen", "127.0.0.1:0", "--target", "127.0.0.1:5683", *extra]
    assert linkem.main(argv) == 64
    captured = capsys.readouterr()
    assert captured.out == ""
    assert len(captured.err.splitlines()) == 1
    assert captured.err.startswith("linkem: error: ")
    assert needle in captured.err


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["bogus"],
        ["run", "--target", "127.0.0.1:5683"],
        ["run", "--listen", "localhost", "--target", "127.0.0.1:5683"],
        ["ctl", "--control", "/tmp/x.sock", "set", "loss"],
        ["ctl", "--control", "/tmp/x.sock", "set"],
        ["ctl", "--control", "/tmp/x.sock", "set", "loss=2"],
        ["ctl", "--control", "/tmp/x.sock", "outage", "maybe"],
        ["ctl", "--control", "/tmp/x.sock", "stats", "now"],
    ],
)
def test_commands_refuse_bad_usage_in_one_line(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert linkem.main(argv) == 64
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith("linkem: error: ")


def test_the_script_exits_64_on_a_bad_argument() -> None:
    proc = subprocess.run(
        [sys.executable, LINKEM, "run", "--listen", "127.0.0.1:0", "--target", "nowhere"],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, "PYTHONPATH": ""},
    )
    assert proc.returncode == 64
    assert proc.stdout == ""
    assert proc.stderr.strip() == (
        "linkem: error: argument --target: bad address 'nowhere': use HOST:PORT or [V6HOST]:PORT"
    )


def test_parsers_read_human_units() -> None:
    assert linkem.parse_duration("150ms") == pytest.approx(0.15)
    assert linkem.parse_duration("2m") == 120.0
    assert linkem.parse_duration("500us") == pytest.approx(0.0005)
    assert linkem.parse_duration("1.5") == 1.5
    assert linkem.parse_probability("10%") == pytest.approx(0.1)
    assert linkem.parse_probability("0.25") == 0.25
    assert linkem.parse_rate("256kbit") == 32_000
    assert linkem.parse_rate("2mbit") == 250_000
    assert linkem.parse_rate("32kB/s") == 32_000
    assert linkem.parse_size("16KiB") == 16_384
    assert linkem.parse_outage("30s+120s") == (30.0, 120.0)
    assert linkem.parse_address("[::1]:5683") == ("::1", 5683)
    assert linkem.parse_gilbert("1%:30%:90%") == GilbertElliott(0.01, 0.3, 0.9)
    assert linkem.parse_params({"loss": "10%", "queue": "5", "preserve-order": "on"}) == {
        "loss": pytest.approx(0.1),
        "queue_limit": 5,
        "preserve_order": True,
    }
    imp = Impairment(delay=0.15, jitter=0.02, loss=0.1, burst=3, rate=32_000)
    assert imp.describe() == "delay=150ms jitter=20ms loss=10% burst=3 rate=256kbit"
    assert Impairment().describe() == "clear"
    assert Impairment().is_clear and Impairment(queue_limit=5, reorder_gap=1.0).is_clear
    assert not imp.is_clear and not Impairment(gilbert=GilbertElliott(0.1, 0.5)).is_clear
    assert Impairment(burst=2.5, bucket=1500).describe() == "burst=2.5 bucket=1500"


async def test_a_coap_client_talks_to_its_server_through_the_proxy() -> None:
    import aiocoap
    from aiocoap import resource

    class Reverse(resource.Resource):
        def __init__(self) -> None:
            super().__init__()
            self.handled = 0

        async def render_post(self, request: aiocoap.Message) -> aiocoap.Message:
            self.handled += 1
            return aiocoap.Message(code=aiocoap.CHANGED, payload=request.payload[::-1])

    probe = await open_peer()  # a free UDP port for the server (aiocoap does not report port 0)
    port = probe.addr[1]
    assert probe.transport is not None
    probe.transport.close()
    site = resource.Site()
    reverse = Reverse()
    site.add_resource(["rev"], reverse)
    server = await aiocoap.Context.create_server_context(
        site, bind=("127.0.0.1", port), transports=["udp6"]
    )
    client = await aiocoap.Context.create_client_context(transports=["udp6"])
    # Every answer arrives twice and late: CoAP's deduplication sorts that out.
    proxy = LinkEmulator(("127.0.0.1", 0), ("127.0.0.1", port), Impairment(delay=0.01), seed=1)
    proxy.set(down=Impairment(delay=0.01, jitter=0.005, dup=1.0))
    await proxy.start()
    try:
        for i in range(3):
            uri = f"coap://127.0.0.1:{proxy.port}/rev"
            request = aiocoap.Message(code=aiocoap.POST, uri=uri, payload=b"batch%d" % i)
            response = await asyncio.wait_for(client.request(request).response, 30)
            assert response.code == aiocoap.CHANGED
            assert response.payload == (b"batch%d" % i)[::-1]
        assert reverse.handled == 3
        assert proxy.counters("down").duplicated == 3
    finally:
        await client.shutdown()
        await proxy.stop()
        await server.shutdown()
