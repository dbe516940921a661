"""Record bodies: what the durable store keeps as each record's CBOR payload.

A store record carries a ``kind`` (alert, event, state, telemetry) and a payload of CBOR bytes.
This module defines the body of each kind as a small frozen dataclass with ``to_cbor()`` and
``from_cbor()``; the wire codec (:mod:`agent.wire.codec`) and the cloud endpoint decode the same
bytes.

Encoding (CDDL, see docs/protocol.md "Record bodies")::

    telemetry-body = [sensor: tstr, time: float, values: { * tstr => float }]
    alert-body     = [time: float, alert: { * any => any }]
    event-body     = [time: float, data: { * any => any }]
    state-body     = [time: float, data: { * any => any }]

Bodies are encoded deterministically (RFC 8949 section 4.2.1 as cbor2's ``canonical`` mode does
it: shortest float that holds the value exactly, map keys sorted), so the same body always gives
the same bytes. Times are wall-clock seconds since the Unix epoch. The dicts of alerts, events
and state are opaque here: any CBOR-native content (str, int, float, bool, None, bytes, lists,
dicts); tuples come back as lists.

What no record of ours holds is refused by the decoder (:func:`loads`), whatever the format that
carries it: every semantic tag (none of our formats uses one: not epoch times, not bignums, not
value sharing), so an integer is one of CBOR's major types 0 and 1 (-2**64 .. 2**64-1) and no
value contains itself. The opaque maps hold plain values only (:func:`check_plain`): no
``undefined`` and no other simple value than false, true and null.
"""

from __future__ import annotations

import io
import math
from collections.abc import Collection, Mapping
from dataclasses import dataclass, replace
from enum import StrEnum
from typing import Any, ClassVar, Self

import cbor2

from agent.errors import AgentError


class RecordError(AgentError, ValueError):
    """A record body does not decode, or holds a value of the wrong type."""


class ForeignValue(RecordError):
    """Well-formed CBOR that holds what no record of ours holds: a semantic tag (a bignum, a
    shared value), ``undefined`` or another simple value, a number no float holds. Crafted, not
    corrupted: the endpoint refuses a record whose body holds one
    (:func:`agent.wire.batch.check_body`)."""


class Kind(StrEnum):
    """The kinds of record; equal to the store's kind strings."""

    ALERT = "alert"
    EVENT = "event"
    STATE = "state"
    TELEMETRY = "telemetry"


def dumps(obj: Any) -> bytes:
    """Deterministic CBOR: the encoding every body uses."""
    try:
        return cbor2.dumps(obj, canonical=True)
    except (cbor2.CBOREncodeError, TypeError, ValueError) as err:
        raise RecordError(f"cannot encode as CBOR: {err}") from err


def loads_bounded(data: bytes, limit: int, max_depth: int = 64) -> Any:
    """:func:`loads` of a body that may be at most ``limit`` bytes (checked before decoding)."""
    if len(data) > limit:
        raise RecordError(f"{len(data)} bytes, at most {limit}")
    return loads(data, max_depth)


class _TagRefused(Exception):
    """Raised by the decoder's tag handlers: the item holds a semantic tag."""


def _refuse_tag(*_: Any) -> Any:
    raise _TagRefused


class _NoTags(dict[int, Any]):
    """The decoder's semantic decoders: every tag is refused. cbor2 decodes these tags itself
    (bignums 2/3, epoch and text times 0/1/100/1004, value sharing 28/29, string references
    25/256, sets 258, the self-describe tag 55799, ...); each is named, and any other tag it
    looks up is refused too (``__missing__``), as is any tag it hands to the tag hook."""

    def __missing__(self, tag: int) -> Any:
        return _refuse_tag

    def __contains__(self, tag: object) -> bool:
        return True

    def get(self, tag: int, default: Any = None) -> Any:  # type: ignore[override]
        return _refuse_tag


#: The semantic tags cbor2 6.x decodes by itself (found by decoding tag N of 0 for N < 70000).
_CBOR2_TAGS = (0, 1, 2, 3, 4, 5, 25, 28, 29, 30, 35, 36, 37, 52, 54, 100, 256, 258, 260, 261)
_NO_TAGS = _NoTags(dict.fromkeys((*_CBOR2_TAGS, 1004, 43000, 55799), _refuse_tag))


_TAG_NAMES = {
    0: "a date/time text",
    1: "an epoch datetime",
    2: "a bignum: an integer beyond the 64-bit range of CBOR's integers",
    3: "a negative bignum: an integer beyond the 64-bit range of CBOR's integers",
    4: "a decimal fraction",
    5: "a bigfloat",
    28: "a shareable value",
    29: "a shared value (a reference, perhaps to a value that contains it)",
}


def _tag_refused(err: BaseException) -> ForeignValue:
    """The refusal of the tag cbor2's ``error decoding semantic tag N`` names."""
    words = str(err).split()
    tag = int(words[-1]) if words and words[-1].isdigit() else None
    what = f"semantic tag {tag}" if tag is not None else "a semantic tag"
    if tag in _TAG_NAMES:
        what += f", {_TAG_NAMES[tag]}"
    return ForeignValue(f"{what} (none of our formats uses CBOR tags)")


def loads(data: bytes, max_depth: int = 64) -> Any:
    """Decode exactly one CBOR item, strictly: trailing bytes, duplicate map keys, nesting
    deeper than ``max_depth`` and semantic tags (so bignums and shared, perhaps cyclic, values)
    are errors. Every problem is a :class:`RecordError`."""
    fp = io.BytesIO(data)
    try:
        decoder = cbor2.CBORDecoder(
            fp,
            max_depth=max_depth,
            allow_duplicate_keys=False,
            semantic_decoders=_NO_TAGS,
            tag_hook=_refuse_tag,
        )
        item = decoder.decode()
    except _TagRefused as err:
        raise _tag_refused(err) from None
    except Exception as err:  # hostile input makes cbor2 raise many kinds; all mean "bad CBOR"
        if isinstance(err.__cause__ or err.__context__, _TagRefused):  # "... semantic tag N"
            raise _tag_refused(err) from None
        raise RecordError(f"not valid CBOR: {err}") from None
    if fp.tell() != len(data):
        raise RecordError(f"{len(data) - fp.tell()} bytes after the CBOR item")
    return item


_PLAIN_SCALARS = (str, int, float, bool, bytes, type(None))


def check_plain(value: Any, what: str) -> None:
    """:class:`ForeignValue` unless ``value`` is made of what our records hold: text, numbers,
    booleans, null, byte strings, arrays and maps (no ``undefined``, no other simple value).
    Iterative, and a container met twice (shared, or containing itself: CBOR tags 28/29, which
    :func:`loads` refuses anyway) is refused rather than walked again."""
    todo = [value]
    seen: set[int] = set()
    while todo:
        item = todo.pop()
        if isinstance(item, dict | list):
            if id(item) in seen:
                raise ForeignValue(f"{what}: a value that is shared or contains itself")
            seen.add(id(item))
            if isinstance(item, dict):
                todo.extend(item.keys())
                todo.extend(item.values())
            else:
                todo.extend(item)
        elif not isinstance(item, _PLAIN_SCALARS):
            raise ForeignValue(f"{what}: {item!r} is not a value our records hold")


def _float(value: Any, what: str) -> float:
    """A CBOR number as a float; :class:`RecordError` for anything else (a bool, a number no
    float holds)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise RecordError(f"{what} must be a number, not {type(value).__name__}")
    try:
        return float(value)
    except (OverflowError, ValueError):
        raise ForeignValue(f"{what} is out of range") from None


def _time(value: Any, what: str) -> float:
    return _float(value, f"{what}: time")


@dataclass(frozen=True)
class TelemetryBody:
    """One reading of a sensor: its name, the wall time it was taken, and a value per channel."""

    kind: ClassVar[Kind] = Kind.TELEMETRY

    sensor: str
    time: float
    values: dict[str, float]

    def to_cbor(self) -> bytes:
        return dumps([self.sensor, float(self.time), {k: float(v) for k, v in self.values.items()}])

    @classmethod
    def from_cbor(cls, data: bytes) -> Self:
        item = loads(data)
        if not isinstance(item, list) or len(item) != 3:
            raise RecordError("telemetry body: expected [sensor, time, values]")
        sensor, time, values = item
        if not isinstance(sensor, str):
            raise RecordError("telemetry body: sensor must be a text string")
        if not isinstance(values, dict):
            raise RecordError("telemetry body: values must be a map")
        out: dict[str, float] = {}
        for channel, value in values.items():
            if not isinstance(channel, str):
                raise RecordError("telemetry body: channel names must be text strings")
            out[channel] = _float(value, f"telemetry body: value of {channel!r}")
        return cls(sensor, _time(time, "telemetry body"), out)


@dataclass(frozen=True)
class _TimedData:
    """A wall time and an opaque CBOR map."""

    kind: ClassVar[Kind]

    time: float
    data: dict[Any, Any]

    def to_cbor(self) -> bytes:
        return dumps([float(self.time), dict(self.data)])

    @classmethod
    def from_cbor(cls, data: bytes) -> Self:
        item = loads(data)
        if not isinstance(item, list) or len(item) != 2 or not isinstance(item[1], dict):
            raise RecordError(f"{cls.kind} body: expected [time, map]")
        check_plain(item[1], f"{cls.kind} body")
        return cls(_time(item[0], f"{cls.kind} body"), item[1])


@dataclass(frozen=True)
class AlertBody(_TimedData):
    """An alert of the detector: ``data`` is ``Alert.to_dict()`` (score, threshold, top channels,
    verdict, fault class, raise/clear)."""

    kind: ClassVar[Kind] = Kind.ALERT


def alert_withheld(doc: Mapping[Any, Any], private: Collection[str]) -> dict[Any, Any]:
    """An alert's content with nothing of the ``private`` model channels (read from ``local``
    sensor channels, docs/protocol.md "Features records"): no window (it holds every channel's
    model input), no per-channel detail of them; ``window_withheld`` says so."""
    out = {k: v for k, v in doc.items() if k != "window"}
    if isinstance(doc.get("channels"), list):
        shown = [c for c in doc["channels"] if not (isinstance(c, list) and c and c[0] in private)]
        out["channels"] = shown
    return {**out, "window_withheld": True}


@dataclass(frozen=True)
class EventBody(_TimedData):
    """Something that happened on the device (sensor degraded/recovered, model swapped)."""

    kind: ClassVar[Kind] = Kind.EVENT


@dataclass(frozen=True)
class StateBody(_TimedData):
    """A snapshot of reported state."""

    kind: ClassVar[Kind] = Kind.STATE


Body = TelemetryBody | AlertBody | EventBody | StateBody

BODY_TYPES: Mapping[str, type[TelemetryBody] | type[_TimedData]] = {
    Kind.TELEMETRY: TelemetryBody,
    Kind.ALERT: AlertBody,
    Kind.EVENT: EventBody,
    Kind.STATE: StateBody,
}


def decode_body(kind: str, data: bytes) -> Body:
    """The body of a record of ``kind``; :class:`RecordError` if it does not decode."""
    try:
        cls = BODY_TYPES[kind]
    except KeyError:
        raise RecordError(f"unknown record kind {kind!r}") from None
    return cls.from_cbor(data)  # type: ignore[return-value]


def body_time(kind: str, data: bytes, default: float) -> float:
    """The wall time in a body; ``default`` when the body does not decode or is not finite."""
    try:
        time = decode_body(kind, data).time
    except (RecordError, OverflowError, ValueError):  # RecordError is one; the rest, in case
        return default
    return time if math.isfinite(time) else default


#: The keys of an alert's map that hold wall-clock times too (``Alert.to_dict``).
ALERT_TIMES = ("time", "change_time")


def restamped(kind: str, data: bytes, shift: float) -> bytes:
    """The body ``data`` of a record of ``kind`` with its time moved by ``shift`` seconds (an
    alert's :data:`ALERT_TIMES` too), for records stamped before the wall clock was set
    (docs/store.md); :class:`RecordError` if it does not decode."""
    body = decode_body(kind, data)
    if isinstance(body, TelemetryBody):
        return replace(body, time=body.time + shift).to_cbor()
    moved = dict(body.data)
    if kind == Kind.ALERT:
        for key in ALERT_TIMES:
            value = moved.get(key)
            if isinstance(value, int | float) and not isinstance(value, bool):
                moved[key] = float(value) + shift
    return replace(body, time=body.time + shift, data=moved).to_cbor()
