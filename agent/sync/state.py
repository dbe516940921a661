"""Device state, the device's side: reported state PUT on change and periodically, desired state
observed and applied live, both persisted (docs/protocol.md, "Device state").

:class:`StateSync` runs two loops over the shared :class:`~agent.sync.transport.CoapTransport` and
:class:`~agent.sync.transport.Endpoints`:

- *report*: ``PUT /state/{device}/reported`` with the keys that changed (the runtime calls
  :meth:`StateSync.changed`; changes are coalesced to one PUT per ``min_put_interval``), and every
  key at least every ``report_interval``. Keys whose PUT did not get through stay *pending* and are
  sent later, also after a restart.
- *desired*: ``GET /state/{device}/desired`` with Observe. Each document is applied key by key
  through :meth:`StateHooks.apply`; the observation is registered again after a cancellation, a
  network error, an endpoint switch, when Max-Age runs out without a notification, or when the
  endpoint answers again after an outage (it may have restarted and forgotten its observers).
  Max-Age counts as at least ``OBSERVE_MIN_MAX_AGE`` and at most ``OBSERVE_STALE_LIMIT``; an
  observation that ends or lapses within ``OBSERVE_MIN_LIFETIME`` counts as a failure (backoff
  grows). The pause a 5.03 asks for (its Max-Age) is at most ``BACKOFF_CAP``.

Versions of reported keys: a hybrid clock (:mod:`agent.sync.statedata`). Merge rules, by key: the
endpoint merges reported keys as :mod:`agent.wire.statedoc` says.

Desired keys are applied by version, never by order of arrival: a key is applied only when its
version is higher than the version of that key last applied (or last refused), so a repeated or
reordered notification, or a restart, never applies a change twice. Sensor enable flags
(``sensor/<name>/enabled``) are decided by the desired version alone: what the device decides by
itself (a part that is gone, a sensor that fails) is *reported* health, never a write to the desired
flag, so device and operator never fight over one LWW key. A value that cannot be applied (it does
not fit the key, or :meth:`StateHooks.apply` refuses it) keeps the previous configuration for that
key, is logged as a warning and reported in ``desired/errors`` (``{key: {"version", "error"}}``); a
``model/<slot>`` failure is also reported as ``model/<slot>`` with ``status: failed`` so that the
endpoint blocks that version. A refused version is never retried; the operator's next assignment (a
new version) is tried; a refusal is forgotten once its key leaves the document. A model version the
endpoint lists in ``blocked`` is not tried either (it failed before, maybe before a reinstall).

The runtime's side: :class:`agent.service.hooks.AgentHooks` (what is reported, how keys apply).

Persistence: one file (``[state] path``; its format, and when it is written, in
:mod:`agent.sync.statedata`). :meth:`StateSync.restore` (at start-up, before the sensors run)
applies the persisted desired values again, so configuration overrides survive a restart.

Logging: debug when all goes well (each PUT, notification, restore), info for changes of state
(a key applied, the observation registered, the endpoint back), warning for a bad document, a
refused value or an unreachable endpoint, error for lost function (not registered, no state file).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import random
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from agent.errors import SyncError
from agent.files import write_atomic
from agent.sync.backoff import clamp_hint, full_jitter
from agent.sync.statedata import (
    Failure,
    StateFileError,
    StateHooks,
    StateSettings,
    chunks,
    decode_state,
    drop_refused,
    drop_withdrawn,
    encode_state,
    error_text,
    halves,
    model_name,
    parse_acks,
    parse_desired_document,
    reported_problem,
    reported_values,
    rewound_clock,
    same_value,
    show,
)
from agent.sync.transport import CoapTransport, Endpoints, Response, code
from agent.wire import statedoc
from agent.wire.credentials import register_command
from agent.wire.statedoc import Entry, Rule, StateError
from drivers.clock import Clock, wait_event

log = logging.getLogger(__name__)

# -- timing (seconds); tests shorten them ---------
#: Backoff after a failed exchange: full jitter, uniform in [BACKOFF_FLOOR, min(BACKOFF_CAP,
#: BACKOFF_BASE * 2**failures)].
BACKOFF_BASE = 1.0
BACKOFF_CAP = 300.0
BACKOFF_FLOOR = 0.05
#: Pause after the endpoint says the device is not registered (4.04).
NOT_REGISTERED_PAUSE = 60.0
#: Pause after a 5.03 without Max-Age (the endpoint sends Max-Age 10).
UNAVAILABLE_PAUSE = 10.0
#: How often the observer checks whether the endpoint in use changed.
ENDPOINT_CHECK_INTERVAL = 1.0
#: Max-Age assumed when a desired-state answer has none (RFC 7252 section 5.10.5).
DEFAULT_MAX_AGE = 60.0
#: The longest silence an observation is trusted for, whatever Max-Age says.
OBSERVE_STALE_LIMIT = 300.0
#: The shortest: a smaller Max-Age (0 included) counts as this, so that no endpoint makes the
#: device register again at once, over and over.
OBSERVE_MIN_MAX_AGE = 1.0
#: An observation the endpoint ends sooner than this counts as a failure (backoff grows), so an
#: endpoint that keeps cancelling never makes a busy loop.
OBSERVE_MIN_LIFETIME = 10.0

# -- limits ---------
#: Consecutive failed exchanges (PUTs and registrations) before the endpoint is reported failed.
FALLBACK_AFTER = 3
#: Reported PUT bodies are split to about this size (one datagram); the endpoint takes 8 KiB.
PUT_CHUNK_BYTES = 1024

CF_CBOR = 60
CODE_CONTENT = code("2.05")
CODE_CHANGED = code("2.04")
CODE_BAD_REQUEST = code("4.00")
CODE_NOT_FOUND = code("4.04")
CODE_UNAVAILABLE = code("5.03")


def _jitter(failures: int, rng: random.Random) -> float:
    """Backoff before the next attempt after ``failures`` consecutive failures."""
    return full_jitter(failures, BACKOFF_BASE, BACKOFF_CAP, rng, floor=BACKOFF_FLOOR)


def _unavailable_pause(resp: Response) -> float:
    """The pause a 5.03 asks for (its Max-Age, UNAVAILABLE_PAUSE without one), at most
    BACKOFF_CAP: a Max-Age of years must not stop state sync."""
    pause = float(resp.max_age) if resp.max_age is not None else UNAVAILABLE_PAUSE
    return clamp_hint(pause, 0.0, BACKOFF_CAP)


class StateSync:
    """Reported and desired state of one device (see the module docstring)."""

    def __init__(
        self,
        settings: StateSettings,
        transport: CoapTransport,
        endpoints: Endpoints,
        clock: Clock,
        *,
        device_id: str,
        hooks: StateHooks,
        state_path: Path | None = None,
        lane: int = 0,
    ) -> None:
        self.settings = settings
        self.transport = transport
        self.lane = lane  # the transport lane for state exchanges (the uplink keeps its own)
        self.endpoints = endpoints
        self.clock = clock
        self.device_id = device_id
        self.state_path = Path(state_path) if state_path is not None else settings.path
        self.hooks = hooks
        self.rng = random.Random()
        # persisted
        self._clock_ms = 0
        self._rev = 0
        self._reported: dict[str, Entry] = {}
        self._pending: set[str] = set()
        self._applied: dict[str, Entry] = {}
        self._failed: dict[str, Failure] = {}
        # runtime
        self._loaded = False
        self._restored = False
        self._unsaved = False
        self._executor: ThreadPoolExecutor | None = None
        self._wake = asyncio.Event()
        self._dirty = True
        self._reobserve = asyncio.Event()
        self._bad_keys: dict[str, str] = {}
        self._failures = 0  # consecutive failed exchanges with the current endpoint
        self._said_not_registered = False  # logged once until the device is known
        self._offline = False
        self._retry_at: float | None = None
        self._next_full = -math.inf
        self._last_put = -math.inf
        self._observe_failures = 0
        # status
        self._observing: str | None = None
        self._last_put_wall: float | None = None
        self._last_put_result: str | None = None
        self._last_doc_wall: float | None = None
        self._documents = 0
        self._documents_rejected = 0

    # -- public ----------------------------------------------------------------------------------
    def restore(self) -> None:
        """Load the state file and apply the persisted desired values again (at start-up, before
        the sensors run), so configuration overrides survive a restart."""
        self._load()
        if self._restored:
            return
        self._restored = True
        restored = 0
        for key, entry in sorted(self._applied.items()):
            if entry.value is None:
                continue  # unset: the config file's value is what the runtime starts with
            log.debug("event=desired_restoring key=%s version=%d", key, entry.version)
            try:
                self.hooks.apply(key, entry.value)
            except Exception as err:
                text = error_text(err)
                log.warning(
                    "event=desired_restore_failed key=%s version=%d error=%r",
                    key,
                    entry.version,
                    text,
                )
                self._failed[key] = Failure(entry.version, text, model_name(entry.value))
                self._unsaved = True
                continue
            restored += 1
        log.info(
            "event=state_restored path=%s applied=%d pending=%d rev=%d",
            self.state_path,
            restored,
            len(self._pending),
            self._rev,
        )

    def applied_version(self, key: str) -> int | None:
        """The desired version of ``key`` applied last (None if none was)."""
        entry = self._applied.get(key)
        return None if entry is None else entry.version

    def changed(self) -> None:
        """Something reported changed: wake the reporter (coalesced by ``min_put_interval``).
        Call it from the event loop's thread."""
        self._dirty = True
        self._wake.set()

    @property
    def status(self) -> dict[str, Any]:
        """A JSON-ready summary for ``edge-agent status``."""
        return {
            "endpoint": self.endpoints.current,
            "observing": self._observing is not None,
            "observed_endpoint": self._observing,
            "last_notification": self._last_doc_wall,
            "last_put": self._last_put_wall,
            "last_put_result": self._last_put_result,
            "pending": len(self._pending),
            "desired_rev": self._rev,
            "desired_applied": {k: e.version for k, e in sorted(self._applied.items())},
            "desired_failed": {k: f.version for k, f in sorted(self._failed.items())},
            "documents": self._documents,
            "documents_rejected": self._documents_rejected,
        }

    async def run(self) -> None:
        """Run the reporter and the observer of desired state until cancelled."""
        if not self._restored:
            self.restore()
        try:
            if self._unsaved:
                await self._persist()
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._report_loop(), name="state-report")
                tg.create_task(self._desired_loop(), name="state-desired")
        finally:
            self._observing = None
            executor, self._executor = self._executor, None
            if executor is not None:  # let a write in flight finish before run() returns
                await self.clock.run_blocking(None, executor.shutdown, True)

    # -- persistence -----------------------------------------------------------------------------
    def _load(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        try:
            data = self.state_path.read_bytes()
        except FileNotFoundError:
            log.info("event=state_new path=%s", self.state_path)
            return
        except OSError as err:
            log.error("event=state_unreadable path=%s error=%r", self.state_path, str(err))
            return
        try:
            doc = decode_state(data)
        except StateFileError as err:
            aside = self.state_path.with_name(self.state_path.name + ".bad")
            log.warning(
                "event=state_file_bad path=%s error=%r moved_to=%s",
                self.state_path,
                str(err),
                aside,
            )
            with contextlib.suppress(OSError):
                os.replace(self.state_path, aside)
            return
        self._clock_ms = doc["clock"]
        if doc["device"] != self.device_id:
            log.warning(
                "event=state_other_device path=%s device=%s expected=%s action=kept_clock_only",
                self.state_path,
                doc["device"],
                self.device_id,
            )
            self._unsaved = True
            return
        self._rev = doc["rev"]
        self._reported = doc["reported"]
        self._pending = doc["pending"] & set(self._reported)
        for key, problem in drop_refused(self._reported, self._pending).items():
            self._skip(key, problem)  # saved before the endpoint refused such values
            self._unsaved = True
        self._applied = doc["applied"]
        self._failed = doc["failed"]

    async def _persist(self) -> None:
        """Write the state file. Writes go through one thread, in the order they were asked for,
        so a cancelled caller never leaves two writers racing on the temporary file."""
        data = encode_state(
            self.device_id,
            self._clock_ms,
            self._rev,
            self._reported,
            self._pending,
            self._applied,
            self._failed,
        )
        self._unsaved = False
        if self._executor is None:
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="state-persist")
        try:
            await self.clock.run_blocking(self._executor, write_atomic, self.state_path, data)
        except OSError as err:
            self._unsaved = True
            log.error("event=state_persist_failed path=%s error=%r", self.state_path, str(err))

    # -- reported --------------------------------------------------------------------------------
    def _next_version(self) -> int:
        version = max(self._clock_ms + 1, int(self.clock.time() * 1000))
        self._clock_ms = min(version, statedoc.MAX_VERSION)
        return self._clock_ms

    def _snapshot(self) -> dict[str, Any]:
        try:
            values = dict(self.hooks.reported())
        except Exception as err:
            log.error("event=reported_hook_failed error=%r", error_text(err))
            values = {}
        return reported_values(values, self._applied, self._failed, self._rev, self._reported)

    def _number(self, values: Mapping[str, Any]) -> bool:
        """Give each changed key a new version; True if any changed."""
        changed = False
        for key, value in values.items():
            old = self._reported.get(key)
            if old is not None and same_value(old.value, value):
                continue
            problem = reported_problem(key, value)
            if problem is not None:
                self._skip(key, problem)
                continue
            self._bad_keys.pop(key, None)
            self._reported[key] = Entry(self._next_version(), value)
            self._pending.add(key)
            changed = True
        return changed

    def _skip(self, key: str, problem: str) -> None:
        """``key``'s value is one the endpoint refuses: it is not sent (said once per problem)."""
        if self._bad_keys.get(key) != problem:
            self._bad_keys[key] = problem
            log.warning("event=reported_key_skipped key=%r error=%r", key, problem)

    def _report_due(self) -> float:
        if self._retry_at is not None:
            return self._retry_at  # backing off: changes wait too
        due = self._next_full
        if self._dirty or self._pending:
            due = min(due, self._last_put + self.settings.min_put_interval)
        return due

    async def _report_loop(self) -> None:
        while True:
            now = self.clock.monotonic()
            due = self._report_due()
            if due > now:
                self._wake.clear()
                await wait_event(self.clock, self._wake, due - now)
                continue
            full = now >= self._next_full
            self._dirty = False
            self._retry_at = None  # a failure in this cycle sets it again
            self._last_put = now
            if await self._report_once(full) and full:
                self._next_full = self.clock.monotonic() + self.settings.report_interval

    async def _report_once(self, full: bool) -> bool:
        """Number the changes, then PUT the pending keys (all keys when ``full``). True when
        every PUT got an answer that settles its keys."""
        values = self._snapshot()
        if self._number(values) or self._unsaved:
            await self._persist()
        keys = set(self._pending)
        if full:
            keys |= set(values) & set(self._reported)
        if not keys:
            return True
        entries = {k: self._reported[k] for k in sorted(keys)}
        log.debug("event=reported_put keys=%d full=%s", len(entries), str(full).lower())
        for chunk in chunks(entries, PUT_CHUNK_BYTES):
            if not await self._put(chunk):
                return False
        return True

    async def _put(self, chunk: dict[str, Entry], *, splitting: bool = False) -> bool:
        payload = statedoc.encode_reported(chunk)
        probing = self.endpoints.want_primary()
        base = self.endpoints.uris[0] if probing else self.endpoints.current
        try:
            resp = await self._request_put(base, payload)
        except SyncError as err:
            if probing:  # the primary is still down: go on with the fallback
                self.endpoints.retried_primary_failed()
                base = self.endpoints.current
                try:
                    resp = await self._request_put(base, payload)
                except SyncError as err2:
                    self._put_failed(base, str(err2))
                    return False
                probing = False
            else:
                self._put_failed(base, str(err))
                return False
        if probing:
            self.endpoints.primary_ok()
        self._last_put_wall = self.clock.time()
        self._last_put_result = resp.dotted
        now = self.clock.monotonic()
        if resp.code == CODE_CHANGED:
            self._said_not_registered = False
            try:
                acks = parse_acks(resp.payload)
            except StateError as err:
                log.warning("event=reported_ack_unreadable endpoint=%s error=%r", base, str(err))
                self._retry_at = now + _jitter(self._failures, self.rng)
                return False
            self._exchange_ok(base, renew_observation=True)
            if self._handle_acks(chunk, acks):
                await self._persist()
            return True
        if resp.code == CODE_NOT_FOUND:
            self._not_registered(base)
            self._retry_at = now + NOT_REGISTERED_PAUSE
            return False
        if resp.code == CODE_UNAVAILABLE:
            self._retry_at = now + max(_unavailable_pause(resp), _jitter(self._failures, self.rng))
            return False
        if resp.code >> 5 == 4:
            # refused as they are: sent unchanged they would be refused again (they go when they
            # change, or with the next full report). One value refuses a whole PUT (4.00), also
            # one the device cannot check (the endpoint's stored value is damaged): the halves
            # go again until the key refused is alone, so that the others get acknowledged.
            split = resp.code == CODE_BAD_REQUEST and len(chunk) > 1
            if not (split and splitting):
                log.log(
                    logging.WARNING if split else logging.ERROR,
                    "event=reported_refused endpoint=%s code=%s keys=%s action=%s reason=%r",
                    base,
                    resp.dotted,
                    ",".join(chunk),
                    "split" if split else "next_full_report",
                    resp.payload[:200].decode("utf-8", "replace"),
                )
            if split:
                a, b = halves(chunk)
                return await self._put(a, splitting=True) and await self._put(b, splitting=True)
            self._pending -= set(chunk)
            await self._persist()
            return True
        self._put_failed(base, f"answer {resp.dotted}")
        return False

    async def _request_put(self, base: str, payload: bytes) -> Response:
        return await self.transport.request(
            "PUT",
            f"{base}/state/{self.device_id}/reported",
            payload,
            content_format=CF_CBOR,
            deadline=self.settings.deadline,
            lane=self.lane,
        )

    def _put_failed(self, base: str, why: str) -> None:
        self._last_put_wall = self.clock.time()
        self._last_put_result = f"error: {why}"
        self._exchange_failed(base, why)
        delay = _jitter(self._failures, self.rng)
        self._retry_at = self.clock.monotonic() + delay
        log.debug(
            "event=reported_put_failed endpoint=%s failures=%d backoff=%.2f error=%r",
            base,
            self._failures,
            delay,
            why,
        )

    def _handle_acks(self, chunk: Mapping[str, Entry], acks: Mapping[str, int]) -> bool:
        """Settle the keys the endpoint acknowledged; True if pending keys changed."""
        changed = False
        rewind = rewound_clock(chunk, acks, self.clock.time())
        if rewind is not None:  # numbered while the wall clock ran ahead: refused for years
            log.warning("event=reported_clock_rewound version=%d to=%d", self._clock_ms, rewind)
            self._clock_ms, changed = rewind, True
        for key, sent in chunk.items():
            stored = acks.get(key)
            if stored is None:  # not in the answer: stays pending (numbered again after a rewind)
                if rewind is not None and (current := self._reported.get(key)) is not None:
                    self._reported[key] = Entry(self._next_version(), current.value)
                continue
            if stored > self._clock_ms:
                self._clock_ms = min(stored, statedoc.MAX_VERSION)  # catch up with the endpoint
                changed = True
            current = self._reported.get(key)
            if current is None or current.version != sent.version:
                continue  # changed since it was sent: the new version is pending
            if stored > sent.version and statedoc.rule_for(key) is not Rule.MAX:
                # the endpoint holds a newer version than ours (our version clock was behind,
                # e.g. a lost state file): number the value again so that it wins.
                self._reported[key] = Entry(self._next_version(), sent.value)
                log.info(
                    "event=reported_renumbered key=%s version=%d endpoint_version=%d",
                    key,
                    self._reported[key].version,
                    stored,
                )
                changed = True
                continue
            if key in self._pending:
                self._pending.discard(key)
                changed = True
        return changed

    # -- endpoint health -------------------------------------------------------------------------
    def _not_registered(self, base: str) -> None:
        """The endpoint does not know the device: said once (the uplink says it too), then the
        reporter and the observer retry quietly every NOT_REGISTERED_PAUSE."""
        (log.debug if self._said_not_registered else log.warning)(
            "event=device_not_registered device=%s endpoint=%s retry_in=%gs: register it "
            "on the endpoint (%s)",
            self.device_id,
            base,
            NOT_REGISTERED_PAUSE,
            register_command(self.device_id),
        )
        self._said_not_registered = True

    def _exchange_ok(self, base: str, *, renew_observation: bool) -> None:
        if self._failures and renew_observation:
            # the endpoint answers again; it may have restarted and forgotten its observers
            self._reobserve.set()
        if self._offline:
            log.info("event=state_online endpoint=%s", base)
        self._offline = False
        self._failures = 0

    def _exchange_failed(self, base: str, why: str) -> None:
        self._failures += 1
        if self._failures >= FALLBACK_AFTER:
            if not self._offline:
                log.warning("event=state_offline endpoint=%s error=%r", base, why)
                self._offline = True
            self.endpoints.failed(base)

    # -- desired ---------------------------------------------------------------------------------
    async def _desired_loop(self) -> None:
        while True:
            delay = await self._observe(self.endpoints.current)
            if delay > 0:
                await wait_event(self.clock, self._reobserve, delay)

    async def _observe(self, base: str) -> float:
        """One observation of desired state at ``base``, until it ends or must be renewed.
        Returns the seconds to wait before registering again."""
        uri = f"{base}/state/{self.device_id}/desired"
        self._reobserve.clear()
        started = self.clock.monotonic()
        stream = self.transport.observe(uri, deadline=self.settings.deadline, lane=self.lane)
        pending_next: asyncio.Future[Response] | None = None
        stale_at: float | None = None
        registered = False
        log.debug("event=observe_register endpoint=%s", base)
        try:
            while True:
                if pending_next is None:
                    pending_next = asyncio.ensure_future(_anext(stream))
                now = self.clock.monotonic()
                timeout = ENDPOINT_CHECK_INTERVAL
                if stale_at is not None:
                    timeout = max(0.0, min(timeout, stale_at - now))
                await wait_event(self.clock, self._reobserve, timeout, pending_next)
                if pending_next.done():
                    future, pending_next = pending_next, None
                    try:
                        resp = future.result()
                    except StopAsyncIteration:
                        return self._observation_ended(base, started, registered, "cancelled")
                    except SyncError as err:
                        return self._observation_failed(base, registered, str(err))
                    if resp.code != CODE_CONTENT:
                        return self._observe_refused(base, resp, registered)
                    if not registered:
                        registered = True
                        self._exchange_ok(base, renew_observation=False)
                        self._observing = base
                        log.info("event=observing endpoint=%s", base)
                    max_age = float(resp.max_age) if resp.max_age is not None else DEFAULT_MAX_AGE
                    max_age = clamp_hint(max_age, OBSERVE_MIN_MAX_AGE, OBSERVE_STALE_LIMIT)
                    stale_at = self.clock.monotonic() + max_age
                    await self._on_desired(resp.payload, base)
                    continue
                reason = None
                if self._reobserve.is_set() and not registered:
                    self._reobserve.clear()  # the registration in flight is new enough
                elif self._reobserve.is_set():
                    reason = "endpoint_back"
                elif self.endpoints.current != base:
                    reason = "endpoint_switch"
                elif stale_at is not None and self.clock.monotonic() >= stale_at:
                    # an observation that lapses soon after it began counts as a failure, so
                    # a short Max-Age makes renewals back off
                    return self._observation_ended(base, started, registered, "max_age")
                if reason is not None:
                    log.info("event=observe_renew endpoint=%s reason=%s", base, reason)
                    self._observe_failures = 0
                    return 0.0
        finally:
            self._observing = None
            if pending_next is not None and not pending_next.done():
                pending_next.cancel()
                await asyncio.gather(pending_next, return_exceptions=True)
            with contextlib.suppress(Exception):
                await stream.aclose()  # type: ignore[attr-defined]

    def _observation_ended(self, base: str, started: float, registered: bool, why: str) -> float:
        lifetime = self.clock.monotonic() - started
        if registered and lifetime >= OBSERVE_MIN_LIFETIME:
            self._observe_failures = 0
            log.info("event=observe_renew endpoint=%s reason=%s", base, why)
            return 0.0
        self._observe_failures += 1
        delay = _jitter(self._observe_failures, self.rng)
        log.info(
            "event=observe_renew endpoint=%s reason=%s lifetime=%.1f backoff=%.2f",
            base,
            why,
            lifetime,
            delay,
        )
        return delay

    def _observation_failed(self, base: str, registered: bool, why: str) -> float:
        if registered:
            # it worked and then broke (a network error mid-observation): register again soon
            self._observe_failures = 0
            log.info("event=observe_renew endpoint=%s reason=network_error error=%r", base, why)
            return _jitter(0, self.rng)
        self._exchange_failed(base, why)
        self._observe_failures += 1
        delay = _jitter(self._observe_failures, self.rng)
        log.debug(
            "event=observe_failed endpoint=%s failures=%d backoff=%.2f error=%r",
            base,
            self._observe_failures,
            delay,
            why,
        )
        return delay

    def _observe_refused(self, base: str, resp: Response, registered: bool) -> float:
        self._exchange_ok(base, renew_observation=False)  # it answered
        if resp.code == CODE_NOT_FOUND:
            self._not_registered(base)
            return NOT_REGISTERED_PAUSE
        self._observe_failures += 1
        delay = _jitter(self._observe_failures, self.rng)
        if resp.code == CODE_UNAVAILABLE:
            delay = max(delay, _unavailable_pause(resp))
        log.warning(
            "event=observe_refused endpoint=%s code=%s registered=%s backoff=%.2f reason=%r",
            base,
            resp.dotted,
            str(registered).lower(),
            delay,
            resp.payload[:200].decode("utf-8", "replace"),
        )
        return delay

    async def _on_desired(self, payload: bytes, base: str) -> None:
        """Apply one desired-state document: every key newer than what was applied. Keys are
        judged one by one: a bad key is refused (and reported), the others apply."""
        self._documents += 1
        self._last_doc_wall = self.clock.time()
        try:
            doc = parse_desired_document(payload)
        except ValueError as err:  # StateError, and any parser error it failed to wrap
            self._documents_rejected += 1
            log.warning(
                "event=desired_document_rejected endpoint=%s error=%r action=kept_previous",
                base,
                str(err),
            )
            return
        if not await self.endpoints.check_store(base, doc.store):
            return  # another deployment's desired state: its versions mean nothing here
        log.debug(
            "event=desired_document endpoint=%s rev=%d keys=%d refused=%d",
            base,
            doc.rev,
            len(doc.entries),
            len(doc.refused),
        )
        for where, problem in doc.problems:
            log.warning("event=desired_key_rejected key=%s error=%r", where, problem)
        # (version, key, entry or None, the refusal of a value that did not even decode)
        keys = [(e.version, k, e, None) for k, e in doc.entries.items()]
        keys += [(r.version, k, None, r.error) for k, r in doc.refused.items()]
        changed = False
        for version, key, entry, error in sorted(keys, key=lambda item: item[:2]):
            if version <= self._seen_version(key):
                continue
            changed = True
            value = None if entry is None else entry.value
            if doc.blocked.get(key) == version:
                self._failed[key] = Failure(
                    version,
                    "blocked by the endpoint: loading this version failed before",
                    model_name(value),
                )
                log.info("event=desired_blocked key=%s version=%d", key, version)
                continue
            if error is None:
                error = self._apply(key, value)
            if error is not None:
                error = error_text(error)
                self._failed[key] = Failure(version, error, model_name(value))
                log.warning(
                    "event=desired_rejected key=%s version=%d error=%r action=kept_previous",
                    key,
                    version,
                    error,
                )
                continue
            assert entry is not None
            self._applied[key] = entry
            self._failed.pop(key, None)
            log.info("event=desired_applied key=%s version=%d value=%s", key, version, show(value))
        if doc.rev > self._rev:
            # reported, and written with the next save (the reporter's, at most one per
            # min_put_interval): a rev alone need not be durable, and a flood of documents
            # that change nothing else must not write the file each time
            self._rev = doc.rev
            self._unsaved = True
            self.changed()
        if drop_withdrawn(self._failed, doc.entries.keys() | doc.refused.keys()) or changed:
            await self._persist()  # what was applied, refused or forgotten: on disk before all else
            self.changed()

    def _apply(self, key: str, value: Any) -> str | None:
        """Check ``key: value`` against the key's rules and apply it; why not, or None."""
        try:
            statedoc.check_desired(key, value)
            self.hooks.apply(key, value)
        except (StateError, ValueError) as err:
            return error_text(err)
        except Exception as err:  # a bug in the runtime's hook: refuse, keep running
            log.error("event=desired_apply_crashed key=%s error=%r", key, error_text(err))
            return error_text(err)
        return None

    def _seen_version(self, key: str) -> int:
        applied = self._applied.get(key)
        failed = self._failed.get(key)
        return max(applied.version if applied else 0, failed.version if failed else 0)


async def _anext(stream: Any) -> Response:
    result: Response = await stream.__anext__()
    return result
