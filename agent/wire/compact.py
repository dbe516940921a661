"""Compact columnar batch encodings for poor links (content formats 65000, 65001, 65002).

A batch of store records becomes columns: the readings of each (sensor, channel set) are one
group, with a time column (milliseconds, delta-of-delta) and a created column (both shared by
groups read at the same times), and one column per channel of integers at the channel's
resolution, coded against a predictor chosen per column and batch. Other records (alerts,
events, state, telemetry that does not fit) travel with their body bytes unchanged. The batch is
self-describing: names, resolutions and predictors are in it, so the endpoint decodes it knowing
nothing of the device. docs/protocol.md ("Compact batches") is the normative text; in short:

- 65000 ``compact``: the columns as zigzag varints, no compression;
- 65001 ``compact+deflate``: value residuals split into a token byte (deflate codes it) and raw
  extra bits (incompressible, appended after the raw deflate stream);
- 65002 ``compact+deflate+dict``: as 65001 with a preset deflate dictionary (zlib ``zdict``)
  named by its id (a varint) first, so small batches need not spell out names and structure.

What a round trip keeps:

- seq, kind, and for non-telemetry records ``created`` and body bytes: exactly;
- a reading's time and ``created``: to the millisecond, ``decoded == round(t * 1000) / 1000``;
- a value ``x`` of a channel with resolution ``r``: ``q = round(x / r)`` steps of ``r``, decoded
  as the double nearest to ``q * r`` where ``r`` is the shortest decimal that reads back as the
  same double (:func:`quantize`; 17 steps of 0.1 give 1.7, not ``17 * 0.1``), so within
  ``r / 2`` (plus one rounding) of ``x``;
- a value of a channel with no resolution: exactly (a float64, XOR of the previous one's bits).

A telemetry record whose body is not a canonical ``telemetry-body``, or holds a non-finite value
or one too large for its resolution (``|x / r| > 2**53``), is sent with its body bytes, exactly.

The encoder needs each channel's resolution: ``resolution(sensor, channel)`` returns the step
(or None: unknown). ``<channel>/min``, ``/mean`` and ``/max`` (the aggregates of downsampled
telemetry at the low link level) fall back to the resolution of ``<channel>``.
Names longer than :data:`MAX_NAME` bytes also go as bodies.

Decoding is bounded whatever the bytes: at most :data:`MAX_INFLATED` bytes inflated,
:data:`MAX_RECORDS` records and :data:`MAX_DECODED` bytes of rebuilt telemetry bodies; every count
in a batch is checked against the bytes left before anything is allocated for it.

Bad input never raises anything but :class:`~agent.wire.batch.CodecError`.
"""

from __future__ import annotations

import functools
import itertools
import math
import operator
import re
import struct
import zlib
from collections.abc import Mapping, Sequence
from typing import Any

import cbor2

from agent.wire.batch import (
    DEVICE_ID,
    FEATURES,
    CodecError,
    Resolution,
    WireRecord,
    _check_record,
)
from agent.wire.compact_dict import DICTIONARIES
from agent.wire.compact_format import (
    _F64,
    _FIRST_GROUP,
    _HUGE_STEP,
    _MAX_MS,
    _MAX_SECONDS,
    _MAX_VALUE,
    _OPAQUE_ID,
    AGGREGATE_SUFFIXES,
    CF_COMPACT,
    CF_COMPACT_DEFLATE,
    CF_COMPACT_DICT,
    DEFAULT_DICTIONARY,
    DEFLATE_LEVEL,
    FLAG_FEATURES,
    FLAG_SPLIT,
    FORMAT_VERSION,
    MAX_DECODED,
    MAX_INFLATED,
    MAX_RECORDS,
    TIME_UNIT,
    _check_decoded_size,
    _short,
    _write_times,
)
from agent.wire.compact_read import CompactDecoding
from agent.wire.packing import (
    _BitWriter,
    _count,
    _put_text,
    _shift,
    _shift_tables,
    _tokens0,
    _varint,
    _varints,
    _zigzags,
    zigzag,
)
from agent.wire.predict import (
    _MAX_EXP,
    _MAX_Q,
    P_FLOAT,
    _choose_column,
    _decimal,
    _from_decimal,
    _params_bytes,
    step_ratio,
)
from agent.wire.records import Kind
from agent.wire.senml import SenMLCBOR, _float_cbor, _head

__all__ = [  # what other modules take from here (the format's constants live in compact_format)
    "AGGREGATE_SUFFIXES",
    "CF_COMPACT",
    "CF_COMPACT_DEFLATE",
    "CF_COMPACT_DICT",
    "COMPACT",
    "COMPACT_DEFLATE",
    "COMPACT_DICT",
    "DEFAULT_DICTIONARY",
    "DEFLATE_LEVEL",
    "FLAG_SPLIT",
    "FORMAT_VERSION",
    "MAX_DECODED",
    "MAX_INFLATED",
    "MAX_RECORDS",
    "TIME_UNIT",
    "CompactEncoding",
    "Resolution",
    "table_bytes",
]

# -- resolutions -------------------------------------------------------------------------------


_GOOD_RESOLUTIONS: set[float] = set()  # floats that passed check_resolution (a few, every batch)


def check_resolution(res: Any, sensor: str, channel: str) -> float | None:
    if res is None:
        return None
    if type(res) is float and res in _GOOD_RESOLUTIONS:  # > 0, so == is the same double
        return res
    if isinstance(res, bool) or not isinstance(res, int | float):
        raise CodecError(f"resolution of {sensor}/{channel} must be a number, not {res!r}")
    res = float(res)
    if not (math.isfinite(res) and res > 0.0):
        raise CodecError(f"resolution of {sensor}/{channel} must be finite and > 0, not {res!r}")
    m, e = _decimal(res)
    if abs(e) > _MAX_EXP or _from_decimal(m, e) != res:
        raise CodecError(f"resolution {res!r} of {sensor}/{channel} cannot be sent exactly")
    if len(_GOOD_RESOLUTIONS) < 4096:
        _GOOD_RESOLUTIONS.add(res)
    return res


def _lookup(resolution: Resolution | None, sensor: str, channel: str) -> float | None:
    if resolution is None:
        return None
    try:
        res = resolution(sensor, channel)
        if res is None:
            for suffix in AGGREGATE_SUFFIXES:
                if channel.endswith(suffix) and len(channel) > len(suffix):
                    res = resolution(sensor, channel[: -len(suffix)])
                    break
    except Exception as err:  # the caller's function: its failure is this batch's failure
        raise CodecError(f"resolution({sensor!r}, {channel!r}) failed: {err!r}") from err
    return check_resolution(res, sensor, channel)


def table_bytes(groups: Sequence[tuple[str, Sequence[str], Sequence[float | None]]]) -> bytes:
    """The group table of a batch: for each (sensor, channels, resolutions), in order."""
    out = bytearray()
    _varint(out, len(groups))
    for sensor, channels, steps in groups:
        out += _table_entry(sensor, tuple(channels), tuple(steps))
    return bytes(out)


@functools.lru_cache(maxsize=1024, typed=True)
def _table_entry(sensor: str, channels: tuple[str, ...], steps: tuple[float | None, ...]) -> bytes:
    """One group of the table (the same few every batch: remembered)."""
    out = bytearray()
    _put_text(out, sensor)
    _varint(out, len(channels))
    for channel, res in zip(channels, steps, strict=True):
        _put_text(out, channel)
        if res is None:
            out.append(0)
        else:
            m, e = _decimal(res)
            out.append(1)
            _varint(out, m)
            _varint(out, zigzag(e))
    return bytes(out)


# -- the encoding ------------------------------------------------------------------------------


# zlib strategies tried on every batch (the smallest wins): on token bytes of high entropy, fewer
# short matches (filtered, Huffman only) often beat the default, by about 3 % on SKAB.
_STRATEGIES = (zlib.Z_DEFAULT_STRATEGY, zlib.Z_FILTERED, zlib.Z_HUFFMAN_ONLY, zlib.Z_RLE)


# A small batch deflates with a smaller window and hash table, which make the same stream: the
# compressor's setup (allocating and clearing them, four times a batch) costs more than deflating
# a few hundred bytes. In zlib's deflate.c (raw deflate: no header names the window), a window of
# 2**w bytes instead of 2**15 changes only the farthest match (MAX_DIST = 2**w - MIN_LOOKAHEAD),
# when the window slides (strstart >= 2 * 2**w - MIN_LOOKAHEAD), prev[pos & (2**w - 1)] (chains
# of positions 2**w apart), and a dictionary of 2**w bytes or more (only its tail is used): none
# comes into play while the dictionary and the data together are at most MAX_DIST bytes (all is
# read at once, and the bytes after the data are zeros either way). The hash table
# (2**(memLevel + 7) heads) only decides which positions share a chain; candidates are checked
# byte by byte, so a smaller table only adds positions that never match, which matters only when
# a chain is longer than the search follows (level 9: 4096, a quarter after a good match): never
# with at most 1024 bytes in all. memLevel also sizes the symbol buffer (a block ends after
# 2**(memLevel + 6) - 1 symbols): the data must make fewer. The version check keeps this to the
# reference zlib (zlib-ng and other forks name themselves in their version; their internals
# differ). Tests compare the streams with those of (-15, 9).
_MIN_LOOKAHEAD = 262  # zlib's MIN_LOOKAHEAD: MAX_MATCH + MIN_MATCH + 1
_CHAIN_BUDGET = 4096 >> 2  # zlib's max_chain at level 9, a quarter after a good match
_REFERENCE_ZLIB = re.fullmatch(r"1\.\d+(\.\d+)*", zlib.ZLIB_RUNTIME_VERSION) is not None


def _deflate_params(data: int, zdict: int) -> tuple[int, int]:
    """(wbits, memLevel) that deflate ``data`` bytes after a ``zdict``-byte dictionary into the
    same stream as (-15, 9), cheaper to set up when they are few."""
    if not _REFERENCE_ZLIB or DEFLATE_LEVEL != 9:
        return -15, 9
    total = data + zdict
    wbits = next((w for w in range(9, 15) if total <= (1 << w) - _MIN_LOOKAHEAD), 15)
    mem = 9
    if total <= _CHAIN_BUDGET:
        mem = next((m for m in range(1, 9) if data <= (1 << (m + 6)) - 2), 9)
    return -wbits, mem


def _deflate(data: bytes, zdict: bytes) -> bytes:
    """``data`` as a raw deflate stream (RFC 1951), preset dictionary ``zdict`` (may be empty)."""
    best = b""
    wbits, mem = _deflate_params(len(data), len(zdict))
    for strategy in _STRATEGIES:
        comp = zlib.compressobj(DEFLATE_LEVEL, zlib.DEFLATED, wbits, mem, strategy, zdict)
        out = comp.compress(data) + comp.flush()
        if not best or len(out) < len(best):
            best = out
    return best


class _Group:
    """The columnar readings of one (sensor, channels) in a batch: first the rows of the records
    that may go in it (:meth:`CompactEncoding._parse_row`), then its columns
    (:meth:`CompactEncoding._fill_columns`)."""

    __slots__ = (
        "channels",
        "created",
        "failed",
        "indexes",
        "key",
        "number",
        "res",
        "rows",
        "sensor",
        "steps",
        "times",
        "values",
    )

    def __init__(self, sensor: str, channels: tuple[str, ...]) -> None:
        self.key = (sensor, channels)
        self.sensor = sensor
        self.channels = channels
        self.res: list[float | None] = []
        # each resolution with its exact fraction: (res, numerator, denominator), or None
        self.steps: list[tuple[float, int, int] | None] = []
        self.times: list[int] = []
        self.created: list[int] = []
        self.indexes: list[int] = []  # of the records
        self.rows: list[Sequence[float]] = []  # their values, in channel order
        self.failed: set[int] = set()  # indexes of records that go with their bodies after all
        self.number = 0  # its id in the batch (the table's order, from _FIRST_GROUP)
        self.values: list[list[Any]] = [[] for _ in channels]  # q (int) or float


class _Layout:
    """The bytes of the canonical telemetry bodies of a :class:`_Shape` whose time takes
    ``width`` bytes and whose values all take 8 (most readings): fixed segments (the array
    head, the sensor and the time's initial byte; the map head, the first key and 0xfb; each
    further key and 0xfb), each followed by the bytes of a float."""

    __slots__ = ("as_floats", "as_raw", "segments", "shape", "time_head")

    def __init__(self, shape: _Shape, time_head: int, width: int, fmt: str) -> None:
        self.shape = shape
        self.time_head = bytes((time_head,))
        self.segments = (
            shape.head + self.time_head,
            shape.map_head + shape.keys[0] + b"\xfb",
            *(k + b"\xfb" for k in shape.keys[1:]),
        )
        s0, *rest = (f"{len(s)}s" for s in self.segments)
        # the floats' bytes (the values' as integers), and the floats
        self.as_raw = struct.Struct(f">{s0}{width}s" + "".join(f"{s}Q" for s in rest))
        self.as_floats = struct.Struct(f">{s0}{fmt}" + "".join(f"{s}d" for s in rest))


class _Shape:
    """What the canonical telemetry bodies of one (sensor, channels) share: the CBOR of the array
    head and the sensor, the map head, and the channels' keys (channels in canonical order)."""

    __slots__ = ("channels", "head", "keys", "layouts", "map_head", "sensor")

    def __init__(self, sensor: str, channels: tuple[str, ...], keys: tuple[bytes, ...]) -> None:
        self.sensor = sensor
        self.channels = channels
        self.head = b"\x83" + _cbor_text(sensor)
        self.map_head = _head(5, len(keys))
        self.keys = keys
        # a time of 2, 4 or 8 bytes (float16, float32, float64)
        self.layouts = [
            _Layout(self, head, width, fmt)
            for head, width, fmt in ((0xF9, 2, "e"), (0xFA, 4, "f"), (0xFB, 8, "d"))
        ]


def _cbor_text(text: str) -> bytes:
    raw = text.encode("utf-8")
    return _head(3, len(raw)) + raw


def _shape(sensor: str, channels: tuple[str, ...]) -> _Shape | None:
    """The :class:`_Shape` of canonical bodies with these channels in this order; None when no
    canonical body has them so (a name is not UTF-8, or the order is not canonical)."""
    try:
        keys = tuple(_cbor_text(ch) for ch in channels)
        _cbor_text(sensor)
    except UnicodeEncodeError:
        return None
    # SenMLCBOR.reading_body sorts (key, value) pairs, then by key length (stable): the keys are
    # distinct, so that is the order of (len(key), key), whatever the values
    if list(keys) != sorted(keys, key=lambda k: (len(k), k)):
        return None
    return _Shape(sensor, channels, keys)


_SHAPES_LIMIT = 4096
_DOUBLE_ONLY = 0x1FFFFFFF  # float64 mantissa bits beyond a float32's: with any set, only 8 bytes do


def _quantize(xs: Sequence[float], r: float, num: int, den: int) -> list[int] | None:
    """``round(x / r)`` of each value, when every one of them passes the checks of one reading
    (:meth:`CompactEncoding._quantize_row`); else None.

    Over a column at once: round() refuses NaN and infinities (ValueError, OverflowError), which
    the checks refuse; ``|x / r| <= 2**53`` exactly when ``|round(x / r)| <= 2**53`` (doubles
    above 2**53 are integers); the grid check compares the lists; -0.0 is looked for among the
    values that round to 0."""
    try:
        ns = [round(x / r) for x in xs]
    except (ValueError, OverflowError):
        return None
    if max(ns) > _MAX_Q or min(ns) < -_MAX_Q:
        return None
    # |x| <= _MAX_VALUE follows from the grid check below for all but huge steps
    if r > _HUGE_STEP and (max(xs) > _MAX_VALUE or min(xs) < -_MAX_VALUE):
        return None
    if [n * num / den for n in ns] != xs:  # dequantize(n, num, den) != x
        return None
    if 0 in ns and any(n == 0 and math.copysign(1.0, x) < 0.0 for n, x in zip(ns, xs, strict=True)):
        return None
    return ns


class CompactEncoding(CompactDecoding):
    """The compact columnar batch format under one content format (docs/protocol.md)."""

    def __init__(
        self,
        content_format: int,
        name: str,
        *,
        deflate: bool,
        dictionary: int | None = None,
        dictionaries: Mapping[int, bytes] = DICTIONARIES,
    ) -> None:
        if dictionary is not None and (not deflate or dictionary not in dictionaries):
            raise ValueError(f"dictionary {dictionary} needs deflate and must be known")
        self.content_format = content_format
        self.name = name
        self.deflate = deflate
        self.dictionary = dictionary
        self.dictionaries = dict(dictionaries)
        self._bodies = SenMLCBOR()  # writes canonical telemetry bodies
        self._shapes: dict[tuple[str, tuple[str, ...]], _Shape | None] = {}
        self._layouts: dict[int, list[_Layout]] = {}  # the layouts of the shapes, by size

    # -- encoding ------------------------------------------------------------------------------

    def _reading(
        self, rec: WireRecord
    ) -> tuple[str, float, tuple[str, ...], Sequence[float]] | None:
        """(sensor, time, channels, values in channel order) of a canonical telemetry body; None
        if it goes as a body."""
        body = rec.body
        # Most bodies have a known layout with 8-byte values: matching it byte for byte (every
        # fixed segment; every value needs 8 bytes and none is NaN, which is written in 3; the
        # time is written as _float_cbor writes it) is matching the bytes reading_body() writes
        # for what cbor2.loads() reads from them.
        for layout in self._layouts.get(len(body), ()):
            raw = layout.as_raw.unpack(body)
            if raw[0::2] != layout.segments:
                continue
            if all(map(operator.and_, raw[3::2], itertools.repeat(_DOUBLE_ONLY))):
                floats = layout.as_floats.unpack(body)[1::2]
                if (
                    all(map(operator.eq, floats, floats))
                    and _float_cbor(floats[0]) == layout.time_head + raw[1]
                ):
                    shape = layout.shape
                    return shape.sensor, floats[0], shape.channels, floats[1:]
            break  # another layout cannot have the same segments
        try:
            item = cbor2.loads(body)
        except Exception:  # any undecodable body goes as it is
            return None
        if type(item) is not list or len(item) != 3:
            return None
        sensor, time, values = item
        if type(sensor) is not str or type(time) is not float or type(values) is not dict:
            return None
        if not values:
            return None
        for k, v in values.items():
            if type(k) is not str or type(v) is not float:
                return None
        # canonical: the bytes SenMLCBOR.reading_body writes for it, put together here from what
        # all bodies of these channels share and the encoding of each float
        channels = tuple(values)
        shape = self._shape(sensor, channels)
        if shape is None:
            return None
        parts = [shape.head, _float_cbor(time), shape.map_head]
        for k, x in zip(shape.keys, values.values(), strict=True):  # in canonical order
            parts.append(k)
            parts.append(_float_cbor(x))
        if b"".join(parts) != body:
            return None
        return sensor, time, channels, tuple(values.values())

    def _shape(self, sensor: str, channels: tuple[str, ...]) -> _Shape | None:
        """:func:`_shape`, remembered (names repeat in every batch), its layout too."""
        key = (sensor, channels)
        shapes = self._shapes
        if key in shapes:
            return shapes[key]
        shape = _shape(sensor, channels)
        if len(shapes) >= _SHAPES_LIMIT:
            shapes.clear()
            self._layouts.clear()
        shapes[key] = shape
        if shape is not None:
            for layout in shape.layouts:
                self._layouts.setdefault(layout.as_raw.size, []).append(layout)
        return shape

    def encode(
        self,
        device: str | None,
        records: Sequence[WireRecord],
        *,
        resolution: Resolution | None = None,
    ) -> bytes:
        body, tail = self.sections(device, records, resolution=resolution)
        if not self.deflate:
            return body
        head = bytearray()
        zdict = b""
        if self.dictionary is not None:
            _varint(head, self.dictionary)
            zdict = self.dictionaries[self.dictionary]
        return bytes(head) + _deflate(body, zdict) + tail

    def sections(
        self,
        device: str | None,
        records: Sequence[WireRecord],
        *,
        resolution: Resolution | None = None,
    ) -> tuple[bytes, bytes]:
        """The batch before compression: the byte section (what deflate compresses) and the
        extra bits (empty unless the encoding deflates)."""
        if device is not None and (not isinstance(device, str) or not DEVICE_ID.match(device)):
            raise CodecError(f"device id {device!r} is not valid (letters, digits, '_', '-', '.')")
        if len(records) > MAX_RECORDS:
            raise CodecError(f"a batch holds at most {MAX_RECORDS} records, not {len(records)}")
        split = self.deflate
        # each record's group, or None when it goes with its body (then also when its group
        # refuses it: _Group.failed)
        slots: list[_Group | None] = []
        pending: dict[tuple[str, tuple[str, ...]], _Group | None] = {}
        seqs: list[int] = []
        seen: set[int] = set()
        res_cache: dict[tuple[str, str], float | None] = {}
        for i, rec in enumerate(records):
            _check_record(rec)
            if rec.seq in seen:
                raise CodecError(f"seq {rec.seq} appears twice in the batch")
            seen.add(rec.seq)
            seqs.append(rec.seq)
            slots.append(self._parse_row(i, rec, pending, res_cache, resolution))
        groups = {}
        for key, g in pending.items():
            if g is not None and self._fill_columns(g):
                groups[key] = g
        # groups in name order: the table is the same whichever reading came first
        table = [groups[key] for key in sorted(groups)]
        features = any(rec.kind == FEATURES for rec in records)
        first_group = _FIRST_GROUP + features  # features records take id 4 (FLAG_FEATURES)
        for i, g in enumerate(table):
            g.number = first_group + i
        if not any(g.failed for g in pending.values() if g is not None):
            pairs = list(zip(records, slots, strict=True))
            ids = [_OPAQUE_ID[rec.kind] if g is None else g.number for rec, g in pairs]
            opaque = [rec for rec, g in pairs if g is None]
        else:
            ids, opaque = [], []
            for i, (rec, g) in enumerate(zip(records, slots, strict=True)):
                if g is None or i in g.failed:
                    ids.append(_OPAQUE_ID[rec.kind])
                    opaque.append(rec)
                else:
                    ids.append(g.number)
        _check_decoded_size((g.sensor, g.channels, len(g.times)) for g in table)

        flags = (FLAG_SPLIT if split else 0) | (FLAG_FEATURES if features else 0)
        out = bytearray((FORMAT_VERSION, flags))
        _varint(out, len(table))  # the group table (table_bytes)
        for g in table:
            out += _table_entry(g.sensor, g.channels, tuple(g.res))
        _put_text(out, device or "")
        _varint(out, len(ids))
        base = table[0].times[0] if table else 0
        _varint(out, zigzag(base))
        _varints(out, ids)
        if seqs:
            _varint(out, seqs[0])
            _varints(out, _zigzags([b - a - 1 for a, b in itertools.pairwise(seqs)]))
        for rec in opaque:
            out += _F64.pack(rec.created)
            _varint(out, len(rec.body))
            out += rec.body
        bits = _BitWriter()
        clocks: dict[tuple[tuple[int, ...], tuple[int, ...]], int] = {}
        for i, g in enumerate(table):
            # readings of several sensors taken together share their time columns
            clock = (tuple(g.times), tuple(g.created))
            if clock in clocks:
                _varint(out, i - clocks[clock])
            else:
                clocks[clock] = i
                out.append(0)
                _write_times(out, g.times, g.created, base)
            self._group_columns(out, bits, g, split)
        return bytes(out), bits.finish()

    def _parse_row(
        self,
        index: int,
        rec: WireRecord,
        pending: dict[tuple[str, tuple[str, ...]], _Group | None],
        res_cache: dict[tuple[str, str], float | None],
        resolution: Resolution | None,
    ) -> _Group | None:
        """Add record ``index``, when telemetry that fits the columns, to the rows of its group;
        its group, or None when the record goes with its body. (Its values are checked against
        the resolutions later, a column at a time: :meth:`_fill_columns`.)"""
        if rec.kind != Kind.TELEMETRY:
            return None
        reading = self._reading(rec)
        if reading is None:
            return None
        sensor, time, channels, values = reading
        # both in whole milliseconds, or the record goes with its body (NaN fails the comparisons)
        created = rec.created
        if not (-_MAX_SECONDS <= time <= _MAX_SECONDS and -_MAX_SECONDS <= created <= _MAX_SECONDS):
            return None
        t_ms = round(time * TIME_UNIT)
        c_ms = round(created * TIME_UNIT)
        if not (-_MAX_MS <= t_ms <= _MAX_MS and -_MAX_MS <= c_ms <= _MAX_MS):
            return None
        key = (sensor, channels)
        if key in pending:
            g = pending[key]
            if g is None:  # names too long
                return None
        else:
            if not _short(sensor) or not all(_short(ch) for ch in channels):
                pending[key] = None
                return None
            res = []
            for ch in channels:
                rk = (sensor, ch)
                if rk not in res_cache:
                    res_cache[rk] = _lookup(resolution, sensor, ch)
                res.append(res_cache[rk])
            g = pending[key] = _Group(sensor, channels)
            g.res = res
            g.steps = [None if r is None else (r, *step_ratio(r)) for r in res]
        g.indexes.append(index)
        g.rows.append(values)
        g.times.append(t_ms)
        g.created.append(c_ms)
        return g

    @staticmethod
    def _quantize_row(values: Sequence[float], steps: Sequence[Any]) -> list[Any] | None:
        """The column values of one reading: ``round(x / r)`` for a channel with a resolution
        (the value itself without); None when the reading goes with its body."""
        row: list[Any] = []
        for x, step in zip(values, steps, strict=True):
            if step is None:
                row.append(x)
                continue
            r, num, den = step
            q = x / r
            if not (abs(x) <= _MAX_VALUE and abs(q) <= _MAX_Q):  # NaN fails too
                return None
            n = round(q)
            # off the resolution grid (dequantize(n, num, den) != x), or -0.0: the record goes
            # with its body, exactly
            if n * num / den != x or (n == 0 and math.copysign(1.0, x) < 0.0):
                return None
            row.append(n)
        return row

    def _fill_columns(self, g: _Group) -> bool:
        """The value columns of a group from its rows; records whose values do not fit (off the
        grid, too large, not finite, -0.0) leave it (``g.failed``). False when none is left."""
        columns = [list(c) for c in zip(*g.rows, strict=True)]
        filled = []
        for column, step in zip(columns, g.steps, strict=True):
            if step is not None:
                column = _quantize(column, *step)  # type: ignore[assignment]
                if column is None:
                    break
            filled.append(column)
        else:
            g.values = filled
            return True
        # some value does not fit: reading by reading, as _quantize does for a column
        times, created = g.times, g.created
        g.times, g.created = [], []
        g.values = [[] for _ in g.channels]
        for index, values, t_ms, c_ms in zip(g.indexes, g.rows, times, created, strict=True):
            row = self._quantize_row(values, g.steps)
            if row is None:
                g.failed.add(index)
                continue
            g.times.append(t_ms)
            g.created.append(c_ms)
            for column, v in zip(g.values, row, strict=True):
                column.append(v)
        return bool(g.times)

    def _group_columns(self, out: bytearray, bits: _BitWriter, g: _Group, split: bool) -> None:
        for column, res in zip(g.values, g.res, strict=True):
            tokens0: list[int] | None = None
            counts0: dict[int, int] | None = None
            if res is None:
                out.append(P_FLOAT)
                # float64 bits, each XOR the previous one's (0 before the first)
                n = len(column)
                words = struct.unpack(f">{n}Q", struct.pack(f">{n}d", *column))
                residuals = [u ^ p for u, p in zip(words, (0, *words[:-1]), strict=True)]
            else:
                pred, param, residuals, tokens0, counts0 = _choose_column(column, split)
                out += _params_bytes(pred, param)
            if not split:
                _varints(out, residuals)
                continue
            if tokens0 is None or counts0 is None:
                tokens0 = _tokens0(residuals)
                counts0 = _count(tokens0)
            k = _shift(residuals, counts0)
            out.append(k)
            # each residual's token at shift k, then its extra bits (its low bits: see packing)
            token_at, extra_at = _shift_tables(k)
            out += bytes(map(token_at.__getitem__, tokens0))
            bits.write_low(residuals, map(extra_at.__getitem__, tokens0))


COMPACT = CompactEncoding(CF_COMPACT, "compact", deflate=False)
COMPACT_DEFLATE = CompactEncoding(CF_COMPACT_DEFLATE, "compact+deflate", deflate=True)
COMPACT_DICT = CompactEncoding(
    CF_COMPACT_DICT, "compact+deflate+dict", deflate=True, dictionary=DEFAULT_DICTIONARY
)
