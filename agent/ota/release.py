"""Signed agent releases: the offline wheel bundle of tools/flash as one file, and its manifest.

A release file is an uncompressed POSIX tar of the bundle directory (``bundle.json`` and the
wheels it lists, plain names only, sorted, mtime 0, owner 0: the same bundle gives the same
bytes). Its manifest is signed with Ed25519 like a model's (agent/modelstore/signing.py: the same
key formats) but with a key of its own role, the release key, and its own context string, so a
model signature can never pass for a release one. The signature covers the canonical CBOR of
``["edge-agent release v1", version, size, sha256 (32 bytes), bundle]`` where ``bundle`` is the
bundle's ``bundle.json`` (arch, python, project wheel, pip wheel, files -> SHA-256).

On the device, :func:`unpack` takes a downloaded file only after the manifest verified and the
file's SHA-256 matched it; it then refuses any member that is not a plain file named in the
signed listing, and checks every wheel against its signed SHA-256.
"""

from __future__ import annotations

import hashlib
import io
import re
import tarfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cbor2
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from agent.errors import ModelError
from agent.files import read_json
from agent.modelstore.signing import MAX_MANIFEST_BYTES, check_name, digest_and_size, key_id

SIGNATURE_CONTEXT = "edge-agent release v1"
BUNDLE_JSON = "bundle.json"
_MEMBER_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,200}\Z")


class ReleaseError(ModelError):
    """A release that is refused (bad signature, tampered file, malformed bundle)."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_bundle(directory: Path) -> dict[str, Any]:
    """The bundle description of ``directory`` (tools/flash_lib/bundle.py), checked."""
    try:
        meta = read_json(directory / BUNDLE_JSON)
        files = {str(k): str(v) for k, v in meta["files"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise ReleaseError(f"{directory}: not a wheel bundle ({BUNDLE_JSON}: {err})") from err
    for name, digest in files.items():
        if not _MEMBER_RE.match(name):
            raise ReleaseError(f"{directory}: bad file name {name!r} in {BUNDLE_JSON}")
        path = directory / name
        if not path.is_file() or _sha256(path) != digest:
            raise ReleaseError(f"{directory}: {name} is missing or does not match its SHA-256")
    return {
        "arch": str(meta.get("arch", "")),
        "python": str(meta.get("python", "")),
        "project": str(meta.get("project", "")),
        "pip": str(meta.get("pip", "")),
        "files": files,
    }


def pack(directory: Path, out: Path) -> dict[str, Any]:
    """Write the release file of the bundle in ``directory`` to ``out``; its bundle description."""
    bundle = read_bundle(directory)
    names = [BUNDLE_JSON, *sorted(bundle["files"])]
    with tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as tar:
        for name in names:
            data = (directory / name).read_bytes()
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            tar.addfile(info, io.BytesIO(data))
    return bundle


@dataclass(frozen=True)
class ReleaseManifest:
    """One published agent release (module docstring). ``name`` is fixed: the fetcher's path."""

    version: str
    size: int
    sha256: str
    bundle: Mapping[str, Any]
    signature: bytes = b""
    key: str = ""
    name: str = "edge-agent"

    def signed_bytes(self) -> bytes:
        return cbor2.dumps(
            [
                SIGNATURE_CONTEXT,
                self.version,
                self.size,
                bytes.fromhex(self.sha256),
                _plain(self.bundle),
            ],
            canonical=True,
        )

    @classmethod
    def sign(
        cls, version: str, file: Path, bundle: Mapping[str, Any], key: Ed25519PrivateKey
    ) -> ReleaseManifest:
        check_name("version", version)
        size, sha = file.stat().st_size, _sha256(file)
        unsigned = cls(version, size, sha, dict(bundle))
        return cls(
            version, size, sha, dict(bundle), key.sign(unsigned.signed_bytes()),
            key_id(key.public_key()),
        )  # fmt: skip

    def verify(self, key: Ed25519PublicKey) -> None:
        """ReleaseError unless the signature verifies with the release public key ``key``."""
        try:
            key.verify(self.signature, self.signed_bytes())
        except InvalidSignature:
            raise ReleaseError(
                f"release {self.version}: the signature does not verify with the release "
                f"public key (key {key_id(key)}; manifest says {self.key or 'unknown'}); refused"
            ) from None

    def to_cbor(self) -> bytes:
        return cbor2.dumps(
            {
                "version": self.version,
                "size": self.size,
                "sha256": self.sha256,
                "bundle": _plain(self.bundle),
                "signature": self.signature,
                "key": self.key,
            },
            canonical=True,
        )

    @classmethod
    def from_cbor(cls, data: bytes, label: str = "release manifest") -> ReleaseManifest:
        if len(data) > MAX_MANIFEST_BYTES:
            raise ReleaseError(f"{label}: larger than {MAX_MANIFEST_BYTES} bytes")
        try:
            d = cbor2.loads(data)
            sha, size = digest_and_size(d)
            bundle = d["bundle"]
            if not isinstance(bundle, dict) or not isinstance(bundle.get("files"), dict):
                raise ValueError("bundle is not a bundle description")
            if not isinstance(d["signature"], bytes):
                raise ValueError("signature is not bytes")
            return cls(
                check_name("version", d["version"]), size, sha, bundle, d["signature"],
                str(d.get("key", "")),
            )  # fmt: skip
        except (cbor2.CBORDecodeError, KeyError, TypeError, ValueError, ModelError) as err:
            raise ReleaseError(f"{label}: malformed release manifest ({err})") from err


def _plain(bundle: Mapping[str, Any]) -> dict[str, Any]:
    return {k: dict(v) if isinstance(v, Mapping) else v for k, v in bundle.items()}


def check_file(manifest: ReleaseManifest, file: Path) -> None:
    """ReleaseError unless ``file`` is the one the (verified) manifest signs."""
    size = file.stat().st_size
    if size != manifest.size or _sha256(file) != manifest.sha256:
        raise ReleaseError(
            f"release {manifest.version}: {file} ({size} bytes) is not the signed file "
            f"({manifest.size} bytes, SHA-256 {manifest.sha256[:16]}...); refused"
        )


def unpack(manifest: ReleaseManifest, file: Path, dest: Path) -> None:
    """Extract the checked release file into ``dest``: the signed files and nothing else."""
    check_file(manifest, file)
    files: Mapping[str, str] = manifest.bundle["files"]
    allowed = {BUNDLE_JSON, *files}
    dest.mkdir(parents=True, exist_ok=True)
    try:
        with tarfile.open(file, "r:") as tar:
            for member in tar.getmembers():
                if not member.isfile() or member.name not in allowed:
                    raise ReleaseError(
                        f"release {manifest.version}: unexpected member {member.name!r}; refused"
                    )
                src = tar.extractfile(member)
                assert src is not None
                (dest / member.name).write_bytes(src.read())
    except tarfile.TarError as err:
        raise ReleaseError(f"release {manifest.version}: not a release file ({err})") from err
    got = read_bundle(dest)
    if got["files"] != dict(files):
        raise ReleaseError(f"release {manifest.version}: the bundle differs from the signed one")
