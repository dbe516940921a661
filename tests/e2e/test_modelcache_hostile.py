"""Model cache against a hostile endpoint and a hostile disk: manifests that declare more than the
device can hold, value-sharing and non-integer fields, partial downloads torn by a power cut or
left behind by a replaced assignment, cache files damaged at rest.

The endpoint is a small aiocoap server on loopback that serves whatever bytes a test gives it
(the real registry refuses to publish such manifests) and counts the blocks asked for; the cache,
its fetcher and the assignment code are the real ones.

Test names contain ``modelcache`` or ``hostile`` (``-k`` selects them).
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import os
import time
import tracemalloc
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiocoap
import aiocoap.resource as resource
import cbor2
import pytest
from aiocoap.optiontypes import BlockOption
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.detect.detector import Detector, DetectSettings
from agent.detect.inference import load_manifest, read_model_file
from agent.errors import ModelError, NotNow, SyncError
from agent.modelstore.assignment import Assignment, ModelAssignments, ModelManager
from agent.modelstore.cache import ModelCache
from agent.modelstore.fetch import BLOCK_WINDOW, ModelFetcher
from agent.modelstore.settings import ModelsSettings
from agent.modelstore.signing import SignedManifest
from agent.sync.transport import CoapTransport
from cloud.listen import bound_port
from cloud.models import entry_for
from drivers.clock import RealClock

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parents[2]
MODELS = ROOT / "models"
FLOAT_AE = MODELS / "cloud" / "skab-ae.float32.tflite"  # 12 100 bytes: 12 blocks
FAST = {"ack_timeout": 0.2, "block_deadline": 4.0, "manifest_deadline": 8.0}
MiB = 1024 * 1024


class Endpoint(resource.Resource, resource.PathCapable):
    """Serves ``routes[path]``: bytes (block-wise, with Size2) or ``fn(request) -> Message``.
    ``blocks[path]`` counts the blocks asked for per number; ``down_from[path]``: blocks from
    that number on are answered 5.03 (the link is down past them)."""

    def __init__(self) -> None:
        super().__init__()
        self.routes: dict[str, Any] = {}
        self.blocks: dict[str, Counter[int]] = {}
        self.down_from: dict[str, int] = {}
        self.uri = ""

    async def needs_blockwise_assembly(self, request: aiocoap.Message) -> bool:
        return False

    async def render(self, request: aiocoap.Message) -> aiocoap.Message:
        path = "/" + "/".join(request.opt.uri_path)
        num = request.opt.block2.block_number if request.opt.block2 is not None else 0
        self.blocks.setdefault(path, Counter())[num] += 1
        route = self.routes.get(path)
        if route is None:
            return aiocoap.Message(code=aiocoap.NOT_FOUND, payload=b"no such resource")
        if callable(route):
            return route(request)
        if num >= self.down_from.get(path, 1 << 62):
            return aiocoap.Message(code=aiocoap.SERVICE_UNAVAILABLE, payload=b"link down")
        msg = aiocoap.Message(code=aiocoap.CONTENT, payload=route[num * 1024 : (num + 1) * 1024])
        msg.opt.block2 = BlockOption.BlockwiseTuple(num, (num + 1) * 1024 < len(route), 6)
        msg.opt.size2 = len(route)
        return msg

    def file_blocks(self, name: str, version: str) -> Counter[int]:
        return self.blocks.get(f"/models/{name}/{version}/file", Counter())


@pytest.fixture
async def endpoint():
    ep = Endpoint()
    ctx = await aiocoap.Context.create_server_context(ep, bind=("127.0.0.1", 0))
    ep.uri = f"coap://127.0.0.1:{bound_port(ctx)}"
    yield ep
    await ctx.shutdown()


KEY = Ed25519PrivateKey.from_private_bytes(bytes([7]) * 32)


def _pub(tmp: Path) -> Path:
    path = tmp / "fleet.pub"
    path.write_bytes(
        KEY.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return path


def _signed(
    name: str, version: str, size: int, sha: str, override: dict[str, Any] | None = None
) -> SignedManifest:
    """A manifest the fleet key really signs, over whatever size it is given (and the entry of
    the float autoencoder with ``override`` applied last)."""
    entry = dict(entry_for(FLOAT_AE, None, "skab-ae"))
    entry.update(name=name, version=version, file=f"{name}@{version}.tflite", size=size)
    entry.update(sha256=sha, **(override or {}))
    unsigned = SignedManifest(name, version, size, sha, entry)
    return dataclasses.replace(unsigned, signature=KEY.sign(unsigned.signed_bytes()), key="k")


def _publish(ep: Endpoint, name: str, version: str, data: bytes) -> SignedManifest:
    m = SignedManifest.sign(name, version, data, entry_for(FLOAT_AE, None, "skab-ae"), KEY)
    ep.routes[f"/models/{name}/{version}/manifest"] = m.to_cbor()
    ep.routes[f"/models/{name}/{version}/file"] = data
    return m


def _cache(
    tmp: Path, uri: str | None = None, *, key: bool = True, shipped: bool = True, **budgets: int
) -> ModelCache:
    settings = ModelsSettings(
        cache_dir=tmp / "dev", public_key=_pub(tmp) if key else None, **budgets
    )
    fetcher = None
    if uri is not None:
        fetcher = ModelFetcher(CoapTransport(RealClock(), lanes=BLOCK_WINDOW), uri, **FAST)
    return ModelCache.open(settings, shipped_dir=MODELS if shipped else None, fetcher=fetcher)


def _manager(cache: ModelCache) -> ModelManager:
    det = Detector.from_settings(DetectSettings(models_dir=MODELS), load_manifest(MODELS))
    manager = ModelManager(cache, lambda: det)
    manager.started_with("anomaly", "skab-ae", "1.0.0")
    return manager


def _partial(tmp: Path, name: str, version: str, suffix: str = ".part") -> Path:
    return tmp / "dev" / "partial" / f"{name}@{version}{suffix}"


async def _interrupted(ep: Endpoint, cache: ModelCache, name: str, version: str) -> int:
    """Start a download of ``name`` ``version`` that the link cuts after block 5; the kept
    partial's bytes."""
    path = f"/models/{name}/{version}/file"
    ep.down_from[path] = 6
    with pytest.raises(SyncError):
        await cache.get(name, version)
    del ep.down_from[path]
    kept = cache.partial_bytes(name, version)
    assert 0 < kept < len(ep.routes[path])
    return kept


# -- F2: a declared size the device cannot hold ---------------------------------------------------


def _declared(size: int) -> Callable[[Endpoint], SignedManifest]:
    def serve(ep: Endpoint) -> SignedManifest:
        sha = hashlib.sha256(b"never served").hexdigest()
        m = _signed("big", "9.9.9", size, sha)
        ep.routes["/models/big/9.9.9/manifest"] = m.to_cbor()
        return m

    return serve


OVERSIZE = {  # declared size, budgets, what the refusal names
    "disk_budget": (64 * MiB, {"disk_budget": MiB, "memory_budget": 128 * MiB}, "disk budget"),
    "memory_budget": (8 * MiB, {"disk_budget": 64 * MiB, "memory_budget": MiB}, "memory budget"),
}


@pytest.mark.parametrize("case", sorted(OVERSIZE))
async def test_hostile_signed_model_larger_than_the_device_is_refused_before_a_block(
    endpoint, tmp_path, case
):
    size, budgets, reason = OVERSIZE[case]
    _declared(size)(endpoint)
    cache = _cache(tmp_path, endpoint.uri, **budgets)
    manager = _manager(cache)
    try:
        state = await manager.assign(Assignment("anomaly", "big", "9.9.9", desired=3))
        assert state.status == "failed" and reason in (state.error or "")
        assert (state.name, state.version) == ("skab-ae", "1.0.0")  # the running model stays
        report = manager.reported()["model/anomaly"]
        assert report["status"] == "failed" and reason in report["error"]
        assert report["refused"] == "big 9.9.9"
        assert not endpoint.file_blocks("big", "9.9.9")  # not one block asked for
        assert not _partial(tmp_path, "big", "9.9.9").exists()
        assert cache.disk_used == 0 and cache.cached() == []
    finally:
        await cache.close()


# -- the device's own disk: short of space, a write that fails -----------------------------------


def _free(monkeypatch: pytest.MonkeyPatch, free: Callable[[], int]) -> None:
    """The cache's file system reports ``free()`` bytes free."""
    import shutil

    from agent.modelstore import partials

    real = shutil.disk_usage

    def usage(path: Any) -> Any:
        u = real(path)
        return type(u)(u.total, u.used, free())

    monkeypatch.setattr(partials.shutil, "disk_usage", usage)


async def test_modelcache_model_larger_than_the_free_space_waits_for_it_and_is_not_refused(
    endpoint, tmp_path, monkeypatch
):
    """A model within the budgets that the free space cannot hold now (the queue filled the
    disk during an outage) is the device's condition: not one block is fetched, the role reports
    ``loading`` with the reason (never ``failed``, which blocks the version at the endpoint), and
    the assignment is taken once there is room."""
    from agent.modelstore import assignment

    data = FLOAT_AE.read_bytes()
    _publish(endpoint, "skab-ae", "6.0.0", data)
    room = {"free": len(data) - 1}
    _free(monkeypatch, lambda: room["free"])
    monkeypatch.setattr(assignment, "MODEL_RETRY_BASE", 0.05)
    monkeypatch.setattr(assignment, "MODEL_RETRY_MAX", 0.2)
    cache = _cache(tmp_path, endpoint.uri)
    manager = _manager(cache)
    with pytest.raises(NotNow, match="waiting for free space"):
        await manager.assign(Assignment("anomaly", "skab-ae", "6.0.0"))
    assert (
        manager.roles["anomaly"].status == "active" and manager.roles["anomaly"].version == "1.0.0"
    )
    assert cache.stats.refused == 0 and not endpoint.file_blocks("skab-ae", "6.0.0")

    assignments = ModelAssignments(
        manager, RealClock(), configured={}, desired_version=lambda key: 4, changed=lambda: None
    )
    try:
        assignments.apply("anomaly", {"name": "skab-ae", "version": "6.0.0"})
        for _ in range(200):
            await asyncio.sleep(0.02)
            report = assignments.reported()["model/anomaly"]
            if "free space" in report.get("error", ""):
                break
        assert report["status"] == "loading" and report["loading"] == "skab-ae 6.0.0", report
        assert "refused" not in report and report["version"] == "1.0.0"
        room["free"] = 1 << 40  # the queue drained
        await asyncio.wait_for(asyncio.shield(assignments.tasks["anomaly"]), 30)
        report = assignments.reported()["model/anomaly"]
        assert report["status"] == "active" and report["version"] == "6.0.0", report
        assert (tmp_path / "dev" / "files" / "skab-ae@6.0.0.tflite").read_bytes() == data
        assert cache.stats.refused == 0
    finally:
        await assignments.close()
        await cache.close()


async def test_modelcache_disk_full_mid_download_keeps_the_blocks_and_resumes(
    endpoint, tmp_path, monkeypatch
):
    """ENOSPC while the partial is written: no traceback, no refusal; the blocks written stay,
    counted, and the next attempt resumes from them."""
    import errno

    from agent.modelstore import fetch

    data = FLOAT_AE.read_bytes()
    _publish(endpoint, "skab-ae", "7.0.0", data)
    real_open = fetch._open_part
    full = {"after": 4 * 1024}

    class FullDisk:
        def __init__(self, f: Any) -> None:
            self.f = f

        def write(self, b: bytes) -> int:
            if self.f.tell() + len(b) > full["after"]:
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.f.write(b)

        def __getattr__(self, name: str) -> Any:
            return getattr(self.f, name)

        def __enter__(self) -> FullDisk:
            return self

        def __exit__(self, *exc: Any) -> None:
            self.f.close()

    def opened(part: Path, bsize: int, last: int) -> tuple[Any, int]:
        f, have = real_open(part, bsize, last)
        return FullDisk(f), have

    monkeypatch.setattr(fetch, "_open_part", opened)
    cache = _cache(tmp_path, endpoint.uri)
    manager = _manager(cache)
    try:
        with pytest.raises(NotNow, match="No space left"):
            await manager.assign(Assignment("anomaly", "skab-ae", "7.0.0"))
        assert manager.roles["anomaly"].status == "active"  # nothing refused, 1.0.0 runs
        assert cache.partial_bytes("skab-ae", "7.0.0") == 4 * 1024
        assert cache.disk_used == 4 * 1024 and cache.stats.refused == 0
        full["after"] = 1 << 40
        state = await manager.assign(Assignment("anomaly", "skab-ae", "7.0.0"))
        assert state.status == "active" and state.version == "7.0.0"
        assert cache.stats.last_fetch is not None
        assert cache.stats.last_fetch.resumed_from == 4 * 1024
        assert (tmp_path / "dev" / "files" / "skab-ae@7.0.0.tflite").read_bytes() == data
    finally:
        await cache.close()


def _tflite_blob(size: int) -> bytes:
    return b"\x18\x00\x00\x00TFL3" + bytes(size - 8)


def test_hostile_model_file_longer_than_declared_is_refused_without_reading_it(tmp_path):
    """Loading reads no more than the manifest's size: a file grown on disk is refused."""
    path = tmp_path / "m.tflite"
    path.write_bytes(_tflite_blob(16 * MiB))
    entry = dataclasses.replace(load_manifest(MODELS).entry("skab-ae"), size=1000)
    tracemalloc.start()
    try:
        with pytest.raises(ModelError, match="longer than expected"):
            read_model_file(path, entry)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < MiB


def test_modelcache_rebuild_hashes_a_large_file_in_chunks(tmp_path):
    """The index rebuilt at open verifies each file without holding it in memory."""
    data = _tflite_blob(16 * MiB)
    m = SignedManifest.sign("big", "1", data, entry_for(FLOAT_AE, None, "skab-ae"), KEY)
    files = tmp_path / "dev" / "files"
    files.mkdir(parents=True)
    (files / "big@1.manifest").write_bytes(m.to_cbor())
    (files / "big@1.tflite").write_bytes(data)
    del data
    tracemalloc.start()
    try:
        cache = _cache(tmp_path, shipped=False, disk_budget=64 * MiB)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert cache.rebuilt and cache.cached() == [("big", "1")]
    assert peak < 2 * MiB


# -- F3: a partial download torn by a power cut ---------------------------------------------------


def _lose_block(path: Path, num: int) -> None:
    """Block ``num`` reads back as zeros: written, never fsynced, lost; the length survived."""
    with open(path, "r+b") as f:
        f.seek(num * 1024)
        f.write(bytes(1024))


async def test_hostile_power_cut_tore_the_partial_download_it_is_fetched_again_not_refused(
    endpoint, tmp_path
):
    data = FLOAT_AE.read_bytes()
    _publish(endpoint, "skab-ae", "2.0.0", data)
    cache = _cache(tmp_path, endpoint.uri)
    try:
        await _interrupted(endpoint, cache, "skab-ae", "2.0.0")
        # The power cut: block 2 was written but never reached the card; the length survived.
        _lose_block(_partial(tmp_path, "skab-ae", "2.0.0"), 2)
        manager = _manager(cache)
        state = await manager.assign(Assignment("anomaly", "skab-ae", "2.0.0"))
        assert state.status == "active" and state.version == "2.0.0"
        assert (tmp_path / "dev" / "files" / "skab-ae@2.0.0.tflite").read_bytes() == data
        assert cache.stats.last_fetch is not None and cache.stats.last_fetch.resumed_from == 0
        assert endpoint.file_blocks("skab-ae", "2.0.0")[0] == 2  # once, then once from scratch
        assert cache.partial_bytes("skab-ae", "2.0.0") == 0
        assert cache.disk_used == len(data)  # the partial is no longer counted
        assert cache.stats.refused == 0
    finally:
        await cache.close()


async def test_hostile_resumed_download_of_a_bad_file_is_fetched_once_more_then_refused(
    endpoint, tmp_path
):
    data = FLOAT_AE.read_bytes()
    _publish(endpoint, "skab-ae", "2.0.0", data)
    cache = _cache(tmp_path, endpoint.uri)
    try:
        await _interrupted(endpoint, cache, "skab-ae", "2.0.0")
        bad = bytearray(data)
        bad[-10] ^= 0x01  # the endpoint now serves a tampered file under the signed manifest
        endpoint.routes["/models/skab-ae/2.0.0/file"] = bytes(bad)
        with pytest.raises(ModelError, match="SHA-256"):
            await cache.get("skab-ae", "2.0.0")
        assert endpoint.file_blocks("skab-ae", "2.0.0")[0] == 2  # one fresh attempt, no more
        assert cache.partial_bytes("skab-ae", "2.0.0") == 0
        assert cache.disk_used == 0
        assert cache.stats.refused == 1
    finally:
        await cache.close()


# -- F7: partial downloads left behind ------------------------------------------------------------


async def test_modelcache_kept_partials_count_against_the_disk_budget_and_are_swept_at_open(
    endpoint, tmp_path
):
    from agent.modelstore.partials import PARTIAL_MAX_AGE

    _publish(endpoint, "skab-ae", "3.0.0", FLOAT_AE.read_bytes())
    cache = _cache(tmp_path, endpoint.uri)
    kept = await _interrupted(endpoint, cache, "skab-ae", "3.0.0")
    assert cache.disk_used == kept
    await cache.close()
    stray = [
        tmp_path / "dev" / "partial" / "notes.tmp",
        _partial(tmp_path, "gone", "1"),  # a .part without its .json
        _partial(tmp_path, "gone", "2", ".json"),  # a .json without its .part
    ]
    for p in stray:
        p.write_bytes(b"x" * 100)

    cache = _cache(tmp_path)  # a restart: the partial is kept for resuming, and counted
    assert cache.disk_used == kept
    assert cache.partial_bytes("skab-ae", "3.0.0") == kept
    assert not any(p.exists() for p in stray)
    await cache.close()

    cache = _cache(tmp_path, disk_budget=kept - 1)  # the budget cannot hold it: it goes
    assert cache.disk_used == 0 and cache.partial_bytes("skab-ae", "3.0.0") == 0
    await cache.close()

    cache = _cache(tmp_path, endpoint.uri)
    kept = await _interrupted(endpoint, cache, "skab-ae", "3.0.0")  # as far as this one got
    await cache.close()
    unset = 600.0  # written while the wall clock read 1970 (no RTC, NTP not yet): no age
    for suffix in (".part", ".json"):
        os.utime(_partial(tmp_path, "skab-ae", "3.0.0", suffix), (unset, unset))
    cache = _cache(tmp_path)  # after NTP: kept for resuming (before, removed as 56 years old)
    assert cache.partial_bytes("skab-ae", "3.0.0") == kept
    await cache.close()

    old = time.time() - PARTIAL_MAX_AGE - 3600  # not resumed for longer than the bound
    for suffix in (".part", ".json"):
        os.utime(_partial(tmp_path, "skab-ae", "3.0.0", suffix), (old, old))
    cache = _cache(tmp_path)
    assert cache.disk_used == 0
    assert list((tmp_path / "dev" / "partial").iterdir()) == []
    await cache.close()


async def test_modelcache_another_version_assigned_drops_the_partial_of_the_replaced_one(
    endpoint, tmp_path
):
    data = FLOAT_AE.read_bytes()
    _publish(endpoint, "skab-ae", "3.0.0", data)
    _publish(endpoint, "skab-ae", "3.1.0", data)
    cache = _cache(tmp_path, endpoint.uri)
    try:
        await _interrupted(endpoint, cache, "skab-ae", "3.0.0")
        got = await cache.get("skab-ae", "3.1.0")
        assert got.source == "download"
        assert cache.partial_bytes("skab-ae", "3.0.0") == 0
        assert not _partial(tmp_path, "skab-ae", "3.0.0", ".json").exists()
        assert cache.disk_used == len(data)
    finally:
        await cache.close()


async def test_modelcache_over_budget_drops_a_kept_partial_before_any_model(endpoint, tmp_path):
    data = FLOAT_AE.read_bytes()
    _publish(endpoint, "skab-ae", "3.0.0", data)
    _publish(endpoint, "other", "1.0.0", data)
    cache = _cache(tmp_path, endpoint.uri, disk_budget=len(data) + 2048)
    try:
        await _interrupted(endpoint, cache, "other", "1.0.0")  # 6 blocks kept
        await cache.get("skab-ae", "3.0.0")  # over the budget with the partial: it goes
        assert cache.cached() == [("skab-ae", "3.0.0")]
        assert cache.partial_bytes("other", "1.0.0") == 0
        assert cache.disk_used == len(data)
    finally:
        await cache.close()


# -- F9: manifests no decoder check should let through --------------------------------------------


def _cyclic_manifest(data: bytes) -> bytes:
    entry: dict[str, Any] = dict(entry_for(FLOAT_AE, None, "skab-ae"))
    entry["self"] = entry  # CBOR value sharing (tags 28/29) makes it a cycle
    doc = {
        "name": "skab-ae",
        "version": "5.0.0",
        "size": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
        "entry": entry,
        "signature": bytes(64),
        "key": "",
    }
    return cbor2.dumps(doc, value_sharing=True)


def _infinite_entry_size(data: bytes) -> bytes:
    sha = hashlib.sha256(data).hexdigest()
    return _signed("skab-ae", "5.0.0", len(data), sha, {"size": float("inf")}).to_cbor()


HOSTILE_MANIFESTS = {"shared_values": _cyclic_manifest, "infinite_entry_size": _infinite_entry_size}


async def _assigned(
    endpoint: Endpoint, tmp: Path, manifest: bytes, data: bytes, role: str = "anomaly"
) -> Any:
    """skab-ae 5.0.0 served as ``manifest`` and ``data`` and assigned to ``role`` of a device
    running skab-ae 1.0.0 (and skab-ae-lite 1.0.0 as its lightweight model): ``(report,
    kept)``, its ``model/<role>`` once the assignment ended and whether the detector still runs
    the model it ran before."""
    endpoint.routes["/models/skab-ae/5.0.0/manifest"] = manifest
    endpoint.routes["/models/skab-ae/5.0.0/file"] = data
    cache = _cache(tmp, endpoint.uri)
    manager = _manager(cache)
    manager.started_with("lightweight", "skab-ae-lite", "1.0.0")
    running = manager._detector().anomaly
    assignments = ModelAssignments(
        manager, RealClock(), configured={}, desired_version=lambda key: 9, changed=lambda: None
    )
    try:
        assignments.apply(role, {"name": "skab-ae", "version": "5.0.0"})
        await asyncio.wait_for(asyncio.shield(assignments.tasks[role]), 30)
        return assignments.reported()[f"model/{role}"], manager._detector().anomaly is running
    finally:
        await assignments.close()
        await cache.close()


@pytest.mark.parametrize("case", sorted(HOSTILE_MANIFESTS))
async def test_hostile_manifest_is_refused_and_reported_failed_never_a_crash(
    endpoint, tmp_path, case
):
    data = FLOAT_AE.read_bytes()
    report, kept = await _assigned(endpoint, tmp_path, HOSTILE_MANIFESTS[case](data), data)
    assert report["status"] == "failed", report
    assert report["refused"] == "skab-ae 5.0.0" and report["desired"] == 9
    assert report["version"] == "1.0.0" and kept
    assert not endpoint.file_blocks("skab-ae", "5.0.0")


@pytest.mark.parametrize("role", ["anomaly", "lightweight"])
async def test_hostile_signed_entry_the_swap_cannot_read_is_refused_never_a_crash(
    endpoint, tmp_path, role
):
    """A signed manifest (a hostile or broken signer) whose entry's features hold an infinite
    integer field, which int() refuses with OverflowError. Was: as ``anomaly``, OverflowError
    out of Detector.check_swap, through the commit, logged as event=model_assignment_crashed
    with a traceback, the role never reported ``failed`` (and out of Detector.from_entry); as
    ``lightweight``, whose features nothing read before the lite tier switched to it, taken
    (``active``; the runtime's check then crashed the same way, or the switch to the lite tier
    failed at each try). Now the features and the threshold of a model for an anomaly role are
    read when it is prepared: a refusal (``failed``, the reason), the running model kept;
    Detector.from_entry says ModelError."""
    data = FLOAT_AE.read_bytes()
    entry = dict(entry_for(FLOAT_AE, None, "skab-ae"))
    features = {**entry["features"], "steps": float("inf")}
    sha = hashlib.sha256(data).hexdigest()
    manifest = _signed("skab-ae", "5.0.0", len(data), sha, {"features": features})
    report, kept = await _assigned(endpoint, tmp_path, manifest.to_cbor(), data, role)
    assert report["status"] == "failed", report
    assert "bad manifest entry" in report["error"] and kept
    assert report["refused"] == "skab-ae 5.0.0" and report["version"] == "1.0.0"
    det = Detector.from_settings(DetectSettings(models_dir=MODELS), load_manifest(MODELS))
    with pytest.raises(ModelError, match="bad manifest entry"):
        Detector.from_entry(det.anomaly, {**entry, "features": features})


def test_hostile_manifest_values_that_are_not_plain_cbor_are_refused():
    """The check under the strict decoder, on what cbor2 decodes: shared and cyclic values,
    integers only a bignum holds, objects of other tags."""
    from agent.modelstore.signing import check_plain

    shared: list[int] = [1, 2]
    cyclic: dict[str, Any] = {}
    cyclic["self"] = cyclic
    for bad in (
        cbor2.loads(cbor2.dumps({"a": cyclic}, value_sharing=True)),
        {"a": shared, "b": shared},
        {"size": 2**64},
        {"size": -(2**64) - 1},
        {"entry": {"when": cbor2.loads(cbor2.dumps(cbor2.CBORTag(1, 0)))}},
        {"entry": {(1, 2): "a tuple key"}},
    ):
        with pytest.raises(ValueError):
            check_plain(bad)
    check_plain({"size": 2**64 - 1, "entry": {"x": [1.5, None, True, b"\0", {"y": -3}]}})
    with pytest.raises(ModelError, match="malformed model manifest"):
        SignedManifest.from_cbor(_cyclic_manifest(b"x"))


# -- files damaged at rest -----------------------------------------------------------------------


def test_hostile_cache_files_damaged_at_rest_are_dropped_and_the_cache_opens(tmp_path):
    """No index: it is rebuilt from files/, where some entries are hostile. Each is dropped on
    its own; the sound model stays; open never raises, with or without a public key."""
    files = tmp_path / "dev" / "files"
    files.mkdir(parents=True)
    data = MODELS.joinpath("skab-ae.tflite").read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    good = SignedManifest.sign("good", "1", data, entry_for(FLOAT_AE, None, "skab-ae"), KEY)
    (files / "good@1.manifest").write_bytes(good.to_cbor())
    (files / "good@1.tflite").write_bytes(data)
    for key in (False, True):  # without a key only the digests are checked
        (files / "ghost@1.manifest").symlink_to(tmp_path / "nowhere")  # a dangling link
        inf = _signed("inf", "1", len(data), sha, {"size": float("inf")})  # signed, all the same
        (files / "inf@1.manifest").write_bytes(inf.to_cbor())
        (files / "inf@1.tflite").write_bytes(data)
        (files / "huge@1.manifest").write_bytes(bytes(MiB))
        (files / "other@1.manifest").write_bytes(good.to_cbor())  # another model's manifest
        (tmp_path / "dev" / "index.json").unlink(missing_ok=True)
        cache = _cache(tmp_path, key=key)
        assert cache.rebuilt and cache.cached() == [("good", "1")]
        assert sorted(p.name for p in files.iterdir()) == ["good@1.manifest", "good@1.tflite"]
        rows = {(r["name"], r["version"]): r for r in cache.listing()}
        assert rows[("good", "1")]["size"] == len(data)
        asyncio.run(cache.close())
