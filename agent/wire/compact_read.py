"""Reading a compact batch (content formats 65000, 65001, 65002): the decoding half of
:class:`agent.wire.compact.CompactEncoding`, bounded whatever the bytes (docs/protocol.md). Bad
input never raises anything but :class:`~agent.wire.batch.CodecError`."""

from __future__ import annotations

import math
import zlib
from typing import Any

from agent.wire.batch import (
    DEVICE_ID,
    MAX_SEQ,
    CodecError,
    WireRecord,
    check_body,
    check_telemetry_names,
)
from agent.wire.compact_format import (
    _F64,
    _FIRST_GROUP,
    _OPAQUE_KINDS,
    _OPAQUE_KINDS_FEATURES,
    _Q64,
    FLAG_FEATURES,
    FLAG_SPLIT,
    FORMAT_VERSION,
    MAX_INFLATED,
    MAX_RECORDS,
    TIME_UNIT,
    _check_decoded_size,
    _read_times,
)
from agent.wire.packing import (
    _MASK64,
    _MAX_SHIFT,
    _MAX_TOKEN,
    _BitReader,
    _Reader,
    unzigzag,
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
    _from_decimal,
    _ratio,
    _unpredict,
    dequantize,
)
from agent.wire.records import Kind
from agent.wire.senml import SenMLCBOR


class CompactDecoding:
    """The decoder of :class:`agent.wire.compact.CompactEncoding` (its base class): what it reads
    is set by the encoding's constructor."""

    content_format: int
    deflate: bool
    dictionary: int | None
    dictionaries: dict[int, bytes]
    _bodies: SenMLCBOR

    def decode(self, data: bytes) -> tuple[str | None, list[WireRecord]]:
        r, bits = self._open(data)
        device, records = self._parse(r, bits)
        if bits is not None:
            bits.finish()
        return device, records

    def resolutions(self, data: bytes) -> dict[tuple[str, str], float]:
        """The step of each (sensor, channel) the batch quantizes to, from its group table
        only: what an encoder needs to send the same readings as compactly again (a gateway
        forwarding them). Channels sent exactly are not in it. Raises CodecError."""
        r, _ = self._open(data)
        self._flags(r)
        return {
            (sensor, ch): step
            for sensor, channels, _, steps in self._table(r)
            for ch, step in zip(channels, steps, strict=True)
            if step is not None
        }

    def _open(self, data: bytes) -> tuple[_Reader, _BitReader | None]:
        """The batch's (inflated) body and, with deflate, the extra bits after it."""
        try:
            data = bytes(data)
        except TypeError:
            raise CodecError("a batch is bytes") from None
        if not self.deflate:
            return _Reader(data), None
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
        return _Reader(body), _BitReader(inflater.unused_data)

    @staticmethod
    def _flags(r: _Reader) -> int:
        if r.byte() != FORMAT_VERSION:
            raise CodecError("not a compact batch of version 1")
        flags = r.byte()
        if flags & ~(FLAG_SPLIT | FLAG_FEATURES):
            raise CodecError(f"unknown flags 0x{flags:02x}")
        return flags

    @staticmethod
    def _table(
        r: _Reader,
    ) -> list[tuple[str, list[str], list[tuple[int, int] | None], list[float | None]]]:
        """The group table: (sensor, channels, each channel's resolution as a ratio and as a
        step) per group."""
        table = []
        for _ in range(r.count("groups")):
            sensor = r.text("sensor name")
            channels: list[str] = []
            res: list[tuple[int, int] | None] = []
            steps: list[float | None] = []
            for _ in range(r.count("channels")):
                name = r.text("channel name")
                if name in channels:
                    raise CodecError(f"channel {name!r} twice in a group")
                channels.append(name)
                tag = r.byte()
                if tag == 0:
                    res.append(None)
                    steps.append(None)
                elif tag == 1:
                    m = r.varint()
                    e = unzigzag(r.varint())
                    if m == 0 or abs(e) > _MAX_EXP:
                        raise CodecError("a resolution is out of range")
                    step = _from_decimal(m, e)
                    if not (math.isfinite(step) and step > 0.0):
                        raise CodecError("a resolution is out of range")
                    res.append(_ratio(m, e))
                    steps.append(step)
                else:
                    raise CodecError(f"unknown resolution tag {tag}")
            if not channels:
                raise CodecError("a group without channels")
            check_telemetry_names(sensor, channels, "group table")
            table.append((sensor, channels, res, steps))
        return table

    def _parse(self, r: _Reader, bits: _BitReader | None) -> tuple[str | None, list[WireRecord]]:
        flags = self._flags(r)
        split = bool(flags & FLAG_SPLIT)
        # with features records, id 4 is theirs and the groups start at 5
        first_group = _FIRST_GROUP + bool(flags & FLAG_FEATURES)
        kinds = _OPAQUE_KINDS_FEATURES if flags & FLAG_FEATURES else _OPAQUE_KINDS
        if split and bits is None:
            raise CodecError(f"content format {self.content_format} carries no extra bits")
        table = [(sensor, channels, res) for sensor, channels, res, _ in self._table(r)]
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
        limit = first_group + len(table)
        rows = [0] * len(table)
        for i in ids:
            if i >= limit:
                raise CodecError(f"group {i} is not in the table")
            if i >= first_group:
                rows[i - first_group] += 1
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
            if i < first_group:
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
            if i < first_group:
                created, body = next(opaque_iter)
                check_body(kinds[i], body, f"seq {seq}")  # a body of ours, its names too
                out.append(WireRecord(seq, kinds[i], created, body))
            else:
                gi = i - first_group
                created, body, t = bodies[gi][next_row[gi]]
                next_row[gi] += 1
                out.append(WireRecord(seq, Kind.TELEMETRY.value, created, body, t))
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
    ) -> list[tuple[float, bytes, float]]:
        """The group's readings: (created, body, the time in the body) each."""
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
                out.append((c, body(sensor, t, values), t))
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
