"""The messages of a federated training round, as both sides speak them (docs/learning.md).

- :class:`RoundTask`: the endpoint's desired value ``learn/<model>`` for a selected device: which
  job and round, the model version the round starts from, the SHA-256 of the round's master
  weights, the deadline and the local training recipe; in a checked round also ``check``, the
  SHA-256 of the weights the fleet runs (the incumbent), which the device compares the masters
  with on its own held-out windows (``epochs`` 0: a round that only checks, nothing is
  trained). It fits a desired value (statedoc.MAX_VALUE_BYTES).
- :class:`Masters`: the round's global float weights (``GET /learn/masters/<sha256>``),
  content-addressed: the device checks the SHA-256 its task names before it trains on them.
- :class:`ModelUpdate`: a device's upload (``POST /learn/<device>``): its privatized weight
  update (float16, the order of agent.learn.autoencoder ``to_vector``), how many windows it
  trained on, and a :class:`ScoreSummary` of its anomaly scores on its own normal windows (for the
  federated threshold: a few quantiles and two moments, never the scores); in a checked round
  also ``recall``, the fraction of synthetic faults the masters and the incumbent each detect
  on the device's held-out windows (agent.learn.local.fault_recall); in a round that only
  checks, no delta.

Everything is deterministic CBOR (records.dumps) and decoded strictly: a size limit before
decoding, shapes, ranges and finiteness checked per field, every problem a
:class:`LearningError`.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Self

import numpy as np

from agent.errors import AgentError
from agent.wire.records import RecordError, dumps, loads

#: Model names and versions, SHA-256 in hex (as agent.wire.statedoc, which imports this module).
MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}\Z")
SHA256_HEX = re.compile(r"^[0-9a-f]{64}\Z")
#: The desired key of a round for ``model``: ``learn/<model>``.
KEY_PREFIX = "learn/"
#: Quantile probabilities of a score summary (fixed, so summaries of devices combine).
QUANTILES = (0.5, 0.9, 0.95, 0.99, 0.999)
#: Upper bounds the endpoint and the device accept.
MAX_PARAMETERS = 1 << 16  # weights of one model (skab-ae has 2404)
MAX_LAYERS = 8
MAX_WIDTH = 4096
MAX_BODY_BYTES = 2 * MAX_PARAMETERS + 4096  # an update: float16 weights plus the small fields
MAX_MASTERS_BYTES = 4 * MAX_PARAMETERS + 1024
MAX_ROUND = 10_000
MAX_EPOCHS = 100
MAX_SAMPLES = 1 << 31
#: Each weight of an update must lie within this (float16's range is 65504).
MAX_DELTA = 6.0e4
#: The endpoint's answers that refuse a round's upload for good (cloud/learnuploads.py): a device
#: gives the round up. Any other answer (4.08 of a Block1 transfer cut short, 5.03) is sent again
#: until the deadline.
REFUSALS = ("4.00", "4.03", "4.04")
#: The fleet threshold rule (cloud/fedavg.py says how it was chosen): this quantile of the pooled
#: normal scores plus this margin, in the features' units. A device applies the same rule to its
#: own held-out scores when it counts the synthetic faults a model detects (the check).
THRESHOLD_QUANTILE = 0.9
THRESHOLD_MARGIN = 0.65


class LearningError(AgentError, ValueError):
    """A round message does not decode or holds a value out of range."""


def learn_key(model: str) -> str:
    return KEY_PREFIX + model


def _int(d: Mapping[str, Any], key: str, lo: int, hi: int) -> int:
    v = d.get(key)
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise LearningError(f"{key}: an integer in [{lo}, {hi}] is required, not {v!r}")
    return v


def _num(d: Mapping[str, Any], key: str, lo: float, hi: float) -> float:
    v = d.get(key)
    if isinstance(v, bool) or not isinstance(v, int | float) or not lo <= v <= hi:
        raise LearningError(f"{key}: a number in [{lo}, {hi}] is required, not {v!r}")
    return float(v)


def _text(d: Mapping[str, Any], key: str, pattern: Any) -> str:
    v = d.get(key)
    if not isinstance(v, str) or not pattern.match(v):
        raise LearningError(f"{key}: not a valid value: {v!r}")
    return v


def _map(item: Any, what: str, keys: Sequence[str], optional: Sequence[str] = ()) -> dict:
    if not isinstance(item, dict):
        raise LearningError(f"{what}: a map is required")
    unknown = set(item) - set(keys) - set(optional)
    missing = set(keys) - set(item)
    if unknown or missing:
        raise LearningError(
            f"{what}: keys {sorted(map(str, missing))} missing, {sorted(map(str, unknown))} unknown"
        )
    return item


def _decode(data: bytes, limit: int, what: str) -> Any:
    if len(data) > limit:
        raise LearningError(f"{what}: {len(data)} bytes, more than {limit}")
    try:
        return loads(data, max_depth=4)
    except RecordError as err:
        raise LearningError(f"{what}: {err}") from None


@dataclass(frozen=True)
class RoundTask:
    """What a selected device does in one round (the desired value ``learn/<model>``)."""

    job: int
    round: int
    base: str  # the model version whose masters the job started from
    masters: str  # SHA-256 (hex) of the round's Masters document
    deadline: float  # unix time: an upload after it is refused
    epochs: int
    lr: float
    mu: float  # FedProx proximal weight
    clip: float  # L2 bound of the update
    noise: float  # noise multiplier: std of the Gaussian noise is noise * clip
    #: SHA-256 (hex) of the incumbent's Masters document: the device reports how the masters
    #: and the incumbent detect synthetic faults (a byte string on the wire: the task must fit a
    #: desired value). None: nothing to check.
    check: str | None = None

    @property
    def evaluate(self) -> bool:
        """A round that only checks (``epochs`` 0): nothing is trained, no weights leave."""
        return self.epochs == 0

    def to_value(self) -> dict[str, Any]:
        value = {
            "job": self.job,
            "round": self.round,
            "base": self.base,
            "masters": self.masters,
            "deadline": math.ceil(self.deadline),
            "epochs": self.epochs,
            "lr": self.lr,
            "mu": self.mu,
            "clip": self.clip,
            "noise": self.noise,
        }
        if self.check is not None:
            value["check"] = bytes.fromhex(self.check)
        return value

    @classmethod
    def from_value(cls, value: Any) -> Self:
        d = _map(
            value,
            "round task",
            ("job", "round", "base", "masters", "deadline", "epochs", "lr", "mu", "clip", "noise"),
            ("check",),
        )
        check = d.get("check")
        if check is not None and (not isinstance(check, bytes) or len(check) != 32):
            raise LearningError("check: the incumbent's SHA-256 (32 bytes) is required")
        epochs = _int(d, "epochs", 0 if check is not None else 1, MAX_EPOCHS)
        return cls(
            job=_int(d, "job", 1, 2**62),
            round=_int(d, "round", 1, MAX_ROUND),
            base=_text(d, "base", MODEL_NAME),
            masters=_text(d, "masters", SHA256_HEX),
            deadline=float(_int(d, "deadline", 0, 2**40)),
            epochs=epochs,
            lr=_num(d, "lr", 1e-6, 1.0),
            mu=_num(d, "mu", 0.0, 100.0),
            clip=_num(d, "clip", 1e-6, 1e3),
            noise=_num(d, "noise", 0.0, 1e3),
            check=None if check is None else check.hex(),
        )


def _sizes(value: Any) -> tuple[int, ...]:
    if (
        not isinstance(value, list)
        or not 2 <= len(value) <= MAX_LAYERS + 1
        or not all(isinstance(v, int) and not isinstance(v, bool) for v in value)
        or not all(1 <= v <= MAX_WIDTH for v in value)
    ):
        raise LearningError(f"sizes: a list of 2..{MAX_LAYERS + 1} widths is required")
    sizes = tuple(value)
    if parameter_count(sizes) > MAX_PARAMETERS:
        raise LearningError(f"sizes: more than {MAX_PARAMETERS} parameters")
    return sizes


def parameter_count(sizes: Sequence[int]) -> int:
    return sum(a * b + b for a, b in itertools.pairwise(sizes))


@dataclass(frozen=True, eq=False)
class Masters:
    """A round's global float32 weights: layer widths and the flat vector (to_vector order)."""

    model: str
    sizes: tuple[int, ...]
    weights: np.ndarray  # float32, parameter_count(sizes)

    def to_cbor(self) -> bytes:
        return dumps(
            {
                "model": self.model,
                "sizes": list(self.sizes),
                "weights": np.asarray(self.weights, dtype="<f4").tobytes(),
            }
        )

    def sha256(self) -> str:
        return hashlib.sha256(self.to_cbor()).hexdigest()

    @classmethod
    def from_cbor(cls, data: bytes, sha256: str | None = None) -> Self:
        if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
            raise LearningError("masters: SHA-256 differs from the one the task names")
        d = _map(
            _decode(data, MAX_MASTERS_BYTES, "masters"), "masters", ("model", "sizes", "weights")
        )
        model = _text(d, "model", MODEL_NAME)
        sizes = _sizes(d["sizes"])
        raw = d["weights"]
        if not isinstance(raw, bytes) or len(raw) != 4 * parameter_count(sizes):
            raise LearningError("masters: weights must be float32 bytes, one per parameter")
        weights = np.frombuffer(raw, dtype="<f4").astype(np.float32)
        if not np.all(np.isfinite(weights)):
            raise LearningError("masters: weights must be finite")
        return cls(model, sizes, weights)


@dataclass(frozen=True)
class ScoreSummary:
    """Summary statistics of a device's anomaly scores on its own normal windows: the count,
    the quantiles at :data:`QUANTILES`, the mean and the standard deviation."""

    n: int
    quantiles: tuple[float, ...]
    mean: float
    std: float

    @classmethod
    def of(cls, scores: np.ndarray) -> Self:
        s = np.asarray(scores, dtype=np.float64)
        s = s[np.isfinite(s)]
        if s.size == 0:
            return cls(0, tuple(0.0 for _ in QUANTILES), 0.0, 0.0)
        q = np.quantile(s, QUANTILES)
        return cls(int(s.size), tuple(float(v) for v in q), float(s.mean()), float(s.std()))

    def quantile(self, p: float) -> float:
        return self.quantiles[QUANTILES.index(p)]

    def to_value(self) -> dict[str, Any]:
        return {"n": self.n, "q": list(self.quantiles), "mean": self.mean, "std": self.std}

    @classmethod
    def from_value(cls, value: Any) -> Self:
        d = _map(value, "scores", ("n", "q", "mean", "std"))
        q = d["q"]
        if (
            not isinstance(q, list)
            or len(q) != len(QUANTILES)
            or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in q)
            or not all(0.0 <= v <= 1e6 for v in q)
            or any(b < a for a, b in itertools.pairwise(q))
        ):
            raise LearningError(f"scores: q must be {len(QUANTILES)} ascending numbers >= 0")
        return cls(
            n=_int(d, "n", 0, MAX_SAMPLES),
            quantiles=tuple(float(v) for v in q),
            mean=_num(d, "mean", 0.0, 1e6),
            std=_num(d, "std", 0.0, 1e6),
        )


@dataclass(frozen=True)
class Recall:
    """A device's check (a round whose task names an incumbent): the fraction of synthetic
    faults on its held-out windows that the round's masters and the incumbent each detect."""

    masters: float
    incumbent: float

    def to_value(self) -> list[float]:
        return [float(self.masters), float(self.incumbent)]

    @classmethod
    def from_value(cls, value: Any) -> Self:
        if (
            not isinstance(value, list)
            or len(value) != 2
            or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in value)
            or not all(0.0 <= v <= 1.0 for v in value)
        ):
            raise LearningError("recall: two fractions in [0, 1] are required")
        return cls(float(value[0]), float(value[1]))


@dataclass(frozen=True, eq=False)
class ModelUpdate:
    """A device's upload for one round (``delta`` None: a round that only checks)."""

    job: int
    round: int
    samples: int
    delta: np.ndarray | None  # the privatized update, float32 in memory, float16 on the wire
    scores: ScoreSummary
    loss: float  # the local objective after training (mean over the last epoch)
    recall: Recall | None = None  # a checked round's answer

    def to_cbor(self) -> bytes:
        value: dict[str, Any] = {
            "job": self.job,
            "round": self.round,
            "samples": self.samples,
            "scores": self.scores.to_value(),
            "loss": float(self.loss),
        }
        if self.delta is not None:
            delta = np.asarray(self.delta, dtype=np.float32)
            value["delta"] = np.clip(delta, -MAX_DELTA, MAX_DELTA).astype("<f2").tobytes()
        if self.recall is not None:
            value["recall"] = self.recall.to_value()
        return dumps(value)

    @classmethod
    def from_cbor(cls, data: bytes, parameters: int | None = None) -> Self:
        """Decode and check an upload; ``parameters``: the count the round's model has."""
        d = _map(
            _decode(data, MAX_BODY_BYTES, "update"),
            "update",
            ("job", "round", "samples", "scores", "loss"),
            ("delta", "recall"),
        )
        delta = None
        if "delta" in d:
            raw = d["delta"]
            size = len(raw) if isinstance(raw, bytes) else 0
            if not 2 <= size <= 2 * MAX_PARAMETERS or size % 2:
                raise LearningError("update: delta must be float16 bytes")
            delta = np.frombuffer(raw, dtype="<f2").astype(np.float32)
            if parameters is not None and delta.size != parameters:
                raise LearningError(f"update: {delta.size} weights, the model has {parameters}")
            if not np.all(np.isfinite(delta)):
                raise LearningError("update: delta must be finite")
        recall = Recall.from_value(d["recall"]) if "recall" in d else None
        if delta is None and recall is None:
            raise LearningError("update: neither a delta nor a check")
        return cls(
            job=_int(d, "job", 1, 2**62),
            round=_int(d, "round", 1, MAX_ROUND),
            samples=_int(d, "samples", 1, MAX_SAMPLES),
            delta=delta,
            scores=ScoreSummary.from_value(d["scores"]),
            loss=_num(d, "loss", 0.0, 1e9),
            recall=recall,
        )
