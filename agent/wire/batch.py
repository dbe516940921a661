"""What every batch encoding shares: content-format numbers, the record as it travels
(:class:`WireRecord`), the encoding protocol, the codec's error, and the endpoint's
acknowledgement of a batch (:class:`IngestAck`, with the sequence-number ranges it covers).
"""

from __future__ import annotations

import bisect
import itertools
import math
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import cbor2

from agent.errors import AgentError
from agent.wire import records
from agent.wire.records import Kind
from drivers.clock import WALL_FLOOR

# CoAP Content-Format numbers (IANA "CoAP Content-Formats" registry).
CF_CBOR = 60  # application/cbor


CF_SENML_CBOR = 112  # application/senml+cbor


CF_LINK_FORMAT = 40  # application/link-format


MAX_SEQ = 2**63 - 1  # SQLite INTEGER
MAX_STORE_ID = 64  # characters of a storage identity in an ack
#: The wall times an ack's ``"now"`` may carry: from 2025-01-01 (drivers.clock.WALL_FLOOR: an
#: endpoint whose clock reads earlier does not say its time) to before 2100-01-01.
NOW_MIN = WALL_FLOOR
NOW_MAX = 4_102_444_800.0
#: Ranges an ack may name ("ack" and "conflicts" together): each seq of a batch is in at most one,
#: and a batch holds at most 4,096 records (the endpoint's limit), so an honest ack needs no more.
MAX_ACK_RANGES = 4096
#: The largest ack body decoded: 4,096 ranges of two 9-byte numbers (19 bytes each) and the rest
#: fit in 80 KiB.
MAX_ACK_BYTES = 96 * 1024


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


#: A sensor's name in a telemetry body: a SenML name part (RFC 8428 section 4.5.1), as the SenML
#: decoder checks the readings it carries (every configured sensor name is one).
SENSOR_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9:._-]*\Z")


#: A channel's name in a telemetry body: printable text (str.isprintable: no control, format,
#: separator or unassigned characters but the space) of at most this many UTF-8 bytes. Not the
#: SenML name part: a channel may be named "Volume Flow RateRMS" (the SKAB source), which goes as
#: ``vd``.
MAX_CHANNEL_NAME = 255


def channel_name_ok(name: str) -> bool:
    """Whether ``name`` is a channel name a record of ours may hold (:data:`MAX_CHANNEL_NAME`)."""
    return (
        0 < len(name) <= MAX_CHANNEL_NAME
        and name.isprintable()
        and len(name.encode("utf-8", "surrogatepass")) <= MAX_CHANNEL_NAME
    )


def check_telemetry_names(sensor: str, channels: Iterable[str], where: str) -> None:
    """:class:`CodecError` unless ``sensor`` and ``channels`` are names a record of ours holds
    (:data:`SENSOR_NAME`, :func:`channel_name_ok`): a name with terminal escapes, bidi
    controls or NUL is refused by every decoder, whatever carries it."""
    if not SENSOR_NAME.match(sensor):
        raise CodecError(f"{where}: sensor name {sensor[:64]!r} is not valid")
    for name in channels:
        if not channel_name_ok(name):
            raise CodecError(f"{where}: channel name {name[:64]!r} is not valid")


def check_body(kind: str, body: bytes, where: str) -> None:
    """:class:`CodecError` when ``body`` holds what no record of ``kind`` of ours holds: a CBOR
    tag (a bignum, a shared value that may contain itself), a simple value but false, true and
    null, a number no float holds (:class:`agent.wire.records.ForeignValue`), or, in a telemetry
    body, a sensor or channel name that is not valid (:func:`check_telemetry_names`). The
    decoders call this on every body they carry byte for byte.

    A body that does not decode as its kind at all (not CBOR, another shape) is carried as it is,
    as before: the store may hold one and the endpoint's views show it as undecodable. Features
    bodies are checked by :func:`agent.wire.features.check_batch`."""
    if kind == FEATURES:
        return
    try:
        decoded = records.decode_body(kind, bytes(body))
    except records.ForeignValue as err:
        raise CodecError(f"{where}: {err}") from None
    except records.RecordError:
        return
    if isinstance(decoded, records.TelemetryBody):
        check_telemetry_names(decoded.sensor, decoded.values, where)


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
    endpoint that does not say). ``now`` is the endpoint's wall clock when it answered (None: an
    endpoint that does not say, or whose clock is not set): a device without a set clock learns
    the time from it (drivers.clock.EndpointClock).
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
    # the endpoint's wall clock when it answered (seconds since the epoch; None: not said)
    now: float | None = field(default=None, compare=False)
    _firsts: tuple[int, ...] = field(init=False, repr=False, compare=False)
    _conflict_firsts: tuple[int, ...] = field(init=False, repr=False, compare=False)

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
        now: float | None = None,
    ) -> IngestAck:
        """The ack of a batch of ``seqs``, of which ``conflicts`` are not acknowledged; ``now``:
        the endpoint's wall clock, said only when it is set (:func:`said_time`)."""
        bad = set(conflicts)
        return cls(
            tuple(seq_ranges(s for s in seqs if s not in bad)),
            new,
            duplicate,
            max(conflict, len(bad)),
            tuple(seq_ranges(bad)),
            last,
            store,
            None if now is None else said_time(now),
        )

    def __post_init__(self) -> None:
        # sorted and disjoint (from_cbor refuses anything else; built by hand, they are made so),
        # with their first seqs for a binary search
        for name in ("ranges", "conflicts"):
            spans = tuple(getattr(self, name))
            if any(b[0] <= a[1] for a, b in itertools.pairwise(spans)):
                spans = _merged(spans)
            object.__setattr__(self, name, spans)
        object.__setattr__(self, "_firsts", tuple(a for a, _ in self.ranges))
        object.__setattr__(self, "_conflict_firsts", tuple(a for a, _ in self.conflicts))

    def __contains__(self, seq: object) -> bool:
        return (
            isinstance(seq, int)
            and _covered(self.ranges, self._firsts, seq)
            and not self.in_conflict(seq)
        )

    def in_conflict(self, seq: int) -> bool:
        """The endpoint holds another record under ``seq``: it is not acknowledged."""
        return _covered(self.conflicts, self._conflict_firsts, seq)

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
        if self.now is not None:
            doc["now"] = float(self.now)
        return cbor2.dumps(doc, canonical=True)

    @classmethod
    def from_cbor(cls, data: bytes) -> IngestAck:
        if len(data) > MAX_ACK_BYTES:
            raise CodecError(f"ack: {len(data)} bytes, more than {MAX_ACK_BYTES}")
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
                if out and pair[0] <= out[-1][1]:
                    raise CodecError(f"ack: {key!r} ranges must be sorted and disjoint")
                out.append((pair[0], pair[1]))
            return tuple(out)

        raw_ack, raw_conflicts = doc.get("ack"), doc.get("conflicts", [])
        named = sum(len(r) for r in (raw_ack, raw_conflicts) if isinstance(r, list))
        if named > MAX_ACK_RANGES:
            raise CodecError(f"ack: {named} ranges, more than {MAX_ACK_RANGES}")

        last = doc.get("last")
        if last is not None and (
            not isinstance(last, int) or isinstance(last, bool) or not 0 <= last <= MAX_SEQ
        ):
            raise CodecError("ack: last must be a sequence number")
        store = doc.get("store")
        if store is not None and not (isinstance(store, str) and 0 < len(store) <= MAX_STORE_ID):
            raise CodecError(f"ack: store must be a text of 1..{MAX_STORE_ID} characters")
        return cls(
            ranges("ack", raw_ack),
            count("new"),
            count("dup"),
            count("conflict"),
            ranges("conflicts", raw_conflicts),
            last,
            store,
            wall_time(doc.get("now")),
        )


def said_time(wall: float) -> float | None:
    """What an endpoint whose wall clock reads ``wall`` says in its acks' ``"now"``: nothing
    when its clock is not set (before NOW_MIN), or out of range."""
    return wall if math.isfinite(wall) and NOW_MIN <= wall < NOW_MAX else None


def wall_time(value: Any) -> float | None:
    """An ack's ``"now"``: None when absent, else a number of seconds from NOW_MIN to NOW_MAX
    (a bool, NaN, an infinity, a huge integer, a text or a structure: CodecError)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise CodecError("ack: now must be a number of seconds since the epoch")
    if isinstance(value, int) and not NOW_MIN <= value < NOW_MAX:  # before float(): no overflow
        raise CodecError(f"ack: now must be from {NOW_MIN:.0f} to {NOW_MAX:.0f}")
    now = float(value)
    if not (math.isfinite(now) and NOW_MIN <= now < NOW_MAX):
        raise CodecError(f"ack: now must be from {NOW_MIN:.0f} to {NOW_MAX:.0f}")
    return now


def _merged(spans: Iterable[tuple[int, int]]) -> tuple[tuple[int, int], ...]:
    """``spans`` sorted, with overlapping or adjacent ones merged."""
    out: list[tuple[int, int]] = []
    for a, b in sorted(spans):
        if out and a <= out[-1][1] + 1:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return tuple(out)


def _covered(ranges: tuple[tuple[int, int], ...], firsts: tuple[int, ...], seq: int) -> bool:
    """Whether one of the sorted, disjoint ``ranges`` (``firsts``: their first seqs) holds
    ``seq``."""
    i = bisect.bisect_right(firsts, seq) - 1
    return i >= 0 and seq <= ranges[i][1]


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
