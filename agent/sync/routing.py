"""Hybrid inference: which work runs on the edge and which may use the endpoint's full model.

Rules (issue 6, "Routing"):

1. **Critical decisions are made on the edge, always.** Raising and clearing an alert (anything
   the product acts on) is the detector's decision; the analyzer commits the alert before the
   router hears of it, and the router never delays, changes or withdraws it. Its alert listener
   (:meth:`Router.on_alert`) only notes work to do and returns at once, cloud up or down.
2. **Low-confidence alerts are validated in the cloud, asynchronously, once.** A raised alert
   whose confidence (the fault classifier's probability, :class:`agent.detect.detector.Alert`) is
   below    ``confidence_threshold`` is sent with its raising window to ``POST /validate/{device}``.

   - *Durable.* The request is derived from the durable alert record: its key is the alert
     record's sequence number, its body the alert and window the record holds. The router keeps
     the requests still to make in ``routing.json`` in the data directory (written atomically:
     temporary file, fsync, rename, fsync of the directory) before it sends them, so they
     survive a restart; acked and deleted alert records do not take them along.
   - *Renumbered.* An alert record the store renumbered (the endpoint holds another record
     under its seq: agent/store/renumber.py) is held by the endpoint under its new seq only; its
     validation and verdict follow it there (:meth:`Router._follow`, from the moves the store
     keeps durably), before each request, after each answer and after a restart.
   - *Once.* One worker sends one request at a time, so a validation in flight is never sent
     twice by this process; after a restart, or when an answer is lost, the request is sent
     again with the same ``seq`` and the endpoint answers its stored verdict without running the
     model again (it keys verdicts by ``(device, seq, digest)``). The model runs once per alert.
   - *Bound to the window.* A verdict names the digest of the window it judged
     (:func:`agent.wire.validation.window_digest`); the router accepts it only when that is the
     digest of the window it sent. Anything else (a verdict on a window someone else posted for
     the same ``seq``, an endpoint that does not bind verdicts) is logged
     (``event=verdict_digest_mismatch``) and treated as no verdict: the request is retried.
   - *Checked.* Only the verdict's known fields are kept, each of its kind (a finite number, a
     short text; :func:`checked_verdict`). A verdict that breaks that (a NaN, bytes where text
     belongs) is refused (``event=verdict_refused``) and its request dropped: the endpoint
     would answer the same stored verdict again.
   - *Merged.* The verdict is kept with the alert: in :attr:`Router.verdicts` (persisted with
     the pending requests, shown by ``status``) and as an EVENT record ``{type: "verdict", seq,
     ...}`` committed to the store, so the cloud history holds it next to the alert. A crash
     between that commit and the next save of ``routing.json`` can commit the same verdict event
     twice (same ``seq``, same content); consumers key verdicts by ``seq``.
   - Only while ``link_allows_cloud()`` (the link policy: "high" and "medium" allow it).
     Failures are retried with exponential backoff and full jitter, capped; refusals (4.00, 4.13,
     4.15, 4.05) are final and logged.
   - *Bounded.* At most :data:`MAX_PENDING_VALIDATIONS` requests wait (the newest alerts'); an
     older one is dropped with a warning and counted (``validations_dropped``).
3. **Requests are non-confirmable** (NON, RFC 7252 section 4.3), retried by the router itself: a
   confirmable exchange goes on retransmitting after the router's deadline (up to 45 s with
   RFC 7252's defaults) and, with NSTART = 1, holds back every later request to the endpoint
   from the same socket. A NON request that is lost costs one deadline and one backoff; the
   endpoint deduplicates repeated message IDs and answers a repeated ``seq`` from its store.
4. **Non-critical inference may use the cloud** (:meth:`Router.infer`): with a good link the
   endpoint's full-precision model answers within a deadline; on timeout, error or a link that
   does not allow it, the edge model's result is returned, and the result says which answered.

Logging policy: debug per exchange, info for verdicts merged, warning for refused requests and a
state file that cannot be read, error for a state file that cannot be written.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import random
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from agent.detect.detector import Alert, AlertKind
from agent.errors import StoreError, SyncError
from agent.files import read_json, write_atomic
from agent.store.queue import NewRecord, Store
from agent.sync.backoff import full_jitter
from agent.sync.transport import Response, code
from agent.wire import records
from agent.wire.batch import CF_CBOR, format_ranges
from agent.wire.records import EventBody, Kind
from agent.wire.validation import DIGEST_KEY, window_digest
from drivers.base import Options
from drivers.clock import Clock, RealClock, wait_event

log = logging.getLogger(__name__)

# Timing (seconds); tests may shorten them.
IDLE_POLL = 5.0  # the longest the worker sleeps: the link may allow the cloud again meanwhile
SAVE_RETRY = 5.0  # after a failed write of the state file

STATE_FILE = "routing.json"
STATE_FORMAT = 1
MAX_VERDICTS_KEPT = 1000  # merged verdicts remembered (newest seqs); older ones are in the cloud
#: Validations waiting for a verdict, at most (the newest seqs). Without a bound they grew by one
#: per unsure alert for as long as none completes (a link low or offline for weeks, an endpoint
#: answering 4.04); the oldest is given up (``event=validation_dropped``): its alert is in the store
#: anyway.
MAX_PENDING_VALIDATIONS = 256

SOURCE_EDGE = "edge"
SOURCE_CLOUD = "cloud"

#: Answers after which a validation request is not sent again.
FINAL_CODES = frozenset({code("4.00"), code("4.05"), code("4.13"), code("4.15")})

#: The fields of a verdict the router keeps (docs/protocol.md, "Cloud inference"), by kind;
#: any other field is dropped. Text is at most MAX_VERDICT_TEXT characters.
VERDICT_NUMBERS = ("score", "threshold", "confidence")
VERDICT_TEXTS = ("verdict", "model", "precision", DIGEST_KEY)
VERDICT_TEXTS_OR_NULL = ("fault", "classifier")
MAX_VERDICT_TEXT = 128
#: A verdict's number is finite and at most this in magnitude (JSON and floats hold it).
MAX_VERDICT_NUMBER = 1e300


class Transport(Protocol):
    """What the router needs of :class:`agent.sync.transport.CoapTransport`."""

    async def request(
        self,
        method: str,
        uri: str,
        payload: bytes = b"",
        *,
        content_format: int | None = None,
        accept: int | None = None,
        deadline: float = ...,
        confirmable: bool = True,
    ) -> Response: ...


@dataclass(frozen=True)
class RoutingSettings:
    """``[routing]``: where inference runs.

    ``confidence_threshold``: alerts below it are validated in the cloud (0 = never).
    ``validation_deadline``: per validation exchange. ``backoff_base``/``backoff_max``: retry
    delays after a failed validation. ``infer_deadline``: the default deadline of cloud inference.
    ``cloud_infer``: allow non-critical inference in the cloud at all.
    """

    confidence_threshold: float = 0.8
    validation_deadline: float = 10.0
    backoff_base: float = 2.0
    backoff_max: float = 300.0
    infer_deadline: float = 0.5
    cloud_infer: bool = True
    state_path: Path | None = None  # None: routing.json in the data directory

    @classmethod
    def from_options(cls, opts: Options, data_dir: Path | None = None) -> RoutingSettings:
        d = cls()
        threshold = opts.number(
            "confidence_threshold", d.confidence_threshold, minimum=0.0, maximum=1.0
        )
        deadline = opts.number(
            "validation_deadline", d.validation_deadline, minimum=0.05, maximum=600.0
        )
        base = opts.number("backoff_base", d.backoff_base, minimum=0.01, maximum=3600.0)
        cap = opts.number("backoff_max", d.backoff_max, minimum=0.01, maximum=86400.0)
        if cap < base:
            raise opts.error("backoff_max", f"{cap:g} is below backoff_base ({base:g})")
        infer_deadline = opts.number(
            "infer_deadline", d.infer_deadline, minimum=0.001, maximum=600.0
        )
        cloud_infer = opts.boolean("cloud_infer", d.cloud_infer)
        opts.finish()
        return cls(
            confidence_threshold=threshold,
            validation_deadline=deadline,
            backoff_base=base,
            backoff_max=cap,
            infer_deadline=infer_deadline,
            cloud_infer=cloud_infer,
            state_path=None if data_dir is None else Path(data_dir) / STATE_FILE,
        )


@dataclass(frozen=True)
class InferResult:
    """What :meth:`Router.infer` answers. ``source``: ``"edge"`` or ``"cloud"``; ``reason``: why
    (``cloud``, ``link`` (the link policy said no), ``disabled``, ``timeout``, ``error: ...``).
    ``score``: the anomaly score of the window's newest step (anomaly models). ``elapsed``:
    seconds on the router's clock from the call to the answer."""

    source: str
    model: str
    output: np.ndarray
    score: float | None
    reason: str
    elapsed: float


@dataclass
class _Pending:
    seq: int
    alert: dict[str, Any]
    window: list[float]
    attempts: int = 0
    next_try: float = 0.0  # clock.monotonic(); not persisted: due at once after a restart

    def to_json(self) -> dict[str, Any]:
        return {
            "seq": self.seq,
            "alert": self.alert,
            "window": self.window,
            "attempts": self.attempts,
        }


@dataclass
class RouterStats:
    counts: Counter[str] = field(default_factory=Counter)

    def as_dict(self) -> dict[str, int]:
        return dict(sorted(self.counts.items()))


def _anomaly_score(model: Any, window: np.ndarray, output: np.ndarray) -> float | None:
    """``max |u - r|`` over the newest step, for a model whose manifest entry says anomaly."""
    entry = getattr(model, "entry", None)
    if entry is None or entry.kind != "anomaly":
        return None
    n_ch = len(entry.raw.get("features", {}).get("channels", ())) or output.size
    w = window.reshape(-1).astype(np.float64)
    r = np.asarray(output, dtype=np.float64).reshape(-1)
    return float(np.abs(w[-n_ch:] - r[-n_ch:]).max())


def checked_verdict(verdict: Mapping[Any, Any]) -> dict[str, Any]:
    """The known fields of a verdict (the others dropped), each of its kind: a finite number,
    a short text (or null where the protocol allows it), ``anomalous`` a bool. ValueError names
    the first field that is not."""
    out: dict[str, Any] = {"seq": verdict["seq"]}
    for name, value in verdict.items():
        if name in VERDICT_NUMBERS:
            expected = "a finite number"
            ok = (
                isinstance(value, int | float)
                and not isinstance(value, bool)
                and -MAX_VERDICT_NUMBER <= value <= MAX_VERDICT_NUMBER  # NaN compares false
            )
        elif name in VERDICT_TEXTS or name in VERDICT_TEXTS_OR_NULL:
            expected = f"text of at most {MAX_VERDICT_TEXT} characters"
            ok = (value is None and name in VERDICT_TEXTS_OR_NULL) or (
                isinstance(value, str) and len(value) <= MAX_VERDICT_TEXT
            )
        elif name == "anomalous":
            expected = "true or false"
            ok = isinstance(value, bool)
        else:
            continue
        if not ok:
            raise ValueError(f"verdict field {name}: expected {expected}, got {repr(value)[:40]}")
        out[name] = value
    return out


class Router:
    """Hybrid inference and cloud validation for one device. See the module docstring.

    ``edge``: the edge models by name (the first is the default of :meth:`infer`).
    ``endpoint``: the endpoint's base URI, or a callable giving the current one (the uplink's
    :class:`~agent.sync.transport.Endpoints`: ``lambda: endpoints.current``). ``transport``: its own
    :class:`~agent.sync.transport.CoapTransport` (one lane), not the uplink's lanes.
    """

    def __init__(
        self,
        settings: RoutingSettings,
        *,
        device_id: str,
        store: Store | None,
        transport: Transport,
        endpoint: str | Callable[[], str],
        edge: Mapping[str, Any] | None = None,
        link_allows_cloud: Callable[[], bool] = lambda: True,
        clock: Clock | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.settings = settings
        self.device_id = device_id
        self.store = store
        self.transport = transport
        self._endpoint = endpoint if callable(endpoint) else (lambda: endpoint)
        self.edge = dict(edge or {})
        self.link_allows_cloud = link_allows_cloud
        self.clock = clock or RealClock()
        self.rng = rng or random.Random()
        self.pending: dict[int, _Pending] = {}
        self.verdicts: dict[int, dict[str, Any]] = {}
        self.stats = RouterStats()
        self._uncommitted: set[int] = set()  # verdicts merged but not yet committed as events
        self._listeners: list[Callable[[int, dict[str, Any]], None]] = []
        self._wake = asyncio.Event()
        self._dirty = False
        self._save_lock = asyncio.Lock()
        self._renumberings: int | None = None  # the store's count last followed (None: ask)
        self.busy_since: float | None = None  # for the runtime's stuck-stage check
        if settings.state_path is not None:
            self._load(settings.state_path)

    # -- persistence -----------------------------------------------------------------------------
    def _load(self, path: Path) -> None:
        try:
            raw = read_json(path)
            if not isinstance(raw, dict) or raw.get("format") != STATE_FORMAT:
                raise ValueError(f"format {raw.get('format') if isinstance(raw, dict) else raw!r}")
            for p in raw.get("pending", []):
                seq = int(p["seq"])
                self.pending[seq] = _Pending(
                    seq, dict(p["alert"]), [float(v) for v in p["window"]], int(p["attempts"])
                )
            for v in raw.get("verdicts", []):
                seq = int(v["seq"])
                self.verdicts[seq] = dict(v["verdict"])
                if not v.get("committed", False):
                    self._uncommitted.add(seq)
            self._trim_pending()
        except FileNotFoundError:
            return
        except (OSError, ValueError, KeyError, TypeError, OverflowError) as err:
            aside = path.with_name(path.name + ".corrupt")
            with contextlib.suppress(OSError):
                os.replace(path, aside)
            log.warning(
                "event=routing_state_unreadable path=%s moved_to=%s error=%r; "
                "pending validations are lost (alerts are not)",
                path,
                aside,
                str(err),
            )
            self.pending.clear()
            self.verdicts.clear()
            self._uncommitted.clear()
            return
        if self.pending or self.verdicts:
            log.info(
                "event=routing_state_loaded pending=%d verdicts=%d uncommitted=%d",
                len(self.pending),
                len(self.verdicts),
                len(self._uncommitted),
            )

    def _document(self) -> bytes:
        kept = sorted(self.verdicts)[-MAX_VERDICTS_KEPT:]
        for seq in list(self.verdicts):
            if seq not in kept and seq not in self._uncommitted:
                del self.verdicts[seq]
        doc = {
            "format": STATE_FORMAT,
            "pending": [self.pending[s].to_json() for s in sorted(self.pending)],
            "verdicts": [
                {"seq": s, "verdict": self.verdicts[s], "committed": s not in self._uncommitted}
                for s in sorted(self.verdicts)
            ],
        }
        return json.dumps(doc, separators=(",", ":"), allow_nan=False).encode("utf-8")

    async def save(self) -> bool:
        """Write the state file if anything changed. False if the write failed."""
        path = self.settings.state_path
        if path is None:
            self._dirty = False
            return True
        async with self._save_lock:
            if not self._dirty:
                return True
            self._dirty = False
            try:
                data = self._document()  # verdicts are checked: a failure here is a bug
                await self.clock.run_blocking(None, write_atomic, path, data)
            except (OSError, ValueError, TypeError) as err:
                self._dirty = True
                log.error("event=routing_state_write_failed path=%s error=%r", path, str(err))
                return False
        return True

    # -- the analyzer's listener (critical path: never blocks, never raises) ---------------------
    def wants_validation(self, alert: Alert) -> bool:
        """A raised alert the edge is unsure of (a clear repeats its episode's verdict)."""
        return (
            alert.kind is AlertKind.RAISE and alert.confidence < self.settings.confidence_threshold
        )

    def on_alert(self, alert: Alert, seq: int, window: Any) -> None:
        """The analyzer committed ``alert`` as record ``seq``: note a validation if it needs
        one. Returns at once; the decision itself is never touched."""
        try:
            if not self.wants_validation(alert):
                return
            if seq in self.pending or seq in self.verdicts:
                self.stats.counts["duplicate_alerts"] += 1
                return
            flat = np.asarray(window, dtype=np.float64).reshape(-1)
            self.pending[seq] = _Pending(seq, alert.to_dict(), [float(v) for v in flat])
            self._renumberings = None  # it may have been renumbered already
            self.stats.counts["validations_requested"] += 1
            self._trim_pending()
            self._dirty = True
            self._wake.set()
            log.debug("event=validation_queued seq=%d confidence=%.3f", seq, alert.confidence)
        except Exception:  # never let the router disturb the alert path
            log.exception("event=routing_listener_failed seq=%s", seq)

    def _trim_pending(self) -> None:
        """Keep the newest :data:`MAX_PENDING_VALIDATIONS` pending validations."""
        while len(self.pending) > MAX_PENDING_VALIDATIONS:
            seq = min(self.pending)
            del self.pending[seq]
            self._dirty = True
            self.stats.counts["validations_dropped"] += 1
            log.warning(
                "event=validation_dropped seq=%d pending=%d reason=too_many_waiting",
                seq,
                len(self.pending),
            )

    def add_verdict_listener(self, cb: Callable[[int, dict[str, Any]], None]) -> None:
        """``cb(seq, verdict)`` after a verdict is merged (committed as an event)."""
        self._listeners.append(cb)

    def poke(self) -> None:
        """Look at pending work now (the link got better)."""
        self._wake.set()

    # -- the worker ------------------------------------------------------------------------------
    async def run(self) -> None:
        """The routing stage: persist, send pending validations, merge verdicts. Runs forever."""
        while True:
            self.busy_since = self.clock.monotonic()
            try:
                await self.step()
            finally:
                self.busy_since = None
            now = self.clock.monotonic()
            wait = IDLE_POLL
            if self._dirty:
                wait = SAVE_RETRY
            for p in self.pending.values():
                wait = min(wait, max(0.0, p.next_try - now))
            if not self.link_allows_cloud():
                wait = IDLE_POLL if not self._dirty else SAVE_RETRY
            await wait_event(self.clock, self._wake, wait)
            self._wake.clear()

    async def step(self) -> None:
        """One pass: save the state, commit merged verdicts, send the validations that are due
        (one at a time) while the link allows it."""
        await self._follow()
        if not await self.save():
            return  # not durable yet: send nothing that could not be resumed after a crash
        await self._commit_verdicts()
        if not self.pending or not self.link_allows_cloud():
            return
        for seq in sorted(self.pending):
            p = self.pending.get(seq)
            if p is None or p.next_try > self.clock.monotonic():
                continue
            if not self.link_allows_cloud():
                return
            await self._follow()
            if self.pending.get(p.seq) is not p:
                continue
            await self._validate(p)
            await self.save()
            await self._commit_verdicts()

    async def _follow(self) -> None:
        """Name the alerts the store renumbered (agent/store/renumber.py: the endpoint holds
        another record under their seq) by their new seqs: their pending validations, and their
        verdicts, which are committed again under the new seq (the endpoint holds the alert
        under that one only; an event committed under the old seq names another record). Asks
        the store after each of its renumberings, and once after a start: routing.json may
        have been saved before the last ones."""
        store = self.store
        if store is None or self._renumberings == store.renumberings:
            return
        seen = store.renumberings
        if not self.pending and not self.verdicts:
            self._renumberings = seen
            return
        try:
            moves = await store.moved(set(self.pending) | set(self.verdicts))
        except StoreError as err:
            log.error("event=renumbered_alerts_unreadable error=%r action=retry", str(err))
            return
        self._renumberings = seen
        for old, new in sorted(moves.items()):
            p = self.pending.pop(old, None)
            if p is not None:
                p.seq, p.next_try = new, 0.0
                self.pending[new] = p
            verdict = self.verdicts.pop(old, None)
            if verdict is not None:
                self.verdicts[new] = {**verdict, "seq": new}
                self._uncommitted.discard(old)
                self._uncommitted.add(new)
            self._dirty = True
            log.warning("event=validation_renumbered seq=%d new_seq=%d", old, new)

    def _backoff(self, attempts: int) -> float:
        return full_jitter(
            attempts, self.settings.backoff_base, self.settings.backoff_max, self.rng
        )

    async def _validate(self, p: _Pending) -> None:
        uri = f"{self._endpoint()}/validate/{self.device_id}"
        body = records.dumps({"seq": p.seq, "alert": p.alert, "window": p.window})
        p.attempts += 1
        self._dirty = True
        self.stats.counts["validations_sent"] += 1
        try:
            resp = await self.transport.request(
                "POST",
                uri,
                body,
                content_format=CF_CBOR,
                accept=CF_CBOR,
                deadline=self.settings.validation_deadline,
                confirmable=False,
            )
        except SyncError as err:
            self._retry(p, f"{err}")
            return
        if resp.success:
            try:
                verdict = records.loads(resp.payload)
                if not isinstance(verdict, dict) or verdict.get("seq") != p.seq:
                    raise records.RecordError("not a verdict for this alert")
            except records.ForeignValue as err:  # decodes, holds what no verdict has: as below
                self._refuse_verdict(p, err)
                return
            except records.RecordError as err:
                self._retry(p, f"bad verdict: {err}")
                return
            asked = p.seq
            await self._follow()
            if p.seq != asked:  # renumbered meanwhile: the endpoint holds the alert there
                self._retry(p, f"alert renumbered to {p.seq} meanwhile")
                p.next_try = 0.0
                return
            digest = window_digest(p.window)
            if verdict.get(DIGEST_KEY) != digest:
                self.stats.counts["verdicts_unbound"] += 1
                log.warning(
                    "event=verdict_digest_mismatch seq=%d digest=%s expected=%s action=retry",
                    p.seq,
                    str(verdict.get(DIGEST_KEY))[:64],
                    digest,
                )
                self._retry(p, "a verdict on another window")
                return
            try:
                verdict = checked_verdict(verdict)
            except ValueError as err:
                self._refuse_verdict(p, err)
                return
            self._merge(p, verdict)
            return
        if resp.code in FINAL_CODES:
            self.stats.counts["validations_refused"] += 1
            del self.pending[p.seq]
            log.warning(
                "event=validation_refused seq=%d code=%s reason=%r",
                p.seq,
                resp.dotted,
                resp.payload[:100].decode("utf-8", "replace"),
            )
            return
        self._retry(p, f"{resp.dotted} {resp.payload[:100].decode('utf-8', 'replace')}")

    def _retry(self, p: _Pending, why: str) -> None:
        self.stats.counts["validations_failed"] += 1
        delay = self._backoff(p.attempts - 1)
        p.next_try = self.clock.monotonic() + delay
        log.debug(
            "event=validation_retry seq=%d attempts=%d in=%.2f why=%r",
            p.seq,
            p.attempts,
            delay,
            why,
        )

    def _merge(self, p: _Pending, verdict: dict[str, Any]) -> None:
        edge = p.alert
        merged = {
            **{str(k): v for k, v in verdict.items()},
            "seq": p.seq,
            "edge": {
                "verdict": edge.get("verdict"),
                "fault": edge.get("fault"),
                "confidence": edge.get("confidence"),
                "score": edge.get("score"),
                "model": edge.get("model"),
            },
            "confirmed": bool(verdict.get("anomalous")),
            "attempts": p.attempts,
            "validated_at": self.clock.time(),
        }
        del self.pending[p.seq]
        self.verdicts[p.seq] = merged
        self._uncommitted.add(p.seq)
        self._dirty = True
        self.stats.counts["verdicts"] += 1
        log.info(
            "event=verdict seq=%d confirmed=%s cloud=%s fault=%s edge=%s attempts=%d",
            p.seq,
            str(merged["confirmed"]).lower(),
            verdict.get("verdict"),
            verdict.get("fault"),
            edge.get("verdict"),
            p.attempts,
        )

    def _refuse_verdict(self, p: Any, err: Exception) -> None:
        """Drop a validation whose verdict does not fit docs/protocol.md: the endpoint answers its
        stored verdict again, so asking again gets it again."""
        self.stats.counts["verdicts_refused"] += 1
        del self.pending[p.seq]
        log.warning(
            "event=verdict_refused seq=%d error=%r action=dropped: the endpoint's "
            "verdict does not fit docs/protocol.md; check the endpoint's version",
            p.seq,
            str(err),
        )

    async def _commit_verdicts(self) -> None:
        if not self._uncommitted or self.store is None:
            return
        seqs = sorted(self._uncommitted)
        recs = [
            NewRecord(
                Kind.EVENT,
                EventBody(self.clock.time(), {"type": "verdict", **self.verdicts[s]}).to_cbor(),
            )
            for s in seqs
        ]
        try:
            committed = await self.store.put(recs)
        except StoreError as err:
            log.error("event=verdict_commit_failed seqs=%s error=%r", seqs, str(err))
            return
        log.debug("event=committed kind=event seqs=%s", format_ranges(committed))
        self._uncommitted.difference_update(seqs)
        self._dirty = True
        await self.save()
        for s in seqs:
            for cb in self._listeners:
                try:
                    cb(s, self.verdicts[s])
                except Exception:
                    log.exception("event=verdict_listener_failed seq=%d", s)

    # -- non-critical inference ------------------------------------------------------------------
    async def infer(
        self, window: Any, deadline: float | None = None, *, model: str | None = None
    ) -> InferResult:
        """The full-precision cloud model's answer when the link allows it and it comes within
        ``deadline`` seconds (default ``infer_deadline``); the edge model's otherwise."""
        if not self.edge:
            raise ValueError("the router has no edge model")
        name = model or next(iter(self.edge))
        edge_model = self.edge[name]
        t0 = self.clock.monotonic()
        w = np.asarray(window, dtype=np.float32).reshape(-1)
        edge_out = np.asarray(edge_model.predict(w.reshape(edge_model.input_shape)))
        deadline = self.settings.infer_deadline if deadline is None else deadline

        def edge(reason: str) -> InferResult:
            self.stats.counts[f"infer_edge_{reason.split(':')[0]}"] += 1
            return InferResult(
                SOURCE_EDGE,
                name,
                edge_out,
                _anomaly_score(edge_model, w, edge_out),
                reason,
                self.clock.monotonic() - t0,
            )

        if not self.settings.cloud_infer:
            return edge("disabled")
        if not self.link_allows_cloud():
            return edge("link")
        left = deadline - (self.clock.monotonic() - t0)
        if left <= 0:
            return edge("timeout")
        uri = f"{self._endpoint()}/infer/{self.device_id}"
        body = records.dumps({"model": name, "window": [float(v) for v in w]})
        try:
            async with asyncio.timeout(left):
                resp = await self.transport.request(
                    "POST",
                    uri,
                    body,
                    content_format=CF_CBOR,
                    accept=CF_CBOR,
                    deadline=left,
                    confirmable=False,
                )
        except TimeoutError:
            return edge("timeout")
        except SyncError as err:
            timed_out = self.clock.monotonic() - t0 >= deadline
            return edge("timeout" if timed_out else f"error: {err}")
        if not resp.success:
            return edge(f"error: {resp.dotted}")
        try:
            doc = records.loads(resp.payload)
            out = np.asarray(doc["output"], dtype=np.float32).reshape(edge_out.shape)
            score = doc.get("score")
            score = (
                float(score) if isinstance(score, int | float) and math.isfinite(score) else None
            )
        except (records.RecordError, KeyError, TypeError, ValueError) as err:
            return edge(f"error: bad answer ({err})")
        self.stats.counts["infer_cloud"] += 1
        return InferResult(SOURCE_CLOUD, name, out, score, "cloud", self.clock.monotonic() - t0)

    # -- status ----------------------------------------------------------------------------------
    def snapshot(self) -> dict[str, Any]:
        """For ``edge-agent status``: pending validations, the latest verdicts, counters."""
        latest = sorted(self.verdicts)[-5:]
        return {
            "pending": sorted(self.pending),
            "verdicts": len(self.verdicts),
            "latest": [
                {
                    k: self.verdicts[s].get(k)
                    for k in ("seq", "confirmed", "verdict", "fault", "confidence", "score")
                }
                for s in latest
            ],
            "counts": self.stats.as_dict(),
        }
