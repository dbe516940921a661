"""The devices' uploads of federated rounds at the endpoint: taking one (``POST /learn/<device>``:
:func:`accept_upload`) and removing those nothing reads any more (retention: :func:`prune_uploads`)
(docs/learning.md, docs/ops.md "Retention"; the coordinator: cloud/learning.py).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from functools import partial

import numpy as np

from agent.wire.learning import MAX_ROUND, LearningError, Masters, ModelUpdate, parameter_count
from cloud import retention
from cloud.learnjob import ENDED, DamagedJob, Job, JobSpec
from cloud.retention import PAUSE
from cloud.storebase import Storage

log = logging.getLogger("cloud.learning")

#: Standard deviations of the noise's norm above its mean that an honest update may reach: the
#: norm of P Gaussian coordinates of std sigma is about sigma * sqrt(P), give or take sigma / 2.
NORM_SLACK = 6.0
#: Uploads :func:`prune_uploads` removes per transaction (about 5 KB each).
PRUNE_BATCH = 1000


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
        except DamagedJob as err:
            log.warning("event=learn_prune_skipped job=%d reason=%r", row.id, str(err))
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
            delete = partial(storage.delete_learn_updates, job.id, below, before, batch)
            n = retention.busy_retry(delete, "learn_updates")
            removed += n
            if n == 0:  # not "fewer than batch": a prune running at the same time (PostgreSQL
                # runs this after its prune lock) may have taken some of this batch's rows
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
    try:
        job = Job.from_row(row)
    except DamagedJob as err:
        raise UploadRefused("4.04", str(err)) from None
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
