"""Bench of cloud sync: records per second delivered end to end on loopback, and bytes per record.

Measured side by side in one run, each from a fresh durable queue of telemetry records (one
reading of a 2-channel sensor each, as the agent stores them) drained by the real uplink to the
reference endpoint, which runs as its own process (``edge-agent-cloud serve``), through the link
impairment proxy:

- clean: the proxy passes everything (it is there to count the bytes on the wire);
- lossy: 5 % loss each way and 100 ms delay each way (200 ms RTT);

each beside its baseline measured in the same run, on the same link, endpoint and records:
stop-and-wait sync, one batch outstanding on one lane (``max_inflight = 1``: a single CoAP
client context, one confirmable POST at a time), run right after ours from its own fresh queue.
The queues go in a new directory inside ``--dir`` (tools/benches/__init__.py).

``bytes_per_record`` counts every UDP payload byte both ways (requests, acks, retransmissions)
divided by the records delivered on the clean link. Options: ``--quick`` (fewer records).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

from linkem import Impairment, LinkEmulator
from ports import free_port

from agent.store.queue import NewRecord, Store
from agent.store.settings import StoreSettings
from agent.sync.transport import CoapTransport, Endpoints
from agent.sync.uplink import Uplink, UplinkSettings
from agent.wire.records import Kind, TelemetryBody
from benches import Result, workdir
from drivers.clock import RealClock

MEASURES = (
    "records/s delivered to the endpoint (its own process) on a clean and a lossy link, bytes "
    "on the wire per record"
)
BASELINE = (
    "stop-and-wait sync: one batch outstanding on one lane (max_inflight = 1), same endpoint "
    "and records, same run"
)

DEVICE = "bench-01"

# What the README claims (checked by the run; a shortfall prints NOT MET)
CLAIM_OVER_STOP_AND_WAIT_LOSSY = 1.0  # ours delivers faster than stop-and-wait on the lossy link


def _free_udp_port() -> int:
    return free_port()


def _records(n: int) -> list[NewRecord]:
    t0 = 1_700_000_000.0
    rng = random.Random(7)
    out = []
    for i in range(n):
        body = TelemetryBody(
            "motor", t0 + i, {"current_a": round(2.4 + rng.gauss(0, 0.2), 4), "supply_v": 229.1}
        )
        out.append(NewRecord(Kind.TELEMETRY, body.to_cbor(), created=t0 + i))
    return out


async def _drain(
    workdir: Path, port: int, n: int, imp: Impairment, seed: int, inflight: int | None = None
) -> dict:
    """Drain ``n`` records through the proxy; ``inflight``: the uplink's max_inflight (None:
    its default), and as many transport lanes."""
    clock = RealClock()
    store = await Store.open(StoreSettings(path=workdir / "queue.db", budget_bytes=1 << 30))
    await store.put(_records(n))
    settings = UplinkSettings(endpoints=("coap://127.0.0.1:0",))
    async with LinkEmulator(
        listen=("127.0.0.1", 0), target=("127.0.0.1", port), impairment=imp, seed=seed
    ) as proxy:
        uri = f"coap://127.0.0.1:{proxy.port}"
        settings = UplinkSettings(endpoints=(uri,), backoff_base=0.05, backoff_max=2.0)
        if inflight is not None:
            settings = replace(settings, max_inflight=inflight)
        transport = CoapTransport(clock, lanes=settings.max_inflight)
        uplink = Uplink(
            settings,
            store,
            transport,
            Endpoints(settings.endpoints, clock),
            clock,
            device_id=DEVICE,
            rng=random.Random(seed),
        )
        started = time.perf_counter()
        task = asyncio.create_task(uplink.run())
        try:
            while (await store.stats()).depth:  # noqa: ASYNC110 - the store is polled
                await asyncio.sleep(0.02)
            elapsed = time.perf_counter() - started
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await transport.close()
        up, down = proxy.counters("up"), proxy.counters("down")
        wire = up.bytes_in + down.bytes_in
    await store.close()
    return {"elapsed": elapsed, "wire": wire, "stats": uplink.stats}


def run(args: argparse.Namespace) -> Result:
    n_clean = 5000 if args.quick else 20000
    n_lossy = 1000 if args.quick else 4000
    with workdir(args, "sync") as wd:
        tmp_path = wd.path
        port = _free_udp_port()
        subprocess.run(
            [
                sys.executable,
                "-m",
                "cloud.cli",
                "devices",
                "add",
                "--data",
                str(tmp_path / "cloud"),
                DEVICE,
            ],
            check=True,
            capture_output=True,
        )
        serve = [sys.executable, "-m", "cloud.cli", "serve", "--listen", f"127.0.0.1:{port}"]
        serve.append("--insecure")  # plain CoAP measured here; bench security compares OSCORE
        # four drains from one device at loopback speed: the uplink is measured, not the
        # endpoint's per-device rate limit (docs/ops.md "Rate limit")
        serve += ["--device-rate", "0"]
        server = subprocess.Popen(
            [*serve, "--data", str(tmp_path / "cloud")],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            time.sleep(1.5)
            dirs = {k: tmp_path / k for k in ("clean", "clean-saw", "lossy", "lossy-saw")}
            for d in dirs.values():
                d.mkdir()
            clean = asyncio.run(_drain(dirs["clean"], port, n_clean, Impairment(), 1))
            clean_saw = asyncio.run(_drain(dirs["clean-saw"], port, n_clean, Impairment(), 1, 1))
            lossy_imp = Impairment(delay=0.1, loss=0.05)
            lossy = asyncio.run(_drain(dirs["lossy"], port, n_lossy, lossy_imp, 2))
            lossy_saw = asyncio.run(_drain(dirs["lossy-saw"], port, n_lossy, lossy_imp, 2, 1))
        finally:
            server.terminate()
            server.wait(timeout=20)
    clean_rate = n_clean / clean["elapsed"]
    lossy_rate = n_lossy / lossy["elapsed"]
    clean_saw_rate = n_clean / clean_saw["elapsed"]
    lossy_saw_rate = n_lossy / lossy_saw["elapsed"]
    bpr = clean["wire"] / n_clean
    res = Result()
    res.add(
        "records/s, clean loopback",
        f"{clean_rate:,.0f}",
        f"{n_clean} records in {clean['elapsed']:.2f} s",
    )
    res.add(
        "records/s, 5% loss + 100 ms delay each way",
        f"{lossy_rate:,.0f}",
        f"{lossy_rate / clean_rate:.3f}x clean; "
        f"{lossy['stats'].retransmitted} batches retransmitted",
    )
    res.add(
        "records/s stop-and-wait, clean (1 batch in flight)",
        f"{clean_saw_rate:,.0f}",
        f"the baseline; ours {clean_rate / clean_saw_rate:.2f}x",
    )
    res.add(
        "records/s stop-and-wait, lossy (1 batch in flight)",
        f"{lossy_saw_rate:,.0f}",
        f"the baseline; ours {lossy_rate / lossy_saw_rate:.2f}x",
    )
    res.add("bytes on the wire per record (clean)", f"{bpr:.1f}", "UDP payloads, both directions")
    res.add(
        "bytes on the wire per record (lossy)",
        f"{lossy['wire'] / n_lossy:.1f}",
        f"{(lossy['wire'] / n_lossy) / bpr:.2f}x clean",
    )
    res.notes.append(
        "Records: one 2-channel reading each, SenML-CBOR (content format 112), batches of up to "
        "1000 records / 48 KiB, up to 8 confirmable POSTs in flight; endpoint in its own process."
    )
    res.claim(
        "sync beats stop-and-wait on a lossy link",
        f"{lossy_rate / lossy_saw_rate:.2f}x",
        lossy_rate / lossy_saw_rate > CLAIM_OVER_STOP_AND_WAIT_LOSSY,
    )
    res.summary.update(
        {
            "records_per_s_clean": round(clean_rate, 1),
            "records_per_s_lossy": round(lossy_rate, 1),
            "baseline_stop_and_wait_records_per_s_clean": round(clean_saw_rate, 1),
            "baseline_stop_and_wait_records_per_s_lossy": round(lossy_saw_rate, 1),
            "bytes_per_record": round(bpr, 2),
        }
    )
    return wd.stamp(res)
