"""The device's part in federated rounds (docs/learning.md).

The endpoint selects a device by writing the desired value ``learn/<model>``
(agent.wire.learning.RoundTask); :meth:`LearningClient.apply` takes it (StateSync calls it like
any desired key) and :meth:`LearningClient.run` does the round:

1. the masters ``GET /learn/masters/<sha256>``, checked against the SHA-256 the task names (in
   a checked round also the incumbent's weights, by the SHA-256 ``check`` names);
2. the check, when the task asks for one (the fraction of synthetic faults the masters and the
   incumbent each detect, agent.learn.local.fault_recall), then training on the device's own
   normal windows: the model inputs of the rows the detector judged normal, the most recent
   ``[learn] windows`` of them (:class:`WindowRing`, fed by ``Detector.normal_sink``), in a
   separate process (agent/learn/worker.py) at nice 19 with a bounded address space, paused
   (SIGSTOP) while the agent's event loop runs late by more than ``max_lag_ms`` and killed at
   the round's deadline: a round never holds up sampling or detection; a task with ``epochs`` 0
   only checks: nothing trained, nothing charged to the privacy ledger, the upload carries the
   summary and the check and no weights;
3. the upload ``POST /learn/<device>`` over the same CoAP transport and OSCORE context as
   everything else, only while the link is not offline, retried until the deadline.

The upload is kept on disk (``learn-<job>-<round>.cbor`` in the data directory) until the endpoint
answered it (an attempt that expired keeps it for the round opened again, until a later round
starts), and rounds already done are remembered (``learn.json``): a restart or a re-opened
attempt re-sends the same noisy update (no new privacy cost), and a round charged to the privacy
ledger is never trained twice; an update written but never charged (the agent stopped between)
is made again under the task in force, as nothing of it left. The reported key
``learn/<model>`` says where the device is: ``{job, round, status[, samples]}``, status one of
``waiting`` (too few windows yet, or the masters not served: ``reason`` says which),
``training``, ``uploading``, ``uploaded``, ``refused``, ``expired``, ``failed``, ``withdrawn``
(the endpoint withdrew the task while its round ran).

Each model's round runs in a task of its own: a round never waits for another model's, and a
desired value that replaces or withdraws a task cancels its round at once (cleanly: the training
process is killed, its job file removed, and so is an update it wrote that is not charged yet; a
round the privacy ledger charged keeps its update file for a re-opened attempt, like one that
expired). A task's deadline is capped at :data:`MAX_AHEAD` after it came, on the monotonic clock
(:meth:`LearningClient._deadline`). Which rounds ended is compared within a job only: job ids name
jobs, they do not order them (one task with a huge id must not end every later job); the privacy
ledger, which charges every (job, round) uploaded whatever its id, is what keeps a renamed job from
costing nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import secrets
import signal
import sys
import time
from collections.abc import Callable, Collection
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from agent.errors import SyncError
from agent.files import read_json, write_atomic
from agent.learn.ledger import LEDGER_FILE, BudgetExceeded, PrivacyLedger
from agent.learn.settings import LearnSettings
from agent.learn.worker import write_job
from agent.sync.transport import CoapTransport, Endpoints
from agent.wire.batch import CF_CBOR
from agent.wire.learning import (
    KEY_PREFIX,
    MAX_BODY_BYTES,
    REFUSALS,
    LearningError,
    Masters,
    ModelUpdate,
    RoundTask,
)
from drivers.clock import Clock

log = logging.getLogger("agent.learn")

# Timing (seconds); tests may shorten them.
RETRY = 5.0  # between attempts of a fetch or an upload that failed
WAIT_WINDOWS = 10.0  # between looks at the ring while it holds too few windows
LAG_PROBE = 0.25  # the event loop's lateness is measured this often
PAUSE_HOLD = 2.0  # a paused worker stays paused at least this long
REQUEST_DEADLINE = 60.0
#: A task's deadline is capped at now + this: the endpoint opens rounds of at most 7 days
#: (cloud/learning.py, ``--deadline``; docs/learning.md uses 600 s), plus an hour of clock skew.
#: A task may say up to 2**40 s; a round stuck that long would hold its model's learning.
MAX_AHEAD = 7 * 86400.0 + 3600.0
DONE_FILE = "learn.json"
FINAL = ("uploaded", "refused", "expired", "failed")
MAX_DETAILS = 16  # keys of one learn.json entry that are read


class WindowRing:
    """The most recent ``capacity`` normal windows (flattened model inputs), in order."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._data: np.ndarray | None = None
        self._next = 0
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def add(self, window: np.ndarray) -> None:
        w = np.asarray(window, dtype=np.float32).reshape(-1)
        if self._data is None or self._data.shape[1] != w.size:
            if self._data is not None:
                log.info("event=learn_windows_reset width=%d was=%d", w.size, self._data.shape[1])
            self._data = np.zeros((self.capacity, w.size), dtype=np.float32)
            self._next = self._count = 0  # another model's inputs: start again
        self._data[self._next] = w
        self._next = (self._next + 1) % self.capacity
        self._count = min(self._count + 1, self.capacity)

    def snapshot(self) -> np.ndarray:
        """A copy, oldest first."""
        if self._data is None or self._count == 0:
            return np.zeros((0, 0), dtype=np.float32)
        if self._count < self.capacity:
            return self._data[: self._count].copy()
        return np.concatenate([self._data[self._next :], self._data[: self._next]])


def _round_name(task: RoundTask) -> str:
    """The name of a round's files in the data directory (``.cbor``: its update; ``.npz``: the
    training process's job; ``.cbor.tmp``: an update being written)."""
    return f"learn-{task.job}-{task.round}"


def _drop_other_updates(data_dir: Path, keep: Collection[str]) -> None:
    """Updates of earlier rounds kept for a re-opened attempt: a new round ends their use. The
    files of the rounds named in ``keep`` (:func:`_round_name`: the rounds running) stay; a job
    file or a half-written update that a cancelled round or a crash left goes too."""
    for old in data_dir.glob("learn-*-*"):
        stem, dot, ext = old.name.partition(".")
        if dot and ext in ("cbor", "cbor.tmp", "npz") and stem not in keep:
            _unlink(old)


def _trained(out: Path, task: RoundTask) -> bool:
    """Whether ``out`` holds this round's update, made before a restart: uploaded as it is once
    the round is charged (recorded). A file that is not one (damaged at rest, another round's,
    weights for a round that only checks or none for one that trains) is removed: nothing leaves
    the device in a training exchange but a checked update, and no weights but charged ones."""
    try:
        with open(out, "rb") as f:
            data = f.read(MAX_BODY_BYTES + 1)
        update = ModelUpdate.from_cbor(data)
        if (update.job, update.round) != (task.job, task.round):
            raise LearningError(f"the update of job {update.job} round {update.round}")
        if (update.delta is None) != task.evaluate:
            raise LearningError("weights in a round that only checks, or none in one that trains")
        return True
    except FileNotFoundError:
        return False
    except (OSError, LearningError) as err:
        log.warning("event=learn_update_unreadable path=%s error=%r", out, str(err)[:200])
        _unlink(out)
        return False


def _unlink(path: Path) -> None:
    """Remove ``path`` if it is there (gone already, or not removable: nothing to do)."""
    with contextlib.suppress(OSError):
        path.unlink()


def _ended_round(st: dict[str, Any]) -> dict[str, Any] | None:
    """A ``learn.json`` entry of an ended round as :meth:`LearningClient._set` writes it (job,
    round, the status, the deadline, and at most MAX_DETAILS plain details), or None when it is
    not one."""
    if not all(_whole(st.get(k)) for k in ("job", "round")):
        return None
    kept: dict[str, Any] = {"job": st["job"], "round": st["round"], "status": st["status"]}
    for key, value in list(st.items())[:MAX_DETAILS]:
        if key in kept:
            continue
        if isinstance(value, str):
            kept[str(key)[:32]] = value[:200]
        elif _whole(value) or (isinstance(value, float) and math.isfinite(value)):
            kept[str(key)[:32]] = value
    return kept


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 1 << 53


class LearningClient:
    """One device's rounds (see the module docstring)."""

    def __init__(
        self,
        settings: LearnSettings,
        transport: CoapTransport,
        endpoints: Endpoints,
        clock: Clock,
        *,
        device_id: str,
        data_dir: Path,
        window_shape: Callable[[], tuple[int, int] | None],
        link_state: Callable[[], str | None] = lambda: None,
        changed: Callable[[], None] = lambda: None,
        lane: int = 0,
    ) -> None:
        self.settings = settings
        self.transport = transport
        self.endpoints = endpoints
        self.clock = clock
        self.device_id = device_id
        self.data_dir = Path(data_dir)
        self.window_shape = window_shape  # (steps, channels) of the running anomaly model
        self.link_state = link_state
        self.changed = changed  # tell StateSync the reported learn/<model> moved
        self.lane = lane
        self.ring = WindowRing(settings.windows)
        self.ledger = PrivacyLedger(
            self.data_dir / LEDGER_FILE, settings.epsilon_budget, settings.delta
        )
        self._tasks: dict[str, RoundTask] = {}  # the rounds to take, as the endpoint wrote them
        self._until: dict[tuple[int, int], float] = {}  # (job, round): the cap, time.monotonic()
        self._rounds: dict[str, tuple[RoundTask, asyncio.Task[None]]] = {}  # running, per model
        self._why: dict[str, str] = {}  # why a model's round was cancelled
        self._status: dict[str, dict[str, Any]] = {}
        self._wake = asyncio.Event()
        self._lag_ms = 0.0
        self.paused = 0  # times the worker was paused under load
        self.rounds = 0  # rounds uploaded since start
        #: the weights fetched last, by SHA-256 (a checked round's incumbent is usually the
        #: masters of a round this device took before: not fetched again)
        self._fetched: dict[str, Masters] = {}
        self._load_done()

    # -- state -----------------------------------------------------------------------------------
    def _load_done(self) -> None:
        """The rounds that ended here (``learn.json``), each as :meth:`_set` wrote it; an entry
        that is not one is dropped, with a line (its round may be taken again; one the privacy
        ledger has charged is not trained again, :meth:`_round`)."""
        path = self.data_dir / DONE_FILE
        try:
            raw = read_json(path)
        except FileNotFoundError:
            return
        except (OSError, ValueError) as err:
            log.warning("event=learn_state_unreadable path=%s error=%r", path, str(err))
            return
        entries = raw.items() if isinstance(raw, dict) else ()
        for model, st in entries:
            if isinstance(st, dict) and st.get("status") not in FINAL:
                continue  # a round in progress when it was saved: taken up again
            kept = _ended_round(st) if isinstance(st, dict) else None
            if kept is None:
                log.warning("event=learn_state_dropped path=%s model=%.64r", path, model)
            else:
                self._status[str(model)] = kept
        if not isinstance(raw, dict):
            log.warning("event=learn_state_unreadable path=%s error='not a JSON object'", path)

    def _set(self, model: str, task: RoundTask, status: str, **extra: Any) -> None:
        self._status[model] = {
            "job": task.job,
            "round": task.round,
            "deadline": math.ceil(self._deadline(task)),
            "status": status,
            **extra,
        }
        if status in FINAL:
            text = json.dumps(self._status, sort_keys=True).encode()
            try:
                write_atomic(self.data_dir / DONE_FILE, text)
            except OSError as err:
                log.warning("event=learn_state_unsaved error=%r", str(err))
        self.changed()

    def _done(self, model: str, task: RoundTask) -> bool:
        """Whether ``task`` needs nothing more: a later round of its job ended here, or this one
        did. An attempt of this round that expired or failed is tried again when the endpoint
        opens the round again (it does, with a later deadline, while too few devices uploaded);
        an upload or a refusal stands.

        Another job than the last one ended is never done: job ids are names the endpoint gives,
        not an order (a task with a huge id, or an endpoint whose storage started again, must
        not end every later job; it did, across restarts). A stale round of an earlier job the
        endpoint sends again is taken: the privacy ledger keeps it from spending anything twice
        (a charged round whose update is gone fails, :meth:`_round`; an uncharged one is charged
        in full, as any new round would be)."""
        st = self._status.get(model)
        if st is None or st.get("status") not in FINAL:
            return False
        if st["job"] != task.job:
            return False
        if st["round"] != task.round:
            return bool(st["round"] > task.round)
        if st["status"] in ("uploaded", "refused"):
            return True
        ended = st.get("deadline")  # absent in a file an older release wrote: that round stands
        if not isinstance(ended, (int, float)) or isinstance(ended, bool):
            return True
        return ended >= math.ceil(self._deadline(task))  # capped as the status says it

    def _epsilon(self) -> float | None:
        spent = self.ledger.spent()
        return round(spent, 4) if math.isfinite(spent) else None  # None: unknown or unbounded

    def reported(self) -> dict[str, Any]:
        eps = self._epsilon()
        return {KEY_PREFIX + m: {**st, "epsilon_spent": eps} for m, st in self._status.items()}

    def status(self) -> dict[str, Any]:
        return {
            "windows": len(self.ring),
            "rounds": self.rounds,
            "paused": self.paused,
            "epsilon_spent": self._epsilon(),
            "epsilon_budget": self.settings.epsilon_budget,
            "models": {m: dict(st) for m, st in self._status.items()},
        }

    # -- desired state ---------------------------------------------------------------------------
    def apply(self, model: str, value: Any) -> None:
        """A desired ``learn/<model>``: None ends taking part; raises ValueError if malformed.
        A task that replaces the one whose round runs, or None, cancels that round."""
        if value is None:
            self._tasks.pop(model, None)
            self._cancel(model, "withdrawn by the endpoint")
            self._wake.set()
            return
        if not self.settings.enabled:
            raise ValueError("[learn] enabled = false: this device takes no part in rounds")
        try:
            task = RoundTask.from_value(value)
        except LearningError as err:
            raise ValueError(str(err)) from None
        if self._tasks.get(model) == task:
            return  # the same task again: its round goes on
        latest = float(math.ceil(time.time() + MAX_AHEAD))
        self._until[(task.job, task.round)] = time.monotonic() + MAX_AHEAD
        if task.deadline > latest:
            log.warning(
                "event=learn_deadline_capped model=%s job=%d round=%d deadline=%d cap=%d",
                model,
                task.job,
                task.round,
                task.deadline,
                latest,
            )
        self._tasks[model] = task
        live = {(t.job, t.round) for t in self._tasks.values()}
        self._until = {k: v for k, v in self._until.items() if k in live}
        self._cancel(model, f"replaced by job {task.job} round {task.round}")
        self._wake.set()

    def _cancel(self, model: str, why: str) -> None:
        """Cancel the round running for ``model`` (it ends at its next await; :meth:`run` starts
        the model's next one once it did)."""
        running = self._rounds.get(model)
        if running is None or running[1].done():
            return
        task = running[0]
        log.info(
            "event=learn_round_cancelled model=%s job=%d round=%d why=%r",
            model,
            task.job,
            task.round,
            why,
        )
        self._why[model] = why
        running[1].cancel(why)

    # -- the loop --------------------------------------------------------------------------------
    async def run(self) -> None:
        """Start each model's round in a task of its own, one at a time per model, and never two
        rounds of one (job, round) at once (two models named with one job would otherwise train
        two noisy updates the ledger charges once)."""
        lag = asyncio.create_task(self._measure_lag())
        try:
            while True:
                self._wake.clear()
                for model, (_, running) in list(self._rounds.items()):
                    if running.done():
                        del self._rounds[model]
                busy = {(t.job, t.round) for t, _ in self._rounds.values()}
                for model, task in list(self._tasks.items()):
                    if model in self._rounds or (task.job, task.round) in busy:
                        continue
                    if self._done(model, task):
                        continue
                    running = asyncio.create_task(
                        self._round_task(model, task), name=f"learn-{model}"
                    )
                    running.add_done_callback(lambda _: self._wake.set())
                    self._why.pop(model, None)
                    self._rounds[model] = (task, running)
                    busy.add((task.job, task.round))
                await self._wake.wait()
        finally:
            lag.cancel()
            rounds = [running for _, running in self._rounds.values()]
            for running in rounds:
                running.cancel()
            with contextlib.suppress(BaseException):
                await asyncio.gather(*rounds, return_exceptions=True)
            self._rounds.clear()

    async def _round_task(self, model: str, task: RoundTask) -> None:
        """One round, ended with a final status whatever happens to it (a round that ended
        without one would be started again at once)."""
        try:
            await self._round(model, task)
        except asyncio.CancelledError:
            why = self._why.pop(model, None)  # None: the agent stops
            st = self._status.get(model, {})
            mine = (st.get("job"), st.get("round")) == (task.job, task.round)
            if why is not None and mine and st.get("status") not in FINAL:
                self._set(model, task, "withdrawn", reason=why)
            raise
        except Exception as err:  # a disk error, a bug: this round fails, the others go on
            log.error(
                "event=learn_round_error model=%s job=%d round=%d error=%r",
                model,
                task.job,
                task.round,
                f"{type(err).__name__}: {err}"[:200],
            )
            self._set(model, task, "failed", error=f"{type(err).__name__}: {err}"[:120])
            return
        st = self._status.get(model, {})
        if (st.get("job"), st.get("round")) != (task.job, task.round) or st.get(
            "status"
        ) not in FINAL:
            self._set(model, task, "failed", error="the round ended without a result")

    def _reason(self, model: str) -> Any:
        return self._status.get(model, {}).get("reason")

    def _waiting(self, model: str, task: RoundTask, reason: str, **extra: Any) -> None:
        """Report the round as waiting for ``reason`` (once per reason: not at every retry)."""
        st = self._status.get(model, {})
        now = (st.get("job"), st.get("round"), st.get("status"), st.get("reason"))
        if now != (task.job, task.round, "waiting", reason):
            log.info(
                "event=learn_waiting model=%s job=%d round=%d reason=%r",
                model,
                task.job,
                task.round,
                reason,
            )
            self._set(model, task, "waiting", reason=reason, **extra)

    async def _measure_lag(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            start = loop.time()
            await asyncio.sleep(LAG_PROBE)
            self._lag_ms = max(0.0, (loop.time() - start - LAG_PROBE) * 1000.0)

    def _deadline(self, task: RoundTask) -> float:
        """The task's deadline, capped at MAX_AHEAD after it came: that cap is counted on the
        monotonic clock, so a wall clock set after the task came (it read 1970, or a stale
        fake-hwclock time) moves the cap with it instead of ending the round at once."""
        until = self._until.get((task.job, task.round), math.inf)
        return min(task.deadline, time.time() + until - time.monotonic())

    def _expired(self, task: RoundTask) -> bool:
        # the deadline is the endpoint's wall clock, not the agent's (scaled in simulations)
        return time.time() > self._deadline(task)

    async def _round(self, model: str, task: RoundTask) -> None:
        out = self.data_dir / f"{_round_name(task)}.cbor"
        keep = {_round_name(t) for t, _ in self._rounds.values()} | {_round_name(task)}
        await asyncio.to_thread(_drop_other_updates, self.data_dir, keep)
        ledger = self.ledger
        if task.evaluate:  # only checks: no weights leave, nothing is charged; answered at most
            # once per round charged (ledger.check_only), recorded before its upload leaves
            may = partial(ledger.check_only, task.job, task.round)
            record = partial(ledger.check_only, task.job, task.round, True)
            spent, gone = "checked", "answered already; its upload is gone"
        else:  # durably charged before the first byte of the update leaves
            may = partial(ledger.check, task.job, task.round, task.noise)
            record = partial(ledger.charge, task.job, task.round, task.noise)
            spent, gone = "charged", "charged already; its update is gone"
        try:
            may()  # before any training
        except BudgetExceeded as err:
            self._refuse(model, task, out, str(err))
            return
        done = await asyncio.to_thread(_trained, out, task)
        charged = ledger.key(task.job, task.round) in getattr(ledger, spent)
        if done and not charged:
            # trained before the agent stopped, never recorded, so nothing of it left: the task
            # in force may not be the one it was trained under (another noise), so it is made
            # again under this one rather than charged at a noise it was not made with
            await asyncio.to_thread(_unlink, out)
            done = False
        if not done and charged:
            # charged (answered), so an upload of it may have left already: a second one, made
            # anew (trained and noised, or checked on the newest windows), would release what
            # the ledger does not count
            self._set(model, task, "failed", error=gone)
            return
        if not done and not await self._train(model, task, out):
            return
        recorded = asyncio.ensure_future(asyncio.to_thread(record))
        try:
            await asyncio.shield(recorded)
        except asyncio.CancelledError:
            # cancelled (the task replaced or withdrawn) while the ledger records the round in
            # its thread, which goes on: the round ends once that did, so that the next round
            # finds it charged and sends this update (not charged, it makes one of its own)
            with contextlib.suppress(Exception):
                await recorded
            raise
        except BudgetExceeded as err:
            self._refuse(model, task, out, str(err))
            return
        except OSError as err:
            log.warning("event=learn_budget_unsaved error=%r", str(err))
            self._set(model, task, "failed", error=f"privacy ledger not written: {err}")
            return
        await self._upload(model, task, out)

    def _refuse(self, model: str, task: RoundTask, out: Path, why: str) -> None:
        log.warning("event=learn_round_refused job=%d round=%d error=%r", task.job, task.round, why)
        self._set(model, task, "refused", error=why)
        _unlink(out)

    async def _train(self, model: str, task: RoundTask, out: Path) -> bool:
        while len(self.ring) < self.settings.min_windows:
            if self._expired(task):
                self._set(model, task, "expired", windows=len(self.ring))
                return False
            self._waiting(model, task, "windows", windows=len(self.ring))
            await self.clock.sleep(WAIT_WINDOWS)
        masters = await self._masters(model, task, task.masters)
        if masters is None:
            return False
        incumbent = None
        if task.check is not None:
            incumbent = await self._masters(model, task, task.check)
            if incumbent is None:
                return False
            if incumbent.sizes != masters.sizes:
                self._set(model, task, "failed", error="the incumbent does not fit the masters")
                return False
        shape = self.window_shape()
        windows = self.ring.snapshot()
        if len(windows) < self.settings.min_windows:  # the ring started again meanwhile
            return await self._train(model, task, out)
        if shape is None or windows.shape[1] != shape[0] * shape[1]:
            self._set(model, task, "failed", error="the running model's windows do not fit")
            return False
        if masters.sizes[0] != windows.shape[1]:
            self._set(model, task, "failed", error="the masters do not take these windows")
            return False
        self._set(model, task, "training", windows=len(windows))
        job = self.data_dir / f"{_round_name(task)}.npz"
        written = asyncio.ensure_future(
            asyncio.to_thread(
                write_job,
                job,
                masters.weights,
                masters.sizes,
                windows.reshape(len(windows), *shape),
                task.to_value(),
                secrets.randbits(63),
                None if incumbent is None else incumbent.weights,
            )
        )
        ok = False
        try:
            await asyncio.shield(written)
            ok = await self._run_worker(task, job, out)
        finally:
            # cancelled (the task replaced or withdrawn): the job file holds the windows, and
            # its thread may still be writing it; a killed worker may leave a half update, or a
            # whole one written before the round ended: not charged (recorded), it never leaves
            # (a task for this round sent again, with another noise, would charge it at its own)
            with contextlib.suppress(Exception):
                await written
            for path in (job, out.with_name(out.name + ".tmp"), *(() if ok else (out,))):
                _unlink(path)
        if not ok:
            self._set(model, task, "expired" if self._expired(task) else "failed")
        return ok

    async def _masters(self, model: str, task: RoundTask, sha256: str) -> Masters | None:
        """The weights whose SHA-256 the task names (the round's masters, or the incumbent a
        checked round compares them with), asked for until the deadline; while they do not
        come, the round is reported ``waiting`` with the reason (the endpoint's answer, the link
        offline)."""
        what = "masters" if sha256 == task.masters else "incumbent"
        if sha256 in self._fetched:
            return self._fetched[sha256]
        while not self._expired(task):
            why = f"{what}: the link is offline"
            if self.link_state() != "offline":
                uri = f"{self.endpoints.current}/learn/masters/{sha256}"
                try:
                    resp = await self.transport.request(
                        "GET", uri, accept=CF_CBOR, deadline=REQUEST_DEADLINE, lane=self.lane
                    )
                    if resp.success:
                        doc = Masters.from_cbor(resp.payload, sha256)
                        # kept: this round's two and the last round's masters at most
                        keep = {task.masters, task.check}
                        self._fetched = {k: v for k, v in self._fetched.items() if k in keep}
                        self._fetched[sha256] = doc
                        return doc
                    why = f"{what}: the endpoint answered {resp.dotted}"
                    level = logging.WARNING if self._reason(model) != why else logging.DEBUG
                    log.log(level, "event=learn_masters_refused code=%s", resp.dotted)
                except SyncError as err:
                    why = f"{what}: {err}"[:120]
                    log.info("event=learn_masters_failed error=%r", str(err))
                except LearningError as err:
                    self._set(model, task, "failed", error=str(err)[:120])
                    return None
            self._waiting(model, task, why)
            await self.clock.sleep(RETRY)
        self._set(model, task, "expired")
        return None

    async def _run_worker(self, task: RoundTask, job: Path, out: Path) -> bool:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "agent.learn.worker",
            str(job),
            str(out),
            "--memory-mb",
            str(self.settings.memory_mb),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        # read as it comes (a worker whose stderr fills the pipe would block until the deadline),
        # the last STDERR_KEPT bytes kept
        said = asyncio.create_task(_tail(proc.stderr))
        stopped = False
        try:
            while proc.returncode is None:
                if self._expired(task):
                    proc.kill()
                    break
                busy = self._lag_ms > self.settings.max_lag_ms
                if busy and not stopped:
                    proc.send_signal(signal.SIGSTOP)
                    stopped, self.paused = True, self.paused + 1
                    log.info("event=learn_paused lag_ms=%.0f", self._lag_ms)
                elif stopped and not busy:
                    proc.send_signal(signal.SIGCONT)
                    stopped = False
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(PAUSE_HOLD if stopped else LAG_PROBE):
                        await proc.wait()
        except BaseException:  # cancelled (the task replaced or withdrawn, the agent stopping)
            said.cancel()
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            with contextlib.suppress(Exception):
                await proc.wait()  # reaped: no half-dead worker beside the next round's
            raise
        finally:
            if stopped and proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGCONT)
        code = await proc.wait()
        err = (await said).decode("utf-8", "replace").strip()
        if code != 0 or not await asyncio.to_thread(out.exists):
            log.warning("event=learn_training_failed code=%s error=%r", code, err[-200:])
            return False
        return True

    async def _upload(self, model: str, task: RoundTask, out: Path) -> None:
        body = await asyncio.to_thread(out.read_bytes)
        self._set(model, task, "uploading", bytes=len(body))
        while not self._expired(task):
            why = "the link is offline"
            if self.link_state() != "offline":
                uri = f"{self.endpoints.current}/learn/{self.device_id}"
                try:
                    resp = await self.transport.request(
                        "POST",
                        uri,
                        body,
                        content_format=CF_CBOR,
                        deadline=REQUEST_DEADLINE,
                        lane=self.lane,
                    )
                except SyncError as err:
                    why = str(err)[:120]
                    log.info("event=learn_upload_failed error=%r", str(err))
                else:
                    if resp.success:
                        self.rounds += 1
                        self._set(model, task, "uploaded", bytes=len(body))
                        log.info(
                            "event=learn_uploaded job=%d round=%d bytes=%d",
                            task.job,
                            task.round,
                            len(body),
                        )
                        break
                    if resp.dotted in REFUSALS:  # this round will not take it
                        why = resp.payload.decode("utf-8", "replace")[:120]
                        self._set(model, task, "refused", code=resp.dotted, error=why)
                        log.warning("event=learn_upload_refused code=%s error=%r", resp.dotted, why)
                        break
                    why = f"the endpoint answered {resp.dotted}"
            if self._reason(model) != why:  # uploading still, retried: why it has not gone yet
                self._set(model, task, "uploading", bytes=len(body), reason=why)
            await self.clock.sleep(RETRY)
        else:
            # kept: if the endpoint opens the round again, this same update goes (it may have
            # left already; another one, noised anew, would spend privacy twice)
            self._set(model, task, "expired")
            return
        _unlink(out)


STDERR_KEPT = 4096  # bytes of a training worker's stderr kept for the log (its last line or so)


async def _tail(stream: asyncio.StreamReader | None) -> bytes:
    """The last :data:`STDERR_KEPT` bytes of ``stream``, read to its end."""
    kept = bytearray()
    while stream is not None and (chunk := await stream.read(65536)):
        kept += chunk
        del kept[:-STDERR_KEPT]
    return bytes(kept)
