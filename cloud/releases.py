"""The endpoint's agent releases: signed offline wheel bundles, served block-wise like models.

``edge-agent-cloud releases publish BUNDLE --version V`` packs the bundle tools/flash builds
(agent/ota/release.py: one tar of ``bundle.json`` and the wheels), signs its manifest with the
release key (a role of its own: ``DATA/releases/release.key``, never the model key) and stores::

    DATA/releases/V/release.tar     the release file
    DATA/releases/V/manifest.cbor   the signed manifest

written into a temporary directory, fsynced and renamed, so a reader sees a version whole or not
at all; a published version is immutable. Every endpoint on the same ``--data`` serves it.

Resources (docs/ota.md), all GET, for any authenticated principal:

    /releases                      CBOR array of {version, size, sha256, key, published}
    /releases/V/manifest           the signed manifest (CBOR)
    /releases/V/file               the release file (Content-Format 42), Block2 by number, with
                                   Size2 and an ETag (first 8 bytes of its SHA-256): stateless,
                                   so a device resumes from its last whole block

Logging: info for a release published.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import cbor2
from aiocoap import Message
from aiocoap.numbers.codes import Code
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.errors import ModelError
from agent.files import fsync_dir
from agent.modelstore.signing import CF_OCTET_STREAM, check_name
from agent.ota.release import ReleaseError, ReleaseManifest, pack
from agent.wire.batch import CF_CBOR
from cloud.models import ModelRequestError, block_response
from cloud.protocol import _Failure

log = logging.getLogger(__name__)

RELEASES_DIR = "releases"
KEY_FILE = "release.key"
RELEASE_FILE = "release.tar"
MANIFEST_FILE = "manifest.cbor"


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


class ReleaseRegistry:
    """The published releases under ``directory`` (``DATA/releases``)."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)

    def version_dir(self, version: str) -> Path:
        return self.directory / check_name("version", version)

    def publish(self, bundle: Path, version: str, key: Ed25519PrivateKey) -> ReleaseManifest:
        """Pack, sign and store the bundle in ``bundle`` as ``version``. Raises ReleaseError."""
        target = self.version_dir(version)
        if target.exists():
            raise ReleaseError(
                f"release {version} is already published; releases are immutable, "
                "publish a new version"
            )
        self.directory.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{version}.", dir=self.directory))
        try:
            meta = pack(bundle, tmp / RELEASE_FILE)
            manifest = ReleaseManifest.sign(version, tmp / RELEASE_FILE, meta, key)
            (tmp / MANIFEST_FILE).write_bytes(manifest.to_cbor())
            for name in (RELEASE_FILE, MANIFEST_FILE):
                fd = os.open(tmp / name, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            os.chmod(tmp, 0o755)
            fsync_dir(tmp)
            try:
                os.rename(tmp, target)
            except OSError as err:
                raise ReleaseError(f"release {version}: cannot store it ({err})") from err
            fsync_dir(self.directory)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        log.info(
            "event=release_published version=%s bytes=%d key=%s",
            version,
            manifest.size,
            manifest.key,
        )
        return manifest

    def manifest(self, version: str) -> ReleaseManifest | None:
        try:
            data = (self.version_dir(version) / MANIFEST_FILE).read_bytes()
        except (OSError, ModelError):
            return None
        try:
            return ReleaseManifest.from_cbor(data)
        except ReleaseError as err:
            log.warning("event=release_manifest_unreadable version=%s error=%s", version, err)
            return None

    def list(self) -> list[PublishedRelease]:
        out = []
        if not self.directory.is_dir():
            return out
        for vdir in self.directory.iterdir():
            if vdir.name.startswith(".") or not vdir.is_dir():
                continue
            m = self.manifest(vdir.name)
            if m is None:
                continue
            published = (vdir / MANIFEST_FILE).stat().st_mtime
            arch, python = str(m.bundle.get("arch", "")), str(m.bundle.get("python", ""))
            item = PublishedRelease(m.version, m.size, m.sha256, m.key, published, arch, python)
            out.append(item)
        out.sort(key=lambda p: p.published)
        return out

    async def render(self, request: Message, path: tuple[str, ...]) -> Message:
        """Answer a GET under ``/releases``; raises ModelRequestError."""
        match path:
            case ("releases",):
                items = [p.to_dict() for p in self.list()]
                payload = cbor2.dumps(items, canonical=True)
                return Message(code=Code.CONTENT, payload=payload, content_format=CF_CBOR)
            case ("releases", version, "manifest"):
                m = self._found(version)
                payload = (self.version_dir(version) / MANIFEST_FILE).read_bytes()
                del m
                return Message(code=Code.CONTENT, payload=payload, content_format=CF_CBOR)
            case ("releases", version, "file"):
                m = self._found(version)
                accept = request.opt.accept
                if accept is not None and int(accept) != CF_OCTET_STREAM:
                    raise ModelRequestError(Code.NOT_ACCEPTABLE, "served as 42")
                try:
                    return block_response(
                        request, self.version_dir(version) / RELEASE_FILE, m.sha256
                    )
                except FileNotFoundError:
                    raise ModelRequestError(Code.NOT_FOUND, "no such release") from None
        raise ModelRequestError(Code.NOT_FOUND, "no such resource")

    def _found(self, version: str) -> ReleaseManifest:
        try:
            check_name("version", version)
        except ModelError:
            raise ModelRequestError(Code.NOT_FOUND, "no such release") from None
        m = self.manifest(version)
        if m is None:
            raise ModelRequestError(Code.NOT_FOUND, "no such release")
        return m


class ReleaseRoutes:
    """The ``/releases`` handler of :class:`cloud.server.CloudServer` (a mixin)."""

    data_dir: Path | None

    async def _releases_get(self, request: Message, route: Any) -> Message:
        if self.data_dir is None:
            raise _Failure(Code.NOT_FOUND, "no release registry")
        registry = ReleaseRegistry(self.data_dir / RELEASES_DIR)
        try:
            return await registry.render(request, tuple(request.opt.uri_path))
        except ModelRequestError as err:
            raise _Failure(err.code, err.message) from None
