"""Signed model manifests: Ed25519 keys, model names, the canonical CBOR the signature covers.

Shared by the device (which verifies) and the endpoint's registry (which signs and serves).

The signed manifest (docs/protocol.md, "Models"): the Ed25519 signature covers the canonical CBOR
encoding (RFC 7049 section 3.9: shortest forms, map keys sorted length-first, as
``cbor2.dumps(..., canonical=True)``) of the array
``["edge-agent model v1", name, version, size, sha256 (32 bytes), entry]`` where ``entry`` is the
model's manifest entry (kind, tensors, features, threshold, classes...).
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cbor2
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from agent.detect.inference import ModelEntry
from agent.errors import ModelError
from agent.files import write_atomic
from agent.wire.records import loads as strict_loads

SIGNATURE_CONTEXT = "edge-agent model v1"
CF_OCTET_STREAM = 42  # the Content-Format of a model file resource
MAX_MANIFEST_BYTES = 64 * 1024
CBOR_INT_RANGE = (-(2**64), 2**64 - 1)  # the integers CBOR holds without a bignum tag
#: A signed entry's (or release bundle's) ``rollback_index`` is an integer 0..this
#: (agent/modelstore/floors.py).
MAX_ROLLBACK_INDEX = 2**31 - 1
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}\Z")
#: The largest key file read (a PEM key is some hundred bytes): a path to anything else (a
#: bundle, a log, /dev/zero) is refused, not read whole into memory
MAX_KEY_BYTES = 16 << 10


# -- keys -----------------------------------------------------------------------------------------


def _load_key(
    path: str | Path,
    kind: str,
    what: str,
    from_pem: Callable[[bytes], Any],
    key_type: type,
    from_raw: Callable[[bytes], Any],
    forms: str = "",
) -> Any:
    """A key of ``kind`` ("public"/"private") from a PEM file, 32 raw bytes or 64 hex digits."""
    p = Path(path)
    try:
        with open(p, "rb") as f:
            data = f.read(MAX_KEY_BYTES + 1)
    except OSError as err:
        raise ModelError(f"{p}: cannot read the {what} ({err})") from err
    if len(data) > MAX_KEY_BYTES:
        raise ModelError(f"{p}: larger than a key can be ({MAX_KEY_BYTES} bytes): not the {what}")
    try:
        if data.lstrip().startswith(b"-----BEGIN"):
            key = from_pem(data)
            if not isinstance(key, key_type):
                raise ModelError(f"{p}: not an Ed25519 {kind} key")
            return key
        text = data.strip()
        raw = bytes.fromhex(text.decode("ascii")) if len(text) == 64 else data
        return from_raw(raw)
    except (ValueError, TypeError, UnicodeDecodeError) as err:
        raise ModelError(f"{p}: not an Ed25519 {kind} key{forms}: {err}") from err


def load_public_key(path: str | Path) -> Ed25519PublicKey:
    """An Ed25519 public key from a PEM file, 32 raw bytes or 64 hex digits. Raises ModelError."""
    key: Ed25519PublicKey = _load_key(
        path,
        "public",
        "public key",
        serialization.load_pem_public_key,
        Ed25519PublicKey,
        Ed25519PublicKey.from_public_bytes,
        " (PEM, 32 bytes or 64 hex digits)",
    )
    return key


def load_private_key(path: str | Path) -> Ed25519PrivateKey:
    """An Ed25519 private key from a PEM (PKCS#8) file, 32 raw bytes or 64 hex digits."""
    key: Ed25519PrivateKey = _load_key(
        path,
        "private",
        "signing key",
        lambda data: serialization.load_pem_private_key(data, password=None),
        Ed25519PrivateKey,
        Ed25519PrivateKey.from_private_bytes,
    )
    return key


def public_bytes(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def key_id(key: Ed25519PublicKey) -> str:
    """A short name of a public key: the first 8 bytes of SHA-256 of its raw form, in hex."""
    return hashlib.sha256(public_bytes(key)).hexdigest()[:16]


def write_keypair(path: str | Path) -> tuple[Path, Path]:
    """A new Ed25519 key pair: ``path`` (private, PKCS#8 PEM, mode 0600) and ``path.pub``."""
    p = Path(path)
    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    p.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(private)
    pub = p.with_name(p.name + ".pub")
    write_atomic(pub, public)
    return p, pub


# -- names and manifests --------------------------------------------------------------------------


def check_name(what: str, value: str) -> str:
    if not isinstance(value, str) or not NAME_RE.match(value):
        raise ModelError(
            f"model {what} {value!r}: use 1-64 letters, digits, '_', '.', '+', '-' "
            "(starting with a letter or digit)"
        )
    return value


def digest_and_size(d: Any) -> tuple[str, int]:
    """The ``sha256`` (64 hex digits, lower case) and ``size`` of a decoded manifest map;
    ValueError or KeyError when they are not that."""
    if not isinstance(d, dict):
        raise ValueError("not a map")
    sha = str(d["sha256"]).lower()
    if not re.fullmatch(r"[0-9a-f]{64}", sha):
        raise ValueError("sha256 is not 64 hex digits")
    size = d["size"]
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise ValueError("size is not a byte count")
    return sha, size


_PLAIN_SCALARS = (str, bytes, int, float, bool, type(None))


def check_plain(item: Any) -> None:
    """ValueError unless ``item`` is plain CBOR data as a manifest holds it: text, bytes,
    integers CBOR holds without a bignum tag, floats, booleans, null, and arrays and maps of
    them (map keys text, bytes or integers), each array or map appearing once. Value sharing
    (tags 28/29) can make a decoded structure cyclic, and other tags decode to objects (dates,
    decimals, sets...) that the canonical encoding the signature covers would not give back."""
    seen: set[int] = set()
    stack = [item]
    while stack:
        value = stack.pop()
        kind = type(value)
        if kind in (list, dict):
            if id(value) in seen:
                raise ValueError("a shared or cyclic value (CBOR tags 28/29)")
            seen.add(id(value))
            if kind is dict:
                for key in value:
                    if type(key) not in (str, bytes, int):
                        raise ValueError(f"a map key of type {type(key).__name__}")
                    stack.append(key)
                stack.extend(value.values())
            else:
                stack.extend(value)
        elif kind not in _PLAIN_SCALARS:
            raise ValueError(f"a value of type {kind.__name__} (a CBOR tag)")
        elif kind is int and not CBOR_INT_RANGE[0] <= value <= CBOR_INT_RANGE[1]:
            raise ValueError("an integer beyond 64 bits (a CBOR bignum)")


@dataclass(frozen=True)
class SignedManifest:
    """One model version as the registry publishes it; see the module docstring."""

    name: str
    version: str
    size: int
    sha256: str  # 64 lower-case hex digits
    entry: Mapping[str, Any]
    signature: bytes = b""
    key: str = ""  # key_id of the signing key (informational; not signed)

    def signed_bytes(self) -> bytes:
        """The canonical encoding the signature covers."""
        return cbor2.dumps(
            [
                SIGNATURE_CONTEXT,
                self.name,
                self.version,
                self.size,
                bytes.fromhex(self.sha256),
                dict(self.entry),
            ],
            canonical=True,
        )

    @classmethod
    def sign(
        cls,
        name: str,
        version: str,
        data: bytes,
        entry: Mapping[str, Any],
        key: Ed25519PrivateKey,
    ) -> SignedManifest:
        """Sign ``data`` as ``name`` ``version``; the entry's file/size/sha256/version follow
        the data."""
        sha = hashlib.sha256(data).hexdigest()
        full = dict(entry)
        full.update(
            name=name,
            version=version,
            file=f"{name}@{version}.tflite",
            size=len(data),
            sha256=sha,
        )
        check_name("name", name)
        check_name("version", version)
        unsigned = cls(name, version, len(data), sha, full)
        signature = key.sign(unsigned.signed_bytes())
        return cls(name, version, len(data), sha, full, signature, key_id(key.public_key()))

    def verify(self, key: Ed25519PublicKey, label: str = "") -> None:
        """ModelError unless the signature verifies with ``key`` and the entry agrees."""
        where = label or f"model {self.name} {self.version}"
        try:
            key.verify(self.signature, self.signed_bytes())
        except InvalidSignature:
            raise ModelError(
                f"{where}: the signature does not verify with the provisioned public key "
                f"(key {key_id(key)}; manifest says {self.key or 'unknown'}); refused"
            ) from None
        except Exception as err:  # a manifest no decoder check caught: refused all the same
            raise ModelError(f"{where}: malformed model manifest ({err!r}); refused") from err
        size, sha = self.entry.get("size"), self.entry.get("sha256")
        if (
            type(size) is not int
            or size != self.size
            or not isinstance(sha, str)
            or (sha.lower() != self.sha256)
        ):
            raise ModelError(f"{where}: the manifest entry disagrees with its size or SHA-256")

    def model_entry(self) -> ModelEntry:
        label = f"model {self.name} {self.version}"
        try:
            return ModelEntry.from_dict(self.entry, label=label)
        except ModelError:
            raise
        except Exception as err:  # e.g. an infinite size: int() raises OverflowError
            raise ModelError(f"{label}: malformed model entry ({err!r})") from err

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "size": self.size,
            "sha256": self.sha256,
            "entry": dict(self.entry),
            "signature": self.signature,
            "key": self.key,
        }

    def to_cbor(self) -> bytes:
        return cbor2.dumps(self.to_dict(), canonical=True)

    @classmethod
    def read(cls, path: Path) -> SignedManifest:
        """The manifest stored in the file ``path`` (at most :data:`MAX_MANIFEST_BYTES` are
        read). Raises OSError or ModelError."""
        with open(path, "rb") as f:
            data = f.read(MAX_MANIFEST_BYTES + 1)
        if len(data) > MAX_MANIFEST_BYTES:
            raise ModelError(f"{path}: manifest larger than {MAX_MANIFEST_BYTES} bytes")
        return cls.from_cbor(data, label=str(path))

    @classmethod
    def from_cbor(cls, data: bytes, label: str = "manifest") -> SignedManifest:
        """Decode strictly (one item, no duplicate keys, bounded nesting, plain data only:
        :func:`check_plain`). Every problem is a ModelError."""
        try:
            d = strict_loads(data)
            check_plain(d)
            sha, size = digest_and_size(d)
            entry = d["entry"]
            if not isinstance(entry, dict):
                raise ValueError("entry is not a map")
            signature = d["signature"]
            if not isinstance(signature, bytes):
                raise ValueError("signature is not bytes")
            return cls(
                check_name("name", d["name"]),
                check_name("version", d["version"]),
                size,
                sha,
                entry,
                signature,
                str(d.get("key", "")),
            )
        except ModelError:
            raise
        except Exception as err:  # hostile bytes make decoders raise many kinds
            raise ModelError(f"{label}: malformed model manifest ({err})") from err
