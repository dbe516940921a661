"""Issue 6's adaptation acceptance: the agent on the simulated rig sends through the impairment
proxy to the endpoint while the link goes clean -> 30 % loss with 600 ms delay (each way) ->
outage -> clean -> a steady 5 % loss.

The link monitor's state follows each change within a bounded number of exchanges, the uplink's
encoding and batch size and the detector's model tier change as the ``[link]`` config says, the
state does not flap under the steady 5 % loss, and every record the store committed reaches the
endpoint exactly once (what is still queued when the agent stops is drained afterwards by an
uplink on the same store, as the next run of the agent would).

Real time, short intervals: probes after 0.5 s of silence, offline after 2 unanswered exchanges
and 8 s without an answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from pathlib import Path

import pytest
from linkem import Impairment, LinkEmulator

from agent.sense.simrig import SimRig
from agent.service import config as configmod
from agent.service.config import example_config
from agent.service.runtime import Agent
from agent.store.queue import NewRecord, Store
from agent.sync import uplink as uplink_mod
from agent.sync.link import HIGH, LOW, OFFLINE
from agent.sync.transport import CoapTransport, Endpoints
from agent.sync.uplink import Uplink
from agent.wire.records import Kind, TelemetryBody
from cloud.server import CloudServer
from drivers.clock import RealClock

DEVICE = "pump-rig-01"
T0 = 1_700_000_000.0

LINK_TOML = """
[uplink]
endpoints = ["coap://127.0.0.1:{port}"]
security = "none"  # the link policy is under test here; tests/e2e/test_sync_e2e.py is OSCORE
deadline = 20.0
backoff_base = 0.1
backoff_max = 2.0

[link]
initial = "medium"
medium_rtt = 0.5            # loopback under a loaded CI machine can take 100 ms and more
low_rtt = 0.9
hold = 2                    # few exchanges complete on the lossy link: decide on two
probe_idle = 0.5
probe_timeout = 3.0
offline_failures = 2
offline_silence = 8.0

[link.high]
batch_bytes = 2048          # small, so the steady phase makes many exchanges

[link.medium]
content_format = 65000      # compact without deflate (the default is 65001)
"""
# [link.low] keeps its defaults: compact+deflate+dict (65002), 1 KiB batches, the lite model.

#: Exchanges (data and probes) within which the state must follow a change of the link.
FOLLOW_WITHIN = 30
#: Exchanges within which it climbs from offline back to high: via low, measuring afresh (the
#: loss rate's upper bound must fall below recover * medium_loss).
RECOVER_WITHIN = 90
#: Exchanges observed under the steady 5 % loss.
STEADY_EXCHANGES = 120


def backlog(n: int) -> list[NewRecord]:
    out = []
    for i in range(n):
        body = TelemetryBody("motor", T0 + i, {"current_a": 2.0 + i % 50 / 100, "supply_v": 230.0})
        out.append(NewRecord(Kind.TELEMETRY, body.to_cbor(), created=T0 + i))
    return out


async def until(predicate, within: float, step: float = 0.05) -> None:
    async with asyncio.timeout(within):
        while not predicate():  # noqa: ASYNC110 - the state lives in other tasks
            await asyncio.sleep(step)


@pytest.mark.timeout(120)
async def test_link_state_follows_the_link_policy_changes_and_nothing_is_lost(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setattr(uplink_mod, "IDLE_POLL", 0.2)
    server = await CloudServer.start(tmp_path / "cloud", "127.0.0.1", 0, allow_plain=True)
    await server.add_device(DEVICE)
    proxy = LinkEmulator(listen=("127.0.0.1", 0), target=("127.0.0.1", server.port), seed=6)
    await proxy.start()
    text = configmod.strip_tables(example_config().read_text(), "uplink")
    text += LINK_TOML.format(port=proxy.port)
    path = example_config().parent / "link-adapt-test.toml"  # relative paths of the example
    cfg = configmod.loads(text, path=path)
    cfg = configmod.simulated(cfg, configmod.SimulationConfig(source="pump", seed=3))
    cfg = configmod.replace_data_dir(cfg, tmp_path / "agent")
    (tmp_path / "agent").mkdir()
    store = await Store.open(cfg.store)
    first = (await store.put(backlog(1500)))[0]  # a queue left by an earlier run
    await store.close()

    clock = RealClock()
    rig = SimRig(cfg, clock)
    agent = Agent(cfg, clock=clock, rig=rig, status_socket=False)
    task = asyncio.create_task(agent.run(install_signals=False))
    try:
        await until(lambda: agent.link is not None and agent.uplink is not None, within=10)
        link, up = agent.link, agent.uplink
        assert link is not None and up is not None
        assert link.state == "medium" and up.policy.content_format == 65000

        # clean: up to high; SenML-CBOR, the configured 2 KiB batches, the full model
        await until(lambda: link.state == HIGH, within=15)
        assert link.exchanges <= 60
        assert (up.policy.content_format, up.policy.batch_bytes) == (112, 2048)
        assert not up.policy.hold
        assert link.tier == "full" and link.cloud_validation

        # 30 % loss and 600 ms delay each way: down to low within a bounded number of exchanges
        start = link.exchanges
        proxy.set(Impairment(loss=0.30, delay=0.6))
        await until(lambda: link.state == LOW, within=30)
        assert link.exchanges - start <= FOLLOW_WITHIN
        after = [t for t in link.transitions if t[2] > start]
        assert after and after[0][0] == HIGH and after[0][1] != HIGH  # it only got worse
        assert (up.policy.content_format, up.policy.batch_bytes) == (65002, 1024)
        assert link.tier == "lite" and not link.cloud_validation
        analyzer = getattr(agent, "analyzer", None)
        if analyzer is not None:  # the detector switches once the lite model has commissioned
            assert "lite" in (analyzer.tier, analyzer.pending_tier)
        assert agent.snapshot()["link"]["state"] == LOW

        # outage: offline after two unanswered exchanges and 8 s of silence; queue only
        start = link.exchanges
        proxy.outage(True)
        await until(lambda: link.state == OFFLINE, within=30)
        assert link.exchanges - start <= FOLLOW_WITHIN
        assert up.policy.hold
        await asyncio.sleep(0.5)  # exchanges already in flight end (deadline) or not
        sent = up.stats.batches_sent
        depth_before = (await agent.store.stats()).depth
        await asyncio.sleep(2.0)
        assert up.stats.batches_sent == sent  # queue only: no batch leaves while offline
        assert (await agent.store.stats()).depth >= depth_before

        # clean again: the first answered probe lifts offline; then back up to high
        start = link.exchanges
        await agent.store.put(backlog(1500))  # as if the outage had been long
        proxy.outage(False)
        proxy.set(Impairment())
        await until(lambda: link.state == HIGH, within=30)
        assert link.exchanges - start <= RECOVER_WITHIN
        assert not up.policy.hold and up.policy.content_format == 112

        # steady 5 % loss each way: no flapping over STEADY_EXCHANGES exchanges
        await agent.store.put(backlog(3000))
        up.poke()
        start, changes = link.exchanges, len(link.transitions)
        proxy.set(Impairment(loss=0.05))
        await until(lambda: link.exchanges - start >= STEADY_EXCHANGES, within=40)
        assert list(link.transitions)[changes:] == []
        assert link.state == HIGH

        snapshot = agent.snapshot()["link"]
        for key in ("state", "rtt_ms", "loss", "availability", "goodput_bps", "policy"):
            assert key in snapshot
        metrics = agent.metrics.render()
        assert 'link_state{state="high"} 1' in metrics
        assert 'link_state{state="offline"} 0' in metrics
        proxy.set(Impairment())
    finally:
        agent.request_stop()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(task, 30)
        rig.close()

    # what is still queued goes now, as the next run would send it
    store = await Store.open(cfg.store)
    try:
        last = (await store.stats()).last_seq
        settings = cfg.uplink
        assert settings is not None
        transport = CoapTransport(clock, lanes=settings.max_inflight)
        rest = Uplink(
            settings,
            store,
            transport,
            Endpoints(settings.endpoints, clock),
            clock,
            device_id=DEVICE,
            rng=random.Random(1),
        )
        drain = asyncio.create_task(rest.run())
        try:
            async with asyncio.timeout(30):
                while (await store.stats()).depth:  # noqa: ASYNC110
                    await asyncio.sleep(0.05)
        finally:
            drain.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await drain
            await transport.close()
    finally:
        await store.close()
        await proxy.stop()
    stored = await server.seqs(DEVICE)
    await server.stop()
    assert stored == list(range(first, last + 1))  # every committed record, exactly once
