"""The body of a credential rotation (agent/wire/rotation.py): fixed bytes, round trip for every
valid value, and hostile bodies refused with a reason (never a crash, never a secret in a
message)."""

from __future__ import annotations

import cbor2
import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.wire import records
from agent.wire.credentials import Credential
from agent.wire.rotation import (
    BODY_BYTES,
    MAX_GENERATION,
    Rotation,
    RotationBodyError,
    decode_rotation,
)

SECRET = bytes(range(32))
SALT = bytes(range(8))
PSK = b"abcdefghijklmnop"
GOOD = {"generation": 2, "master_secret": SECRET, "master_salt": SALT, "psk": PSK}


def test_fixed_bytes() -> None:
    """Deterministic CBOR: keys by length, then bytewise."""
    expected = (
        "a4"
        + "63" + b"psk".hex() + "50" + PSK.hex()
        + "6a" + b"generation".hex() + "02"
        + "6b" + b"master_salt".hex() + "48" + SALT.hex()
        + "6d" + b"master_secret".hex() + "5820" + SECRET.hex()
    )  # fmt: skip
    body = Rotation(2, SECRET, SALT, PSK).to_bytes()
    assert body.hex() == expected
    assert decode_rotation(bytes.fromhex(expected)) == Rotation(2, SECRET, SALT, PSK)


@given(
    generation=st.integers(2, MAX_GENERATION),
    secret=st.binary(min_size=32, max_size=32),
    salt=st.binary(min_size=8, max_size=8),
    psk=st.binary(min_size=1, max_size=16),
)
def test_round_trip(generation: int, secret: bytes, salt: bytes, psk: bytes) -> None:
    rotation = Rotation(generation, secret, salt, psk)
    body = rotation.to_bytes()
    assert len(body) <= BODY_BYTES
    assert decode_rotation(body) == rotation


def test_it_carries_a_credential_and_applies_to_the_current_one() -> None:
    current = Credential.generate("pump-01", "device", b"\x01\x02\x03\x04")
    new = Credential.generate("pump-01", "device", b"\x09\x09\x09\x09", generation=2)
    applied = Rotation.of(new).apply(current)
    assert applied.sender_id == current.sender_id and applied.principal == "pump-01"
    assert (applied.master_secret, applied.master_salt, applied.psk, applied.generation) == (
        new.master_secret,
        new.master_salt,
        new.psk,
        2,
    )


def test_no_secret_in_its_repr() -> None:
    text = repr(Rotation(2, SECRET, SALT, PSK))
    assert text == "Rotation(generation=2)"


def _with(**changes: object) -> bytes:
    doc = dict(GOOD)
    for key, value in changes.items():
        if value is KeyError:
            del doc[key]
        else:
            doc[key] = value
    return cbor2.dumps(doc)


@pytest.mark.parametrize(
    ("body", "why"),
    [
        (b"", "not valid CBOR"),
        (b"\xa4", "not valid CBOR"),  # cut short
        (records.dumps(GOOD) + b"\x00", "bytes after the CBOR item"),  # trailing bytes
        (records.dumps([2, SECRET, SALT, PSK]), "exactly"),  # not a map
        (_with(generation=KeyError), "exactly"),  # a key missing
        (_with(extra=1), "exactly"),  # a key too many
        (_with(principal="pump-02"), "exactly"),  # an identity smuggled in
        (_with(generation=1), "generation must be 2"),  # no rotation to generation 1
        (_with(generation=0), "generation must be 2"),
        (_with(generation=-5), "generation must be 2"),
        (_with(generation=MAX_GENERATION + 1), "generation must be 2"),
        (_with(generation=2**64 - 1), "generation must be 2"),
        (_with(generation=True), "unsigned integer"),
        (_with(generation=2.0), "unsigned integer"),
        (_with(generation="2"), "unsigned integer"),
        (_with(master_secret=SECRET[:16]), "master_secret must be 32 bytes"),
        (_with(master_secret=SECRET + b"x"), "master_secret must be 32 bytes"),
        (_with(master_secret=SECRET.hex()), "master_secret must be 32 bytes"),  # text
        (_with(master_salt=b""), "master_salt must be 8 bytes"),
        (_with(master_salt=None), "master_salt must be 8 bytes"),
        (_with(psk=b""), "psk must be 1 to 16 bytes"),
        (_with(psk=b"x" * 17), "psk must be 1 to 16 bytes"),
        (_with(psk=[1, 2]), "psk must be 1 to 16 bytes"),
        (_with(psk={"a": {"b": [1]}}), "too deep|depth|psk must be"),  # nested
        (b"\x81" * 100 + b"\x00", "not valid CBOR"),  # nested far too deep
        (b"\xa4\x63psk\x41a\x63psk\x41b", "not valid CBOR"),  # duplicate keys
        (b"\x5b" + (2**62).to_bytes(8, "big"), "not valid CBOR"),  # a huge declared length
        (records.dumps({**GOOD, "pad": b"x" * BODY_BYTES}), f"at most {BODY_BYTES}"),
    ],
)
def test_hostile_bodies_are_refused_with_the_reason(body: bytes, why: str) -> None:
    with pytest.raises(RotationBodyError, match=why) as err:
        decode_rotation(body)
    assert SECRET.hex() not in str(err.value) and PSK.decode() not in str(err.value)


def test_a_credentials_text_form_holds_no_secret() -> None:
    """Defect (latent): the dataclass's repr held the master secret and the PSK, so any log
    line, error message or traceback that showed a credential would have written them out."""
    cred = Credential.generate("pump-01", "device", b"\x01\x02")
    shown = repr(cred) + str(cred)
    assert "pump-01" in shown
    for secret in (cred.master_secret, cred.psk):
        assert secret and repr(secret) not in shown and secret.hex() not in shown
