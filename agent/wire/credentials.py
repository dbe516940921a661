"""Credentials: what the endpoint makes when it registers a principal (a device, an operator or a
gateway), and what that principal keeps in its credential file.

A credential file is JSON, mode 0600, one per principal::

    {"format": 1, "principal": "pump-rig-01", "role": "device", "generation": 1,
     "oscore": {"master_secret": HEX(32), "master_salt": HEX(8), "sender_id": HEX,
                "recipient_id": HEX, "aead": "AES-CCM-16-64-128", "hkdf": "sha256"},
     "psk": HEX(16)}

``sender_id`` is the principal's OSCORE key id (unique at the endpoint), ``recipient_id`` the
endpoint's. ``psk`` is the DTLS pre-shared key of the interop profile, at most 16 bytes; its PSK
identity is the principal's name (tinydtls takes identities of up to 32 bytes, keys of up to 16).
``generation`` counts re-keyings: a re-keyed principal gets a new key id and new secrets, so
contexts of the old credential are refused.
"""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.errors import AgentError
from agent.files import OpenToOthers, loads_json, read_private, write_atomic

FORMAT = 1
AEAD = "AES-CCM-16-64-128"
HKDF = "sha256"
#: A gateway serves the device protocol to the devices attached to it and forwards for them
#: (docs/security.md "Gateways"); its credential is its own, like an operator's.
ROLES = ("device", "operator", "gateway")
#: The endpoint's OSCORE key id, the same in every principal's context (the keys differ).
ENDPOINT_KID = b""
KID_BYTES = 4
SECRET_BYTES = 32
SALT_BYTES = 8
PSK_BYTES = 16  # tinydtls copies a PSK into a 16-byte buffer: never longer
PSK_IDENTITY_BYTES = 32  # the longest PSK identity (principal name) tinydtls takes
MAX_FILE_BYTES = 4096
PRINCIPAL = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]{0,62}\Z")  # as a device id


def register_command(principal: str = "ID", credential: str = "FILE") -> str:
    """The endpoint's command that registers a device and writes its credential file: the fix
    every "not registered" and "no credential" message names."""
    return f"edge-agent-cloud devices add --data DIR {principal} --credential-out {credential}"


def generate_psk() -> bytes:
    """A random DTLS PSK: 16 printable characters (96 bits), so that it can be handed to tools
    that take the key as a command-line argument (libcoap's ``coap-client -k``)."""
    return secrets.token_urlsafe(12).encode("ascii")


class CredentialError(AgentError, ValueError):
    """A credential file is missing, unreadable or malformed; the message names the fix."""


@dataclass(frozen=True)
class Credential:
    """One principal's secrets, from the principal's side (``sender_id`` is its own key id)."""

    principal: str
    role: str
    master_secret: bytes = field(repr=False)  # never in a log line or a traceback's locals
    master_salt: bytes
    sender_id: bytes
    recipient_id: bytes = ENDPOINT_KID
    psk: bytes = field(default=b"", repr=False)
    generation: int = 1
    aead: str = AEAD
    hkdf: str = HKDF

    def __post_init__(self) -> None:
        if not PRINCIPAL.match(self.principal):
            raise CredentialError(f"{self.principal!r} is not a valid principal name")
        if self.role not in ROLES:
            raise CredentialError(f"role must be one of {', '.join(ROLES)}, not {self.role!r}")
        if len(self.master_secret) < 16:
            raise CredentialError("the OSCORE master secret must be at least 16 bytes")
        if not 1 <= len(self.sender_id) <= 7:
            raise CredentialError("the OSCORE key id must be 1 to 7 bytes")
        if len(self.psk) > PSK_BYTES:
            raise CredentialError(f"the DTLS PSK must be at most {PSK_BYTES} bytes")
        if self.aead != AEAD or self.hkdf != HKDF:
            raise CredentialError(f"only {AEAD} with HKDF-{HKDF.upper()} is supported")

    @classmethod
    def generate(cls, principal: str, role: str, kid: bytes, *, generation: int = 1) -> Credential:
        """Fresh random secrets for ``principal`` with key id ``kid``."""
        return cls(
            principal=principal,
            role=role,
            master_secret=secrets.token_bytes(SECRET_BYTES),
            master_salt=secrets.token_bytes(SALT_BYTES),
            sender_id=kid,
            psk=generate_psk(),
            generation=generation,
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "principal": self.principal,
            "role": self.role,
            "generation": self.generation,
            "oscore": {
                "master_secret": self.master_secret.hex(),
                "master_salt": self.master_salt.hex(),
                "sender_id": self.sender_id.hex(),
                "recipient_id": self.recipient_id.hex(),
                "aead": self.aead,
                "hkdf": self.hkdf,
            },
            "psk": self.psk.hex(),
        }

    @classmethod
    def from_json(cls, doc: Any) -> Credential:
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise CredentialError(f"not a credential of format {FORMAT}")
        osc = doc.get("oscore")
        if not isinstance(osc, dict):
            raise CredentialError("no 'oscore' table")
        try:
            return cls(
                principal=str(doc["principal"]),
                role=str(doc.get("role", "device")),
                master_secret=bytes.fromhex(osc["master_secret"]),
                master_salt=bytes.fromhex(osc.get("master_salt", "")),
                sender_id=bytes.fromhex(osc["sender_id"]),
                recipient_id=bytes.fromhex(osc.get("recipient_id", "")),
                psk=bytes.fromhex(doc.get("psk", "")),
                generation=int(doc.get("generation", 1)),
                aead=str(osc.get("aead", AEAD)),
                hkdf=str(osc.get("hkdf", HKDF)),
            )
        except (KeyError, TypeError, ValueError) as err:
            if isinstance(err, CredentialError):
                raise
            raise CredentialError(f"malformed credential: {err!r}") from None

    def write(self, path: Path) -> None:
        """Write the file (0600, atomically: temp, fsync, rename, directory fsync)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, (json.dumps(self.to_json(), indent=2) + "\n").encode(), mode=0o600)

    @classmethod
    def read(cls, path: Path) -> Credential:
        """The credential in ``path``; CredentialError (one line, with the fix) otherwise."""
        try:
            data = read_private(path, MAX_FILE_BYTES)
        except OpenToOthers as err:
            raise CredentialError(
                f"{path}: readable by others (mode {err.mode:o}); chmod 600"
            ) from None
        except FileNotFoundError:
            raise CredentialError(
                f"{path}: no credential file; register the device on the endpoint "
                f"({register_command('ID', str(path))}; DIR is the endpoint's --data) or copy "
                "its file here (tools/flash does it)"
            ) from None
        except OSError as err:
            raise CredentialError(f"{path}: cannot read the credential: {err}") from None
        if len(data) > MAX_FILE_BYTES:
            raise CredentialError(f"{path}: larger than a credential can be")
        try:
            doc = loads_json(data)
        except ValueError as err:
            raise CredentialError(f"{path}: not JSON: {err}") from None
        try:
            return cls.from_json(doc)
        except CredentialError as err:
            raise CredentialError(f"{path}: {err}") from None
