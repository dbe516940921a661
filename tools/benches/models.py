"""Bench of the model cache and model distribution.

Measured side by side in one run:

- **swap pause**: the time the detector does not score while a model is swapped in. A detector
  commissioned on synthetic rows is fed one row at a time; between two feeds
  :meth:`Detector.swap_models` puts in the other model (the shipped int8 ``skab-ae`` and its
  float32 reference, both loaded beforehand, as :class:`ModelManager` does in a worker thread).
  The pause is the duration of that call (feature-spec check, warm-up invoke on the newest
  window, commit); the reference is the time one row takes to score (p99 of both).
- **download goodput**: the float32 model (12 100 bytes, 12 blocks of 1024) fetched from the
  reference endpoint (in-process, loopback) through the link impairment proxy with a bandwidth
  cap of 64 kbit/s and 25 ms delay each way, including the manifest and the checks. Goodput is
  file bytes per second over the proxy's cap, with the fetcher's default window (2 blocks in
  flight); the reference is the bound of stop-and-wait, one block in flight (each 1024-byte
  block costs its serialization plus one round trip), which the window is there to beat.
- **cache-hit latency**: ``await cache.get(name, version)`` then ``cache.load(...)`` for a model
  on disk and loaded (both tiers hit), against a cold load (read, verify, build the interpreter).

Options: ``--quick`` (fewer swaps and downloads).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from linkem import Impairment, LinkEmulator

from agent.detect.detector import Detector, DetectSettings
from agent.detect.features import CHANNELS
from agent.detect.inference import TFLiteModel, load_manifest
from agent.modelstore.cache import ModelCache
from agent.modelstore.fetch import BLOCK_WINDOW, ModelFetcher
from agent.modelstore.settings import ModelsSettings
from agent.sync.transport import CoapTransport
from benches import Result
from cloud.models import ModelRegistry, entry_for
from cloud.server import CloudServer
from drivers.clock import RealClock

ROOT = Path(__file__).resolve().parents[2]
MODELS = ROOT / "models"
FLOAT_AE = MODELS / "cloud" / "skab-ae.float32.tflite"
RATE = 8000.0  # bytes per second: 64 kbit/s
DELAY = 0.025  # seconds each way
LEVEL = np.array([0.21, 0.27, 2.4, 0.1, 89.0, 28.0, 229.0, 125.0])
NOISE = np.array([0.002, 0.002, 0.45, 0.25, 0.1, 0.01, 10.0, 0.5])
COAP_OVERHEAD = 40  # bytes of CoAP header, token and options per block (request ~30, response)


def _rows(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return LEVEL + NOISE * rng.standard_normal((n, len(CHANNELS)))


def _p99(xs: list[float]) -> float:
    return float(np.percentile(np.asarray(xs), 99))


def _swap_pause(swaps: int) -> dict:
    manifest = load_manifest(MODELS)
    det = Detector.from_settings(DetectSettings(models_dir=MODELS), manifest)
    n = det.spec.commissioning
    det.feed(list(range(n)), _rows(n, 1))
    int8 = det.anomaly
    cloud = load_manifest(MODELS / "cloud")
    fp32 = TFLiteModel.open(cloud, "skab-ae")
    entries = {id(int8): manifest.entry("skab-ae").raw, id(fp32): cloud.entry("skab-ae").raw}
    rows = _rows(swaps * 5 + 200, 2)
    feed_s: list[float] = []
    pause_s: list[float] = []
    for i, row in enumerate(rows):
        t0 = time.perf_counter()
        det.feed([n + i], [row])
        feed_s.append(time.perf_counter() - t0)
        if i >= 100 and i % 5 == 0 and len(pause_s) < swaps:
            new = fp32 if det.anomaly is int8 else int8
            t0 = time.perf_counter()
            det.swap_models(new, entry=entries[id(new)])
            pause_s.append(time.perf_counter() - t0)
    return {"pause": pause_s, "feed": feed_s[100:]}


async def _download(tmp: Path, runs: int) -> dict:
    key = Ed25519PrivateKey.from_private_bytes(b"\x05" * 32)
    pub = tmp / "fleet.pub"
    pub.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    registry = ModelRegistry(tmp / "cloud" / "models")
    data = FLOAT_AE.read_bytes()
    entry = entry_for(FLOAT_AE, None, "skab-ae")
    for i in range(runs):
        registry.publish(data, "skab-ae", f"3.0.{i}", entry, key)
    server = await CloudServer.start(tmp / "cloud", "127.0.0.1", 0, allow_plain=True)
    imp = Impairment(delay=DELAY, rate=RATE)
    elapsed: list[float] = []
    blocks = 0
    try:
        async with LinkEmulator(
            listen=("127.0.0.1", 0), target=("127.0.0.1", server.port), impairment=imp, seed=1
        ) as proxy:
            uri = f"coap://127.0.0.1:{proxy.port}"
            for i in range(runs):
                settings = ModelsSettings(cache_dir=tmp / f"dev{i}", public_key=pub)
                fetcher = ModelFetcher(CoapTransport(RealClock(), lanes=BLOCK_WINDOW), uri)
                cache = ModelCache.open(settings, fetcher=fetcher)
                t0 = time.perf_counter()
                got = await cache.get("skab-ae", f"3.0.{i}")
                elapsed.append(time.perf_counter() - t0)
                assert got.source == "download"
                blocks = cache.stats.last_fetch.blocks if cache.stats.last_fetch else 0
                await cache.close()
    finally:
        await server.stop()
    return {"elapsed": elapsed, "bytes": len(data), "blocks": blocks, "pub": pub}


async def _cache_hits(tmp: Path, pub: Path, n: int) -> dict:
    settings = ModelsSettings(cache_dir=tmp / "dev0", public_key=pub)
    cache = ModelCache.open(settings)
    name, version = "skab-ae", "3.0.0"
    cached = await cache.get(name, version)
    cache.load(cached)
    hits = []
    for _ in range(n):
        t0 = time.perf_counter()
        m = await cache.get(name, version)
        cache.load(m)
        hits.append(time.perf_counter() - t0)
    cold = []
    for _ in range(max(5, n // 100)):
        t0 = time.perf_counter()
        cache._build(cached)
        cold.append(time.perf_counter() - t0)
    await cache.close()
    return {"hit": hits, "cold": cold}


def run(args: argparse.Namespace) -> Result:
    swaps = 200 if args.quick else 2000
    runs = 1 if args.quick else 3
    swap = _swap_pause(swaps)
    with tempfile.TemporaryDirectory(prefix="bench-models-") as tmp:
        down = asyncio.run(_download(Path(tmp), runs))
        hits = asyncio.run(_cache_hits(Path(tmp), down["pub"], 2000 if args.quick else 20000))
    pause_p99 = _p99(swap["pause"]) * 1000
    feed_p99 = _p99(swap["feed"]) * 1000
    size = down["bytes"]
    best = min(down["elapsed"])
    goodput = size / statistics.median(down["elapsed"])
    ratio = goodput / RATE
    # One block in flight: each block costs its serialization (both directions share the cap
    # independently) plus one round trip.
    nblocks = -(-size // 1024)
    per_block = (1024 + COAP_OVERHEAD) / RATE + 2 * DELAY + COAP_OVERHEAD / RATE
    bound = size / (nblocks * per_block) / RATE
    hit_us = statistics.median(hits["hit"]) * 1e6
    cold_us = statistics.median(hits["cold"]) * 1e6
    res = Result()
    res.add(
        "swap pause p99 (detector not scoring)",
        f"{pause_p99:.3f} ms",
        f"median {statistics.median(swap['pause']) * 1000:.3f} ms; one row scored: p99 "
        f"{feed_p99:.3f} ms, median {statistics.median(swap['feed']) * 1000:.3f} ms; "
        f"{len(swap['pause'])} swaps int8<->float32",
    )
    res.add(
        "download goodput / link cap",
        f"{ratio:.3f}",
        f"{goodput:,.0f} B/s of {RATE:,.0f} B/s (64 kbit/s, {DELAY * 1000:.0f} ms each way); "
        f"one block in flight could reach {bound:.3f}; {size} B in {down['blocks']} blocks, "
        f"best {best:.2f} s",
    )
    res.add(
        "cache hit (get + load, both tiers)",
        f"{hit_us:.1f} us",
        f"cold load (read, verify, interpreter) {cold_us:,.0f} us: {cold_us / hit_us:,.0f}x",
    )
    res.notes.append(
        f"(load average during the run: {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores; "
        "p99 figures include scheduling noise from other processes)"
    )
    res.summary = {
        "swap_pause_p99_ms": round(pause_p99, 4),
        "download_goodput_ratio": round(ratio, 4),
        "cache_hit_us": round(hit_us, 2),
        "feed_p99_ms": round(feed_p99, 4),
        "download_bound_ratio": round(bound, 4),
        "cold_load_us": round(cold_us, 1),
    }
    return res
