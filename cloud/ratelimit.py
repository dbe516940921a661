"""The per-device ingest rate limit (docs/ops.md "Rate limit", docs/protocol.md "Ingest"): a
token bucket per device id in each endpoint process, so that a device whose credential is valid
but which is compromised or broken cannot store records as fast as its link allows and fill the
endpoint's disk (retention bounds storage by time only).

Each record of a batch (``POST /ingest/<device>``, or a device's entry of ``POST /relay``) costs
one token of its device's bucket, which holds at most ``burst`` tokens and refills at ``rate``
per second. A batch is taken whole or refused whole: 5.03 Service Unavailable with Max-Age = the
whole seconds until the bucket holds enough for it, and nothing of it is stored (a relay entry:
``[163, reason, max-age]``). A refused batch costs no token; the device keeps its records and
sends them again after Max-Age (agent/sync/uplink.py), so nothing is lost and the dedup by
(device, seq) stores each once. A batch larger than the burst is taken when the bucket is full
and leaves it in debt: never refused for ever, and the sustained rate still holds.

Why the defaults (:class:`cloud.protocol.Limits` ``device_rate`` and ``device_burst``):

- What devices send: the reference rig (agent/examples/pump-rig.toml) about 8 records/s, the
  fleet bench's devices 1 record/s (10 readings every 10 s, tools/benches/fleet.py). 1,000
  records/s is 125 times the rig.
- A device catching up after an outage: the agent's uplink moves about 300 records/s over a
  lossy WAN link (5 % loss, 100 ms each way; README "bench security") and 9,000 to 13,000 on a
  clean loopback. At 1,000/s a day of the rig's backlog (about 700,000 records) goes up in about
  12 minutes; over a real WAN link the link is slower than the limit.
- The burst: the agent has up to 8 batches in flight (``[uplink] max_inflight``) of at most
  4,096 records each (its largest batch, the endpoint's limit): 32,768 records is that whole
  window, taken at once; a backlog beyond it is slowed to the rate, each batch over it answered
  5.03 with a Max-Age of a few seconds, never refused outright.
- What it bounds: a device at the limit stores at most 86.4 million records a day (about 14 GB
  of SQLite at about 160 bytes a record), where before only its link bounded it. A fleet of
  small devices can take a much lower rate: ``serve --device-rate``.

The table of buckets is bounded (:data:`MAX_DEVICES`, the least recently used dropped first: a
bucket that has refilled is the same as none, and one dropped early gives its device at most a
full burst again). Refusals are said once per device per :data:`LOG_INTERVAL` (a warning, as for
a peer that misbehaves: cloud/server.py's logging policy), with what was refused since the last
line; the totals are counted in the server's ``stats``.
"""

from __future__ import annotations

import argparse
import logging
import math
from collections import Counter, OrderedDict
from collections.abc import Callable

from aiocoap.numbers.codes import Code

from cloud.protocol import Limits, _Failure

log = logging.getLogger("cloud.server")

#: Buckets kept at most (devices seen by this process); the least recently used go first.
MAX_DEVICES = 65_536
#: Seconds between two lines about the same device's refusals.
LOG_INTERVAL = 60.0
#: The longest Max-Age answered (a rate so low that a batch needs longer is told this).
MAX_AGE = 3600
#: Tokens a float may miss by after a refill of exactly the seconds told (not a whole record).
EPSILON = 1e-6


class RateLimited(_Failure):
    """5.03 with Max-Age: the device sent more than its rate allows (said by the limiter)."""

    warn = False  # the limiter says it, once per device per interval

    def __init__(self, device: str, max_age: int) -> None:
        reason = f"{device} is over its rate limit: send again in {max_age} s"
        super().__init__(Code.SERVICE_UNAVAILABLE, reason, max_age=max_age)
        self.max_age = max_age


class _Bucket:
    __slots__ = ("at", "batches", "records", "said", "tokens")

    def __init__(self, tokens: float, at: float) -> None:
        self.tokens = tokens
        self.at = at  # when ``tokens`` was right
        self.batches = 0  # refused since the last line
        self.records = 0
        self.said = -math.inf  # when the last line was


class DeviceRateLimit:
    """A token bucket per device (module docstring). ``now``: a monotonic clock in seconds;
    ``rate`` 0 takes everything."""

    def __init__(
        self,
        rate: float,
        burst: int,
        now: Callable[[], float],
        stats: Counter[str] | None = None,
        max_devices: int = MAX_DEVICES,
    ) -> None:
        if rate < 0 or (rate > 0 and burst < 1) or max_devices < 1:
            raise ValueError(f"bad rate limit: rate={rate!r} burst={burst!r}")
        self.rate = float(rate)
        self.burst = int(burst)
        self.now = now
        self.stats: Counter[str] = Counter() if stats is None else stats
        self.max_devices = max_devices
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()

    @classmethod
    def of(cls, limits: Limits, now: Callable[[], float], stats: Counter[str]) -> DeviceRateLimit:
        return cls(limits.device_rate, limits.device_burst, now, stats)

    def __len__(self) -> int:
        return len(self._buckets)

    def wait(self, device: str, records: int) -> int:
        """0 when ``device`` may store ``records`` records now (they are taken from its bucket);
        else the whole seconds until it may (nothing is taken)."""
        if self.rate <= 0 or records <= 0:
            return 0
        bucket = self._bucket(device)
        need = min(records, self.burst)  # a batch over the burst: when the bucket is full
        if bucket.tokens + EPSILON >= need:
            bucket.tokens -= records
            return 0
        # capped before it is rounded: at a tiny rate the seconds are a float too large for int
        return max(1, math.ceil(min(MAX_AGE, (need - bucket.tokens) / self.rate)))

    def take(self, device: str, records: int) -> None:
        """Take ``records`` tokens of ``device``'s bucket, or raise :class:`RateLimited` (and
        count and say it) when it does not hold enough."""
        wait = self.wait(device, records)
        if wait:
            self._refused(device, records, wait)
            raise RateLimited(device, wait)

    def _bucket(self, device: str) -> _Bucket:
        now = self.now()
        bucket = self._buckets.get(device)
        if bucket is None:
            bucket = self._buckets[device] = _Bucket(float(self.burst), now)
            if len(self._buckets) > self.max_devices:
                self._buckets.popitem(last=False)
            return bucket
        self._buckets.move_to_end(device)
        gained = max(0.0, now - bucket.at) * self.rate
        bucket.tokens, bucket.at = min(float(self.burst), bucket.tokens + gained), now
        return bucket

    def _refused(self, device: str, records: int, wait: int) -> None:
        self.stats["rate_limited_batches"] += 1
        self.stats["rate_limited_records"] += records
        bucket = self._buckets[device]
        bucket.batches += 1
        bucket.records += records
        now = self.now()
        if now - bucket.said < LOG_INTERVAL:
            return
        log.warning(
            "event=device_rate_limited device=%s rate=%g burst=%d refused_batches=%d "
            "refused_records=%d since_s=%s retry_in=%d: more than serve --device-rate allows; "
            "its records stay queued on the device",
            device, self.rate, self.burst, bucket.batches, bucket.records,
            "-" if bucket.said == -math.inf else f"{now - bucket.said:.0f}", wait,
        )  # fmt: skip
        bucket.said, bucket.batches, bucket.records = now, 0, 0


# -- serve --device-rate, --device-burst ----------------------------------------------------------


def add_arguments(serve: argparse.ArgumentParser) -> None:
    """``serve``'s options of the limit (their help says why the defaults)."""
    limits = Limits()
    serve.add_argument(
        "--device-rate",
        type=_number(float),
        default=limits.device_rate,
        metavar="RECORDS_PER_S",
        help="records per second each device may store, sustained; more is answered 5.03 with "
        "Max-Age and the device sends it again later; 0 = no limit (default %(default)g: the "
        "reference rig sends about 8/s, a day of its backlog goes up in about 12 minutes; "
        'docs/ops.md "Rate limit")',
    )
    serve.add_argument(
        "--device-burst",
        type=_number(int, 1),
        default=limits.device_burst,
        metavar="RECORDS",
        help="records a device may send at once above the rate (default %(default)d: the "
        "agent's 8 batches in flight of its largest size, 4,096 records)",
    )


def limits_of(args: argparse.Namespace) -> Limits:
    """The endpoint's :class:`Limits` with ``serve``'s rate limit."""
    return Limits(device_rate=args.device_rate, device_burst=args.device_burst)


def worker_argv(args: argparse.Namespace) -> list[str]:
    """What ``serve --processes`` passes on to each worker (each has its own buckets)."""
    return ["--device-rate", repr(args.device_rate), "--device-burst", str(args.device_burst)]


def _number(kind: type, least: int = 0) -> Callable[[str], float]:
    """An argparse type: a finite ``kind`` of ``least`` or more (a usage error otherwise: 64)."""

    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            value = -1
        if not least <= value < math.inf:
            raise argparse.ArgumentTypeError(f"{text!r}: a number, {least} or more")
        return value

    return parse
