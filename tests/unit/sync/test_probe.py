"""The link monitor's probes while the uplink holds (offline): they come sooner than
``probe_idle`` (a jittered backoff from 1 s), they take a device on a dead fallback back to a
primary that answers again once ``primary_retry`` has passed, and an unanswered probe of the
current endpoint moves an offline device on to the next one. Online, a lost probe moves nothing.
Virtual time; the transport is a table of which endpoint answers."""

from __future__ import annotations

import asyncio
import itertools
import random
from typing import Any

from agent.errors import SyncError
from agent.sync.link import LOW, OFFLINE, CoapProbe, LinkMonitor, LinkSettings
from agent.sync.transport import Endpoints
from drivers.clock import VirtualClock

GW, CLOUD = "coap://gw", "coap://cloud"


class Net:
    """Which endpoints answer; every probe sent, with its time."""

    def __init__(self, clock: VirtualClock, up: set[str]) -> None:
        self.clock, self.up = clock, up
        self.sent: list[tuple[float, str]] = []

    async def request(self, method: str, uri: str, **kw: Any) -> None:
        assert method == "GET" and kw["confirmable"] is False
        base = uri.rsplit("/devices/", 1)[0]
        self.sent.append((self.clock.monotonic(), base))
        if base not in self.up:
            await self.clock.sleep(kw["deadline"])
            raise SyncError(f"GET {uri}: no answer within {kw['deadline']:g} s")


def monitor(clock: VirtualClock, net: Net, eps: Endpoints, seed: int = 1) -> LinkMonitor:
    s = LinkSettings(initial="medium", offline_failures=3, offline_silence=20.0, probe_timeout=2.0)
    m = LinkMonitor(s, clock, probe=CoapProbe(net, eps, "pump-01"), rng=random.Random(seed))
    return m


async def _offline(m: LinkMonitor, clock: VirtualClock) -> None:
    """Three failures 21 s after the last answer: offline."""
    await clock.sleep(21.0)
    for _ in range(3):
        m._record(clock.monotonic(), False, None, False)
    assert m.state == OFFLINE


async def _run_for(m: LinkMonitor, clock: VirtualClock, seconds: float) -> None:
    """The monitor runs (probes) for ``seconds`` of virtual time."""
    task = asyncio.get_running_loop().create_task(m.run())
    await clock.sleep(seconds)
    task.cancel()


async def _until_online(m: LinkMonitor, clock: VirtualClock) -> None:
    """The monitor runs (probes) until it leaves offline, a minute at most."""
    task = asyncio.get_running_loop().create_task(m.run())
    for _ in range(60):
        await clock.sleep(1.0)
        if m.state != OFFLINE:
            break
    task.cancel()


def test_an_offline_device_on_a_dead_fallback_returns_to_its_primary(vclock: VirtualClock) -> None:
    async def main() -> None:
        eps = Endpoints((GW, CLOUD), vclock, primary_retry=600.0)
        net = Net(vclock, {GW})  # the gateway is back, the cloud has gone away
        m = monitor(vclock, net, eps)
        await _offline(m, vclock)
        eps.failed(GW)  # the gateway was down a moment: the device went to the cloud
        assert eps.current == CLOUD
        left = vclock.monotonic()
        await _until_online(m, vclock)
        # long before primary_retry: the cloud did not answer a probe, the list moved on
        assert m.state == LOW and eps.current == GW
        assert [uri for _, uri in net.sent] == [CLOUD, GW]
        assert net.sent[-1][0] - left < 10.0  # not at the next probe_idle (30 s)

    vclock.run(main())


def test_an_idle_device_on_a_fallback_returns_to_the_primary_at_primary_retry(
    vclock: VirtualClock,
) -> None:
    async def main() -> None:
        eps = Endpoints((GW, CLOUD), vclock, primary_retry=100.0)
        eps.failed(GW)
        left = vclock.monotonic()
        net = Net(vclock, {GW, CLOUD})  # both answer: online all along, the uplink idle
        m = monitor(vclock, net, eps)
        await _run_for(m, vclock, 200.0)
        assert eps.current == GW and m.state != OFFLINE
        first = next(t for t, uri in net.sent if uri == GW)
        assert 100.0 <= first - left <= 100.0 + 30.0 + 1.0  # the first idle probe after it
        assert all(uri == CLOUD for t, uri in net.sent if t < first)

    vclock.run(main())


def test_a_dead_primary_probed_again_does_not_take_a_working_fallback_offline(
    vclock: VirtualClock,
) -> None:
    async def main() -> None:
        eps = Endpoints((GW, CLOUD), vclock, primary_retry=5.0)
        eps.failed(GW)
        net = Net(vclock, {CLOUD})
        m = monitor(vclock, net, eps)
        await _run_for(m, vclock, 3600.0)
        sent = [uri for _, uri in net.sent]
        assert sent.count(GW) > 50 and sent.count(CLOUD) > 50  # the primary tried at each probe
        # the link measured is the cloud's: it never went offline (nor lost anything)
        assert all(to != OFFLINE for _, to, _ in m.transitions) and m.state != OFFLINE
        assert m.probes_failed == 0 and eps.current == CLOUD

    vclock.run(main())


def test_an_offline_device_on_a_dead_primary_moves_to_the_next_endpoint(
    vclock: VirtualClock,
) -> None:
    async def main() -> None:
        eps = Endpoints((GW, CLOUD), vclock, primary_retry=600.0)
        net = Net(vclock, {CLOUD})
        m = monitor(vclock, net, eps)
        await _offline(m, vclock)
        start = vclock.monotonic()
        await _until_online(m, vclock)
        assert m.state == LOW and eps.current == CLOUD
        assert [uri for _, uri in net.sent] == [GW, CLOUD]
        assert net.sent[-1][0] - start < 10.0

    vclock.run(main())


def test_offline_probes_back_off_with_jitter_up_to_probe_idle_and_reset_on_an_answer(
    vclock: VirtualClock,
) -> None:
    for seed in range(20):

        async def main(seed: int = seed) -> None:
            eps = Endpoints((GW,), vclock)
            net = Net(vclock, set())
            m = monitor(vclock, net, eps, seed)
            await _offline(m, vclock)
            start = vclock.monotonic()
            task = asyncio.get_running_loop().create_task(m.run())
            await vclock.sleep(600.0)
            times = [t for t, _ in net.sent]
            # from the end of one probe to the start of the next (each waits its 2 s deadline)
            gaps = [b - a - 2.0 for a, b in itertools.pairwise(times)]
            assert gaps and all(0.5 - 1e-9 <= g <= 30.05 + 1e-6 for g in gaps), gaps
            assert times[0] - start <= 1.0 + 1e-6  # the first within a second
            assert max(gaps) > 8.0  # it backs off (2**4 s caps the fifth)
            assert len(times) < 600 / 8  # a long outage: a probe every ~15 s on average at most
            net.up.add(GW)
            await vclock.sleep(30.0 + 2.0 + 1.0)  # the longest wait, a probe, a margin
            assert m.state == LOW
            task.cancel()
            assert m.probe_period == m.settings.probe_idle  # online: the idle period again
            m.state = OFFLINE
            assert m.probe_period == 1.0  # and the backoff starts again from 1 s

        vclock.run(main())


def test_online_a_lost_probe_moves_no_endpoint(vclock: VirtualClock) -> None:
    async def main() -> None:
        eps = Endpoints((GW, CLOUD), vclock, primary_retry=5.0)
        net = Net(vclock, {CLOUD})
        m = monitor(vclock, net, eps)
        probe = m.probe
        assert probe is not None
        try:
            await probe(2.0)
        except SyncError:
            pass
        assert eps.current == GW

    vclock.run(main())
