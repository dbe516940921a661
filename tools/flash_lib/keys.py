"""The Ed25519 public keys tools/flash installs (the model key, the release key), checked on the
build host before anything is written.

The forms are the ones the agent reads (agent/modelstore/signing.py ``load_public_key``): a PEM
SubjectPublicKeyInfo, 32 raw bytes or 64 hex digits. The check is written here with the standard
library, because tools/flash runs with the system python3, which need not have ``cryptography``;
tests/e2e/test_flash.py checks that it accepts exactly what ``load_public_key`` accepts.
"""

from __future__ import annotations

import base64
import re
from pathlib import Path

from flash_lib.errors import FlashError

ED25519_SPKI = bytes.fromhex("302a300506032b6570032100")  # a PEM public key's DER, before the key
_PEM_BEGIN, _PEM_END = b"-----BEGIN PUBLIC KEY-----", b"-----END PUBLIC KEY-----"


def raw_public_key(data: bytes) -> bytes | None:
    """The 32 bytes of the Ed25519 public key in ``data``, or None if it is not one."""
    text = data.strip()
    if text.startswith(b"-----BEGIN"):
        body, end, _ = text[len(_PEM_BEGIN) :].partition(_PEM_END)
        if not text.startswith(_PEM_BEGIN) or not end:
            return None
        try:
            der = base64.b64decode(b"".join(body.split()), validate=True)
        except ValueError:
            return None
        ok = der.startswith(ED25519_SPKI) and len(der) == len(ED25519_SPKI) + 32
        return der[len(ED25519_SPKI) :] if ok else None
    if len(text) == 64:
        return bytes.fromhex(text.decode()) if re.fullmatch(rb"[0-9A-Fa-f]{64}", text) else None
    return data if len(data) == 32 else None


def read_public_key(path: Path, option: str, keygen: str) -> bytes:
    """The bytes of the public key file ``path`` given as ``option``; FlashError (one line that
    names ``keygen``, the command that makes the right file) if it is not one."""
    where = f"{option} {path}"
    try:
        data = path.read_bytes()
    except OSError as err:
        raise FlashError(f"{where}: {err.strerror}") from None
    if b"PRIVATE KEY" in data:
        raise FlashError(
            f"{where}: a private key: give the public one, the KEYFILE.pub that `{keygen}` "
            "wrote beside it"
        )
    if raw_public_key(data) is None:
        raise FlashError(
            f"{where}: not an Ed25519 public key (PEM, 32 bytes or 64 hex digits): give the "
            f"KEYFILE.pub of `{keygen}`"
        )
    return data
