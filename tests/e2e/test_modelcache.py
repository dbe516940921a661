"""Model cache and signed model distribution: the real endpoint on loopback (its registry), the
impairment proxy, real cache files and the real interpreter on the shipped models.

Test names contain ``modelcache``, ``signature`` or ``hot_swap`` (``-k`` selects them).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from linkem import Impairment, LinkEmulator

from agent.detect.detector import Detector, DetectSettings
from agent.detect.features import CHANNELS
from agent.detect.inference import load_manifest
from agent.errors import ModelError, NotNow, SyncError
from agent.modelstore.assignment import Assignment, ModelAssignments, ModelManager, Prepared
from agent.modelstore.cache import ModelCache
from agent.modelstore.fetch import BLOCK_WINDOW, ModelFetcher
from agent.modelstore.floors import Floors
from agent.modelstore.settings import ModelsSettings
from agent.modelstore.signing import SignedManifest
from agent.sync.transport import CoapTransport
from cloud.models import MANIFEST_FILE, MODEL_FILE, ModelRegistry, entry_for
from cloud.server import CloudServer
from drivers.clock import RealClock

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parents[2]
MODELS = ROOT / "models"
FLOAT_AE = MODELS / "cloud" / "skab-ae.float32.tflite"  # same features as skab-ae, float32
LEVEL = np.array([0.21, 0.27, 2.4, 0.1, 89.0, 28.0, 229.0, 125.0])
NOISE = np.array([0.002, 0.002, 0.45, 0.25, 0.1, 0.01, 10.0, 0.5])
FAST = {"ack_timeout": 0.2, "block_deadline": 4.0, "manifest_deadline": 8.0}


def _fetcher(uri: str) -> ModelFetcher:
    return ModelFetcher(CoapTransport(RealClock(), lanes=BLOCK_WINDOW), uri, **FAST)


def _key(seed: int) -> Ed25519PrivateKey:
    return Ed25519PrivateKey.from_private_bytes(bytes([seed]) * 32)


def _write_pub(key: Ed25519PrivateKey, path: Path) -> Path:
    path.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return path


def _rows(n: int, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return LEVEL + NOISE * rng.standard_normal((n, len(CHANNELS)))


class Rig:
    """An endpoint with a registry in ``tmp/cloud`` and a device cache in ``tmp/dev``."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.key = _key(7)
        self.pub = _write_pub(self.key, tmp / "fleet.pub")
        self.registry = ModelRegistry(tmp / "cloud" / "models")
        self.server: CloudServer | None = None

    def publish(self, file: Path, name: str, version: str, key=None, entry: str | None = None):
        data = file.read_bytes()
        e = entry_for(file, None, entry)
        return self.registry.publish(data, name, version, e, key or self.key)

    def version_dir(self, name: str, version: str) -> Path:
        return self.registry.directory / name / version

    async def start(self) -> CloudServer:
        self.server = await CloudServer.start(self.tmp / "cloud", "127.0.0.1", 0, allow_plain=True)
        return self.server

    def cache(self, uri: str | None = None, *, shipped: bool = True, **budgets) -> ModelCache:
        settings = ModelsSettings(cache_dir=self.tmp / "dev", public_key=self.pub, **budgets)
        fetcher = _fetcher(uri) if uri else None
        return ModelCache.open(settings, shipped_dir=MODELS if shipped else None, fetcher=fetcher)


@pytest.fixture
async def rig(tmp_path):
    r = Rig(tmp_path)
    yield r
    if r.server is not None:
        await r.server.stop()


def _detector() -> Detector:
    manifest = load_manifest(MODELS)
    return Detector.from_settings(DetectSettings(models_dir=MODELS), manifest)


def _commissioned(det: Detector) -> None:
    det.feed(list(range(det.spec.commissioning)), _rows(det.spec.commissioning))
    assert det.commissioned


# -- download, resume, restart ------------------------------------------------------------------


async def test_modelcache_download_through_lossy_link_resumes_after_interruption(rig):
    manifest = rig.publish(FLOAT_AE, "skab-ae", "3.0.0", entry="skab-ae")
    assert manifest.size > 8 * 1024  # several blocks
    server = await rig.start()
    async with LinkEmulator(
        listen=("127.0.0.1", 0),
        target=("127.0.0.1", server.port),
        impairment=Impairment(loss=0.1),
        seed=5,
    ) as proxy:
        uri = f"coap://127.0.0.1:{proxy.port}"
        cache = rig.cache(uri)
        cut_after = 4  # blocks 0..4 arrive, then the link goes down

        def on_block(num: int, have: int) -> None:
            if num == cut_after:
                proxy.outage(True)

        with pytest.raises(SyncError):
            await cache.get("skab-ae", "3.0.0", on_block=on_block)
        # Blocks already on their way when the link went down may have been written too.
        kept = cache.partial_bytes("skab-ae", "3.0.0")
        assert kept % 1024 == 0 and (cut_after + 1) * 1024 <= kept < manifest.size
        assert cache.lookup("skab-ae", "3.0.0") is None
        await cache.close()

        # The agent restarts; the link comes back; the download resumes after the last block.
        proxy.outage(False)
        cache = rig.cache(uri)
        got = await cache.get("skab-ae", "3.0.0")
        fetch = cache.stats.last_fetch
        assert fetch is not None
        assert fetch.resumed_from == kept
        assert fetch.blocks == -(-manifest.size // 1024) - kept // 1024
        assert got.source == "download"
        assert got.path.read_bytes() == FLOAT_AE.read_bytes()
        assert cache.partial_bytes("skab-ae", "3.0.0") == 0
        assert proxy.counters("up").dropped["loss"] + proxy.counters("down").dropped["loss"] > 0
        model = cache.load(got)
        assert np.all(np.isfinite(model.predict(np.zeros((1, 32), dtype=np.float32))))
        await cache.close()


async def test_modelcache_restart_keeps_index_and_rebuilds_a_corrupt_one(rig):
    rig.publish(MODELS / "skab-ae.tflite", "skab-ae", "2.0.0")
    rig.publish(MODELS / "skab-clf.tflite", "skab-clf", "2.0.0")
    server = await rig.start()
    cache = rig.cache(server.uri)
    await cache.get("skab-ae", "2.0.0")
    await cache.get("skab-clf", "2.0.0")
    cache.set_pins([("skab-clf", "2.0.0")])
    order = cache.cached()
    await cache.close()

    again = rig.cache(None)  # offline: no endpoint at all
    assert not again.rebuilt
    assert again.cached() == order
    assert again.pins == {("skab-clf", "2.0.0")}
    hit = await again.get("skab-ae", "2.0.0")
    assert hit.source == "cache"
    rows = {(r["name"], r["version"]): r for r in again.listing()}
    assert rows[("skab-ae", "2.0.0")]["signature"].startswith("ok")
    assert rows[("skab-clf", "2.0.0")]["pinned"]
    await again.close()

    # A corrupt index is rebuilt from the files, each verified; a tampered file is dropped.
    (rig.tmp / "dev" / "index.json").write_text("{not json")
    tampered = rig.tmp / "dev" / "files" / "skab-clf@2.0.0.tflite"
    data = bytearray(tampered.read_bytes())
    data[100] ^= 0xFF
    tampered.write_bytes(bytes(data))
    rebuilt = rig.cache(None)
    assert rebuilt.rebuilt
    assert rebuilt.cached() == [("skab-ae", "2.0.0")]
    assert not tampered.exists()
    assert json.loads((rig.tmp / "dev" / "index.json").read_text())["format"] == 1
    await rebuilt.close()


async def test_modelcache_offline_runs_from_shipped_models(rig):
    cache = rig.cache("coap://127.0.0.1:9")  # nothing answers there
    cache.fetcher.block_deadline = cache.fetcher.manifest_deadline = 1.0
    got = await cache.get("skab-ae", "1.0.0")
    assert got.source == "shipped"
    assert got.path == MODELS / "skab-ae.tflite"
    assert (await cache.get("skab-clf")).source == "shipped"
    with pytest.raises(SyncError):
        await cache.get("skab-ae", "9.0.0")
    model = cache.load(got)
    assert model.input_shape == (32,)
    await cache.close()


# -- refusals -----------------------------------------------------------------------------------


def _tamper(rig: Rig, name: str, version: str) -> None:
    path = rig.version_dir(name, version) / MODEL_FILE
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def _truncate(rig: Rig, name: str, version: str) -> None:
    path = rig.version_dir(name, version) / MODEL_FILE
    path.write_bytes(path.read_bytes()[:3000])


def _sign_short_size(rig: Rig, name: str, version: str) -> None:
    """A manifest correctly signed, but over a size (and digest) the file does not have."""
    vdir = rig.version_dir(name, version)
    old = SignedManifest.from_cbor((vdir / MANIFEST_FILE).read_bytes())
    data = (vdir / MODEL_FILE).read_bytes()
    m = SignedManifest.sign(name, version, data[:-100], old.entry, rig.key)
    (vdir / MANIFEST_FILE).write_bytes(m.to_cbor())


def _edit_size_field(rig: Rig, name: str, version: str) -> None:
    """The size field edited after signing."""
    vdir = rig.version_dir(name, version)
    old = SignedManifest.from_cbor((vdir / MANIFEST_FILE).read_bytes())
    entry = dict(old.entry, size=old.size + 1)
    forged = SignedManifest(name, version, old.size + 1, old.sha256, entry, old.signature, old.key)
    (vdir / MANIFEST_FILE).write_bytes(forged.to_cbor())


REFUSALS = {
    "tampered": (_tamper, "SHA-256"),
    "wrong_signature": (None, "signature does not verify"),
    "truncated": (_truncate, "truncated"),
    "manifest_size_mismatch": (_sign_short_size, "size mismatch"),
    "manifest_size_edited": (_edit_size_field, "signature does not verify"),
}


async def _running_manager(rig: Any) -> tuple[ModelCache, Any, ModelManager]:
    """The endpoint up, a cache, and a commissioned detector running skab-ae 1.0.0."""
    server = await rig.start()
    cache = rig.cache(server.uri)
    det = _detector()
    _commissioned(det)
    manager = ModelManager(cache, lambda: det)
    manager.started_with("anomaly", "skab-ae", "1.0.0")
    return cache, det, manager


@pytest.mark.parametrize("case", sorted(REFUSALS))
async def test_signature_and_integrity_refusals_keep_the_running_model(rig, case):
    damage, message = REFUSALS[case]
    key = _key(9) if case == "wrong_signature" else None
    rig.publish(FLOAT_AE, "skab-ae", "3.0.0", key=key, entry="skab-ae")
    if damage is not None:
        damage(rig, "skab-ae", "3.0.0")
    cache, det, manager = await _running_manager(rig)
    running = det.anomaly

    state = await manager.assign(Assignment("anomaly", "skab-ae", "3.0.0", desired=42))
    assert state.status == "failed"
    assert message in (state.error or "")
    assert (state.name, state.version) == ("skab-ae", "1.0.0")  # the running model is kept
    report = manager.reported()["model/anomaly"]
    assert report["status"] == "failed" and report["desired"] == 42
    assert det.anomaly is running
    assert cache.lookup("skab-ae", "3.0.0") is None
    assert cache.partial_bytes("skab-ae", "3.0.0") == 0
    assert not list((rig.tmp / "dev" / "files").glob("skab-ae@3.0.0*"))
    res = det.feed([1000.0, 1001.0], _rows(2, seed=3))  # it goes on scoring
    assert np.all(np.isfinite(res.scores))
    with pytest.raises(ModelError, match=message):  # and a direct get says the same
        await cache.get("skab-ae", "3.0.0")
    await cache.close()


async def test_hostile_disk_index_unwritable_is_not_a_refusal_the_old_model_runs_until_it_is(
    rig, monkeypatch
):
    """The cache index cannot be written before the swap: the device's condition, not the
    model's. Was: reported ``failed``, which blocks the version at the endpoint. Now NotNow: the
    swap does not happen, the running model stays, the version is not pinned, and the role is
    reported ``loading`` with the reason and tried again with backoff until the disk takes it.
    Here a directory where index.json goes (EISDIR), then a full disk (ENOSPC)."""
    import errno

    from agent.modelstore import assignment, indexfile

    rig.publish(FLOAT_AE, "skab-ae", "3.0.0", entry="skab-ae")
    cache, det, manager = await _running_manager(rig)
    running = det.anomaly
    cache.index_path.unlink(missing_ok=True)
    cache.index_path.mkdir()

    with pytest.raises(NotNow, match="cannot write the model cache index"):
        await manager.assign(Assignment("anomaly", "skab-ae", "3.0.0", desired=7))
    assert manager.roles["anomaly"].status == "active"  # nothing refused, 1.0.0 runs
    assert manager.current["anomaly"] == ("skab-ae", "1.0.0") and det.anomaly is running
    assert ("skab-ae", "3.0.0") not in cache.pins and not manager._committing
    assert manager.stats.rolled_back == 0 and "model/anomaly" in manager.reported()
    assert manager.reported()["model/anomaly"]["status"] == "active"
    cache.index_path.rmdir()

    full = {"on": True}
    real_write = indexfile.write_atomic

    def write_atomic(path, data, **kw):
        if full["on"] and path == cache.index_path:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(path, data, **kw)

    monkeypatch.setattr(indexfile, "write_atomic", write_atomic)
    monkeypatch.setattr(assignment, "MODEL_RETRY_BASE", 0.05)
    monkeypatch.setattr(assignment, "MODEL_RETRY_MAX", 0.2)
    reports: list[dict[str, Any]] = []
    assignments = ModelAssignments(
        manager,
        RealClock(),
        configured={},
        desired_version=lambda key: 8,
        changed=lambda: reports.append(assignments.reported()["model/anomaly"]),
    )
    try:
        assignments.apply("anomaly", {"name": "skab-ae", "version": "3.0.0"})
        for _ in range(200):
            await asyncio.sleep(0.02)
            if len([r for r in reports if "No space left" in r.get("error", "")]) >= 2:
                break
        report = assignments.reported()["model/anomaly"]
        assert report["status"] == "loading" and report["loading"] == "skab-ae 3.0.0", report
        assert "No space left" in report["error"] and report["version"] == "1.0.0"
        assert det.anomaly is running
        full["on"] = False  # the disk has room again
        await asyncio.wait_for(asyncio.shield(assignments.tasks["anomaly"]), 30)
        report = assignments.reported()["model/anomaly"]
        assert report == {"name": "skab-ae", "version": "3.0.0", "status": "active", "desired": 8}
        assert not any(r["status"] == "failed" or "refused" in r for r in reports)
        assert det.anomaly is not running
    finally:
        await assignments.close()
    await cache.close()
    index = json.loads(cache.index_path.read_text())
    pinned = {(m["name"], m["version"]) for m in index["models"] if m["pinned"]}
    assert pinned == {("skab-ae", "3.0.0")}


@pytest.mark.parametrize("write", ["never_ran", "failed"])
async def test_modelcache_an_index_write_whose_awaiter_was_cancelled_is_not_forgotten(rig, write):
    """A download is cancelled (a newer assignment, the agent stopping) after its install, while
    the index write naming the new model waits for the I/O thread. Was: sync() cleared the
    "needs writing" flag before the write ran, and the cancellation dropped the queued write (or
    the write failed with nobody awaiting it), so nothing wrote the index until another change:
    close() wrote nothing and at the next open the installed model's files were deleted as
    orphans. Now the state stays to be written until a write of it succeeded: the queued write
    runs anyway, and one that failed is done by the next sync (here close)."""
    import threading

    rig.publish(FLOAT_AE, "skab-ae", "3.0.0", entry="skab-ae")
    server = await rig.start()
    cache = rig.cache(server.uri)
    gate = threading.Event()
    install = cache.partials.install

    def install_then_hold(*args):  # the I/O thread is busy after the install: the write waits
        install(*args)
        cache._io.submit(gate.wait, 10)

    cache.partials.install = install_then_hold  # type: ignore[method-assign]
    get = asyncio.ensure_future(cache.get("skab-ae", "3.0.0"))
    for _ in range(1_000_000):  # installed: its index write is handed on in this step
        if ("skab-ae", "3.0.0") in cache.cached() or get.done():
            break
        await asyncio.sleep(0)
    assert ("skab-ae", "3.0.0") in cache.cached()
    get.cancel()
    with pytest.raises(asyncio.CancelledError):
        await get
    if write == "failed":  # the disk refuses the write when it runs (EISDIR)
        cache.index_path.unlink()
        cache.index_path.mkdir()
    await asyncio.sleep(0)
    gate.set()
    await asyncio.to_thread(cache._io.submit(lambda: None).result, 10)  # the held write is done
    if write == "failed":
        cache.index_path.rmdir()  # writable again
    await cache.close()
    index = json.loads(cache.index_path.read_text())
    assert [(m["name"], m["version"]) for m in index["models"]] == [("skab-ae", "3.0.0")]

    again = rig.cache(None)  # restarted: the model is kept, not swept as an orphan
    assert again.cached() == [("skab-ae", "3.0.0")]
    assert (rig.tmp / "dev" / "files" / "skab-ae@3.0.0.tflite").is_file()
    await again.close()


async def test_hostile_disk_a_version_downloaded_again_after_a_failed_index_write_keeps_its_files(
    rig, monkeypatch
):
    """3.0.0 is evicted by the download of 4.0.0 (a disk budget for one model) and the index
    write that deletes its files fails (a full disk): the deletion stays to be done by the next
    write. 3.0.0 is then assigned again and downloaded. Was: the next write, the one of its own
    install, deleted the fresh, verified files, while the index named the version (its load
    failed: a refusal before the damage-at-rest check, another download after it). Now a
    version installed again is spared: its files stay, also across a restart."""
    import errno

    from agent.modelstore import indexfile

    rig.publish(FLOAT_AE, "skab-ae", "3.0.0", entry="skab-ae")
    rig.publish(FLOAT_AE, "skab-ae", "4.0.0", entry="skab-ae")
    server = await rig.start()
    cache = rig.cache(server.uri, disk_budget=FLOAT_AE.stat().st_size + 100)
    await cache.get("skab-ae", "3.0.0")
    real_write = indexfile.write_atomic

    def full_disk(path, data, **kw):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(indexfile, "write_atomic", full_disk)
    with pytest.raises(NotNow, match="No space left"):
        await cache.get("skab-ae", "4.0.0")  # installed; 3.0.0 evicted
    monkeypatch.setattr(indexfile, "write_atomic", real_write)  # the disk has room again
    got = await cache.get("skab-ae", "3.0.0")
    assert got.source == "download" and cache.cached() == [("skab-ae", "3.0.0")]
    assert got.path.read_bytes() == FLOAT_AE.read_bytes()
    assert np.all(np.isfinite(cache.load(got).predict(np.zeros((1, 32), dtype=np.float32))))
    assert cache.stats.downloads == 2  # (4.0.0's get ended in the failed write)
    await cache.close()
    again = rig.cache(None)
    assert again.cached() == [("skab-ae", "3.0.0")] and got.path.is_file()
    await again.close()


async def test_modelcache_a_download_cancelled_while_it_is_installed_is_kept_and_counted(rig):
    """A download is cancelled (a newer assignment for the role, the agent stopping) while the
    I/O thread hashes and installs the whole file, which it finishes regardless. Was: the
    cache never recorded it: the files sat in files/ uncounted against the disk budget, the
    version was downloaded again when assigned again, and the next open deleted them as
    orphans. Now the cancelled download records what the I/O thread installed: counted,
    indexed, kept across a restart."""
    import threading

    rig.publish(FLOAT_AE, "skab-ae", "3.0.0", entry="skab-ae")
    server = await rig.start()
    cache = rig.cache(server.uri)
    installing, go_on = threading.Event(), threading.Event()
    install = cache.partials.install

    def held_install(*args):  # the real install, once the download was cancelled
        installing.set()
        go_on.wait(10)
        install(*args)

    cache.partials.install = held_install  # type: ignore[method-assign]
    get = asyncio.ensure_future(cache.get("skab-ae", "3.0.0"))
    assert await asyncio.to_thread(installing.wait, 10)
    get.cancel()
    await asyncio.sleep(0)
    go_on.set()
    with pytest.raises(asyncio.CancelledError):
        await get
    assert cache.cached() == [("skab-ae", "3.0.0")]
    assert cache.disk_used == FLOAT_AE.stat().st_size
    hit = await cache.get("skab-ae", "3.0.0")
    assert hit.source == "cache" and hit.path.read_bytes() == FLOAT_AE.read_bytes()
    await cache.close()
    again = rig.cache(None)  # restarted: not swept as an orphan
    assert again.cached() == [("skab-ae", "3.0.0")] and hit.path.is_file()
    await again.close()


def _flip_file(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def _raise_threshold(path: Path) -> None:
    """The stored manifest's threshold changed, its signature kept (a flip in a float)."""
    m = SignedManifest.from_cbor(path.read_bytes())
    threshold = {**m.entry["threshold"], "value": m.entry["threshold"]["value"] * 1e6}
    path.write_bytes(replace(m, entry={**m.entry, "threshold": threshold}).to_cbor())


AT_REST = {  # what is damaged, how; the stored file it is in
    "model_file_bit_flip": (_flip_file, "tflite"),
    "manifest_entry_altered": (_raise_threshold, "manifest"),
    "manifest_torn": (lambda p: p.write_bytes(p.read_bytes()[:40]), "manifest"),
    "manifest_lost": (lambda p: p.unlink(), "manifest"),
}


@pytest.mark.parametrize("case", sorted(AT_REST))
async def test_hostile_disk_a_cached_copy_damaged_at_rest_is_fetched_again_never_refused(rig, case):
    """A version verified at install and cached, whose stored file or manifest is damaged at
    rest before the agent (restarted) is assigned it again. Was: the damaged model file failed
    its SHA-256 check at load and the version was reported ``failed`` (blocked at the endpoint,
    for a good signed model), and stayed so, the damaged copy kept; a torn manifest was a
    refusal too, a lost one an OSError out of the cache (a crash of the assignment), and an
    entry altered after its signature (here the threshold) was used unverified. Now the copy
    that no longer verifies is dropped (NotNow: tried again later) and the version is fetched
    again and swapped in."""
    damage, suffix = AT_REST[case]
    rig.publish(FLOAT_AE, "skab-ae", "3.0.0", entry="skab-ae")
    cache, det, manager = await _running_manager(rig)
    await cache.get("skab-ae", "3.0.0")
    await cache.close()
    damage(rig.tmp / "dev" / "files" / f"skab-ae@3.0.0.{suffix}")

    cache = rig.cache(rig.server.uri)  # the agent restarts
    manager = ModelManager(cache, lambda: det)
    manager.started_with("anomaly", "skab-ae", "1.0.0")
    running = det.anomaly
    a = Assignment("anomaly", "skab-ae", "3.0.0", desired=5)
    if suffix == "tflite":  # found at load: not now, the copy dropped
        with pytest.raises(NotNow, match="no longer verifies"):
            await manager.assign(a)
        assert det.anomaly is running and manager.roles["anomaly"].status == "active"
        assert cache.lookup("skab-ae", "3.0.0") is None
    state = await manager.assign(a)
    assert state.status == "active" and (state.name, state.version) == ("skab-ae", "3.0.0")
    assert det.anomaly is not running and cache.stats.downloads == 1  # fetched again
    signed = SignedManifest.from_cbor(
        rig.version_dir("skab-ae", "3.0.0").joinpath(MANIFEST_FILE).read_bytes()
    )
    assert det.threshold == signed.entry["threshold"]["value"]
    await cache.close()
    files = rig.tmp / "dev" / "files"
    assert (files / "skab-ae@3.0.0.tflite").read_bytes() == FLOAT_AE.read_bytes()
    assert SignedManifest.read(files / "skab-ae@3.0.0.manifest") == signed


async def test_signature_missing_public_key_refuses_downloads(rig):
    rig.publish(MODELS / "skab-ae.tflite", "skab-ae", "2.0.0")
    server = await rig.start()
    settings = ModelsSettings(cache_dir=rig.tmp / "dev")
    cache = ModelCache.open(settings, fetcher=_fetcher(server.uri))
    with pytest.raises(ModelError, match="no public key"):
        await cache.get("skab-ae", "2.0.0")
    await cache.close()


async def test_public_key_copied_after_the_start_is_used_from_then_on(rig):
    """[models] public_key names a file that is not there yet (the packaged example before
    `models keygen`): downloads are refused, naming it; once it is copied there they verify."""
    rig.publish(MODELS / "skab-ae.tflite", "skab-ae", "2.0.0")
    server = await rig.start()
    later = rig.tmp / "later.pub"
    settings = ModelsSettings(cache_dir=rig.tmp / "dev", public_key=later)
    cache = ModelCache.open(settings, fetcher=_fetcher(server.uri))
    try:
        with pytest.raises(ModelError, match=r"no public key .*later.pub does not exist"):
            await cache.get("skab-ae", "2.0.0")
        shutil.copyfile(rig.pub, later)
        got = await cache.get("skab-ae", "2.0.0")
        assert got is not None
    finally:
        await cache.close()


# -- LRU ----------------------------------------------------------------------------------------


async def test_modelcache_lru_budget_for_two_of_three_evicts_by_recency_never_pinned(rig):
    files = {
        "skab-ae": MODELS / "skab-ae.tflite",  # 7992 bytes
        "skab-clf": MODELS / "skab-clf.tflite",  # 5520
        "skab-ae-lite": MODELS / "skab-ae-lite.tflite",  # 3904
    }
    for name, file in files.items():
        rig.publish(file, name, "2.0.0")
    server = await rig.start()
    budget = 14_000  # any two fit (at most 13 512 bytes), all three (17 416) do not
    cache = rig.cache(server.uri, disk_budget=budget, memory_budget=budget)
    ae, clf, lite = ("skab-ae", "2.0.0"), ("skab-clf", "2.0.0"), ("skab-ae-lite", "2.0.0")

    await cache.get(*ae)
    await cache.get(*clf)
    await cache.get(*lite)  # over budget: the least recently used (ae) goes
    assert cache.cached() == [clf, lite]
    await cache.get(*clf)  # clf is now the most recent
    await cache.get(*ae)  # lite is the least recent and goes
    assert cache.cached() == [clf, ae]
    assert cache.disk_used <= budget

    cache.set_pins([clf])
    await cache.get(*ae)  # ae most recent, clf least recent but pinned
    await cache.get(*lite)  # must evict: clf is pinned, so ae goes although more recent
    assert set(cache.cached()) == {clf, lite}
    assert cache.stats.evicted_files == 3

    # Memory tier: the same budget holds two loaded interpreters; pinned and in-use stay.
    cache.set_pins([])
    await cache.get(*ae)  # (evicts clf from disk: now ae and lite)
    m_ae = cache.load(cache.lookup(*ae))
    cache.acquire(ae)  # the detector runs it
    cache.load(cache.lookup(*lite))
    await cache.get(*clf)  # disk evicts lite (ae is in use)
    assert set(cache.cached()) == {ae, clf}
    cache.load(cache.lookup(*clf))
    assert ae in cache.loaded()
    assert cache.memory_used <= budget
    assert cache.load(cache.lookup(*ae)) is m_ae  # a memory hit: the same interpreter
    cache.release(ae)
    await cache.close()


# -- hot swap -----------------------------------------------------------------------------------


async def test_hot_swap_mid_stream_scores_every_window_exactly_once(rig):
    rig.publish(FLOAT_AE, "skab-ae", "3.0.0", entry="skab-ae")
    server = await rig.start()
    cache = rig.cache(server.uri)
    det = _detector()
    reference = _detector()
    _commissioned(det)
    _commissioned(reference)
    old = det.anomaly
    manager = ModelManager(cache, lambda: det)
    manager.started_with("anomaly", "skab-ae", "1.0.0")

    rows = _rows(600, seed=11)
    scored_by: list[object] = []
    scores: list[float] = []
    swapped = asyncio.Event()

    async def feeder() -> None:
        for i, row in enumerate(rows):
            model = det.anomaly  # the model that scores this row
            res = det.feed([2000.0 + i], [row])
            scored_by.append(model)
            scores.extend(res.scores.tolist())
            if i >= 300 and not swapped.is_set():
                await asyncio.wait_for(swapped.wait(), 20)  # hold the stream for a mid-swap
            await asyncio.sleep(0)

    async def assign() -> None:
        await asyncio.sleep(0.01)  # let the stream run first
        state = await manager.assign(Assignment("anomaly", "skab-ae", "3.0.0"))
        assert state.status == "active", state.error
        swapped.set()

    await asyncio.gather(feeder(), assign())
    new = det.anomaly
    assert new is not old
    n_old = sum(m is old for m in scored_by)
    n_new = sum(m is new for m in scored_by)
    assert 0 < n_old < len(rows) and n_new > 0
    assert n_old + n_new == len(rows)  # every window scored once, by one model
    assert len(scores) == len(rows) and np.all(np.isfinite(scores))
    # Up to the swap the stream is exactly the one of a detector that never swapped.
    ref = reference.feed([2000.0 + i for i in range(len(rows))], rows).scores
    np.testing.assert_array_equal(scores[:n_old], ref[:n_old])
    assert not np.array_equal(scores[n_old:], ref[n_old:])  # the float model scores now
    assert det.samples == reference.samples
    assert manager.reported()["model/anomaly"]["version"] == "3.0.0"
    assert ("skab-ae", "3.0.0") in cache.pins
    await cache.close()


async def test_hot_swap_refuses_other_features_and_non_finite_models(rig):
    rig.publish(MODELS / "skab-ae-lite.tflite", "skab-ae-lite", "2.0.0")
    cache, det, manager = await _running_manager(rig)
    running = det.anomaly
    state = await manager.assign(Assignment("anomaly", "skab-ae-lite", "2.0.0"))
    assert state.status == "failed" and "features differ" in (state.error or "")
    assert det.anomaly is running
    # A classifier model cannot take the anomaly role.
    state = await manager.assign(Assignment("anomaly", "skab-clf", "1.0.0"))
    assert state.status == "failed" and "classifier" in (state.error or "")

    class NaNModel:  # a model whose output is not finite (the Inference seam)
        name = "nan"
        runtime = "test"

        def predict(self, x):
            return np.full((len(x), 32), np.nan, dtype=np.float32)

    entry = load_manifest(MODELS).entry("skab-ae").raw
    with pytest.raises(ModelError, match="non-finite"):
        det.swap_models(NaNModel(), entry=entry)
    assert det.anomaly is running
    res = det.feed([5000.0], _rows(1, seed=4))
    assert np.isfinite(res.scores[0])
    await cache.close()


async def test_commit_checks_first_and_installs_into_the_detector_running_after_the_index(rig):
    """A commit checks the model on the newest window before anything is pinned, lets the
    detector score while the cache index is written, and installs into the detector running
    then: one that replaced the checked one meanwhile (a tier switch) checks it again."""
    rig.publish(FLOAT_AE, "skab-ae", "3.0.0", entry="skab-ae")
    rig.publish(MODELS / "skab-ae-lite.tflite", "skab-ae-lite", "2.0.0")
    cache, det, manager = await _running_manager(rig)
    running = det.anomaly
    refused = await manager.prepare(Assignment("anomaly", "skab-ae-lite", "2.0.0"))
    with pytest.raises(ModelError, match="features differ"):
        await manager.commit(refused)
    assert ("skab-ae-lite", "2.0.0") not in cache.pins  # refused before the pins changed
    assert det.anomaly is running

    prepared = await manager.prepare(Assignment("anomaly", "skab-ae", "3.0.0"))
    first = det.check_swap(prepared.model, entry=prepared.entry)
    other = _detector()
    _commissioned(other)
    with pytest.raises(ValueError, match="checked by this detector"):
        other.install(first)  # a check is of one detector's features and window
    assert other.anomaly is not prepared.model and det.anomaly is running

    detectors = [det]
    manager._detector = lambda: detectors[-1]
    checks: list[Detector] = []
    for d in (det, other):
        inner = d.check_swap

        def check(*a, _inner=inner, _d=d, **kw):
            checks.append(_d)
            return _inner(*a, **kw)

        d.check_swap = check  # type: ignore[method-assign]
    commit = asyncio.ensure_future(manager.commit(prepared))
    await asyncio.sleep(0)  # the commit checked det's features and yields before the warm-up
    assert checks == [det]
    detectors.append(other)  # a tier switch before the pins and the index are written
    await commit
    assert checks == [det, other]
    assert other.anomaly is prepared.model and det.anomaly is running
    assert manager.current["anomaly"] == ("skab-ae", "3.0.0")
    assert ("skab-ae", "3.0.0") in cache.pins and ("skab-ae", "1.0.0") not in cache.pins
    await cache.close()


async def test_a_commit_keeps_a_threshold_set_meanwhile_and_a_cancelled_one_its_state(rig):
    """A threshold override set while the commit writes the index is the one installed; a
    commit cancelled before the swap leaves the running model and its pins, and one cancelled
    after it has recorded the new version as the role's state (what the device reports); a
    commit of another role meanwhile keeps the first one's version pinned."""
    rig.publish(FLOAT_AE, "skab-ae", "3.0.0", entry="skab-ae")
    rig.publish(FLOAT_AE, "skab-ae", "3.0.1", entry="skab-ae")
    server = await rig.start()
    cache = rig.cache(server.uri)
    det = _detector()
    _commissioned(det)
    overrides: list[float | None] = [None]
    manager = ModelManager(cache, lambda: det, threshold_override=lambda: overrides[-1])
    manager.started_with("anomaly", "skab-ae", "1.0.0")
    running = det.anomaly
    first = await manager.prepare(Assignment("anomaly", "skab-ae", "3.0.0"))
    second = await manager.prepare(Assignment("anomaly", "skab-ae", "3.0.1"))

    commit = asyncio.ensure_future(manager.commit(first))
    await asyncio.sleep(0)  # checked with no override; yields before the warm-up
    await asyncio.sleep(0)  # warmed up; yields before the pins
    await asyncio.sleep(0)  # pins set, the index on the I/O thread
    assert ("skab-ae", "3.0.0") in cache.pins
    commit.cancel()
    with pytest.raises(asyncio.CancelledError):
        await commit
    assert det.anomaly is running and ("skab-ae", "3.0.0") not in cache.pins
    assert manager.roles["anomaly"].version == "1.0.0"

    commit = asyncio.ensure_future(manager.commit(first))
    await asyncio.sleep(0)  # checked with no override
    overrides.append(2.5)  # as a desired threshold is applied while the index is written
    det.threshold = 2.5
    await commit
    assert det.anomaly is first.model and det.threshold == 2.5

    commit = asyncio.ensure_future(manager.commit(second))
    manager._on_ready = lambda role, p: commit.cancel()  # at the swap: raised at the next await
    with pytest.raises(asyncio.CancelledError):
        await commit
    state = manager.roles["anomaly"]
    assert det.anomaly is second.model and (state.version, state.status) == ("3.0.1", "active")
    assert manager.current["anomaly"] == ("skab-ae", "3.0.1")
    assert ("skab-ae", "3.0.1") in cache.pins

    # Two roles at once: the classifier's commit keeps the anomaly model's version pinned while
    # that one's index is written, and both end pinned.
    manager._on_ready = None
    rig.publish(MODELS / "skab-clf.tflite", "skab-clf", "2.0.0")
    clf = await manager.prepare(Assignment("classifier", "skab-clf", "2.0.0"))
    commit = asyncio.ensure_future(manager.commit(first))
    for _ in range(3):  # checked, warmed up, then 3.0.0 pinned and its index on the I/O thread
        await asyncio.sleep(0)
    await manager.commit(clf)
    assert ("skab-ae", "3.0.0") in cache.pins
    await commit
    assert {("skab-ae", "3.0.0"), ("skab-clf", "2.0.0")} <= cache.pins
    assert ("skab-ae", "3.0.1") not in cache.pins and not manager._committing
    await cache.close()


async def test_a_commit_cancelled_or_refused_during_its_check_leaves_the_running_model(rig):
    """The check is two loop steps (the features, then the warm-up on the newest window) and the
    detector scores between them; a commit cancelled in between, or whose model fails on the
    warm-up, changes nothing: the running model stays, nothing new is pinned, no state moves."""
    rig.publish(FLOAT_AE, "skab-ae", "3.0.0", entry="skab-ae")
    cache, det, manager = await _running_manager(rig)
    running = det.anomaly
    prepared = await manager.prepare(Assignment("anomaly", "skab-ae", "3.0.0"))

    commit = asyncio.ensure_future(manager.commit(prepared))
    await asyncio.sleep(0)  # the features checked; the warm-up is the next step
    det.feed([3000.0], _rows(1, seed=5))  # the detector scores between them
    commit.cancel()
    with pytest.raises(asyncio.CancelledError):
        await commit
    assert det.anomaly is running and manager.roles["anomaly"].version == "1.0.0"
    assert ("skab-ae", "3.0.0") not in cache.pins and not manager._committing

    class FailsOnRealWindows:  # the Inference seam: an interpreter that fails when invoked
        name = "skab-ae"
        runtime = "test"

        def __init__(self) -> None:
            self.windows: list[np.ndarray] = []

        def predict(self, x):
            self.windows.append(np.array(x))
            raise RuntimeError("Invoke failed")

    model = FailsOnRealWindows()
    broken = Prepared(prepared.assignment, prepared.cached, model)  # type: ignore[arg-type]
    commit = asyncio.ensure_future(manager.commit(broken))
    await asyncio.sleep(0)
    det.feed([3001.0], _rows(1, seed=6))
    with pytest.raises(ModelError, match="failed on the warm-up window"):
        await commit
    np.testing.assert_array_equal(model.windows[0][0], det.last_window)  # the newest
    assert det.anomaly is running and manager.roles["anomaly"].version == "1.0.0"
    assert ("skab-ae", "3.0.0") not in cache.pins and not manager._committing
    await manager.commit(prepared)  # and the same version, sound, goes in
    assert det.anomaly is prepared.model
    await cache.close()


async def _committing_until_swapped(
    manager: ModelManager, det: Detector, prepared: Prepared
) -> asyncio.Future[None]:
    """The commit of ``prepared`` in a task, run until its swap (checked, warmed up, pinned and
    the index written); its post-swap writes are still to come."""
    commit = asyncio.ensure_future(manager.commit(prepared))
    for _ in range(1_000_000):
        if det.anomaly is prepared.model:
            break
        await asyncio.sleep(0)
    assert det.anomaly is prepared.model
    return commit


async def test_a_commit_cancelled_after_its_swap_still_writes_the_index_and_raises_the_floor(rig):
    """After the swap the commit writes the cache index again (the new pins) and raises the
    model's rollback floor. Was: a cancellation then (the agent stopping, the role assigned
    again) skipped both, so the version swapped out still passed the floor check and the index
    on disk did not say which version runs. Now they are done before the cancellation goes on."""
    rig.publish(FLOAT_AE, "skab-ae", "3.0.0", entry="skab-ae")
    fixed = entry_for(FLOAT_AE, None, "skab-ae") | {"rollback_index": 2}
    rig.registry.publish(FLOAT_AE.read_bytes(), "skab-ae", "4.0.0", fixed, rig.key)
    cache, det, manager = await _running_manager(rig)
    assert (await manager.assign(Assignment("anomaly", "skab-ae", "3.0.0"))).status == "active"
    prepared = await manager.prepare(Assignment("anomaly", "skab-ae", "4.0.0"))
    commit = await _committing_until_swapped(manager, det, prepared)
    commit.cancel()  # the agent stops, or the role is assigned again
    with pytest.raises(asyncio.CancelledError):
        await commit
    assert manager.roles["anomaly"].version == "4.0.0"  # swapped: recorded as running
    floors = json.loads((rig.tmp / "dev" / "floors.json").read_text())
    assert floors == {"skab-ae": {"index": 2, "version": "4.0.0"}}
    index = json.loads(cache.index_path.read_text())  # on disk already, as after a power cut
    pinned = {(m["name"], m["version"]) for m in index["models"] if m["pinned"]}
    assert pinned == {("skab-ae", "4.0.0")}
    state = await manager.assign(Assignment("anomaly", "skab-ae", "3.0.0"))
    assert state.status == "failed" and "below this device's floor 2" in (state.error or "")
    await cache.close()


async def test_a_commit_cancelled_twice_after_its_swap_is_durable_before_assignments_close(rig):
    """A commit cancelled once after its swap waits for its post-swap task (the index written
    again, the rollback floor raised); cancelled a second time (the role assigned again, then
    the agent stopping) it returns before that task is done. Was: ModelAssignments.close()
    returned at once, and the runtime then closed the cache (its I/O thread) and the loop under
    that task: the floor could be lost. Now close() waits for the post-swap tasks still running
    (bounded by assignment.DURABLE_WAIT)."""
    import threading

    fixed = entry_for(FLOAT_AE, None, "skab-ae") | {"rollback_index": 2}
    rig.registry.publish(FLOAT_AE.read_bytes(), "skab-ae", "4.0.0", fixed, rig.key)
    cache, det, manager = await _running_manager(rig)
    assignments = ModelAssignments(
        manager, RealClock(), configured={}, desired_version=lambda key: None, changed=lambda: None
    )
    gate = threading.Event()
    raise_to = manager.floors.raise_to

    def held_raise_to(*args):  # the floor's write is slow (a busy disk)
        gate.wait(10)
        return raise_to(*args)

    manager.floors.raise_to = held_raise_to  # type: ignore[method-assign]
    prepared = await manager.prepare(Assignment("anomaly", "skab-ae", "4.0.0"))
    commit = await _committing_until_swapped(manager, det, prepared)
    commit.cancel()
    await asyncio.sleep(0)  # it waits for its post-swap task
    commit.cancel()  # cancelled again: it returns before that task is done
    with pytest.raises(asyncio.CancelledError):
        await commit
    closing = asyncio.ensure_future(assignments.close())
    for _ in range(100):
        await asyncio.sleep(0)
    assert not closing.done()  # it waits for the floor
    gate.set()
    await closing
    floors = json.loads((rig.tmp / "dev" / "floors.json").read_text())
    assert floors == {"skab-ae": {"index": 2, "version": "4.0.0"}}
    await cache.close()
    index = json.loads(cache.index_path.read_text())
    pinned = {(m["name"], m["version"]) for m in index["models"] if m["pinned"]}
    assert pinned == {("skab-ae", "4.0.0")}


async def test_a_threshold_changed_during_the_re_check_is_checked_again_before_the_swap(rig):
    """The re-check after the index write is steps of its own too: an override that changes
    during it is checked once more, and the swap installs the latest one."""
    rig.publish(FLOAT_AE, "skab-ae", "3.0.0", entry="skab-ae")
    cache, det, manager = await _running_manager(rig)
    overrides: list[float | None] = [None]
    manager._threshold_override = lambda: overrides[-1]
    checks: list[float | None] = []
    inner = det.check_swap

    def check(*a, **kw):
        checks.append(kw.get("threshold"))
        checked = inner(*a, **kw)
        if len(checks) == 2:  # the re-check's feature step; its warm-up is a step of its own
            overrides.append(3.5)
        return checked

    det.check_swap = check  # type: ignore[method-assign]
    prepared = await manager.prepare(Assignment("anomaly", "skab-ae", "3.0.0"))
    commit = asyncio.ensure_future(manager.commit(prepared))
    await asyncio.sleep(0)
    overrides.append(2.5)  # while the first check's warm-up and the index write are to come
    await commit
    assert checks == [None, 2.5, 3.5]
    assert det.anomaly is prepared.model and det.threshold == 3.5
    await cache.close()


async def _tight_disk(rig: Rig) -> tuple[ModelCache, Detector, ModelManager, Prepared]:
    """skab-ae 3.0.0 published; a cache whose disk budget (13,000 bytes) holds 3.0.0 (12,100)
    alone, classifier 2.0.0 pinned (so 3.0.0 fetched puts it over), skab-ae 1.0.0 running and
    the shipped classifier 1.0.0 prepared: its commit sets the pins, which evicts an unpinned
    3.0.0."""
    rig.publish(FLOAT_AE, "skab-ae", "3.0.0", entry="skab-ae")
    rig.publish(MODELS / "skab-clf.tflite", "skab-clf", "2.0.0")
    server = await rig.start()
    cache = rig.cache(server.uri, disk_budget=13_000)  # 3.0.0 (12,100 bytes) fits alone
    det = _detector()
    _commissioned(det)
    manager = ModelManager(cache, lambda: det)
    manager.started_with("anomaly", "skab-ae", "1.0.0")
    manager.started_with("classifier", "skab-clf", "1.0.0")
    assert (await manager.assign(Assignment("classifier", "skab-clf", "2.0.0"))).status == "active"
    shipped = await manager.prepare(Assignment("classifier", "skab-clf", "1.0.0"))
    return cache, det, manager, shipped


async def test_modelcache_a_version_evicted_before_its_commit_pinned_it_is_not_swapped_in(rig):
    """A version fetched for a commit is pinned only after its check (several loop steps): a
    commit of another role that sets the pins meanwhile, with the cache over its disk budget
    (only pinned models beside it), evicts it. Was: the commit pinned a version the cache no
    longer had and swapped it in, its files deleted and the index not naming it (after a
    restart it was gone). Now that commit is not one (NotNow: tried again later, the running
    model stays), and the next one fetches it again."""
    cache, det, manager, shipped = await _tight_disk(rig)
    running = det.anomaly
    prepared = await manager.prepare(Assignment("anomaly", "skab-ae", "3.0.0"))
    assert cache.disk_used > cache.disk_budget  # beside the pinned classifier 2.0.0
    other = asyncio.ensure_future(manager.commit(shipped))
    await asyncio.sleep(0)  # the classifier's commit pins while 3.0.0 is checked
    with pytest.raises(NotNow, match="evicted"):
        await manager.commit(prepared)
    await other
    assert det.anomaly is running and manager.current["anomaly"] == ("skab-ae", "1.0.0")
    assert ("skab-ae", "3.0.0") not in cache.pins and not manager._committing

    assert (await manager.assign(Assignment("anomaly", "skab-ae", "3.0.0"))).status == "active"
    assert det.anomaly is not running and ("skab-ae", "3.0.0") in cache.cached()
    await cache.close()
    index = json.loads((rig.tmp / "dev" / "index.json").read_text())
    pinned = [(m["name"], m["version"]) for m in index["models"] if m["pinned"]]
    assert pinned == [("skab-ae", "3.0.0")]
    assert (rig.tmp / "dev" / "files" / "skab-ae@3.0.0.tflite").is_file()


async def test_modelcache_a_version_evicted_while_prepare_loads_it_is_not_refused(rig):
    """prepare reads and builds the model in a worker thread; meanwhile the loop runs on, and a
    commit of another role that sets the pins, with the cache over its disk budget, evicts the
    unpinned version and deletes its files. Was: the read then failed with ModelError and the
    version was reported refused (``failed``: blocked at the endpoint). Now NotNow, as for the
    window before the commit's pin: nothing refused, tried again later, and the next attempt
    fetches it again."""
    import threading

    cache, det, manager, shipped = await _tight_disk(rig)
    running = det.anomaly
    entered, go_on = threading.Event(), threading.Event()
    build = cache._build

    def held_build(model):  # the real read and build, held until the eviction is done
        entered.set()
        go_on.wait(10)
        return build(model)

    cache._build = held_build  # type: ignore[method-assign]
    assigning = asyncio.ensure_future(manager.assign(Assignment("anomaly", "skab-ae", "3.0.0")))
    assert await asyncio.to_thread(entered.wait, 10)  # downloaded, now read in the worker
    assert cache.disk_used > cache.disk_budget  # beside the pinned classifier 2.0.0
    await manager.commit(shipped)  # its pins evict 3.0.0, its index write deletes the files
    assert not (rig.tmp / "dev" / "files" / "skab-ae@3.0.0.tflite").exists()
    go_on.set()
    with pytest.raises(NotNow, match="evicted from the cache while it was loaded"):
        await assigning
    assert manager.roles["anomaly"].status == "active" and manager.stats.rolled_back == 0
    assert det.anomaly is running and manager.current["anomaly"] == ("skab-ae", "1.0.0")

    cache._build = build  # type: ignore[method-assign]
    assert (await manager.assign(Assignment("anomaly", "skab-ae", "3.0.0"))).status == "active"
    assert det.anomaly is not running and cache.stats.downloads == 3  # fetched again
    await cache.close()


async def test_a_lightweight_model_refused_when_ready_leaves_the_pins_of_the_one_kept(rig):
    """``on_ready`` may refuse a lightweight model (the runtime's _model_ready: channels other
    than the full tier's). Was: it refused after the commit had made 2.0.0 the role's current
    and ready model, so the role reported failed with 1.0.0 kept while 2.0.0 stayed pinned,
    and 1.0.0, which the lite tier still runs, was unpinned. Now the refusal comes before
    anything changes: the pins are the running models' again."""
    rig.publish(MODELS / "skab-ae-lite.tflite", "skab-ae-lite", "2.0.0")
    cache, _, manager = await _running_manager(rig)
    manager.started_with("lightweight", "skab-ae-lite", "1.0.0")

    def on_ready(role: str, p: Prepared) -> None:  # as the runtime's check of the channels
        raise ModelError(f"lite model {p.cached.name} {p.cached.version}: channels differ")

    manager._on_ready = on_ready
    state = await manager.assign(Assignment("lightweight", "skab-ae-lite", "2.0.0"))
    assert state.status == "failed" and "channels differ" in (state.error or "")
    assert (state.name, state.version) == ("skab-ae-lite", "1.0.0")
    assert manager.current["lightweight"] == ("skab-ae-lite", "1.0.0")
    assert "lightweight" not in manager.ready and not manager._committing
    assert cache.pins == {("skab-ae", "1.0.0"), ("skab-ae-lite", "1.0.0")}
    await cache.close()


def test_modelcache_settings_from_config(tmp_path):
    from agent.errors import ConfigError
    from agent.service import config as configmod

    pub = _write_pub(_key(3), tmp_path / "fleet.pub")
    base = f"""
[agent]
device_id = "pump-01"
data_dir = "{tmp_path / "data"}"
[[sensor]]
name = "ambient"
driver = "bme280"
bus = 1
address = 0x76
interval = 5.0
channels = ["temperature_c"]
"""
    cfg = configmod.loads(base + '[models]\npublic_key = "fleet.pub"\n', path=tmp_path / "a.toml")
    assert cfg.models.cache_dir == tmp_path / "data" / "models"
    assert cfg.models.public_key == pub
    bad = base + "[models]\nmemory_budget_mb = -1\n"
    with pytest.raises(ConfigError, match=r"a.toml: models.memory_budget_mb"):
        configmod.loads(bad, path=tmp_path / "a.toml")
    # a key not there yet is accepted (downloads are refused until it is); one that is there
    # must be a key
    later = base + '[models]\npublic_key = "later.pub"\n'
    assert configmod.loads(later, path=tmp_path / "a.toml").models.public_key == (
        tmp_path / "later.pub"
    )
    (tmp_path / "bad.pub").write_text("not a key\n")
    bad = base + '[models]\npublic_key = "bad.pub"\n'
    with pytest.raises(ConfigError, match=r"models.public_key: .*not an Ed25519"):
        configmod.loads(bad, path=tmp_path / "a.toml")
    shutil.rmtree(tmp_path / "data", ignore_errors=True)


async def test_modelcache_cli_lists_cached_models(rig, capsys):
    from agent.service import cli

    rig.publish(MODELS / "skab-ae.tflite", "skab-ae", "2.0.0")
    server = await rig.start()
    cache = rig.cache(server.uri)
    await cache.get("skab-ae", "2.0.0")
    cache.set_pins([("skab-ae", "2.0.0")])
    await cache.close()
    config = rig.tmp / "agent.toml"
    config.write_text(
        f"""
[agent]
device_id = "pump-01"
data_dir = "{rig.tmp}"
[[sensor]]
name = "ambient"
driver = "bme280"
bus = 1
address = 0x76
interval = 5.0
channels = ["temperature_c"]
[models]
cache_dir = "dev"
public_key = "fleet.pub"
"""
    )
    assert cli.main(["models", "--config", str(config), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    (row,) = [r for r in rows if r["source"] == "cache"]
    assert (row["name"], row["version"], row["size"]) == ("skab-ae", "2.0.0", 7992)
    assert row["pinned"] and row["signature"].startswith("ok (key ")
    assert row["last_used"] is not None
    assert cli.main(["models", "--config", str(config)]) == 0
    text = capsys.readouterr().out
    assert "skab-ae" in text and "pinned" in text


async def test_a_version_below_the_models_rollback_floor_is_refused_and_the_floor_holds(rig):
    """Version 4.0.0 was published with rollback index 2 (a fix) and ran here: 3.0.0 (index 0)
    is refused when assigned again, the running model stays, and after a restart of the cache
    the floor holds; 5.0.0 of index 2 is taken. The index is in the signed entry: raised in a
    stored manifest, the signature does not verify; a damaged floors file is said and its copy
    holds the floor (both damaged read as none)."""
    rig.publish(FLOAT_AE, "skab-ae", "3.0.0", entry="skab-ae")
    fixed = entry_for(FLOAT_AE, None, "skab-ae") | {"rollback_index": 2}
    rig.registry.publish(FLOAT_AE.read_bytes(), "skab-ae", "4.0.0", fixed, rig.key)
    rig.registry.publish(FLOAT_AE.read_bytes(), "skab-ae", "5.0.0", fixed, rig.key)
    cache, det, manager = await _running_manager(rig)
    assert (await manager.assign(Assignment("anomaly", "skab-ae", "3.0.0"))).status == "active"
    assert (await manager.assign(Assignment("anomaly", "skab-ae", "4.0.0"))).status == "active"
    state = await manager.assign(Assignment("anomaly", "skab-ae", "3.0.0"))
    assert state.status == "failed" and (state.name, state.version) == ("skab-ae", "4.0.0")
    assert "rollback index 0 is below this device's floor 2" in (state.error or "")
    await cache.close()
    cache = rig.cache(rig.server.uri)  # the floor is on disk
    manager = ModelManager(cache, lambda: det)
    manager.started_with("anomaly", "skab-ae", "4.0.0")
    assert (await manager.assign(Assignment("anomaly", "skab-ae", "3.0.0"))).status == "failed"
    assert (await manager.assign(Assignment("anomaly", "skab-ae", "5.0.0"))).status == "active"
    await cache.close()
    doc = json.loads((rig.tmp / "dev" / "floors.json").read_text())
    assert doc == {"skab-ae": {"index": 2, "version": "4.0.0"}}
    stored = SignedManifest.from_cbor(
        rig.registry.storage.call_sync(lambda s: s.model("skab-ae", "3.0.0")).manifest
    )
    forged = replace(stored, entry={**stored.entry, "rollback_index": 9})
    with pytest.raises(ModelError, match="does not verify"):
        forged.verify(rig.key.public_key())
    with pytest.raises(ModelError, match="rollback_index is not an integer"):
        Floors(rig.tmp).check("skab-ae", "6", {"rollback_index": 2.5})
    (rig.tmp / "dev" / "floors.json").write_text("[" * 50_000)  # damaged: the copy holds
    assert Floors(rig.tmp / "dev").read() == {"skab-ae": (2, "4.0.0")}
    (rig.tmp / "dev" / "floors.copy.json").write_text("{")
    assert Floors(rig.tmp / "dev").read() == {}


async def test_two_roles_swapped_at_once_both_raise_their_models_rollback_floors(rig, monkeypatch):
    """model/anomaly and model/classifier assigned in one desired document, each a version with
    a rollback index: the two commits raise their floors at about the same time, each in a
    worker thread (read floors.json, add its own, write it). Was: both read the file before
    either wrote it, and the second write dropped the first's floor (or the two writes of the
    one temporary file failed: event=model_floor_not_written), so the older version of that
    model could be assigned again. Now the raises take turns: both floors hold. (The writes are
    held until both raises have read, where the code lets them.)"""
    import threading

    from agent.modelstore import floors

    fixed = entry_for(FLOAT_AE, None, "skab-ae") | {"rollback_index": 2}
    rig.registry.publish(FLOAT_AE.read_bytes(), "skab-ae", "4.0.0", fixed, rig.key)
    clf = entry_for(MODELS / "skab-clf.tflite", None, "skab-clf") | {"rollback_index": 3}
    rig.registry.publish(
        (MODELS / "skab-clf.tflite").read_bytes(), "skab-clf", "2.0.0", clf, rig.key
    )
    cache, _, manager = await _running_manager(rig)
    manager.started_with("classifier", "skab-clf", "1.0.0")
    both_read = threading.Barrier(2, timeout=2)
    real_write = floors.write_atomic

    def write_when_both_read(path, data, **kw):
        with contextlib.suppress(threading.BrokenBarrierError):  # the other waits its turn
            both_read.wait()
        return real_write(path, data, **kw)

    monkeypatch.setattr(floors, "write_atomic", write_when_both_read)
    states = await asyncio.gather(
        manager.assign(Assignment("anomaly", "skab-ae", "4.0.0")),
        manager.assign(Assignment("classifier", "skab-clf", "2.0.0")),
    )
    assert [s.status for s in states] == ["active", "active"]
    await cache.close()
    assert Floors(rig.tmp / "dev").read() == {"skab-ae": (2, "4.0.0"), "skab-clf": (3, "2.0.0")}


def test_models_publish_signs_the_rollback_index_given(tmp_path, capsys):
    from agent.modelstore.signing import write_keypair
    from cloud.cli import main as cloud_main

    key, _ = write_keypair(tmp_path / "k.key")
    argv = ["models", "publish", str(FLOAT_AE), "--data", str(tmp_path / "c"), "--key", str(key)]
    argv += ["--name", "skab-ae", "--entry", "skab-ae", "--version"]
    assert cloud_main([*argv, "7", "--rollback-index", "3"]) == 0
    assert cloud_main([*argv, "8"]) == 0
    assert cloud_main([*argv, "9", "--rollback-index", "-1"]) == 64
    assert "--rollback-index must be 0..2147483647" in capsys.readouterr().err
    registry = ModelRegistry(tmp_path / "c" / "models")

    def entry(version: str) -> dict:
        stored = registry.storage.call_sync(lambda s: s.model("skab-ae", version))
        return dict(SignedManifest.from_cbor(stored.manifest).entry)

    assert entry("7")["rollback_index"] == 3 and "rollback_index" not in entry("8")
