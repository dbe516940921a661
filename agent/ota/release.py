"""Signed agent releases: the offline wheel bundle of tools/flash as one file, and its manifest.

A release file is an uncompressed POSIX tar of the bundle directory (``bundle.json`` and the
wheels it lists, plain names only, sorted, mtime 0, owner 0: the same bundle gives the same
bytes). Its manifest is signed with Ed25519 like a model's (agent/modelstore/signing.py: the same
key formats) but with a key of its own role, the release key, and its own context string, so a
model signature can never pass for a release one. The signature covers the canonical CBOR of
``["edge-agent release v1", version, size, sha256 (32 bytes), bundle]`` where ``bundle`` is the
bundle's ``bundle.json`` (arch, python, project wheel, pip wheel, files -> SHA-256).

On the device, the root helper first copies the staged file out of the agent's data directory
into a file of its own (:func:`take`: opened without following a link, a regular file, hashed as
it is copied, never more than the signed size read), so the agent can neither swap nor rewrite
what is unpacked after it was checked. :func:`unpack` opens that copy once, checks its size and
SHA-256 on that descriptor and reads the tar from the same one. Before it writes anything it
checks every name of the signed listing (a plain file name: no path, no ``..``) and every member
of the file (a regular file named in the listing, once, not sparse, no larger than the signed
file); then it writes each into the fresh directory without following links, in bounded chunks,
and checks every wheel against its signed SHA-256. On any refusal the directory it made is
removed.

A bundle may carry ``rollback_index`` (an integer set at publishing, signed with the rest):
a device refuses a release whose index is below that of a release it has confirmed
(agent/ota/floor.py), so a known-vulnerable version cannot be assigned again.

A manifest is read as hostile input: decoded strictly (agent/wire/records.py :func:`loads`: no
tags, so no shared or cyclic values), its bundle walked for plain values, and any failure of the
decoding or of the signature check, whatever its kind, is a :class:`ReleaseError` (a refusal).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import re
import shutil
import tarfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import cbor2
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from agent.errors import ModelError
from agent.files import read_json
from agent.modelstore.signing import (
    MAX_MANIFEST_BYTES,
    MAX_ROLLBACK_INDEX,
    check_name,
    digest_and_size,
    key_id,
)
from agent.ota import bootcheck
from agent.wire.records import loads as strict_loads

SIGNATURE_CONTEXT = "edge-agent release v1"
BUNDLE_JSON = "bundle.json"
_MEMBER_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,200}\Z")
_PLAIN_SCALARS = (str, int, float, bool, bytes, type(None))
CHUNK = 1 << 20  # bytes read and written at a time: hashing, copying, extracting


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

    @property
    def rollback_index(self) -> int:
        """The signed ``rollback_index`` of the bundle (0 when absent): a device that confirmed
        a release of index N takes no release below N again (agent/ota/floor.py)."""
        value = self.bundle.get("rollback_index", 0)
        return value if type(value) is int and 0 <= value <= MAX_ROLLBACK_INDEX else 0

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
        cls,
        version: str,
        file: Path,
        bundle: Mapping[str, Any],
        key: Ed25519PrivateKey,
        rollback_index: int = 0,
    ) -> ReleaseManifest:
        check_name("version", version)
        if type(rollback_index) is not int or not 0 <= rollback_index <= MAX_ROLLBACK_INDEX:
            raise ReleaseError(f"rollback index must be an integer 0..{MAX_ROLLBACK_INDEX}")
        bundle = dict(bundle)
        bundle.pop("rollback_index", None)
        if rollback_index:  # absent when 0: such a manifest reads as before
            bundle["rollback_index"] = rollback_index
        size, sha = file.stat().st_size, _sha256(file)
        unsigned = cls(version, size, sha, dict(bundle))
        return cls(
            version, size, sha, dict(bundle), key.sign(unsigned.signed_bytes()),
            key_id(key.public_key()),
        )  # fmt: skip

    def verify(self, key: Ed25519PublicKey) -> None:
        """ReleaseError unless the signature verifies with the release public key ``key``."""
        try:
            signed = self.signed_bytes()
        except Exception as err:  # a hostile bundle (a value cbor2 cannot encode): refused
            raise ReleaseError(
                f"release {self.version}: the manifest cannot be encoded for its signature "
                f"check ({type(err).__name__}: {str(err)[:200]}); refused"
            ) from err
        try:
            key.verify(self.signature, signed)
        except Exception:  # InvalidSignature, or a signature of the wrong type or length
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
            d = strict_loads(data)
            sha, size = digest_and_size(d)
            bundle = d["bundle"]
            if not isinstance(bundle, dict) or not isinstance(bundle.get("files"), dict):
                raise ValueError("bundle is not a bundle description")
            _check_plain(bundle)
            index = bundle.get("rollback_index", 0)
            if type(index) is not int or not 0 <= index <= MAX_ROLLBACK_INDEX:
                raise ValueError(f"rollback_index is not an integer 0..{MAX_ROLLBACK_INDEX}")
            if not isinstance(d["signature"], bytes):
                raise ValueError("signature is not bytes")
            return cls(
                check_name("version", d["version"]), size, sha, bundle, d["signature"],
                str(d.get("key", "")),
            )  # fmt: skip
        except Exception as err:  # hostile bytes make a decoder raise many kinds: all refusals
            raise ReleaseError(f"{label}: malformed release manifest ({str(err)[:300]})") from err


def _check_plain(value: Any) -> None:
    """ValueError unless ``value`` is a tree of plain values (text, numbers, booleans, null,
    bytes, arrays, maps): no other type, and no container reached twice (a shared or cyclic
    value, which the signature's encoding could not write). Iterative."""
    todo, seen = [value], set()
    while todo:
        item = todo.pop()
        if isinstance(item, (dict, list)):
            if id(item) in seen:
                raise ValueError("the bundle holds a shared or cyclic value")
            seen.add(id(item))
            todo.extend([*item.keys(), *item.values()] if isinstance(item, dict) else item)
        elif not isinstance(item, _PLAIN_SCALARS):
            raise ValueError(f"the bundle holds a {type(item).__name__}")


def _plain(bundle: Mapping[str, Any]) -> dict[str, Any]:
    return {k: dict(v) if isinstance(v, Mapping) else v for k, v in bundle.items()}


def _checked_copy(
    manifest: ReleaseManifest, src: BinaryIO, label: str, out: BinaryIO | None = None
) -> None:
    """Read ``src`` (at most the signed size and one byte more) into the SHA-256 and into
    ``out``; ReleaseError unless it is the file the (verified) manifest signs."""
    size = os.fstat(src.fileno()).st_size
    digest, have = hashlib.sha256(), 0
    if size == manifest.size:
        while have <= manifest.size:
            block = src.read(min(CHUNK, manifest.size + 1 - have))
            if not block:
                break
            digest.update(block)
            have += len(block)
            if out is not None:
                out.write(block)
    if size != manifest.size or have != manifest.size or digest.hexdigest() != manifest.sha256:
        raise ReleaseError(
            f"release {manifest.version}: {label} ({size} bytes) is not the signed file "
            f"({manifest.size} bytes, SHA-256 {manifest.sha256[:16]}...); refused"
        )


def _open(path: Path) -> BinaryIO:
    """``path`` for reading: a regular file, not through a link, without blocking."""
    return os.fdopen(bootcheck.open_regular(path, one_name=False), "rb")


def check_file(manifest: ReleaseManifest, file: Path) -> None:
    """ReleaseError unless ``file`` is the one the (verified) manifest signs."""
    with _open(file) as src:
        _checked_copy(manifest, src, str(file))


def take(manifest: ReleaseManifest, data_dir: Path, relative: str, dest: Path) -> os.stat_result:
    """Copy the staged release file ``data_dir/relative`` (the agent's) into ``dest`` (root's,
    made here, mode 0600), checked against the (verified) manifest as it is copied: what the
    root helper unpacks is then its own copy, which the agent can neither swap for another file
    nor rewrite after the check. ReleaseError (``dest`` removed) when it is not the signed file;
    OSError when it cannot be read as one (bootcheck.open_data: a link, a FIFO, ...), and
    FileNotFoundError (``dest`` untouched) when there is none. ``dest`` is fsynced (its
    directory is the caller's). The status of the file copied (its mode goes with the copy
    when it is given back: updater.py)."""
    label = str(data_dir / relative)
    with os.fdopen(bootcheck.open_data(data_dir, relative), "rb") as src:
        copied = os.fstat(src.fileno())
        with contextlib.suppress(FileNotFoundError):
            dest.unlink()  # a leftover of a power cut
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            with os.fdopen(os.open(dest, flags, 0o600), "wb") as out:
                _checked_copy(manifest, src, label, out)
                out.flush()
                os.fsync(out.fileno())  # the install may go on from it after a power cut
        except BaseException:
            with contextlib.suppress(OSError):
                dest.unlink()
            raise
    return copied


def check_listing(manifest: ReleaseManifest) -> dict[str, str]:
    """The signed listing (file name -> SHA-256), every name a plain file name (no path, no
    ``..``, not ``bundle.json``) and the project and pip wheels among them; ReleaseError else."""
    files = manifest.bundle.get("files")
    if not isinstance(files, Mapping):
        raise ReleaseError(f"release {manifest.version}: the bundle has no file listing; refused")
    for name, digest in files.items():
        if not isinstance(name, str) or not _MEMBER_RE.match(name) or name == BUNDLE_JSON:
            raise ReleaseError(
                f"release {manifest.version}: bad file name {str(name)[:100]!r} in the signed "
                "listing; refused"
            )
        if not isinstance(digest, str):
            raise ReleaseError(f"release {manifest.version}: {name}: no SHA-256; refused")
    for role in ("project", "pip"):
        wheel = manifest.bundle.get(role)
        if not isinstance(wheel, str) or wheel not in files:
            raise ReleaseError(
                f"release {manifest.version}: its {role} wheel is not in the signed listing; "
                "refused"
            )
    return dict(files)


def _members(
    manifest: ReleaseManifest, tar: tarfile.TarFile, allowed: set[str]
) -> list[tarfile.TarInfo]:
    """Every member, each a regular file named in the signed listing, once, not sparse (a
    sparse member expands to more than the file holds), and all together no larger than the
    signed file (the listing has no sizes); ReleaseError else. Nothing is written yet."""
    members: list[tarfile.TarInfo] = []
    seen: set[str] = set()
    total = 0
    while (member := tar.next()) is not None:
        if not member.isfile() or member.name not in allowed:
            raise ReleaseError(
                f"release {manifest.version}: unexpected member {member.name[:200]!r}; refused"
            )
        if member.name in seen:
            raise ReleaseError(f"release {manifest.version}: a member appears twice; refused")
        if member.issparse():
            raise ReleaseError(
                f"release {manifest.version}: member {member.name!r} is a sparse file; refused"
            )
        total += member.size
        if total > manifest.size:
            raise ReleaseError(
                f"release {manifest.version}: member {member.name!r} holds more than the "
                f"signed file ({manifest.size} bytes); refused"
            )
        seen.add(member.name)
        members.append(member)
    return members


def unpack(manifest: ReleaseManifest, file: Path, dest: Path) -> None:
    """Extract the release file into ``dest`` (made here; it must not exist): the signed files
    and nothing else. The file is opened once (never through a link) and checked against the
    manifest on that descriptor, which the tar is then read from; every name and member is
    checked before anything is written; ``dest`` is removed again on any refusal."""
    with _open(file) as src:
        _checked_copy(manifest, src, str(file))
        files = check_listing(manifest)
        src.seek(0)
        try:
            with tarfile.open(fileobj=src, mode="r:") as tar:
                members = _members(manifest, tar, {BUNDLE_JSON, *files})
                dest.mkdir(parents=True)
                try:
                    _extract(manifest, tar, members, dest, files)
                except BaseException:
                    shutil.rmtree(dest, ignore_errors=True)
                    raise
        except tarfile.TarError as err:
            raise ReleaseError(f"release {manifest.version}: not a release file ({err})") from err


def _extract(
    manifest: ReleaseManifest,
    tar: tarfile.TarFile,
    members: list[tarfile.TarInfo],
    dest: Path,
    files: dict[str, str],
) -> None:
    top = dest.resolve()
    for member in members:
        path = top / member.name
        if path.parent != top:  # names are plain (checked above): never outside dest
            raise ReleaseError(f"release {manifest.version}: {member.name!r}; refused")
        src = tar.extractfile(member)
        assert src is not None
        # O_EXCL|O_NOFOLLOW: a name is written once, never through a link
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        with os.fdopen(os.open(path, flags, 0o644), "wb") as out:
            shutil.copyfileobj(src, out, CHUNK)
    got = read_bundle(dest)
    if got["files"] != files:
        raise ReleaseError(f"release {manifest.version}: the bundle differs from the signed one")
