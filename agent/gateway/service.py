"""``edge-agent gateway --config FILE``: the tier between devices and the cloud (docs/gateway.md).

A gateway serves the device protocol to the devices behind it with the endpoint's own server
(cloud.server.CloudServer over an SQLite store in the gateway's data directory): OSCORE with each
device's credential, ingest committed before the ack, reported and desired state, the model
registry, validation inference. Toward the cloud it is one principal of role ``gateway``
(its own credential, ``[uplink]``), attached by an operator to the devices it serves
(``edge-agent-cloud gateways attach``), and it forwards for them (agent/gateway/relay.py).

Start-up: the device credentials in ``[gateway] credentials`` (the files ``edge-agent-cloud
devices add`` wrote, one JSON per device) are registered in the gateway's store; before it
listens, the gateway takes the cloud's storage identity (from a desired document it reads as
that device's gateway), so that acks and desired documents name one storage wherever a device
gets them, and a device can fall back between gateway and cloud. With the cloud unreachable on
the very first start the gateway waits for it (it has nothing to answer for yet); after that it
starts and serves from its store whatever the cloud's state.

Running: its loops (records, reported, desired; peers with ``[gateway.peers]``) are stages of
the agent's supervisor (:class:`Stages`): one that raises what it does not retry is said in one
line and restarted with backoff, never ends silently, and ``status()["loops"]`` shows it.

Under systemd (systemd/edge-agent-gateway.service, Type=notify) the command gives an
:class:`Announcer` (agent.service.notify's): ``READY=1`` once the store is open and the servers
listen, then ``WATCHDOG=1`` while no loop has been down too long (the supervisor's health), so
systemd restarts a gateway whose loop stays down; ``STATUS=`` says :meth:`Gateway.status_line`;
``STOPPING=1`` at SIGTERM.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any, Protocol

from agent.errors import ConfigError, SyncError
from agent.gateway.learnrelay import LearnRelay
from agent.gateway.peers import PeerServer, PeerState, PeerSync
from agent.gateway.peersecurity import PeerContexts
from agent.gateway.relay import (
    RETRIED,
    RecordForwarder,
    StateRelay,
    mirror_desired,
    prepare_store,
    run_every,
)
from agent.gateway.releases import ReleaseMirror
from agent.gateway.settings import GatewayConfig
from agent.modelstore.fetch import BLOCK_WINDOW, ModelFetcher
from agent.ota.updater import ReleaseFetcher
from agent.sync.security import ClientSecurity
from agent.sync.transport import CoapTransport, Endpoints
from agent.sync.walltime import EndpointClock
from agent.wire.batch import CF_CBOR
from agent.wire.credentials import Credential, CredentialError
from agent.wire.statedoc import DesiredDoc, StateError
from cloud.server import CloudServer
from cloud.storage import SQLiteStorage
from drivers.clock import Clock

log = logging.getLogger("agent.gateway")

STORE_RETRY = 5.0  # seconds between tries to learn the cloud's storage identity on first start
LEARN_LANES = 2  # its devices' learning exchanges with the cloud, at most this many at once
MODEL_PARTS = "model-downloads"  # the partial downloads of models (gateway/modelparts.py)
STORE_DIR = "store"  # the gateway's endpoint data (SQLite, models, OSCORE state) under data_dir
ALERT_CHECK = 0.5  # seconds between looks for an alert waiting to be forwarded
#: seconds a loop's round may run before the loop counts as stuck (a forwarding pass of a long
#: backlog over a slow link is many requests, each with its deadline)
HUNG_AFTER = 900.0
STATS_INTERVAL = 5.0  # seconds between counts of the records waiting (the status line's)


class Stages(Protocol):
    """What runs the gateway's loops: the agent's stage supervisor
    (agent.service.supervise.Supervisor, given by the ``edge-agent gateway`` command; this
    package may not import agent.service). A loop that raises is said in one line (its
    exception's type and message), restarted with backoff, shown in :meth:`status`, and
    reported to its health checks when down too long."""

    clock: Clock

    def start(self, name: str, run: Callable[[], Awaitable[None]]) -> asyncio.Task[None]: ...

    def heartbeat(self, name: str, deadline: float) -> Callable[[], None]:
        """A beat for ``name``: stuck to the health once ``deadline`` s pass without one."""

    def status(self) -> dict[str, dict[str, object]]: ...


class Announcer(Protocol):
    """The service manager's side (agent.service.notify.Announcer, given by the ``edge-agent
    gateway`` command): :meth:`run` says the gateway is up, then keeps its watchdog fed while
    no stage is stuck, until cancelled; :meth:`stopping` says it is stopping."""

    async def run(self, status: Callable[[], str]) -> None: ...

    def stopping(self) -> None: ...


class Gateway:
    """One gateway process's parts (see the module docstring). ``stages`` runs its loops (and
    gives the clock); ``announcer``, when given, is told when it is up and stopping."""

    def __init__(
        self, config: GatewayConfig, stages: Stages, announcer: Announcer | None = None
    ) -> None:
        self.config = config
        self.stages = stages
        self.announcer = announcer
        # records waiting to be forwarded, counted every STATS_INTERVAL (None: the count failed)
        self.waiting: int | None = 0
        # its own clock, or while that is not set the cloud's time (agent/sync/walltime.py):
        # its devices get it in their acks
        self.clock = EndpointClock(stages.clock)
        self.store_dir = config.data_dir / STORE_DIR
        self.server: CloudServer | None = None
        self.devices: list[str] = []
        up = config.uplink
        credential = up.credential or config.data_dir / "credential.json"
        self.security = ClientSecurity.open(
            up.security,
            up.endpoints,
            credential,
            up.security_state or config.data_dir / "oscore.json",
        )
        self.transport = CoapTransport(
            self.clock, lanes=3, uris=up.endpoints, security=self.security
        )
        self.endpoints = Endpoints(up.endpoints, self.clock, primary_retry=up.primary_retry)
        fetch_transport = CoapTransport(
            self.clock, lanes=BLOCK_WINDOW, uris=up.endpoints, security=self.security
        )
        self.fetcher = ModelFetcher(fetch_transport, lambda: self.endpoints.current)
        self.release_fetcher = ReleaseFetcher(fetch_transport, lambda: self.endpoints.current)
        self.releases: ReleaseMirror | None = None
        # its devices' federated-learning exchanges, passed to the cloud (agent/gateway/learnrelay)
        self.learn_transport = CoapTransport(
            self.clock, lanes=LEARN_LANES, uris=up.endpoints, security=self.security
        )
        self.learn = LearnRelay(self.learn_transport, lambda: self.endpoints.current, LEARN_LANES)
        self.peer_state: PeerState | None = None  # [gateway.peers]
        self.peer_server: PeerServer | None = None
        self.peer_sync: PeerSync | None = None
        self.peer_transport: CoapTransport | None = None
        self.peer_contexts: PeerContexts | None = None  # [gateway.peers] secret
        self.forwarder: RecordForwarder | None = None
        self.state: StateRelay | None = None
        self._stop = asyncio.Event()
        self._last_pass = -math.inf  # monotonic time of the last forwarding pass
        self._records_beat: Callable[[], None] = lambda: None  # the records loop's (_serve)

    # -- start-up -------------------------------------------------------------------------------
    def _credentials(self) -> list[Credential]:
        folder = self.config.gateway.credentials
        try:
            files = sorted(folder.glob("*.json"))
        except OSError as err:
            raise ConfigError(str(self.config.path), "gateway.credentials", str(err)) from None
        out = []
        for f in files:
            try:
                cred = Credential.read(f)
            except CredentialError as err:
                raise ConfigError(str(f), "", str(err)) from None
            if cred.role != "device":
                raise ConfigError(str(f), "", f"a {cred.role} credential; devices only")
            out.append(cred)
        return out

    def _register(self, creds: list[Credential], store_id: str | None, check: bool = True) -> str:
        """The devices and their credentials into the gateway's store (given ``creds``, a
        device's credential stored at an earlier start whose file is gone is revoked: the
        gateway refuses it, 4.01); its storage identity becomes ``store_id`` (the cloud's) when
        given. Returns the identity it has. ``check``: read the store for damage first (the
        first open of a start: cloud/sqlitecheck.py)."""
        s = SQLiteStorage.in_dir(self.store_dir, check)
        try:
            prepare_store(s)  # before the server opens the store (it looks for the floors)
            now = time.time()
            for cred in creds:
                s.add_device(cred.principal, now)
                s.put_credential(cred, now)
            named = {cred.principal for cred in creds}
            for old, revoked in s.credentials() if creds else ():
                if old.role == "device" and not revoked and old.principal not in named:
                    s.revoke(old.principal, now)
                    log.warning(
                        "event=gateway_device_removed device=%s: its credential file is gone "
                        "from %s; the gateway refuses it", old.principal,
                        self.config.gateway.credentials,
                    )  # fmt: skip
            if store_id is not None and s.storage_id() != store_id:
                s.set_migration(store_id, done=True)
                log.info("event=gateway_storage store=%s (the cloud's)", store_id)
            return s.storage_id()
        finally:
            s.close()

    async def _cloud_store(self) -> str:
        """The cloud's storage identity, from a desired document read upstream, as each of its
        devices in turn (the cloud may refuse one: detached, or moved to another gateway)."""
        tries = 0
        while True:
            device = self.devices[tries % len(self.devices)]
            tries += 1
            uri = f"{self.endpoints.current}/state/{device}/desired"
            try:
                resp = await self.transport.request("GET", uri, accept=CF_CBOR, deadline=30.0)
                if resp.success:
                    store = DesiredDoc.from_cbor(resp.payload).store
                    if store is not None:
                        return store
                log.warning("event=gateway_cloud_refused uri=%s code=%s", uri, resp.dotted)
            except (SyncError, StateError) as err:
                log.warning("event=gateway_waiting_for_cloud error=%r", str(err))
            self.endpoints.failed(self.endpoints.current)
            await self.clock.sleep(STORE_RETRY)

    async def start(self) -> CloudServer:
        creds = await asyncio.to_thread(self._credentials)
        if not creds:
            raise ConfigError(
                str(self.config.path), "gateway.credentials",
                f"no device credentials in {self.config.gateway.credentials}",
            )  # fmt: skip
        self.devices = [c.principal for c in creds]
        known = await asyncio.to_thread(self._register, creds, None)
        marker = self.store_dir / "cloud-store"
        if not marker.exists() or marker.read_text(errors="replace").strip() != known:
            store = await self._cloud_store()
            await asyncio.to_thread(self._register, [], store, False)
            marker.write_text(store + "\n")
        g = self.config.gateway
        try:
            self.server = await CloudServer.start(  # checked for damage by _register
                self.store_dir,
                g.host,
                g.port,
                storage_factory=lambda: SQLiteStorage.in_dir(self.store_dir, check=False),
                clock=self.clock,
            )
        except OSError as err:
            if err.filename is not None or not err.strerror:
                raise
            # the listen check's line, made for the operator (cloud/listen.py listen_error)
            raise SyncError(f"cannot serve the devices: {err.strerror}") from err
        server = self.server
        server.rotation_refusal = (
            f"gateway {self.config.name} holds a copy of this device's credential: rotate it at "
            "the cloud (devices rekey) and give the gateway the new file"
        )
        self.forwarder = RecordForwarder(
            server.db, self.transport, lambda: self.endpoints.current, self.config.data_dir,
            name=self.config.name, records=g.forward_records, lane=1, keep=g.keep_forwarded,
            wall=self.clock.time, time_from=self.clock, devices=lambda: self.devices,
        )  # fmt: skip
        server.batch_observer = self.forwarder.resolutions.observe
        server.learn_upstream = self.learn
        self.releases = ReleaseMirror(self.release_fetcher, server.db, self.config.data_dir / "ota")
        self.state = StateRelay(
            server.db, self.transport, lambda: self.endpoints.current, lambda: self.devices,
            on_desired=self._mirror, fetcher=self.fetcher, put_model=self._put_model,
            has_model=self._has_model, releases=self.releases.of, lane=2,
            scratch=self.config.data_dir / MODEL_PARTS,
        )  # fmt: skip
        if g.peers is not None:
            p = g.peers
            self.peer_state = PeerState(self.config.name, p.state, self.clock)
            # with a site secret: OSCORE between the peers (agent/gateway/peersecurity.py)
            if p.secret is not None and p.oscore_state is not None:
                self.peer_contexts = PeerContexts(
                    self.config.name, p.named, p.secret, p.oscore_state
                )
            self.peer_server = await PeerServer.start(
                self.peer_state, p.host, p.port, contexts=self.peer_contexts
            )
            self.peer_transport = CoapTransport(
                self.clock, lanes=1, uris=p.peers, security=self.peer_contexts
            )
            self.peer_sync = PeerSync(
                self.peer_state, p.peers, self.peer_transport, period=p.period
            )
        log.info(
            "event=gateway_listening uri=%s devices=%d upstream=%s",
            server.uri, len(self.devices), ",".join(self.config.uplink.endpoints),
        )  # fmt: skip
        return server

    # -- the registry and desired state ---------------------------------------------------------
    async def _has_model(self, name: str, version: str) -> bool:
        assert self.server is not None
        return await self.server.db(lambda s: s.model(name, version) is not None)

    async def _put_model(self, name: str, version: str, manifest: bytes, data: bytes) -> bool:
        assert self.server is not None
        now = time.time()
        return bool(await self.server.db(lambda s: s.put_model(name, version, manifest, data, now)))

    async def _mirror(self, device: str, doc: DesiredDoc) -> None:
        server = self.server
        assert server is not None
        served = await server.db(lambda s: mirror_desired(s, device, doc, time.time()))
        server._observers.changed(device, served.etag())
        log.info(
            "event=gateway_desired device=%s rev=%d keys=%d", device, doc.rev, len(doc.entries)
        )

    # -- running --------------------------------------------------------------------------------
    async def run(self) -> None:
        try:
            if await self._started():
                await self._serve()
        finally:
            try:
                await self.close()
            except Exception as err:  # never hides what stopped it
                log.warning("event=gateway_close_failed error=%r", str(err))

    async def _started(self) -> bool:
        """Start, unless a stop comes first (the start waits for the cloud's storage identity at
        the first start): False then. What stops the start is raised."""
        starting = asyncio.create_task(self.start())
        stopping = asyncio.create_task(self._stop.wait())
        try:
            await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopping.cancel()
            if not starting.done():
                starting.cancel()
            await asyncio.gather(starting, stopping, return_exceptions=True)
        if starting.cancelled():
            log.info("event=gateway_stopped while=starting")
            return False
        starting.result()  # raises what stopped the start
        return True

    async def _serve(self) -> None:
        state = self.state
        assert self.forwarder is not None and state is not None
        g = self.config.gateway

        sleep = self.clock.sleep
        every: dict[str, tuple[float, Callable[[], Awaitable[Any]]]] = {
            "records": (ALERT_CHECK, self._forward),
            "reported": (g.forward_interval, state.reported_once),
            "desired": (g.desired_poll, state.desired_once),
        }
        # a round that never ends (a hung store, a lock) stops its loop's beats: stuck
        beats = {
            name: self.stages.heartbeat(f"{name}-hung", max(HUNG_AFTER, 4 * seconds))
            for name, (seconds, _) in every.items()
        }
        self._records_beat = beats["records"]  # a backlog's drain beats after each pass too
        loops: dict[str, Callable[[], Awaitable[None]]] = {
            name: partial(run_every, seconds, work, name, sleep, beats[name])
            for name, (seconds, work) in every.items()
        }
        if self.peer_sync is not None:
            hung = max(HUNG_AFTER, 4 * self.peer_sync.period)
            loops["peers"] = partial(self.peer_sync.run, self.stages.heartbeat("peers-hung", hung))
        loops["stats"] = self._count_waiting
        if self.announcer is not None:  # up: the store is open and the servers listen
            loops["ready-watchdog"] = partial(self.announcer.run, self.status_line)
        # a loop that raises what run_every does not retry is said and restarted, never ends
        tasks = [self.stages.start(name, run) for name, run in loops.items()]
        try:
            await self._stop.wait()
            if self.announcer is not None:
                self.announcer.stopping()
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _count_waiting(self) -> None:
        """The ``stats`` loop. A count that fails (a store that cannot be read: the records
        loop fails on it too, and that is what the watchdog counts) never stops this loop: the
        number becomes unknown (``?``) and the failure is said once, until a count succeeds."""
        forwarder = self.forwarder
        assert forwarder is not None
        failed = ""
        while True:
            try:
                self.waiting, failed = await forwarder.waiting(), ""
            except Exception as err:
                what = f"{type(err).__name__}: {err}"
                if what != failed:
                    log.warning("event=gateway_waiting_unknown error=%r", what)
                self.waiting, failed = None, what
            await self.clock.sleep(STATS_INTERVAL)

    async def _forward(self) -> None:
        """A pass when ``forward_interval`` has passed since the last (readings merge into
        larger, better-compressed batches meanwhile), or at once when an alert waits."""
        assert self.forwarder is not None
        now = self.clock.monotonic()
        due = now - self._last_pass >= self.config.gateway.forward_interval
        if not due and not await self.forwarder.alerts_waiting():
            return
        self._last_pass = now
        limit = self.config.gateway.forward_records
        try:
            # one pass per interval (what arrives meanwhile waits for the next: larger
            # batches); a full pass means a backlog (after an outage): go on until it is drained
            # (each pass bounded, so each beats: a drain longer than HUNG_AFTER is not stuck)
            while await self.forwarder.forward_once() >= limit:
                self._records_beat()
        except RETRIED:
            raise  # run_every says it and tries again after the interval
        except Exception:
            self._last_pass = -math.inf  # tried again as soon as the supervisor restarts it
            raise

    def stop(self) -> None:
        self._stop.set()

    async def close(self) -> None:
        if self.peer_server is not None:
            await self.peer_server.stop()
        if self.peer_state is not None:
            await self.peer_state.flush()
        if self.server is not None:
            await self.server.stop()
        if self.peer_transport is not None:
            await self.peer_transport.close()
        if self.peer_contexts is not None:
            self.peer_contexts.close()
        await self.transport.close()
        await self.learn.close()  # its fetches end before their transport closes
        await self.learn_transport.close()
        await self.fetcher.close()

    def status_line(self) -> str:
        """One line for ``systemctl status`` (STATUS=)."""
        down = [name for name, s in self.stages.status().items() if s["down"]]
        waiting = "?" if self.waiting is None else self.waiting
        return (
            f"devices {len(self.devices)}; waiting {waiting}; "
            f"loops down: {', '.join(down) if down else 'none'}"
        )

    def status(self) -> dict[str, Any]:
        f, st = self.forwarder, self.state
        return {
            "loops": self.stages.status(),  # restarts, down, last_error of each loop
            "devices": len(self.devices),
            "forwarded": f.forwarded if f else 0,
            "requests_up": f.requests if f else 0,
            "bytes_up": f.bytes_up if f else 0,
            "entries_later": f.later.entries if f else 0,  # over a device's rate limit upstream
            "entries_refused": f.later.refusals if f else 0,  # refused otherwise (4.03, ...)
            "records_unreadable": f.unreadable if f else 0,  # damaged at rest: set aside
            "records_refused": f.refused if f else 0,  # refused alone (4.00): set aside
            "resolutions_evicted": f.resolutions.evicted if f else 0,  # steps over the bound
            "model_fetches": dict(st.model_fetches) if st else {},
            "learn_masters_fetched": self.learn.fetches,  # by SHA-256, each once while kept
            "learn_uploads": self.learn.uploads,  # devices' round uploads the cloud took
            "release_fetches": dict(self.releases.fetches) if self.releases else {},
        }


def run_gateway(config: GatewayConfig, stages: Stages, announcer: Announcer | None = None) -> int:
    """The ``edge-agent gateway`` command: run until SIGINT/SIGTERM; 0 when stopped (``announcer``:
    systemd's notify protocol, :class:`Announcer`). An error
    that stops it is raised on: the command line prints it as one line and exits with its code
    (``edge-agent`` main: a port in use 75, a store error 74, ...), as ``run`` does."""
    import signal

    async def main() -> None:
        gw = Gateway(config, stages, announcer)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, gw.stop)
        await gw.run()

    asyncio.run(main())
    return 0
