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

import itertools
import math
import struct
import zlib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import cbor2

from agent.wire.batch import DEVICE_ID, MAX_SEQ, CodecError, Resolution, WireRecord, _check_record
from agent.wire.compact_dict import DICTIONARIES
from agent.wire.packing import (
    _MASK64,
    _MAX_SHIFT,
    _MAX_TOKEN,
    MAX_NAME,
    _BitReader,
    _BitWriter,
    _put_text,
    _Reader,
    _shift,
    _varint,
    _varints,
    unzigzag,
    zigzag,
)
from agent.wire.predict import (
    _MAX_EXP,
    _MAX_LOCAL,
    _MAX_Q,
    P_DELTA,
    P_FLOAT,
    P_LINEAR,
    P_LOCAL,
    P_MEAN,
    P_PALETTE,
    _choose,
    _decimal,
    _from_decimal,
    _params_bytes,
    _ratio,
    _residuals,
    _unpredict,
    dequantize,
    step_ratio,
)
from agent.wire.records import Kind
from agent.wire.senml import SenMLCBOR

CF_COMPACT = 65000
CF_COMPACT_DEFLATE = 65001
CF_COMPACT_DICT = 65002

FORMAT_VERSION = 1
FLAG_SPLIT = 0x01  # value residuals as token bytes + extra bits after the byte section
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

_MAX_VALUE = 1e300  # larger values go as bodies (their steps could overflow a double)
_MAX_MS = 2**62

_F64 = struct.Struct(">d")
_Q64 = struct.Struct(">Q")


# -- resolutions -------------------------------------------------------------------------------


def _check_resolution(res: Any, sensor: str, channel: str) -> float | None:
    if res is None:
        return None
    if isinstance(res, bool) or not isinstance(res, int | float):
        raise CodecError(f"resolution of {sensor}/{channel} must be a number, not {res!r}")
    res = float(res)
    if not (math.isfinite(res) and res > 0.0):
        raise CodecError(f"resolution of {sensor}/{channel} must be finite and > 0, not {res!r}")
    m, e = _decimal(res)
    if abs(e) > _MAX_EXP or _from_decimal(m, e) != res:
        raise CodecError(f"resolution {res!r} of {sensor}/{channel} cannot be sent exactly")
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
    return _check_resolution(res, sensor, channel)


def table_bytes(groups: Sequence[tuple[str, Sequence[str], Sequence[float | None]]]) -> bytes:
    """The group table of a batch: for each (sensor, channels, resolutions), in order."""
    out = bytearray()
    _varint(out, len(groups))
    for sensor, channels, steps in groups:
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


def _deflate(data: bytes, zdict: bytes) -> bytes:
    """``data`` as a raw deflate stream (RFC 1951), preset dictionary ``zdict`` (may be empty)."""
    best = b""
    for strategy in _STRATEGIES:
        comp = zlib.compressobj(DEFLATE_LEVEL, zlib.DEFLATED, -15, 9, strategy, zdict)
        out = comp.compress(data) + comp.flush()
        if not best or len(out) < len(best):
            best = out
    return best


class _Group:
    """The columnar readings of one (sensor, channels) in a batch."""

    __slots__ = ("channels", "created", "key", "res", "sensor", "steps", "times", "values")

    def __init__(self, sensor: str, channels: tuple[str, ...]) -> None:
        self.key = (sensor, channels)
        self.sensor = sensor
        self.channels = channels
        self.res: list[float | None] = []
        self.steps: list[tuple[int, int] | None] = []  # each resolution as an exact fraction
        self.times: list[int] = []
        self.created: list[int] = []
        self.values: list[list[Any]] = [[] for _ in channels]  # q (int) or float


def _short(name: str) -> bool:
    """Whether ``name`` fits the group table (at most MAX_NAME bytes in UTF-8)."""
    return len(name) <= MAX_NAME // 4 or len(name.encode("utf-8")) <= MAX_NAME


def _check_decoded_size(groups: Iterable[tuple[str, Sequence[str], int]]) -> None:
    """:class:`CodecError` unless the telemetry bodies of (sensor, channels, rows) groups fit
    MAX_DECODED bytes (an upper bound of each body: names, a double per value, CBOR heads)."""
    total = 0
    for sensor, channels, rows in groups:
        row = 17 + len(sensor.encode()) + sum(11 + len(ch.encode()) for ch in channels)
        total += rows * row
    if total > MAX_DECODED:
        raise CodecError(f"the batch would decode to more than {MAX_DECODED} bytes")


def _write_times(out: bytearray, times: Sequence[int], created: Sequence[int], base: int) -> None:
    """A group's time column (ms: the first against the batch's base, then the first delta, then
    delta-of-delta) and its created column (against the time)."""
    _varint(out, zigzag(times[0] - base))
    if len(times) > 1:
        d = times[1] - times[0]
        _varint(out, zigzag(d))
        for a, b in itertools.pairwise(times[1:]):
            _varint(out, zigzag(b - a - d))
            d = b - a
    _varints(out, (zigzag(c - t) for c, t in zip(created, times, strict=True)))


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


def _ms(t: float) -> int | None:
    """``t`` in whole milliseconds, or None when it does not fit."""
    if not math.isfinite(t) or abs(t) > _MAX_MS / TIME_UNIT:  # t * TIME_UNIT could overflow
        return None
    ms = round(t * TIME_UNIT)
    return ms if -_MAX_MS <= ms <= _MAX_MS else None


class CompactEncoding:
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

    # -- encoding ------------------------------------------------------------------------------

    def _reading(self, rec: WireRecord) -> tuple[str, float, dict[str, float]] | None:
        """(sensor, time, values) of a canonical telemetry body; None if it goes as a body."""
        try:
            item = cbor2.loads(rec.body)
        except Exception:  # any undecodable body goes as it is
            return None
        if type(item) is not list or len(item) != 3:
            return None
        sensor, time, values = item
        if type(sensor) is not str or type(time) is not float or type(values) is not dict:
            return None
        if not values or not all(type(k) is str and type(v) is float for k, v in values.items()):
            return None
        try:
            canonical = self._bodies.reading_body(sensor, time, values) == rec.body
        except (UnicodeEncodeError, ValueError):
            return None
        return (sensor, time, values) if canonical else None

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
        groups: dict[tuple[str, tuple[str, ...]], tuple[int, _Group]] = {}
        ids: list[int] = []
        seqs: list[int] = []
        opaque: list[WireRecord] = []
        seen: set[int] = set()
        res_cache: dict[tuple[str, str], float | None] = {}
        for rec in records:
            _check_record(rec)
            if rec.seq in seen:
                raise CodecError(f"seq {rec.seq} appears twice in the batch")
            seen.add(rec.seq)
            seqs.append(rec.seq)
            row = self._row(rec, groups, res_cache, resolution)
            if row is None:
                ids.append(_OPAQUE_ID[rec.kind])
                opaque.append(rec)
            else:
                ids.append(_FIRST_GROUP + row)
        # groups in name order: the table is the same whichever reading came first
        order = sorted(groups)
        final = {groups[key][0]: _FIRST_GROUP + i for i, key in enumerate(order)}
        ids = [final[i - _FIRST_GROUP] if i >= _FIRST_GROUP else i for i in ids]
        table = [groups[key][1] for key in order]
        _check_decoded_size((g.sensor, g.channels, len(g.times)) for g in table)

        out = bytearray((FORMAT_VERSION, FLAG_SPLIT if split else 0))
        out += table_bytes([(g.sensor, g.channels, g.res) for g in table])
        _put_text(out, device or "")
        _varint(out, len(ids))
        base = table[0].times[0] if table else 0
        _varint(out, zigzag(base))
        _varints(out, ids)
        if seqs:
            _varint(out, seqs[0])
            _varints(out, (zigzag(b - a - 1) for a, b in itertools.pairwise(seqs)))
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

    def _row(
        self,
        rec: WireRecord,
        groups: dict[tuple[str, tuple[str, ...]], tuple[int, _Group]],
        res_cache: dict[tuple[str, str], float | None],
        resolution: Resolution | None,
    ) -> int | None:
        """Add a telemetry record to its group; the group's index in order of appearance, or
        None when the record goes with its body."""
        if rec.kind != Kind.TELEMETRY:
            return None
        reading = self._reading(rec)
        if reading is None:
            return None
        sensor, time, values = reading
        t_ms = _ms(time)
        c_ms = _ms(rec.created)
        if t_ms is None or c_ms is None:
            return None
        channels = tuple(values)
        key = (sensor, channels)
        entry = groups.get(key)
        if entry is None:
            if not _short(sensor) or not all(_short(ch) for ch in channels):
                return None
            res = []
            for ch in channels:
                rk = (sensor, ch)
                if rk not in res_cache:
                    res_cache[rk] = _lookup(resolution, sensor, ch)
                res.append(res_cache[rk])
            g = _Group(sensor, channels)
            g.res = res
            g.steps = [None if r is None else step_ratio(r) for r in res]
        else:
            g = entry[1]
        row: list[Any] = []
        for ch, r, step in zip(channels, g.res, g.steps, strict=True):
            x = values[ch]
            if r is None or step is None:
                row.append(x)
                continue
            q = x / r
            if not (abs(x) <= _MAX_VALUE and abs(q) <= _MAX_Q):  # NaN fails too
                return None
            n = round(q)
            if dequantize(n, *step) != x or (n == 0 and math.copysign(1.0, x) < 0.0):
                return None  # off the resolution grid: the record goes with its body, exactly
            row.append(n)
        if entry is None:
            entry = groups[key] = (len(groups), g)
        g.times.append(t_ms)
        g.created.append(c_ms)
        for column, v in zip(g.values, row, strict=True):
            column.append(v)
        return entry[0]

    def _group_columns(self, out: bytearray, bits: _BitWriter, g: _Group, split: bool) -> None:
        for column, res in zip(g.values, g.res, strict=True):
            if res is None:
                out.append(P_FLOAT)
                prev = 0
                residuals = []
                for x in column:
                    u = _Q64.unpack(_F64.pack(x))[0]
                    residuals.append(u ^ prev)
                    prev = u
            else:
                pred, param = _choose(column, split)
                out += _params_bytes(pred, param)
                residuals = _residuals(column, pred, param)
            if not split:
                _varints(out, residuals)
                continue
            k = _shift(residuals)
            out.append(k)
            low = (1 << k) - 1
            for u in residuals:
                h = u >> k
                if h < 4:
                    out.append(h)
                    if k:
                        bits.write(u & low, k)
                    continue
                nb = h.bit_length() - 2
                out.append(2 * nb + 2 + ((h >> nb) & 1))
                bits.write(((h & ((1 << nb) - 1)) << k) | (u & low), nb + k)

    # -- decoding ------------------------------------------------------------------------------

    def decode(self, data: bytes) -> tuple[str | None, list[WireRecord]]:
        try:
            data = bytes(data)
        except TypeError:
            raise CodecError("a batch is bytes") from None
        if not self.deflate:
            return self._parse(_Reader(data), None)
        pos = 0
        zdict = None
        if self.dictionary is not None:
            head = _Reader(data)
            ident = head.varint()
            zdict = self.dictionaries.get(ident)
            if zdict is None:
                raise CodecError(f"unknown preset dictionary {ident}")
            pos = head.pos
        try:
            inflater = (
                zlib.decompressobj(-15, zdict) if zdict is not None else zlib.decompressobj(-15)
            )
            body = inflater.decompress(data[pos:], MAX_INFLATED)
        except zlib.error as err:
            raise CodecError(f"deflate stream: {err}") from None
        if not inflater.eof:
            if inflater.unconsumed_tail or len(body) >= MAX_INFLATED:
                raise CodecError(f"the batch inflates to more than {MAX_INFLATED} bytes")
            raise CodecError("the deflate stream ends early")
        bits = _BitReader(inflater.unused_data)
        device, records = self._parse(_Reader(body), bits)
        bits.finish()
        return device, records

    def _parse(self, r: _Reader, bits: _BitReader | None) -> tuple[str | None, list[WireRecord]]:
        if r.byte() != FORMAT_VERSION:
            raise CodecError("not a compact batch of version 1")
        flags = r.byte()
        if flags & ~FLAG_SPLIT:
            raise CodecError(f"unknown flags 0x{flags:02x}")
        split = bool(flags & FLAG_SPLIT)
        if split and bits is None:
            raise CodecError(f"content format {self.content_format} carries no extra bits")
        table = []
        for _ in range(r.count("groups")):
            sensor = r.text("sensor name")
            channels: list[str] = []
            res: list[tuple[int, int] | None] = []
            for _ in range(r.count("channels")):
                name = r.text("channel name")
                if name in channels:
                    raise CodecError(f"channel {name!r} twice in a group")
                channels.append(name)
                tag = r.byte()
                if tag == 0:
                    res.append(None)
                elif tag == 1:
                    m = r.varint()
                    e = unzigzag(r.varint())
                    if m == 0 or abs(e) > _MAX_EXP:
                        raise CodecError("a resolution is out of range")
                    step = _from_decimal(m, e)
                    if not (math.isfinite(step) and step > 0.0):
                        raise CodecError("a resolution is out of range")
                    res.append(_ratio(m, e))
                else:
                    raise CodecError(f"unknown resolution tag {tag}")
            if not channels:
                raise CodecError("a group without channels")
            table.append((sensor, channels, res))
        device_text = r.text("device id")
        device: str | None = None
        if device_text:
            if not DEVICE_ID.match(device_text):
                raise CodecError(f"device id {device_text!r} is not valid")
            device = device_text
        n = r.count("records")
        if n > MAX_RECORDS:
            raise CodecError(f"a batch holds at most {MAX_RECORDS} records, not {n}")
        base = unzigzag(r.varint())
        ids = [r.varint() for _ in range(n)]
        limit = _FIRST_GROUP + len(table)
        rows = [0] * len(table)
        for i in ids:
            if i >= limit:
                raise CodecError(f"group {i} is not in the table")
            if i >= _FIRST_GROUP:
                rows[i - _FIRST_GROUP] += 1
        if not all(rows):
            raise CodecError("a group without readings")
        seqs: list[int] = []
        seen: set[int] = set()
        if n:
            seq = r.varint(MAX_SEQ)
            seqs.append(seq)
            seen.add(seq)
            for _ in range(n - 1):
                seq += unzigzag(r.varint()) + 1
                if not 0 <= seq <= MAX_SEQ:
                    raise CodecError("a seq is out of range")
                if seq in seen:
                    raise CodecError(f"seq {seq} appears twice")
                seen.add(seq)
                seqs.append(seq)
        opaque: list[tuple[float, bytes]] = []
        for i in ids:
            if i < _FIRST_GROUP:
                (created,) = _F64.unpack(r.take(8))
                if not math.isfinite(created):
                    raise CodecError("a record's created time is not finite")
                opaque.append((created, r.take(r.count("body length"))))
        _check_decoded_size(
            (sensor, channels, count)
            for (sensor, channels, _), count in zip(table, rows, strict=True)
        )
        bodies = []
        clocks: list[tuple[list[int], list[int]]] = []
        for i, ((sensor, channels, res), count) in enumerate(zip(table, rows, strict=True)):
            same = r.varint()
            if same == 0:
                clock = _read_times(r, count, base)
            elif same <= i and len(clocks[i - same][0]) == count:
                clock = clocks[i - same]
            else:
                raise CodecError(f"{sensor}: no earlier group of {count} readings {same} back")
            clocks.append(clock)
            bodies.append(self._parse_group(r, bits, sensor, channels, res, clock, split))
        if r.left:
            raise CodecError(f"{r.left} bytes after the batch")
        out: list[WireRecord] = []
        next_row = [0] * len(table)
        opaque_iter = iter(opaque)
        for i, seq in zip(ids, seqs, strict=True):
            if i < _FIRST_GROUP:
                created, body = next(opaque_iter)
                out.append(WireRecord(seq, _OPAQUE_KINDS[i], created, body))
            else:
                gi = i - _FIRST_GROUP
                created, body = bodies[gi][next_row[gi]]
                next_row[gi] += 1
                out.append(WireRecord(seq, Kind.TELEMETRY.value, created, body))
        return device, out

    def _parse_group(
        self,
        r: _Reader,
        bits: _BitReader | None,
        sensor: str,
        channels: list[str],
        res: list[tuple[int, int] | None],
        clock: tuple[list[int], list[int]],
        split: bool,
    ) -> list[tuple[float, bytes]]:
        times, created = clock
        n = len(times)
        columns = [
            self._parse_column(r, bits, sensor, ch, step, n, split)
            for ch, step in zip(channels, res, strict=True)
        ]
        out = []
        body = self._bodies.reading_body
        for i in range(n):
            t = times[i] / TIME_UNIT
            c = created[i] / TIME_UNIT
            values = {ch: col[i] for ch, col in zip(channels, columns, strict=True)}
            try:
                out.append((c, body(sensor, t, values)))
            except (UnicodeEncodeError, ValueError) as err:
                raise CodecError(f"{sensor}: cannot write the reading: {err}") from None
        return out

    def _parse_column(
        self,
        r: _Reader,
        bits: _BitReader | None,
        sensor: str,
        channel: str,
        step: tuple[int, int] | None,
        n: int,
        split: bool,
    ) -> list[float]:
        pred = r.byte()
        param: Any = None
        if (pred == P_FLOAT) != (step is None):
            raise CodecError(f"{sensor}/{channel}: predictor {pred} does not fit the resolution")
        if pred == P_MEAN:
            param = unzigzag(r.varint())
        elif pred == P_LOCAL:
            param = r.byte()
            if not 1 <= param <= _MAX_LOCAL:
                raise CodecError(f"{sensor}/{channel}: window {param} is out of range")
        elif pred == P_PALETTE:
            size = r.count("palette")
            if size == 0:
                raise CodecError(f"{sensor}/{channel}: an empty palette")
            param = []
            prev = 0
            for _ in range(size):
                prev += unzigzag(r.varint())
                param.append(prev)
        elif pred not in (P_DELTA, P_LINEAR, P_FLOAT):
            raise CodecError(f"{sensor}/{channel}: unknown predictor {pred}")
        residuals = self._read_residuals(r, bits, n, split)
        if pred == P_FLOAT:
            out = []
            prev = 0
            for u in residuals:
                prev ^= u
                if prev > _MASK64:
                    raise CodecError(f"{sensor}/{channel}: a float is longer than 64 bits")
                out.append(_F64.unpack(_Q64.pack(prev))[0])
            return out
        assert step is not None
        q = _unpredict(residuals, pred, param, sensor, channel)
        values = []
        for v in q:
            if abs(v) > _MAX_Q:
                raise CodecError(f"{sensor}/{channel}: a value is out of range")
            try:
                values.append(dequantize(v, *step))
            except OverflowError:
                raise CodecError(f"{sensor}/{channel}: a value is out of range") from None
        return values

    @staticmethod
    def _read_residuals(r: _Reader, bits: _BitReader | None, n: int, split: bool) -> list[int]:
        if not split:
            return [r.varint() for _ in range(n)]
        assert bits is not None
        k = r.byte()
        if k > _MAX_SHIFT:
            raise CodecError(f"shift {k} is out of range")
        raw = r.take(n)
        out = []
        read = bits.read
        for t in raw:
            if t < 4:
                out.append((t << k) | read(k) if k else t)
                continue
            if t > _MAX_TOKEN:
                raise CodecError(f"unknown token {t}")
            nb = (t - 2) // 2
            v = read(nb + k)
            out.append(((((2 | (t & 1)) << nb) | (v >> k)) << k) | (v & ((1 << k) - 1)))
        return out


COMPACT = CompactEncoding(CF_COMPACT, "compact", deflate=False)
COMPACT_DEFLATE = CompactEncoding(CF_COMPACT_DEFLATE, "compact+deflate", deflate=True)
COMPACT_DICT = CompactEncoding(
    CF_COMPACT_DICT, "compact+deflate+dict", deflate=True, dictionary=DEFAULT_DICTIONARY
)
