"""Federated training rounds at the endpoint: the job document, the round coordinator, and the
two resources devices use (docs/learning.md).

A *job* (``edge-agent-cloud learn start``) trains one published model for ``rounds`` rounds. Its
state is one CBOR document in storage (cloud/learnstore.py), replaced by compare-and-set, so the
coordinator keeps nothing in memory that a restart would lose: ``learn start`` (or ``learn
resume JOB``) runs :meth:`Coordinator.run`, which calls :meth:`Coordinator.tick` until the job
ends; each tick makes at most one transition:

- **open a round**: pick ``max(min_devices, ceil(fraction * eligible))`` devices at random
  (seeded by job, round and attempt) and write each the desired value ``learn/<model>``
  (agent.wire.learning.RoundTask): the masters' SHA-256, the deadline, the local recipe.
- **close a round** when every selected device uploaded, or at the deadline when at least
  ``min_devices`` did (stragglers and devices that went offline are left out; their late uploads
  are refused 4.03). Fewer by the deadline: the round opens again with a new selection (uploads
  already received for it still count), at most :data:`MAX_ATTEMPTS` times, then the job fails.
  A selected device that says in its own reported state that it will not upload in this attempt
  (:func:`out_of_round`) is not waited for: the round closes once every selected device uploaded
  or is out, with ``min_devices`` uploads, and opens again (or fails) as soon as the uploads and
  the devices that may still upload cannot make ``min_devices``, before the deadline.
- closing: FedAvg of the uploads weighted by their sample counts (cloud/fedavg.py), the
  federated threshold from their score summaries, the new float weights written into the
  template int8 model (cloud/tflitepatch.py: no TensorFlow), signed and published as version
  ``<base>+fl<job>.<round>`` and assigned (desired ``model/<role>``) to every eligible device;
  the new float weights are the next round's masters.

Devices fetch masters with ``GET /learn/masters/<sha256>`` (any device: content-addressed, the
SHA-256 comes from their authenticated desired state) and upload with ``POST /learn/<device>``
(the device itself, and only while it is selected in the open round, before the deadline).
"""

from __future__ import annotations

import logging
import math
import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.errors import AgentError, ModelError
from agent.learn.autoencoder import DenseAutoencoder
from agent.wire import records
from agent.wire.learning import (
    MAX_ROUND,
    LearningError,
    Masters,
    ModelUpdate,
    RoundTask,
    learn_key,
    parameter_count,
)
from agent.wire.statedoc import MAX_VALUE_BYTES, MODEL_NAME, Entry
from cloud import tflitepatch
from cloud.fedavg import CHECK_TOLERANCE
from cloud.learnstore import JobRow
from cloud.models import ModelRegistry
from cloud.retention import PAUSE
from cloud.storebase import PreconditionFailed, Storage

log = logging.getLogger("cloud.learning")

#: A round whose quorum is not met by its deadline opens again at most this many times.
MAX_ATTEMPTS = 3
#: The most an update's (un-noised, claimed) sample count weighs in FedAvg: a device trains on at
#: most agent.learn.local.MAX_WINDOWS windows, so a larger claim is a lie.
MAX_SAMPLES_WEIGHT = 2048
#: Standard deviations of the noise's norm above its mean that an honest update may reach: the
#: norm of P Gaussian coordinates of std sigma is about sigma * sqrt(P), give or take sigma / 2.
NORM_SLACK = 6.0
#: Seconds between ticks of :meth:`Coordinator.run`.
TICK = 1.0
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
#: Uploads :func:`prune_uploads` removes per transaction (about 5 KB each).
PRUNE_BATCH = 1000


class JobError(AgentError):
    """A job cannot start or go on (the message says why)."""


class UnknownJob(JobError):
    """No job has that number."""


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
        d = records.loads(row.doc)
        spec = dict(d["spec"])
        spec["devices"] = tuple(spec["devices"])
        spec.setdefault("gate", False)  # a job stored before the check runs without it
        return cls(row.id, JobSpec(**spec), JobState(**d["state"]), row.rev)

    def summary(self) -> dict[str, Any]:
        return {
            "job": self.id,
            **asdict(self.spec),
            **asdict(self.st),
            "out_counts": out_counts(self.st.out),
        }


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
    if isinstance(value, dict) and _is_int(value.get("job"), job):
        status = value.get("status")
        if (
            isinstance(status, str)
            and status in OUT_STATUSES
            and _is_int(value.get("round"), rnd)
            and (status == "refused" or _is_int(value.get("deadline"), math.ceil(deadline)))
        ):
            return status
    errors = reported.get(DESIRED_ERRORS)
    refusals = errors.value if errors is not None else None
    if version is not None and isinstance(refusals, dict):
        refusal = refusals.get(key)
        if isinstance(refusal, dict) and _is_int(refusal.get("version"), version):
            return NOT_APPLIED
    return None


def _is_int(value: Any, expected: int) -> bool:
    return type(value) is int and value == expected  # not a bool, a float or a bignum's repr


def out_counts(out: Mapping[str, str]) -> dict[str, int]:
    """How many devices are out for each reason, in the order of :data:`OUT_STATUSES`."""
    counts = Counter(out.values())
    order = [*OUT_STATUSES, NOT_APPLIED]
    return {why: counts[why] for why in sorted(counts, key=order.index)}


def _why(out: Mapping[str, str], sep: str = ",") -> str:
    return sep.join(f"{why}:{n}" for why, n in out_counts(out).items()) or "-"


class Coordinator:
    """Runs jobs over a storage (blocking calls; the CLI's process), a registry and a key."""

    def __init__(
        self,
        storage: Storage,
        registry: ModelRegistry | None = None,
        key: Ed25519PrivateKey | None = None,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.storage = storage
        self.registry = registry
        self.key = key
        self.clock = clock

    # -- starting -------------------------------------------------------------------------------
    def start(self, spec: JobSpec, masters: DenseAutoencoder) -> Job:
        """Record a new job whose first masters are ``masters`` (the float weights of ``spec``'s
        base version). Raises JobError."""
        spec.check()
        found = self.storage.model(spec.model, spec.base)
        if found is None:
            raise JobError(f"model {spec.model} {spec.base} is not published here")
        template = self.storage.model_file(spec.model, spec.base)
        if template is None:
            raise JobError(f"model {spec.model} {spec.base}: its file is missing")
        try:  # the template must take these weights: same graph, same widths
            tflitepatch.quantize_layers(template, _layers(masters))
        except ModelError as err:
            raise JobError(f"the masters do not fit {spec.model} {spec.base}: {err}") from None
        doc = masters_of(masters, spec.model)
        sha = doc.sha256()
        self.storage.put_learn_blob(sha, doc.to_cbor())
        st = JobState(masters=sha, incumbent=sha if spec.gate else "")
        now = self.clock()
        job_id = self.storage.create_learn_job(
            spec.model, lambda n: Job(n, spec, st).to_cbor(), now
        )
        log.info(
            "event=learn_job_started job=%d model=%s base=%s rounds=%d",
            job_id,
            spec.model,
            spec.base,
            spec.rounds,
        )
        return self.job(job_id)

    def job(self, job_id: int) -> Job:
        row = self.storage.learn_job(job_id)
        if row is None:
            raise UnknownJob(f"no learning job {job_id}")
        return Job.from_row(row)

    def stop(self, job_id: int) -> Job:
        """Stop a running job and withdraw its open round's tasks. A job stopped or failed
        already has them withdrawn again (a storage error may have cut the first withdrawal
        short, after the job was saved as ended: only ``learn stop`` retries it)."""
        while True:
            job = self.job(job_id)
            if job.st.state in ("stopped", "failed"):
                self._withdraw(job, self.clock())
                return job
            if job.st.state != "running":
                return job
            was_open = job.st.open
            job.st.state, job.st.open, job.st.error = "stopped", False, "stopped by an operator"
            if self._save(job):
                if was_open:
                    self._withdraw(job, self.clock())
                return self.job(job_id)

    # -- the loop -------------------------------------------------------------------------------
    def run(
        self, job_id: int, tick: float = TICK, progress: Callable[[Job], None] | None = None
    ) -> Job:
        """Tick the job until it ends (done, failed or stopped). Blocking: the storage is used
        from this thread only (SQLite's connection belongs to the thread that opened it)."""
        while True:
            job = self.tick(job_id)
            if progress is not None:
                progress(job)
            if job.st.state != "running":
                return job
            time.sleep(tick)

    def tick(self, job_id: int) -> Job:
        """At most one transition of the job (see the module docstring)."""
        job = self.job(job_id)
        if job.st.state != "running":
            return job
        now = self.clock()
        if job.st.open and not job.st.written:  # opened, and stopped before its tasks went
            return self._write_tasks(job, now)
        if not job.st.open:
            if job.st.round < job.spec.rounds or (
                job.st.round == job.spec.rounds and job.st.candidate
            ):  # a training round, or the round that checks the last one's model
                self._open(job, job.st.round + 1, 0, now)
            else:
                job.st.state = "done"
            return self._saved(job, now)
        st, needed, withdraw = job.st, job.spec.min_devices, False
        received = set(self.storage.learn_update_devices(job.id, st.round))
        selected = set(st.selected)
        waiting = selected - received
        out = self._out(job, waiting) if waiting else {}
        coming = len(waiting) - len(out)  # selected devices that may still upload
        late = now >= st.deadline
        if selected <= received or (len(received) >= needed and (late or coming == 0)):
            st.out = out
            if out and not late:
                log.info(
                    "event=learn_round_closed_early job=%d round=%d attempt=%d uploads=%d "
                    "out=%d why=%s",
                    job.id,
                    st.round,
                    st.attempt,
                    len(received),
                    len(out),
                    _why(out),
                )
            self._close(job, now, early=bool(out) and not late)
        elif late or len(received) + coming < needed:
            st.out = out
            by = "by the deadline" if late else "before the deadline"
            if st.attempt + 1 >= MAX_ATTEMPTS:
                st.state, st.open, withdraw = "failed", False, True
                st.error = (
                    f"round {st.round}: {len(received)} uploads {by}"
                    + (f", {len(out)} selected devices out ({_why(out, ', ')})" if out else "")
                    + f", {needed} needed, {MAX_ATTEMPTS} attempts"
                )
                log.warning("event=learn_job_failed job=%d error=%r", job.id, st.error)
            else:
                log.info(
                    "event=learn_round_reopened job=%d round=%d received=%d needed=%d early=%s "
                    "out=%d why=%s",
                    job.id,
                    st.round,
                    len(received),
                    needed,
                    str(not late).lower(),
                    len(out),
                    _why(out),
                )
                st.reopened.append(
                    {
                        "attempt": st.attempt,
                        "uploads": len(received),
                        "out": out_counts(out),
                        "early": not late,
                    }
                )
                # before the deadline, the devices that may still upload are selected again
                # (their round starts over: no privacy spent twice, a charged update is sent
                # as it is); left out, one that uploads later would be refused 4.03 and have
                # spent privacy on nothing
                keep = () if late else sorted(waiting - set(out))
                self._open(job, st.round, st.attempt + 1, now, keep)
        elif out != st.out:  # nothing to do yet, but who is out changed: learn status says so
            st.out = out
        else:
            return job
        return self._saved(job, now, withdraw)

    def _saved(self, job: Job, now: float, withdraw: bool = False) -> Job:
        """``job`` saved (compare-and-set) and read again; an attempt it opened gets its tasks
        written only once that save succeeded, as the tasks of a job it ended (``withdraw``)
        are withdrawn."""
        if not self._save(job):
            return self.job(job.id)
        if job.st.open and not job.st.written:
            return self._write_tasks(self.job(job.id), now)
        if withdraw:
            self._withdraw(job, now)
        return self.job(job.id)

    def _withdraw(self, job: Job, now: float) -> None:
        """The task of the job's last attempt withdrawn from its selected devices that did not
        upload (a desired value of null: the device cancels the round, and charges nothing
        for one not yet uploading), where the device's desired ``learn/<model>`` is still this
        job's: another job's task for the same model, written meanwhile, stays."""
        key = learn_key(job.spec.model)
        uploaded = set(self.storage.learn_update_devices(job.id, job.st.round))
        withdrawn = 0
        for device in job.st.selected:
            if device in uploaded:
                continue
            for _ in range(3):  # written meanwhile by someone else: read again
                doc = self.storage.desired(device)
                entry = doc.entries.get(key)
                value = entry.value if entry is not None else None
                if not isinstance(value, dict) or not _is_int(value.get("job"), job.id):
                    break
                try:
                    self.storage.put_desired(device, {key: None}, now, if_match=[doc.etag()])
                    withdrawn += 1
                    break
                except PreconditionFailed:
                    continue
        log.info(
            "event=learn_tasks_withdrawn job=%d round=%d state=%s devices=%d",
            job.id,
            job.st.round,
            job.st.state,
            withdrawn,
        )

    def _write_tasks(self, job: Job, now: float) -> Job:
        """Write the open attempt's task to each of its selected devices (the same value again
        changes nothing: a desired value's version moves only when it changes), keep the
        versions written, and save. A job that ended meanwhile (``learn stop`` from another
        process, which withdrew what it found written) gets no task, and the tasks written
        before its end was seen are withdrawn."""
        st, spec = job.st, job.spec
        if st.state != "running" or not st.open:
            return job
        value, key = self._task(job).to_value(), learn_key(spec.model)
        versions = {}
        for device in st.selected:
            doc, _ = self.storage.put_desired(device, {key: value}, now)
            versions[device] = doc.entries[key].version
        st.versions, st.written = versions, True
        if self._save(job):
            return self.job(job.id)
        fresh = self.job(job.id)
        if fresh.st.state != "running":
            job.st.state = fresh.st.state
            self._withdraw(job, now)
        return fresh

    def _task(self, job: Job) -> RoundTask:
        """The open attempt's task, as the job's state says it."""
        st, spec = job.st, job.spec
        return RoundTask(
            job.id,
            st.round,
            spec.base,
            st.masters,
            st.deadline,
            0 if st.round > spec.rounds else spec.epochs,  # after the last round: only the check
            spec.lr,
            spec.mu,
            spec.clip,
            spec.noise,
            check=st.incumbent if st.candidate else None,  # the masters wait for the check
        )

    def _out(self, job: Job, devices: set[str]) -> dict[str, str]:
        """The ``devices`` (selected in the open attempt, no upload yet) that say in their own
        reported state that they will not upload in it, and why (:func:`out_of_round`); two
        reported keys of each, in one read."""
        key = learn_key(job.spec.model)
        reports = self.storage.reported_keys(sorted(devices), [key, DESIRED_ERRORS])
        st, out = job.st, {}
        for device in sorted(devices):
            why = out_of_round(
                reports.get(device, {}),
                job.spec.model,
                job.id,
                st.round,
                st.deadline,
                st.versions.get(device),
            )
            if why is None:
                continue
            out[device] = why
            if st.out.get(device) != why:
                log.info(
                    "event=learn_device_out job=%d round=%d attempt=%d device=%s why=%s",
                    job.id,
                    st.round,
                    st.attempt,
                    device,
                    why,
                )
        return out

    def _save(self, job: Job) -> bool:
        ok = self.storage.update_learn_job(job.id, job.rev, job.to_cbor(), self.clock())
        if not ok:
            log.info("event=learn_job_changed job=%d action=read_again", job.id)
        return ok

    def eligible(self, spec: JobSpec) -> list[str]:
        known = {d.id for d in self.storage.devices()}
        if spec.devices:
            return sorted(d for d in spec.devices if d in known)
        return sorted(known)

    def _open(self, job: Job, rnd: int, attempt: int, now: float, keep: Sequence[str] = ()) -> None:
        """Open attempt ``attempt`` of round ``rnd``: select devices (``keep``, those of them
        still eligible, and the rest at random); their tasks are written once the job is saved
        (:meth:`_saved`)."""
        spec = job.spec
        pool = self.eligible(spec)
        if rnd > spec.rounds:
            # the round that only checks: among the devices that trained in the job (a device
            # answers no more such rounds than it has rounds charged: agent/learn/ledger.py)
            trained = {
                d
                for r in range(1, spec.rounds + 1)
                for d in self.storage.learn_update_devices(job.id, r)
            }
            pool = [d for d in pool if d in trained]
        if len(pool) < spec.min_devices:
            job.st.state, job.st.open = "failed", False
            job.st.error = f"{len(pool)} eligible devices, {spec.min_devices} needed" + (
                " (the check of the last round's model asks devices that trained in the job)"
                if rnd > spec.rounds
                else ""
            )
            return
        want = min(len(pool), max(spec.min_devices, math.ceil(spec.fraction * len(pool))))
        eligible = set(pool)
        kept = [d for d in keep if d in eligible][:want]
        again = set(kept)
        rest = [d for d in pool if d not in again]
        drawn = random.Random(f"{job.id}:{rnd}:{attempt}").sample(rest, want - len(kept))
        chosen = sorted([*kept, *drawn])
        deadline = now + spec.round_seconds
        if attempt > 0:  # the round again: a later whole second than the attempt before (the
            # devices report the deadline of the attempt they took: it tells the attempts apart)
            deadline = max(deadline, math.ceil(job.st.deadline) + 1.0)
        if attempt == 0:
            job.st.reopened = []
        job.st.round, job.st.attempt, job.st.open = rnd, attempt, True
        job.st.selected, job.st.deadline = chosen, float(math.ceil(deadline))
        job.st.versions, job.st.out, job.st.written = {}, {}, False
        log.info(
            "event=learn_round_opened job=%d round=%d attempt=%d selected=%d deadline=%d",
            job.id,
            rnd,
            attempt,
            len(chosen),
            job.st.deadline,
        )

    def _close(self, job: Job, now: float, early: bool = False) -> None:
        spec, rnd, st = job.spec, job.st.round, job.st
        blob = self.storage.learn_blob(st.masters)
        if blob is None:
            raise JobError(f"job {job.id}: the masters {st.masters[:12]} are missing")
        masters = Masters.from_cbor(blob, st.masters)
        count = parameter_count(masters.sizes)
        updates, refused, uploaded = [], [], set()
        for device, body in self.storage.learn_updates(job.id, rnd):
            uploaded.add(device)
            try:
                u = ModelUpdate.from_cbor(body, count)
                error = misfit(u, job)  # checked at upload too; kept for older rows
            except LearningError as err:  # stored only after these checks; kept for safety
                error = str(err)
            if error:
                refused.append(device)
                log.warning(
                    "event=learn_update_refused job=%d device=%s error=%r", job.id, device, error
                )
                continue
            updates.append(u)
        if not updates:
            st.state, st.open, st.error = "failed", False, "no usable uploads"
            return
        from cloud import fedavg  # numpy-heavy, only when a round closes

        entry: dict[str, Any] = {
            "round": rnd,
            "attempts": st.attempt + 1,
            "selected": len(st.selected),
            "uploads": len(updates),
            "refused": refused,
            "missing": sorted(set(st.selected) - uploaded),
            "samples": int(sum(u.samples for u in updates)),
            "closed": now,
        }
        if st.out:  # of the closing attempt; those of earlier attempts in "reopened"
            entry["out"] = out_counts(st.out)
        if early:
            entry["early"] = True
        if st.reopened:
            entry["reopened"], st.reopened = st.reopened, []
        if st.candidate:  # this round's uploads checked the masters against the incumbent
            recalls = [u.recall for u in updates if u.recall is not None]
            result = fedavg.check(recalls, spec.tolerance)
            entry["check"] = {"round": st.candidate, **result.to_value()}
            if result.passed:  # the summaries are of these masters: the model's own threshold
                model = DenseAutoencoder.from_vector(masters.weights, masters.sizes)
                info = st.candidate_info
                st.version = self._assign(job, model, st.candidate, info, updates, entry, now)
                st.incumbent = st.masters
            log.log(
                logging.INFO if result.passed else logging.WARNING,
                "event=learn_check job=%d round=%d model_of_round=%d passed=%s devices=%d "
                "recall=%.4f recall_incumbent=%.4f margin=%.4f",
                job.id,
                rnd,
                st.candidate,
                result.passed,
                result.devices,
                result.masters,
                result.incumbent,
                result.margin,
            )
            st.candidate, st.candidate_info = 0, {}
        if rnd <= spec.rounds:  # a training round (the one after the last only checks)
            info = {"round": rnd, "devices": len(updates), "samples": entry["samples"]}
            if st.incumbent and st.masters != st.incumbent:
                # the check failed: the round trained from a model the fleet will not run; its
                # aggregate is dropped and the next round starts again from the incumbent
                entry["dropped"] = True
                st.masters = st.incumbent
            else:
                vector = fedavg.fedavg(masters.weights, updates, max_samples=MAX_SAMPLES_WEIGHT)
                model = DenseAutoencoder.from_vector(vector, masters.sizes)
                new = masters_of(model, spec.model)
                self.storage.put_learn_blob(new.sha256(), new.to_cbor())
                if st.incumbent:  # checked by the next round before any device runs it
                    st.candidate, st.candidate_info = rnd, info
                else:  # no check: assigned now, its threshold from the round's summaries
                    st.version = self._assign(job, model, rnd, info, updates, entry, now)
                st.masters = new.sha256()
        st.history.append(entry)
        st.open = False
        if rnd >= spec.rounds and not st.candidate:
            st.state = "done"
        log.info(
            "event=learn_round_closed job=%d round=%d uploads=%d version=%s threshold=%s",
            job.id,
            rnd,
            len(updates),
            entry.get("version", "-"),
            f"{entry['threshold']:.4g}" if "threshold" in entry else "-",
        )

    def _assign(
        self,
        job: Job,
        model: DenseAutoencoder,
        rnd: int,
        info: dict[str, int],
        updates: Sequence[ModelUpdate],
        entry: dict[str, Any],
        now: float,
    ) -> str:
        """Publish ``model``, the aggregate of round ``rnd`` (``info``: its devices and
        samples), as ``<base>+fl<job>.<rnd>``, signed, with the fleet threshold from the score
        summaries of ``updates`` in its manifest; assign it to every eligible device and note
        both in the round's history ``entry``. Returns the version."""
        from cloud import fedavg

        spec = job.spec
        threshold = fedavg.fleet_threshold([u.scores for u in updates])
        version = version_for(spec.base, job.id, rnd)
        published = self._publish(spec, model, threshold, version, job.id, info)
        assignment = {"name": spec.model, "version": version, "sha256": published}
        for device in self.eligible(spec):
            self.storage.put_desired(device, {f"model/{spec.role}": assignment}, now)
        entry["threshold"], entry["version"] = threshold, version
        return version

    def _publish(
        self,
        spec: JobSpec,
        model: DenseAutoencoder,
        threshold: float,
        version: str,
        job: int,
        info: dict[str, int],
    ) -> str:
        if self.registry is None or self.key is None:
            raise JobError("closing a round needs the registry and the signing key")
        template = self.storage.model_file(spec.model, spec.base)
        base = self.storage.model(spec.model, spec.base)
        if template is None or base is None:
            raise JobError(f"model {spec.model} {spec.base} is gone")
        from agent.modelstore.signing import SignedManifest

        entry = dict(SignedManifest.from_cbor(base.manifest).entry)
        data = tflitepatch.quantize_layers(template, _layers(model))
        entry["version"] = version
        entry["threshold"] = {**dict(entry.get("threshold", {})), "value": round(threshold, 6)}
        entry["federated"] = {
            "job": job,
            "round": info.get("round", 0),
            "devices": info.get("devices", 0),
            "samples": info.get("samples", 0),
        }
        for stale in ("sha256", "size", "scores"):
            entry.pop(stale, None)
        existing = self.storage.model(spec.model, version)
        if existing is not None:  # published before a crash: the same round, keep it
            return SignedManifest.from_cbor(existing.manifest).sha256
        return self.registry.publish(data, spec.model, version, entry, self.key).sha256


def _layers(model: DenseAutoencoder) -> list[tuple[np.ndarray, np.ndarray]]:
    return [
        (np.asarray(w), np.asarray(b)) for w, b in zip(model.weights, model.biases, strict=True)
    ]


# -- retention ------------------------------------------------------------------------------------
def uploads_read_from(job: Job) -> int:
    """The lowest round of ``job`` whose uploads may still be read: retention removes the old
    uploads of the rounds below it (:func:`prune_uploads`) and keeps the others, however old.

    - An ended job (:data:`ENDED`): none is read any more; every round (no update names a round
      above MAX_ROUND).
    - A running job with the check (``incumbent``): round 1, so none goes. The round after the
      last, which only checks, is opened (and opened again) among the devices that uploaded in
      the job's training rounds: :meth:`Coordinator._open` reads which devices those uploads
      are of, until the job ends.
    - Any other running job: its current round (``round``, open, or closed and the next not
      opened yet). Only a round's close reads its uploads (FedAvg, the check), and a close that
      a crash cut short before its save is run again from the saved document, which still names
      that round: the document names round r + 1 only after the save that recorded r's close
      (:meth:`Coordinator.tick` makes one transition per save; the next round opens in a save
      of its own), and an upload is stored only for the round the document names as open.
    - A state this code does not know: round 1, nothing goes.
    """
    st = job.st
    if st.state in ENDED:
        return MAX_ROUND + 1
    if st.state != "running" or st.incumbent:
        return 1
    return max(st.round, 1)


def prune_uploads(
    storage: Storage,
    before: float,
    *,
    dry_run: bool = False,
    stop: threading.Event | None = None,
    batch: int = PRUNE_BATCH,
    pause: float = PAUSE,
) -> tuple[int, bool]:
    """Retention of the devices' uploads (docs/ops.md "Retention"; called by cloud/prunecli.py
    after :meth:`cloud.storebase.Storage.prune`): remove those received before ``before`` of the
    rounds below :func:`uploads_read_from` of their job, ``batch`` per transaction with
    ``pause`` seconds between two (an endpoint writing the same SQLite file goes first).
    Returns how many (``dry_run``: would go; nothing changes) and whether ``stop`` ended it
    first. A job document that does not decode keeps its uploads (one warning per prune)."""
    removed = 0
    for row in storage.learn_jobs():
        try:
            job = Job.from_row(row)
        except (AgentError, LookupError, TypeError, ValueError, AttributeError) as err:
            log.warning(
                "event=learn_prune_skipped job=%d reason=%r",
                row.id,
                " ".join(f"{type(err).__name__}: {err}".split())[:200],
            )
            continue
        below = uploads_read_from(job)
        if below <= 1:
            continue
        if dry_run:
            removed += storage.count_learn_updates(job.id, below, before)
            continue
        while True:
            if stop is not None and stop.is_set():
                return removed, True
            n = storage.delete_learn_updates(job.id, below, before, batch)
            removed += n
            if n < batch:
                break
            if pause > 0:
                time.sleep(pause)  # a writer waiting in its busy handler takes the lock now
    return removed, False


# -- the device-facing resources ------------------------------------------------------------------
class UploadRefused(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code  # "4.00", "4.03", "4.04"
        self.message = message


def accept_upload(storage: Storage, device: str, body: bytes, now: float) -> bool:
    """Check and store one upload (blocking; the endpoint's storage thread). True if new.
    Raises :class:`UploadRefused`."""
    try:
        head = ModelUpdate.from_cbor(body)
    except LearningError as err:
        raise UploadRefused("4.00", str(err)) from None
    row = storage.learn_job(head.job)
    if row is None:
        raise UploadRefused("4.04", f"no learning job {head.job}")
    job = Job.from_row(row)
    st = job.st
    if st.state != "running" or not st.open or st.round != head.round:
        raise UploadRefused("4.03", f"job {job.id} round {head.round} is not open")
    if device not in st.selected:
        raise UploadRefused("4.03", f"{device} is not selected in round {st.round}")
    if now > st.deadline:
        raise UploadRefused("4.03", f"round {st.round} closed at its deadline")
    blob = storage.learn_blob(st.masters)
    if blob is None:
        raise UploadRefused("4.04", "the round's masters are missing")
    count = parameter_count(Masters.from_cbor(blob).sizes)
    try:
        update = ModelUpdate.from_cbor(body, count)
    except LearningError as err:
        raise UploadRefused("4.00", str(err)) from None
    refusal = misfit(update, job)
    if refusal:
        raise UploadRefused("4.00", refusal)
    return storage.put_learn_update(job.id, head.round, device, body, now)


def norm_bound(clip: float, noise: float, parameters: int) -> float:
    """The largest L2 norm an honest update reaches, but with negligible probability: its delta
    clipped to ``clip``, plus Gaussian noise of std ``noise * clip`` on each of ``parameters``
    weights (norm about ``noise * clip * sqrt(parameters)``)."""
    return clip + noise * clip * (math.sqrt(parameters) + NORM_SLACK)


def misfit(update: ModelUpdate, job: Job) -> str:
    """Why ``update`` is not what the job's open round asked for: weights in a round that only
    checks or none in a training round, no check in a checked round, or weights beyond
    :func:`norm_bound` (:func:`over_norm`); "" if it is."""
    if (update.delta is None) != (job.st.round > job.spec.rounds):
        if update.delta is None:
            return f"round {job.st.round} trains: the update has no weights"
        return f"round {job.st.round} only checks: the update must carry no weights"
    if job.st.candidate and update.recall is None:
        return f"round {job.st.round} checks the masters: the update has no recall"
    return over_norm(update, job.spec)


def over_norm(update: ModelUpdate, spec: JobSpec) -> str:
    """Why ``update`` cannot come from a device that followed the round (its norm is beyond
    :func:`norm_bound`); "" if it can."""
    if update.delta is None:
        return ""
    delta = np.asarray(update.delta, dtype=np.float64)
    bound = norm_bound(spec.clip, spec.noise, delta.size)
    norm = float(np.linalg.norm(delta))
    if norm <= bound:
        return ""
    return (
        f"the update's L2 norm {norm:.4g} is over {bound:.4g}, what clip {spec.clip} and noise "
        f"{spec.noise} allow: train with the round's task"
    )
