"""Full-precision inference at the endpoint: ``POST /infer/{device}``, ``POST /validate/{device}``.

The endpoint keeps the float32 references of the device's int8 models (``models/cloud``, the
``float_reference`` of each entry of the device manifest). Two uses (docs/protocol.md, "Cloud
inference"):

- **infer**: a window in, the full-precision model's output back (the reconstruction and its
  anomaly score, or the class probabilities). Nothing is stored; every request runs the model.
- **validate**: an edge alert the device was unsure of (its raising window and the alert) in, a
  verdict back: is the window anomalous under the full model, and which fault. The verdict is
  stored per ``(device, seq, digest)`` (``seq`` = the alert record's sequence number, ``digest``
  = :func:`agent.wire.validation.window_digest` of the window) and carries that digest, so a
  repeated or duplicated request gets the stored verdict and the model runs once per alert, and
  a window posted by anyone else for the same ``seq`` gets a verdict of its own, never the one of
  the device's window. Requests for the same key that arrive while the first one is running wait
  for its answer.

The models run on one worker thread (an interpreter is not thread-safe, and the event loop must
not block); verdicts live in ``verdicts.db`` (SQLite, table ``window_verdicts``) in the endpoint's
data directory, or in memory when the endpoint has none. Verdicts of an older endpoint (table
``verdicts``, not bound to a window) are left alone and no longer answered: asked again, such an
alert is judged once more.

Logging policy: debug per request, info when a model is loaded and for each verdict stored.
"""

from __future__ import annotations

import asyncio
import logging
import math
import sqlite3
from collections import Counter
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from agent.detect.inference import Manifest, ModelEntry, TFLiteModel, load_manifest
from agent.errors import ModelError
from agent.wire import records
from agent.wire.validation import DIGEST_KEY, window_digest

log = logging.getLogger(__name__)

#: Where the float32 references live in a checkout.
DEFAULT_MODELS_DIR = Path(__file__).resolve().parent.parent / "models" / "cloud"
VERDICTS_FILE = "verdicts.db"
#: A fault class is taken as known above this probability (as the device's default).
CLASSIFIER_CONFIDENCE = 0.8
DEFAULT_CLASSIFIER = "skab-clf"
NORMAL_CLASS = "normal"
MAX_WINDOW = 4096  # values in one window
MAX_SEQ = 2**63 - 1

#: The verdict of a window the full model does not find anomalous.
FALSE_ALARM = "false_alarm"
KNOWN_FAILURE = "known_failure"
NOVEL_ANOMALY = "novel_anomaly"


class InferenceError(ValueError):
    """A request that does not fit the schema (the endpoint answers 4.00)."""


class NoSuchModel(InferenceError):
    """The request names a model the endpoint has no full-precision version of (4.04)."""


def _window(value: Any) -> np.ndarray:
    if not isinstance(value, list) or not value:
        raise InferenceError("window must be a non-empty array of numbers")
    if len(value) > MAX_WINDOW:
        raise InferenceError(f"window holds {len(value)} values, at most {MAX_WINDOW}")
    if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in value):
        raise InferenceError("window must hold numbers only")
    arr = np.asarray(value, dtype=np.float64)
    if not np.all(np.isfinite(arr)):
        raise InferenceError("window values must be finite")
    return arr.astype(np.float32)


@dataclass(frozen=True)
class InferRequest:
    """``{"model": tstr, "window": [* float]}``."""

    model: str
    window: np.ndarray

    @classmethod
    def parse(cls, body: Any) -> InferRequest:
        if not isinstance(body, dict):
            raise InferenceError("expected a map {model, window}")
        unknown = sorted(str(k) for k in body if k not in ("model", "window"))
        if unknown:
            raise InferenceError(f"unknown key {unknown[0]!r}")
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise InferenceError("model must name a model")
        return cls(model, _window(body.get("window")))


@dataclass(frozen=True)
class ValidateRequest:
    """``{"seq": uint, "alert": {...Alert.to_dict()}, "window": [* float]}``; ``digest`` is the
    window's (of the values as sent, before the float32 conversion of ``window``)."""

    seq: int
    alert: Mapping[str, Any]
    window: np.ndarray
    digest: str

    @classmethod
    def parse(cls, body: Any) -> ValidateRequest:
        if not isinstance(body, dict):
            raise InferenceError("expected a map {seq, alert, window}")
        unknown = sorted(str(k) for k in body if k not in ("seq", "alert", "window"))
        if unknown:
            raise InferenceError(f"unknown key {unknown[0]!r}")
        seq = body.get("seq")
        if isinstance(seq, bool) or not isinstance(seq, int) or not 0 <= seq <= MAX_SEQ:
            raise InferenceError("seq must be the alert record's sequence number")
        alert = body.get("alert")
        if not isinstance(alert, dict):
            raise InferenceError("alert must be a map (the edge alert)")
        model = alert.get("model")
        if not isinstance(model, str) or not model:
            raise InferenceError("alert.model must name the edge model")
        threshold = alert.get("threshold")
        if threshold is not None and (
            isinstance(threshold, bool)
            or not isinstance(threshold, int | float)
            or not (math.isfinite(threshold) and threshold > 0)
        ):
            raise InferenceError("alert.threshold must be a positive number")
        window = _window(body.get("window"))
        return cls(seq, alert, window, window_digest(body["window"]))


class CloudInference:
    """The endpoint's full-precision models and its stored validation verdicts.

    ``validation_runs`` counts the model runs per ``(device, seq)`` (one per alert and window,
    however often it is asked); ``infer_runs`` counts the runs of ``/infer``.
    """

    def __init__(
        self,
        models_dir: Path | None = None,
        data_dir: Path | None = None,
        *,
        classifier: str = DEFAULT_CLASSIFIER,
        classifier_confidence: float = CLASSIFIER_CONFIDENCE,
    ) -> None:
        self.models_dir = Path(models_dir) if models_dir is not None else DEFAULT_MODELS_DIR
        self.data_dir = Path(data_dir) if data_dir is not None else None
        self.classifier = classifier
        self.classifier_confidence = classifier_confidence
        self.validation_runs: Counter[tuple[str, int]] = Counter()
        self.infer_runs = 0
        self.repeats = 0  # validations answered from the stored verdict
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cloud-inference")
        self._manifest: Manifest | None = None
        self._models: dict[str, TFLiteModel] = {}
        self._db: sqlite3.Connection | None = None
        self._memory: dict[tuple[str, int, str], dict[str, Any]] = {}
        self._inflight: dict[tuple[str, int, str], asyncio.Future[dict[str, Any]]] = {}

    async def _call(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def start(self) -> None:
        if self.data_dir is not None:
            await self._call(self._open_db)

    async def close(self) -> None:
        if self._db is not None:
            await self._call(self._db.close)
            self._db = None
        self._executor.shutdown(wait=False)

    # -- storage (worker thread) -----------------------------------------------------------------
    def _open_db(self) -> None:
        assert self.data_dir is not None
        self.data_dir.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self.data_dir / VERDICTS_FILE, check_same_thread=False)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute(
            "CREATE TABLE IF NOT EXISTS window_verdicts (device TEXT NOT NULL, "
            "seq INTEGER NOT NULL, digest TEXT NOT NULL, body BLOB NOT NULL, "
            "PRIMARY KEY (device, seq, digest))"
        )
        db.commit()
        self._db = db

    def _load(self, key: tuple[str, int, str | None]) -> dict[str, Any] | None:
        """The verdict stored under ``key``; a digest of None: the first one of the seq."""
        device, seq, digest = key
        if self._db is None:
            if digest is not None:
                return self._memory.get((device, seq, digest))
            return next((v for k, v in self._memory.items() if k[:2] == (device, seq)), None)
        sql = "SELECT body FROM window_verdicts WHERE device = ? AND seq = ?"
        args: tuple[Any, ...] = (device, seq)
        if digest is not None:
            sql, args = sql + " AND digest = ?", (*args, digest)
        row = self._db.execute(sql + " ORDER BY rowid LIMIT 1", args).fetchone()
        return None if row is None else dict(records.loads(row[0]))

    def _save(self, key: tuple[str, int, str], verdict: dict[str, Any]) -> None:
        if self._db is None:
            self._memory.setdefault(key, verdict)
            return
        with self._db:
            self._db.execute(
                "INSERT OR IGNORE INTO window_verdicts (device, seq, digest, body) "
                "VALUES (?, ?, ?, ?)",
                (*key, records.dumps(verdict)),
            )

    # -- models (worker thread) ------------------------------------------------------------------
    def _model(self, name: str) -> tuple[TFLiteModel, ModelEntry]:
        if self._manifest is None:
            self._manifest = load_manifest(self.models_dir)
        if name not in self._manifest.models:
            raise NoSuchModel(f"no full-precision model named {name!r}")
        entry = self._manifest.entry(name)
        model = self._models.get(name)
        if model is None:
            model = TFLiteModel.open(self._manifest, name)
            self._models[name] = model
        return model, entry

    def _run(self, name: str, window: np.ndarray) -> dict[str, Any]:
        model, entry = self._model(name)
        want = int(np.prod(model.input_shape))
        if len(window) != want:
            raise InferenceError(f"window holds {len(window)} values, {name} takes {want}")
        out = np.asarray(model.predict(window.reshape(model.input_shape)), dtype=np.float64)
        result: dict[str, Any] = {
            "model": name,
            "kind": entry.kind,
            "precision": model.input.dtype,
            "output": [float(v) for v in out.reshape(-1)],
        }
        if entry.kind == "anomaly":
            n_ch = len(entry.raw.get("features", {}).get("channels", ())) or len(out)
            resid = np.abs(window[-n_ch:].astype(np.float64) - out.reshape(-1)[-n_ch:])
            result["score"] = float(resid.max())
        elif entry.kind == "classifier":
            result["classes"] = [str(c) for c in entry.raw.get("classes", ())]
        return result

    def _validate(self, req: ValidateRequest) -> dict[str, Any]:
        name = str(req.alert["model"])
        ae = self._run(name, req.window)
        if ae["kind"] != "anomaly":
            raise InferenceError(f"alert.model {name!r} is not an anomaly model")
        entry = self._model(name)[1]
        threshold = req.alert.get("threshold")
        if threshold is None:
            threshold = float(entry.raw.get("threshold", {}).get("value", 1.0))
        score = float(ae["score"])
        anomalous = score > float(threshold)
        verdict, fault, confidence = NOVEL_ANOMALY, None, 0.0
        clf_name = None
        manifest = self._manifest
        if self.classifier and manifest is not None and self.classifier in manifest.models:
            clf_model, _ = self._model(self.classifier)
            if int(np.prod(clf_model.input_shape)) == len(req.window):
                clf = self._run(self.classifier, req.window)
                clf_name = self.classifier
                probs = clf["output"]
                best = int(np.argmax(probs))
                confidence = float(probs[best])
                cls = clf["classes"][best] if best < len(clf["classes"]) else str(best)
                if cls != NORMAL_CLASS and confidence >= self.classifier_confidence:
                    verdict, fault = KNOWN_FAILURE, cls
        if not anomalous:
            verdict, fault = FALSE_ALARM, None
        return {
            "seq": req.seq,
            "anomalous": anomalous,
            "score": score,
            "threshold": float(threshold),
            "verdict": verdict,
            "fault": fault,
            "confidence": confidence,
            "model": name,
            "classifier": clf_name,
            "precision": ae["precision"],
            DIGEST_KEY: req.digest,
        }

    # -- the two resources -----------------------------------------------------------------------
    async def infer(self, device: str, req: InferRequest) -> dict[str, Any]:
        """Run the full-precision model on a window. Raises InferenceError, NoSuchModel,
        ModelError (the endpoint's own model files)."""
        result: dict[str, Any] = await self._call(self._run, req.model, req.window)
        self.infer_runs += 1
        log.debug("event=infer device=%s model=%s", device, req.model)
        return result

    async def validate(self, device: str, req: ValidateRequest) -> dict[str, Any]:
        """The verdict on an alert's window: the stored one if there is one, else run the
        models once and store it. Requests for the same (device, seq, digest) share one run."""
        key = (device, req.seq, req.digest)
        running = self._inflight.get(key)
        if running is not None:
            self.repeats += 1
            return await asyncio.shield(running)
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._inflight[key] = future
        try:
            stored = await self._call(self._load, key)
            if stored is not None:
                self.repeats += 1
                verdict = stored
            else:
                verdict = await self._call(self._validate, req)
                await self._call(self._save, key, verdict)
                self.validation_runs[(device, req.seq)] += 1
                log.info(
                    "event=verdict device=%s seq=%d digest=%s anomalous=%s verdict=%s score=%.3g",
                    device,
                    req.seq,
                    req.digest[:16],
                    str(verdict["anomalous"]).lower(),
                    verdict["verdict"],
                    verdict["score"],
                )
            future.set_result(verdict)
            return verdict
        except BaseException as err:
            future.set_exception(err)
            future.exception()  # retrieved: waiters get it, nobody else needs to
            raise
        finally:
            del self._inflight[key]

    async def verdict(
        self, device: str, seq: int, digest: str | None = None
    ) -> dict[str, Any] | None:
        """The stored verdict of an alert's window (for operators and tests); without a
        digest, the first one stored for the seq."""
        return await self._call(self._load, (device, seq, digest))


__all__ = [
    "CloudInference",
    "InferRequest",
    "InferenceError",
    "ModelError",
    "NoSuchModel",
    "ValidateRequest",
]
