"""Streaming changepoint detection: when did the process change, and which channels moved.

The anomaly score says *whether* the machine runs abnormally; the changepoint detector says
*when* its behaviour changed -- the onset of a fault, the end of its transient, the start of a
recovery, the return to normal -- including the changes inside an anomaly episode that the anomaly
state does not mark, and often well before the hysteresis clears (at a fault's onset it is about as
quick as the hysteresis: docs/detection.md).

Input, one vector per scored sample: the int8 autoencoder's **signed residuals** ``u - r`` (the
feature vector minus its reconstruction, per channel; :mod:`agent.detect.detector` computes them
for the anomaly score anyway). Normal running keeps them near a steady level; a change of the
process moves that level on one or more channels.

Per channel, a two-sided CUSUM (Page's test) against a reference level ``mu``::

    g+ = max(0, g+ + (e - mu) - drift)        g- = max(0, g- - (e - mu) - drift)

A change is raised when a sum exceeds ``threshold``, at the sample where it does (never later
samples: no look-ahead). Its **estimated change time** is the first sample of the excursion that
crossed, i.e. the sample after the sum's last reset to 0 -- the classical CUSUM estimate of the
change time, earlier than the raise. The **channels that moved** are those whose sum reached half
the threshold, largest first, each with the shift of its level (new minus old reference).

After a change the reference jumps to the new level (the mean of the last ``settle`` samples), the
sums restart at 0, and no change is raised for ``hold`` samples (the new level is still settling).
Between changes the reference follows slow drift: ``mu += track * (e - mu)`` per sample.

Defaults were tuned on SKAB's labelled files by the NAB score (docs/detection.md says how, and on
what). Pure numpy, no I/O; the state is a few numbers per channel and the last ``settle``
residual vectors, and :meth:`ChangeDetector.update` is a handful of vector operations.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

#: Seconds after a change within which a raise or clear alert names it as its cause.
CAUSE_HORIZON = 60.0
#: A change estimated to start at most this many seconds after the previous change was raised
#: continues it (a ramp the CUSUM follows in steps): the cause is the first change of the chain.
CHAIN_SECONDS = 30.0
HISTORY = 32  # changes remembered for :meth:`ChangeDetector.cause`


@dataclass(frozen=True)
class ChangeSettings:
    """The CUSUM's parameters, in feature units (the per-device normal band is about +-1).

    ``alerts``: the detector emits each change as an alert of kind ``change``. The CUSUM runs
    either way (raise and clear alerts carry the change that caused them).
    """

    drift: float = 0.4  # allowance per sample: a shift s > drift raises after threshold/(s-drift)
    threshold: float = 10.0  # CUSUM sum that raises a change
    track: float = 0.01  # per-sample rate at which the reference follows slow drift
    hold: int = 10  # samples after a change before the next can be raised
    settle: int = 5  # samples whose mean is the new reference after a change
    alerts: bool = True

    def __post_init__(self) -> None:
        if not (self.drift >= 0 and self.threshold > 0 and 0 <= self.track < 1):
            raise ValueError("drift >= 0, threshold > 0 and 0 <= track < 1 are required")
        if self.hold < 0 or self.settle < 1:
            raise ValueError("hold must be >= 0 and settle >= 1")


@dataclass(frozen=True)
class ChangePoint:
    """A change the detector believes happened.

    ``time``: when it was raised (the sample that crossed the threshold). ``change_time``: the
    estimated start of the change (never after ``time``). ``channels``: (name, shift) of the
    channels that moved, the one that crossed first; ``shift`` is the change of the residual's
    level in feature units. ``statistic``: the crossing sum over the threshold (>= 1).
    """

    time: float
    change_time: float
    channels: tuple[tuple[str, float], ...]
    statistic: float

    @property
    def delay(self) -> float:
        """Seconds from the estimated change to the raise."""
        return self.time - self.change_time


class ChangeDetector:
    """The per-channel two-sided CUSUM of one stream. See the module docstring."""

    def __init__(self, channels: Sequence[str], settings: ChangeSettings | None = None) -> None:
        self.channels = tuple(channels)
        self.settings = settings or ChangeSettings()
        n = len(self.channels)
        self._mu: np.ndarray | None = np.zeros(n)
        self._up = np.zeros(n)
        self._down = np.zeros(n)
        self._up_start = np.zeros(n)  # time of the first sample of the current excursion
        self._down_start = np.zeros(n)
        self._recent: deque[np.ndarray] = deque(maxlen=self.settings.settle)
        self._hold = 0
        self.history: deque[ChangePoint] = deque(maxlen=HISTORY)
        self.changes = 0

    def reset(self, *, relearn: bool = False) -> None:
        """Start again: the reference is normal running (zero residual), or, with ``relearn``,
        whatever the next sample shows (after a model swap the residuals change meaning); no
        change is raised during the ``hold`` samples that follow a relearn."""
        n = len(self.channels)
        self._mu = None if relearn else np.zeros(n)
        self._up = np.zeros(n)
        self._down = np.zeros(n)
        self._recent.clear()
        self._hold = self.settings.hold if relearn else 0
        self.history.clear()

    @property
    def last(self) -> ChangePoint | None:
        return self.history[-1] if self.history else None

    def cause(self, t: float, since: float = -math.inf) -> ChangePoint | None:
        """The change behind an alert at ``t``. Of the changes raised in the last
        :data:`CAUSE_HORIZON` seconds and after ``since`` (the previous raise or clear): the
        newest, followed back through the changes that continue one another (each estimated to
        start within :data:`CHAIN_SECONDS` of the previous one's raise) to the first of them.
        None when there is none. A ``since`` after ``t`` (the wall clock was set back since it)
        bounds nothing: it would hide every change until the clock is past it again."""
        if since > t:
            since = -math.inf
        recent = [c for c in self.history if since < c.time and 0.0 <= t - c.time <= CAUSE_HORIZON]
        if not recent:
            return None
        first = recent[-1]
        for prev in reversed(recent[:-1]):
            if first.change_time - prev.time > CHAIN_SECONDS:
                break
            first = prev
        return first

    def update(self, t: float, residual: np.ndarray) -> ChangePoint | None:
        """One sample's signed residuals (one per channel); returns the change it raises."""
        e = np.asarray(residual, dtype=np.float64)
        s = self.settings
        self._recent.append(e)
        if self._mu is None:
            self._mu = e.copy()
        d = e - self._mu
        was_up, was_down = self._up > 0, self._down > 0
        self._up = np.maximum(0.0, self._up + d - s.drift)
        self._down = np.maximum(0.0, self._down - d - s.drift)
        # an excursion starts at the first sample that lifts its sum above zero
        self._up_start = np.where(~was_up & (self._up > 0), t, self._up_start)
        self._down_start = np.where(~was_down & (self._down > 0), t, self._down_start)
        if self._hold > 0:
            self._hold -= 1
        peak = np.maximum(self._up, self._down)
        if self._hold == 0 and float(peak.max()) > s.threshold:
            return self._raise(t, peak)
        self._mu = self._mu + s.track * (e - self._mu)
        return None

    def _raise(self, t: float, peak: np.ndarray) -> ChangePoint:
        assert self._mu is not None
        s = self.settings
        first = int(np.argmax(peak))
        up = self._up[first] >= self._down[first]
        start = float(self._up_start[first] if up else self._down_start[first])
        new_mu = np.mean(np.stack(self._recent), axis=0)
        shift = new_mu - self._mu
        moved = [c for c in np.argsort(-peak, kind="stable") if peak[c] >= s.threshold / 2]
        cp = ChangePoint(
            time=t,
            change_time=min(start, t),
            channels=tuple((self.channels[c], float(shift[c])) for c in moved),
            statistic=float(peak[first] / s.threshold),
        )
        self._mu = new_mu
        self._up = np.zeros_like(self._up)
        self._down = np.zeros_like(self._down)
        self._hold = s.hold
        self.history.append(cp)
        self.changes += 1
        return cp
