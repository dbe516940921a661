"""What a hot swap of the detector's models checks: the result of
:meth:`Detector.check_swap <agent.detect.detector.Detector.check_swap>` and the warm-up invoke.

A check is in two kinds of parts: the features and the threshold (no inference), and one warm-up
invoke per new model on the detector's newest model input. :meth:`Detector.check_swap` runs them
all, or (``warm=False``) leaves the warm-ups to :meth:`Detector.warm_up`, one model per call, so
that a caller on the event loop lets the detector score between them; :meth:`Detector.install`
takes a :class:`CheckedSwap` only once none is left. The warm-ups run on the caller's thread:
both runtimes' ``invoke()`` releases the GIL, but on the shipped models it is about 1 us of a
warm-up's 7 to 15 us; the rest (quantize, copy, dequantize, checks) holds the GIL, so a worker
thread would take as much from the event loop, at moments nobody chose, and each hand-off
between the threads costs more than it frees.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from agent.detect.features import FeatureSpec
from agent.detect.inference import Inference
from agent.errors import ModelError

if TYPE_CHECKING:
    from agent.detect.detector import Detector


@dataclass(frozen=True)
class CheckedSwap:
    """Models :meth:`Detector.check_swap` passed, for :meth:`Detector.install`.

    ``cold``: the roles ("anomaly", then "classifier") still to warm up on the detector's newest
    model input (:meth:`Detector.warm_up`), in order; install refuses a check with any left."""

    detector: Detector
    anomaly: Inference | None
    threshold: float | None  # None: unchanged
    classifier: Inference | None
    classes: tuple[str, ...]
    cold: tuple[str, ...] = ()


def entry_features(entry: Mapping[str, Any], label: str) -> tuple[FeatureSpec, float]:
    """The features and the calibrated threshold of an anomaly model's manifest ``entry``;
    ModelError when they do not read (a field missing, of another type, an infinite integer)."""
    try:
        return FeatureSpec.from_dict(entry["features"]), float(entry["threshold"]["value"])
    except (KeyError, TypeError, ValueError, OverflowError) as err:  # inf: int() raises
        raise ModelError(f"{label}: bad manifest entry ({err!r}); refused") from err


def warm_window(last_window: Sequence[float] | np.ndarray, n_in: int) -> np.ndarray:
    """The model input a warm-up runs on: the detector's newest (``last_window``), or zeros
    when there is none yet (commissioning) or it is not finite."""
    window = np.asarray(last_window, dtype=np.float32).reshape(-1)
    if window.size != n_in or not np.all(np.isfinite(window)):
        return np.zeros(n_in, dtype=np.float32)
    return window


def warm_model(model: Inference, window: np.ndarray, shape: tuple[int, ...], label: str) -> None:
    """One invoke on ``window``: ModelError unless it gives finite output of ``shape``."""
    try:
        out = np.asarray(model.predict(window[None]))
    except (ValueError, RuntimeError, ModelError) as err:
        raise ModelError(f"{label}: failed on the warm-up window ({err}); refused") from err
    if out.shape != (1, *shape):
        raise ModelError(
            f"{label}: warm-up output has shape {out.shape[1:]}, expected {shape}; refused"
        )
    if not np.all(np.isfinite(out)):
        raise ModelError(f"{label}: non-finite output on the warm-up window; refused")
