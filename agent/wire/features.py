"""Features records: windowed features of a sensor's readings that stand for those readings.

Under the ``features`` data policy (docs/config.md ``[data]``) the uplink sends, instead of a
window of a sensor's readings, one record of kind ``features`` that summarizes each channel of
them (mean, min, max, RMS, standard deviation, kurtosis, crest factor and, for vibration
channels, the energy of FFT bands). The record names the sequence numbers of the readings it
stands for; the endpoint acknowledges those seqs when it stores the record, and only then do the
readings leave the device's queue (docs/protocol.md, "Features records").

Body (CDDL; deterministic CBOR like every body, see :mod:`agent.wire.records`)::

    features-body = [sensor: tstr, first: seq, last: seq, gaps: bstr, t0: float, t1: float,
                     count: uint, channels: {+ tstr => channel-features}]
    channel-features = [mean, min, max, rms, std, kurtosis, crest, bands: [* float]]

``gaps`` codes the seqs between ``first`` and ``last`` as uvarint pairs ``(gap, repeat)``: the
next ``repeat`` seqs each follow the previous one after ``gap`` seqs of other records. The
features record travels with ``seq = first`` and ``created = t1`` in both batch encodings.

Everything here is bounded before it is allocated (:data:`MAX_COUNT`, :data:`MAX_SPAN`,
:data:`MAX_CHANNELS`, :data:`MAX_BANDS`; a batch's claims together by
:data:`MAX_BATCH_READINGS`, read from the headers before any gap run is expanded) and every
problem is a :class:`~agent.wire.batch.CodecError`, which the endpoint answers with 4.00
(:class:`FeaturesTooLarge`, a batch claiming too many readings: 4.13).
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from agent.wire import records
from agent.wire.batch import FEATURES, MAX_SEQ, CodecError, WireRecord, check_telemetry_names
from agent.wire.packing import _Reader, _varint

#: Readings one features record may stand for.
MAX_COUNT = 65536
#: Readings the features records of one batch may stand for together: a batch's record limit
#: (4,096) times a sensible count of a features record (64: a minute of readings at 1 Hz). A
#: device's batch claims at most its lease (4,096 readings); a gateway's entry may carry up to
#: 4,096 of a device's features records. Checked from the headers, before gaps are expanded.
MAX_BATCH_READINGS = 4096 * 64
#: ``last - first`` at most: bounds the endpoint's search for records in the range.
MAX_SPAN = 1 << 24
#: Channels of one record, and FFT bands of one channel.
MAX_CHANNELS = 64
MAX_BANDS = 64
#: Bytes of a features body (a bigger one is refused before it is decoded).
MAX_BODY = 64 * 1024
MAX_NAME = 255
#: The statistics of a channel, in body order (then the bands).
STATS = ("mean", "min", "max", "rms", "std", "kurtosis", "crest")


class FeaturesTooLarge(CodecError):
    """A batch whose features records claim more readings than it may (the endpoint: 4.13)."""


@dataclass(frozen=True)
class ChannelFeatures:
    """The features of one channel over a window (see :mod:`agent.sync.featurize`)."""

    mean: float
    min: float
    max: float
    rms: float
    std: float
    kurtosis: float
    crest: float
    bands: tuple[float, ...] = ()

    def to_list(self) -> list[Any]:
        return [float(getattr(self, s)) for s in STATS] + [[float(b) for b in self.bands]]

    @classmethod
    def from_list(cls, item: Any, where: str) -> ChannelFeatures:
        if not isinstance(item, list) or len(item) != len(STATS) + 1:
            raise CodecError(f"{where}: expected [{', '.join(STATS)}, bands]")
        stats = [_finite(v, f"{where}.{name}") for name, v in zip(STATS, item, strict=False)]
        bands = item[-1]
        if not isinstance(bands, list):
            raise CodecError(f"{where}.bands: expected an array")
        if len(bands) > MAX_BANDS:
            raise CodecError(f"{where}.bands: {len(bands)} bands, at most {MAX_BANDS}")
        out = cls(*stats, tuple(_finite(b, f"{where}.bands") for b in bands))
        out.check(where)
        return out

    def check(self, where: str) -> None:
        if not self.min <= self.mean <= self.max:
            raise CodecError(f"{where}: min <= mean <= max does not hold")
        if self.rms < 0 or self.std < 0 or self.crest < 0 or self.kurtosis < 0:
            raise CodecError(f"{where}: rms, std, kurtosis and crest are >= 0")
        if any(b < 0 for b in self.bands):
            raise CodecError(f"{where}: band energies are >= 0")


@dataclass(frozen=True)
class FeaturesBody:
    """Features of ``sensor``'s readings with sequence numbers ``seqs`` (ascending), taken
    from ``t0`` to ``t1``; one :class:`ChannelFeatures` per channel."""

    kind: ClassVar[str] = FEATURES

    sensor: str
    seqs: tuple[int, ...]
    t0: float
    t1: float
    channels: Mapping[str, ChannelFeatures]

    @property
    def first(self) -> int:
        return self.seqs[0]

    @property
    def last(self) -> int:
        return self.seqs[-1]

    @property
    def count(self) -> int:
        return len(self.seqs)

    def to_cbor(self) -> bytes:
        self.check()
        return records.dumps(
            [
                self.sensor,
                self.first,
                self.last,
                encode_gaps(self.seqs),
                float(self.t0),
                float(self.t1),
                self.count,
                {name: f.to_list() for name, f in self.channels.items()},
            ]
        )

    def to_record(self) -> WireRecord:
        """The record as it travels: seq = first, created = t1."""
        return WireRecord(self.first, FEATURES, float(self.t1), self.to_cbor(), float(self.t1))

    def check(self) -> None:
        if not isinstance(self.sensor, str) or not 0 < len(self.sensor) <= MAX_NAME:
            raise CodecError("features: sensor must be a text of 1..255 characters")
        if not all(isinstance(name, str) for name in self.channels):
            raise CodecError("features: channel names are texts of 1..255 characters")
        check_telemetry_names(self.sensor, self.channels, "features")  # as telemetry's names
        if not 1 <= len(self.seqs) <= MAX_COUNT:
            raise CodecError(f"features: count must be 1..{MAX_COUNT}")
        if not 0 <= self.first <= self.last <= MAX_SEQ or self.last - self.first > MAX_SPAN:
            raise CodecError(f"features: need 0 <= first <= last, last - first <= {MAX_SPAN}")
        if not (math.isfinite(self.t0) and math.isfinite(self.t1) and self.t0 <= self.t1):
            raise CodecError("features: t0 <= t1, both finite")
        if not 1 <= len(self.channels) <= MAX_CHANNELS:
            raise CodecError(f"features: 1..{MAX_CHANNELS} channels")
        for name, f in self.channels.items():
            if not isinstance(name, str) or not 0 < len(name) <= MAX_NAME:
                raise CodecError("features: channel names are texts of 1..255 characters")
            f.check(f"features {self.sensor}/{name}")

    @classmethod
    def from_cbor(cls, data: bytes) -> FeaturesBody:
        """Decode and check a body; :class:`CodecError` (never another exception) if bad."""
        return cls._from_item(_header(data))

    @classmethod
    def _from_item(cls, item: list[Any]) -> FeaturesBody:
        """The body from a list :func:`_header` checked: gaps expanded, channels decoded."""
        sensor, first, last, gaps, t0, t1, count, channels = item
        seqs = decode_gaps(first, last, count, gaps)
        if not isinstance(channels, dict) or not 1 <= len(channels) <= MAX_CHANNELS:
            raise CodecError(f"features: channels must be a map of 1..{MAX_CHANNELS} entries")
        out: dict[str, ChannelFeatures] = {}
        for name, value in channels.items():
            if not isinstance(name, str):
                raise CodecError("features: channel names must be texts")
            out[name] = ChannelFeatures.from_list(value, f"features {sensor}/{name}")
        body = cls(sensor, seqs, _finite(t0, "features.t0"), _finite(t1, "features.t1"), out)
        body.check()
        return body


def _header(data: bytes) -> list[Any]:
    """A body's CBOR item with its header checked (sensor, first <= last, count, span, gaps a
    byte string): what a batch claims, known before any gap run is expanded."""
    if len(data) > MAX_BODY:
        raise CodecError(f"features: body of {len(data)} bytes, at most {MAX_BODY}")
    try:
        item = records.loads(bytes(data), max_depth=4)
    except records.RecordError as err:
        raise CodecError(f"features: {err}") from None
    if not isinstance(item, list) or len(item) != 8:
        raise CodecError("features: expected [sensor, first, last, gaps, t0, t1, count, map]")
    sensor, first, last, gaps, _t0, _t1, count, _channels = item
    if not isinstance(sensor, str):
        raise CodecError("features: sensor must be a text")
    if not all(_uint(v) for v in (first, last, count)):
        raise CodecError("features: first, last and count are unsigned integers")
    if not first <= last:
        raise CodecError(f"features: first {first} > last {last}")
    if not 1 <= count <= MAX_COUNT or last - first > MAX_SPAN:
        raise CodecError(f"features: count 1..{MAX_COUNT}, last - first <= {MAX_SPAN}")
    if not isinstance(gaps, bytes):
        raise CodecError("features: gaps must be a byte string")
    return item


def _uint(value: Any) -> bool:
    return type(value) is int and 0 <= value <= MAX_SEQ


def _finite(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise CodecError(f"{what}: expected a number")
    out = float(value)
    if not math.isfinite(out):
        raise CodecError(f"{what}: {out!r} is not finite")
    return out


def encode_gaps(seqs: Sequence[int]) -> bytes:
    """The seqs after the first as uvarint pairs (gap, repeat); seqs strictly increasing."""
    out = bytearray()
    run_gap, run = -1, 0
    for a, b in itertools.pairwise(seqs):
        gap = b - a - 1
        if gap < 0:
            raise CodecError("features: seqs must be strictly increasing")
        if gap == run_gap:
            run += 1
            continue
        if run:
            _varint(out, run_gap)
            _varint(out, run)
        run_gap, run = gap, 1
    if run:
        _varint(out, run_gap)
        _varint(out, run)
    return bytes(out)


def decode_gaps(first: int, last: int, count: int, gaps: bytes) -> tuple[int, ...]:
    """The seqs that ``gaps`` codes after ``first``; they must be ``count`` and end at ``last``."""
    r = _Reader(gaps)
    seqs = [first]
    seq = first
    while r.left:
        gap = r.varint(MAX_SPAN)
        repeat = r.varint(MAX_COUNT)
        if repeat == 0 or len(seqs) + repeat > count:
            raise CodecError("features: the gaps code more seqs than count")
        for _ in range(repeat):
            seq += gap + 1
            seqs.append(seq)
        if seq > last:
            raise CodecError("features: a seq is beyond last")
    if len(seqs) != count or seq != last:
        raise CodecError(
            f"features: the gaps code {len(seqs)} seqs up to {seq}, not {count} up to {last}"
        )
    return tuple(seqs)


def claimed_seqs(data: bytes) -> tuple[int, ...]:
    """The seqs a body stands for, from its header and gaps alone (its names and statistics
    unchecked): what the endpoint reads of a stored body that :meth:`FeaturesBody.from_cbor`
    refuses today (stored by a release that checked less); :class:`CodecError` if even that
    does not decode."""
    _sensor, first, last, gaps, _t0, _t1, count, _channels = _header(data)
    return decode_gaps(first, last, count, gaps)


def check_batch(recs: Iterable[WireRecord], max_readings: int = MAX_BATCH_READINGS) -> int:
    """A decoded batch's features records: together they claim at most ``max_readings``
    readings (read from the headers first: :class:`FeaturesTooLarge` otherwise), each body
    decodes, its first seq is the record's, and no seq is claimed twice in the batch (by two
    features records, or by a features record and another record). :class:`CodecError`
    otherwise (the endpoint answers 4.00). The readings the features records claim."""
    recs = list(recs)
    heads = [(rec, _header(bytes(rec.body))) for rec in recs if rec.kind == FEATURES]
    if not heads:
        return 0
    claimed = sum(item[6] for _, item in heads)
    if claimed > max_readings:
        raise FeaturesTooLarge(
            f"features: the batch's features records claim {claimed} readings, at most "
            f"{max_readings}: send fewer features records in a batch"
        )
    bodies = []
    for rec, item in heads:
        body = FeaturesBody._from_item(item)
        if body.first != rec.seq:
            raise CodecError(f"features: record seq {rec.seq} is not its first seq {body.first}")
        bodies.append(body)
    _check_disjoint(bodies, sorted({r.seq for r in recs if r.kind != FEATURES}))
    return claimed


def _check_disjoint(bodies: list[FeaturesBody], plain: list[int]) -> None:
    """No seq of ``bodies`` is another's or in ``plain`` (sorted). Ranges (first, last) are
    compared; only records whose ranges overlap (interleaved sensors) compare their seqs."""
    bodies = sorted(bodies, key=lambda b: b.first)
    cluster: list[FeaturesBody] = []
    hi = -1
    for body in [*bodies, None]:
        if cluster and (body is None or body.first > hi):
            lo = cluster[0].first
            inside = plain[bisect.bisect_left(plain, lo) : bisect.bisect_right(plain, hi)]
            if len(cluster) > 1 or inside:
                seqs = [*itertools.chain.from_iterable(b.seqs for b in cluster), *inside]
                if len(set(seqs)) < len(seqs):
                    raise CodecError(
                        f"features: seqs of record {lo} are claimed twice in the batch"
                    )
            cluster = []
        if body is not None:
            cluster.append(body)
            hi = body.last if len(cluster) == 1 else max(hi, body.last)


def covered(recs: Iterable[WireRecord]) -> Iterator[int]:
    """Every seq a batch stands for: the seq of each record, all seqs of each features record
    (the bodies decode: call :func:`check_batch` first)."""
    for rec in recs:
        if rec.kind == FEATURES:
            yield from FeaturesBody.from_cbor(bytes(rec.body)).seqs
        else:
            yield rec.seq
