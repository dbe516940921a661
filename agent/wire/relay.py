"""The body of ``POST /relay/<gateway>`` (docs/protocol.md "Gateways"): a gateway forwards the
batches of several devices attached to it in one request, and the endpoint answers each entry.

Request (Content-Format 60)::

    relay-request = [* relay-entry]              ; at most MAX_ENTRIES entries
    relay-entry   = [device: tstr, content-format: uint, batch: bstr]

Each ``batch`` is a batch in one of the ingest content formats (112, 65000-65002), exactly as the
device would post it to ``/ingest/<device>``. Answer (2.04, Content-Format 60), one item per entry
in the order of the request::

    relay-answer  = [* (ingest-ack / refusal)]
    ingest-ack    = { "ack": ..., "new": ..., ... }   ; agent.wire.batch.IngestAck, as /ingest's
    refusal       = [code: uint, message: tstr, ? max-age: uint]  ; the CoAP code of /ingest
                                                  ; (131 = 4.03); max-age: send it again after
                                                  ; that many seconds (163 = 5.03)

:func:`encode_relay` and :func:`decode_relay_answer` are the gateway's side, :func:`decode_relay`
and :func:`encode_relay_answer` the endpoint's. Decoding is strict and bounded: the structure is
checked by :mod:`agent.wire.cborscan` (every declared length against the bytes left) before
anything is decoded, and every shape error is a :class:`RelayError` (the endpoint's 4.00; too
many entries: :class:`RelayTooLarge`, its 4.13).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from agent.wire import records
from agent.wire.batch import CodecError, IngestAck
from agent.wire.cborscan import ScanError, Span, items, scan

#: Entries of one request, at most (the endpoint commits them together: cloud/ingest.py).
MAX_ENTRIES = 256
#: Bytes of one request body, at most (Block1 when larger than a datagram).
MAX_BODY_BYTES = 256 * 1024
#: Characters of a refusal's message, at most.
MAX_MESSAGE = 200
#: The codes of a refusal: 4.00 (128) to 5.31 (191), client and server errors.
ERROR_CODES = range(128, 192)
#: The largest content format number (a 16-bit option value).
MAX_CONTENT_FORMAT = 0xFFFF
#: The largest max-age of a refusal (as CoAP's Max-Age option: 32 bits).
MAX_AGE = 0xFFFFFFFF


class RelayError(CodecError):
    """A relay request or answer that does not fit its schema."""


class RelayTooLarge(RelayError):
    """A relay request with more than :data:`MAX_ENTRIES` entries or :data:`MAX_BODY_BYTES`."""


@dataclass(frozen=True)
class RelayEntry:
    """One device's batch in a relay request: its device, content format and batch bytes."""

    device: str
    content_format: int
    batch: bytes


@dataclass(frozen=True)
class RelayRefusal:
    """The endpoint refused one entry: its CoAP code as a number (``class * 32 + detail``), a
    short reason, and the seconds after which to send it again (the Max-Age of ``/ingest``'s
    5.03: the device's rate limit), if any. The gateway acts on it as the device would on that
    code from ``/ingest``."""

    code: int
    message: str
    max_age: int | None = None

    @property
    def dotted(self) -> str:
        """``"4.03"`` for 131."""
        return f"{self.code >> 5}.{self.code & 31:02d}"


RelayResult = IngestAck | RelayRefusal


def _uint(value: object, limit: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= limit


def encode_relay(entries: Sequence[RelayEntry]) -> bytes:
    """The request body (deterministic CBOR). :class:`RelayError` for an entry the endpoint
    would refuse the whole request for (a shape it cannot read), :class:`RelayTooLarge` for
    more than :data:`MAX_ENTRIES` entries."""
    if len(entries) > MAX_ENTRIES:
        raise RelayTooLarge(f"a relay request holds at most {MAX_ENTRIES} entries")
    out = []
    for entry in entries:
        if not isinstance(entry.device, str) or not entry.device:
            raise RelayError(f"an entry's device must be a non-empty text: {entry.device!r}")
        if not _uint(entry.content_format, MAX_CONTENT_FORMAT):
            raise RelayError(f"{entry.device}: bad content format {entry.content_format!r}")
        out.append([entry.device, entry.content_format, bytes(entry.batch)])
    return records.dumps(out)


def _array(data: bytes, what: str) -> list[Span]:
    """The spans of the items of the one array ``data`` holds (nothing after it)."""
    try:
        span = scan(data)
        if span.end != len(data):
            raise RelayError(f"{what}: {len(data) - span.end} bytes after the array")
        if not data or data[0] >> 5 != 4:
            raise RelayError(f"{what}: expected an array")
        return items(data, span)
    except ScanError as err:
        raise RelayError(f"{what}: not well-formed CBOR: {err}") from None


def _item(data: bytes, span: Span, what: str) -> object:
    try:
        return records.loads(span.of(data), max_depth=2)
    except records.RecordError as err:
        raise RelayError(f"{what}: {err}") from None


def decode_relay(data: bytes) -> list[RelayEntry]:
    """The entries of a request body; :class:`RelayError` (4.00) when it is not an array of
    ``[text, uint, bytes]``, :class:`RelayTooLarge` (4.13) beyond the limits. The device ids and
    batches are not judged here: the endpoint answers each entry on its own."""
    if len(data) > MAX_BODY_BYTES:
        raise RelayTooLarge(f"a relay request is at most {MAX_BODY_BYTES} bytes")
    spans = _array(data, "relay request")
    if len(spans) > MAX_ENTRIES:
        raise RelayTooLarge(f"a relay request holds at most {MAX_ENTRIES} entries")
    out = []
    for i, span in enumerate(spans):
        entry = _item(data, span, f"entry {i}")
        if (
            not isinstance(entry, list)
            or len(entry) != 3
            or not isinstance(entry[0], str)
            or not _uint(entry[1], MAX_CONTENT_FORMAT)
            or not isinstance(entry[2], bytes)
        ):
            raise RelayError(f"entry {i}: expected [device: text, content-format: uint, batch]")
        out.append(RelayEntry(entry[0], entry[1], entry[2]))
    return out


def _head(count: int) -> bytes:
    """The CBOR head of an array of ``count`` items (its shortest form)."""
    if count < 24:
        return bytes([0x80 | count])
    for info, size in ((24, 1), (25, 2), (26, 4)):
        if count < 1 << (8 * size):
            return bytes([0x80 | info]) + count.to_bytes(size, "big")
    raise ValueError("too many items")


def encode_relay_answer(results: Sequence[RelayResult]) -> bytes:
    """The answer body: each ack as :meth:`IngestAck.to_cbor` writes it, each refusal as
    ``[code, message]`` (the message cut to :data:`MAX_MESSAGE` characters), with its max-age
    third when it has one."""
    parts = [_head(len(results))]
    for result in results:
        if isinstance(result, IngestAck):
            parts.append(result.to_cbor())
        else:
            age = [] if result.max_age is None else [min(max(result.max_age, 0), MAX_AGE)]
            parts.append(records.dumps([result.code, result.message[:MAX_MESSAGE], *age]))
    return b"".join(parts)


def decode_relay_answer(data: bytes, entries: int | None = None) -> list[RelayResult]:
    """The endpoint's answer, one :class:`IngestAck` or :class:`RelayRefusal` per entry;
    ``entries``: how many the request held (another count is an error). :class:`RelayError`
    (a :class:`CodecError`) for anything else."""
    spans = _array(data, "relay answer")
    if entries is not None and len(spans) != entries:
        raise RelayError(f"relay answer: {len(spans)} results for {entries} entries")
    out: list[RelayResult] = []
    for i, span in enumerate(spans):
        major = data[span.start] >> 5
        if major == 5:
            try:
                out.append(IngestAck.from_cbor(span.of(data)))
            except CodecError as err:
                raise RelayError(f"result {i}: {err}") from None
            continue
        item = _item(data, span, f"result {i}")
        if (
            not isinstance(item, list)
            or len(item) not in (2, 3)
            or not _uint(item[0], ERROR_CODES[-1])
            or item[0] not in ERROR_CODES
            or not isinstance(item[1], str)
            or len(item[1]) > MAX_MESSAGE
            or not all(_uint(age, MAX_AGE) for age in item[2:])
        ):
            raise RelayError(
                f"result {i}: expected an ack or [code: 4.xx/5.xx, message, ? max-age]"
            )
        out.append(RelayRefusal(item[0], item[1], *item[2:]))
    return out
