"""The endpoint's model registry: signed, versioned model files and their CoAP resources.

Layout under ``DATA/models`` (one directory per published version, never changed afterwards)::

    NAME/VERSION/model.tflite      the model file
    NAME/VERSION/manifest.cbor     the signed manifest (agent.modelstore.signing.SignedManifest)

:meth:`ModelRegistry.publish` writes both into a temporary directory, fsyncs them and renames the
directory into place, so a server running on the same directory sees a version either complete
or not at all. A published version is immutable: publishing it again is refused (give it a new
version).

Resources (docs/protocol.md, "Models"), all GET:

    /models/NAME                      CBOR array of {name, version, size, sha256, key,
                                      published}: the published versions of NAME
    /models/NAME/VERSION/manifest     the signed manifest (CBOR; block-wise when large)
    /models/NAME/VERSION/file         the file (Content-Format 42), Block2 by number (RFC 7959)

The file resource is stateless: any block can be asked for at any time by its Block2 number, so a
device resumes an interrupted download from its last whole block, also after the endpoint
restarted. Every block carries Size2 (the file's size) and an ETag (the first 8 bytes of the
file's SHA-256), so a device notices a file that is not the one its manifest names.

Logging: info for a version published; requests are logged by the server.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import cbor2
from aiocoap import Message
from aiocoap.numbers.codes import Code
from aiocoap.optiontypes import BlockOption
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.detect.inference import TFLITE_IDENTIFIER, load_manifest
from agent.errors import ModelError
from agent.files import fsync_dir
from agent.modelstore.signing import CF_OCTET_STREAM, SignedManifest, check_name
from agent.wire.batch import CF_CBOR

log = logging.getLogger(__name__)

MAX_SZX = 6  # blocks of at most 1024 bytes
MODEL_FILE = "model.tflite"
MANIFEST_FILE = "manifest.cbor"


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
    """The published model versions in one directory."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)

    def _dir(self, name: str, version: str) -> Path:
        return self.directory / check_name("name", name) / check_name("version", version)

    def publish(
        self,
        data: bytes,
        name: str,
        version: str,
        entry: Mapping[str, Any],
        key: Ed25519PrivateKey,
    ) -> SignedManifest:
        """Sign and store one version. Raises ModelError (exists, not a model, bad entry)."""
        target = self._dir(name, version)
        if target.exists():
            raise ModelError(
                f"model {name} {version} is already published; versions are immutable, "
                "publish a new version"
            )
        if len(data) < 8 or data[4:8] != TFLITE_IDENTIFIER:
            raise ModelError(f"model {name} {version}: not a TFLite file")
        manifest = SignedManifest.sign(name, version, data, entry, key)
        manifest.model_entry()  # the entry must describe a model the device can load
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.parent / f".{version}.{os.getpid()}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        try:
            for fname, content in ((MODEL_FILE, data), (MANIFEST_FILE, manifest.to_cbor())):
                with open(tmp / fname, "wb") as out:
                    out.write(content)
                    out.flush()
                    os.fsync(out.fileno())
            fsync_dir(tmp)
            os.rename(tmp, target)
        except OSError as err:
            shutil.rmtree(tmp, ignore_errors=True)
            raise ModelError(f"{target}: cannot publish ({err})") from err
        fsync_dir(target.parent)
        log.info(
            "event=model_published name=%s version=%s bytes=%d key=%s",
            name,
            version,
            len(data),
            manifest.key,
        )
        return manifest

    def manifest_bytes(self, name: str, version: str) -> bytes | None:
        try:
            return (self._dir(name, version) / MANIFEST_FILE).read_bytes()
        except (OSError, ModelError):
            return None

    def manifest(self, name: str, version: str) -> SignedManifest | None:
        data = self.manifest_bytes(name, version)
        return None if data is None else SignedManifest.from_cbor(data)

    def file_path(self, name: str, version: str) -> Path:
        return self._dir(name, version) / MODEL_FILE

    def list(self, name: str | None = None) -> list[Published]:
        out = []
        if not self.directory.is_dir():
            return out
        names = [name] if name is not None else sorted(p.name for p in self.directory.iterdir())
        for n in names:
            base = self.directory / n
            if n.startswith(".") or not base.is_dir():
                continue
            for vdir in sorted(base.iterdir()):
                if vdir.name.startswith("."):
                    continue
                with contextlib.suppress(OSError, ModelError):
                    m = SignedManifest.read(vdir / MANIFEST_FILE)
                    published = (vdir / MANIFEST_FILE).stat().st_mtime
                    out.append(Published(m.name, m.version, m.size, m.sha256, m.key, published))
        out.sort(key=lambda p: (p.name, p.published))
        return out

    # -- CoAP ------------------------------------------------------------------------------------

    def render(self, request: Message, path: tuple[str, ...]) -> Message:
        """Answer a GET under ``/models``; raises ModelRequestError."""
        accept = request.opt.accept
        match path:
            case ("models", name):
                self._accept(accept, CF_CBOR)
                self._check(name, "name")
                items = [p.to_dict() for p in self.list(name)]
                if not items:
                    raise ModelRequestError(Code.NOT_FOUND, "no such model")
                payload = cbor2.dumps(items, canonical=True)
                return Message(code=Code.CONTENT, payload=payload, content_format=CF_CBOR)
            case ("models", name, version, "manifest"):
                self._accept(accept, CF_CBOR)
                self._check(name, "name")
                self._check(version, "version")
                data = self.manifest_bytes(name, version)
                if data is None:
                    raise ModelRequestError(Code.NOT_FOUND, "no such model version")
                return Message(code=Code.CONTENT, payload=data, content_format=CF_CBOR)
            case ("models", name, version, "file"):
                self._accept(accept, CF_OCTET_STREAM)
                self._check(name, "name")
                self._check(version, "version")
                return self._block(request, name, version)
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

    def _block(self, request: Message, name: str, version: str) -> Message:
        manifest = self.manifest(name, version)
        path = self.file_path(name, version)
        if manifest is None or not path.is_file():
            raise ModelRequestError(Code.NOT_FOUND, "no such model version")
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
        response.opt.etag = bytes.fromhex(manifest.sha256)[:8]
        return response


def published_json(items: list[Published]) -> str:
    return json.dumps([p.to_dict() for p in items], indent=2)
