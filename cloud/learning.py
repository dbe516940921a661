"""Federated training rounds at the endpoint: the round coordinator (docs/learning.md; the job
document and the devices' reports: cloud/learnjob.py; their uploads: cloud/learnuploads.py).

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
(the device itself, and only while it is selected in the open round, before the deadline:
cloud/learnuploads.py ``accept_upload``).
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.errors import ModelError
from agent.learn.autoencoder import DenseAutoencoder
from agent.wire.learning import (
    LearningError,
    Masters,
    ModelUpdate,
    RoundTask,
    learn_key,
    parameter_count,
)
from cloud import fedavg, tflitepatch
from cloud.learnjob import (
    DESIRED_ERRORS,
    Job,
    JobError,
    JobSpec,
    JobState,
    UnknownJob,
    masters_of,
    out_counts,
    out_of_round,
    same_int,
    version_for,
    why_text,
)
from cloud.learnuploads import misfit
from cloud.models import ModelRegistry
from cloud.storebase import PreconditionFailed, Storage

log = logging.getLogger("cloud.learning")

#: A round whose quorum is not met by its deadline opens again at most this many times.
MAX_ATTEMPTS = 3
#: The most an update's (un-noised, claimed) sample count weighs in FedAvg: a device trains on at
#: most agent.learn.local.MAX_WINDOWS windows, so a larger claim is a lie.
MAX_SAMPLES_WEIGHT = 2048
#: Seconds between ticks of :meth:`Coordinator.run`.
TICK = 1.0


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
        st, needed = job.st, job.spec.min_devices
        received = set(self.storage.learn_update_devices(job.id, st.round))
        selected = set(st.selected)
        waiting = selected - received
        out = self._out(job, waiting) if waiting else {}
        coming = len(waiting) - len(out)  # selected devices that may still upload
        late = now >= st.deadline
        was_out, st.out = st.out, out
        if selected <= received or (len(received) >= needed and (late or coming == 0)):
            if out and not late:
                log.info(
                    "event=learn_round_closed_early job=%d round=%d attempt=%d uploads=%d "
                    "out=%d why=%s",
                    job.id,
                    st.round,
                    st.attempt,
                    len(received),
                    len(out),
                    why_text(out),
                )
            try:
                self._close(job, now, early=bool(out) and not late)
            except fedavg.AggregationError as err:  # the uploads' summaries set no threshold for
                # the model the close publishes (none counts a plausible score): what the close
                # changed is dropped and the job fails, rather than raise at every tick
                job = self.job(job.id)
                job.st.state, job.st.open = "failed", False
                job.st.error = f"round {job.st.round}: {err}"
                log.warning("event=learn_job_failed job=%d error=%r", job.id, job.st.error)
        elif late or len(received) + coming < needed:
            by = "by the deadline" if late else "before the deadline"
            if st.attempt + 1 >= MAX_ATTEMPTS:
                st.state, st.open = "failed", False
                st.error = (
                    f"round {st.round}: {len(received)} uploads {by}"
                    + (f", {len(out)} selected devices out ({why_text(out, ', ')})" if out else "")
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
                    why_text(out),
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
        elif out == was_out:  # nothing to do yet; a change of who is out is saved (learn status)
            return job
        return self._saved(job, now)

    def _saved(self, job: Job, now: float) -> Job:
        """``job`` saved (compare-and-set) and read again; an attempt it opened gets its tasks
        written only once that save succeeded, as the tasks of a job it failed are withdrawn."""
        if not self._save(job):
            return self.job(job.id)
        if job.st.open and not job.st.written:
            return self._write_tasks(self.job(job.id), now)
        if job.st.state == "failed":
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
                if not isinstance(value, dict) or not same_int(value.get("job"), job.id):
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
        if spec.devices:  # a device named twice is one device (of the quorum too)
            return sorted(set(spec.devices) & known)
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
