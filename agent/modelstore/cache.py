"""The model cache: signed, versioned models kept on disk and loaded, within budgets, LRU.

Two tiers, each bounded and each evicted least-recently-used first:

- **disk**: verified model files under ``cache_dir`` (``files/NAME@VERSION.tflite`` beside the
  signed manifest ``files/NAME@VERSION.manifest``) and the partial downloads kept for resuming
  (:mod:`agent.modelstore.partials`; they go before any model), bounded by ``disk_budget``;
- **memory**: loaded interpreters (:class:`~agent.detect.inference.TFLiteModel`), bounded by
  ``memory_budget``. The memory estimate of a loaded model is its **file size**: the interpreter
  holds a copy of the flatbuffer (``model_content``), and the activation arena of the shipped
  MLPs is a few hundred bytes next to it.

A model that is *pinned* (the current policy needs it: :meth:`ModelCache.set_pins`) or *in use*
(:meth:`ModelCache.acquire` until :meth:`ModelCache.release`) is never evicted from either tier;
when only such models are left the cache stays over its budget and says so in a warning.

:meth:`ModelCache.get` is a local hit or a download:

1. a cached ``(name, version)`` is a hit;
2. a model of the shipped directory (``models/manifest.json``) with that name and version is
   used in place (shipped models come with the agent and are trusted like its code; they do not
   count against the disk budget) -- so with an empty cache and no link the agent runs from them;
3. otherwise the signed manifest is fetched, decoded strictly and its Ed25519 signature checked
   with the device's public key (:mod:`agent.modelstore.signing`); a model larger than the disk
   or the memory budget is refused before a block is fetched (one larger than the free space
   waits for it). The file is fetched block by block into ``partial/`` (an interrupted
   download, also across a restart, resumes from the last whole block), checked whole (size,
   SHA-256 hashed in chunks, TFLite identifier) and installed atomically. A resumed download
   that fails the check is fetched once more from scratch (a power cut may have lost kept
   blocks); anything else that does not verify is refused, nothing cached or running changes.

Link failures raise :class:`~agent.errors.SyncError` (try again later; the partial file stays);
refusals (anything wrong with a manifest or a file) raise :class:`~agent.errors.ModelError`;
the device's own (free space, a failed write) :class:`~agent.errors.NotNow` (try again later).

The index (``index.json``) is written atomically on every install, eviction and pin change, and
on :meth:`ModelCache.close` (last use times); a write that fails is NotNow. The state stays to be
written until a write of it succeeded, also when the task awaiting the write was cancelled
(:mod:`agent.modelstore.indexfile`). A missing or corrupt
index is rebuilt from the files: each file is verified again (SHA-256, and the signature when a
public key is configured) and the ones that fail are deleted. A cached copy is checked again
after its install as well (:mod:`agent.modelstore.atrest`): its stored manifest when it is first
looked up, its file (size, SHA-256) whenever it is loaded; one damaged at rest is dropped (its
files deleted) and fetched again: NotNow when found at load, never a refusal of the version.

Logging policy: info for a model installed, evicted, refused or loaded; warning when the cache
cannot get under its budget or a cached file fails its check.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from agent.detect.inference import (
    Manifest,
    ModelEntry,
    TFLiteModel,
    load_manifest,
    read_model_file,
)
from agent.errors import ModelError, NotNow, SyncError
from agent.files import read_json
from agent.modelstore.atrest import rebuild, stored_manifest
from agent.modelstore.fetch import FetchStats, ModelFetcher
from agent.modelstore.indexfile import IndexWriter, Record, Ref
from agent.modelstore.listing import cache_listing
from agent.modelstore.partials import PartialFiles, check_fits
from agent.modelstore.settings import ModelsSettings
from agent.modelstore.signing import SignedManifest, check_name, load_public_key
from drivers.clock import Clock, RealClock

log = logging.getLogger(__name__)

INDEX_FORMAT = 1
HISTORY = 32  # refusals kept for status


# -- the cache ------------------------------------------------------------------------------------


class DamagedCopy(ModelError):
    """A cached model file that no longer verifies when it is read to be loaded."""


OnBlock = Callable[[int, int], None] | None  # called after each block written: (num, bytes)


@dataclass(frozen=True)
class CachedModel:
    """A model ready to load: its file, its manifest entry, where it came from."""

    name: str
    version: str
    path: Path
    entry: ModelEntry
    source: str  # "cache" | "shipped" | "download"
    manifest: SignedManifest | None = None

    @property
    def ref(self) -> Ref:
        return (self.name, self.version)

    @property
    def size(self) -> int:
        return self.entry.size


@dataclass
class _Loaded:
    model: TFLiteModel
    estimate: int
    seq: int


@dataclass
class CacheStats:
    hits: int = 0
    shipped: int = 0
    downloads: int = 0
    refused: int = 0
    evicted_files: int = 0
    evicted_loaded: int = 0
    loads: int = 0
    load_hits: int = 0
    last_fetch: FetchStats | None = None
    refusals: deque[str] = field(default_factory=lambda: deque(maxlen=HISTORY))  # the latest


class ModelCache:
    """See the module docstring. Build with :meth:`open`; call :meth:`close` at the end."""

    def __init__(
        self,
        directory: Path,
        *,
        memory_budget: int,
        disk_budget: int,
        public_key: Ed25519PublicKey | None = None,
        shipped: Manifest | None = None,
        fetcher: ModelFetcher | None = None,
        runtime: str = "auto",
        num_threads: int = 1,
        batch_mode: str = "resize",
        clock: Clock | None = None,
    ) -> None:
        self.directory = Path(directory)
        self.clock = clock or RealClock()
        # disk work (hashing, fsync, index writes, deletes) runs here, in order, off the loop
        self._io = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model-cache-io")
        self.files = self.directory / "files"
        self.partial = self.directory / "partial"
        self.partials = PartialFiles(self.partial)  # interrupted downloads, kept for resuming
        self.index_path = self.directory / "index.json"
        self._index = IndexWriter(  # index.json and the deletes of evicted files
            self.index_path, self._io, self.clock, doc=self._index_doc, delete=self._delete_files
        )
        self.memory_budget = memory_budget
        self.disk_budget = disk_budget
        self.public_key = public_key
        self.key_path: Path | None = None  # [models] public_key, read when it appears
        self.shipped = shipped
        self.fetcher = fetcher
        self.runtime = runtime
        self.num_threads = num_threads
        self.batch_mode = batch_mode
        self.stats = CacheStats()
        self.rebuilt = False  # the index was rebuilt from the files at open
        self.readonly = False
        self._records: dict[Ref, Record] = {}
        self._loaded: dict[Ref, _Loaded] = {}
        self._in_use: Counter[Ref] = Counter()
        self._pins: set[Ref] = set()
        self._seq = 0
        self._locks: dict[Ref, asyncio.Lock] = {}
        self._known: dict[Ref, CachedModel] = {}  # parsed manifests of cached files

    @classmethod
    def open(
        cls,
        settings: ModelsSettings,
        *,
        shipped_dir: Path | None = None,
        fetcher: ModelFetcher | None = None,
        runtime: str = "auto",
        num_threads: int = 1,
        batch_mode: str = "resize",
        readonly: bool = False,
        clock: Clock | None = None,
    ) -> ModelCache:
        """Open (or create) the cache of ``settings``; a corrupt index is rebuilt. NotNow when
        the device's disk does not let it (the directory cannot be created or read, the index
        cannot be written); ModelError for a public key that is not one.
        ``readonly``: only look (``edge-agent models``): create, delete and write nothing."""
        key = None
        if settings.public_key is not None and settings.public_key.exists():
            key = load_public_key(settings.public_key)
        elif settings.public_key is not None:
            log.warning(
                "event=model_key_missing path=%s: model downloads are refused until it exists: "
                "copy the registry's public key there (the KEYFILE.pub of `edge-agent-cloud "
                "models keygen`)",
                settings.public_key,
            )
        shipped = None
        if shipped_dir is not None and (Path(shipped_dir) / "manifest.json").is_file():
            shipped = load_manifest(shipped_dir)
        cache = cls(
            settings.cache_dir,
            memory_budget=settings.memory_budget,
            disk_budget=settings.disk_budget,
            public_key=key,
            shipped=shipped,
            fetcher=fetcher,
            runtime=runtime,
            num_threads=num_threads,
            batch_mode=batch_mode,
            clock=clock,
        )
        cache.readonly = readonly
        cache.key_path = settings.public_key
        try:
            cache._open()
        except OSError as err:  # reading the cache's directory failed (EIO): tried again
            raise NotNow(f"{settings.cache_dir}: cannot open the model cache ({err})") from err
        return cache

    # -- index ------------------------------------------------------------------------------------

    def _open(self) -> None:
        self._index.readonly = self.readonly
        try:
            if not self.readonly:
                self.files.mkdir(parents=True, exist_ok=True)
                self.partial.mkdir(parents=True, exist_ok=True)
        except OSError as err:  # the device's disk (full, read-only, failing): tried again
            raise NotNow(f"{self.directory}: cannot create the model cache ({err})") from err
        try:
            raw = read_json(self.index_path)
            if raw.get("format") != INDEX_FORMAT:
                raise ValueError(f"format {raw.get('format')!r}")
            records = [Record.from_dict(d) for d in raw["models"]]
            self._seq = int(raw.get("seq", 0))
            for rec in records:
                if (
                    not self._file(rec.ref).is_file()
                    or self._file(rec.ref).stat().st_size != rec.size
                ):
                    log.warning("model cache file missing name=%s version=%s; dropped", *rec.ref)
                    self._index.changed()
                    continue
                self._records[rec.ref] = rec
                if rec.pinned:
                    self._pins.add(rec.ref)
        except FileNotFoundError:
            rebuild(self, missing=True)
        except (
            OSError, ValueError, KeyError, TypeError, AttributeError, OverflowError, ModelError
        ) as err:  # fmt: skip
            log.warning(
                "model cache index unreadable path=%s error=%r; rebuilding",
                self.index_path,
                str(err),
            )
            rebuild(self, missing=False)
        self.partials.readonly = self.readonly
        models = sum(r.size for r in self._records.values())
        self.partials.sweep(set(self._records), time.time(), room=self.disk_budget - models)
        if self.readonly:
            return
        self._sweep_orphans()
        if self._index.dirty:
            self._index.write()

    def _sweep_orphans(self) -> None:
        """Files the index does not know (a crash between rename and index write)."""
        known = {self._file(r).name for r in self._records} | {
            self._manifest_path(r).name for r in self._records
        }
        for p in self.files.iterdir():
            hidden = p.name.startswith(".")
            if (not hidden and p.name not in known) or (hidden and p.name.endswith(".tmp")):
                with contextlib.suppress(OSError):
                    p.unlink()

    def _index_doc(self) -> dict[str, Any]:
        """The index as of now: a copy, which the I/O thread may encode while the loop runs on."""
        return {
            "format": INDEX_FORMAT,
            "seq": self._seq,
            "models": [r.to_dict() for r in sorted(self._records.values(), key=lambda r: r.seq)],
        }

    async def sync(self) -> None:
        """Make the disk agree with the cache's state: evicted files deleted, the index written
        (atomically, on the cache's I/O thread; see :mod:`agent.modelstore.indexfile`). NotNow
        when the index cannot be written; the state stays to be written until a write succeeds."""
        await self._index.sync()

    async def close(self) -> None:
        try:
            await self.sync()
        except NotNow as err:
            log.error("model cache index not written at close error=%r", str(err))
        finally:
            self._io.shutdown(wait=True)
        if self.fetcher is not None:
            await self.fetcher.close()

    # -- paths ------------------------------------------------------------------------------------

    def _file(self, ref: Ref) -> Path:
        return self.files / f"{ref[0]}@{ref[1]}.tflite"

    def _manifest_path(self, ref: Ref) -> Path:
        return self.files / f"{ref[0]}@{ref[1]}.manifest"

    def _delete_files(self, manifest_path: Path) -> None:
        if self.readonly:
            return
        for p in (manifest_path, manifest_path.with_suffix(".tflite")):
            with contextlib.suppress(OSError):
                p.unlink()

    # -- use bookkeeping --------------------------------------------------------------------------

    def _touch(self, ref: Ref) -> int:
        self._seq += 1
        rec = self._records.get(ref)
        if rec is not None:
            rec.seq = self._seq
            rec.last_used = time.time()
            self._index.changed()
        return self._seq

    def set_pins(self, refs: Iterable[Ref]) -> None:
        """The models the current policy needs; they are never evicted."""
        pins = set(refs)
        if pins == self._pins:
            return
        self._pins = pins
        for rec in self._records.values():
            rec.pinned = rec.ref in pins
        self._index.changed()  # written by the next sync()
        self._evict_files()
        self._evict_loaded()

    @property
    def pins(self) -> frozenset[Ref]:
        return frozenset(self._pins)

    def acquire(self, ref: Ref) -> None:
        """Mark ``ref`` in use (a detector runs it) until :meth:`release`."""
        self._in_use[ref] += 1

    def release(self, ref: Ref) -> None:
        if self._in_use[ref] <= 1:
            self._in_use.pop(ref, None)
        else:
            self._in_use[ref] -= 1
        self._evict_loaded()
        self._evict_files()

    def _protected(self, ref: Ref) -> bool:
        return ref in self._pins or self._in_use.get(ref, 0) > 0

    # -- disk tier --------------------------------------------------------------------------------

    def cached(self) -> list[Ref]:
        """Cached refs, least recently used first."""
        return [r.ref for r in sorted(self._records.values(), key=lambda r: r.seq)]

    @property
    def disk_used(self) -> int:
        """Bytes of the cached files and of the kept partial downloads."""
        return sum(r.size for r in self._records.values()) + self.partials.used

    def _drop_partial_later(self, ref: Ref) -> None:
        """Forget the kept partial of ``ref`` now, delete it on the I/O thread (in order)."""
        self.partials.forget(ref)
        with contextlib.suppress(RuntimeError):  # closed: swept at the next open
            self._io.submit(self.partials.remove, ref)

    def _evict_files(self, keep: Ref | None = None) -> None:
        while self.disk_used > self.disk_budget:
            idle = self.partials.oldest_idle()
            if idle is not None:  # a partial download goes before any model
                log.info("model partial dropped name=%s version=%s reason=disk_budget", *idle)
                self._drop_partial_later(idle)
                continue
            victims = [
                r
                for r in sorted(self._records.values(), key=lambda r: r.seq)
                if not self._protected(r.ref) and r.ref != keep
            ]
            if not victims:
                log.warning(
                    "model cache over its disk budget used=%d budget=%d (only pinned or in-use "
                    "models left)",
                    self.disk_used,
                    self.disk_budget,
                )
                return
            victim = victims[0]
            del self._records[victim.ref]
            self._loaded.pop(victim.ref, None)
            self._known.pop(victim.ref, None)
            self._index.doom(self._manifest_path(victim.ref))
            self.stats.evicted_files += 1
            self._index.changed()
            log.info(
                "model evicted tier=disk name=%s version=%s bytes=%d",
                victim.name,
                victim.version,
                victim.size,
            )

    def _shipped(self, name: str, version: str | None) -> CachedModel | None:
        if self.shipped is None or name not in self.shipped.models:
            return None
        entry = self.shipped.entry(name)
        shipped_version = str(entry.raw.get("version", ""))
        if version is not None and version != shipped_version:
            return None
        return CachedModel(
            name, shipped_version or "shipped", self.shipped.model_path(name), entry, "shipped"
        )

    def lookup(self, name: str, version: str | None = None) -> CachedModel | None:
        """A local hit (cache or shipped), without fetching; None if there is none."""
        if version is None:
            shipped = self._shipped(name, None)
            if shipped is not None:
                return shipped
            mine = [r for r in self._records.values() if r.name == name]
            if not mine:
                return None
            version = max(mine, key=lambda r: r.seq).version
        rec = self._records.get((name, version))
        hit = None if rec is None else self._cached_model(rec)
        return hit if hit is not None else self._shipped(name, version)

    def _cached_model(self, rec: Record) -> CachedModel | None:
        """The model of ``rec``; None when its stored manifest no longer verifies (dropped)."""
        known = self._known.get(rec.ref)
        if known is not None:
            return known
        try:
            manifest = stored_manifest(self, rec)
            entry = manifest.model_entry()
        except (OSError, ModelError) as err:
            self._drop_damaged(rec.ref, err)
            return None
        model = CachedModel(rec.name, rec.version, self._file(rec.ref), entry, "cache", manifest)
        self._known[rec.ref] = model
        return model

    def _drop_damaged(self, ref: Ref, err: Exception) -> None:
        """Forget the cached copy of ``ref`` that no longer verifies (damaged at rest: fetched
        again, never a refusal); its files are deleted on the I/O thread now, in order, so
        before a download of it installs them again."""
        if self._records.pop(ref, None) is None:
            return
        self._known.pop(ref, None)
        self._index.changed()
        log.warning(
            "event=model_damaged_at_rest name=%s version=%s error=%r action=dropped", *ref, str(err)
        )
        with contextlib.suppress(RuntimeError):  # closed: the index names it no more
            self._io.submit(self._delete_files, self._manifest_path(ref))

    async def get(
        self,
        name: str,
        version: str | None = None,
        *,
        sha256: str | None = None,
        on_block: Callable[[int, int], None] | None = None,
    ) -> CachedModel:
        """A local hit, or the model fetched, verified and installed. ``sha256``: the digest the
        assignment names (refused if the model differs). Raises ModelError (refused: keep what
        runs) or SyncError (the link failed: try later)."""
        check_name("name", name)
        if version is not None:
            check_name("version", version)
        hit = self.lookup(name, version)
        if hit is not None:
            if sha256 is not None and hit.entry.sha256 != sha256.lower():
                raise ModelError(
                    f"model {name} {hit.version}: SHA-256 {hit.entry.sha256[:16]}... is not the "
                    f"assigned {sha256[:16]}...; refused"
                )
            if hit.source == "cache":
                self._touch(hit.ref)
                self.stats.hits += 1
            else:
                self.stats.shipped += 1
            return hit
        if version is None:
            raise ModelError(
                f"model {name}: not cached and not shipped; assign a version to download"
            )
        if self.fetcher is None:
            raise SyncError(f"model {name} {version}: not cached and no endpoint configured")
        ref = (name, version)
        lock = self._locks.setdefault(ref, asyncio.Lock())
        async with lock:
            rec = self._records.get(ref)
            hit = None if rec is None else self._cached_model(rec)
            if hit is not None:  # another task installed it meanwhile
                self._touch(ref)
                return hit
            try:
                return await self._download(name, version, sha256, on_block)
            except ModelError as err:
                self.stats.refused += 1
                self.stats.refusals.append(str(err))
                log.warning(
                    "model refused name=%s version=%s error=%r action=kept_previous",
                    name,
                    version,
                    str(err),
                )
                raise

    async def _download(
        self,
        name: str,
        version: str,
        sha256: str | None,
        on_block: Callable[[int, int], None] | None,
    ) -> CachedModel:
        assert self.fetcher is not None
        ref = (name, version)
        if self.public_key is None and self.key_path is not None and self.key_path.is_file():
            self.public_key = load_public_key(self.key_path)  # copied there since the start
        if self.public_key is None:
            where = f" ({self.key_path} does not exist)" if self.key_path is not None else ""
            raise ModelError(
                f"model {name} {version}: no public key provisioned ([models] public_key"
                f"{where}); a downloaded model cannot be verified, so it is refused"
            )
        manifest = await self.fetcher.manifest(name, version)
        try:
            manifest.verify(self.public_key)
            entry = manifest.model_entry()
        except ModelError:
            raise
        except Exception as err:  # whatever a hostile manifest makes go wrong: refused
            raise ModelError(f"model {name} {version}: malformed manifest ({err!r})") from err
        if sha256 is not None and manifest.sha256 != sha256.lower():
            raise ModelError(
                f"model {name} {version}: the signed manifest's SHA-256 {manifest.sha256[:16]}... "
                f"is not the assigned {sha256[:16]}...; refused"
            )
        check_fits(manifest, self.disk_budget, self.memory_budget)
        for other in self.partials.others_of(ref):  # that model's assignment moved on
            self._drop_partial_later(other)
        self.partials.active.add(ref)
        try:
            for fresh in (False, True):
                fstats = await self._fetch(manifest, on_block, fresh)
                try:  # hashing and the atomic install (fsync, rename, fsync of the directory)
                    await self._install(manifest, entry)
                    break
                except ModelError as err:
                    if fresh or not fstats.resumed_from:
                        raise  # a whole fresh download that does not verify: refused
                    # the kept blocks may be what is wrong (a power cut lost writes)
                    log.warning(
                        "model download resumed from a damaged partial name=%s version=%s "
                        "error=%r action=fetch_again",
                        name,
                        version,
                        str(err),
                    )
        finally:
            self.partials.active.discard(ref)
        self.stats.last_fetch = fstats
        await self.sync()
        self.stats.downloads += 1
        log.info(
            "model installed name=%s version=%s bytes=%d blocks=%d resumed_from=%d key=%s",
            name,
            version,
            manifest.size,
            fstats.blocks,
            fstats.resumed_from,
            manifest.key,
        )
        return CachedModel(name, version, self._file(ref), entry, "download", manifest)

    async def _install(self, manifest: SignedManifest, entry: ModelEntry) -> None:
        """Check and install the downloaded file on the I/O thread (ModelError: refused), then
        record it. Cancelled meanwhile, the thread installs it all the same: recorded too
        (counted against the disk budget, indexed by the next write), then cancelled."""
        ref = (manifest.name, manifest.version)
        file, mpath = self._file(ref), self._manifest_path(ref)
        job = asyncio.ensure_future(
            self.clock.run_blocking(self._io, self.partials.install, manifest, entry, file, mpath)
        )
        try:
            await asyncio.shield(job)
        except asyncio.CancelledError:
            await asyncio.wait([job])
            if job.cancelled() or job.exception() is not None:
                raise
            self._record(manifest)
            raise
        self._record(manifest)

    def _record(self, manifest: SignedManifest) -> None:
        """An installed download in the cache's state (the index is written by the next sync)."""
        ref = (manifest.name, manifest.version)
        self._index.spare(self._manifest_path(ref))  # evicted before, its deletion still due
        now = time.time()
        self._seq += 1
        size, sha, pinned = manifest.size, manifest.sha256, ref in self._pins
        self._records[ref] = Record(*ref, size, sha, now, now, self._seq, pinned)
        self._index.changed()
        self._evict_files(keep=ref)

    async def _fetch(self, manifest: SignedManifest, on_block: OnBlock, fresh: bool) -> FetchStats:
        """Download into the partial file: resumed if it holds blocks of this file (and not
        ``fresh``). A refusal deletes it; a link failure or a cancellation keeps it, counted."""
        assert self.fetcher is not None
        ref = (manifest.name, manifest.version)
        self.partials.forget(ref)  # being written: counted again if it stops before the end
        await self.clock.run_blocking(self._io, self.partials.prepare, manifest, fresh)
        try:
            return await self.fetcher.download(manifest, self.partials.part(ref), on_block)
        except ModelError:
            await self.clock.run_blocking(self._io, self.partials.remove, ref)
            raise
        except BaseException:  # the link, the device's disk (NotNow) or cancelled: kept
            self.partials.count(ref, self.partials.bytes(ref))  # one stat
            raise

    def partial_bytes(self, name: str, version: str) -> int:
        """Bytes of an interrupted download kept for resuming (0: none)."""
        return self.partials.bytes((name, version))

    # -- memory tier ------------------------------------------------------------------------------

    @property
    def memory_used(self) -> int:
        return sum(m.estimate for m in self._loaded.values())

    def loaded(self) -> list[Ref]:
        return [ref for ref, _ in sorted(self._loaded.items(), key=lambda kv: kv[1].seq)]

    def _hit(self, ref: Ref) -> TFLiteModel | None:
        seq = self._touch(ref) if ref in self._records else self._next_seq()
        hit = self._loaded.get(ref)
        if hit is None:
            return None
        hit.seq = seq
        self.stats.load_hits += 1
        return hit.model

    def _build(self, model: CachedModel) -> tuple[TFLiteModel, int]:
        """Read, verify and build the interpreter (no shared state: runs in a worker thread).
        A cached file that no longer verifies is :class:`DamagedCopy`."""
        try:
            data = read_model_file(model.path, model.entry)
        except ModelError as err:
            if model.source != "cache":
                raise
            raise DamagedCopy(str(err)) from err
        tfl = TFLiteModel(
            data,
            name=model.name,
            runtime=self.runtime,
            num_threads=self.num_threads,
            batch_mode=self.batch_mode,
            entry=model.entry,
            label=f"{model.path}",
        )
        return tfl, len(data)

    def load(self, model: CachedModel) -> TFLiteModel:
        """The loaded interpreter of ``model`` (a hit, or read, verified and loaded)."""
        hit = self._hit(model.ref)
        if hit is not None:
            return hit
        try:
            return self._register(model, *self._build(model))
        except DamagedCopy as err:
            raise self._damaged(model, err) from err

    async def load_async(self, model: CachedModel) -> TFLiteModel:
        """:meth:`load` with the read and the interpreter build in a worker thread, so the
        event loop (and the detector's feeds) go on meanwhile."""
        hit = self._hit(model.ref)
        if hit is not None:
            return hit
        try:
            tfl, size = await asyncio.to_thread(self._build, model)
        except DamagedCopy as err:
            raise self._damaged(model, err) from err
        hit = self._hit(model.ref)
        return hit if hit is not None else self._register(model, tfl, size)

    def _damaged(self, model: CachedModel, err: DamagedCopy) -> ModelError | NotNow:
        """What a load of a cached file that no longer verifies raises: NotNow, the copy
        dropped (fetched again later); the error itself when the cache no longer has the
        version (evicted while it was read: its files deleted, the caller's case)."""
        if model.ref not in self._records:
            return err
        self._drop_damaged(model.ref, err)
        return NotNow(
            f"model {model.name} {model.version}: the cached copy no longer verifies ({err}); "
            "dropped, fetched again"
        )

    def _register(self, model: CachedModel, tfl: TFLiteModel, size: int) -> TFLiteModel:
        ref = model.ref
        data_len = size
        self._loaded[ref] = _Loaded(tfl, data_len, self._next_seq())
        self.stats.loads += 1
        log.info(
            "model loaded name=%s version=%s source=%s runtime=%s bytes=%d",
            model.name,
            model.version,
            model.source,
            tfl.runtime,
            data_len,
        )
        self._evict_loaded(keep=ref)
        return tfl

    def unload(self, ref: Ref) -> None:
        if not self._protected(ref):
            self._loaded.pop(ref, None)

    def _next_seq(self) -> int:
        self._seq += 1
        return self._seq

    def _evict_loaded(self, keep: Ref | None = None) -> None:
        while self.memory_used > self.memory_budget:
            victims = [
                ref
                for ref, m in sorted(self._loaded.items(), key=lambda kv: kv[1].seq)
                if not self._protected(ref) and ref != keep
            ]
            if not victims:
                log.warning(
                    "model cache over its memory budget used=%d budget=%d (only pinned or in-use "
                    "models loaded)",
                    self.memory_used,
                    self.memory_budget,
                )
                return
            gone = self._loaded.pop(victims[0])
            self.stats.evicted_loaded += 1
            log.info(
                "model evicted tier=memory name=%s version=%s bytes=%d",
                victims[0][0],
                victims[0][1],
                gone.estimate,
            )

    # -- listing ----------------------------------------------------------------------------------

    def listing(self, verify: bool = True) -> list[dict[str, Any]]:
        """One row per cached (and shipped) model, for ``edge-agent models``."""
        return cache_listing(self, verify)
