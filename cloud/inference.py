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
not block). Verdicts live in the endpoint's storage (:meth:`cloud.storebase.Storage.verdict`,
:meth:`~cloud.storebase.Storage.put_verdicts`, called through the server's storage thread), so
that every endpoint process and host sharing a storage finds a verdict any of them stored: two
hosts that judge one window at once both store theirs, the first one stays and both answer it.
Without a storage (a CloudInference on its own) they are kept in memory.

An endpoint before verdicts moved into the storage kept them in ``verdicts.db`` in its data
directory: :meth:`CloudInference.start` imports that file once into the storage and renames it
``verdicts.db.imported``. Verdicts of a still older endpoint (table ``verdicts``, not bound to a
window) are left alone and no longer answered: asked again, such an alert is judged once more.

Logging policy: debug per request, info when a model is loaded and for each verdict stored.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import sqlite3
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from agent.detect.inference import Manifest, ModelEntry, TFLiteModel, load_manifest
from agent.errors import ModelError
from agent.wire import records
from agent.wire.validation import DIGEST_KEY, window_digest
from cloud.storebase import Storage, StorageUnavailable, Verdict

log = logging.getLogger(__name__)

#: Where the float32 references live in a checkout.
DEFAULT_MODELS_DIR = Path(__file__).resolve().parent.parent / "models" / "cloud"
VERDICTS_FILE = "verdicts.db"  # where older endpoints kept verdicts: imported once at start
#: A fault class is taken as known above this probability (as the device's default).
CLASSIFIER_CONFIDENCE = 0.8
DEFAULT_CLASSIFIER = "skab-clf"
NORMAL_CLASS = "normal"
MAX_WINDOW = 4096  # values in one window
MAX_SEQ = 2**63 - 1
#: ``CloudInference.validation_runs`` keeps the counts of this many (device, seq) at most, the
#: least recently run dropped first (about 1 MB at most; a device retries an alert in minutes).
MAX_VALIDATION_RUNS = 4096
#: Model runs waiting for (or on) the one worker at most, and of one device: more is refused at
#: once (:class:`InferenceBusy`, 5.03 with Max-Age), so a device posting windows without pause
#: cannot queue work and memory without bound, nor keep the other devices' alerts unjudged. An
#: honest device sends one validation at a time (agent/sync/routing.py) and retries a 5.03.
MAX_QUEUED = 64
MAX_QUEUED_PER_DEVICE = 4

#: The verdict of a window the full model does not find anomalous.
FALSE_ALARM = "false_alarm"
KNOWN_FAILURE = "known_failure"
NOVEL_ANOMALY = "novel_anomaly"


T = TypeVar("T")
#: How the verdicts are reached: ``CloudServer.db`` (runs ``fn(storage)`` on its storage thread).
StorageCall = Callable[[Callable[[Storage], Any]], Awaitable[Any]]


class InferenceError(ValueError):
    """A request that does not fit the schema (the endpoint answers 4.00)."""


FLOAT32_MAX = float(np.finfo(np.float32).max)


class NoSuchModel(InferenceError):
    """The request names a model the endpoint has no full-precision version of (4.04)."""


class InferenceBusy(Exception):
    """The worker has :data:`MAX_QUEUED` runs waiting, or the device :data:`MAX_QUEUED_PER_DEVICE`
    (the endpoint answers 5.03 with Max-Age; nothing was run)."""


def _window(value: Any) -> np.ndarray:
    if not isinstance(value, list) or not value:
        raise InferenceError("window must be a non-empty array of numbers")
    if len(value) > MAX_WINDOW:
        raise InferenceError(f"window holds {len(value)} values, at most {MAX_WINDOW}")
    if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in value):
        raise InferenceError("window must hold numbers only")
    try:
        arr = np.asarray(value, dtype=np.float64)
    except OverflowError:  # an integer beyond float64 (CBOR's decoder takes none: a caller's)
        raise InferenceError("window values must be finite float32 numbers") from None
    # the models run in float32: a value beyond its range would become an infinity there
    if not np.all(np.isfinite(arr)) or np.any(np.abs(arr) > FLOAT32_MAX):
        raise InferenceError("window values must be finite float32 numbers")
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
    however often it is asked), for the :data:`MAX_VALIDATION_RUNS` most recently run only (it
    would otherwise grow with every alert for as long as the endpoint runs); ``infer_runs``
    counts the runs of ``/infer``.
    """

    def __init__(
        self,
        models_dir: Path | None = None,
        data_dir: Path | None = None,
        db: StorageCall | None = None,
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
        self._db: StorageCall = db or _MemoryVerdicts().call
        self._inflight: dict[tuple[str, int, str], asyncio.Future[dict[str, Any]]] = {}
        self._queued: Counter[str] = Counter()  # runs waiting for (or on) the worker, by device
        self.refused = 0  # runs refused busy

    async def _call(self, device: str, fn: Any, *args: Any) -> Any:
        """``fn(*args)`` on the worker, if the queue bounds allow (else :class:`InferenceBusy`)."""
        queued = self._queued
        if queued.total() >= MAX_QUEUED or queued[device] >= MAX_QUEUED_PER_DEVICE:
            self.refused += 1
            raise InferenceBusy(
                f"{queued[device]} runs of {device} and {queued.total()} in all are waiting"
            )
        queued[device] += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)
        finally:
            queued[device] -= 1
            if not queued[device]:
                del queued[device]

    async def start(self) -> None:
        """Import the ``verdicts.db`` of an older endpoint in the data directory, once."""
        if self.data_dir is not None:
            path = self.data_dir / VERDICTS_FILE
            await self._db(lambda s: import_legacy_verdicts(s, path))

    async def close(self) -> None:
        self._executor.shutdown(wait=False)

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
        result: dict[str, Any] = await self._call(device, self._run, req.model, req.window)
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
            stored = await self._db(lambda s: s.verdict(device, req.seq, req.digest))
            if stored is not None:
                self.repeats += 1
                verdict = dict(records.loads(stored))
            else:
                verdict = await self._call(device, self._validate, req)
                item = (device, req.seq, req.digest, records.dumps(verdict))
                [kept] = await self._db(lambda s: s.put_verdicts([item]))
                verdict = dict(records.loads(kept))  # another host's, if it stored one first
                self._count_run((device, req.seq))
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

    def _count_run(self, key: tuple[str, int]) -> None:
        runs = self.validation_runs
        runs[key] = runs.pop(key, 0) + 1  # the most recent last
        while len(runs) > MAX_VALIDATION_RUNS:
            del runs[next(iter(runs))]

    async def verdict(
        self, device: str, seq: int, digest: str | None = None
    ) -> dict[str, Any] | None:
        """The stored verdict of an alert's window (for operators and tests); without a
        digest, the first one stored for the seq."""
        stored = await self._db(lambda s: s.verdict(device, seq, digest))
        return None if stored is None else dict(records.loads(stored))


def import_legacy_verdicts(storage: Storage, path: Path, chunk: int = 1000) -> int:
    """Copy the verdicts of an older endpoint's ``verdicts.db`` (table ``window_verdicts``, in
    the order they were stored) into ``storage`` (:meth:`Storage.put_verdicts`: one stored
    already stays) and rename the file to ``verdicts.db.imported``, so that it is read once.
    Returns how many verdicts it held; 0 when there is no such file."""
    if not path.is_file():
        return 0
    try:
        db = sqlite3.connect(path)
        try:
            db.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # its WAL into the file, then gone
            known = db.execute(
                "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'window_verdicts'"
            ).fetchone()
            rows: list[Verdict] = []
            if known is not None:
                rows = [
                    (str(d), int(s), str(g), bytes(b))
                    for d, s, g, b in db.execute(
                        "SELECT device, seq, digest, body FROM window_verdicts ORDER BY rowid"
                    )
                ]
        finally:
            db.close()
    except sqlite3.Error as err:
        raise StorageUnavailable(f"{path}: cannot read the verdicts there: {err}") from err
    for start in range(0, len(rows), chunk):
        storage.put_verdicts(rows[start : start + chunk])
    done = path.with_name(path.name + ".imported")
    try:
        os.replace(path, done)
    except OSError as err:  # imported all the same; the next start imports again (no change)
        log.warning("event=legacy_verdicts_not_renamed path=%s error=%s", path, err)
    log.info("event=legacy_verdicts_imported path=%s verdicts=%d", path, len(rows))
    return len(rows)


class _MemoryVerdicts:
    """The verdict methods of a storage, in memory: a CloudInference without a storage."""

    def __init__(self) -> None:
        self._kept: dict[tuple[str, int, str], bytes] = {}  # in the order they were stored

    async def call(self, fn: Callable[[Any], T]) -> T:
        return fn(self)

    def verdict(self, device: str, seq: int, digest: str | None = None) -> bytes | None:
        found = (v for (d, s, g), v in self._kept.items() if (d, s) == (device, seq))
        return self._kept.get((device, seq, digest)) if digest is not None else next(found, None)

    def put_verdicts(self, items: Sequence[Verdict]) -> list[bytes]:
        return [self._kept.setdefault((d, s, g), body) for d, s, g, body in items]


__all__ = [
    "VERDICTS_FILE",
    "CloudInference",
    "InferRequest",
    "InferenceError",
    "ModelError",
    "NoSuchModel",
    "ValidateRequest",
    "import_legacy_verdicts",
]
