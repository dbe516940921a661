"""Builds the agent's stages from the config and runs each under the stage supervisor
(agent/service/supervise.py: a failing stage is restarted with backoff, never takes the others
down, and stops the systemd watchdog when it stays down).

Stages talk through the store and small in-memory queues, never through globals:

    sampler --Reading--> telemetry writer --> store
          \\--Reading--> (hooks: demo printer, detector)

With ``[uplink]`` and a detector, two more stages: the router (agent/sync/routing.py; the detector's
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
import signal
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from agent import __version__
from agent.detect.analyzer import CALIBRATION_FILE, Analyzer, LoadedModel
from agent.detect.detector import Detector
from agent.errors import ModelError
from agent.learn.client import LearningClient
from agent.metrics import Registry, write_textfile
from agent.modelstore.assignment import Prepared
from agent.modelstore.cache import ModelCache
from agent.modelstore.fetch import BLOCK_WINDOW, ModelFetcher
from agent.modelstore.stage import AssignmentStage
from agent.ota.compat import check_and_stamp
from agent.sense.hardware import Hardware
from agent.sense.ingest import TelemetryWriter
from agent.sense.sampling import Sampler, channel_resolution
from agent.service.advice import UplinkAdvisor, missing_credential
from agent.service.agentmetrics import register_metrics
from agent.service.commands import CommandRunner, build_commands
from agent.service.config import Config
from agent.service.hooks import AgentHooks
from agent.service.notify import Health, Notifier, announce
from agent.service.status import StatusServer, socket_path
from agent.service.supervise import Supervisor
from agent.service.wallclock import WallClockWatch
from agent.store.queue import Store, StoreStats
from agent.sync.link import CoapProbe, LinkMonitor
from agent.sync.routing import Router
from agent.sync.security import ClientSecurity
from agent.sync.state import StateSync
from agent.sync.transport import CoapTransport, Endpoints
from agent.sync.uplink import Uplink
from agent.sync.walltime import EndpointClock
from drivers.base import Reading
from drivers.clock import Clock, RealClock

if TYPE_CHECKING:
    from agent.ota.controller import UpdateController

log = logging.getLogger(__name__)

ReadingHook = Callable[[Reading], Awaitable[None] | None]

#: A stage busy with one step (a sensor read, a store commit) for longer than this is stuck.
STUCK_AFTER = 60.0
#: READY=1 at the latest this long after start, even if a sensor is still being tried.
READY_WITHIN = 30.0
#: Seconds between refreshes of the queue statistics shown by status.
STATS_INTERVAL = 2.0
#: The storage identity of the device's endpoints, in the data directory (agent/sync/transport.py).
STORE_FILE = "endpoint-store.json"
#: Seconds between checks for sensor health or link changes to report.
STATE_WATCH_INTERVAL = 1.0


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
        self.clock = EndpointClock(clock or RealClock())  # learns the time from the endpoint
        self.rig = rig
        self.on_reading = on_reading
        self.notifier = notifier or Notifier()
        self.hardware = Hardware(config, self.clock, rig)
        self.sampler: Sampler | None = None
        self.store: Store | None = None
        self.writer: TelemetryWriter | None = None
        self.health = Health(self.clock)
        self.supervisor = Supervisor(self.clock, self.health)
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
        self.learner: LearningClient | None = None  # federated rounds (agent/learn/client.py)
        self.analyzer: Analyzer | None = None
        self._stand_in: tuple[Any, Any, tuple[str, ...], Detector] | None = None  # lite tier
        self.model_error: str | None = None
        self.router: Router | None = None
        self.router_transport: CoapTransport | None = None
        self.security: ClientSecurity | None = None  # with [uplink]
        self.uplink_disabled: str | None = None  # why the configured uplink is off this run
        self.assignments: AssignmentStage | None = None  # its cache may open later
        self._status = (
            StatusServer(socket_path(config.agent.data_dir), self.snapshot)
            if status_socket
            else None
        )
        self._stop = asyncio.Event()
        self._ready = asyncio.Event()
        self.exit_code = 0  # agent/service/commands.py EXIT_RESTART after a restart command
        self.commands: CommandRunner | None = None  # remote commands (with [uplink])
        self.updates: UpdateController | None = None  # [update]: agent releases (agent/ota/)

    def request_stop(self) -> None:
        self._stop.set()

    # -- stages -----------------------------------------------------------------------------
    async def _sink(self, reading: Reading) -> None:
        self.readings += 1
        # [data]: drop channels go nowhere, local ones to the detector only
        seen, queued = self.config.data.at_source(reading)
        if self.writer is not None and queued is not None:
            self.writer.submit(queued)
        if self.analyzer is not None and seen is not None:
            self.analyzer.observe(seen)
        if self.on_reading is not None:
            result = self.on_reading(reading)
            if asyncio.iscoroutine(result):
                await result

    def _stuck_checks(self) -> None:
        now = self.clock.monotonic

        def sampler_busy() -> bool:
            assert self.sampler is not None
            return self.sampler.stuck(STUCK_AFTER)

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
        if self.updates is not None:
            self.updates.ready()
        log.info("event=ready sensors_ok=%d", self._sensors_ok())
        # READY=1, then WATCHDOG=1 while no stage is stuck
        await announce(self.notifier, self.health, self.clock, self.status_line)

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
    def link_status(self) -> dict[str, Any]:
        up = self.uplink
        if up is None:
            if self.uplink_disabled is not None:
                return {"state": "disabled", "reason": self.uplink_disabled}
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
                "salvaged": stats.salvaged,
                "salvage_lost": stats.salvage_lost,
                "set_aside": stats.set_aside,  # refused by the endpoint, in DATA/rejected/
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
            "link": self.link_status(),
            "state": self.state.status if self.state is not None else None,
            "learn": self.learner.status() if self.learner is not None else None,
            "models": self._models_status(),
            "model_cache": self.assignments.status() if self.assignments else None,
            "detect": self.analyzer.status() if self.analyzer else None,
            "routing": self.router.snapshot() if self.router else None,
            "last_alert": self._last_alert(),
            "stuck": self.health.stuck(),
            "stages": self.supervisor.status(),
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

    def _private_inputs(self) -> frozenset[str]:
        """The model channels read from ``local`` channels ([data], [detect.inputs])."""
        d, local = self.config.detect, self.config.data.local_channels
        return frozenset(m for m, key in (d.inputs.items() if d else ()) if key in local)

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
            self.analyzer.private = self._private_inputs()
        except ModelError as err:
            self.model_error = str(err)
            log.error("event=detect_disabled error=%r", str(err))

    # -- run --------------------------------------------------------------------------------
    async def run(self, *, install_signals: bool = True) -> None:
        loop = asyncio.get_running_loop()
        if install_signals:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, self.request_stop)
        check_and_stamp(self.config.agent.data_dir, self.config.store.path)  # docs/ota.md
        self.store = await Store.open(self.config.store, clock=self.clock)
        wall = WallClockWatch(  # before the first put of this run
            self.store, self.clock, settle=self.config.store.commit_window
        )
        withheld = self.config.data.withheld_sensors  # their error texts stay in the journal
        self.sampler = Sampler(self.hardware.build(), self.clock, self._sink, withheld=withheld)
        self._build_uplink()
        if self.uplink is not None:  # records taken before NTP leave restamped
            self.uplink.wall_settled = wall.settled
            self.uplink.endpoint_time = self.clock  # or from the endpoint: agent/sync/walltime.py
        self._load_analyzer()
        self._build_router()
        self._build_models()
        self.writer = TelemetryWriter(
            self.store,
            self.clock,
            window=self.config.store.commit_window,
            on_commit=self.uplink.poke if self.uplink else None,
        )
        self._build_state()
        self._stuck_checks()
        register_metrics(self, self.metrics)
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
        sup = self.supervisor
        try:
            sampler = sup.start("sampler", self.sampler.run)
            writer = sup.start("store-writer", self.writer.run)
            detector = sup.start("detector", self.analyzer.run) if self.analyzer else None
            others = [
                sup.start("ready-watchdog", self._announce_ready),
                sup.start("metrics", self._metrics_loop),
                sup.start("stats", self._stats_loop),
                sup.start("wall-clock", wall.run),
            ]
            others.append(sup.start("uplink-advice", self._advisor().run))
            if self.uplink is not None:
                others.append(sup.start("uplink", self.uplink.run))
            if self.link is not None:
                others.append(sup.start("link", self.link.run))
            if self.router is not None:
                others.append(sup.start("routing", self.router.run))
            if self.state is not None:
                others.append(sup.start("state", self.state.run))
                others.append(sup.start("state-watch", self._watch_state))
            if self.learner is not None:
                others.append(sup.start("learn", self.learner.run))
            if self.commands is not None:
                others.append(sup.start("commands", self.commands.run))
            if self.assignments is not None:  # the model cache opened again while it cannot
                others.append(sup.start("model-cache", self.assignments.run))
            if self.updates is not None:
                others.append(sup.start("update", self.updates.run))
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
            await asyncio.wait(others)
        finally:
            await self._shutdown(install_signals)

    async def _shutdown(self, install_signals: bool) -> None:
        if self.sampler is not None:
            await self.sampler.close()
        self.hardware.close()
        if self.assignments is not None:  # and the model cache
            await self.assignments.close()
        if self.router is not None:  # pending validations and verdicts survive the restart
            await self.router.save()
        if self.router_transport is not None:
            await self.router_transport.close()
        if self.transport is not None:
            await self.transport.close()
        if self.security is not None:
            self.security.close()
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

    def _advisor(self) -> UplinkAdvisor:
        """Says when records stay on the device, and what to do (agent/service/advice.py)."""
        cfg = self.config
        return UplinkAdvisor(
            self.clock,
            device_id=cfg.agent.device_id,
            config_path=cfg.path,
            configured=cfg.uplink is not None,
            uplink=self.uplink,
            disabled=self.uplink_disabled,
            credential=cfg.uplink.credential if cfg.uplink else None,
            queued=lambda: self.last_stats.depth if self.last_stats else None,
        )

    def _build_uplink(self) -> None:
        settings = self.config.uplink
        if settings is None:
            return
        data = self.config.agent.data_dir
        credential = settings.credential or data / "credential.json"
        if settings.security != "none" and not credential.exists():
            # not provisioned yet: sample and queue, and say what to do (the advisor)
            self.uplink_disabled = missing_credential(credential, self.config.agent.device_id)
            return
        self.security = ClientSecurity.open(
            settings.security,
            settings.endpoints,
            credential,
            settings.security_state or data / "oscore.json",
        )
        # one lane per outstanding batch, one for the link monitor's probes, one for state
        self.transport = CoapTransport(
            self.clock,
            lanes=settings.max_inflight + 2,
            uris=settings.endpoints,
            security=self.security,
        )
        self.endpoints = Endpoints(
            settings.endpoints,
            self.clock,
            primary_retry=settings.primary_retry,
            store_path=data / STORE_FILE,
        )
        self.uplink = Uplink(
            settings,
            self.store,
            self.transport,
            self.endpoints,
            self.clock,
            device_id=self.config.agent.device_id,
            resolution=self.resolution,
            data=self.config.data,
        )
        self.uplink.private = self._private_inputs()  # alerts queued before they were local
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
        if self.analyzer.private:  # windows of local channels never leave ([data])
            log.info(
                "event=cloud_routing_off reason=local_inputs channels=%s",
                ",".join(sorted(self.analyzer.private)),
            )
            return
        endpoints = self.endpoints
        self.router_transport = CoapTransport(
            self.clock, lanes=1, uris=endpoints.uris, security=self.security
        )
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

    @property
    def model_cache(self) -> ModelCache | None:
        return self.assignments.cache if self.assignments is not None else None

    def _build_models(self) -> None:
        """Model assignment (desired ``model/<role>``): signed models fetched from the endpoint
        into the model cache and swapped into the running analyzer; only with [uplink] and a
        running detector. A cache the device cannot open now is opened again with backoff
        (agent/modelstore/stage.py); one refused disables assignment, never detection."""
        a = self.analyzer
        if a is None or self.endpoints is None or self.config.detect is None:
            return
        d = self.config.detect.detect
        endpoints = self.endpoints
        fetcher = ModelFetcher(  # a transport of its own, closed with the cache on stop
            CoapTransport(
                self.clock, lanes=BLOCK_WINDOW, uris=endpoints.uris, security=self.security
            ),
            lambda: endpoints.current,
            endpoint_path=self.config.models.endpoint_path,
        )
        self.assignments = AssignmentStage(
            lambda: ModelCache.open(
                self.config.models,
                clock=self.clock,
                shipped_dir=d.models_dir,
                fetcher=fetcher,
                runtime=d.runtime,
                num_threads=d.num_threads,
                batch_mode=d.batch_mode,
            ),
            a,
            d.classifier,
            self._assignable_detector,
            self.clock,
            on_ready=self._model_ready,
            desired_version=self._desired_version,
            changed=self._state_changed,
            fetcher=fetcher,
        )
        self.assignments.open()

    def _desired_version(self, key: str) -> int | None:
        return self.state.applied_version(key) if self.state is not None else None

    def _state_changed(self) -> None:
        if self.state is not None:
            self.state.changed()

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
        kept = self._stand_in  # the same stand-in while the full tier's models stay
        if (
            kept is None
            or kept[0] is not full
            or kept[1] is not a.classifier
            or kept[2] != tuple(a.classes)
        ):
            stand_in = Detector.from_entry(
                full.model,
                full.entry,
                settings=a.settings.detect,
                classifier=a.classifier,
                classes=a.classes,
            )
            self._stand_in = kept = (full, a.classifier, tuple(a.classes), stand_in)
        return kept[3]

    def _model_ready(self, role: str, p: Prepared) -> None:
        """A model was swapped in (or, lightweight, made ready): keep the analyzer's tiers and
        classifier in step, so a later tier switch uses it, and the router's edge models. A lite
        model is refused (ModelError, nothing changed) for other channels or a failed warm-up."""
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
            checked = None
            if tier == "lite" and a.tier == "lite":  # the running lite detector takes it now
                with contextlib.suppress(ModelError):  # other features: primed anew, below
                    checked = a.detector.check_swap(
                        p.model, entry=p.entry, threshold=a.threshold_override, warm=False
                    )
                while checked is not None and checked.cold:  # on its newest real window
                    checked = a.detector.warm_up(checked)  # ModelError: refused, nothing changed
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
            if checked is not None:
                a.detector.install(checked)
            elif tier == "lite" and a.tier == "lite":  # a new detector primed from kept rows
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
            link=self.link_status,
            analyzer=lambda: getattr(self, "analyzer", None),
            models=self.assignments,
            learner=self._build_learner(),
            commands=self._build_commands(),
            updates=self._build_updates(),
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

    def _build_updates(self) -> UpdateController | None:
        if self.config.update is None:
            return None
        # imported at first use (the running agent's memory): release unpacking, tarfile, install
        from agent.ota.controller import build_updates

        self.updates = build_updates(self)
        return self.updates

    def _build_commands(self) -> CommandRunner:
        self.commands = build_commands(self)
        return self.commands

    def _build_learner(self) -> LearningClient | None:
        """Federated rounds (agent/learn/client.py): with a detector, an uplink and [learn]."""
        a = self.analyzer
        if a is None or self.transport is None or self.endpoints is None:
            return None
        if not self.config.learn.enabled:
            return None
        if a.private:  # the model reads a `local` channel: nothing derived from it leaves
            log.info("event=learn_disabled reason=local_channels channels=%s", ",".join(a.private))
            return None

        def shape() -> tuple[int, int] | None:
            spec = a.detector.spec
            return (spec.steps, len(spec.channels))

        self.learner = LearningClient(
            self.config.learn,
            self.transport,
            self.endpoints,
            self.clock,
            device_id=self.config.agent.device_id,
            data_dir=self.config.agent.data_dir,
            window_shape=shape,
            link_state=lambda: self.link_status().get("state"),
            changed=lambda: self.state.changed() if self.state is not None else None,
            lane=self.config.uplink.max_inflight + 1 if self.config.uplink else 0,
        )
        a.detector.normal_sink = self.learner.ring.add
        return self.learner

    async def _watch_state(self) -> None:
        """Wake the state reporter when a sensor's health or the link state changes."""
        assert self.sampler is not None and self.state is not None
        last = None
        while True:
            seen = (
                tuple((name, h.state.value) for name, h in self.sampler.health.items()),
                self.link_status().get("state"),
            )
            if last is not None and seen != last:
                self.state.changed()
            last = seen
            await self.clock.sleep(STATE_WATCH_INTERVAL)

    def resolution(self, sensor: str, channel: str) -> float | None:
        """The step of a reported channel (agent/sense/sampling.py channel_resolution)."""
        try:
            cfg = self.config.sensor(sensor)
        except KeyError:
            return None
        if self.sampler is None or sensor not in self.sampler.tasks:
            return cfg.resolution.get(channel)
        return channel_resolution(cfg, self.sampler.tasks[sensor].driver, channel)
