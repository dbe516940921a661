"""Bench of agent updates (docs/ota.md): what an update costs, measured with real processes.

The harness is tests/e2e/test_ota.py's (tools/otarig.py): a real endpoint in-process on
loopback, releases published with ``edge-agent-cloud releases publish``, real agents
(``edge-agent run --simulate pump``) installed from them, edge-agent.service run from its unit
files as systemd runs it (ExecStartPre boot counter, ExecStart, READY=1 on a notify socket,
another start after a failure; systemd's RestartSec=5s between failed starts is not waited for).
The test release's bundle is this checkout's wheel and pip's wheel (its dependencies come from
the running venv, tools/otarig.py): ``bundle_bytes`` is that release file, not a full bundle
with numpy and LiteRT (tools/flash bundle: 49 MB for x86_64).

- **download goodput**: the release (manifest, block-wise file, SHA-256 and signature checks:
  :func:`agent.ota.updater.stage`) through the link impairment proxy capped at 2 Mbit/s with
  5 ms delay each way; file bytes per second over the cap, with the fetcher's window of
  ``BLOCK_WINDOW`` blocks in flight. Baseline, interleaved in the same run: the same download
  stop-and-wait (one block in flight).
- **switch downtime**: release 1.0 runs and syncs; 1.1 is staged and installed beside it (the
  root helper), then the service is stopped (SIGTERM) and started again: seconds from the stop
  to READY=1 of 1.1. Baseline: a plain restart of the same release, measured the same way.
- **readings lost**: sequence numbers the agents logged as committed (1.0, 1.1, the rollback)
  that the endpoint does not have, gaps included, once a last run has sent what was queued at
  the final stop (the queue carries across the switch and the rollback).
- **rollback**: a release that crashes at start is switched to; seconds from the stop of the
  good release to READY=1 of the good release again, after the boot counter's failed starts and
  the rollback (add 3 x RestartSec on a device).

Options: ``--quick`` (one download of each kind instead of two).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from pathlib import Path
from typing import Any

from linkem import Impairment, LinkEmulator
from otarig import DEVICE, Service, World, build_wheels, deps_site, lost, until

from agent.modelstore.fetch import BLOCK_WINDOW
from agent.ota import bootcheck as bc
from agent.ota.updater import ReleaseFetcher, apply_staged, stage
from agent.sync.transport import CoapTransport
from benches import Result, workdir
from cloud.releases import RELEASE_FILE
from cloud.server import CloudServer
from drivers.clock import RealClock

MEASURES = (
    "release download goodput over 2 Mbit/s + 5 ms, switch downtime (stop to READY on the new "
    "release), rollback time of a crashing release, readings lost across the switch"
)
BASELINE = "a stop-and-wait download through the same proxy; a plain restart of the same release"

RATE = 250_000.0  # bytes per second: 2 Mbit/s
DELAY = 0.005  # seconds each way

# What the README claims (checked by the run; a shortfall prints NOT MET)
CLAIM_READINGS_LOST = 0


async def _download(world: World, runs: int) -> dict[str, Any]:
    imp = Impairment(delay=DELAY, rate=RATE)
    elapsed: dict[int, list[float]] = {BLOCK_WINDOW: [], 1: []}
    async with LinkEmulator(
        listen=("127.0.0.1", 0), target=("127.0.0.1", world.server.port), impairment=imp, seed=1
    ) as proxy:
        for i in range(runs):
            for lanes in (BLOCK_WINDOW, 1):  # interleaved: ours, stop-and-wait, ours, ...
                transport = CoapTransport(RealClock(), lanes=lanes)
                fetcher = ReleaseFetcher(transport, f"coap://127.0.0.1:{proxy.port}")
                data = world.tmp / f"download-{i}-{lanes}"
                t0 = time.perf_counter()
                try:
                    await stage(fetcher, version="1.1", sha256=None, key=world.key, data_dir=data)
                finally:
                    await fetcher.close()
                elapsed[lanes].append(time.perf_counter() - t0)
    return {"window": elapsed[BLOCK_WINDOW], "stop_and_wait": elapsed[1]}


async def _restart(service: Service) -> tuple[float, list[str]]:
    t0 = time.perf_counter()
    await service.stop()
    outcomes = await service.run_until_ready()
    return time.perf_counter() - t0, outcomes


async def _measure(work: Path, runs: int) -> dict[str, Any]:
    wheels = build_wheels(work / "wheels")
    deps = deps_site(work / "deps")
    server = await CloudServer.start(work / "cloud", "127.0.0.1", 0, allow_plain=True)
    out: dict[str, Any] = {}
    service: Service | None = None
    try:
        world = World(work, server, wheels, deps)
        world.publish("1.1", "agent")
        out["bundle_bytes"] = (world.cloud / "releases" / "1.1" / RELEASE_FILE).stat().st_size
        out["download"] = await _download(world, runs)
        await world.install_initial("1.0")
        credential = world.etc / "credential.json"
        (await server.register(DEVICE)).write(credential)
        service = Service(world, world.config(credential))
        await service.run_until_ready()
        await until(lambda: server.seqs(DEVICE), 60, "no records from 1.0")
        out["restart_s"], _ = await _restart(service)  # the baseline: same release
        await world.stage("1.1")
        await asyncio.to_thread(apply_staged, world.root, world.data, world.key, site=[deps])
        out["switch_s"], out["switch_starts"] = await _restart(service)

        async def confirmed() -> bool:
            return (bc.load(world.root).get("outcome") or {}).get("result") == "updated"

        await until(confirmed, 120, "1.1 never confirmed")
        await world.stage("1.2", world.publish("1.2", "crash"))
        await asyncio.to_thread(apply_staged, world.root, world.data, world.key, site=[deps])
        out["rollback_s"], out["rollback_starts"] = await _restart(service)
        await service.stop()
        committed, stored = await service.drain(server)  # a last run sends what is queued
        out["readings_lost"] = lost(committed, stored)
        out["readings"] = len(committed)
    finally:
        if service is not None and service.proc is not None and service.proc.returncode is None:
            service.proc.kill()
            await service.proc.wait()
        await server.stop()
    return out


def run(args: argparse.Namespace) -> Result:
    runs = 1 if args.quick else 2
    with workdir(args, "ota") as wd:
        m = asyncio.run(_measure(wd.path, runs))
    size = m["bundle_bytes"]
    ratio = size / statistics.median(m["download"]["window"]) / RATE
    saw = size / statistics.median(m["download"]["stop_and_wait"]) / RATE
    res = Result()
    res.add("release file (agent wheel + pip, tar)", f"{size:,} B", "signed manifest beside it")
    res.add(
        f"download goodput / link cap, window {BLOCK_WINDOW}",
        f"{ratio:.3f}",
        f"{ratio * RATE:,.0f} B/s of {RATE:,.0f} B/s (2 Mbit/s, {DELAY * 1000:.0f} ms each way); "
        "manifest, blocks, SHA-256 and signature included",
    )
    res.add(
        "download goodput / link cap, stop-and-wait (measured)",
        f"{saw:.3f}",
        f"one block in flight, same proxy and endpoint; ours is {ratio / saw:.2f}x",
    )
    res.add(
        "switch downtime (SIGTERM of 1.0 to READY=1 of 1.1)",
        f"{m['switch_s']:.2f} s",
        f"a plain restart of 1.0: {m['restart_s']:.2f} s; starts {m['switch_starts']}",
    )
    res.add(
        "rollback (stop to READY=1 of the previous release)",
        f"{m['rollback_s']:.2f} s",
        f"starts {m['rollback_starts']}; without systemd's RestartSec=5s between them",
    )
    res.add(
        "readings lost across switch and rollback",
        str(m["readings_lost"]),
        f"of {m['readings']} committed by the agents",
    )
    res.claim(
        "no reading is lost across an update",
        str(m["readings_lost"]),
        m["readings_lost"] <= CLAIM_READINGS_LOST,
    )
    res.summary.update(
        {
            "bundle_bytes": size,
            "download_goodput_ratio": round(ratio, 4),
            "baseline_stop_and_wait_goodput_ratio": round(saw, 4),
            "switch_downtime_s": round(m["switch_s"], 3),
            "baseline_restart_s": round(m["restart_s"], 3),
            "rollback_s": round(m["rollback_s"], 3),
            "readings_lost": m["readings_lost"],
            "readings_committed": m["readings"],
        }
    )
    return wd.stamp(res)
