"""The detection stage: sensor readings -> 1 Hz rows -> Detector -> alerts in the store.

The sampler hands every reading to :meth:`Analyzer.observe`, which keeps the newest value of each
channel the model needs (``[detect.inputs]`` maps a model channel such as ``Current`` to a
reported ``sensor/channel``). Every ``period`` seconds the stage assembles one row from those
values and pushes it through the :class:`~agent.detect.detector.Detector`. A row is assembled
only when every input has a value younger than ``max_age``; otherwise it is skipped and counted
(``frames_incomplete``), so a sensor that is down never feeds the model stale numbers for long.
After a gap in the rows longer than the detector's history (an input away, the process suspended),
the detector fills its window again from new rows before it scores (about half a minute): a rate
or a window across the gap would read what changed during it as a jump.

Alerts (raise and clear) are committed to the store as ALERT records, the kind with the highest
priority, so they leave the device ahead of queued telemetry. The body is ``Alert.to_dict()``
plus ``window``: the model input of the raising sample (``steps x channels``, flattened), which
is what the endpoint needs to validate it with its full-precision model. Commits run in their
own task, in order, so a slow or full disk never stalls the 1 Hz loop; on stop, every alert
already made is committed before the stage returns. Listeners registered with
:meth:`add_alert_listener` are called after each commit with the alert, its sequence number and
its window.

Model tiers: ``full`` (the ``model`` of ``[detect]``) and ``lite`` (``lite_model``, for slow
devices and poor links). The two models read different windows, so each tier has its own
:class:`~agent.detect.detector.Detector`. :meth:`set_tier` switches between two samples: the new
tier's detector is commissioned and primed from the last rows the stage keeps (``history`` rows, by
default twice the commissioning length; alerts from that replay are discarded), so it scores the
next sample with a warm stream and no sample is dropped or scored twice. Until that history is
long enough to commission, the switch waits (``pending_tier`` in status). Both models are loaded
and warmed up at start, so a switch costs no I/O. The classifier reads the full model's window,
so on the lite tier alerts carry no fault class (``novel_anomaly``). An exception while scoring is
logged and counted (``errors``), the row is skipped, and the stage returns to the full tier.

Calibration survives restarts: once commissioning is done, and every ``SAVE_EVERY`` seconds while
reference tracking moves it, the full tier's calibration is written atomically to
``calibration_path`` (with the features it scales and the inputs it was learnt from; a hot swap
keeps the features, so it holds for every model swapped in). At start a saved calibration that
matches is restored: the detector only refills its window (about half a minute)
instead of commissioning again, which matters when the machine is already misbehaving at the
restart. A file that does not match or does not decode is logged and ignored.

Logging policy: info for the models loaded, tier changes and threshold changes; the alerts
themselves are logged by the detector; warning when a frame cannot be assembled after it could
(an input went stale) and when it can again; error when an alert cannot be committed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import sys
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from agent.detect.detector import Alert, Detector, DetectSettings
from agent.detect.features import Calibration, FeatureSpec
from agent.detect.inference import TFLiteModel, load_manifest
from agent.errors import ModelError, StoreError, StoreFull
from agent.files import read_json, write_atomic
from agent.metrics import Registry
from agent.store.queue import NewRecord, Store
from agent.wire.records import AlertBody, Kind, alert_withheld
from drivers.base import Options, Reading
from drivers.clock import Clock

log = logging.getLogger(__name__)

TIERS = ("full", "lite")
#: Where the shipped models are looked for: a checkout's models/, then the installed wheel's.
MODEL_DIRS = (
    Path(__file__).resolve().parents[2] / "models",
    Path(sys.prefix) / "share" / "edge-agent" / "models",
)
#: How long a failed alert commit waits before it is tried again (the store is recovering).
RETRY_SECONDS = 1.0
LATENCY_RING = 4096  # detector latencies kept for the metrics histogram between scrapes
#: Seconds between saves of the calibration (reference tracking moves it slowly).
SAVE_EVERY = 600.0
CALIBRATION_FILE = "detect-calibration.json"

AlertListener = Callable[[Alert, int, np.ndarray], None]


def alert_doc(doc: dict[str, Any], window: Any, private: frozenset[str]) -> dict[str, Any]:
    """An alert record's content: the alert and its raising window, unless the model reads a
    ``private`` (local) channel: then no window, and no per-channel detail of those channels
    (``window_withheld`` says so)."""
    if not private:
        return {**doc, "window": window.tolist()}
    return alert_withheld(doc, private)


@dataclass(frozen=True)
class AnalyzerSettings:
    """``[detect]``: the detector's models and settings plus where its inputs come from."""

    inputs: Mapping[str, tuple[str, str]]  # model channel -> (sensor, channel)
    detect: DetectSettings = field(default_factory=DetectSettings)
    period: float = 1.0
    max_age: float = 3.0  # default: the larger of 3 periods and 2 intervals of the slowest input
    lite_model: str = "skab-ae-lite"  # "" = no lightweight tier
    tier: str = "full"

    @classmethod
    def from_options(
        cls, opts: Options, base_dir: Path, sensors: Sequence[Any]
    ) -> AnalyzerSettings:
        """Validate ``[detect]``. ``sensors`` are the parsed ``[[sensor]]`` tables: inputs must
        name one of their channels. Without ``[detect.inputs]`` each model channel is taken from
        the sensor channel whose ``signals`` entry names it."""
        period = opts.number("period", 1.0, minimum=0.05, maximum=3600.0)
        max_age = opts.number("max_age", 1.0, above=0.0) if opts.has("max_age") else None
        lite = opts.string("lite_model", "skab-ae-lite")
        tier = opts.choice("tier", "full", TIERS)
        inputs_t = opts.table("inputs")
        given = {key: inputs_t.string(key) for key in inputs_t.raw}
        inputs_t.finish()
        explicit_dir = opts.has("models_dir")
        detect = DetectSettings.from_options(opts, base_dir)
        if not explicit_dir:
            detect = replace(detect, models_dir=shipped_models_dir())
        channels = _model_channels(detect, opts)
        known = {(s.name, ch) for s in sensors for ch in s.channels}
        inputs: dict[str, tuple[str, str]] = {}
        for key, ref in given.items():
            if key not in channels:
                raise inputs_t.error(key, f"the model has no channel {key!r}")
            sensor, _, channel = ref.partition("/")
            if (sensor, channel) not in known:
                raise inputs_t.error(key, f"{ref!r} is not a configured sensor/channel")
            inputs[key] = (sensor, channel)
        for s in sensors:
            for ch, signal in getattr(s, "signals", {}).items():
                if signal in channels and signal not in inputs:
                    inputs[signal] = (s.name, ch)
        missing = [c for c in channels if c not in inputs]
        if missing:
            raise opts.error(
                "inputs",
                f"no input for model channel(s) {', '.join(missing)}: map each to a "
                "'sensor/channel'",
            )
        if max_age is None:  # two reads of the slowest input may be missed
            slowest = max(
                s.interval for s in sensors if any(s.name == i[0] for i in inputs.values())
            )
            max_age = max(3 * period, 2 * slowest + period)
        if tier == "lite" and not lite:
            raise opts.error("tier", "'lite' needs a lite_model")
        return cls(
            inputs={c: inputs[c] for c in channels},
            detect=detect,
            period=period,
            max_age=max_age,
            lite_model=lite,
            tier=tier,
        )


def shipped_models_dir() -> Path:
    """Where the shipped models are when ``[detect]`` names no ``models_dir``: the checkout's
    ``models/``, else the installed package's (the wheel carries them as data files)."""
    for candidate in MODEL_DIRS:
        if (candidate / "manifest.json").is_file():
            return candidate
    return MODEL_DIRS[0]


def _model_channels(detect: DetectSettings, opts: Options) -> tuple[str, ...]:
    try:
        manifest = load_manifest(detect.models_dir)
        return tuple(manifest.entry(detect.model).raw["features"]["channels"])
    except (ModelError, KeyError, TypeError) as err:
        raise opts.error("model", f"{detect.model!r} in {detect.models_dir}: {err}") from None


@dataclass
class LoadedModel:
    name: str
    model: Any
    entry: Mapping[str, Any]
    threshold: float
    size: int
    sha256: str
    loaded_at: float


class Analyzer:
    """See the module docstring."""

    def __init__(
        self,
        settings: AnalyzerSettings,
        detector: Detector,
        tiers: Mapping[str, LoadedModel],
        store: Store,
        clock: Clock,
        *,
        on_commit: Callable[[], None] | None = None,
        calibration_path: Path | None = None,
    ) -> None:
        self.settings = settings
        self.calibration_path = calibration_path
        self._saved_at: float | None = None
        self.detector = detector
        self.classifier = detector.classifier
        self.classes = detector.classes
        self.classifier_info: dict[str, Any] = {}  # name, version, sha256, bytes of the shipped one
        self.errors = 0
        self.tiers = dict(tiers)
        self._refused: dict[str, tuple[LoadedModel, str]] = {}  # tier -> the model refused, why
        self.store = store
        self.clock = clock
        self.on_commit = on_commit
        #: model channels read from ``local`` sensor channels ([data]): their values never go
        #: into an alert record (the runtime sets it)
        self.private: frozenset[str] = frozenset()
        self.tier = "full"
        self.pending_tier: str | None = None
        self.threshold_override: float | None = settings.detect.threshold
        # recent rows, to prime the other tier's detector on a switch (kept only with two tiers)
        self._history: deque[tuple[float, list[float]]] = deque(
            maxlen=2 * self._rows_to_prime(detector.spec)
        )
        self._latest: dict[tuple[str, str], tuple[float, float]] = {}  # -> (t_mono, value)
        self._columns = list(settings.inputs.items())
        self._wanted = set(settings.inputs.values())
        self._pending: asyncio.Queue[tuple[Alert, np.ndarray] | None] = asyncio.Queue()
        self._listeners: list[AlertListener] = []
        self.frames = 0
        self.frames_incomplete = 0
        self._complete = True
        self._row_at: float | None = None  # monotonic time of the last row pushed
        self.alerts = 0
        self.alerts_committed = 0
        self.last_alert: dict[str, Any] | None = None
        self.busy_since: float | None = None
        # drained by the metrics collector; a ring, so it stays bounded when nobody collects
        self.inference_seconds: deque[float] = deque(maxlen=LATENCY_RING)
        self.set_tier(settings.tier)

    @classmethod
    def load(
        cls,
        settings: AnalyzerSettings,
        store: Store,
        clock: Clock,
        *,
        on_commit: Callable[[], None] | None = None,
        calibration_path: Path | None = None,
    ) -> Analyzer:
        """Load and warm up the models (ModelError when one is missing, corrupt or gives
        non-finite output) and build the stage."""
        d = settings.detect
        manifest = load_manifest(d.models_dir)
        detector = Detector.from_settings(d, manifest)
        tiers = {"full": _loaded(manifest, d.model, detector.anomaly)}
        if settings.lite_model:
            lite = TFLiteModel.open(
                manifest,
                settings.lite_model,
                runtime=d.runtime,
                num_threads=d.num_threads,
                batch_mode=d.batch_mode,
            )
            tiers["lite"] = _loaded(manifest, settings.lite_model, lite)
            spec = Detector.from_entry(lite, tiers["lite"].entry, settings=d).spec
            if spec.channels != detector.spec.channels:
                raise ModelError(
                    f"lite model {settings.lite_model!r}: channels {spec.channels} differ from "
                    f"{d.model!r} {detector.spec.channels}"
                )
        for loaded in tiers.values():
            _warm_up(loaded)
        if detector.classifier is not None:
            _warm_up(_loaded(manifest, d.classifier, detector.classifier))
        for t, loaded in tiers.items():
            log.info(
                "event=model_loaded tier=%s model=%s bytes=%d threshold=%.3g",
                t,
                loaded.name,
                loaded.size,
                loaded.threshold,
            )
        analyzer = cls(
            settings,
            detector,
            tiers,
            store,
            clock,
            on_commit=on_commit,
            calibration_path=calibration_path,
        )
        if detector.classifier is not None:
            e = manifest.entry(d.classifier)
            analyzer.classifier_info = {
                "name": d.classifier,
                "version": e.raw.get("version"),
                "sha256": e.sha256,
                "bytes": e.size,
            }
        analyzer.restore_calibration()
        return analyzer

    # -- calibration across restarts ------------------------------------------------------------
    def _calibration_key(self) -> dict[str, Any]:
        """What a saved calibration must match: the full tier's features and the inputs."""
        inputs = {c: f"{s}/{ch}" for c, (s, ch) in self.settings.inputs.items()}
        return {"features": self.detector.spec.to_dict(), "inputs": inputs}

    def restore_calibration(self) -> bool:
        """Start the full tier from the saved calibration if it matches (see the module doc)."""
        path = self.calibration_path
        if path is None or not path.exists() or self.tier != "full":
            return False
        try:
            doc = read_json(path)
            if not isinstance(doc, dict) or not isinstance(doc.get("calibration"), dict):
                raise ValueError("not a calibration document")
            key = self._calibration_key()
            if "features" not in doc:  # saved by an earlier release: under the model's sha256
                full = self.tiers["full"]
                key = {"model": full.name, "sha256": full.sha256, "inputs": key["inputs"]}
            if {k: doc.get(k) for k in key} != key:
                log.info("event=calibration_ignored path=%s reason=other features or inputs", path)
                return False
            self.detector.restore(Calibration.from_dict(doc["calibration"]))
        except (OSError, ValueError, KeyError, TypeError, OverflowError) as err:
            log.warning("event=calibration_ignored path=%s error=%r", path, str(err))
            return False
        self._saved_at = self.clock.monotonic()
        log.info("event=calibration_restored path=%s", path)
        return True

    def _save_due(self) -> bool:
        if self.calibration_path is None or self.tier != "full":
            return False
        if not self.detector.commissioned:
            return False
        return self._saved_at is None or self.clock.monotonic() - self._saved_at >= SAVE_EVERY

    async def save_calibration(self) -> None:
        """Write the full tier's calibration (the file write runs off the event loop)."""
        path, cal = self.calibration_path, self.detector.calibration
        if path is None or cal is None or self.tier != "full":
            return
        self._saved_at = self.clock.monotonic()
        full = self.tiers["full"]
        doc = {
            **self._calibration_key(),
            "model": full.name,  # for information: the model it was saved under
            "sha256": full.sha256,
            "saved": self.clock.time(),
            "calibration": cal.to_dict(),
        }
        try:
            await self.clock.run_blocking(None, write_atomic, path, json.dumps(doc).encode())
        except OSError as err:
            log.warning("event=calibration_not_saved path=%s error=%r", path, str(err))

    # -- control ---------------------------------------------------------------------------------
    def set_tier(self, tier: str) -> None:
        """Score with the ``full`` or ``lite`` model from the next sample on."""
        if tier not in TIERS:
            raise ValueError(f"tier must be one of {', '.join(TIERS)}")
        if tier not in self.tiers:
            tier = "full"
        self.pending_tier = None if tier == self.tier else tier
        self._switch()

    def _switch(self) -> None:
        """Make ``pending_tier`` active once the kept rows can commission its detector. A model
        no detector can be made of, or that fails on the kept rows, is refused: ModelError, said
        once, and the running tier stays (the link may ask again)."""
        tier = self.pending_tier
        if tier is None:
            return
        loaded = self.tiers[tier]
        refused = self._refused.get(tier)
        if refused is not None and refused[0] is loaded:  # asked again: not primed again
            self.pending_tier = None
            raise ModelError(refused[1])
        try:
            det = self._primed(loaded)
        except (ModelError, ValueError, RuntimeError) as err:
            self.pending_tier = None
            log.warning(
                "event=model_tier_refused tier=%s model=%s error=%r", tier, loaded.name, str(err)
            )
            why = f"model {loaded.name!r}: refused for the {tier} tier ({err})"
            self._refused[tier] = (loaded, why)  # until another model is loaded for the tier
            raise ModelError(why) from err
        if det is None:
            return  # not enough rows yet: try again after the next sample
        if self.threshold_override is not None:
            det.threshold = self.threshold_override
        if self.detector.anomalous:
            # the episode the old tier raised is still open: the new tier carries it on, and
            # its verdict (the clear repeats it)
            det.hysteresis.active = True
            det._episode = self.detector._episode
        elif det.anomalous:
            det.hysteresis.active = False  # raised in the replay: raise it again if it persists
        log.info("event=model_tier from=%s to=%s model=%s", self.tier, tier, loaded.name)
        det.normal_sink = self.detector.normal_sink  # federated learning's windows go on
        self.detector = det
        self.tier = tier
        self.pending_tier = None

    def _primed(self, loaded: LoadedModel) -> Detector | None:
        """A detector of ``loaded`` commissioned and primed from the kept rows (None while they
        are too few)."""
        try:
            spec = FeatureSpec.from_dict(loaded.entry["features"])
        except (KeyError, TypeError, ValueError) as err:
            raise ModelError(f"model {loaded.name!r}: bad features in its manifest entry") from err
        needed = self._rows_to_prime(spec)
        if len(self._history) < min(needed, self._history.maxlen or needed):
            return None
        clf = self.classifier
        fits = clf is not None and tuple(clf.input_shape) == tuple(loaded.model.input_shape)
        det = Detector.from_entry(
            loaded.model,
            loaded.entry,
            settings=self.settings.detect,
            classifier=clf if fits else None,  # the classifier reads the full model's window
            classes=self.classes if fits else (),
        )
        times = [t for t, _ in self._history]
        det.log_alerts = False  # the replay's alerts are about the past: discarded, not logged
        det.feed(times, np.asarray([row for _, row in self._history], dtype=np.float64))
        det.log_alerts = True
        return det

    def _rows_to_prime(self, spec: FeatureSpec) -> int:
        """Rows that commission a detector of ``spec`` and leave it one row to score."""
        commissioning = self.settings.detect.commissioning_samples or spec.commissioning
        return commissioning + spec.history + 1

    def set_threshold(self, value: float | None) -> None:
        """Set the anomaly threshold (None: the model's calibrated one) from the next sample."""
        if value is not None and not (isinstance(value, int | float) and math.isfinite(value)):
            raise ValueError(f"threshold must be a finite number, not {value!r}")
        if value is not None and value <= 0:
            raise ValueError("threshold must be > 0")
        self.threshold_override = None if value is None else float(value)
        new = value if value is not None else self.tiers[self.tier].threshold
        if not math.isfinite(new):
            new = self.detector.threshold
        log.info("event=threshold from=%.3g to=%.3g", self.detector.threshold, new)
        self.detector.threshold = float(new)

    def add_alert_listener(self, listener: AlertListener) -> None:
        self._listeners.append(listener)

    # -- input -----------------------------------------------------------------------------------
    def observe(self, reading: Reading) -> None:
        """Keep the newest value of each input channel (called for every reading)."""
        for channel, value in reading.values.items():
            key = (reading.sensor, channel)
            if key in self._wanted:
                self._latest[key] = (reading.t_mono, float(value))

    def frame(self, now: float) -> list[float] | None:
        """The row for ``now`` (monotonic), or None when an input is missing or stale."""
        row = []
        for _, key in self._columns:
            got = self._latest.get(key)
            if got is None or now - got[0] > self.settings.max_age or not math.isfinite(got[1]):
                return None
            row.append(got[1])
        return row

    # -- run -------------------------------------------------------------------------------------
    async def run(self) -> None:
        """Assemble and score a row every ``period``; commit alerts in order. Cancelled, it stops
        scoring and returns once the alerts already made are committed."""
        committer = asyncio.create_task(self._commit_loop(), name="alert-commit")
        try:
            period = self.settings.period
            next_t = self.clock.monotonic()
            while True:
                next_t += period
                delay = next_t - self.clock.monotonic()
                if delay < -period:  # far behind (a suspended process): do not catch up
                    next_t = self.clock.monotonic()
                    delay = 0.0
                await self.clock.sleep(max(0.0, delay))
                try:
                    self.step(self.clock.monotonic(), self.clock.time())
                except Exception as err:  # a model fault must not stop sampling and storage
                    self.errors += 1
                    log.exception("event=detect_failed tier=%s error=%r", self.tier, str(err))
                    if self.tier != "full":
                        self.set_tier("full")
                if self._save_due():
                    await self.save_calibration()
        finally:
            self._pending.put_nowait(None)
            await asyncio.shield(committer)

    def step(self, now: float, wall: float) -> list[Alert]:
        """Score one row (if it can be assembled); queue its alerts for the store."""
        row = self.frame(now)
        if row is None:
            self.frames_incomplete += 1
            if self._complete:
                stale = [c for c, key in self._columns if self._stale(key, now)]
                log.warning("event=detect_paused stale_inputs=%s", ",".join(stale))
                self._complete = False
            return []
        if not self._complete:
            log.info("event=detect_resumed")
            self._complete = True
        self._refill_after_gap(now)
        t0 = time.perf_counter()
        alerts = self.detector.push(wall, row)
        self._row_at = now
        self.inference_seconds.append(time.perf_counter() - t0)
        self.frames += 1
        if len(self.tiers) > 1:
            self._history.append((wall, row))
        if alerts:  # with the window of the detector that raised them, before a switch
            window = self.detector.last_window
            for alert in alerts:
                self.alerts += 1
                self._pending.put_nowait((alert, window))
        if self.pending_tier is not None:
            with contextlib.suppress(ModelError):  # refused and said: the tier stays
                self._switch()
        return alerts

    def _refill_after_gap(self, now: float) -> None:
        """Before a row that follows a gap longer than the detector's history, let the detector
        fill its window again (its calibration, hysteresis, novelty and CUSUM carry on); after
        one while the window refills, the refill starts over."""
        det = self.detector
        gap = None if self._row_at is None else now - self._row_at
        if gap is not None and gap > det.spec.history * self.settings.period:
            with contextlib.suppress(ValueError):  # commissioning: no calibration to refill for
                det.restore()
                log.info("event=detect_refill gap=%.0f rows=%d", gap, det.spec.history + 1)

    def _stale(self, key: tuple[str, str], now: float) -> bool:
        got = self._latest.get(key)
        return got is None or now - got[0] > self.settings.max_age

    async def _commit_loop(self) -> None:
        while True:
            item = await self._pending.get()
            if item is None:
                return
            alert, window = item
            body = AlertBody(alert.time, alert_doc(alert.to_dict(), window, self.private))
            record = NewRecord(Kind.ALERT, body.to_cbor(), created=alert.time)
            while True:
                self.busy_since = self.clock.monotonic()
                try:
                    (seq,) = await self.store.put([record])
                    break
                except StoreFull as err:
                    # the store already held it in its memory ring and then had to drop it
                    log.error("event=alert_dropped time=%.3f error=%r", alert.time, str(err))
                    seq = None
                    break
                except StoreError as err:
                    log.error("event=alert_put_failed error=%r", str(err))
                    await self.clock.sleep(RETRY_SECONDS)
                finally:
                    self.busy_since = None
            if seq is None:
                continue
            self.alerts_committed += 1
            self.last_alert = {"seq": seq, **alert.to_dict()}
            log.debug("event=committed kind=alert seqs=%d alert=%s", seq, alert.kind.value)
            if self.on_commit is not None:
                self.on_commit()
            for listener in self._listeners:
                try:
                    listener(alert, seq, window)
                except Exception:  # a listener's bug must not stop alerts being stored
                    log.exception("event=alert_listener_failed seq=%d", seq)

    # -- views -----------------------------------------------------------------------------------
    def models(self) -> dict[str, Any]:
        """Models by role for status and reported state."""
        out: dict[str, Any] = {}
        for tier, loaded in self.tiers.items():
            out["anomaly" if tier == "full" else "lightweight"] = {
                "name": loaded.name,
                "version": loaded.entry.get("version"),
                "sha256": loaded.sha256,
                "bytes": loaded.size,
                "threshold": loaded.threshold,
                "active": tier == self.tier,
            }
        clf = self.classifier
        if clf is not None:
            name = getattr(clf, "name", "?")
            info = self.classifier_info if self.classifier_info.get("name") == name else {}
            out["classifier"] = {"name": name, "version": info.get("version"), **info}
            out["classifier"]["active"] = self.detector.classifier is clf
        return out

    def status(self) -> dict[str, Any]:
        d = self.detector
        return {
            "tier": self.tier,
            "pending_tier": self.pending_tier,
            "model": self.tiers[self.tier].name,
            "threshold": d.threshold,
            "commissioned": d.commissioned,
            "anomalous": d.anomalous,
            "samples": d.samples,
            "last_score": None if math.isnan(d.last_score) else round(d.last_score, 4),
            "frames_incomplete": self.frames_incomplete,
            "errors": self.errors,
            "alerts": self.alerts_committed,
        }

    def register_metrics(self, m: Registry) -> Callable[[], None]:
        latency = m.histogram("inference_seconds", "Detector time per sample (features + model)")
        alerts = m.counter("alerts_total", "Alerts committed to the store")
        frames = m.counter(
            "detect_frames_total", "Rows scored by the detector, by outcome", ["outcome"]
        )

        def collect() -> None:
            samples = list(self.inference_seconds)
            self.inference_seconds.clear()
            for s in samples:
                latency.observe(s)
            alerts.set_total(self.alerts_committed)
            frames.set_total(self.frames, outcome="scored")
            frames.set_total(self.frames_incomplete, outcome="incomplete")

        return collect


def _loaded(manifest: Any, name: str, model: Any) -> LoadedModel:
    entry = manifest.entry(name)
    thr = entry.raw.get("threshold") or {}
    return LoadedModel(
        name=name,
        model=model,
        entry=entry.raw,
        threshold=float(thr.get("value", math.nan)),
        size=int(entry.size),
        sha256=str(entry.sha256),
        loaded_at=time.time(),
    )


def _warm_up(loaded: LoadedModel) -> None:
    """One invoke on a neutral input; a model that gives non-finite output is refused."""
    shape = (1, *loaded.model.input_shape)
    out = np.asarray(loaded.model.predict(np.zeros(shape, dtype=np.float32)))
    if not np.all(np.isfinite(out)):
        raise ModelError(f"model {loaded.name!r}: non-finite output on the warm-up window")
