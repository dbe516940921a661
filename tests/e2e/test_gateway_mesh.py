"""Three peer gateways, partitioned into {1} | {2, 3} with conflicting writes on both sides, then
healed: all three converge to one state, and every key ends as its rule says.

Real pieces throughout: three :class:`PeerSync` loops, three aiocoap servers on loopback, and
between every ordered pair of gateways a UDP proxy (tools/linkem.py) whose outage makes the
partition (everything on the wire between the two sides is dropped, in both directions).

The rules (agent/gateway/crdt.py), one line per key of this scenario, in :data:`RULES`.
The time from the heal to convergence is printed for information (the bench reports it as
``convergence_s``); nothing here asserts a duration.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from linkem import LinkEmulator

from agent.gateway.crdt import LWWRegister
from agent.gateway.hlc import Timestamp
from agent.gateway.peers import PeerServer, PeerState, PeerSync
from agent.sync.transport import CoapTransport
from drivers.clock import RealClock
from tests.unit.gateway.helpers import SetClock

NODES = ("gw-1", "gw-2", "gw-3")
SIDE_A, SIDE_B = {0}, {1, 2}  # gateway indexes on each side of the partition
PERIOD = 0.2  # seconds between exchanges (the default is 5 s)
DEADLINE = 1.0  # of one request
SETTLE = 60.0  # the longest a phase may take before the test gives up (not a timing assertion)
T0 = 1_700_000_000.0

#: The rule that decides each key, and the value it predicts.
RULES = {
    "model/anomaly": (
        "LWW, a tie of wall time and counter (both written at the same HLC time): the greater "
        "node id wins, gw-3 over gw-1",
        {"version": 4, "by": "gw-3"},
    ),
    "config/sample_rate": (
        "LWW: the later hybrid timestamp wins; gw-1 (side {1}) wrote 1 s after gw-2",
        50,
    ),
    "config/threshold": (
        "LWW: the later hybrid timestamp wins; gw-3 (side {2,3}) wrote 1 s after gw-1",
        4.0,
    ),
    "config/legacy": (
        "LWW with a deletion: gw-1's delete is later than gw-2's update, so the key is gone",
        None,
    ),
    "config/only_a": ("LWW, written on side {1} only: it reaches the other side", "a"),
    "ack/pump-1": (
        "OR-set, add wins: alert-7 removed by gw-1 and re-added by gw-3 concurrently stays; "
        "alert-8 removed by gw-2 with no concurrent add goes; alert-9 added by gw-1 comes",
        ["alert-7", "alert-9"],
    ),
    "count/alerts": ("PN-counter: the sum of every increment, 2 + 3 + 4 + 5 - 1", 13),
}


@dataclass
class Mesh:
    clock: SetClock
    states: list[PeerState]
    servers: list[PeerServer]
    proxies: dict[tuple[int, int], LinkEmulator]
    transports: list[CoapTransport]
    syncs: list[PeerSync]
    tasks: list[asyncio.Task[None]]

    def partition(self, on: bool) -> None:
        for (i, j), proxy in self.proxies.items():
            if (i in SIDE_A) != (j in SIDE_A):
                proxy.outage(on)

    def snapshots(self) -> list[dict[str, object]]:
        return [s.snapshot() for s in self.states]

    async def until(self, what: str, done: object) -> float:
        """Wait until ``done()`` holds; the seconds it took."""
        start = time.perf_counter()
        while not done():  # type: ignore[operator]
            if time.perf_counter() - start > SETTLE:
                pytest.fail(f"{what}: not reached in {SETTLE:g} s: {self.snapshots()}")
            await asyncio.sleep(0.01)
        return time.perf_counter() - start

    def converged(self) -> bool:
        first = self.states[0].encode()
        return all(s.encode() == first for s in self.states[1:])


@pytest.fixture
async def mesh(tmp_path: Path) -> AsyncIterator[Mesh]:
    clock = SetClock(T0)  # one settable wall clock: the test decides which write is later
    states = [PeerState(n, tmp_path / f"{n}.cbor", clock) for n in NODES]
    servers = [await PeerServer.start(s) for s in states]
    proxies: dict[tuple[int, int], LinkEmulator] = {}
    for i in range(3):
        for j in range(3):
            if i != j:
                proxy = LinkEmulator(
                    ("127.0.0.1", 0), ("127.0.0.1", servers[j].port), seed=i * 3 + j
                )
                await proxy.start()
                proxies[i, j] = proxy
    transports, syncs = [], []
    for i in range(3):
        peers = [f"coap://127.0.0.1:{proxies[i, j].port}" for j in range(3) if j != i]
        transport = CoapTransport(RealClock(), uris=peers)
        transports.append(transport)
        syncs.append(
            PeerSync(
                states[i], peers, transport, period=PERIOD, deadline=DEADLINE, rng=random.Random(i)
            )
        )
    tasks = [asyncio.create_task(s.run()) for s in syncs]
    yield Mesh(clock, states, servers, proxies, transports, syncs, tasks)
    for task in tasks:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    for transport in transports:
        await transport.close()
    for server in servers:
        await server.stop()
    for proxy in proxies.values():
        await proxy.stop()


async def test_partitioned_site_converges_after_the_heal_by_each_keys_rule(mesh: Mesh) -> None:
    gw1, gw2, gw3 = mesh.states

    # Connected: a common starting point.
    gw2.add("ack/pump-1", "alert-7")
    gw2.add("ack/pump-1", "alert-8")
    gw1.increment("count/alerts", 2)
    gw3.set("config/legacy", "v1")
    await mesh.until("the first convergence", mesh.converged)
    assert gw1.get("ack/pump-1") == {"alert-7", "alert-8"}

    # Partitioned: {gw-1} | {gw-2, gw-3}, conflicting writes on both sides.
    mesh.partition(True)
    mesh.clock.wall = T0 + 100  # ahead of every timestamp so far: both next writes get (T, 0)
    stamps: dict[str, list[Timestamp]] = {}
    stamps["model/anomaly"] = [
        gw1.set("model/anomaly", {"version": 3, "by": "gw-1"}),
        gw3.set("model/anomaly", {"version": 4, "by": "gw-3"}),
    ]
    a, b = stamps["model/anomaly"]
    assert (a.wall, a.logical) == (b.wall, b.logical)  # a true tie: only the node id decides
    mesh.clock.wall += 1
    stamps["config/sample_rate"] = [gw2.set("config/sample_rate", 100)]
    stamps["config/legacy"] = [gw2.set("config/legacy", "v2")]
    mesh.clock.wall += 1
    stamps["config/sample_rate"].append(gw1.set("config/sample_rate", 50))
    stamps["config/legacy"].append(gw1.delete("config/legacy"))
    stamps["config/threshold"] = [gw1.set("config/threshold", 3.5)]
    mesh.clock.wall += 1
    stamps["config/threshold"].append(gw3.set("config/threshold", 4.0))
    gw1.set("config/only_a", "a")
    gw1.remove("ack/pump-1", "alert-7")
    gw3.add("ack/pump-1", "alert-7")  # concurrently: acknowledged again on the other side
    gw2.remove("ack/pump-1", "alert-8")
    gw1.add("ack/pump-1", "alert-9")
    gw1.increment("count/alerts", 3)
    gw2.increment("count/alerts", 4)
    gw3.increment("count/alerts", 5)
    gw2.increment("count/alerts", -1)

    def side_b_agrees() -> bool:
        return gw2.encode() == gw3.encode() and gw2.get("count/alerts") == 10

    await mesh.until("side {2,3} agreeing", side_b_agrees)
    await asyncio.sleep(3 * PERIOD)
    assert gw1.snapshot() != gw2.snapshot()  # the partition holds
    assert gw1.get("count/alerts") == 5 and gw2.get("config/only_a") is None
    dropped = sum(
        p.stats()["up"]["dropped_total"]
        for (i, j), p in mesh.proxies.items()
        if (i in SIDE_A) != (j in SIDE_A)
    )
    assert dropped > 0  # exchanges across were tried and lost on the wire

    # Healed.
    mesh.partition(False)
    convergence_s = await mesh.until("convergence after the heal", mesh.converged)

    snapshot = gw1.snapshot()
    assert mesh.snapshots() == [snapshot] * 3
    expected = {key: value for key, (_, value) in RULES.items() if value is not None}
    assert snapshot == expected
    for key, written in stamps.items():  # LWW keys: the entry kept is the greatest timestamp
        entry = gw1.entry(key)
        assert isinstance(entry, LWWRegister) and entry.ts == max(written)
    print(f"\nconvergence_s={convergence_s:.3f} (heal -> all three equal; information only)")
    for key, (rule, value) in RULES.items():
        print(f"  {key}: {value!r}  <- {rule}")

    for sync in mesh.syncs:  # what is on disk is what converged
        await sync.state.flush()
    for state in mesh.states:
        assert PeerState(state.node, state.path, RealClock()).snapshot() == expected
