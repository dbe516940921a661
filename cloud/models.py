"""The endpoint's model registry: signed, versioned model versions and their CoAP resources.

The storage holds the published versions (:meth:`cloud.storebase.Storage.put_model`: the signed
manifest and the file; PostgreSQL in a table, SQLite as the files under ``DATA/models`` it has
always used, cloud/modelfiles.py), so a version published through any endpoint or the command
line is served by every endpoint on that storage. A published version is immutable: publishing
it again is refused (give it a new version).

Each endpoint serves a version's file from its local cache, ``DATA/models`` (the layout of
cloud/modelfiles.py), so that a block is a file read. The cache is filled on demand: the first
request for a version's file in a process compares the cached manifest with the storage's, and
when they differ (or there is no copy) fetches the file from the storage, checks its size and
SHA-256 against the signed manifest, and only then renames it into place. With SQLite in the
same ``--data`` the cache is the storage itself and nothing is copied: a file is served as it
is stored (the device checks the signature and the SHA-256 of everything it downloads).

Resources (docs/protocol.md, "Models"), all GET:

    /models/NAME                      CBOR array of {name, version, size, sha256, key,
                                      published}: the published versions of NAME
    /models/NAME/VERSION/manifest     the signed manifest (CBOR; block-wise when large)
    /models/NAME/VERSION/file         the file (Content-Format 42), Block2 by number (RFC 7959)

The file resource is stateless: any block can be asked for at any time by its Block2 number, so a
device resumes an interrupted download from its last whole block, also after the endpoint
restarted. Every block carries Size2 (the file's size) and an ETag (the first 8 bytes of the
file's SHA-256), so a device notices a file that is not the one its manifest names.

Logging: info for a version published and for a version cached; error for a stored file that
does not match its manifest; requests are logged by the server.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

import cbor2
from aiocoap import Message
from aiocoap.numbers.codes import Code
from aiocoap.optiontypes import BlockOption
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.detect.inference import TFLITE_IDENTIFIER, load_manifest
from agent.errors import ModelError
from agent.modelstore.signing import CF_OCTET_STREAM, SignedManifest, check_name
from agent.wire.batch import CF_CBOR
from cloud.modelfiles import MANIFEST_FILE, MODEL_FILE, ModelFiles
from cloud.storebase import ModelVersion

log = logging.getLogger(__name__)

MAX_SZX = 6  # blocks of at most 1024 bytes
__all__ = ["MANIFEST_FILE", "MODEL_FILE", "ModelRegistry", "Published", "entry_for"]

T = TypeVar("T")


class StorageCalls(Protocol):
    """How the registry reaches the storage: :class:`cloud.storage.StorageThread` (the server),
    or :class:`Direct` (the command line, or a directory of files on its own)."""

    async def call(self, fn: Callable[[Any], T]) -> T: ...

    def call_sync(self, fn: Callable[[Any], T], timeout: float | None = ...) -> T: ...


class Direct:
    """Calls made at once on ``target`` (a storage, or a :class:`ModelFiles`), blocking."""

    def __init__(self, target: Any) -> None:
        self.target = target

    async def call(self, fn: Callable[[Any], T]) -> T:
        return fn(self.target)

    def call_sync(self, fn: Callable[[Any], T], timeout: float | None = None) -> T:
        return fn(self.target)


class ModelRequestError(Exception):
    """A request the registry cannot answer: a CoAP error code and a diagnostic."""

    def __init__(self, code: Code, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class Published:
    name: str
    version: str
    size: int
    sha256: str
    key: str
    published: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def entry_for(file: Path, manifest: Path | None = None, entry_name: str | None = None) -> dict:
    """The manifest entry to publish ``file`` with: from ``manifest`` (default: the
    ``manifest.json`` beside the file), the entry named ``entry_name`` or else the one whose
    ``file`` is the file's name. Raises ModelError."""
    mpath = manifest or file.parent / "manifest.json"
    m = load_manifest(mpath)
    if entry_name is not None:
        return dict(m.entry(entry_name).raw)
    for entry in m.models.values():
        if entry.file == file.name:
            return dict(entry.raw)
    raise ModelError(
        f"{m.path}: no entry for {file.name}; name it with --entry (the entry carries the "
        "features and threshold the device needs)"
    )


class ModelRegistry:
    """The published model versions of a storage, served from the cache in ``directory``.
    Without ``storage`` the directory is the store itself (a SQLite endpoint's layout)."""

    def __init__(self, directory: str | Path, storage: StorageCalls | None = None) -> None:
        self.directory = Path(directory)
        self.cache = ModelFiles(self.directory)
        self.storage: StorageCalls = storage or Direct(self.cache)
        self._ready: dict[tuple[str, str], SignedManifest] = {}  # cached and checked
        self._filling = asyncio.Lock()

    def publish(
        self,
        data: bytes,
        name: str,
        version: str,
        entry: Mapping[str, Any],
        key: Ed25519PrivateKey,
    ) -> SignedManifest:
        """Sign and store one version. Raises ModelError (exists, not a model, bad entry)."""
        check_name("name", name)
        check_name("version", version)
        exists = ModelError(
            f"model {name} {version} is already published; versions are immutable, "
            "publish a new version"
        )
        if self.storage.call_sync(lambda s: s.model(name, version)) is not None:
            raise exists
        if len(data) < 8 or data[4:8] != TFLITE_IDENTIFIER:
            raise ModelError(f"model {name} {version}: not a TFLite file")
        manifest = SignedManifest.sign(name, version, data, entry, key)
        manifest.model_entry()  # the entry must describe a model the device can load
        body, now = manifest.to_cbor(), time.time()
        if not self.storage.call_sync(lambda s: s.put_model(name, version, body, data, now)):
            raise exists
        log.info(
            "event=model_published name=%s version=%s bytes=%d key=%s",
            name,
            version,
            len(data),
            manifest.key,
        )
        return manifest

    def file_path(self, name: str, version: str) -> Path:
        """Where the cache keeps a version's file."""
        return self.cache.file_path(name, version)

    def list(self, name: str | None = None) -> list[Published]:
        """The published versions (of ``name``), by name and time of publication."""
        return _published(self.storage.call_sync(lambda s: s.models(name)))

    async def _cached(self, name: str, version: str) -> SignedManifest:
        """The version's manifest, once its file is in the cache as the storage has it (the
        module docstring); ModelRequestError 4.04 when it is not published."""
        ready = self._ready.get((name, version))
        if ready is not None:
            return ready
        async with self._filling:  # one fill at a time; a second request finds it done
            ready = self._ready.get((name, version))
            if ready is not None:
                return ready
            stored = await self.storage.call(lambda s: s.model(name, version))
            manifest = _manifest(stored)
            if stored is None or manifest is None:
                raise ModelRequestError(Code.NOT_FOUND, "no such model version")
            cached = self.cache.model(name, version)
            if (
                cached is None
                or cached.manifest != stored.manifest
                or not self.file_path(name, version).is_file()
            ):
                data = await self.storage.call(lambda s: s.model_file(name, version))
                if data is None:
                    raise ModelRequestError(Code.NOT_FOUND, "no such model version")
                if len(data) != manifest.size or hashlib.sha256(data).hexdigest() != (
                    manifest.sha256
                ):
                    log.error(
                        "event=stored_model_corrupt name=%s version=%s bytes=%d action=refused",
                        name,
                        version,
                        len(data),
                    )
                    raise ModelRequestError(
                        Code.SERVICE_UNAVAILABLE, "the stored model does not match its manifest"
                    )
                await asyncio.get_running_loop().run_in_executor(
                    None, self.cache.install, name, version, stored.manifest, data
                )
                log.info("event=model_cached name=%s version=%s bytes=%d", name, version, len(data))
            self._ready[(name, version)] = manifest
            return manifest

    # -- CoAP ------------------------------------------------------------------------------------

    async def render(self, request: Message, path: tuple[str, ...]) -> Message:
        """Answer a GET under ``/models``; raises ModelRequestError."""
        accept = request.opt.accept
        match path:
            case ("models", name):
                self._accept(accept, CF_CBOR)
                self._check(name, "name")
                found = await self.storage.call(lambda s: s.models(name))
                items = [p.to_dict() for p in _published(found)]
                if not items:
                    raise ModelRequestError(Code.NOT_FOUND, "no such model")
                payload = cbor2.dumps(items, canonical=True)
                return Message(code=Code.CONTENT, payload=payload, content_format=CF_CBOR)
            case ("models", name, version, "manifest"):
                self._accept(accept, CF_CBOR)
                self._check(name, "name")
                self._check(version, "version")
                stored = await self.storage.call(lambda s: s.model(name, version))
                if stored is None:
                    raise ModelRequestError(Code.NOT_FOUND, "no such model version")
                return Message(code=Code.CONTENT, payload=stored.manifest, content_format=CF_CBOR)
            case ("models", name, version, "file"):
                self._accept(accept, CF_OCTET_STREAM)
                self._check(name, "name")
                self._check(version, "version")
                manifest = await self._cached(name, version)
                try:
                    return self._block(request, name, version, manifest)
                except FileNotFoundError:  # the cached copy went away: fetch it again
                    self._ready.pop((name, version), None)
                    manifest = await self._cached(name, version)
                    return self._block(request, name, version, manifest)
        raise ModelRequestError(Code.NOT_FOUND, "no such resource")

    @staticmethod
    def _accept(accept: Any, wanted: int) -> None:
        if accept is not None and int(accept) != wanted:
            raise ModelRequestError(Code.NOT_ACCEPTABLE, f"this resource is served as {wanted}")

    @staticmethod
    def _check(value: str, what: str) -> None:
        try:
            check_name(what, value)
        except ModelError:
            raise ModelRequestError(Code.NOT_FOUND, f"no such model {what}") from None

    def _block(
        self, request: Message, name: str, version: str, manifest: SignedManifest
    ) -> Message:
        return block_response(request, self.file_path(name, version), manifest.sha256)


def block_response(request: Message, path: Path, sha256: str) -> Message:
    """One Block2 block of the file ``path`` (by the request's block number; RFC 7959), with
    Size2 and an ETag of the first 8 bytes of ``sha256``. FileNotFoundError when it is gone."""
    block2 = request.opt.block2
    szx = MAX_SZX if block2 is None else min(block2.size_exponent, MAX_SZX)
    num = 0 if block2 is None else block2.block_number
    if block2 is not None and block2.size_exponent > MAX_SZX:
        # RFC 7959 section 2.4: answer with a smaller block that starts at the same place.
        num *= 2 ** (block2.size_exponent - MAX_SZX)
    size = 2 ** (szx + 4)
    with open(path, "rb") as f:
        total = os.fstat(f.fileno()).st_size
        offset = num * size
        if offset > total or (offset == total and total > 0):
            raise ModelRequestError(Code.BAD_REQUEST, f"block {num} is past the end")
        f.seek(offset)
        payload = f.read(size)
    more = offset + len(payload) < total
    response = Message(code=Code.CONTENT, payload=payload, content_format=CF_OCTET_STREAM)
    if block2 is not None or more:
        response.opt.block2 = BlockOption.BlockwiseTuple(num, more, szx)
    response.opt.size2 = total
    response.opt.etag = bytes.fromhex(sha256)[:8]
    return response


def _manifest(stored: ModelVersion | None) -> SignedManifest | None:
    """The signed manifest of a stored version; None when there is none or it does not read."""
    if stored is None:
        return None
    try:
        return SignedManifest.from_cbor(stored.manifest)
    except (ModelError, ValueError) as err:
        log.warning(
            "event=manifest_unreadable name=%s version=%s error=%s",
            stored.name,
            stored.version,
            err,
        )
        return None


def _published(found: list[ModelVersion]) -> list[Published]:
    out = []
    for stored in found:
        m = _manifest(stored)
        if m is not None:
            out.append(Published(m.name, m.version, m.size, m.sha256, m.key, stored.published))
    out.sort(key=lambda p: (p.name, p.published))
    return out


def published_json(items: list[Published]) -> str:
    return json.dumps([p.to_dict() for p in items], indent=2)
