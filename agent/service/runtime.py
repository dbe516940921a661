"""Builds the agent's stages from the config and runs them in one asyncio TaskGroup.

Stages talk through the store and small in-memory queues, never through globals:

    sampler --Reading--> telemetry writer --> store
          \\--Reading--> (hooks: demo printer, detector)

With ``[uplink]`` and a detector, two more stages: the router (agent/routing.py; the detector's
alerts it is unsure of are validated by the endpoint, on a transport of its own, while the link
policy allows it) and model assignment (:class:`ModelAssignments`: desired ``model/<role>`` is
fetched into the model cache, verified and swapped into the running detector).

Around them: the local status socket, the Prometheus textfile, and systemd's notify protocol
(READY=1 once the store is open and every sensor has been tried once; WATCHDOG=1 only while no
stage is stuck). SIGINT and SIGTERM stop the agent gracefully: the sampler stops, every reading
already taken is committed to the store, the store is closed, then the process exits 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import signal
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import replace
from typing import Any

from agent import __version__
from agent.detect.analyzer import CALIBRATION_FILE, Analyzer, LoadedModel
from agent.detect.detector import Detector
from agent.errors import ModelError, SyncError
from agent.metrics import Registry, write_textfile
from agent.modelstore.assignment import Assignment, ModelManager, Prepared
from agent.modelstore.cache import ModelCache, ModelFetcher
from agent.sense.hardware import Hardware
from agent.sense.ingest import TelemetryWriter
from agent.sense.sampling import Sampler
from agent.service.config import Config
from agent.service.notify import Health, Notifier, run_watchdog
from agent.service.status import StatusServer, socket_path
from agent.store.queue import Store, StoreStats
from agent.sync.link import CoapProbe, LinkMonitor
from agent.sync.routing import Router
from agent.sync.state import AgentHooks, StateSync
from agent.sync.transport import CoapTransport, Endpoints
from agent.sync.uplink import Uplink
from drivers.base import Reading
from drivers.clock import Clock, RealClock

log = logging.getLogger(__name__)

ReadingHook = Callable[[Reading], Awaitable[None] | None]

#: A stage busy with one step (a sensor read, a store commit) for longer than this is stuck.
STUCK_AFTER = 60.0
#: READY=1 at the latest this long after start, even if a sensor is still being tried.
READY_WITHIN = 30.0
#: Seconds between refreshes of the queue statistics shown by status.
STATS_INTERVAL = 2.0
#: Seconds between checks for sensor health or link changes to report.
STATE_WATCH_INTERVAL = 1.0
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
    meanwhile, never ``failed`` (a failed report blocks that version at the endpoint). A refused
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
            except SyncError as err:
                error = str(err)
                delay = self.rng.uniform(0.0, min(MODEL_RETRY_MAX, MODEL_RETRY_BASE * 2**attempt))
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
        tasks = list(self.tasks.values())
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)


class Agent:
    """The running agent: hardware, sampler, store and the stages around them."""

    def __init__(
        self,
        config: Config,
        *,
        clock: Clock | None = None,
        rig: Any = None,
        on_reading: ReadingHook | None = None,
        notifier: Notifier | None = None,
        status_socket: bool = True,
    ) -> None:
        self.config = config
        self.clock = clock or RealClock()
        self.rig = rig
        self.on_reading = on_reading
        self.notifier = notifier or Notifier()
        self.hardware = Hardware(config, self.clock, rig)
        self.sampler: Sampler | None = None
        self.store: Store | None = None
        self.writer: TelemetryWriter | None = None
        self.health = Health(self.clock)
        self.metrics = Registry()
        self.readings = 0
        self.started_wall = time.time()
        self.started = self.clock.monotonic()
        self.last_stats: StoreStats | None = None
        self.transport: CoapTransport | None = None
        self.endpoints: Endpoints | None = None
        self.uplink: Uplink | None = None
        self.link: LinkMonitor | None = None
        self.state: StateSync | None = None
        self.analyzer: Analyzer | None = None
        self.model_error: str | None = None
        self.router: Router | None = None
        self.router_transport: CoapTransport | None = None
        self.model_cache: ModelCache | None = None
        self.assignments: ModelAssignments | None = None
        self._status = (
            StatusServer(socket_path(config.agent.data_dir), self.snapshot)
            if status_socket
            else None
        )
        self._stop = asyncio.Event()
        self._ready = asyncio.Event()

    def request_stop(self) -> None:
        self._stop.set()

    # -- stages -----------------------------------------------------------------------------
    async def _sink(self, reading: Reading) -> None:
        self.readings += 1
        if self.writer is not None:
            self.writer.submit(reading)
        if self.analyzer is not None:
            self.analyzer.observe(reading)
        if self.on_reading is not None:
            result = self.on_reading(reading)
            if asyncio.iscoroutine(result):
                await result

    def _stuck_checks(self) -> None:
        now = self.clock.monotonic

        def sampler_busy() -> bool:
            assert self.sampler is not None
            return any(
                t.busy_since is not None and now() - t.busy_since > STUCK_AFTER
                for t in self.sampler.tasks.values()
            )

        def writer_busy() -> bool:
            w = self.writer
            return w is not None and w.busy_since is not None and now() - w.busy_since > STUCK_AFTER

        def detector_busy() -> bool:
            a = self.analyzer
            return a is not None and a.busy_since is not None and now() - a.busy_since > STUCK_AFTER

        self.health.check("sampler", sampler_busy)
        self.health.check("store-writer", writer_busy)
        self.health.check("detector", detector_busy)

    async def _announce_ready(self) -> None:
        assert self.sampler is not None
        deadline = self.clock.monotonic() + READY_WITHIN
        while self.clock.monotonic() < deadline and not all(
            t.health.reads or t.health.errors for t in self.sampler.tasks.values()
        ):
            await self.clock.sleep(0.05)
        self._ready.set()
        self.notifier.ready(self.status_line())
        log.info("event=ready sensors_ok=%d", self._sensors_ok())
        # from now on: WATCHDOG=1 while no stage is stuck
        await run_watchdog(self.notifier, self.health, self.clock, self.status_line)

    async def _stats_loop(self) -> None:
        while True:
            await self.refresh_stats()
            await self.clock.sleep(STATS_INTERVAL)

    async def _metrics_loop(self) -> None:
        settings = self.config.metrics
        if settings.textfile is None:
            return
        while True:
            await self.refresh_stats()
            try:
                text = self.metrics.render()
                await self.clock.run_blocking(None, write_textfile, settings.textfile, text)
            except OSError as err:
                log.warning(
                    "event=metrics_write_failed path=%s error=%r", settings.textfile, str(err)
                )
            await self.clock.sleep(settings.interval)

    async def refresh_stats(self) -> None:
        if self.store is not None:
            with contextlib.suppress(Exception):
                self.last_stats = await self.store.stats()

    # -- status ----------------------------------------------------------------------------
    def _link_status(self) -> dict[str, Any]:
        up = self.uplink
        if up is None:
            return {"state": "disabled"}
        srtt = up.rtt.srtt
        sent = up.stats.batches_sent
        status = {
            "state": up.state,
            "endpoint": self.endpoints.current if self.endpoints else None,
            "rtt_ms": srtt * 1000 if srtt is not None else None,
            "loss": (up.stats.retransmitted + up.stats.batches_failed) / sent if sent else None,
            "window": up.window,
            "uplink": up.stats.as_dict(),
        }
        if self.link is not None:  # the link monitor's state (high/medium/low/offline) and measures
            status.update(self.link.status())
            status["uplink_state"] = up.state
        return status

    def _sensors_ok(self) -> int:
        if self.sampler is None:
            return 0
        return sum(1 for h in self.sampler.health.values() if h.state.value == "ok")

    def status_line(self) -> str:
        n = len(self.config.sensors)
        depth = self.last_stats.depth if self.last_stats else 0
        return f"sensors {self._sensors_ok()}/{n} ok; queue {depth}; readings {self.readings}"

    def snapshot(self) -> dict[str, Any]:
        """The live state for `edge-agent status` (JSON-ready)."""
        stats = self.last_stats
        queue: dict[str, Any] = {}
        if stats is not None:
            queue = {
                "depth": {k: v.depth for k, v in stats.kinds.items()},
                "bytes": stats.file_bytes,
                "oldest_age_s": stats.oldest_age,
                "evicted": {k: v.evicted for k, v in stats.kinds.items()},
                "last_seq": stats.last_seq,
            }
        return {
            "device_id": self.config.agent.device_id,
            "version": __version__,
            "uptime_s": self.clock.monotonic() - self.started,
            "started": self.started_wall,
            "ready": self._ready.is_set(),
            "readings": self.readings,
            "sensors": [h.as_dict() for h in self.sampler.health.values()] if self.sampler else [],
            "queue": queue,
            "link": self._link_status(),
            "state": self.state.status if self.state is not None else None,
            "models": self._models_status(),
            "model_cache": self.assignments.status() if self.assignments else None,
            "detect": self.analyzer.status() if self.analyzer else None,
            "routing": self.router.snapshot() if self.router else None,
            "last_alert": self._last_alert(),
            "stuck": self.health.stuck(),
        }

    def _last_alert(self) -> dict[str, Any] | None:
        last = self.analyzer.last_alert if self.analyzer else None
        if last is None:
            return None
        return {**last, "age_s": max(0.0, self.clock.time() - last["time"])}

    def _models_status(self) -> dict[str, Any]:
        if self.analyzer is not None:
            models = self.analyzer.models()
            if self.assignments is not None:  # the assignment of each role (status, desired)
                for key, report in self.assignments.reported().items():
                    role = key.partition("/")[2]
                    models.setdefault(role, {})["assignment"] = report
            return models
        if self.model_error is not None:
            return {"error": self.model_error}
        return {}

    def _load_analyzer(self) -> None:
        """Load the detector's models. A model that cannot be used is logged and reported in
        status; the agent keeps sampling and storing telemetry without detection."""
        settings = self.config.detect
        if settings is None:
            return
        assert self.store is not None
        try:
            self.analyzer = Analyzer.load(
                settings,
                self.store,
                self.clock,
                on_commit=self.uplink.poke if self.uplink else None,
                calibration_path=self.config.agent.data_dir / CALIBRATION_FILE,
            )
        except ModelError as err:
            self.model_error = str(err)
            log.error("event=detect_disabled error=%r", str(err))

    # -- run --------------------------------------------------------------------------------
    async def run(self, *, install_signals: bool = True) -> None:
        loop = asyncio.get_running_loop()
        if install_signals:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, self.request_stop)
        self.store = await Store.open(self.config.store, clock=self.clock)
        self.sampler = Sampler(self.hardware.build(), self.clock, self._sink)
        self._build_uplink()
        self._load_analyzer()
        self._build_router()
        self._build_models()
        self.writer = TelemetryWriter(
            self.store, self.clock, on_commit=self.uplink.poke if self.uplink else None
        )
        self._build_state()
        self._stuck_checks()
        self.metrics_setup()
        if self._status is not None:
            try:
                await self._status.start()
            except OSError as err:
                log.warning(
                    "event=status_socket_failed path=%s error=%r", self._status.path, str(err)
                )
                self._status = None
        log.info(
            "event=start device=%s sensors=%d store=%s",
            self.config.agent.device_id,
            len(self.config.sensors),
            self.config.store.path,
        )
        try:
            async with asyncio.TaskGroup() as tg:
                sampler = tg.create_task(self.sampler.run(), name="sampler")
                writer = tg.create_task(self.writer.run(), name="store-writer")
                detector = (
                    tg.create_task(self.analyzer.run(), name="detector")
                    if self.analyzer is not None
                    else None
                )
                others = [
                    tg.create_task(self._announce_ready(), name="ready-watchdog"),
                    tg.create_task(self._metrics_loop(), name="metrics"),
                    tg.create_task(self._stats_loop(), name="stats"),
                ]
                if self.uplink is not None:
                    others.append(tg.create_task(self.uplink.run(), name="uplink"))
                if self.link is not None:
                    others.append(tg.create_task(self.link.run(), name="link"))
                if self.router is not None:
                    others.append(tg.create_task(self.router.run(), name="routing"))
                if self.state is not None:
                    others.append(tg.create_task(self.state.run(), name="state"))
                    others.append(tg.create_task(self._watch_state(), name="state-watch"))
                await self._stop.wait()
                self.notifier.stopping()
                # stop taking readings, then commit every reading already taken
                sampler.cancel()
                await asyncio.wait([sampler])
                self.writer.stop()
                await asyncio.wait([writer])
                if detector is not None:  # stops scoring, commits the alerts already made
                    detector.cancel()
                    await asyncio.wait([detector])
                for task in others:
                    task.cancel()
        finally:
            await self._shutdown(install_signals)

    async def _shutdown(self, install_signals: bool) -> None:
        if self.sampler is not None:
            await self.sampler.close()
        self.hardware.close()
        if self.assignments is not None:
            await self.assignments.close()
        if self.model_cache is not None:
            await self.model_cache.close()
        if self.router is not None:  # pending validations and verdicts survive the restart
            await self.router.save()
        if self.router_transport is not None:
            await self.router_transport.close()
        if self.transport is not None:
            await self.transport.close()
        if self.store is not None:
            await self.store.close()
        if self._status is not None:
            await self._status.stop()
        if install_signals:
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                with contextlib.suppress(Exception):
                    loop.remove_signal_handler(sig)
        w = self.writer
        log.info(
            "event=stop readings=%d committed=%d dropped=%d",
            self.readings,
            w.committed if w else 0,
            (w.dropped_full + w.dropped_overflow + w.backlog) if w else 0,
        )

    def _build_uplink(self) -> None:
        settings = self.config.uplink
        if settings is None:
            return
        # one lane per outstanding batch, one for the link monitor's probes, one for state
        self.transport = CoapTransport(self.clock, lanes=settings.max_inflight + 2)
        self.endpoints = Endpoints(
            settings.endpoints, self.clock, primary_retry=settings.primary_retry
        )
        self.uplink = Uplink(
            settings,
            self.store,
            self.transport,
            self.endpoints,
            self.clock,
            device_id=self.config.agent.device_id,
            resolution=self.resolution,
        )
        probe = CoapProbe(
            self.transport,
            self.endpoints,
            self.config.agent.device_id,
            lane=settings.max_inflight,
        )
        self.link = LinkMonitor(
            self.config.link,
            self.clock,
            uplink=self.uplink,
            probe=probe,
            analyzer=lambda: getattr(self, "analyzer", None),
        )
        self.uplink.on_exchange = self.link.observe

        def uplink_busy() -> bool:
            up = self.uplink
            now = self.clock.monotonic()
            # an exchange has its own deadline; far beyond it the uplink is wedged
            limit = 2 * settings.deadline + STUCK_AFTER
            return up is not None and any(now - t > limit for t in up.busy_since.values())

        self.health.check("uplink", uplink_busy)

    def _edge_models(self) -> dict[str, Any]:
        """The analyzer's models by name (the full tier first): the router's edge models."""
        a = self.analyzer
        if a is None:
            return {}
        models = {t.name: t.model for _, t in sorted(a.tiers.items(), key=lambda i: i[0] != "full")}
        if a.classifier is not None:
            models.setdefault(getattr(a.classifier, "name", "classifier"), a.classifier)
        return models

    def _cloud_allowed(self) -> bool:
        """The link policy allows cloud validation (the link monitor's state)."""
        return self.link is None or self.link.cloud_validation

    def _build_router(self) -> None:
        """Routing (hybrid inference, cloud validation of unsure alerts) on a transport of its
        own; only with [uplink] and a running detector."""
        if self.analyzer is None or self.endpoints is None or self.store is None:
            return
        endpoints = self.endpoints
        self.router_transport = CoapTransport(self.clock, lanes=1)
        router = self.router = Router(
            self.config.routing,
            device_id=self.config.agent.device_id,
            store=self.store,
            transport=self.router_transport,
            endpoint=lambda: endpoints.current,
            edge=self._edge_models(),
            link_allows_cloud=self._cloud_allowed,
            clock=self.clock,
        )
        self.analyzer.add_alert_listener(router.on_alert)
        limit = 2 * self.config.routing.validation_deadline + STUCK_AFTER

        def router_busy() -> bool:
            since = router.busy_since
            return since is not None and self.clock.monotonic() - since > limit

        self.health.check("routing", router_busy)

    def _build_models(self) -> None:
        """Model assignment (desired ``model/<role>``): signed models fetched from the endpoint
        into the model cache and swapped into the running analyzer; only with [uplink] and a
        running detector. A cache that cannot be opened disables assignment, not detection."""
        a = self.analyzer
        if a is None or self.endpoints is None or self.config.detect is None:
            return
        d = self.config.detect.detect
        endpoints = self.endpoints
        fetcher = ModelFetcher(
            lambda: endpoints.current, endpoint_path=self.config.models.endpoint_path
        )
        try:
            cache = ModelCache.open(
                self.config.models,
                shipped_dir=d.models_dir,
                fetcher=fetcher,
                runtime=d.runtime,
                num_threads=d.num_threads,
                batch_mode=d.batch_mode,
            )
        except ModelError as err:
            log.error("event=model_assignment_disabled error=%r", str(err))
            return
        self.model_cache = cache
        manager = ModelManager(
            cache,
            self._assignable_detector,
            threshold_override=lambda: a.threshold_override,
            on_ready=self._model_ready,
        )
        configured: dict[str, Assignment] = {}
        lite = a.tiers.get("lite")
        running = [("anomaly", a.tiers["full"].name), ("lightweight", lite.name if lite else "")]
        if a.classifier is not None and d.classifier:
            running.append(("classifier", d.classifier))
        for role, name in running:
            version = self._shipped_version(cache, name) if name else None
            if name and version:
                manager.started_with(role, name, version)
                configured[role] = Assignment(role, name, version)
        self.assignments = ModelAssignments(
            manager,
            self.clock,
            configured=configured,
            desired_version=self._desired_version,
            changed=self._state_changed,
        )

    def _desired_version(self, key: str) -> int | None:
        return self.state.applied_version(key) if self.state is not None else None

    def _state_changed(self) -> None:
        if self.state is not None:
            self.state.changed()

    @staticmethod
    def _shipped_version(cache: ModelCache, name: str) -> str | None:
        if cache.shipped is None:
            return None
        try:
            version = cache.shipped.entry(name).raw.get("version")
        except (ModelError, KeyError):
            return None
        return None if version is None else str(version)

    def _assignable_detector(self) -> Detector:
        """The detector a model assignment swaps into. On the full tier the running one. On
        the lite tier a stand-in of the full tier (its model, features and classifier): an
        anomaly model is checked against the full tier's features and reaches only
        ``tiers["full"]`` (through :meth:`_model_ready`), never the running lite detector."""
        a = self.analyzer
        assert a is not None
        if a.tier == "full":
            return a.detector
        full = a.tiers["full"]
        return Detector.from_entry(
            full.model,
            full.entry,
            settings=a.settings.detect,
            classifier=a.classifier,
            classes=a.classes,
        )

    def _model_ready(self, role: str, p: Prepared) -> None:
        """A model was swapped in (or, lightweight, made ready): keep the analyzer's tiers and
        classifier in step, so a later tier switch uses it, and the router's edge models."""
        a = self.analyzer
        assert a is not None
        if role == "classifier":
            a.classifier = p.model
            a.classes = tuple(p.entry.get("classes") or a.classes)
        else:
            tier = "full" if role == "anomaly" else "lite"
            entry = {**p.entry, "version": p.cached.version}
            if tier == "lite":
                want = a.tiers["full"].entry.get("features", {}).get("channels")
                got = entry.get("features", {}).get("channels")
                if list(got or ()) != list(want or ()):
                    raise ModelError(
                        f"lite model {p.cached.name} {p.cached.version}: channels {got} differ "
                        f"from the full tier's {want}; refused"
                    )
            value = (entry.get("threshold") or {}).get("value")
            a.tiers[tier] = LoadedModel(
                name=p.cached.name,
                model=p.model,
                entry=entry,
                threshold=float(value) if isinstance(value, int | float) else math.nan,
                size=p.cached.size,
                sha256=p.cached.entry.sha256,
                loaded_at=time.time(),
            )
            if tier == "lite" and a.tier == "lite":  # the running lite detector takes it now
                try:
                    a.detector.swap_models(p.model, entry=p.entry, threshold=a.threshold_override)
                except ModelError:  # other features: a new detector primed from the kept rows
                    a.pending_tier = "lite"
        if self.router is not None:
            self.router.edge = self._edge_models()
        log.info(
            "event=model_ready role=%s model=%s version=%s tier=%s",
            role,
            p.cached.name,
            p.cached.version,
            a.tier,
        )

    def _build_state(self) -> None:
        """Device state (reported and desired) over the uplink's transport; restores the desired
        values persisted by the last run before any sensor is read."""
        if self.transport is None or self.endpoints is None or self.sampler is None:
            return  # no [uplink]: nowhere to report to
        hooks = AgentHooks(
            self.sampler,
            version=__version__,
            queue_depth=lambda: self.last_stats.depth if self.last_stats else None,
            link=self._link_status,
            analyzer=lambda: getattr(self, "analyzer", None),
            models=self.assignments,
        )
        self.state = StateSync(
            self.config.state,
            self.transport,
            self.endpoints,
            self.clock,
            device_id=self.config.agent.device_id,
            hooks=hooks,
            lane=self.config.uplink.max_inflight + 1 if self.config.uplink else 0,
        )
        self.state.restore()

    async def _watch_state(self) -> None:
        """Wake the state reporter when a sensor's health or the link state changes."""
        assert self.sampler is not None and self.state is not None
        last = None
        while True:
            seen = (
                tuple((name, h.state.value) for name, h in self.sampler.health.items()),
                self._link_status().get("state"),
            )
            if last is not None and seen != last:
                self.state.changed()
            last = seen
            await self.clock.sleep(STATE_WATCH_INTERVAL)

    def resolution(self, sensor: str, channel: str) -> float | None:
        """The step of a reported channel: the config's override, else the part's resolution
        carried through the channel's scaling."""
        try:
            cfg = self.config.sensor(sensor)
        except KeyError:
            return None
        if channel in cfg.resolution:
            return cfg.resolution[channel]
        if self.sampler is None or sensor not in self.sampler.tasks:
            return None
        driver = self.sampler.tasks[sensor].driver
        try:
            step = float(driver.resolution(cfg.source_of(channel)))
        except (KeyError, ValueError, AttributeError):
            return None
        scaling = cfg.scaling.get(channel)
        return step * abs(scaling.gain) if scaling else step

    # -- metrics ----------------------------------------------------------------------------
    def metrics_setup(self) -> None:
        m = self.metrics
        readings = m.counter("readings_total", "Readings taken, by sensor", ["sensor"])
        errors = m.counter("sensor_errors_total", "Failed sensor reads, by sensor", ["sensor"])
        up = m.gauge("sensor_up", "1 when the sensor's last read succeeded", ["sensor"])
        depth = m.gauge("queue_depth", "Records queued, by kind", ["kind"])
        qbytes = m.gauge("queue_bytes", "Payload bytes queued, by kind", ["kind"])
        evicted = m.counter("queue_evicted_total", "Records evicted for the budget", ["kind"])
        file_bytes = m.gauge("queue_file_bytes", "Size of the queue files on disk")
        dropped = m.counter(
            "telemetry_dropped_total", "Readings dropped before the store", ["reason"]
        )
        uptime = m.gauge("uptime_seconds", "Seconds since the agent started")
        up_bytes = m.counter("uplink_bytes_total", "Batch bytes sent to the cloud endpoint")
        up_records = m.counter("uplink_records_total", "Records acknowledged by the endpoint")
        up_batches = m.counter("uplink_batches_total", "Batches sent, by outcome", ["outcome"])
        rtt = m.gauge("link_rtt_seconds", "Smoothed round-trip time to the endpoint")
        loss = m.gauge("link_loss_ratio", "Share of exchanges retransmitted or lost")
        link_state = m.gauge("link_state", "1 for the link's current state", ["state"])

        def collect() -> None:
            assert self.sampler is not None
            for name, h in self.sampler.health.items():
                readings.set_total(h.reads, sensor=name)
                errors.set_total(h.errors, sensor=name)
                up.set(1.0 if h.state.value == "ok" else 0.0, sensor=name)
            stats = self.last_stats
            if stats is not None:
                for kind, ks in stats.kinds.items():
                    depth.set(ks.depth, kind=kind)
                    qbytes.set(ks.bytes, kind=kind)
                    evicted.set_total(ks.evicted, kind=kind)
                file_bytes.set(stats.file_bytes)
            if self.writer is not None:
                dropped.set_total(self.writer.dropped_full, reason="store_full")
                dropped.set_total(self.writer.dropped_overflow, reason="overflow")
            uptime.set(self.clock.monotonic() - self.started)
            link = self._link_status()
            for state in ("high", "medium", "low", "offline", "disabled"):
                link_state.set(1.0 if link["state"] == state else 0.0, state=state)
            if self.uplink is not None:
                st = self.uplink.stats
                up_bytes.set_total(st.bytes_sent)
                up_records.set_total(st.records_acked)
                up_batches.set_total(st.batches_acked, outcome="acked")
                up_batches.set_total(st.batches_failed, outcome="failed")
                if link["rtt_ms"] is not None:
                    rtt.set(link["rtt_ms"] / 1000)
                if link["loss"] is not None:
                    loss.set(link["loss"])

        m.collector(collect)
        if self.analyzer is not None:
            m.collector(self.analyzer.register_metrics(m))
