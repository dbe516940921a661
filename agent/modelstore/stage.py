"""Model assignment as a stage of the running agent: the model cache opened, again with backoff
while the device cannot open it, and desired ``model/<role>`` applied once it is open.

:meth:`AssignmentStage.open` is the attempt at start. When the device cannot open the cache for
a cause of its own (NotNow: its index cannot be written, a full disk, an I/O error, its directory
cannot be created), :meth:`AssignmentStage.run` tries again with exponential backoff and full
jitter (``OPEN_RETRY_BASE`` doubling up to ``OPEN_RETRY_MAX``), the open off the loop; meanwhile
a desired ``model/<role>`` is checked and kept, reported ``loading`` with the reason (never
``failed``, which blocks that version at the endpoint), and applied through
:class:`~agent.modelstore.assignment.ModelAssignments` once the cache opens. A refusal
(ModelError: a public key file that is not one, a shipped manifest that does not parse) turns
model assignment off for the run: a desired value is refused from then on.

Logging: one warning when an episode of failed opens starts, debug for the further attempts, one
info line when the cache opens after it; error when model assignment is turned off.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from typing import Any

from agent.detect.analyzer import Analyzer
from agent.detect.detector import Detector
from agent.errors import ModelError, NotNow
from agent.modelstore.assignment import ROLES, Assignment, ModelAssignments, ModelManager, Prepared
from agent.modelstore.cache import ModelCache
from agent.modelstore.fetch import ModelFetcher
from agent.sync.backoff import full_jitter
from drivers.clock import Clock

log = logging.getLogger(__name__)

#: Retry delays (seconds; exponential, full jitter) of a model cache the device cannot open.
OPEN_RETRY_BASE = 5.0
OPEN_RETRY_MAX = 300.0


def manager_for(
    cache: ModelCache,
    analyzer: Analyzer,
    classifier: str | None,
    detector: Callable[[], Detector],
    *,
    on_ready: Callable[[str, Prepared], None],
) -> tuple[ModelManager, dict[str, Assignment]]:
    """The manager of the running ``analyzer``'s models over ``cache``, the shipped models it
    runs (the configured ``classifier`` among them) started with and pinned, and those
    configured assignments (what an unset ``model/<role>`` goes back to)."""
    manager = ModelManager(
        cache, detector, threshold_override=lambda: analyzer.threshold_override, on_ready=on_ready
    )
    configured: dict[str, Assignment] = {}
    lite = analyzer.tiers.get("lite")
    running = [("anomaly", analyzer.tiers["full"].name), ("lightweight", lite.name if lite else "")]
    if analyzer.classifier is not None and classifier:
        running.append(("classifier", classifier))
    for role, name in running:
        version = _shipped_version(cache, name) if name else None
        if name and version:
            manager.started_with(role, name, version)
            configured[role] = Assignment(role, name, version)
    return manager, configured


def _shipped_version(cache: ModelCache, name: str) -> str | None:
    if cache.shipped is None:
        return None
    try:
        version = cache.shipped.entry(name).raw.get("version")
    except (ModelError, KeyError):
        return None
    return None if version is None else str(version)


class AssignmentStage:
    """See the module docstring. ``open_cache()`` opens the cache (blocking; NotNow or
    ModelError); the manager over it is :func:`manager_for` of the running ``analyzer`` (the
    configured ``classifier``, ``detector`` and ``on_ready`` as there). ``fetcher``: the
    cache's, closed by :meth:`close` when the cache never opened. ``apply``, ``reported``,
    ``status`` and ``close`` are those of the assignments once the cache is open."""

    def __init__(
        self,
        open_cache: Callable[[], ModelCache],
        analyzer: Analyzer,
        classifier: str | None,
        detector: Callable[[], Detector],
        clock: Clock,
        *,
        on_ready: Callable[[str, Prepared], None],
        desired_version: Callable[[str], int | None],
        changed: Callable[[], None],
        fetcher: ModelFetcher | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self._open_cache = open_cache
        self.analyzer = analyzer
        self._build = lambda cache: manager_for(
            cache, analyzer, classifier, detector, on_ready=on_ready
        )
        self.clock = clock
        self.desired_version = desired_version
        self.changed = changed
        self._fetcher = fetcher
        self.rng = rng or random.Random()
        self.cache: ModelCache | None = None
        self.assignments: ModelAssignments | None = None
        self.disabled: str | None = None  # the refusal that turned assignment off
        self.error: str | None = None  # why the cache does not open now (NotNow)
        self.attempts = 0  # failed opens in the episode running
        self.pending: dict[str, Any] = {}  # role -> desired value, applied once open

    @property
    def waiting(self) -> bool:
        """The cache is not open yet, and is tried again."""
        return self.cache is None and self.disabled is None

    def open(self) -> None:
        """One attempt, on the calling thread (at start)."""
        try:
            cache = self._open_cache()
        except (NotNow, ModelError) as err:
            self._failed(err)
            return
        self._opened(cache)

    async def run(self) -> None:
        """Open the cache again with backoff until it opens or is refused."""
        while self.waiting:
            delay = full_jitter(self.attempts - 1, OPEN_RETRY_BASE, OPEN_RETRY_MAX, self.rng)
            await self.clock.sleep(delay)
            try:  # reading and verifying the cached files: off the loop
                cache = await self.clock.run_blocking(None, self._open_cache)
            except (NotNow, ModelError) as err:
                self._failed(err)
            else:
                self._opened(cache)

    def _failed(self, err: NotNow | ModelError) -> None:
        if isinstance(err, ModelError):
            self.disabled = str(err)
            log.error("event=model_assignment_disabled error=%r", self.disabled)
        else:
            self.attempts += 1
            level = logging.WARNING if self.error is None else logging.DEBUG
            log.log(
                level,
                "event=model_cache_unavailable error=%r attempt=%d action=retry",
                str(err),
                self.attempts,
            )
            self.error = str(err)
        if self.pending:
            self.changed()

    def _opened(self, cache: ModelCache) -> None:
        manager, configured = self._build(cache)
        self.cache = cache
        self.assignments = assignments = ModelAssignments(
            manager,
            self.clock,
            configured=configured,
            desired_version=self.desired_version,
            changed=self.changed,
        )
        if self.error is not None:
            log.info("event=model_cache_opened after_attempts=%d", self.attempts)
        self.error, self.attempts = None, 0
        pending, self.pending = self.pending, {}
        for role, value in pending.items():  # checked when kept
            try:
                assignments.apply(role, value)
            except ValueError as err:  # unset, with no model configured for the role
                log.warning("event=model_assignment_dropped role=%s error=%r", role, str(err))

    def apply(self, role: str, value: Any) -> None:
        """Apply desired ``model/<role>``: now, or kept until the cache opens (checked now:
        ValueError); refused (ValueError) when model assignment is off."""
        if self.assignments is not None:
            self.assignments.apply(role, value)
            return
        if self.disabled is not None:
            raise ValueError(f"model/{role}: model assignment is off here ({self.disabled})")
        if value is not None:
            Assignment.from_desired(role, value)
        elif role not in ROLES:
            raise ValueError(f"model/{role}: unknown role; use one of {', '.join(ROLES)}")
        self.pending[role] = value
        self.changed()

    def reported(self) -> dict[str, Any]:
        """``{"model/<role>": report}``: the assignments'; meanwhile the running models (as the
        manager reports them) and ``loading`` for a kept value."""
        if self.assignments is not None:
            return self.assignments.reported()
        out: dict[str, Any] = {}
        models = self.analyzer.models()
        for role in ROLES:
            running = models.get(role) or {}
            if running.get("name") and running.get("version") is not None:
                out[f"model/{role}"] = {
                    "name": running["name"],
                    "version": str(running["version"]),
                    "status": "active",
                }
        for role, value in self.pending.items():
            if value is None:
                continue
            a = Assignment.from_desired(role, value)
            key = f"model/{role}"
            report = {**out.get(key, {}), "status": "loading"}
            report["loading"] = f"{a.name} {a.version or ''}".strip()
            desired = self.desired_version(key)
            if desired is not None:
                report["desired"] = desired
            reason = self.disabled or self.error
            if reason:
                report["error"] = reason[:200]
            out[key] = report
        return out

    def status(self) -> dict[str, Any]:
        if self.assignments is not None:
            return self.assignments.status()
        return {"open": False, "error": self.disabled or self.error, "attempts": self.attempts}

    async def close(self) -> None:
        """The assignments closed, then the cache (or its unused fetcher)."""
        if self.assignments is not None:
            await self.assignments.close()
        last = self.cache or self._fetcher  # the cache closes its fetcher
        if last is not None:
            await last.close()
