"""Model assignment: the cloud names a model version per role, the agent fetches and swaps it in.

Roles: ``anomaly`` (the detector's autoencoder), ``classifier`` (the fault classifier) and
``lightweight`` (the lite anomaly model the policy switches to on a slow device or a poor link).
Desired state carries them as ``model/<role>`` = ``{"name", "version", ? "sha256"}``.

:meth:`ModelManager.assign` does, for one role:

1. **fetch** -- :meth:`ModelCache.get <agent.modelstore.cache.ModelCache.get>`: a local hit,
   a shipped model, or a verified download (refused models raise ModelError; link failures
   SyncError);
2. **load** -- the interpreter, from the cache's memory tier;
3. **warm up** -- one invoke on a zero window: finite output of the manifest's shape;
4. **swap** -- ``anomaly`` and ``classifier`` go into the running detector:
   :meth:`Detector.check_swap <agent.detect.detector.Detector.check_swap>` checks the features
   and :meth:`Detector.warm_up <agent.detect.detector.Detector.warm_up>` warms the model up again
   on the newest real window (each a loop step of its own) before the cache index is written, and
   :meth:`Detector.install <agent.detect.detector.Detector.install>` puts them in between two
   feeds; ``lightweight`` is kept loaded and pinned, ready for a tier switch (``on_ready`` tells
   the runtime).

Any failure before the swap is a **rollback**: the running model stays, nothing is pinned for the
refused version, and :meth:`ModelManager.reported` says ``status: failed`` with the error (the
runtime puts it into reported state as ``model/<role>``, so the endpoint blocks that version). A
link failure is not a refusal: :meth:`assign` raises SyncError and the runtime tries again later;
nor is the device's own condition (NotNow: e.g. the version evicted under disk pressure while
it was loaded or before its commit pinned it, or the cache index that cannot be written: a full
disk, an I/O error).

The manager pins the models every role uses now, so the cache never evicts them, and marks the
detector's models in use.

Logging policy: info for an assignment applied or rolled back.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections import Counter, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from agent.detect.detector import Detector
from agent.detect.inference import TFLiteModel
from agent.detect.swap import CheckedSwap, entry_features
from agent.errors import ModelError, NotNow, SyncError
from agent.modelstore.cache import CachedModel, ModelCache, Ref
from agent.modelstore.floors import Floors
from agent.sync.backoff import full_jitter
from drivers.clock import Clock

log = logging.getLogger(__name__)

ROLES = ("anomaly", "classifier", "lightweight")
HISTORY = 32  # swaps kept for status
DURABLE_WAIT = 30.0  # seconds close() waits for the post-swap writes still running
_KIND = {"anomaly": "anomaly", "classifier": "classifier", "lightweight": "anomaly"}


@dataclass(frozen=True)
class Assignment:
    role: str
    name: str
    version: str | None = None
    sha256: str | None = None
    desired: int | None = None  # the desired-state version of model/<role>, for the report

    @classmethod
    def from_desired(
        cls, role: str, value: Mapping[str, Any], desired: int | None = None
    ) -> Assignment:
        """From a desired ``model/<role>`` value ``{"name", ? "version", ? "sha256"}``."""
        if role not in ROLES:
            raise ValueError(f"model/{role}: unknown role; use one of {', '.join(ROLES)}")
        if not isinstance(value, Mapping) or not isinstance(value.get("name"), str):
            raise ValueError(f"model/{role}: expected {{name, ? version, ? sha256}}")
        version = value.get("version")
        sha = value.get("sha256")
        return cls(role, value["name"], None if version is None else str(version), sha, desired)


@dataclass
class RoleState:
    """What ``model/<role>`` reports."""

    name: str
    version: str
    status: str = "active"  # active | loading | failed
    error: str | None = None
    desired: int | None = None
    failed: tuple[str, str | None] | None = None  # the refused (name, version)

    def to_report(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "version": self.version, "status": self.status}
        if self.desired is not None:
            out["desired"] = self.desired
        if self.error:
            out["error"] = self.error[:200]
        if self.failed is not None:
            out["refused"] = f"{self.failed[0]} {self.failed[1] or ''}".strip()
        return out


@dataclass
class Prepared:
    """A model fetched, loaded and warmed up, ready to swap in."""

    assignment: Assignment
    cached: CachedModel
    model: TFLiteModel

    @property
    def ref(self) -> Ref:
        return self.cached.ref

    @property
    def entry(self) -> Mapping[str, Any]:
        return self.cached.entry.raw


@dataclass
class ManagerStats:
    applied: int = 0
    rolled_back: int = 0
    swaps: deque[str] = field(default_factory=lambda: deque(maxlen=HISTORY))  # the latest


class ModelManager:
    """Applies model assignments to a running detector. See the module docstring.

    ``detector``: gives the detector running now (the analyzer may replace it on a tier
    switch). ``threshold_override``: the configured threshold, if any (it stays over a swap).
    ``on_ready(role, prepared)``: called after a swap (and for ``lightweight``, when the model is
    ready, before the manager keeps it: a ModelError there refuses it and changes nothing), so the
    runtime can update what it keeps (e.g. the analyzer's tier models).
    """

    def __init__(
        self,
        cache: ModelCache,
        detector: Callable[[], Detector],
        *,
        threshold_override: Callable[[], float | None] | None = None,
        on_ready: Callable[[str, Prepared], None] | None = None,
    ) -> None:
        self.cache = cache
        self._detector = detector
        self._threshold_override = threshold_override
        self._on_ready = on_ready
        self.roles: dict[str, RoleState] = {}
        self.current: dict[str, Ref] = {}
        self.ready: dict[str, Prepared] = {}  # lightweight models, loaded and warm
        self._committing: Counter[Ref] = Counter()  # pinned beside the running ones meanwhile
        self._durable: set[asyncio.Future[None]] = set()  # post-swap writes running
        self.stats = ManagerStats()
        self.floors = Floors(cache.directory)  # rollback protection (agent/modelstore/floors.py)

    def started_with(self, role: str, name: str, version: str) -> None:
        """Record a model the detector was built with (from the config), pin and use it."""
        ref = (name, version)
        self.current[role] = ref
        self.roles[role] = RoleState(name, version)
        if role in ("anomaly", "classifier"):
            self.cache.acquire(ref)
        self._pin()

    def _pin(self) -> None:
        self.cache.set_pins([*self.current.values(), *self._committing])

    async def prepare(self, a: Assignment) -> Prepared:
        """Fetch, load and warm up; ModelError (refused), SyncError (link) or NotNow (the
        device's condition: e.g. the version evicted from the cache while it was loaded)."""
        if a.role not in ROLES:
            raise ModelError(f"model/{a.role}: unknown role; use one of {', '.join(ROLES)}")
        cached = await self.cache.get(a.name, a.version, sha256=a.sha256)
        self.floors.check(cached.name, cached.version, cached.entry.raw)
        kind = cached.entry.kind
        if kind != _KIND[a.role]:
            raise ModelError(
                f"model {cached.name} {cached.version}: a {kind} model cannot take the "
                f"{a.role} role; refused"
            )
        if kind == "anomaly":  # its features and threshold read now, a lightweight's too
            entry_features(cached.entry.raw, f"model {cached.name} {cached.version}")
        try:  # read and built in a worker thread: another task may evict it meanwhile
            model = await self.cache.load_async(cached)
        except ModelError as err:
            if self._evicted(cached):  # its files deleted under disk pressure: not the model's
                raise NotNow(
                    f"model {cached.name} {cached.version}: evicted from the cache while it was "
                    "loaded (disk budget); tried again later"
                ) from err
            raise
        x = np.zeros((1, *model.input_shape), dtype=np.float32)
        try:
            out = np.asarray(model.predict(x))
        except (ValueError, RuntimeError) as err:
            raise ModelError(
                f"model {cached.name} {cached.version}: warm-up failed ({err})"
            ) from err
        if not np.all(np.isfinite(out)):
            raise ModelError(
                f"model {cached.name} {cached.version}: non-finite output on warm-up; refused"
            )
        return Prepared(a, cached, model)

    async def commit(self, p: Prepared) -> None:
        """Swap a prepared model in. Checked first (the features, then the detector's warm-up
        on its newest window), then durable: the new version is pinned beside the running one
        and the cache index written (off the loop) before the swap, so a failure there, or a
        cancellation, leaves the previous model running (a refusal is reported as such; NotNow,
        tried again later, when the index cannot be written or the cache evicted the version
        before it was pinned).
        The swap itself is a few assignments between two detector feeds, and the role's state is
        recorded with it; what follows is the index written again and the rollback floor raised,
        completed even when the commit is cancelled meanwhile (the cancellation goes on after
        them; cancelled again, the commit returns first and :meth:`close` waits for them); a
        failure to write either is logged, never reported as ``failed`` for a running
        version. Each loop step is short: the feature check, each warm-up (one invoke on one
        window, a part of what one row's scoring does), the pins with the index handed to the
        I/O thread, the swap; the detector scores between them and during the writes."""
        role = p.assignment.role
        classes = p.entry.get("classes")
        if role == "classifier" and not isinstance(classes, list | tuple):
            raise ModelError(f"classifier {p.cached.name}: its entry names no classes; refused")
        override = self._override()
        checked = await self._check(p, self._detector(), override)  # ModelError: nothing changes
        await asyncio.sleep(0)  # the detector scores between the check and the pins
        self._committing[p.ref] += 1  # another role's commit meanwhile keeps it pinned
        self._pin()
        try:
            if self._evicted(p.cached):
                # unpinned until now: another role's pins, or a download, evicted it meanwhile
                # (the cache over its disk budget); its files are gone, so no swap
                raise NotNow(
                    f"model {p.cached.name} {p.cached.version}: evicted from the cache before "
                    "it was pinned (disk budget); tried again later"
                )
            await self.cache.sync()
            while checked is not None:
                det, now = self._detector(), self._override()
                # Replaced meanwhile (a tier switch), or the threshold override changed while
                # the index was written: check again, on the detector running now (until
                # neither changed during a check, so the install follows in this step).
                if checked.detector is det and now == override:
                    break
                override = now
                checked = await self._check(p, det, now)
                await asyncio.sleep(0)
            if checked is None and self._on_ready is not None:
                self._on_ready(role, p)  # lightweight: the runtime may refuse it (ModelError)
        except BaseException:  # a refusal, or cancelled: back to the pins of the running models
            self._done_committing(p.ref)  # (on disk at the next sync)
            raise
        if checked is not None:  # the swap: a few assignments
            checked.detector.install(checked)
        else:
            self.ready[role] = p
        old = self.current.get(role)
        self.current[role] = p.ref
        if role in ("anomaly", "classifier"):
            self.cache.acquire(p.ref)
            if old is not None:
                self.cache.release(old)
        self._done_committing(p.ref)
        self.stats.swaps.append(f"{role}:{p.cached.name}@{p.cached.version}")
        if checked is not None and self._on_ready is not None:
            self._on_ready(role, p)
        state = RoleState(p.cached.name, p.cached.version, desired=p.assignment.desired)
        self.roles[role] = state  # recorded with the swap: a cancellation from here on is late
        self.stats.applied += 1
        log.info(
            "model assignment applied role=%s name=%s version=%s source=%s",
            role,
            state.name,
            state.version,
            p.cached.source,
        )
        # The state is whole here. What makes it durable runs in a task of its own, shielded:
        # a cancellation meanwhile (the agent stopping, the role assigned again) goes on once
        # it is done, so the index names the running version and the floor holds.
        durable = asyncio.ensure_future(self._made_durable(role, state, p.entry))
        self._durable.add(durable)
        durable.add_done_callback(self._durable.discard)
        try:
            await asyncio.shield(durable)
        except asyncio.CancelledError:
            await asyncio.wait([durable])  # (cancelled again: it finishes on its own; close waits)
            raise

    async def close(self) -> None:
        """Wait, at most :data:`DURABLE_WAIT` seconds, for the post-swap writes still running (a
        commit cancelled twice returns before its own), so the cache is not closed under them."""
        if not self._durable:
            return
        _, pending = await asyncio.wait(set(self._durable), timeout=DURABLE_WAIT)
        if pending:
            log.warning(
                "event=model_swap_not_durable writes=%d waited=%.0f", len(pending), DURABLE_WAIT
            )

    async def _made_durable(self, role: str, state: RoleState, entry: Mapping[str, Any]) -> None:
        """After a swap: the index written again (the new pins) and the floor raised. The
        detector scores before the index is encoded and handed to the I/O thread (a loop step
        of its own: a swap holds the loop for the swap only)."""
        await asyncio.sleep(0)
        try:
            await self.cache.sync()
        except NotNow as err:  # the new model runs; the index catches up at the next sync
            log.warning(
                "model cache index not written after a swap role=%s error=%r", role, str(err)
            )
        try:  # its rollback index is the model's floor from now on (when it is higher)
            await asyncio.to_thread(self.floors.raise_to, state.name, state.version, entry)
        except (OSError, ModelError) as err:
            log.warning("event=model_floor_not_written name=%s error=%r", state.name, str(err))

    def _evicted(self, cached: CachedModel) -> bool:
        """A cached (not shipped) version the cache no longer has: evicted over its disk budget
        while unpinned (its files are deleted); the device's condition, not the model's."""
        return cached.source != "shipped" and cached.ref not in self.cache.cached()

    def _done_committing(self, ref: Ref) -> None:
        self._committing[ref] -= 1
        if self._committing[ref] <= 0:
            del self._committing[ref]
        self._pin()

    def _override(self) -> float | None:
        return self._threshold_override() if self._threshold_override else None

    async def _check(
        self, p: Prepared, det: Detector, override: float | None
    ) -> CheckedSwap | None:
        """``det``'s check of an anomaly model (with the threshold ``override``) or of a
        classifier; None for another role. The features first, then the warm-up on the
        detector's newest window, each a loop step: the detector scores between them. The
        check changes nothing, so a cancellation meanwhile leaves everything as it was."""
        role = p.assignment.role
        if role == "anomaly":
            checked = det.check_swap(p.model, entry=p.entry, threshold=override, warm=False)
        elif role == "classifier":
            classes = p.entry.get("classes")
            assert isinstance(classes, list | tuple)
            checked = det.check_swap(classifier=p.model, classes=classes, warm=False)
        else:
            return None
        while checked.cold:
            await asyncio.sleep(0)
            checked = det.warm_up(checked)
        return checked

    async def assign(self, a: Assignment) -> RoleState:
        """Apply one assignment. Returns the role's state (``failed`` after a rollback);
        raises SyncError when the link failed, NotNow when the device cannot take it now
        (nothing changed: try again later)."""
        previous = self.roles.get(a.role)
        if previous is not None and previous.status == "active":
            version = a.version or previous.version
            if (a.name, version) == (previous.name, previous.version):
                previous.desired = a.desired
                return previous
        try:
            await self.commit(await self.prepare(a))
        except ModelError as err:
            self.stats.rolled_back += 1
            keep = previous or RoleState(a.name, a.version or "", status="failed")
            state = RoleState(
                keep.name,
                keep.version,
                status="failed",
                error=str(err),
                desired=a.desired,
                failed=(a.name, a.version),
            )
            self.roles[a.role] = state
            log.warning(
                "model assignment rolled back role=%s name=%s version=%s kept=%s@%s error=%r",
                a.role,
                a.name,
                a.version,
                keep.name,
                keep.version,
                str(err),
            )
            return state
        return self.roles[a.role]

    def reported(self) -> dict[str, Any]:
        """``{"model/<role>": value}`` for reported state."""
        return {f"model/{role}": state.to_report() for role, state in sorted(self.roles.items())}


#: Retry delays (seconds; exponential, full jitter) of a model assignment the link interrupted.
MODEL_RETRY_BASE = 5.0
MODEL_RETRY_MAX = 300.0


class ModelAssignments:
    """Desired ``model/<role>`` values, applied by a
    :class:`~agent.modelstore.assignment.ModelManager` in the background (the state hooks'
    ``apply`` is synchronous).

    :meth:`apply` checks the value and starts one task per role; a newer value for a role cancels
    the task still running for it (a partial download stays in the cache and resumes). Unset
    (None) goes back to the configured model. A link failure (SyncError) is not a refusal: the
    assignment is tried again with exponential backoff and full jitter and reported ``loading``
    meanwhile, never ``failed`` (a failed report blocks that version at the endpoint); so is one
    the device cannot take now (NotNow: not enough free disk space, a write that failed). A refused
    model (ModelError) is reported ``failed`` with its desired version, the running model kept.
    """

    def __init__(
        self,
        manager: ModelManager,
        clock: Clock,
        *,
        configured: Mapping[str, Assignment],
        desired_version: Callable[[str], int | None],
        changed: Callable[[], None],
        rng: random.Random | None = None,
    ) -> None:
        self.manager = manager
        self.clock = clock
        self.configured = dict(configured)
        self.desired_version = desired_version
        self.changed = changed
        self.rng = rng or random.Random()
        self.tasks: dict[str, asyncio.Task[None]] = {}
        self.loading: dict[str, tuple[Assignment, str | None]] = {}  # role -> (it, last error)

    def apply(self, role: str, value: Any) -> None:
        if value is None:
            a = self.configured.get(role)
            if a is None:
                raise ValueError(f"model/{role}: no model is configured for this role")
        else:
            a = Assignment.from_desired(role, value)
        old = self.tasks.pop(role, None)
        if old is not None:
            old.cancel()
        task = asyncio.get_running_loop().create_task(self._assign(a), name=f"model-{role}")
        self.tasks[role] = task
        task.add_done_callback(lambda t: self._done(role, t))

    def _done(self, role: str, task: asyncio.Task[None]) -> None:
        if self.tasks.get(role) is task:
            del self.tasks[role]
            self.loading.pop(role, None)

    async def _assign(self, a: Assignment) -> None:
        key = f"model/{a.role}"
        attempt = 0
        error: str | None = None
        while True:
            a = replace(a, desired=self.desired_version(key))
            self.loading[a.role] = (a, error)
            self.changed()
            try:
                state = await self.manager.assign(a)
                break
            except (SyncError, NotNow) as err:
                error = str(err)
                delay = full_jitter(attempt, MODEL_RETRY_BASE, MODEL_RETRY_MAX, self.rng)
                attempt += 1
                log.info(
                    "event=model_assignment_deferred role=%s name=%s version=%s attempt=%d "
                    "retry_in=%.1f error=%r",
                    a.role,
                    a.name,
                    a.version,
                    attempt,
                    delay,
                    error,
                )
            except Exception:  # a bug: keep what runs, report nothing as refused
                log.exception("event=model_assignment_crashed role=%s name=%s", a.role, a.name)
                self.loading.pop(a.role, None)
                self.changed()
                return
            self.loading[a.role] = (a, error)
            self.changed()
            await self.clock.sleep(delay)
        self.loading.pop(a.role, None)
        log.info(
            "event=model_assignment role=%s status=%s model=%s@%s desired=%s",
            a.role,
            state.status,
            state.name,
            state.version,
            a.desired,
        )
        self.changed()

    def reported(self) -> dict[str, Any]:
        """``{"model/<role>": report}``: the manager's, ``loading`` while one is fetched."""
        out = self.manager.reported()
        for role, (a, error) in self.loading.items():
            key = f"model/{role}"
            report = {**out.get(key, {}), "status": "loading", "desired": a.desired}
            report["loading"] = f"{a.name} {a.version or ''}".strip()
            report.pop("refused", None)
            report.pop("error", None)
            if error:
                report["error"] = error[:200]
            if a.desired is None:
                del report["desired"]
            out[key] = report
        return out

    def status(self) -> dict[str, Any]:
        cache = self.manager.cache
        st = cache.stats
        return {
            "applied": self.manager.stats.applied,
            "rolled_back": self.manager.stats.rolled_back,
            "cached": [f"{n}@{v}" for n, v in cache.cached()],
            "pinned": sorted(f"{n}@{v}" for n, v in cache.pins),
            "disk_bytes": cache.disk_used,
            "memory_bytes": cache.memory_used,
            "downloads": st.downloads,
            "refused": st.refused,
            "hits": st.hits,
        }

    async def close(self) -> None:
        """Cancel the assignments running, then wait for their post-swap writes
        (:meth:`ModelManager.close`)."""
        tasks = list(self.tasks.values())
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)
        await self.manager.close()
