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
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, ClassVar, Self

import cbor2

from agent.errors import AgentError


class RecordError(AgentError, ValueError):
    """A record body does not decode, or holds a value of the wrong type."""


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


def loads(data: bytes, max_depth: int = 64) -> Any:
    """Decode exactly one CBOR item, strictly: trailing bytes, duplicate map keys and nesting
    deeper than ``max_depth`` are errors. Every problem is a :class:`RecordError`."""
    fp = io.BytesIO(data)
    try:
        decoder = cbor2.CBORDecoder(fp, max_depth=max_depth, allow_duplicate_keys=False)
        item = decoder.decode()
    except Exception as err:  # hostile input makes cbor2 raise many kinds; all mean "bad CBOR"
        raise RecordError(f"not valid CBOR: {err}") from None
    if fp.tell() != len(data):
        raise RecordError(f"{len(data) - fp.tell()} bytes after the CBOR item")
    return item


def _time(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise RecordError(f"{what}: time must be a number, not {type(value).__name__}")
    return float(value)


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
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise RecordError(f"telemetry body: value of {channel!r} must be a number")
            out[channel] = float(value)
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
        return cls(_time(item[0], f"{cls.kind} body"), item[1])


@dataclass(frozen=True)
class AlertBody(_TimedData):
    """An alert of the detector: ``data`` is ``Alert.to_dict()`` (score, threshold, top channels,
    verdict, fault class, raise/clear)."""

    kind: ClassVar[Kind] = Kind.ALERT


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
    except RecordError:
        return default
    return time if math.isfinite(time) else default
