"""Feature extraction shared by training (tools/train_models.py) and the device
(agent/detect/detector.py).

The anomaly models never see raw sensor values. Every device first *commissions*: from its first
``commissioning`` samples of normal running (SKAB's first 400 rows) it learns, per channel:

1. ``mean`` and ``std`` of the raw values (the per-device scaler);
2. ``smooth_std``: the spread of the smoothed, standardised signal over commissioning (a channel
   with white noise has about ``1/sqrt(W)``, a slowly wandering one about 1; floored at the
   white-noise value);
3. ``drift``: a cross-validated measure of how far that device's channel wanders on its own. The
   scaler is fitted on the first half of commissioning and applied to the second half; ``drift`` is
   the largest deviation seen there.

The feature of channel ``c`` at sample ``t`` is then::

    z   = (x - mean) / std                          per sample
    m   = mean of z over the last W samples         causal smoothing
    f   = m                                        level channels
    f   = m(t) - m(t - D)                           rate channels (temperatures)
    u   = f / smooth_std / scale,   scale = max(floor_factor * normal_scale, drift_factor * drift)

Temperatures are slow thermal states: their level wanders with load and ambient, their rate of
change does not. ``normal_scale`` is global (learned from the anomaly-free recording: the 95th
percentile of ``|f / smooth_std|`` up to ~13 minutes after commissioning), so ``scale`` is a
per-device, per-channel threshold: normal running stays mostly within ``|u| < 1`` on every
channel of every device. The model input is a short history of ``u`` vectors: ``steps`` vectors
``step_stride`` samples apart, the newest last.

Everything here is causal (row ``t`` uses rows ``<= t``) and numpy-only. :func:`transform` works on
whole arrays (training, evaluation); :class:`StreamingFeatures` does the same one row at a time on
the device and gives the same numbers.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from drivers.pump import SKAB_CHANNELS

#: The SKAB channels, in the order of the CSV columns and of every model's last axis.
CHANNELS: tuple[str, ...] = SKAB_CHANNELS
#: Slow thermal states: their level wanders with load and ambient, their rate of change does not.
RATE_CHANNELS: tuple[str, ...] = ("Temperature", "Thermocouple")

_REL_STD_FLOOR = 1e-3  # a channel's std is at least 0.1 % of its mean level ...
_ABS_STD_FLOOR = 1e-6  # ... and never zero (a constant channel during commissioning)
#: A reading further than this many standard deviations from its channel's mean counts as this
#: far: a value near the float range (a glitch) would overflow to inf, and inf - inf (a rate
#: channel) to NaN, which no threshold or CUSUM sum ever crosses again.
_Z_LIMIT = 1e9


@dataclass(frozen=True)
class FeatureSpec:
    """How rows become model inputs; stored in the manifest entry of each anomaly model."""

    channels: tuple[str, ...] = CHANNELS
    rate_channels: tuple[str, ...] = RATE_CHANNELS
    smooth: int = 10  # W: samples in the causal moving mean
    rate_lag: int = 10  # D: samples between the two means of a rate channel
    steps: int = 4  # vectors in one model input
    step_stride: int = 5  # samples between those vectors
    commissioning: int = 400  # samples of normal running used to calibrate a device
    normal_scale: tuple[float, ...] = (1.0,) * len(CHANNELS)
    floor_factor: float = 0.5
    drift_factor: float = 2.0
    clip: float = 8.0  # model inputs are clipped to +-clip (the int8 input range covers it)

    def __post_init__(self) -> None:
        n = len(self.channels)
        if n == 0 or len(set(self.channels)) != n:
            raise ValueError("channels must be distinct and not empty")
        if not set(self.rate_channels) <= set(self.channels):
            raise ValueError("rate_channels must be a subset of channels")
        if len(self.normal_scale) != n or not all(s > 0 for s in self.normal_scale):
            raise ValueError(f"normal_scale needs {n} positive numbers")
        if min(self.smooth, self.rate_lag, self.steps, self.step_stride) < 1:
            raise ValueError("smooth, rate_lag, steps and step_stride must be >= 1")
        if self.commissioning < self.min_commissioning:
            raise ValueError(f"commissioning must be at least {self.min_commissioning} samples")

    @property
    def span(self) -> int:
        """Samples between the oldest and the newest vector of one model input."""
        return (self.steps - 1) * self.step_stride

    @property
    def history(self) -> int:
        """Rows a device must keep to compute one model input."""
        return self.smooth + self.rate_lag + self.span

    @property
    def min_commissioning(self) -> int:
        """Enough rows that each half of commissioning still holds a full feature history."""
        return 2 * (self.smooth + self.rate_lag) + 20

    @property
    def input_shape(self) -> tuple[int, int]:
        return (self.steps, len(self.channels))

    @property
    def rate_mask(self) -> np.ndarray:
        return np.array([c in self.rate_channels for c in self.channels])

    def to_dict(self) -> dict[str, Any]:
        return {
            "channels": list(self.channels),
            "rate_channels": list(self.rate_channels),
            "smooth": self.smooth,
            "rate_lag": self.rate_lag,
            "steps": self.steps,
            "step_stride": self.step_stride,
            "commissioning": self.commissioning,
            "normal_scale": [float(s) for s in self.normal_scale],
            "floor_factor": self.floor_factor,
            "drift_factor": self.drift_factor,
            "clip": self.clip,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> FeatureSpec:
        return cls(
            channels=tuple(d["channels"]),
            rate_channels=tuple(d["rate_channels"]),
            smooth=int(d["smooth"]),
            rate_lag=int(d["rate_lag"]),
            steps=int(d["steps"]),
            step_stride=int(d["step_stride"]),
            commissioning=int(d["commissioning"]),
            normal_scale=tuple(float(s) for s in d["normal_scale"]),
            floor_factor=float(d["floor_factor"]),
            drift_factor=float(d["drift_factor"]),
            clip=float(d["clip"]),
        )

    def with_commissioning(self, samples: int) -> FeatureSpec:
        """The same features with another commissioning length (a device setting)."""
        d = self.to_dict()
        d["commissioning"] = samples
        return FeatureSpec.from_dict(d)


@dataclass(frozen=True)
class Calibration:
    """What commissioning learned about one device (all arrays have one value per channel)."""

    mean: np.ndarray
    std: np.ndarray
    smooth_std: np.ndarray
    drift: np.ndarray
    scale: np.ndarray
    samples: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "mean": self.mean.tolist(),
            "std": self.std.tolist(),
            "smooth_std": self.smooth_std.tolist(),
            "drift": self.drift.tolist(),
            "scale": self.scale.tolist(),
            "samples": self.samples,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Calibration:
        arr = {k: np.asarray(d[k], dtype=np.float64) for k in _CAL_ARRAYS}
        return cls(samples=int(d.get("samples", 0)), **arr)


_CAL_ARRAYS = ("mean", "std", "smooth_std", "drift", "scale")


@dataclass(frozen=True)
class _Scaler:
    mean: np.ndarray
    std: np.ndarray
    smooth_std: np.ndarray


def _moving_mean(z: np.ndarray, w: int) -> np.ndarray:
    """Causal mean over the last ``w`` rows (fewer at the start)."""
    c = np.cumsum(np.vstack([np.zeros((1, z.shape[1])), z]), axis=0)
    n = len(z)
    hi = np.arange(1, n + 1)
    lo = np.maximum(0, hi - w)
    return (c[hi] - c[lo]) / (hi - lo)[:, None]


def _standardise(x: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """``(x - mean) / std``, within +-:data:`_Z_LIMIT`."""
    with np.errstate(over="ignore"):
        return np.clip((x - mean) / std, -_Z_LIMIT, _Z_LIMIT)


def _raw(spec: FeatureSpec, rows: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    m = _moving_mean(_standardise(rows, mean, std), spec.smooth)
    d = spec.rate_lag
    rate = np.empty_like(m)
    rate[d:] = m[d:] - m[:-d]
    rate[:d] = m[: min(d, len(m))] - m[0]
    mask = spec.rate_mask
    m[:, mask] = rate[:, mask]
    return m


def _fit_scaler(spec: FeatureSpec, rows: np.ndarray) -> _Scaler:
    mean = rows.mean(axis=0)
    std = np.maximum(rows.std(axis=0), np.maximum(_REL_STD_FLOOR * np.abs(mean), _ABS_STD_FLOOR))
    f = _raw(spec, rows, mean, std)[spec.smooth + spec.rate_lag :]
    smooth_std = np.maximum(f.std(axis=0), 1.0 / math.sqrt(spec.smooth))
    return _Scaler(mean, std, smooth_std)


def _as_rows(spec: FeatureSpec, rows: Any) -> np.ndarray:
    a = np.asarray(rows, dtype=np.float64)
    if a.ndim != 2 or a.shape[1] != len(spec.channels):
        raise ValueError(f"expected rows of {len(spec.channels)} values, got shape {a.shape}")
    if not np.all(np.isfinite(a)):
        raise ValueError("rows must be finite numbers")
    return a


def calibrate(spec: FeatureSpec, rows: Any) -> Calibration:
    """Commission a device from its first ``spec.commissioning`` rows of normal running."""
    a = _as_rows(spec, rows)
    n = spec.commissioning
    if len(a) < n:
        raise ValueError(f"commissioning needs {n} rows, got {len(a)}")
    a = a[:n]
    full = _fit_scaler(spec, a)
    half = n // 2
    first = _fit_scaler(spec, a[:half])
    second = np.abs(_raw(spec, a, first.mean, first.std)[half:] / first.smooth_std)
    drift = second.max(axis=0)
    scale = np.maximum(spec.floor_factor * np.asarray(spec.normal_scale), spec.drift_factor * drift)
    cal = Calibration(full.mean, full.std, full.smooth_std, drift, scale, samples=n)
    if not all(np.all(np.isfinite(getattr(cal, k))) for k in _CAL_ARRAYS):
        # a value near the float range (a sensor glitch) overflows the spread: such a
        # calibration would read that channel as 0 for good
        raise ValueError("commissioning rows too large to scale (a reading near the float range?)")
    return cal


def levels(spec: FeatureSpec, cal: Calibration, rows: Any) -> np.ndarray:
    """``f / smooth_std`` of every row (before the per-device scale); training learns
    ``normal_scale`` from these."""
    a = _as_rows(spec, rows)
    return _raw(spec, a, cal.mean, cal.std) / cal.smooth_std


def transform(spec: FeatureSpec, cal: Calibration, rows: Any) -> np.ndarray:
    """The feature vector ``u`` of every row, shape (rows, channels). Causal."""
    return levels(spec, cal, rows) / cal.scale


def windows(spec: FeatureSpec, u: np.ndarray) -> np.ndarray:
    """Model inputs for every row from ``spec.span`` on: shape (rows - span, steps, channels).

    Input ``i`` ends at row ``i + span``. Values are clipped to ``+-spec.clip``.
    """
    n = len(u) - spec.span
    if n <= 0:
        return np.zeros((0, *spec.input_shape), dtype=np.float32)
    idx = np.arange(n)[:, None] + np.arange(spec.steps)[None, :] * spec.step_stride
    return np.clip(u[idx], -spec.clip, spec.clip).astype(np.float32)


@dataclass
class StreamingFeatures:
    """The device side of :func:`transform` and :func:`windows`, one row at a time.

    Built from a calibration and the commissioning rows (its tail primes the buffers), so the
    first row after commissioning already yields a full model input, equal to what
    :func:`transform` computes over the whole series.
    """

    spec: FeatureSpec
    cal: Calibration
    _z: deque[np.ndarray] = field(init=False)
    _m: deque[np.ndarray] = field(init=False)
    _u: deque[np.ndarray] = field(init=False)

    def __post_init__(self) -> None:
        self._z = deque(maxlen=self.spec.smooth)
        self._m = deque(maxlen=self.spec.rate_lag + 1)
        self._u = deque(maxlen=self.spec.span + 1)
        self._mask = self.spec.rate_mask
        self._bounds: tuple[Calibration, np.ndarray, np.ndarray] | None = None

    def prime(self, rows: Any) -> None:
        """Feed rows (the commissioning tail) without producing inputs."""
        a = _as_rows(self.spec, rows)
        for r in a[-self.spec.history :]:
            self.push(r)

    def push(self, row: Any) -> tuple[np.ndarray, np.ndarray | None]:
        """Add one row; returns its ``u`` vector and the model input ending there (or None)."""
        x = np.asarray(row, dtype=np.float64)
        cal = self.cal
        if self._bounds is None or self._bounds[0] is not cal:  # per calibration, not per row
            with np.errstate(over="ignore"):
                spread = _Z_LIMIT * cal.std
                self._bounds = (cal, cal.mean - spread, cal.mean + spread)
        _, lo, hi = self._bounds
        # as _standardise (within +-_Z_LIMIT), at a third of its cost per row
        self._z.append((np.minimum(np.maximum(x, lo), hi) - cal.mean) / cal.std)
        m = np.mean(np.stack(self._z), axis=0)
        self._m.append(m)
        f = m.copy()
        f[self._mask] = (m - self._m[0])[self._mask]
        u = f / self.cal.smooth_std / self.cal.scale
        self._u.append(u)
        if len(self._u) <= self.spec.span:
            return u, None
        win = np.stack([self._u[i] for i in range(0, self.spec.span + 1, self.spec.step_stride)])
        return u, np.clip(win, -self.spec.clip, self.spec.clip).astype(np.float32)

    def move_mean(self, mean: np.ndarray) -> None:
        """Replace the calibration's mean (reference tracking) and shift the buffered values,
        so they equal what the new mean would have given."""
        mean = np.asarray(mean, dtype=np.float64)
        dz = (self.cal.mean - mean) / self.cal.std
        du = np.where(self._mask, 0.0, dz / self.cal.smooth_std / self.cal.scale)
        for buf, d in ((self._z, dz), (self._m, dz), (self._u, du)):
            for i in range(len(buf)):
                buf[i] = buf[i] + d
        self.cal = replace(self.cal, mean=mean)


def feature_names(spec: FeatureSpec) -> Sequence[str]:
    """Channel names as the features call them (rate channels get a ``d/dt`` prefix)."""
    return [f"d/dt {c}" if c in spec.rate_channels else c for c in spec.channels]
