"""Hostile input generators for the endpoint and the agent's desired-state path, shared by the
tests (tests/e2e/test_cloud_badinput.py, tests/e2e/test_hostile_desired.py) and the chaos bench.

Both are deterministic for a seed and need nothing but the standard library and cbor2:

- :func:`malformed_datagrams` ``(n, seed, device=...) -> list[Datagram]``: raw UDP payloads a
  CoAP endpoint must refuse (a 4.xx, an RST or silence) without a traceback: truncated headers,
  bad versions and token lengths, invalid option deltas and lengths, invalid UTF-8 in string
  options, Observe on resources that are not observable, huge Block1/Block2 numbers, wrong
  content formats, and CBOR bombs (deep nesting, huge declared lengths, indefinite-length
  strings, bignums) in request bodies. Every kind comes up about equally often.
- :func:`hostile_desired_documents` ``(n, seed) -> list[HostileDocument]``: desired-state
  documents as an endpoint serves them (``{"rev", "keys": {key: [version, value]}}``, docs/
  protocol.md "Desired state"), each with one or more hostile keys *and* a valid key, so that a
  test can check per-key refusal: every key of ``good`` is applied, every key of ``bad`` is
  refused (and reported in ``desired/errors``), the document as a whole never is.

``python tools/hostile.py datagrams 20`` prints a sample of each (hex), for a look by eye.
"""

from __future__ import annotations

import random
import struct
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import cbor2

# -- CoAP framing (RFC 7252 section 3), written by hand so that it can be wrong on purpose -------

CON, NON, ACK, RST = 0, 1, 2, 3
GET, POST, PUT, DELETE = 1, 2, 3, 4
OBSERVE, URI_PATH, CONTENT_FORMAT, URI_QUERY, ACCEPT = 6, 11, 12, 15, 17
BLOCK2, BLOCK1, SIZE1 = 23, 27, 60


@dataclass(frozen=True)
class Datagram:
    """One UDP payload for an endpoint, and the attack it carries."""

    kind: str
    data: bytes


def header(mtype: int, code: int, mid: int, token: bytes = b"", tkl: int | None = None) -> bytes:
    """The 4-byte header and the token; ``tkl`` overrides the token length field."""
    tkl = len(token) if tkl is None else tkl
    return bytes([0x40 | (mtype << 4) | (tkl & 0x0F), code, (mid >> 8) & 0xFF, mid & 0xFF]) + token


def _ext(value: int) -> tuple[int, bytes]:
    if value < 13:
        return value, b""
    if value < 269:
        return 13, bytes([value - 13])
    return 14, struct.pack(">H", value - 269)


def options(opts: list[tuple[int, bytes]]) -> bytes:
    """Options in order of their numbers (delta-encoded, extended where needed)."""
    out = bytearray()
    last = 0
    for number, value in sorted(opts, key=lambda o: o[0]):
        d, dext = _ext(number - last)
        n, lext = _ext(len(value))
        out += bytes([(d << 4) | n]) + dext + lext + value
        last = number
    return bytes(out)


def uint(value: int) -> bytes:
    """A CoAP uint option value (shortest, big-endian; 0 is empty)."""
    return value.to_bytes((value.bit_length() + 7) // 8, "big")


def request(
    code: int,
    path: str,
    *,
    mid: int,
    token: bytes = b"\x01",
    extra: list[tuple[int, bytes]] | None = None,
    payload: bytes = b"",
    mtype: int = CON,
) -> bytes:
    opts = [(URI_PATH, seg.encode()) for seg in path.strip("/").split("/") if seg]
    opts += extra or []
    body = b"\xff" + payload if payload else b""
    return header(mtype, code, mid, token) + options(opts) + body


# -- CBOR bombs ------------------------------------------------------------------------------------


def deep_array(depth: int) -> bytes:
    """``[[[...0...]]]`` nested ``depth`` deep."""
    return b"\x81" * depth + b"\x00"


def deep_map(depth: int) -> bytes:
    """``{"a": {"a": ...0...}}`` nested ``depth`` deep."""
    return b"\xa1\x61a" * depth + b"\x00"


def huge_declared_length(rng: random.Random) -> bytes:
    """A byte/text string, array or map that says it holds up to 2**64 - 1 items or bytes."""
    major = rng.choice([2, 3, 4, 5])
    length = rng.choice([2**32 - 1, 2**63, 2**64 - 1, 10**9])
    return bytes([(major << 5) | 27]) + struct.pack(">Q", length) + rng.randbytes(8)


def indefinite_string(rng: random.Random, chunks: int = 200) -> bytes:
    """An indefinite-length byte or text string of many small chunks (maybe never ended)."""
    major = rng.choice([2, 3])
    body = bytes([(major << 5) | 31]) + (bytes([(major << 5) | 1]) + b"a") * chunks
    return body + (b"\xff" if rng.random() < 0.5 else b"")


def indefinite_nesting(depth: int) -> bytes:
    """Indefinite-length arrays nested ``depth`` deep, never closed."""
    return b"\x9f" * depth


def bignum(rng: random.Random) -> bytes:
    """A tag 2/3 bignum of hundreds of bytes (an int far beyond any float)."""
    n = rng.choice([16, 200, 600])
    return bytes([0xC2 + rng.randrange(2), 0x59]) + struct.pack(">H", n) + b"\xff" * n


def cbor_bomb(rng: random.Random) -> bytes:
    kind = rng.randrange(7)
    if kind == 0:
        return deep_array(rng.choice([17, 100, 1000, 5000]))
    if kind == 1:
        return deep_map(rng.choice([17, 100, 500]))
    if kind == 2:
        return huge_declared_length(rng)
    if kind == 3:
        return indefinite_string(rng)
    if kind == 4:
        return indefinite_nesting(rng.choice([10, 1000]))
    if kind == 5:  # a map whose value is a bomb
        return b"\xa1\x75sensor/motor/interval" + deep_array(rng.choice([20, 300]))
    return b"\xa1\x75detect/main/threshold" + bignum(rng)


# -- malformed datagrams ---------------------------------------------------------------------------


def _truncated_header(rng: random.Random, mid: int, device: str) -> bytes:
    return rng.randbytes(rng.randrange(0, 4))


def _bad_version(rng: random.Random, mid: int, device: str) -> bytes:
    good = request(GET, f"/devices/{device}", mid=mid)
    return bytes([(good[0] & 0x3F) | (rng.choice([0, 2, 3]) << 6)]) + good[1:]


def _bad_token_length(rng: random.Random, mid: int, device: str) -> bytes:
    tkl = rng.randrange(9, 16)  # 9..15 are reserved (RFC 7252 section 3)
    return header(CON, GET, mid, rng.randbytes(rng.randrange(0, 9)), tkl=tkl)


def _token_longer_than_datagram(rng: random.Random, mid: int, device: str) -> bytes:
    return header(CON, GET, mid, rng.randbytes(rng.randrange(0, 4)), tkl=8)


def _bad_option_delta(rng: random.Random, mid: int, device: str) -> bytes:
    head = header(CON, GET, mid, b"\x02")
    kind = rng.randrange(4)
    if kind == 0:  # delta 15 without being the payload marker
        return head + bytes([0xF0 | rng.randrange(15)]) + rng.randbytes(3)
    if kind == 1:  # length 15 is reserved
        return head + bytes([0xBF]) + rng.randbytes(3)
    if kind == 2:  # extended delta missing its byte
        return head + bytes([0xD0])
    return head + bytes([0xB8]) + b"ab"  # option says 8 bytes, the datagram has 2


def _payload_marker_without_payload(rng: random.Random, mid: int, device: str) -> bytes:
    return request(GET, f"/devices/{device}", mid=mid) + b"\xff"


def _invalid_utf8_path(rng: random.Random, mid: int, device: str) -> bytes:
    bad = rng.choice([b"\xff\xfe", b"\xc3\x28", b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80"])
    opts = [(URI_PATH, b"state"), (URI_PATH, bad)]
    if rng.random() < 0.5:
        opts.append((URI_PATH, b"desired"))
    return header(CON, rng.choice([GET, PUT, POST]), mid, b"\x03") + options(opts)


def _invalid_utf8_query(rng: random.Random, mid: int, device: str) -> bytes:
    opts = [(URI_PATH, b".well-known"), (URI_PATH, b"core"), (URI_QUERY, b"rt=\xff\xfe")]
    return header(CON, GET, mid, b"\x04") + options(opts)


def _observe_not_observable(rng: random.Random, mid: int, device: str) -> bytes:
    code, path = rng.choice(
        [
            (GET, f"/devices/{device}"),
            (GET, f"/state/{device}/reported"),
            (GET, "/.well-known/core"),
            (GET, "/models/x"),
            (GET, "/no/such/resource"),
            (GET, f"/state/ghost-{rng.randrange(10**6)}/desired"),
            (POST, f"/ingest/{device}"),
            (PUT, f"/state/{device}/desired"),
            (DELETE, f"/state/{device}/desired"),
        ]
    )
    extra = [(OBSERVE, uint(rng.choice([0, 0, 1, 2**24 - 1])))]
    payload = b""
    if code in (POST, PUT):
        extra.append((CONTENT_FORMAT, uint(60 if code == PUT else 112)))
        payload = cbor2.dumps({"sensor/motor/interval": "fast"}) if code == PUT else b"\x80"
    return request(code, path, mid=mid, token=rng.randbytes(4), extra=extra, payload=payload)


def _huge_block_number(rng: random.Random, mid: int, device: str) -> bytes:
    num = rng.choice([2**20 - 1, 2**19, 65535, 4000])
    szx = rng.randrange(8)  # 7 (BERT) is not for UDP
    value = uint((num << 4) | (rng.randrange(2) << 3) | szx)
    if rng.random() < 0.5:
        path = rng.choice([f"/state/{device}/desired", "/.well-known/core", "/models/x/1/file"])
        return request(GET, path, mid=mid, extra=[(BLOCK2, value)])
    extra = [(BLOCK1, value), (CONTENT_FORMAT, uint(112))]
    return request(POST, f"/ingest/{device}", mid=mid, extra=extra, payload=rng.randbytes(16))


def _wrong_content_format(rng: random.Random, mid: int, device: str) -> bytes:
    cf = rng.choice([0, 40, 41, 50, 110, 111, 113, 64999, 65535, 2**16 + 1, 2**32 - 1])
    code, path = rng.choice([(POST, f"/ingest/{device}"), (PUT, f"/state/{device}/desired")])
    extra = [(CONTENT_FORMAT, uint(cf))]
    return request(code, path, mid=mid, extra=extra, payload=cbor2.dumps({"x": 1}))


def _cbor_bomb_request(rng: random.Random, mid: int, device: str) -> bytes:
    code, path, cf = rng.choice(
        [
            (POST, f"/ingest/{device}", 112),
            (POST, f"/ingest/{device}", 65001),
            (PUT, f"/state/{device}/desired", 60),
            (PUT, f"/state/{device}/reported", 60),
            (POST, f"/infer/{device}", 60),
        ]
    )
    extra = [(CONTENT_FORMAT, uint(cf))]
    return request(code, path, mid=mid, extra=extra, payload=cbor_bomb(rng)[:1000])


def _bad_uint_option(rng: random.Random, mid: int, device: str) -> bytes:
    # uint options longer than their format allows (Observe 3 bytes, Content-Format 2)
    number = rng.choice([OBSERVE, CONTENT_FORMAT, ACCEPT, BLOCK2, SIZE1])
    return request(GET, f"/devices/{device}", mid=mid, extra=[(number, rng.randbytes(9))])


def _unknown_critical_option(rng: random.Random, mid: int, device: str) -> bytes:
    number = rng.choice([9, 13, 25, 2049, 65001])
    return request(GET, f"/devices/{device}", mid=mid, extra=[(number, rng.randbytes(3))])


def _response_or_empty_to_server(rng: random.Random, mid: int, device: str) -> bytes:
    kind = rng.randrange(3)
    if kind == 0:  # a 2.05 response nobody asked for
        return header(rng.choice([CON, NON, ACK]), 0x45, mid, rng.randbytes(2)) + b"\xffhi"
    if kind == 1:  # an empty message that carries a token or a payload
        return header(rng.choice([CON, ACK, RST]), 0, mid, b"\x01") + b"\xffx"
    return header(rng.choice([ACK, RST]), 0, mid)  # an ACK/RST for nothing


def _random_bytes(rng: random.Random, mid: int, device: str) -> bytes:
    return rng.randbytes(rng.randrange(4, 300))


def _long_path_segment(rng: random.Random, mid: int, device: str) -> bytes:
    seg = b"a" * rng.choice([255, 256, 1000])
    return header(CON, GET, mid, b"\x05") + options([(URI_PATH, b"devices"), (URI_PATH, seg)])


DATAGRAM_KINDS: dict[str, Callable[[random.Random, int, str], bytes]] = {
    "truncated_header": _truncated_header,
    "bad_version": _bad_version,
    "bad_token_length": _bad_token_length,
    "token_longer_than_datagram": _token_longer_than_datagram,
    "bad_option_delta": _bad_option_delta,
    "payload_marker_without_payload": _payload_marker_without_payload,
    "invalid_utf8_uri_path": _invalid_utf8_path,
    "invalid_utf8_uri_query": _invalid_utf8_query,
    "observe_not_observable": _observe_not_observable,
    "huge_block_number": _huge_block_number,
    "wrong_content_format": _wrong_content_format,
    "cbor_bomb": _cbor_bomb_request,
    "bad_uint_option": _bad_uint_option,
    "unknown_critical_option": _unknown_critical_option,
    "unsolicited_response": _response_or_empty_to_server,
    "random_bytes": _random_bytes,
    "long_path_segment": _long_path_segment,
}


def malformed_datagrams(n: int, seed: int, device: str = "pump-01") -> list[Datagram]:
    """``n`` malformed CoAP datagrams (kinds in turn, contents from ``seed``) for an endpoint
    that serves ``device``. Message ids are distinct, so none is a duplicate of another."""
    rng = random.Random(seed)
    kinds = list(DATAGRAM_KINDS.items())
    out = []
    for i in range(n):
        name, make = kinds[i % len(kinds)]
        out.append(Datagram(name, make(rng, (seed * 7919 + i) & 0xFFFF, device)))
    return out


# -- hostile desired documents ---------------------------------------------------------------------


class Raw:
    """CBOR bytes put into a document as they are (for values cbor2 would not write)."""

    def __init__(self, data: bytes) -> None:
        self.data = data


def _raw_default(encoder: Any, value: Any) -> None:
    if isinstance(value, Raw):
        encoder.write(value.data)
        return
    raise TypeError(f"cannot encode {type(value).__name__}")


def encode_document(rev: int, keys: dict[str, Any], blocked: dict[str, int] | None = None) -> bytes:
    """A desired document ``{"rev", "keys", ? "blocked"}``; values may be :class:`Raw`."""
    doc: dict[str, Any] = {"rev": rev, "keys": keys}
    if blocked is not None:
        doc["blocked"] = blocked
    return cbor2.dumps(doc, canonical=True, default=_raw_default)


def _hostile_value(rng: random.Random, key: str) -> tuple[str, Any]:
    """(attack, value) for ``key``; the value is refused by the desired-state checks."""
    kind = rng.randrange(12)
    if kind == 0:
        depth = rng.choice([17, 20, 100, 1000])
        return f"nested_{depth}_deep", Raw(deep_array(depth))
    if kind == 1:
        return "deep_map", Raw(deep_map(rng.choice([20, 200])))
    if kind == 2:
        return "large_value_20kB", {"name": "m" * 20_000}
    if kind == 3:
        return "threshold_1e308", 1e308
    if kind == 4:
        return "not_finite", rng.choice([float("inf"), float("-inf"), float("nan")])
    if kind == 5:
        return "bignum", Raw(bignum(rng))
    if kind == 6:
        return "interval_out_of_range", rng.choice([0.0, -1.0, 1e-9, 86_401.0, 1e12])
    if kind == 7:
        wrong: list[Any] = ["fast", [1], {"a": 1}, b"\x00", None]
        if not key.endswith("/enabled"):
            wrong.append(True)
        return "wrong_type", rng.choice(wrong)
    if kind == 8:
        return "indefinite_string", Raw(b"\x7f" + b"\x61a" * 300 + b"\xff")
    if kind == 9:
        return "tagged_value", Raw(b"\xd9\xd9\xf7" * 40 + b"\x01")  # self-described CBOR x40
    if kind == 10:
        return "negative_zero_threshold", -0.0
    return "huge_int", 2**64 + 1


def hostile_desired_documents(n: int, seed: int) -> list[HostileDocument]:
    """``n`` desired documents of revisions 10, 11, ...; each holds a valid interval change
    (``good``) and one to three hostile keys (``bad``), all at the document's revision (see the
    module docstring). ``values`` has each key's value as CBOR bytes, for writing the keys into
    an endpoint's database one by one."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        rev = 10 + i
        good_key = "sensor/motor/interval"
        good_value = rng.choice([0.5, 1, 2.5, 10.0])
        values: dict[str, bytes] = {good_key: cbor2.dumps(good_value, canonical=True)}
        attacks = []
        for j in range(rng.randrange(1, 4)):
            key = rng.choice(
                [
                    f"detect/m{j}/threshold",
                    f"sensor/s{j}/interval",
                    f"sensor/s{j}/enabled",
                    f"model/slot{j}",
                    f"unknown/key{j}",
                ]
            )
            attack, value = _hostile_value(rng, key)
            if attack == "wrong_type" and value is None:
                value = "null"  # null unsets a key: that is valid
            attacks.append(attack)
            values[key] = value.data if isinstance(value, Raw) else cbor2.dumps(value)
        payload = encode_document(rev, {k: [rev, Raw(v)] for k, v in values.items()})
        bad = set(values) - {good_key}
        out.append(
            HostileDocument("+".join(attacks), rev, payload, values, {good_key: good_value}, bad)
        )
    return out


@dataclass(frozen=True)
class HostileDocument:
    """A desired document of revision ``rev`` with hostile keys. Every key is at version
    ``rev``; ``good`` maps each valid key to its value, ``bad`` names the keys that must be
    refused one by one, ``values`` holds every key's value as CBOR bytes."""

    attack: str
    rev: int
    payload: bytes
    values: dict[str, bytes] = field(default_factory=dict)
    good: dict[str, Any] = field(default_factory=dict)
    bad: set[str] = field(default_factory=set)


def main(argv: list[str]) -> int:
    what = argv[0] if argv else "datagrams"
    n = int(argv[1]) if len(argv) > 1 else 20
    if what == "datagrams":
        for d in malformed_datagrams(n, 1):
            print(f"{d.kind:32} {d.data[:48].hex()}")
    else:
        for doc in hostile_desired_documents(n, 1):
            print(f"{doc.attack:48} {len(doc.payload):6} bytes, bad={sorted(doc.bad)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
