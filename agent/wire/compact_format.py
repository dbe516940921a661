"""The compact batch format's constants and what its encoder (agent/wire/compact.py) and its
decoder (agent/wire/compact_read.py) share: content formats and limits, the group ids of records
that travel with their bodies, the time columns (milliseconds, delta-of-delta) and the bound on
the bytes a batch may rebuild. docs/protocol.md describes the format."""

from __future__ import annotations

import functools
import itertools
import operator
import struct
from collections.abc import Iterable, Sequence

from agent.wire.batch import FEATURES, CodecError
from agent.wire.packing import (
    MAX_NAME,
    _Reader,
    _varint,
    _varints,
    _zigzags,
    unzigzag,
    zigzag,
)
from agent.wire.records import Kind

CF_COMPACT = 65000
CF_COMPACT_DEFLATE = 65001
CF_COMPACT_DICT = 65002

FORMAT_VERSION = 1
FLAG_SPLIT = 0x01  # value residuals as token bytes + extra bits after the byte section
FLAG_FEATURES = 0x02  # the batch holds features records: id 4 = features, columnar groups from 5
TIME_UNIT = 1000  # time resolution: 1/TIME_UNIT s (1 ms)
DEFAULT_DICTIONARY = 1
DEFLATE_LEVEL = 9
MAX_INFLATED = 4 * 1024 * 1024  # a compressed batch may not inflate to more (a bomb otherwise)
MAX_RECORDS = 65536  # records in a batch (the endpoint takes 4096 by default)
MAX_DECODED = 16 * 1024 * 1024  # bytes of telemetry bodies a batch may rebuild
AGGREGATE_SUFFIXES = ("/min", "/mean", "/max")

# Group ids of records that travel with their body bytes; columnar groups follow from 4.
_OPAQUE_KINDS = (Kind.ALERT.value, Kind.EVENT.value, Kind.STATE.value, Kind.TELEMETRY.value)
_OPAQUE_ID = {k: i for i, k in enumerate(_OPAQUE_KINDS)}
_FIRST_GROUP = len(_OPAQUE_KINDS)
# With FLAG_FEATURES: features records (agent/wire/features.py) travel with their body as id 4.
_OPAQUE_KINDS_FEATURES = (*_OPAQUE_KINDS, FEATURES)
_OPAQUE_ID[FEATURES] = len(_OPAQUE_KINDS)

_MAX_VALUE = 1e300  # larger values go as bodies (their steps could overflow a double)
# A value on the grid of a step up to this, at most 2**53 steps from 0, is within _MAX_VALUE
# (|n * r| <= 2**53 * r, and the division rounds it by less than a factor 1 + 2**-52).
_HUGE_STEP = _MAX_VALUE / 2**54
_MAX_MS = 2**62

_F64 = struct.Struct(">d")
_Q64 = struct.Struct(">Q")


def _short(name: str) -> bool:
    """Whether ``name`` fits the group table (at most MAX_NAME bytes in UTF-8)."""
    return len(name) <= MAX_NAME // 4 or len(name.encode("utf-8")) <= MAX_NAME


def _check_decoded_size(groups: Iterable[tuple[str, Sequence[str], int]]) -> None:
    """:class:`CodecError` unless the telemetry bodies of (sensor, channels, rows) groups fit
    MAX_DECODED bytes (an upper bound of each body: names, a double per value, CBOR heads)."""
    total = 0
    for sensor, channels, rows in groups:
        total += rows * _body_bound(sensor, tuple(channels))
    if total > MAX_DECODED:
        raise CodecError(f"the batch would decode to more than {MAX_DECODED} bytes")


@functools.lru_cache(maxsize=1024)
def _body_bound(sensor: str, channels: tuple[str, ...]) -> int:
    """The upper bound of one telemetry body's size of :func:`_check_decoded_size`."""
    return 17 + len(sensor.encode()) + sum(11 + len(ch.encode()) for ch in channels)


def _write_times(out: bytearray, times: Sequence[int], created: Sequence[int], base: int) -> None:
    """A group's time column (ms: the first against the batch's base, then the first delta, then
    delta-of-delta) and its created column (against the time)."""
    _varint(out, zigzag(times[0] - base))
    if len(times) > 1:
        deltas = list(map(operator.sub, itertools.islice(times, 1, None), times))
        _varint(out, zigzag(deltas[0]))
        # each delta minus the one before
        _varints(out, _zigzags(map(operator.sub, itertools.islice(deltas, 1, None), deltas)))
    _varints(out, _zigzags(map(operator.sub, created, times)))


def _read_times(r: _Reader, n: int, base: int) -> tuple[list[int], list[int]]:
    """The time and created columns of a group of ``n`` readings (ms)."""
    times = [base + unzigzag(r.varint())]
    if n > 1:
        d = unzigzag(r.varint())
        times.append(times[0] + d)
        for _ in range(n - 2):
            d += unzigzag(r.varint())
            times.append(times[-1] + d)
    created = [t + unzigzag(r.varint()) for t in times]
    if any(abs(t) > _MAX_MS for t in times) or any(abs(c) > _MAX_MS for c in created):
        raise CodecError("a time is out of range")
    return times, created


_MAX_SECONDS = _MAX_MS / TIME_UNIT
