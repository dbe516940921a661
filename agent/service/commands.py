"""Remote commands on the device (docs/protocol.md "Remote commands and logs", docs/ops.md).

Commands arrive as desired keys ``command/<name>`` = ``{"id", ? "args"}`` through state sync,
which hands each new desired version to :meth:`CommandRunner.apply` (through
:class:`agent.service.hooks.AgentHooks`). The runner executes each *id* at most once: it keeps
the last id done per command in ``commands.json`` in the data directory (written atomically),
so a restart, which makes state sync apply the persisted desired values again, re-runs nothing.
The outcome is reported as ``command/<name>`` = ``{"id", "status", "result", "at"}``.

- ``selftest``: the running agent's probe: every sensor's health as the sampler sees it (the
  sensors stay open: a second opening of a serial port or a bus would disturb the running
  reads), the queue depth and the link state; ``failed`` when a required sensor is not ok.
- ``restart``: refused until the agent has run :data:`RESTART_SETTLE` seconds (systemd's start
  limit); then recorded as done *before* the agent stops with :data:`EXIT_RESTART` (75,
  EX_TEMPFAIL), which systemd's ``Restart=on-failure`` restarts; so it can never loop (a
  record that cannot be written, a full disk: ``failed``, and the agent goes on).
- ``flush``: wakes the uplink now and reports the queue depth before and after (at most
  :data:`FLUSH_WAIT` seconds later).
- ``rotate``: the device makes a new credential itself (new random secrets, generation + 1),
  keeps it as ``<credential>.next``, posts it to the endpoint under its current OSCORE context
  and, once the endpoint confirmed that it stored it, is recorded done (``{"generation": N}``,
  never a secret), replaces its credential file, drops its OSCORE state and restarts like
  ``restart`` (agent/sync/rotation.py has the steps and the recovery after a crash). Refused
  without an OSCORE-protected uplink.
- ``logs``: uploads the log ring's lines since ``args.since`` (agent/service/logring.py) at the
  lowest priority; refused without an uplink.
- ``requeue``: puts the records set aside as refused by the endpoint (``DATA/rejected/``; all,
  or the one of ``args.seq``) back into the queue as new records once the cause is fixed
  (:meth:`agent.store.queue.Store.requeue`) and wakes the uplink; ``failed`` when something
  stopped it or a file could not be read (such files stay).

A command whose arguments are wrong is reported ``refused`` with the reason, never run.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from agent.exits import EX_TEMPFAIL
from agent.files import read_json, write_atomic
from agent.service.logring import LOG_DIR, LogRing, LogUploader, coap_post
from agent.sync.rotation import (
    CREDENTIAL_PATH,
    ROTATE_DEADLINE,
    RotationFailed,
    Rotator,
    coap_send_with,
)
from agent.wire import commands as wire
from agent.wire.records import Kind

log = logging.getLogger(__name__)

#: The agent's exit code when a ``restart`` command stops it (systemd restarts it).
EXIT_RESTART = EX_TEMPFAIL
#: The file, in the data directory, of the last command done per name.
COMMANDS_FILE = "commands.json"
#: Seconds the agent must have run before a ``restart`` stops it: systemd starts the unit at most
#: StartLimitBurst=5 times in StartLimitIntervalSec=10min (systemd/edge-agent.service), restarts
#: included, so faster restarts would leave it stopped for good, with nothing left to take a
#: command. 10 min / (5 - 1).
RESTART_SETTLE = 150.0
#: Seconds a ``flush`` waits for the queue to drain before it reports.
FLUSH_WAIT = 30.0
FLUSH_POLL = 0.5
ROTATE_REFUSAL = (
    'not supported without [uplink] security = "oscore": rekey with edge-agent-cloud devices '
    "rekey and reflash the credential (tools/flash --credential)"
)

Probe = Callable[[], Awaitable[dict[str, Any]]]


class CommandRunner:
    """Runs the commands the desired state names, once per id, and keeps their outcomes.

    Collaborators (each optional: a command whose part is missing is refused): ``selftest()``
    and ``flush()`` coroutines giving the result map, ``restart()`` to stop the agent for a
    restart, ``logs(since)`` a coroutine uploading the log ring's lines since a time,
    ``rotator`` the credential's :class:`~agent.sync.rotation.Rotator` (``rotate`` needs
    ``restart`` too). ``changed()`` wakes the state reporter."""

    def __init__(
        self,
        data_dir: Path,
        *,
        clock_time: Callable[[], float] = time.time,
        selftest: Probe | None = None,
        flush: Probe | None = None,
        restart: Callable[[], None] | None = None,
        logs: Callable[[float | None], Awaitable[dict[str, Any]]] | None = None,
        changed: Callable[[], None] = lambda: None,
        ring: logging.Handler | None = None,
        rotator: Rotator | None = None,
        requeue: Callable[[int | None], Awaitable[dict[str, Any]]] | None = None,
        uptime: Callable[[], float] | None = None,
    ) -> None:
        self.ring = ring  # installed on the root logger from now until run() ends
        if ring is not None:
            logging.getLogger().addHandler(ring)
        self.path = Path(data_dir) / COMMANDS_FILE
        self.time = clock_time
        self.selftest = selftest
        self.flush = flush
        self.restart = restart
        self.logs = logs
        self.changed = changed
        self.rotator = rotator
        self.requeue = requeue
        self.uptime = uptime  # seconds since this process started (None: not known)
        self.done: dict[str, dict[str, Any]] = self._load()
        self._queue: asyncio.Queue[tuple[str, int, dict[str, Any]]] = asyncio.Queue()
        self._queued: dict[str, int] = {}

    # -- state sync's side ----------------------------------------------------------------------
    def apply(self, name: str, value: Any) -> None:
        """A desired ``command/<name>``: queue a new id, refuse bad arguments, ignore an id done
        already (a restart re-applies persisted desired values) and an unset key."""
        if value is None:
            return
        if name not in wire.NAMES:  # (state sync checked both; a direct caller may not have)
            raise ValueError(f"unknown command {name[:32]!r} (known: {', '.join(wire.NAMES)})")
        problem = wire.check_value(value)
        if problem is not None:
            raise ValueError(f"command/{name}: expected {problem}")
        command_id = value["id"]
        if command_id <= self.last_id(name) or command_id <= self._queued.get(name, 0):
            log.debug("event=command_seen name=%s id=%d", name, command_id)
            return
        try:
            args = wire.check_args(name, value.get("args"))
        except wire.CommandError as err:
            self._finish(name, command_id, "refused", {"error": str(err)[: wire.MAX_TEXT]})
            return
        self._queued[name] = command_id
        self._queue.put_nowait((name, command_id, args))
        log.info("event=command_queued name=%s id=%d", name, command_id)

    def reported(self) -> dict[str, Any]:
        return {f"command/{name}": dict(outcome) for name, outcome in sorted(self.done.items())}

    def last_id(self, name: str) -> int:
        return int(self.done.get(name, {}).get("id", 0))

    # -- the stage --------------------------------------------------------------------------------
    async def run(self) -> None:
        """Run queued commands one at a time until cancelled (then the log ring comes off the
        root logger); meanwhile settle a credential rotation a crash left pending."""
        if self.ring is not None:
            logging.getLogger().addHandler(self.ring)  # again after a restart of the stage
        settle = None
        if self.rotator is not None and self.restart is not None:
            settle = asyncio.get_running_loop().create_task(self._settle(self.rotator))
        try:
            while True:
                name, command_id, args = await self._queue.get()
                await self.execute(name, command_id, args)
        finally:
            if settle is not None:
                settle.cancel()
            if self.ring is not None:
                logging.getLogger().removeHandler(self.ring)

    async def _settle(self, rotator: Rotator) -> None:
        promoted = await rotator.settle_loop()
        if promoted is not None and self.restart is not None:
            log.warning(
                "event=restart_requested reason=credential_rotated exit_code=%d", EXIT_RESTART
            )
            self.restart()

    async def execute(self, name: str, command_id: int, args: dict[str, Any]) -> None:
        log.info("event=command_start name=%s id=%d", name, command_id)
        try:
            outcome = await self._dispatch(name, command_id, args)
        except Exception as err:  # a command that breaks is reported, the agent goes on
            log.warning("event=command_crashed name=%s id=%d error=%r", name, command_id, str(err))
            outcome = "failed", {"error": (str(err) or type(err).__name__)[:200]}
        if outcome is not None:  # None: recorded done already (it stops the agent)
            self._finish(name, command_id, *outcome)

    async def _dispatch(
        self, name: str, command_id: int, args: dict[str, Any]
    ) -> tuple[str, dict[str, Any]] | None:
        if name == "selftest" and self.selftest is not None:
            result = await self.selftest()
            return ("ok" if result.get("ok") else "failed"), result
        if name == "flush" and self.flush is not None:
            return "ok", await self.flush()
        if name == "restart" and self.restart is not None:
            ran = self.uptime() if self.uptime is not None else RESTART_SETTLE
            if ran < RESTART_SETTLE:
                return "refused", {
                    "error": f"the agent started {ran:.0f} s ago: systemd gives up after 5 starts "
                    f"in 10 minutes, so a restart waits {RESTART_SETTLE:g} s after a start; send "
                    f"it again in {RESTART_SETTLE - ran:.0f} s"
                }
            # done before the stop: the restarted agent sees this id done and never loops
            if not self._finish(name, command_id, "ok", {"restarting": True}):
                return "failed", {"error": f"{COMMANDS_FILE} not written: not restarting"}
            self.restart()
            return None
        if name == "logs" and self.logs is not None:
            result = await self.logs(args.get("since"))
            return ("ok" if not result.get("error") else "failed"), result
        if name == "requeue" and self.requeue is not None:
            result = await self.requeue(args.get("seq"))
            return ("ok" if not result.get("error") else "failed"), result
        if name == "rotate" and self.rotator is not None and self.restart is not None:
            return await self._rotate(self.rotator, command_id)
        if name == "rotate":
            return "refused", {"error": ROTATE_REFUSAL}
        return "refused", {"error": f"not supported by this agent: {name}"}

    async def _rotate(self, rotator: Rotator, command_id: int) -> tuple[str, dict[str, Any]] | None:
        """Confirmed by the endpoint: recorded done, then the file replaced, then the restart
        (a crash before the replacement leaves ``.next``, which the next start promotes)."""
        assert self.restart is not None
        try:
            nxt = await rotator.rotate()
        except RotationFailed as err:
            return "failed", {"error": str(err)[:200]}
        self._finish("rotate", command_id, "ok", {"generation": nxt.generation})
        try:
            rotator.promote(nxt)
        except OSError as err:  # the next start confirms and promotes the pending .next
            log.error("event=credential_promote_failed error=%r", str(err))
        log.warning("event=restart_requested reason=credential_rotated exit_code=%d", EXIT_RESTART)
        self.restart()
        return None

    def _finish(self, name: str, command_id: int, status: str, result: dict[str, Any]) -> bool:
        """Record the outcome; False when it could not be written (a full disk)."""
        self.done[name] = wire.result_value(command_id, status, result, round(self.time(), 3))
        self._queued.pop(name, None)
        saved = self._save()
        log.info("event=command_done name=%s id=%d status=%s", name, command_id, status)
        self.changed()
        return saved

    # -- persistence -----------------------------------------------------------------------------
    def _load(self) -> dict[str, dict[str, Any]]:
        try:
            doc = read_json(self.path)
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as err:
            log.warning("event=commands_file_unreadable path=%s error=%r", self.path, str(err))
            return {}
        out: dict[str, dict[str, Any]] = {}
        if isinstance(doc, dict):
            for name, value in doc.items():
                if name in wire.NAMES and wire.parse_result(value) is not None:
                    out[name] = value
        return out

    def _save(self) -> bool:
        data = json.dumps(self.done, sort_keys=True).encode()
        try:
            write_atomic(self.path, data, mode=0o600)
        except OSError as err:
            log.error("event=commands_file_failed path=%s error=%r", self.path, str(err))
            return False
        return True


def selftest_probe(sampler: Any, depth: Callable[[], int | None], link: Callable[[], Any]) -> Probe:
    """``selftest`` on a running agent: each sensor's health, the queue depth, the link."""

    async def probe() -> dict[str, Any]:
        sensors: dict[str, str] = {}
        failing: list[str] = []
        for name, task in sorted(sampler.tasks.items()):
            state = task.health.state.value
            sensors[name] = state
            if task.cfg.required and task.enabled and state != "ok":
                failing.append(name)
        return {
            "ok": not failing,
            "sensors": sensors,
            "failing": failing,
            "queue": depth(),
            "link": link(),
        }

    return probe


def flush_probe(
    poke: Callable[[], None],
    depth: Callable[[], Awaitable[int | None]],
    sleep: Callable[[float], Awaitable[None]],
    monotonic: Callable[[], float],
) -> Probe:
    """``flush``: wake the uplink now; the queue depth before and after."""

    async def flush() -> dict[str, Any]:
        before = await depth()
        poke()
        deadline = monotonic() + FLUSH_WAIT
        after = before
        while monotonic() < deadline:
            await sleep(FLUSH_POLL)
            after = await depth()
            if not after:
                break
            poke()
        return {"before": before, "after": after}

    return flush


def requeue_probe(
    store: Any, poke: Callable[[], None] | None
) -> Callable[[int | None], Awaitable[dict[str, Any]]]:
    """The ``requeue`` command's action on the running agent's queue."""

    async def requeue(only: int | None) -> dict[str, Any]:
        done = await store.requeue(only)
        if done.moved and poke is not None:
            poke()
        result: dict[str, Any] = {
            "requeued": len(done.moved),
            "recovered": done.recovered,
            "unreadable": len(done.unreadable),
            "left": (await store.stats()).set_aside,
        }
        if done.moved:
            first = min(done.moved)
            result["first"] = f"seq {first} is now {done.moved[first]}"
        problems = ([done.error] if done.error else []) + done.unreadable
        if problems:
            result["error"] = "; ".join(problems)[: wire.MAX_TEXT]
        for old, new in sorted(done.moved.items()):
            log.info("event=record_requeued seq=%d new_seq=%d", old, new)
        for why in done.unreadable:
            log.warning("event=set_aside_unreadable file=%r", why[: wire.MAX_TEXT])
        return result

    return requeue


def build_commands(agent: Any) -> CommandRunner:
    """The runner of a running :class:`agent.service.runtime.Agent` (its sampler, store,
    uplink, link status, state sync and stop)."""

    def depth() -> int | None:
        return agent.last_stats.depth if agent.last_stats else None

    async def live_depth() -> int | None:
        if agent.store is None:
            return None
        return (await agent.store.stats()).depth

    def restart() -> None:
        log.warning("event=restart_requested reason=command exit_code=%d", EXIT_RESTART)
        agent.exit_code = EXIT_RESTART
        agent.request_stop()

    uplink = agent.uplink
    ring = LogRing(agent.config.logs, agent.config.agent.data_dir / LOG_DIR)
    uploader = None
    if agent.transport is not None and agent.endpoints is not None:

        async def alerts_queued() -> int:
            if agent.store is None:
                return 0
            return (await agent.store.stats()).kinds[Kind.ALERT].depth

        uploader = LogUploader(
            ring,
            alerts_queued=alerts_queued,
            uplink_busy=lambda: bool(uplink is not None and uplink.busy_since),
            post=coap_post(
                agent.transport,
                agent.endpoints,
                agent.config.agent.device_id,
                agent.config.uplink.max_inflight + 1 if agent.config.uplink else 0,
            ),
            sleep=agent.clock.sleep,
            monotonic=agent.clock.monotonic,
        )
    return CommandRunner(
        agent.config.agent.data_dir,
        selftest=selftest_probe(agent.sampler, depth, lambda: agent.link_status().get("state")),
        flush=None
        if uplink is None
        else flush_probe(uplink.poke, live_depth, agent.clock.sleep, agent.clock.monotonic),
        restart=restart,
        logs=None if uploader is None else uploader.upload,
        changed=lambda: agent.state.changed() if agent.state is not None else None,
        ring=ring,
        rotator=_rotator(agent),
        requeue=None
        if agent.store is None
        else requeue_probe(agent.store, uplink.poke if uplink is not None else None),
        uptime=lambda: agent.clock.monotonic() - agent.started,
    )


def _rotator(agent: Any) -> Rotator | None:
    """The credential rotation of an agent whose uplink is protected with OSCORE."""
    security = agent.security
    if security is None or security.mode != "oscore" or security.credential_path is None:
        return None
    if agent.transport is None or agent.endpoints is None or agent.config.uplink is None:
        return None
    device = agent.config.agent.device_id
    lane = agent.config.uplink.max_inflight + 1
    send = coap_post(
        agent.transport,
        agent.endpoints,
        device,
        lane,
        path=CREDENTIAL_PATH,
        deadline=ROTATE_DEADLINE,
    )
    send_with = coap_send_with(agent.clock, agent.endpoints, device, security.state)
    return Rotator(security, send, send_with, agent.clock.sleep)
