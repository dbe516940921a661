"""Windowed features of readings, computed on the device at send time (the ``features`` policy).

:func:`channel_features` is the math of one channel over one window; :func:`fold` turns a batch
of queued records into what travels: the readings of every sensor sent as features at the
current link level become one features record per window (:mod:`agent.wire.features`), the
other records go as they are. The readings stay in the queue; the endpoint's ack of a features
record names their seqs, and the uplink acknowledges them then (docs/protocol.md, "Features
records").

Windows: by time, ``[data] window`` seconds aligned to the Unix epoch (readings at 0..59.999 s
past the minute share a window of 60 s), or ``window_samples`` readings in time order. A window
covers the readings of one batch: a window cut by the batch's limits gives two records. Readings
of a sensor with another set of channels (a partial read) get a window of their own. A window
whose features are not finite (values near the float limits) goes as readings.

Statistics (population moments over the window's n values x):
mean; min; max; rms = sqrt(mean(x^2)); std = sqrt(mean((x - mean)^2)); kurtosis = mean(z^4) with
z = (x - mean) / std (Pearson's, 3 for a normal distribution; 0 when std = 0); crest factor =
max|x| / rms (0 when rms = 0). Vibration channels add ``bands`` FFT band energies: the one-sided
power spectrum of x - mean (|X_k|^2 / n^2, doubled except at 0 and Nyquist) summed over
``bands`` equal runs of the bins 1..n//2, so the bands add up to std^2 (Parseval); band b spans
b/bands..(b+1)/bands of the Nyquist frequency of the window's mean sample rate
((n - 1) / (t1 - t0)). Stored as float32 (the shortest CBOR float that holds each): a summary
does not need more, and it halves the record.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Sequence
from typing import Any, Protocol

import numpy as np

from agent.sync.datapolicy import DataSettings
from agent.wire.batch import WireRecord
from agent.wire.features import MAX_COUNT, MAX_SPAN, ChannelFeatures, FeaturesBody
from agent.wire.records import Kind, RecordError, TelemetryBody

_F32_MAX = float(np.finfo(np.float32).max)


class QueuedRecord(Protocol):
    """What the uplink leases from the store (agent.store.queue.Record)."""

    seq: int
    created: float
    payload: bytes

    @property
    def kind(self) -> Any: ...


def _f32(value: float) -> float:
    """``value`` rounded to float32 (kept as it is beyond float32's range)."""
    return float(np.float32(value)) if abs(value) <= _F32_MAX else value


def channel_features(values: Sequence[float], bands: int = 0) -> ChannelFeatures:
    """The features of one channel's window (``bands`` > 0: with FFT band energies)."""
    x = np.asarray(values, dtype=np.float64)
    n = len(x)
    if n == 0:
        raise ValueError("a window holds at least one value")
    lo, hi = float(x.min()), float(x.max())
    mean = min(hi, max(lo, float(x.mean())))
    peak = max(abs(lo), abs(hi))
    if peak > 0:
        scaled = x / peak  # no overflow of x^2 near the float limits
        rms = peak * math.sqrt(float(np.mean(scaled * scaled)))
        dev = (x - mean) / peak
        std = peak * math.sqrt(float(np.mean(dev * dev)))
    else:
        rms = std = 0.0
    if std > 0:
        z = (x - mean) / std
        kurtosis = float(np.mean(z**4))
    else:
        kurtosis = 0.0
    crest = peak / rms if rms > 0 else 0.0
    energies: tuple[float, ...] = ()
    if bands > 0:
        energies = band_energies(x - mean, bands)
    return ChannelFeatures(
        _f32(mean),
        _f32(lo),
        _f32(hi),
        _f32(rms),
        _f32(std),
        _f32(kurtosis),
        _f32(crest),
        tuple(_f32(e) for e in energies),
    )


def band_energies(x: np.ndarray, bands: int) -> tuple[float, ...]:
    """The one-sided power of ``x`` (mean removed) in ``bands`` equal runs of the FFT bins
    1..n//2; they add up to mean(x^2)."""
    n = len(x)
    with np.errstate(over="ignore", invalid="ignore"):  # not finite: the window goes as readings
        spectrum = np.fft.rfft(x)
        power = (spectrum.real**2 + spectrum.imag**2) / (n * n)
    power[1:] *= 2.0
    if n % 2 == 0 and len(power) > 1:
        power[-1] /= 2.0  # the Nyquist bin has no mirror
    bins = len(power) - 1
    if bins <= 0:
        return (0.0,) * bands
    edges = 1 + (np.arange(bands + 1) * bins) // bands
    return tuple(float(power[a:b].sum()) for a, b in itertools.pairwise(edges))


def _window_key(data: DataSettings, time: float, index: int) -> int:
    if data.window_samples:
        return index // data.window_samples
    return math.floor(time / data.window)


def fold(
    records: Iterable[QueuedRecord], data: DataSettings, level: str | None
) -> list[WireRecord]:
    """What travels for ``records`` at link ``level``: features records for the readings of
    the sensors sent as features there, every other record as it is (in batch order, features
    records after them)."""
    featured = data.features_at(level)
    out: list[WireRecord] = []
    readings: dict[tuple[str, tuple[str, ...]], list[tuple[float, int, TelemetryBody, Any]]] = {}
    for rec in records:
        wire = WireRecord(
            rec.seq, str(getattr(rec.kind, "value", rec.kind)), rec.created, rec.payload
        )
        if featured and wire.kind == Kind.TELEMETRY.value:
            try:
                body = TelemetryBody.from_cbor(rec.payload)
            except RecordError:
                body = None
            if (
                body is not None
                and body.sensor in featured
                and body.values
                and math.isfinite(body.time)
            ):
                key = (body.sensor, tuple(sorted(body.values)))
                readings.setdefault(key, []).append((body.time, rec.seq, body, wire))
                continue
        out.append(wire)
    for (sensor, channels), rows in sorted(readings.items()):
        rows.sort(key=lambda r: (r[0], r[1]))
        for window in _windows(data, rows):
            out.extend(_features_or_readings(data, sensor, channels, window))
    return out


def _windows(
    data: DataSettings, rows: list[tuple[float, int, TelemetryBody, Any]]
) -> Iterable[list[tuple[float, int, TelemetryBody, Any]]]:
    """``rows`` (in time order) cut into windows, each within the features limits."""
    current: list[tuple[float, int, TelemetryBody, Any]] = []
    key = None
    lo = hi = 0
    for i, row in enumerate(rows):
        k = _window_key(data, row[0], i)
        seq = row[1]
        span_ok = not current or max(hi, seq) - min(lo, seq) <= MAX_SPAN
        if current and (k != key or len(current) >= MAX_COUNT or not span_ok):
            yield current
            current = []
        if not current:
            lo = hi = seq
        key = k
        lo, hi = min(lo, seq), max(hi, seq)
        current.append(row)
    if current:
        yield current


def _features_or_readings(
    data: DataSettings,
    sensor: str,
    channels: tuple[str, ...],
    window: list[tuple[float, int, TelemetryBody, Any]],
) -> list[WireRecord]:
    bands = data.bands if sensor in data.vibration else 0
    feats = {ch: channel_features([row[2].values[ch] for row in window], bands) for ch in channels}
    if not all(_finite(f) for f in feats.values()):
        return [row[3] for row in window]  # not summarizable: the readings themselves
    body = FeaturesBody(
        sensor,
        tuple(sorted(row[1] for row in window)),
        window[0][0],
        window[-1][0],
        feats,
    )
    return [body.to_record()]


def _finite(f: ChannelFeatures) -> bool:
    return all(math.isfinite(v) for v in (*f.to_list()[:-1], *f.bands))
