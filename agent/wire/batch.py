"""What every batch encoding shares: content-format numbers, the record as it travels
(:class:`WireRecord`), the encoding protocol, the codec's error, and the endpoint's
acknowledgement of a batch (:class:`IngestAck`, with the sequence-number ranges it covers).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import cbor2

from agent.errors import AgentError
from agent.wire import records
from agent.wire.records import Kind

# CoAP Content-Format numbers (IANA "CoAP Content-Formats" registry).
CF_CBOR = 60  # application/cbor


CF_SENML_CBOR = 112  # application/senml+cbor


CF_LINK_FORMAT = 40  # application/link-format


MAX_SEQ = 2**63 - 1  # SQLite INTEGER
MAX_STORE_ID = 64  # characters of a storage identity in an ack


#: A record kind that only travels, never stored on the device: a features record
#: (agent/wire/features.py), which stands for readings of the queue.
FEATURES = "features"


KINDS = frozenset(k.value for k in Kind) | {FEATURES}


DEVICE_ID = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]{0,62}\Z")  # as agent/sense/settings.py's device_id


Resolution = Callable[[str, str], float | None]  # (sensor, channel) -> step, None: unknown


class CodecError(AgentError, ValueError):
    """A batch cannot be encoded (bad records) or decoded (bad bytes)."""


class UnsupportedFormat(CodecError):
    """No encoding is registered for a content format."""


@dataclass(frozen=True, slots=True)
class WireRecord:
    """One store record as it travels: sequence number, kind, creation time, body bytes.

    ``time``: the wall time inside the body, when whoever made the record already knows it (a
    decoder that built the body from it); None: read it from the body when needed
    (:func:`record_time`). Not part of the record's identity (equality ignores it)."""

    seq: int
    kind: str
    created: float
    body: bytes
    time: float | None = field(default=None, compare=False)


def record_time(rec: WireRecord) -> float:
    """The wall time in ``rec``'s body (its ``created`` time when the body has none usable)."""
    if rec.time is not None and math.isfinite(rec.time):
        return rec.time
    return records.body_time(rec.kind, bytes(rec.body), rec.created)


@runtime_checkable
class Encoding(Protocol):
    """A batch encoding, registered under its CoAP Content-Format number."""

    content_format: int
    name: str

    def encode(
        self,
        device: str | None,
        records: Sequence[WireRecord],
        *,
        resolution: Resolution | None = None,
    ) -> bytes:
        """The batch as bytes; :class:`CodecError` if a record cannot be carried.
        ``resolution(sensor, channel)`` is a channel's step (None: unknown), for encodings that
        quantize; others ignore it."""

    def decode(self, data: bytes) -> tuple[str | None, list[WireRecord]]:
        """The device named in the batch (None if it names none) and the records."""


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _check_record(rec: WireRecord) -> None:
    seq, created = rec.seq, rec.created
    if (
        type(seq) is int
        and 0 <= seq <= MAX_SEQ
        and rec.kind in KINDS
        and type(created) is float
        and math.isfinite(created)
        and type(rec.body) is bytes
    ):
        return  # the usual case, checked fast
    if not isinstance(rec.seq, int) or isinstance(rec.seq, bool) or not 0 <= rec.seq <= MAX_SEQ:
        raise CodecError(f"seq must be an integer in 0..2**63-1, not {rec.seq!r}")
    if rec.kind not in KINDS:
        raise CodecError(f"seq {rec.seq}: unknown kind {rec.kind!r}")
    if not _number(rec.created) or not math.isfinite(rec.created):
        raise CodecError(f"seq {rec.seq}: created must be a finite number, not {rec.created!r}")
    if not isinstance(rec.body, bytes | bytearray | memoryview):
        raise CodecError(f"seq {rec.seq}: body must be bytes")


def seq_ranges(seqs: Iterable[int]) -> list[tuple[int, int]]:
    """Sorted, merged inclusive ranges covering ``seqs``: [1, 2, 3, 7] -> [(1, 3), (7, 7)]."""
    ranges: list[tuple[int, int]] = []
    for seq in sorted(set(seqs)):
        if ranges and seq == ranges[-1][1] + 1:
            ranges[-1] = (ranges[-1][0], seq)
        else:
            ranges.append((seq, seq))
    return ranges


def format_ranges(seqs: list[int]) -> str:
    """``1-3,7`` for [1, 2, 3, 7]: committed sequence numbers, compactly, for the log."""
    return ",".join(f"{a}-{b}" if a != b else f"{a}" for a, b in seq_ranges(seqs))


@dataclass(frozen=True)
class IngestAck:
    """The endpoint's answer to a batch: every sequence number now stored, and counts.

    ``ranges`` are inclusive ``(first, last)`` pairs, sorted and disjoint: the seqs acknowledged
    (stored, new or identical duplicates). ``duplicate`` counts records that were stored before;
    ``conflict`` counts those of them whose stored copy differs (the endpoint keeps the first
    copy). ``conflicts`` names those seqs as ranges: they are *not* acknowledged (the endpoint
    holds another record under that number), and a seq in both ``conflicts`` and ``ranges`` is
    a conflict. ``last`` is the highest seq the endpoint holds for the device (None: none, or an
    endpoint that does not say).
    """

    ranges: tuple[tuple[int, int], ...]
    new: int
    duplicate: int
    conflict: int = 0
    conflicts: tuple[tuple[int, int], ...] = ()
    # the endpoint's state, not this batch's outcome: two acks of one batch are equal without it
    last: int | None = field(default=None, compare=False)
    # the identity of the storage behind the endpoint (None: an endpoint that does not say)
    store: str | None = field(default=None, compare=False)

    @classmethod
    def for_seqs(
        cls,
        seqs: Iterable[int],
        new: int,
        duplicate: int,
        conflict: int = 0,
        *,
        conflicts: Iterable[int] = (),
        last: int | None = None,
        store: str | None = None,
    ) -> IngestAck:
        """The ack of a batch of ``seqs``, of which ``conflicts`` are not acknowledged."""
        bad = set(conflicts)
        return cls(
            tuple(seq_ranges(s for s in seqs if s not in bad)),
            new,
            duplicate,
            max(conflict, len(bad)),
            tuple(seq_ranges(bad)),
            last,
            store,
        )

    def __contains__(self, seq: object) -> bool:
        return (
            isinstance(seq, int)
            and any(a <= seq <= b for a, b in self.ranges)
            and not self.in_conflict(seq)
        )

    def in_conflict(self, seq: int) -> bool:
        """The endpoint holds another record under ``seq``: it is not acknowledged."""
        return any(a <= seq <= b for a, b in self.conflicts)

    def seqs(self) -> Iterator[int]:
        for a, b in self.ranges:
            yield from range(a, b + 1)

    def to_cbor(self) -> bytes:
        doc: dict[str, Any] = {
            "ack": [[a, b] for a, b in self.ranges],
            "new": self.new,
            "dup": self.duplicate,
        }
        if self.conflict:
            doc["conflict"] = self.conflict
        if self.conflicts:
            doc["conflicts"] = [[a, b] for a, b in self.conflicts]
        if self.last is not None:
            doc["last"] = self.last
        if self.store is not None:
            doc["store"] = self.store
        return cbor2.dumps(doc, canonical=True)

    @classmethod
    def from_cbor(cls, data: bytes) -> IngestAck:
        try:
            doc = records.loads(data, max_depth=8)
        except records.RecordError as err:
            raise CodecError(f"ack: {err}") from None
        if not isinstance(doc, dict):
            raise CodecError("ack: expected a map")

        def count(key: str) -> int:
            value = doc.get(key, 0)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise CodecError(f"ack: {key} must be an unsigned integer")
            return value

        def ranges(key: str, raw: Any) -> tuple[tuple[int, int], ...]:
            if not isinstance(raw, list):
                raise CodecError(f"ack: {key!r} must be an array of [first, last]")
            out: list[tuple[int, int]] = []
            for pair in raw:
                if (
                    not isinstance(pair, list)
                    or len(pair) != 2
                    or not all(isinstance(x, int) and not isinstance(x, bool) for x in pair)
                    or not 0 <= pair[0] <= pair[1] <= MAX_SEQ
                ):
                    raise CodecError(f"ack: each {key} range is [first, last] with first <= last")
                out.append((pair[0], pair[1]))
            return tuple(out)

        last = doc.get("last")
        if last is not None and (
            not isinstance(last, int) or isinstance(last, bool) or not 0 <= last <= MAX_SEQ
        ):
            raise CodecError("ack: last must be a sequence number")
        store = doc.get("store")
        if store is not None and not (isinstance(store, str) and 0 < len(store) <= MAX_STORE_ID):
            raise CodecError(f"ack: store must be a text of 1..{MAX_STORE_ID} characters")
        return cls(
            ranges("ack", doc.get("ack")),
            count("new"),
            count("dup"),
            count("conflict"),
            ranges("conflicts", doc.get("conflicts", [])),
            last,
            store,
        )


#: Times two encodings of one record may disagree by: the compact encodings carry times in whole
#: milliseconds (agent/wire/compact.py TIME_UNIT), SenML-CBOR exactly.
TIME_TOLERANCE = 0.0005 + 1e-6


def same_record(kind: str, created: float, body: bytes, other: WireRecord) -> bool:
    """Whether ``other`` is the record stored as (kind, created, body), perhaps sent again in
    another encoding: identical bytes, or for telemetry the same sensor, time (to the
    millisecond: the compact encodings carry whole milliseconds) and values. Anything else under
    the same seq is another record (a conflict). A value off its channel's resolution grid that a
    compact encoding rounded is a conflict too: the record is then resent under a new seq (stored
    twice, never lost)."""
    if kind != other.kind or abs(created - other.created) > TIME_TOLERANCE:
        return False
    if bytes(other.body) == body:
        return True
    if kind != Kind.TELEMETRY.value:
        return False
    try:
        a = records.TelemetryBody.from_cbor(body)
        b = records.TelemetryBody.from_cbor(bytes(other.body))
    except records.RecordError:
        return False
    return a.sensor == b.sensor and a.values == b.values and abs(a.time - b.time) <= TIME_TOLERANCE
