"""The streaming anomaly detector: rows of sensor values in, alerts out.

One row of the eight SKAB channels per sample (the agent assembles them at 1 Hz). For each row:

1. **Commissioning.** The first ``commissioning_samples`` rows are normal running of this device.
   They calibrate the per-channel scaler and per-channel thresholds
   (:mod:`agent.detect.features`) and    seed the novelty detector. No alerts during commissioning.
2. **Features.** Causal smoothing, standardisation and a short history window (a model input).
3. **Anomaly score.** The int8 denoising autoencoder reconstructs the window as normal running
   would look; the score is the largest per-channel residual of the newest step,
   ``max_c |u_c - r_c|`` (``r`` taken as 0 where the model gives NaN or inf). The residuals say
   which channels contribute most.
4. **Hysteresis.** ``raise_after`` consecutive scores above the threshold raise an alert,
   ``clear_after`` consecutive scores at or below it clear it.
5. **Verdict.** On a raise, the fault classifier looks at the same window: ``KNOWN_FAILURE`` with
   the class when it is confident, ``NOVEL_ANOMALY`` when it is not (or says "normal").
6. **Novelty.** A PCA T²+Q detector (:mod:`agent.detect.novelty`), refitted on recent vectors judged
   normal, scores every vector; its statistics travel with the alert.
7. **Reference tracking.** Every ``ADAPT_EVERY`` samples the per-channel reference level moves
   toward the samples judged normal since (an exponential average with a time constant of
   ``track_samples``), and stays put while an alert is active: slow wear and ambient changes are
   followed, a fault is not. :meth:`Detector.recommission` starts commissioning again.
8. **Changepoints.** A per-channel CUSUM on the signed residuals ``u - r``
   (:mod:`agent.detect.changepoint`) notes when the process changed and which channels moved:
   also the changes inside an episode (end of a transient, start of a recovery) that the anomaly
   state does not show. With ``ChangeSettings.alerts`` each change is an alert of kind
   ``change``; either way a raise or clear carries the change that caused it (``change_time``,
   and ``time_to_detect``: seconds from that change to the alert). docs/detection.md has both
   SKAB leaderboards.

The detector does no I/O besides the interpreter: the agent runtime stores the alerts (as
high-priority records). :meth:`Detector.feed` processes a block of rows with one batched model
invoke and gives exactly what :meth:`Detector.push` gives row by row (the models have no state).

Logging policy: info for commissioning done and for each alert raised, cleared or changed.
"""

from __future__ import annotations

import enum
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from agent.detect.changepoint import ChangeDetector, ChangePoint, ChangeSettings
from agent.detect.features import Calibration, FeatureSpec, StreamingFeatures, calibrate, transform
from agent.detect.inference import RUNTIMES, Inference, Manifest, TFLiteModel, load_manifest
from agent.detect.novelty import NoveltyDetector, NoveltyScore, NoveltySettings
from agent.detect.swap import CheckedSwap, entry_features, warm_model, warm_window
from agent.errors import ModelError
from drivers.base import Options

log = logging.getLogger(__name__)

DEFAULT_MODEL = "skab-ae"
DEFAULT_CLASSIFIER = "skab-clf"
ADAPT_EVERY = 60  # samples between moves of the reference level (reference tracking)
NORMAL_CLASS = "normal"


def newest_residuals(u: np.ndarray, reconstruction: np.ndarray) -> np.ndarray:
    """The signed residuals ``u - r`` at the newest step of each window: ``u`` the feature
    vectors of the rows where the windows end, shape ``(n, channels)``; ``reconstruction`` the
    anomaly model's output for those windows, shape ``(n, steps * channels)``, newest step last.
    A reconstruction with NaN or inf counts as zeros: that window is scored by its features
    alone (a model that breaks must not silence the detector)."""
    u = np.asarray(u)
    r = np.asarray(reconstruction)
    if u.ndim != 2 or r.ndim != 2 or len(u) != len(r) or r.shape[1] % max(u.shape[1], 1):
        raise ValueError(f"feature vectors {u.shape} do not match reconstructions {r.shape}")
    newest = r[:, r.shape[1] - u.shape[1] :]
    return u - np.where(np.isfinite(newest).all(axis=1, keepdims=True), newest, 0.0)


def anomaly_scores(residuals: np.ndarray) -> np.ndarray:
    """The anomaly score of each row of :func:`newest_residuals`: ``max_c |u_c - r_c|``. The one
    definition of the score, shared by the detector and federated learning's score summaries."""
    return np.abs(np.asarray(residuals)).max(axis=1)


class Verdict(enum.StrEnum):
    KNOWN_FAILURE = "known_failure"
    NOVEL_ANOMALY = "novel_anomaly"
    NORMAL = "normal"  # a change outside an anomaly episode


class AlertKind(enum.StrEnum):
    RAISE = "raise"
    CLEAR = "clear"
    CHANGE = "change"  # a changepoint: the process changed (inside an episode or not)


@dataclass(frozen=True)
class Alert:
    """An anomaly episode starting (``raise``) or ending (``clear``), or a changepoint
    (``change``).

    ``channels``: for a raise or clear, the channels contributing most, as (name, residual)
    pairs, largest first; for a change, the channels that moved, as (name, shift of the
    residual's level). ``verdict``/``fault``/``confidence``: the classifier's view of the raising
    window (a clear, and a change inside an episode, repeat its episode's verdict; a change outside
    one is ``normal``). ``novelty``: PCA T²+Q statistics of the same vector, if fitted.
    ``change_time``: the estimated time the process changed (a change's own estimate; for a raise
    or clear, that of the change behind it, :meth:`ChangeDetector.cause`), None when unknown.
    """

    time: float
    kind: AlertKind
    score: float
    threshold: float
    channels: tuple[tuple[str, float], ...]
    verdict: Verdict
    fault: str | None = None
    confidence: float = 0.0
    novelty: NoveltyScore | None = None
    model: str = DEFAULT_MODEL
    change_time: float | None = None

    @property
    def time_to_detect(self) -> float | None:
        """Seconds from the estimated change to this alert, when the change is known."""
        return None if self.change_time is None else self.time - self.change_time

    def to_dict(self) -> dict[str, Any]:
        """CBOR/JSON-native dict (str, float, list, None)."""
        return {
            "time": self.time,
            "kind": self.kind.value,
            "score": self.score,
            "threshold": self.threshold,
            "channels": [[name, value] for name, value in self.channels],
            "verdict": self.verdict.value,
            "fault": self.fault,
            "confidence": self.confidence,
            "novelty": None if self.novelty is None else self.novelty.to_dict(),
            "model": self.model,
            "change_time": self.change_time,
            "time_to_detect": self.time_to_detect,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Alert:
        nov = d.get("novelty")
        return cls(
            time=float(d["time"]),
            kind=AlertKind(d["kind"]),
            score=float(d["score"]),
            threshold=float(d["threshold"]),
            channels=tuple((str(n), float(v)) for n, v in d["channels"]),
            verdict=Verdict(d["verdict"]),
            fault=None if d.get("fault") is None else str(d["fault"]),
            confidence=float(d.get("confidence", 0.0)),
            novelty=None if nov is None else NoveltyScore(**{k: float(v) for k, v in nov.items()}),
            model=str(d.get("model", DEFAULT_MODEL)),
            change_time=None if d.get("change_time") is None else float(d["change_time"]),
        )


@dataclass
class Hysteresis:
    """``raise_after`` consecutive exceedances raise; ``clear_after`` consecutive non-exceedances
    clear. :meth:`update` returns the transition, if any."""

    raise_after: int
    clear_after: int
    active: bool = False
    _run: int = 0

    def __post_init__(self) -> None:
        if self.raise_after < 1 or self.clear_after < 1:
            raise ValueError("raise_after and clear_after must be >= 1")

    def update(self, above: bool) -> AlertKind | None:
        if above != self.active:
            self._run += 1
        else:
            self._run = 0
        if not self.active and self._run >= self.raise_after:
            self.active, self._run = True, 0
            return AlertKind.RAISE
        if self.active and self._run >= self.clear_after:
            self.active, self._run = False, 0
            return AlertKind.CLEAR
        return None


@dataclass(frozen=True)
class DetectSettings:
    """The ``[detect]`` table of the agent's configuration.

    ``threshold``, ``raise_after``, ``clear_after`` and ``commissioning_samples`` default to the
    values the model's manifest entry was validated with (None here means "from the manifest").
    """

    models_dir: Path = Path("models")
    model: str = DEFAULT_MODEL
    classifier: str = DEFAULT_CLASSIFIER  # "" disables the classifier
    runtime: str = "auto"
    num_threads: int = 1
    batch_mode: str = "resize"
    threshold: float | None = None
    raise_after: int | None = None
    clear_after: int | None = None
    commissioning_samples: int | None = None
    classifier_confidence: float = 0.8
    top_channels: int = 3
    track_samples: int = 1800  # reference tracking time constant in samples; 0 = off
    novelty: NoveltySettings = field(default_factory=NoveltySettings)
    #: not a config key yet: change alerts stay off until the endpoint's dashboard knows them
    changepoint: ChangeSettings = field(default_factory=ChangeSettings)

    @classmethod
    def from_options(cls, opts: Options, base_dir: Path | None = None) -> DetectSettings:
        """Validate a ``[detect]`` table; errors are OptionError naming the key path.
        A relative ``models_dir`` is taken relative to ``base_dir`` when given."""
        d = cls()
        models_dir = Path(opts.string("models_dir", str(d.models_dir))).expanduser()
        if base_dir is not None and not models_dir.is_absolute():
            models_dir = base_dir / models_dir
        model = opts.string("model", d.model)
        if not model:
            raise opts.error("model", "must name a model of the manifest")
        classifier = opts.string("classifier", d.classifier)
        runtime = opts.choice("runtime", d.runtime, RUNTIMES)
        num_threads = opts.integer("num_threads", d.num_threads, minimum=1, maximum=64)
        batch_mode = opts.choice("batch_mode", d.batch_mode, ("resize", "loop"))
        threshold = opts.number("threshold", 1.0, above=0.0) if opts.has("threshold") else None
        raise_after = (
            opts.integer("raise_after", 1, minimum=1, maximum=3600)
            if opts.has("raise_after")
            else None
        )
        clear_after = (
            opts.integer("clear_after", 1, minimum=1, maximum=3600)
            if opts.has("clear_after")
            else None
        )
        commissioning = (
            opts.integer("commissioning_samples", 400, minimum=60, maximum=1_000_000)
            if opts.has("commissioning_samples")
            else None
        )
        confidence = opts.number(
            "classifier_confidence", d.classifier_confidence, minimum=0.0, maximum=1.0
        )
        top = opts.integer("top_channels", d.top_channels, minimum=1, maximum=64)
        track = opts.integer("track_samples", d.track_samples, minimum=0, maximum=10_000_000)
        if 0 < track < ADAPT_EVERY:
            raise opts.error("track_samples", f"must be 0 (off) or at least {ADAPT_EVERY}")
        novelty = _novelty_from_options(opts.table("novelty"))
        change_alerts = opts.boolean("change_alerts", d.changepoint.alerts)
        opts.finish()
        return cls(
            models_dir=models_dir,
            model=model,
            classifier=classifier,
            runtime=runtime,
            num_threads=num_threads,
            batch_mode=batch_mode,
            threshold=threshold,
            raise_after=raise_after,
            clear_after=clear_after,
            commissioning_samples=commissioning,
            classifier_confidence=confidence,
            top_channels=top,
            track_samples=track,
            novelty=novelty,
            changepoint=replace(d.changepoint, alerts=change_alerts),
        )


def _novelty_from_options(opts: Options) -> NoveltySettings:
    d = NoveltySettings()
    enabled = opts.boolean("enabled", d.enabled)
    variance = opts.number("variance", d.variance, above=0.0, maximum=0.999)
    alpha = opts.number("alpha", d.alpha, above=0.5, maximum=0.99999)
    min_samples = opts.integer("min_samples", d.min_samples, minimum=10)
    buffer = opts.integer("buffer", max(d.buffer, min_samples), minimum=min_samples)
    retrain_every = opts.integer("retrain_every", d.retrain_every, minimum=1)
    opts.finish()
    return NoveltySettings(enabled, variance, alpha, buffer, min_samples, retrain_every)


@dataclass(frozen=True)
class FeedResult:
    """What :meth:`Detector.feed` saw: the alerts, and per row the anomaly decision (after
    hysteresis; False during commissioning) and the score (NaN during commissioning)."""

    alerts: list[Alert]
    anomalous: np.ndarray
    scores: np.ndarray


class Detector:
    """The streaming detector of one device. See the module docstring.

    ``anomaly``: the autoencoder (input: flattened window ``steps x channels``, output: its
    reconstruction). ``classifier``: optional, output: class probabilities in ``classes`` order.
    """

    def __init__(
        self,
        anomaly: Inference,
        spec: FeatureSpec,
        *,
        threshold: float,
        raise_after: int,
        clear_after: int,
        classifier: Inference | None = None,
        classes: Sequence[str] = (),
        classifier_confidence: float = 0.8,
        top_channels: int = 3,
        novelty: NoveltySettings | None = None,
        adapt_samples: int = 0,
        changepoint: ChangeSettings | None = None,
    ) -> None:
        if not threshold > 0:
            raise ValueError("threshold must be > 0")
        if classifier is not None and NORMAL_CLASS not in classes:
            raise ValueError(f"classifier classes must include {NORMAL_CLASS!r}")
        self.anomaly = anomaly
        self.spec = spec
        self.threshold = float(threshold)
        self.hysteresis = Hysteresis(raise_after, clear_after)
        self.classifier = classifier
        self.classes = tuple(classes)
        self.classifier_confidence = classifier_confidence
        self.top_channels = top_channels
        self.novelty = NoveltyDetector(novelty) if novelty and novelty.enabled else None
        self.changes = ChangeDetector(spec.channels, changepoint)
        self.calibration: Calibration | None = None
        self._commissioning: list[np.ndarray] = []
        self._stream: StreamingFeatures | None = None
        self._episode: tuple[Verdict, str | None, float] | None = None
        self._transition = -math.inf  # time of the last raise or clear
        self.adapt_samples = adapt_samples
        self._since_adapt = 0
        self._normal_sum = np.zeros(len(spec.channels))
        self._normal_n = 0
        self.samples = 0
        self.last_score = math.nan
        self.last_window: np.ndarray = np.zeros(0, dtype=np.float32)  # newest model input
        #: Called with each model input (flattened window) of a row judged normal outside an
        #: episode: agent/learn keeps the recent ones to train on.
        self.normal_sink: Callable[[np.ndarray], None] | None = None
        self._restored: Calibration | None = None
        self.log_alerts = True  # False while replaying history (a tier switch primes a detector)

    # --- construction from config ---------------------------------------------------------------
    @classmethod
    def from_settings(cls, settings: DetectSettings, manifest: Manifest | None = None) -> Detector:
        """Load the models named in ``settings`` (verifying them) and build a detector."""
        manifest = manifest or load_manifest(settings.models_dir)
        anomaly = TFLiteModel.open(
            manifest,
            settings.model,
            runtime=settings.runtime,
            num_threads=settings.num_threads,
            batch_mode=settings.batch_mode,
        )
        classifier = None
        classes: Sequence[str] = ()
        if settings.classifier:
            classifier = TFLiteModel.open(
                manifest,
                settings.classifier,
                runtime=settings.runtime,
                num_threads=settings.num_threads,
                batch_mode=settings.batch_mode,
            )
            classes = manifest.entry(settings.classifier).raw.get("classes", ())
        return cls.from_entry(
            anomaly,
            manifest.entry(settings.model).raw,
            settings=settings,
            classifier=classifier,
            classes=classes,
        )

    @classmethod
    def from_entry(
        cls,
        anomaly: Inference,
        entry: Mapping[str, Any],
        *,
        settings: DetectSettings | None = None,
        classifier: Inference | None = None,
        classes: Sequence[str] = (),
    ) -> Detector:
        """A detector with the features and threshold of a manifest entry (``raw`` dict),
        overridden by ``settings`` where it sets them."""
        s = settings or DetectSettings()
        try:
            spec = FeatureSpec.from_dict(entry["features"])
            thr = entry["threshold"]
            threshold = float(thr["value"]) if s.threshold is None else s.threshold
            raise_after = int(thr["raise_after"]) if s.raise_after is None else s.raise_after
            clear_after = int(thr["clear_after"]) if s.clear_after is None else s.clear_after
        except (KeyError, TypeError, ValueError, OverflowError) as err:  # inf: int() raises
            raise ModelError(f"model {entry.get('name')!r}: bad manifest entry ({err!r})") from err
        if s.commissioning_samples is not None:
            try:
                spec = spec.with_commissioning(s.commissioning_samples)
            except ValueError as err:
                raise ModelError(f"commissioning_samples: {err}") from err
        return cls(
            anomaly,
            spec,
            threshold=threshold,
            raise_after=raise_after,
            clear_after=clear_after,
            classifier=classifier,
            classes=classes,
            classifier_confidence=s.classifier_confidence,
            top_channels=s.top_channels,
            novelty=s.novelty,
            adapt_samples=s.track_samples,
            changepoint=s.changepoint,
        )

    # --- state ----------------------------------------------------------------------------------
    @property
    def commissioned(self) -> bool:
        return self.calibration is not None

    @property
    def anomalous(self) -> bool:
        """The current decision (after hysteresis)."""
        return self.hysteresis.active

    def recommission(self, t: float) -> list[Alert]:
        """Forget the calibration and commission again from the next samples (an operator's
        or the cloud's decision after a deliberate change of the machine). An active alert is
        cleared first."""
        alerts = []
        if self.hysteresis.active and self._stream is not None:
            score = self.last_score if math.isfinite(self.last_score) else 0.0
            resid = np.zeros(len(self.spec.channels))
            win = np.zeros(self.spec.steps * len(self.spec.channels), dtype=np.float32)
            alerts.append(self._alert(t, AlertKind.CLEAR, score, resid, win, None))
        self.hysteresis = Hysteresis(self.hysteresis.raise_after, self.hysteresis.clear_after)
        self.calibration = self._restored = None
        self._stream = None
        self._commissioning = []
        self._since_adapt = 0
        self._normal_sum = np.zeros(len(self.spec.channels))
        self._normal_n = 0
        if self.novelty is not None:
            self.novelty = NoveltyDetector(self.novelty.settings)
        self.changes.reset()
        self._transition = -math.inf
        log.info("recommissioning samples=%d", self.spec.commissioning)
        return alerts

    # --- hot swap -------------------------------------------------------------------------------
    def swap_models(self, anomaly: Inference | None = None, **options: Any) -> None:
        """Replace the anomaly model and/or the classifier between two feeds (hot swap):
        :meth:`check_swap` (its keywords: ``entry``, ``classifier``, ``classes``,
        ``threshold``), then :meth:`install`. Everything the stream has learned stays
        (calibration, feature buffers, hysteresis, novelty, reference level), so the next sample
        is scored by the new model and no sample is dropped or scored twice."""
        self.install(self.check_swap(anomaly, **options))

    def check_swap(
        self,
        anomaly: Inference | None = None,
        *,
        entry: Mapping[str, Any] | None = None,
        classifier: Inference | None = None,
        classes: Sequence[str] | None = None,
        threshold: float | None = None,
        warm: bool = True,
    ) -> CheckedSwap:
        """Check models for :meth:`install` (which may follow later: the check changes nothing).

        The new anomaly model must read the same features -- its manifest ``entry`` must give
        this detector's :class:`FeatureSpec` (the commissioning length aside); a model with other
        features is refused with ModelError. Such a model needs its own detector commissioned
        from kept rows (the analyzer's tiers) or :meth:`recommission`.

        Both models are warmed up on the newest model input (zeros before commissioning ends);
        one that raises, or gives output of the wrong shape or non-finite output, is refused.
        ``warm=False`` leaves the warm-ups to :meth:`warm_up`, one model per call (the
        detector may score in between: each runs on the input that is newest then).
        ``threshold``: the new anomaly threshold (default: the entry's calibrated one; pass the
        configured override).
        """
        new_threshold = self.threshold
        cold: list[str] = []
        if anomaly is not None:
            label = f"model {getattr(anomaly, 'name', '?')}"
            if entry is not None:
                spec, entry_threshold = entry_features(entry, label)
                if spec.with_commissioning(self.spec.commissioning) != self.spec:
                    raise ModelError(
                        f"{label}: its features differ from the running model's (steps "
                        f"{spec.steps}x{spec.step_stride}, smooth {spec.smooth}, channels "
                        f"{len(spec.channels)}); a hot swap needs the same features: refused "
                        "(switch tiers or recommission instead)"
                    )
                new_threshold = entry_threshold
            cold.append("anomaly")
        if threshold is not None:
            new_threshold = float(threshold)
        if not new_threshold > 0 or not math.isfinite(new_threshold):
            raise ModelError(f"threshold {new_threshold!r} is not a positive number; refused")
        new_classes = tuple(self.classes if classes is None else classes)
        if classifier is not None:
            label = f"classifier {getattr(classifier, 'name', '?')}"
            if NORMAL_CLASS not in new_classes:
                raise ModelError(f"{label}: classes must include {NORMAL_CLASS!r}; refused")
            cold.append("classifier")
        changed = anomaly is not None or threshold is not None
        checked = CheckedSwap(
            self, anomaly, new_threshold if changed else None, classifier, new_classes, tuple(cold)
        )
        while warm and checked.cold:
            checked = self.warm_up(checked)
        return checked

    def warm_up(self, checked: CheckedSwap) -> CheckedSwap:
        """The next warm-up a :meth:`check_swap` of this detector left: one invoke of that model
        on the newest model input. Returns the check with one model fewer to warm up;
        ModelError refuses the swap."""
        if checked.detector is not self:
            raise ValueError("warm_up() takes models checked by this detector")
        if not checked.cold:
            return checked
        n_in = self.spec.steps * len(self.spec.channels)
        window = warm_window(getattr(self, "last_window", ()), n_in)
        if checked.cold[0] == "anomaly":
            assert checked.anomaly is not None
            name, shape = f"model {getattr(checked.anomaly, 'name', '?')}", (n_in,)
            warm_model(checked.anomaly, window, shape, name)
        else:
            assert checked.classifier is not None
            name = f"classifier {getattr(checked.classifier, 'name', '?')}"
            warm_model(checked.classifier, window, (len(checked.classes),), name)
        return replace(checked, cold=checked.cold[1:])

    def install(self, checked: CheckedSwap) -> None:
        """Put in models :meth:`check_swap` of this detector passed: a few assignments, no I/O."""
        if checked.detector is not self:
            raise ValueError("install() takes models checked by this detector")
        if checked.cold:
            raise ValueError(f"install() takes models warmed up: {', '.join(checked.cold)} not yet")
        if checked.anomaly is not None:
            old = getattr(self.anomaly, "name", "?")
            self.anomaly = checked.anomaly
            self.changes.reset(relearn=True)  # the residuals are the new model's from here
            log.info(
                "model swapped role=anomaly from=%s to=%s threshold=%.3g",
                old,
                getattr(checked.anomaly, "name", "?"),
                checked.threshold,
            )
        if checked.threshold is not None:
            self.threshold = checked.threshold
        if checked.classifier is not None:
            self.classifier = checked.classifier
            self.classes = checked.classes
            log.info(
                "model swapped role=classifier to=%s", getattr(checked.classifier, "name", "?")
            )

    def restore(self, cal: Calibration | None = None) -> None:
        """Start from a calibration this device saved earlier (a restart), or (None) from its own
        after a gap in the rows, also while the window refills (it starts over): the detector only
        fills its window (``warmup_samples`` rows), then scores; hysteresis, novelty, CUSUM stay."""
        cal = cal or self.calibration or self._restored
        if cal is None or (self._commissioning and self._restored is None):
            raise ValueError("restore() without a calibration or between commissioning rows")
        n = len(self.spec.channels)
        arrays = (cal.mean, cal.std, cal.smooth_std, cal.drift, cal.scale)
        if any(np.shape(x) != (n,) or not np.all(np.isfinite(x)) for x in arrays):
            raise ValueError(f"calibration does not fit {n} channels")
        if not all(np.all(x > 0) for x in (cal.std, cal.smooth_std, cal.scale)):
            raise ValueError("calibration divides by a scale that is not positive")
        self._restored, self.calibration, self._commissioning = cal, None, []

    @property
    def warmup_samples(self) -> int:
        """Rows needed before scoring: commissioning, or only the window after :meth:`restore`."""
        return self.spec.commissioning if self._restored is None else self.spec.history + 1

    # --- processing -----------------------------------------------------------------------------
    def push(self, t: float, row: Sequence[float]) -> list[Alert]:
        """One sample (the channel values in ``spec.channels`` order). Returns new alerts."""
        return self.feed([t], [row]).alerts

    def feed(self, times: Sequence[float], rows: Any) -> FeedResult:
        """A block of samples, in order; same result as pushing them one by one."""
        a = np.asarray(rows, dtype=np.float64)
        n_ch = len(self.spec.channels)
        if a.ndim != 2 or a.shape[1] != n_ch or len(a) != len(times):
            raise ValueError(f"expected {len(times)} rows of {n_ch} values, got {a.shape}")
        if not np.all(np.isfinite(a)):
            raise ValueError("rows must be finite numbers (a sensor without a value?)")
        n = len(a)
        anomalous = np.zeros(n, dtype=bool)
        scores = np.full(n, np.nan)
        alerts: list[Alert] = []
        i = 0
        while i < n and not self.commissioned:
            self._commissioning.append(a[i])
            self.samples += 1
            i += 1
            if len(self._commissioning) >= self.warmup_samples:
                self._finish_commissioning()
        if i == n:
            return FeedResult(alerts, anomalous, scores)
        while i < n:
            # Segments end where the reference moves, so the model runs batched in between.
            left = ADAPT_EVERY - self._since_adapt % ADAPT_EVERY
            j = min(n, i + left)
            self._run_segment(times, a, i, j, anomalous, scores, alerts)
            i = j
        return FeedResult(alerts, anomalous, scores)

    def _run_segment(
        self,
        times: Sequence[float],
        a: np.ndarray,
        lo: int,
        hi: int,
        anomalous: np.ndarray,
        scores: np.ndarray,
        alerts: list[Alert],
    ) -> None:
        assert self._stream is not None
        us = []
        wins = []
        for r in a[lo:hi]:
            u, win = self._stream.push(r)
            us.append(u)
            wins.append(win.reshape(-1))
        flat = np.stack(wins)
        self.last_window = flat[-1]
        signed = newest_residuals(np.stack(us), self.anomaly.predict(flat))
        resid = np.abs(signed)
        batch_scores = anomaly_scores(signed)
        for j, res in enumerate(resid):
            row = lo + j
            t = float(times[row])
            self.samples += 1
            self._since_adapt += 1
            score = float(batch_scores[j])
            scores[row] = score
            self.last_score = score
            nov = self.novelty.score(us[j]) if self.novelty is not None else None
            cp = self.changes.update(t, signed[j])
            if cp is not None and self.changes.settings.alerts:
                alerts.append(self._change_alert(cp, score, nov))
            change = self.hysteresis.update(score > self.threshold)
            anomalous[row] = self.hysteresis.active
            if change is not None:
                alerts.append(self._alert(t, change, score, res, flat[j], nov))
            if not self.hysteresis.active and score <= self.threshold:
                self._normal_sum += a[row]
                self._normal_n += 1
                if self.normal_sink is not None:  # federated learning's normal windows
                    self.normal_sink(flat[j])
                if self.novelty is not None:
                    self.novelty.observe(us[j])
            if self._since_adapt % ADAPT_EVERY == 0:
                self._track_reference()

    def _track_reference(self) -> None:
        """Move the per-channel reference level toward recent samples judged normal: an
        exponential average with a time constant of ``adapt_samples`` samples, frozen while
        an alert is active (slow wear and seasons follow; a fault does not)."""
        if self.adapt_samples and self._normal_n and self._stream is not None:
            mean = self._stream.cal.mean
            w = min(1.0, self._normal_n / self.adapt_samples)
            self._stream.move_mean(mean + w * (self._normal_sum / self._normal_n - mean))
            self.calibration = self._stream.cal
        self._normal_sum = np.zeros(len(self.spec.channels))
        self._normal_n = 0

    def _finish_commissioning(self) -> None:
        rows = np.stack(self._commissioning)
        self._commissioning = []
        if self._restored is not None:
            cal, self._restored = self._restored, None
            self.calibration = cal
            self._stream = StreamingFeatures(self.spec, cal)
            self._stream.prime(rows)
            log.info("calibration restored samples=%d warmup=%d", cal.samples, len(rows))
            return
        try:
            cal = calibrate(self.spec, rows)
        except ValueError as err:  # not finite etc.: stay in commissioning, start over
            log.warning("commissioning failed reason=%s; starting over", err)
            return
        self.calibration = cal
        self._stream = StreamingFeatures(self.spec, cal)
        self._stream.prime(rows)
        if self.novelty is not None:
            u = transform(self.spec, cal, rows)[self.spec.smooth + self.spec.rate_lag :]
            self.novelty.seed(u)
        log.info(
            "commissioning done samples=%d scale=%s",
            len(rows),
            ",".join(f"{s:.3g}" for s in cal.scale),
        )

    def _alert(
        self,
        t: float,
        kind: AlertKind,
        score: float,
        resid: np.ndarray,
        window: np.ndarray,
        nov: NoveltyScore | None,
    ) -> Alert:
        order = np.argsort(-resid, kind="stable")[: self.top_channels]
        channels = tuple((self.spec.channels[c], float(resid[c])) for c in order)
        if kind is AlertKind.RAISE or self._episode is None:
            self._episode = self._classify(window)
        verdict, fault, confidence = self._episode
        cause = self.changes.cause(t, self._transition)
        alert = Alert(
            time=t,
            kind=kind,
            score=score,
            threshold=self.threshold,
            channels=channels,
            verdict=verdict,
            fault=fault,
            confidence=confidence,
            novelty=nov,
            model=getattr(self.anomaly, "name", DEFAULT_MODEL),
            change_time=None if cause is None else cause.change_time,
        )
        self._transition = t
        ttd = alert.time_to_detect
        (log.info if self.log_alerts else log.debug)(
            "alert %s time=%.3f score=%.3g threshold=%.3g verdict=%s fault=%s top=%s "
            "time_to_detect=%s",
            kind.value,
            t,
            score,
            self.threshold,
            verdict.value,
            fault,
            channels[0][0] if channels else "",
            "unknown" if ttd is None else f"{ttd:.1f}",
        )
        if kind is AlertKind.CLEAR:
            self._episode = None
        return alert

    def _change_alert(self, cp: ChangePoint, score: float, nov: NoveltyScore | None) -> Alert:
        """A changepoint as an alert: inside an episode it repeats the episode's verdict."""
        episode = self._episode if self.hysteresis.active else None
        verdict, fault, confidence = episode or (Verdict.NORMAL, None, 0.0)
        alert = Alert(
            time=cp.time,
            kind=AlertKind.CHANGE,
            score=score,
            threshold=self.threshold,
            channels=cp.channels[: self.top_channels],
            verdict=verdict,
            fault=fault,
            confidence=confidence,
            novelty=nov,
            model=getattr(self.anomaly, "name", DEFAULT_MODEL),
            change_time=cp.change_time,
        )
        (log.info if self.log_alerts else log.debug)(
            "alert change time=%.3f change_time=%.3f time_to_detect=%.1f statistic=%.3g "
            "anomalous=%s moved=%s",
            cp.time,
            cp.change_time,
            cp.delay,
            cp.statistic,
            self.hysteresis.active,
            ",".join(name for name, _ in cp.channels[: self.top_channels]),
        )
        return alert

    def _classify(self, window: np.ndarray) -> tuple[Verdict, str | None, float]:
        if self.classifier is None:
            return Verdict.NOVEL_ANOMALY, None, 0.0
        probs = np.asarray(self.classifier.predict(window[None]))[0]
        best = int(np.argmax(probs))
        confidence = float(probs[best])
        cls = self.classes[best]
        if cls != NORMAL_CLASS and confidence >= self.classifier_confidence:
            return Verdict.KNOWN_FAILURE, cls, confidence
        return Verdict.NOVEL_ANOMALY, None, confidence
