"""The body of a credential rotation, ``POST /credential/<device>`` (docs/protocol.md "Remote
commands and logs", docs/security.md "Credentials and their lifecycle"): the secrets a device
made for itself on the ``rotate`` command, sent under its current OSCORE context. A CBOR map ::

    {"generation": uint,        ; the new generation: the stored one + 1
     "master_secret": bstr,     ; OSCORE master secret, 32 bytes
     "master_salt": bstr,       ; OSCORE master salt, 8 bytes
     "psk": bstr}               ; DTLS pre-shared key, 1 to 16 bytes

Nothing else is in it: the principal, role and key ids stay those of the current credential.
:func:`decode_rotation` refuses anything else: other or missing keys, other types or sizes, a
body over :data:`BODY_BYTES`, trailing bytes, duplicate keys.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from agent.wire import records
from agent.wire.credentials import PSK_BYTES, SALT_BYTES, SECRET_BYTES, Credential

#: The endpoint refuses a larger body (4.13); a real one is about 80 bytes.
BODY_BYTES = 256
#: The highest generation a rotation may name (a counter, never near it in practice).
MAX_GENERATION = 2**31 - 1
KEYS = ("generation", "master_secret", "master_salt", "psk")


class RotationBodyError(ValueError):
    """A rotation body is malformed or over its limits; the message says what is wrong."""


@dataclass(frozen=True)
class Rotation:
    """The new secrets of a credential, and its generation."""

    generation: int
    master_secret: bytes
    master_salt: bytes
    psk: bytes

    def __post_init__(self) -> None:
        problem = _problem(self.generation, self.master_secret, self.master_salt, self.psk)
        if problem:
            raise RotationBodyError(f"rotation: {problem}")

    def __repr__(self) -> str:  # never the secrets, even in a traceback or a log line
        return f"Rotation(generation={self.generation})"

    @classmethod
    def of(cls, credential: Credential) -> Rotation:
        return cls(
            credential.generation, credential.master_secret, credential.master_salt, credential.psk
        )

    def apply(self, current: Credential) -> Credential:
        """``current`` with these secrets and this generation (principal, role, ids kept)."""
        return dataclasses.replace(
            current,
            master_secret=self.master_secret,
            master_salt=self.master_salt,
            psk=self.psk,
            generation=self.generation,
        )

    def to_bytes(self) -> bytes:
        return records.dumps(dataclasses.asdict(self))


def _problem(generation: Any, secret: Any, salt: Any, psk: Any) -> str:
    if isinstance(generation, bool) or not isinstance(generation, int):
        return "generation must be an unsigned integer"
    if not 2 <= generation <= MAX_GENERATION:
        return f"generation must be 2 to {MAX_GENERATION}"
    if not isinstance(secret, bytes) or len(secret) != SECRET_BYTES:
        return f"master_secret must be {SECRET_BYTES} bytes"
    if not isinstance(salt, bytes) or len(salt) != SALT_BYTES:
        return f"master_salt must be {SALT_BYTES} bytes"
    if not isinstance(psk, bytes) or not 1 <= len(psk) <= PSK_BYTES:
        return f"psk must be 1 to {PSK_BYTES} bytes"
    return ""


def decode_rotation(data: bytes) -> Rotation:
    """A body as received; :class:`RotationBodyError` otherwise."""
    try:
        doc = records.loads_bounded(data, BODY_BYTES, max_depth=2)
    except records.RecordError as err:
        raise RotationBodyError(f"rotation: {err}") from None
    if not isinstance(doc, dict) or set(doc) != set(KEYS):
        raise RotationBodyError(f"rotation: expected a map of exactly {{{', '.join(KEYS)}}}")
    return Rotation(doc["generation"], doc["master_secret"], doc["master_salt"], doc["psk"])
