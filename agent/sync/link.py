"""The link monitor: measures the uplink's link, classifies it, and applies the policy of its state.

Measurements come from the uplink's real exchanges (:class:`agent.sync.uplink.Exchange`, one per
POST) and, when nothing has been exchanged for ``probe_idle`` seconds (sooner while offline, and
towards the next endpoint or back to the primary: :class:`CoapProbe`), from light probes (a
non-confirmable GET of the device's registry entry on a lane of its own):

- RTT: smoothed, with its variance (RFC 6298's estimator with a faster gain, so a change of link
  shows within a few exchanges); samples only from exchanges that needed no retransmission (Karn);
- loss: the share of the last ``window`` exchanges that were retransmitted or got no answer;
- availability: the share of the last ``window`` exchanges that got an answer;
- goodput: payload bytes the endpoint acknowledged per second, over the last minute of traffic.

States, best first: ``high``, ``medium``, ``low``, ``offline``. A worse state is entered when a
measurement reaches its enter threshold (``medium_rtt``/``medium_loss``, ``low_rtt``/``low_loss``;
for loss, the lower bound of its 95 % confidence interval); a better one only when every
measurement is below ``recover`` times the thresholds it has to clear (for loss, the upper bound),
and in both cases only after ``hold`` consecutive evaluations (one per exchange) agree.
``offline`` is entered after ``offline_failures`` consecutive exchanges without an answer and
``offline_silence`` seconds since the last answer; it is left at the first answer, into ``low``
(measurements start afresh: the link may have changed), and climbs from there.

Each state has a :class:`LinkPolicy` (``[link.high]`` and so on in the config): what the uplink
sends (content format, batch size, outstanding exchanges, or nothing at all when offline), which
model tier the detector runs, and whether cloud validation is allowed. On a change the monitor
applies it to the uplink and the analyzer, and logs it at info.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from agent.errors import SyncError
from agent.sync.backoff import full_jitter
from agent.sync.uplink import MAX_BATCH_BYTES, MAX_BATCH_RECORDS, Exchange, Uplink, network_time
from agent.wire import codec
from agent.wire.batch import CF_SENML_CBOR
from drivers.base import Options
from drivers.clock import Clock, wait_event

log = logging.getLogger(__name__)

#: While offline the link is probed after this many seconds, doubling with each probe that gets
#: no answer up to ``probe_idle`` (full jitter, as the uplink's retries), so a device notices an
#: endpoint that is back within seconds, and a fleet's probes spread out over a long outage.
OFFLINE_PROBE_BASE = 1.0

HIGH, MEDIUM, LOW, OFFLINE = "high", "medium", "low", "offline"
STATES = (HIGH, MEDIUM, LOW, OFFLINE)
_RANK = {HIGH: 0, MEDIUM: 1, LOW: 2, OFFLINE: 3}
TIERS = ("full", "lite")

#: Gain of the smoothed RTT and its variance (RFC 6298 uses 1/8 and 1/4; a classifier needs to
#: see a new link within a few samples).
RTT_GAIN = 0.25
VAR_GAIN = 0.25
#: Answered exchanges in a row, all retransmitted, that give one (ambiguous) RTT sample.
WEAK_RUN = 2
#: z of the one-sided 95 % confidence bounds on the loss rate (Wilson score interval).
LOSS_Z = 1.645
#: Seconds of traffic over which goodput is measured.
GOODPUT_SPAN = 60.0
TRANSITIONS_KEPT = 256  # link state changes remembered for status (a flapping link: years)
#: CoAP content formats of the compact encodings (agent/wire/compact.py registers them).
CF_COMPACT_DEFLATE = 65001
CF_COMPACT_DICT = 65002


@dataclass(frozen=True)
class LinkPolicy:
    """What the agent does in one link state."""

    content_format: int = CF_SENML_CBOR
    batch_bytes: int = MAX_BATCH_BYTES
    batch_records: int = 1000
    max_inflight: int | None = None  # None: the uplink's max_inflight
    send: bool = True  # False: queue only
    model: str = "full"  # detector tier: "full" or "lite"
    cloud_validation: bool = True  # low-confidence results may be checked by the endpoint

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


DEFAULT_POLICIES: dict[str, LinkPolicy] = {
    HIGH: LinkPolicy(CF_SENML_CBOR, MAX_BATCH_BYTES, MAX_BATCH_RECORDS),
    MEDIUM: LinkPolicy(CF_COMPACT_DEFLATE, 8 * 1024, 1000),
    LOW: LinkPolicy(CF_COMPACT_DICT, 1024, 1000, model="lite", cloud_validation=False),
    OFFLINE: LinkPolicy(CF_COMPACT_DICT, 1024, 1000, send=False, cloud_validation=False),
}


@dataclass(frozen=True)
class LinkSettings:
    """``[link]``: thresholds of the classifier, probing, and ``[link.STATE]`` policy overrides."""

    medium_rtt: float = 0.3  # s: smoothed RTT at which the link is no better than medium
    medium_loss: float = 0.25  # share of exchanges retransmitted or unanswered
    low_rtt: float = 0.8
    low_loss: float = 0.4
    recover: float = 0.6  # a better state needs every measurement below recover * threshold
    hold: int = 3  # consecutive evaluations that must agree before a change
    window: int = 64  # exchanges over which loss and availability are measured
    min_samples: int = 4  # exchanges in the window before the state may improve
    offline_failures: int = 3  # consecutive exchanges without an answer ...
    offline_silence: float = 20.0  # ... and seconds since the last answer: offline
    probe_idle: float = 30.0  # probe when no exchange ended for this long (also the probe period)
    probe_timeout: float = 10.0  # deadline of one probe
    initial: str = MEDIUM
    policies: dict[str, LinkPolicy] = field(default_factory=lambda: dict(DEFAULT_POLICIES))

    def policy(self, state: str) -> LinkPolicy:
        return self.policies[state]

    @classmethod
    def from_options(cls, opts: Options) -> LinkSettings:
        d = cls()
        medium_rtt = opts.number("medium_rtt", d.medium_rtt, above=0.0, maximum=60.0)
        low_rtt = opts.number("low_rtt", d.low_rtt, above=0.0, maximum=60.0)
        if low_rtt <= medium_rtt:
            raise opts.error("low_rtt", f"{low_rtt:g} must be above medium_rtt ({medium_rtt:g})")
        medium_loss = opts.number("medium_loss", d.medium_loss, above=0.0, maximum=1.0)
        low_loss = opts.number("low_loss", d.low_loss, above=0.0, maximum=1.0)
        if low_loss <= medium_loss:
            raise opts.error(
                "low_loss", f"{low_loss:g} must be above medium_loss ({medium_loss:g})"
            )
        window = opts.integer("window", d.window, minimum=4, maximum=1024)
        settings = cls(
            medium_rtt=medium_rtt,
            medium_loss=medium_loss,
            low_rtt=low_rtt,
            low_loss=low_loss,
            recover=opts.number("recover", d.recover, above=0.0, maximum=1.0),
            hold=opts.integer("hold", d.hold, minimum=1, maximum=100),
            window=window,
            min_samples=opts.integer("min_samples", d.min_samples, minimum=1, maximum=window),
            offline_failures=opts.integer(
                "offline_failures", d.offline_failures, minimum=1, maximum=100
            ),
            offline_silence=opts.number(
                "offline_silence", d.offline_silence, minimum=0.0, maximum=3600.0
            ),
            probe_idle=opts.number("probe_idle", d.probe_idle, minimum=0.1, maximum=86400.0),
            probe_timeout=opts.number("probe_timeout", d.probe_timeout, minimum=0.1, maximum=600.0),
            initial=opts.choice("initial", d.initial, (HIGH, MEDIUM, LOW)),
            policies={s: _parse_policy(opts.table(s), DEFAULT_POLICIES[s]) for s in STATES},
        )
        opts.finish()
        return settings


def _parse_policy(t: Options, d: LinkPolicy) -> LinkPolicy:
    cf = t.integer("content_format", d.content_format, minimum=0, maximum=65535)
    known = codec.content_formats()
    if cf not in known:
        raise t.error("content_format", f"{cf} is not one of {', '.join(map(str, known))}")
    inflight = t.value("max_inflight", d.max_inflight)
    policy = LinkPolicy(
        content_format=cf,
        batch_bytes=t.integer("batch_bytes", d.batch_bytes, minimum=256, maximum=MAX_BATCH_BYTES),
        batch_records=t.integer(
            "batch_records", d.batch_records, minimum=1, maximum=MAX_BATCH_RECORDS
        ),
        max_inflight=(
            None if inflight is None else t.integer("max_inflight", minimum=1, maximum=64)
        ),
        send=t.boolean("send", d.send),
        model=t.choice("model", d.model, TIERS),
        cloud_validation=t.boolean("cloud_validation", d.cloud_validation),
    )
    t.finish()
    return policy


class CoapProbe:
    """A light probe: a non-confirmable GET of the device's registry entry (any answer will do).

    Non-confirmable, so that its round trip is never ambiguous (no retransmission) and a lost one
    does not hold its lane for CoAP's retransmission schedule: a probe without an answer within
    its deadline is simply lost.

    A probe also keeps the endpoint list moving while the uplink holds (offline, it sends
    nothing): on a fallback it goes to the primary once ``primary_retry`` has passed (an answer
    takes the device back to it), and a probe of the current endpoint that fails while offline
    moves the list on to the next one, so an offline device finds whichever endpoint answers.
    """

    def __init__(self, transport: Any, endpoints: Any, device_id: str, *, lane: int = 0) -> None:
        self.transport = transport
        self.endpoints = endpoints
        self.device_id = device_id
        self.lane = lane
        self.endpoint: str = endpoints.current  # the one probed last

    async def __call__(self, deadline: float, *, offline: bool = False) -> float:
        """The round trip of the answer from the current endpoint (or the primary, when it is
        time to try it again); raises SyncError when none came. A primary that does not answer
        is not the link the device uses: the current endpoint is probed after it, and only that
        outcome counts."""
        eps = self.endpoints
        if eps.want_primary():
            self.endpoint = eps.uris[0]
            try:
                rtt = await self._get(eps.uris[0], deadline)
            except SyncError:
                eps.retried_primary_failed()
            else:
                eps.primary_ok()
                return rtt
        uri = self.endpoint = eps.current
        try:
            return await self._get(uri, deadline)
        except SyncError:
            if offline:
                eps.failed(uri)
            raise

    async def _get(self, uri: str, deadline: float) -> float:
        started = network_time()
        await self.transport.request(
            "GET",
            f"{uri}/devices/{self.device_id}",
            deadline=deadline,
            lane=self.lane,
            confirmable=False,
        )
        return network_time() - started


class LinkMonitor:
    """Measures the link from exchanges and probes, classifies it, applies the state's policy."""

    def __init__(
        self,
        settings: LinkSettings,
        clock: Clock,
        *,
        uplink: Uplink | None = None,
        probe: CoapProbe | None = None,
        analyzer: Callable[[], Any] | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.settings = settings
        self.rng = rng or random.Random()
        self.clock = clock
        self.uplink = uplink
        self.probe = probe
        self.analyzer = analyzer or (lambda: None)
        self.state = settings.initial
        self.since = clock.monotonic()
        self.srtt: float | None = None
        self.rttvar = 0.0
        self._outcomes: deque[tuple[bool, bool]] = deque(maxlen=settings.window)  # (answered, lost)
        self._delivered: deque[tuple[float, int]] = deque()  # (time, acknowledged bytes)
        self._weak: list[float] = []  # times of the current run of retransmitted exchanges
        self.failures = 0  # consecutive exchanges without an answer
        self.last_answer = clock.monotonic()
        self.last_exchange = -math.inf
        self.exchanges = 0  # exchanges observed (data and probes)
        self.probes = 0
        self.probes_failed = 0
        self._offline_probes_failed = 0  # in a row, while offline (their backoff)
        self._offline_period = OFFLINE_PROBE_BASE
        # (from, to, exchanges at the change): the latest TRANSITIONS_KEPT; a count of them all
        self.transitions: deque[tuple[str, str, int]] = deque(maxlen=TRANSITIONS_KEPT)
        self.transition_count = 0
        self._pending: str | None = None
        self._pending_count = 0
        self._tier_applied: str | None = None
        self._tier_error: str | None = None  # the last refusal of the tier, said once
        self._wake = asyncio.Event()
        self._apply()

    # -- measurements -------------------------------------------------------------------------
    @property
    def loss(self) -> float | None:
        if not self._outcomes:
            return None
        return sum(1 for _, lost in self._outcomes if lost) / len(self._outcomes)

    @property
    def availability(self) -> float | None:
        if not self._outcomes:
            return None
        return sum(1 for answered, _ in self._outcomes if answered) / len(self._outcomes)

    @property
    def goodput(self) -> float | None:
        """Acknowledged payload bytes per second over the last GOODPUT_SPAN seconds."""
        self._trim(self.clock.monotonic())
        if len(self._delivered) < 2:
            return None
        span = self._delivered[-1][0] - self._delivered[0][0]
        if span <= 0:
            return None
        return sum(b for _, b in list(self._delivered)[1:]) / span

    @property
    def policy(self) -> LinkPolicy:
        return self.settings.policy(self.state)

    @property
    def tier(self) -> str:
        return self.policy.model

    @property
    def cloud_validation(self) -> bool:
        return self.policy.cloud_validation

    def _trim(self, now: float) -> None:
        while self._delivered and now - self._delivered[0][0] > GOODPUT_SPAN:
            self._delivered.popleft()

    def observe(self, ex: Exchange) -> None:
        """One exchange of the uplink ended (the uplink's ``on_exchange``)."""
        now = self.clock.monotonic()
        if ex.ok and ex.delivered and ex.records:
            self._delivered.append((now, ex.bytes_sent * ex.delivered // ex.records))
            self._trim(now)
        self._record(now, ex.ok, ex.rtt, ex.retransmitted)

    def _record(self, now: float, answered: bool, rtt: float | None, retrans: bool) -> None:
        self.exchanges += 1
        self.last_exchange = now
        if answered or self.state != OFFLINE:  # loss is measured on a link that is up
            self._outcomes.append((answered, retrans or not answered))
        if answered:
            self.failures = 0
            self.last_answer = now
            if rtt is not None and not retrans:
                self._weak.clear()
                self._sample(rtt)
            elif rtt is not None:
                # Karn: the time of a retransmitted exchange is ambiguous. When no exchange gets
                # through without one (the RTT outgrew the retransmission timeout), the shortest
                # of a run of them is taken: it is the nearest to an answer to the first copy.
                self._weak.append(rtt)
                if len(self._weak) >= WEAK_RUN:
                    self._sample(min(self._weak))
                    self._weak.clear()
        else:
            self.failures += 1
        self._evaluate(now)

    def _sample(self, rtt: float) -> None:
        if self.srtt is None:
            self.srtt, self.rttvar = rtt, rtt / 2
        else:
            self.rttvar += VAR_GAIN * (abs(self.srtt - rtt) - self.rttvar)
            self.srtt += RTT_GAIN * (rtt - self.srtt)

    # -- classification -----------------------------------------------------------------------
    def _candidate(self, now: float) -> str:
        s = self.settings
        if self.failures >= s.offline_failures and now - self.last_answer >= s.offline_silence:
            return OFFLINE
        if self.state == OFFLINE:
            return OFFLINE if self.failures else LOW
        rtt = self.srtt
        if rtt is None or not self._outcomes:
            return self.state
        # the loss rate is known within bounds: a worse state needs its lower bound at the
        # threshold, a better one its upper bound below recover * threshold
        lost = sum(1 for _, lost in self._outcomes if lost)
        low_bound, high_bound = wilson(lost, len(self._outcomes), LOSS_Z)
        if rtt >= s.low_rtt or low_bound >= s.low_loss:
            raw = LOW
        elif rtt >= s.medium_rtt or low_bound >= s.medium_loss:
            raw = MEDIUM
        else:
            raw = HIGH
        if _RANK[raw] >= _RANK[self.state]:
            return raw  # as bad or worse: the enter thresholds decide
        if len(self._outcomes) < s.min_samples:
            return self.state
        k = s.recover
        if self.state == LOW and not (rtt < s.low_rtt * k and high_bound < s.low_loss * k):
            return LOW
        if rtt < s.medium_rtt * k and high_bound < s.medium_loss * k:
            return HIGH
        return MEDIUM

    def _evaluate(self, now: float) -> None:
        cand = self._candidate(now)
        if cand == self.state:
            self._pending, self._pending_count = None, 0
            return
        if cand == self._pending:
            self._pending_count += 1
        else:
            self._pending, self._pending_count = cand, 1
        # offline has its own persistence (failures and silence); its end is one answer
        if cand == OFFLINE or self.state == OFFLINE or self._pending_count >= self.settings.hold:
            self._change(cand, now)

    def _change(self, new: str, now: float) -> None:
        old = self.state
        loss = self.loss
        log.info(
            "event=link_state from=%s to=%s rtt_ms=%s loss=%s exchanges=%d",
            old,
            new,
            f"{self.srtt * 1000:.0f}" if self.srtt is not None else "na",
            f"{loss:.2f}" if loss is not None else "na",
            self.exchanges,
        )
        self.transitions.append((old, new, self.exchanges))
        self.transition_count += 1
        self.state = new
        self.since = now
        self._pending, self._pending_count = None, 0
        if OFFLINE in (old, new):  # each outage's probes back off from the start
            self._offline_probes_failed = 0
            self._offline_period = OFFLINE_PROBE_BASE
        if new == OFFLINE:
            # what is measured after the outage belongs to the link that comes back
            self._outcomes.clear()
            self._weak.clear()
            self.srtt, self.rttvar = None, 0.0
        self._apply()
        if old == OFFLINE and self.uplink is not None:
            self.uplink.poke()
        self._wake.set()

    def _apply(self) -> None:
        """Put the current state's policy into effect."""
        policy = self.policy
        up = self.uplink
        if up is not None:
            limit = up.settings.max_inflight
            p = up.policy
            p.content_format = policy.content_format
            p.batch_bytes = policy.batch_bytes
            p.batch_records = policy.batch_records
            p.max_inflight = min(limit, policy.max_inflight or limit)
            p.hold = not policy.send
            p.level = self.state
        self._apply_tier()

    def _apply_tier(self) -> None:
        analyzer = self.analyzer()
        set_tier = getattr(analyzer, "set_tier", None)
        if set_tier is None or self._tier_applied == self.tier:
            return
        try:
            set_tier(self.tier)
        except Exception as err:  # the detector keeps its model; the link goes on
            why = f"{self.tier}: {err}"
            if why != self._tier_error:  # said once; asked again at each state change or probe
                log.warning("event=model_tier_failed tier=%s error=%r", self.tier, str(err))
            self._tier_error = why
            return
        self._tier_applied, self._tier_error = self.tier, None

    # -- probing ------------------------------------------------------------------------------
    async def run(self) -> None:
        """Probes the link when it is idle (offline: at a backoff from ``OFFLINE_PROBE_BASE`` up
        to ``probe_idle`` seconds, with full jitter); applies the model tier once the analyzer
        exists."""
        last_probe = -math.inf
        while True:
            self._apply_tier()
            now = self.clock.monotonic()
            period = self.probe_period
            idle_for = now - max(self.last_exchange, last_probe)
            if self.probe is not None and idle_for >= period:
                last_probe = now
                await self._probe_once()
                continue
            self._wake.clear()
            await wait_event(self.clock, self._wake, max(0.05, period - idle_for))

    @property
    def probe_period(self) -> float:
        """Seconds of idleness before the next probe."""
        if self.state == OFFLINE:
            return min(self._offline_period, self.settings.probe_idle)
        return self.settings.probe_idle

    async def _probe_once(self) -> None:
        assert self.probe is not None
        self.probes += 1
        offline = self.state == OFFLINE
        try:
            rtt = await self.probe(self.settings.probe_timeout, offline=offline)
        except SyncError as err:
            self.probes_failed += 1
            log.debug("event=probe_failed endpoint=%s error=%r", self.probe.endpoint, str(err))
            if offline:
                self._offline_probes_failed += 1
                self._offline_period = full_jitter(
                    self._offline_probes_failed,
                    OFFLINE_PROBE_BASE,
                    self.settings.probe_idle,
                    self.rng,
                    floor=OFFLINE_PROBE_BASE / 2,
                )
            self._record(self.clock.monotonic(), False, None, False)
            return
        log.debug("event=probe endpoint=%s rtt=%.3f", self.probe.endpoint, rtt)
        self._record(self.clock.monotonic(), True, rtt, False)

    # -- status -------------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        loss, avail, goodput = self.loss, self.availability, self.goodput
        return {
            "state": self.state,
            "since_s": self.clock.monotonic() - self.since,
            "rtt_ms": self.srtt * 1000 if self.srtt is not None else None,
            "rtt_var_ms": self.rttvar * 1000 if self.srtt is not None else None,
            "loss": loss,
            "availability": avail,
            "goodput_bps": goodput * 8 if goodput is not None else None,
            "exchanges": self.exchanges,
            "probes": self.probes,
            "probes_failed": self.probes_failed,
            "transitions": self.transition_count,
            "policy": self.policy.as_dict(),
        }


def wilson(k: int, n: int, z: float) -> tuple[float, float]:
    """Wilson score interval of a proportion: ``k`` of ``n`` (lower, upper)."""
    if n <= 0:
        return 0.0, 1.0
    p = k / n
    z2 = z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def with_policy(settings: LinkSettings, state: str, **changes: Any) -> LinkSettings:
    """``settings`` with some fields of one state's policy changed (tests, tools)."""
    policies = dict(settings.policies)
    policies[state] = replace(policies[state], **changes)
    return replace(settings, policies=policies)
