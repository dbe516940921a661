"""The endpoint's agent releases: signed offline wheel bundles, served block-wise like models.

``edge-agent-cloud releases publish BUNDLE --version V`` packs the bundle tools/flash builds
(agent/ota/release.py: one tar of ``bundle.json`` and the wheels), signs its manifest with the
release key (a role of its own: ``DATA/releases/release.key``, never the model key) and stores
both in the storage (:meth:`cloud.storebase.Storage.put_release`): PostgreSQL in the tables of
cloud/releasestore.py, SQLite as the files ``DATA/releases/V/release.tar`` and
``manifest.cbor`` it always used (cloud/releasefiles.py). So every endpoint on that storage
serves a release published through any of them or the command line. A version is immutable:
publishing it again with other bytes is refused, with the same bytes it changes nothing. A
release file is at most :data:`cloud.releasestore.MAX_RELEASE_BYTES`.

Each endpoint process serves a version's file from its local cache, ``DATA/releases`` (the layout
of cloud/releasefiles.py), filled the first time a device asks for that version's file: the file
is written from the storage into a temporary file beside the cache (block by block, never whole
in memory), its size and SHA-256 checked against the signed manifest (a file that does not match
is refused with 5.03 and never cached) and moved into place; a cached copy whose manifest differs
from the storage's is replaced. With SQLite the cache is the storage itself and nothing is copied.

Resources (docs/ota.md), all GET, for any authenticated principal:

    /releases                      CBOR array of {version, size, sha256, key, published}
    /releases/V/manifest           the signed manifest (CBOR)
    /releases/V/file               the release file (Content-Format 42), Block2 by number, with
                                   Size2 and an ETag (first 8 bytes of its SHA-256): stateless,
                                   so a device resumes from its last whole block

Logging: info for a release published and for a release cached; error for a stored file that
does not match its manifest.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import cbor2
from aiocoap import Message
from aiocoap.numbers.codes import Code
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.errors import ModelError
from agent.modelstore.signing import CF_OCTET_STREAM, check_name
from agent.ota.release import ReleaseError, ReleaseManifest, check_file, pack
from agent.wire.batch import CF_CBOR
from cloud.models import Direct, ModelRequestError, StorageCalls, block_response
from cloud.protocol import _Failure
from cloud.releasefiles import MANIFEST_FILE, RELEASE_FILE, ReleaseFiles
from cloud.releasestore import MAX_RELEASE_BYTES
from cloud.storebase import ReleaseVersion

log = logging.getLogger(__name__)

RELEASES_DIR = "releases"
KEY_FILE = "release.key"
__all__ = ["KEY_FILE", "MANIFEST_FILE", "RELEASES_DIR", "RELEASE_FILE", "ReleaseRegistry"]


@dataclass(frozen=True)
class PublishedRelease:
    version: str
    size: int
    sha256: str
    key: str
    published: float
    arch: str
    python: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def read_manifest(stored: ReleaseVersion | None) -> ReleaseManifest | None:
    """The signed manifest of a stored release; None when there is none or it does not read."""
    if stored is None:
        return None
    try:
        return ReleaseManifest.from_cbor(stored.manifest)
    except ReleaseError as err:
        log.warning("event=release_manifest_unreadable version=%s error=%s", stored.version, err)
        return None


class ReleaseRegistry:
    """The published releases of a storage, served from the cache in ``directory``
    (``DATA/releases``). Without ``storage`` the directory is the store itself (a SQLite
    endpoint's layout)."""

    def __init__(self, directory: str | Path, storage: StorageCalls | None = None) -> None:
        self.directory = Path(directory)
        self.cache = ReleaseFiles(self.directory)
        self.storage: StorageCalls = storage or Direct(self.cache)
        self._ready: dict[str, ReleaseManifest] = {}  # cached and checked
        self._filling = asyncio.Lock()

    def version_dir(self, version: str) -> Path:
        return self.cache.version_dir(version)

    def publish(
        self, bundle: Path, version: str, key: Ed25519PrivateKey, rollback_index: int = 0
    ) -> tuple[ReleaseManifest, bool]:
        """Pack, sign and store the bundle in ``bundle`` as ``version``: (its manifest, whether
        it was stored now; False: the same file was published already); ``rollback_index``
        signed into its bundle (agent/ota/floor.py). Raises ReleaseError
        (not a bundle, too large, the version published with other bytes)."""
        check_name("version", version)
        self.directory.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{version}.", dir=self.directory))
        try:
            meta = pack(bundle, tmp / RELEASE_FILE)
            manifest = ReleaseManifest.sign(version, tmp / RELEASE_FILE, meta, key, rollback_index)
            if manifest.size > MAX_RELEASE_BYTES:
                raise ReleaseError(
                    f"release {version}: {manifest.size} bytes, over the limit of "
                    f"{MAX_RELEASE_BYTES}"
                )
            stored = self.stored(version)
            if stored is None:
                body, now, file = manifest.to_cbor(), time.time(), tmp / RELEASE_FILE
                if self.storage.call_sync(lambda s: s.put_release(version, body, file, now)):
                    log.info(
                        "event=release_published version=%s bytes=%d key=%s",
                        version,
                        manifest.size,
                        manifest.key,
                    )
                    return manifest, True
                stored = self.stored(version)  # published meanwhile by another
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        if stored is not None and stored.sha256 == manifest.sha256:
            return stored, False
        raise ReleaseError(
            f"release {version} is already published with other bytes; releases are immutable, "
            "publish a new version"
        )

    def stored(self, version: str) -> ReleaseManifest | None:
        """The manifest of a published version (None: not published)."""
        return read_manifest(self.storage.call_sync(lambda s: s.release(version)))

    def list(self) -> list[PublishedRelease]:
        """The published releases, by time of publication."""
        return _published(self.storage.call_sync(lambda s: s.releases()))

    async def _cached(self, version: str) -> ReleaseManifest:
        """The version's manifest, once its file is in the cache as the storage has it (the
        module docstring); ModelRequestError 4.04 when it is not published."""
        ready = self._ready.get(version)
        if ready is not None:
            return ready
        async with self._filling:  # one fill at a time; a second request finds it done
            ready = self._ready.get(version)
            if ready is not None:
                return ready
            stored = await self.storage.call(lambda s: s.release(version))
            manifest = read_manifest(stored)
            if stored is None or manifest is None:
                raise ModelRequestError(Code.NOT_FOUND, "no such release")
            cached = self.cache.release(version)
            if (
                cached is None
                or cached.manifest != stored.manifest
                or not self.cache.file_path(version).is_file()
            ):
                await self._fill(version, stored.manifest, manifest)
            self._ready[version] = manifest
            return manifest

    async def _fill(self, version: str, body: bytes, manifest: ReleaseManifest) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        part = self.directory / f".{version}.{os.getpid()}.fill"
        try:
            size = await self.storage.call(lambda s: s.release_file(version, part))
            if size is None:
                raise ModelRequestError(Code.NOT_FOUND, "no such release")
            loop = asyncio.get_running_loop()
            try:
                await loop.run_in_executor(None, check_file, manifest, part)
            except ReleaseError:
                log.error(
                    "event=stored_release_corrupt version=%s bytes=%d action=refused",
                    version,
                    size,
                )
                raise ModelRequestError(
                    Code.SERVICE_UNAVAILABLE, "the stored release does not match its manifest"
                ) from None
            await loop.run_in_executor(None, self.cache.install, version, body, part)
            log.info("event=release_cached version=%s bytes=%d", version, size)
        finally:
            part.unlink(missing_ok=True)

    async def render(self, request: Message, path: tuple[str, ...]) -> Message:
        """Answer a GET under ``/releases``; raises ModelRequestError."""
        match path:
            case ("releases",):
                found = await self.storage.call(lambda s: s.releases())
                items = [p.to_dict() for p in _published(found)]
                payload = cbor2.dumps(items, canonical=True)
                return Message(code=Code.CONTENT, payload=payload, content_format=CF_CBOR)
            case ("releases", version, "manifest"):
                _check(version)
                stored = await self.storage.call(lambda s: s.release(version))
                if stored is None:
                    raise ModelRequestError(Code.NOT_FOUND, "no such release")
                return Message(code=Code.CONTENT, payload=stored.manifest, content_format=CF_CBOR)
            case ("releases", version, "file"):
                _check(version)
                accept = request.opt.accept
                if accept is not None and int(accept) != CF_OCTET_STREAM:
                    raise ModelRequestError(Code.NOT_ACCEPTABLE, "served as 42")
                m = await self._cached(version)
                try:
                    return block_response(request, self.cache.file_path(version), m.sha256)
                except FileNotFoundError:  # the cached copy went away: fetch it again
                    self._ready.pop(version, None)
                    m = await self._cached(version)
                    return block_response(request, self.cache.file_path(version), m.sha256)
        raise ModelRequestError(Code.NOT_FOUND, "no such resource")


def _check(version: str) -> None:
    try:
        check_name("version", version)
    except ModelError:
        raise ModelRequestError(Code.NOT_FOUND, "no such release") from None


def _published(found: list[ReleaseVersion]) -> list[PublishedRelease]:
    out = []
    for stored in found:
        m = read_manifest(stored)
        if m is not None:
            arch, python = str(m.bundle.get("arch", "")), str(m.bundle.get("python", ""))
            out.append(
                PublishedRelease(m.version, m.size, m.sha256, m.key, stored.published, arch, python)
            )
    out.sort(key=lambda p: (p.published, p.version))
    return out


class ReleaseRoutes:
    """The ``/releases`` handler of :class:`cloud.server.CloudServer` (a mixin)."""

    data_dir: Path | None
    storage: StorageCalls
    _release_registry: ReleaseRegistry | None = None

    async def _releases_get(self, request: Message, route: Any) -> Message:
        if self.data_dir is None:
            raise _Failure(Code.NOT_FOUND, "no release registry")
        registry = self._release_registry
        if registry is None:  # one per server: it remembers what it cached and checked
            registry = ReleaseRegistry(self.data_dir / RELEASES_DIR, self.storage)
            self._release_registry = registry
        try:
            return await registry.render(request, tuple(request.opt.uri_path))
        except ModelRequestError as err:
            raise _Failure(err.code, err.message) from None
