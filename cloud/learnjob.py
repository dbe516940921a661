"""A federated training job's document, and what its devices' reports say about a round
(docs/learning.md; the coordinator: cloud/learning.py).

- :class:`JobSpec` (what an operator asked for), :class:`JobState` (where the job is) and
  :class:`Job`, stored as one CBOR document (cloud/learnstore.py) that the coordinator replaces by
  compare-and-set;
- :func:`out_of_round`: whether a selected device says, in its own reported state, that it will
  not upload in the open attempt of a round, and why.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np

from agent.errors import AgentError
from agent.learn.autoencoder import DenseAutoencoder
from agent.wire import records
from agent.wire.learning import MAX_ROUND, LearningError, Masters, RoundTask, learn_key
from agent.wire.statedoc import MAX_VALUE_BYTES, MODEL_NAME, Entry, StateError, check_desired
from cloud.fedavg import CHECK_TOLERANCE
from cloud.learnstore import JobRow

STATES = ("running", "done", "failed", "stopped")
#: The statuses a device reports under ``learn/<model>`` for a round it will not upload in
#: (agent/learn/client.py ``_set``): a refusal stands for every attempt of its round (the device
#: never takes that round again, client.py ``_done``); an expired or failed attempt is taken
#: again when the round opens again, so those count for their own attempt only. ``withdrawn`` is
#: not one: in the open attempt it means something other than this coordinator replaced the
#: device's task (a second coordinator of the job, an operator), and the device goes on with
#: the task that replaced it, which may well be this round's.
OUT_STATUSES = ("refused", "expired", "failed")
#: Why a device is out when it refused the desired ``learn/<model>`` value itself (its state sync
#: names the key and the version in ``desired/errors``, agent/sync/statedata.py errors_report;
#: a refused version is never tried again): a release that does not know the task's ``check``,
#: ``[learn] enabled = false``, an agent without the learning client.
NOT_APPLIED = "not_applied"
DESIRED_ERRORS = "desired/errors"  # agent/sync/statedata.py ERRORS_KEY
#: The states a job never leaves (nothing sets a job running again).
ENDED = ("done", "failed", "stopped")


class JobError(AgentError):
    """A job cannot start or go on (the message says why)."""


class UnknownJob(JobError):
    """No job has that number."""


class DamagedJob(JobError):
    """A job's stored document does not read as a job (the message says which and why)."""

    def __init__(self, job: int, message: str) -> None:
        super().__init__(message)
        self.job = job


@dataclass(frozen=True)
class JobSpec:
    """What an operator asked for."""

    model: str
    role: str
    base: str  # the published version the job starts from (its file is the int8 template)
    rounds: int
    fraction: float
    min_devices: int
    round_seconds: float
    # the recipe of ./tools/dev bench federated (tools/benches/federated.py says how it was chosen)
    epochs: int = 10
    lr: float = 2e-3
    mu: float = 0.01
    clip: float = 0.3
    noise: float = 0.5
    devices: tuple[str, ...] = ()  # empty: every registered device
    #: assign a round's model only if it passes the check (module docstring); False: every
    #: round's model is assigned when the round closes (devices of releases before the check)
    gate: bool = True
    #: how much lower a model's median fraction of detected synthetic faults may be than the
    #: incumbent's and still pass (cloud/fedavg.py CHECK_TOLERANCE)
    tolerance: float = CHECK_TOLERANCE

    def check(self) -> None:
        if not MODEL_NAME.match(self.model) or not MODEL_NAME.match(self.base):
            raise JobError("model and version must be model names")
        for what, name, key in (
            ("model", self.model, learn_key(self.model)),
            ("role", self.role, f"model/{self.role}"),
        ):  # the desired keys the job writes: a round's task, a new version's assignment
            try:
                check_desired(key, None)
            except StateError as err:
                raise JobError(f"--{what} {name!r}: {err}") from None
        if not 1 <= self.rounds <= 10_000:
            raise JobError("rounds must be 1..10000")
        if not 0.0 < self.fraction <= 1.0:
            raise JobError("fraction must be in (0, 1]")
        if self.min_devices < 1:
            raise JobError("min-devices must be at least 1")
        if not 1.0 <= self.round_seconds <= 7 * 86400:
            raise JobError("the round deadline must be 1 s .. 7 days")
        task = RoundTask(
            1, 1, self.base, "0" * 64, 0, self.epochs, self.lr, self.mu, self.clip, self.noise
        )
        try:
            RoundTask.from_value(task.to_value())
        except LearningError as err:
            raise JobError(f"the local recipe is out of range: {err}") from None
        if self.noise <= 0:
            raise JobError("noise must be > 0: updates leave devices only with noise added")
        if not 0.0 <= self.tolerance <= 1.0:
            raise JobError("the check's tolerance must be in [0, 1]")
        if self.gate and self.rounds >= MAX_ROUND:  # the round after the last checks
            raise JobError(
                f"rounds must be 1..{MAX_ROUND - 1} with the check: a round after the last "
                "checks the last one's model (or --no-gate)"
            )
        longest = version_for(self.base, 2**32, self.rounds)  # what a round's close publishes
        if not MODEL_NAME.match(longest):
            raise JobError(
                f"version {self.base!r}: the versions this job publishes ({longest!r}) would "
                "be longer than a model version may be: a shorter version name"
            )
        if self.gate:  # the largest task of a checked job must fit a desired value
            task = RoundTask(
                2**32,
                MAX_ROUND,
                self.base,
                "0" * 64,
                2**40 - 1,
                self.epochs,
                self.lr,
                self.mu,
                self.clip,
                self.noise,
                check="0" * 64,
            )
            size = len(records.dumps(task.to_value()))
            if size > MAX_VALUE_BYTES:
                raise JobError(
                    f"version {self.base!r}: a checked round's task would take {size} bytes, "
                    f"more than a desired value's {MAX_VALUE_BYTES}: a shorter version name, "
                    "or --no-gate"
                )


@dataclass
class JobState:
    """Where a job is."""

    state: str = "running"
    round: int = 0  # the open (or last) round; 0 before the first
    open: bool = False
    attempt: int = 0
    selected: list[str] = field(default_factory=list)
    deadline: float = 0.0
    masters: str = ""  # SHA-256 of the current masters (learn_blobs)
    version: str = ""  # the version assigned after the last closed round ("" before)
    #: SHA-256 of the weights the fleet runs (the base's masters, then each model that passed
    #: the check); "" for a job without the check (started before it, or gate off)
    incumbent: str = ""
    #: the round whose aggregate the masters are, while they wait for the check (0: none)
    candidate: int = 0
    #: that round's devices and samples, for the version's manifest
    candidate_info: dict[str, int] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    error: str = ""
    #: the desired version of ``learn/<model>`` written to each selected device in the open
    #: attempt (a refusal of that version in its ``desired/errors`` takes it out)
    versions: dict[str, int] = field(default_factory=dict)
    #: the open attempt's task was written to its devices: False between the save that opened
    #: the attempt and the writes (only a coordinator whose save opened it writes them, so a
    #: second coordinator of the job whose save failed writes no task of its own)
    written: bool = True
    #: the selected devices of the open attempt that said they will not upload, and why (a
    #: status of OUT_STATUSES, or NOT_APPLIED)
    out: dict[str, str] = field(default_factory=dict)
    #: the open round's earlier attempts: {attempt, uploads, out (counts by why), early}
    reopened: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class Job:
    id: int
    spec: JobSpec
    st: JobState
    rev: int = 0

    def to_cbor(self) -> bytes:
        spec = asdict(self.spec)
        spec["devices"] = list(self.spec.devices)
        return records.dumps({"spec": spec, "state": asdict(self.st)})

    @classmethod
    def from_row(cls, row: JobRow) -> Job:
        """The job a stored row holds. Raises :class:`DamagedJob` when its document does not
        read as one (corrupted at rest, or written by something else)."""
        try:
            d = records.loads(row.doc)
            spec = dict(d["spec"])
            spec["devices"] = tuple(spec["devices"])
            spec.setdefault("gate", False)  # a job stored before the check runs without it
            job = cls(row.id, JobSpec(**spec), JobState(**d["state"]), row.rev)
            _check_types(job.spec)
            _check_types(job.st)
            return job
        except (AgentError, LookupError, TypeError, ValueError, AttributeError) as err:
            why = " ".join(f"{type(err).__name__}: {err}".split())[:200]
            raise DamagedJob(
                row.id, f"job {row.id}: its stored document does not read ({why})"
            ) from None

    def summary(self) -> dict[str, Any]:
        return {
            "job": self.id,
            **asdict(self.spec),
            **asdict(self.st),
            "out_counts": out_counts(self.st.out),
        }


#: What each field type of :class:`JobSpec` and :class:`JobState` (their annotations, as text)
#: may hold in a stored document: what the coordinator writes (a float may have been written as
#: an integer; an int is never a bool).
_FIELD_CHECKS: dict[str, Callable[[Any], bool]] = {
    "str": lambda v: isinstance(v, str),
    "int": lambda v: type(v) is int,
    "float": lambda v: type(v) in (int, float),
    "bool": lambda v: type(v) is bool,
    "tuple[str, ...]": lambda v: all(isinstance(x, str) for x in v),
    "list[str]": lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v),
    "dict[str, int]": lambda v: (
        isinstance(v, dict) and all(isinstance(k, str) and type(x) is int for k, x in v.items())
    ),
    "dict[str, str]": lambda v: (
        isinstance(v, dict) and all(isinstance(k, str) and isinstance(x, str) for k, x in v.items())
    ),
    "list[dict[str, Any]]": lambda v: (
        isinstance(v, list)
        and all(isinstance(x, dict) and all(isinstance(k, str) for k in x) for x in v)
    ),
}


def _check_types(obj: JobSpec | JobState) -> None:
    """TypeError unless every field of ``obj`` holds what the coordinator writes there (a
    document that decodes, with a field of another type, would fail later: in a tick, in
    retention's ``uploads_read_from``, in ``learn status``)."""
    for f in fields(obj):
        value = getattr(obj, f.name)
        if not _FIELD_CHECKS[str(f.type)](value):
            raise TypeError(f"{f.name} is {type(value).__name__}, not {f.type}")


def masters_of(model: DenseAutoencoder, name: str) -> Masters:
    return Masters(name, model.sizes, model.to_vector().astype(np.float32))


def version_for(base: str, job: int, rnd: int) -> str:
    return f"{base.split('+')[0]}+fl{job}.{rnd}"


def out_of_round(
    reported: Mapping[str, Entry],
    model: str,
    job: int,
    rnd: int,
    deadline: float,
    version: int | None,
) -> str | None:
    """Why a device selected in the open attempt of round ``rnd`` of ``job`` (its deadline
    ``deadline``; ``version``: the desired version of ``learn/<model>`` written to it, None if
    not known) will not upload in it, by its own reported state (``reported``: at least its
    ``learn/<model>`` and ``desired/errors`` entries); None when it may still upload, or says
    nothing this endpoint can read.

    - ``learn/<model>`` names this job and round with a status of :data:`OUT_STATUSES`:
      ``refused`` whatever the attempt (a refusal stands for every attempt of its round), the
      others only with this attempt's deadline (the device takes a new attempt again; the
      deadline it reports is the task's, agent/learn/client.py ``_set``);
    - ``desired/errors`` names ``learn/<model>`` at ``version``: the device refused the task
      itself (:data:`NOT_APPLIED`; its state sync never tries a refused version again).

    The device wrote these values: anything may be in them (a device can only take itself out
    of a round). A value of another shape, type or size is not a reason."""
    key = learn_key(model)
    entry = reported.get(key)
    value = entry.value if entry is not None else None
    if isinstance(value, dict) and same_int(value.get("job"), job):
        status = value.get("status")
        if (
            isinstance(status, str)
            and status in OUT_STATUSES
            and same_int(value.get("round"), rnd)
            and (status == "refused" or same_int(value.get("deadline"), math.ceil(deadline)))
        ):
            return status
    errors = reported.get(DESIRED_ERRORS)
    refusals = errors.value if errors is not None else None
    if version is not None and isinstance(refusals, dict):
        refusal = refusals.get(key)
        if isinstance(refusal, dict) and same_int(refusal.get("version"), version):
            return NOT_APPLIED
    return None


def same_int(value: Any, expected: int) -> bool:
    return type(value) is int and value == expected  # not a bool, a float or a bignum's repr


def out_counts(out: Mapping[str, str]) -> dict[str, int]:
    """How many devices are out for each reason, in the order of :data:`OUT_STATUSES` (a reason
    of no release, from a document damaged at rest, after them)."""
    counts = Counter(out.values())
    order = [*OUT_STATUSES, NOT_APPLIED]
    return {
        why: counts[why]
        for why in sorted(counts, key=lambda w: (w not in order, w in order and order.index(w), w))
    }


def why_text(out: Mapping[str, str], sep: str = ",") -> str:
    return sep.join(f"{why}:{n}" for why, n in out_counts(out).items()) or "-"
