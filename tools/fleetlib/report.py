"""The fleet run's figures (:class:`FleetReport`, built from the workers' results) and the check
of the endpoint's storage against them (:func:`verify`).

Throughput, latency and CPU per request are measured in the steady window: from the end of the
warm-up (the first interval, while every device does its Echo round trip) to the end of the
run. ``records_per_s`` is the records acknowledged in the window over its length; ``ack_p50_ms``
and ``ack_p99_ms`` are from a request's first transmission to its answer (retransmissions
included), for the requests acknowledged in the window.

The JSON form (:meth:`FleetReport.to_json`) leaves out the per-device seqs (kept for
:func:`verify`).
"""

from __future__ import annotations

import bisect
import math
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from fleetlib.coap import LinkStats
from fleetlib.worker import WorkerResult


def percentile(values: Sequence[float], p: float) -> float | None:
    """The ``p``-th percentile (nearest rank) of ``values``; None when there are none."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(p / 100.0 * len(ordered)))
    return float(ordered[rank - 1])


@dataclass
class FleetReport:
    """What a fleet run did (the fields are described in this module's docstring and beside
    them); ``verification`` is filled in by whoever calls :func:`verify`."""

    devices: int
    processes: int
    batch_interval_s: float
    batch_size: int
    duration_s: float
    window_s: float  # the steady window the rates and latencies are measured in
    security: str
    content_format: int
    target: str
    sockets: int
    requests_sent: int  # CoAP requests started, Echo repeats included, retransmissions not
    requests_acked: int  # answered 2.04 with an ack
    retransmissions: int
    timeouts: int
    echo_handshakes: int
    separate_responses: int
    records_generated: int
    records_sent: int  # distinct records sent at least once
    records_acked: int
    records_per_s: float  # records acknowledged in the steady window per second
    requests_per_s: float  # requests acknowledged in the steady window per second
    ack_p50_ms: float | None
    ack_p99_ms: float | None
    ack_max_ms: float | None
    tick_lag_p99_ms: float | None  # how late devices woke: the simulator's own saturation
    cpu_s: float  # the workers' CPU, whole run
    cpu_ms_per_request: float | None  # the workers' CPU per request sent, steady window
    abandoned: int  # devices whose last request was still out when the drain ended
    records_conflicted: int
    errors: dict[str, int]
    link: dict[str, int]
    # per second from the start: requests started (not retransmissions) and acknowledged
    sent_per_s: list[int] = field(default_factory=list)
    acked_per_s: list[int] = field(default_factory=list)
    proxy: dict[str, Any] | None = None  # the impairment and the proxy's counters
    endpoint: dict[str, Any] | None = None  # the endpoint process's CPU, when it was measured
    verification: dict[str, int] | None = None
    # per device, for verify(): acknowledged seqs (ranges) and the highest seq sent
    acked: dict[str, tuple[tuple[int, int], ...]] = field(default_factory=dict, repr=False)
    sent: dict[str, int] = field(default_factory=dict, repr=False)

    @classmethod
    def merge(cls, results: Iterable[WorkerResult], **settings: Any) -> FleetReport:
        """One report from the workers' results; ``settings``: devices, processes,
        batch_interval_s, batch_size, duration_s, security, content_format, target."""
        results = sorted(results, key=lambda r: r.index)
        link = LinkStats()
        errors: Counter[str] = Counter()
        latencies: list[float] = []
        lags: list[float] = []
        acked: dict[str, tuple[tuple[int, int], ...]] = {}
        sent: dict[str, int] = {}
        generated = conflicted = 0
        for r in results:
            link.add(r.link)
            errors.update(r.errors)
            latencies.extend(r.latencies_ms)
            lags.extend(r.tick_lag_ms)
            for d in r.devices:
                acked[d.name] = d.acked
                sent[d.name] = d.sent
                generated += d.generated
                conflicted += d.conflicted
        window = max((r.window_s for r in results), default=0.0)
        in_window = sum(r.records_acked_window for r in results)
        requests_window = sum(r.requests_sent_window for r in results)
        cpu_window = sum(r.cpu_s_window for r in results)
        return cls(
            window_s=round(window, 3),
            sockets=sum(r.sockets for r in results),
            requests_sent=sum(r.requests_sent for r in results),
            requests_acked=sum(r.requests_acked for r in results),
            retransmissions=link.retransmissions,
            timeouts=link.timeouts,
            echo_handshakes=sum(r.echo_handshakes for r in results),
            separate_responses=link.separate_responses,
            records_generated=generated,
            records_sent=sum(sent.values()),
            records_acked=sum(r.records_acked for r in results),
            records_per_s=round(in_window / window, 1) if window > 0 else 0.0,
            requests_per_s=round(
                sum(r.requests_acked_window for r in results) / window if window > 0 else 0.0, 1
            ),
            ack_p50_ms=_ms(percentile(latencies, 50)),
            ack_p99_ms=_ms(percentile(latencies, 99)),
            ack_max_ms=_ms(max(latencies, default=None)),
            tick_lag_p99_ms=_ms(percentile(lags, 99)),
            cpu_s=round(sum(r.cpu_s for r in results), 3),
            cpu_ms_per_request=(
                round(cpu_window / requests_window * 1000.0, 4) if requests_window else None
            ),
            abandoned=sum(r.abandoned for r in results),
            records_conflicted=conflicted,
            errors=dict(sorted(errors.items())),
            link=link.as_dict(),
            sent_per_s=_sum_series(r.sent_per_s for r in results),
            acked_per_s=_sum_series(r.acked_per_s for r in results),
            acked=acked,
            sent=sent,
            **settings,
        )

    def to_json(self) -> dict[str, Any]:
        """The figures, without the per-device seqs."""
        doc = asdict(self)
        del doc["acked"], doc["sent"]
        return doc


def _sum_series(series: Iterable[Sequence[int]]) -> list[int]:
    out: list[int] = []
    for one in series:
        if len(one) > len(out):
            out.extend([0] * (len(one) - len(out)))
        for i, n in enumerate(one):
            out[i] += n
    return out


def _ms(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


@dataclass(frozen=True)
class Verification:
    """What the endpoint's storage holds against what the fleet saw acknowledged.

    ``lost``: acknowledged seqs not stored; ``duplicated``: records stored more than once (the
    storage's count of a device above its distinct seqs, or a seq listed twice);
    ``stored_unacked``: seqs sent and stored but never acknowledged (a lost answer: allowed);
    ``foreign``: stored seqs the fleet never sent (another run on the same database).
    Unpacks as ``lost, duplicated = verify(...)``."""

    lost: int
    duplicated: int
    stored_unacked: int
    foreign: int
    stored: int
    acked: int
    devices: int

    def __iter__(self) -> Iterator[int]:
        yield self.lost
        yield self.duplicated

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def verify(storage: Any, report: FleetReport) -> Verification:
    """Check ``storage`` (any :class:`cloud.storage.Storage`: ``seqs`` and ``counts`` per
    device, blocking calls; run it on the storage's thread) against the report's per-device
    acknowledged and sent seqs."""
    lost = duplicated = unacked = foreign = stored_total = acked_total = 0
    for name, ranges in report.acked.items():
        sent = report.sent.get(name, 0)
        seqs = storage.seqs(name)
        total = sum(storage.counts(name).values())
        distinct = sorted(set(seqs))
        duplicated += max(len(seqs) - len(distinct), total - len(distinct), 0)
        stored_total += total
        in_acked = _count_in(distinct, ranges)
        acked_total += sum(b - a + 1 for a, b in ranges)
        lost += sum(b - a + 1 for a, b in ranges) - in_acked
        sent_stored = _count_in(distinct, ((1, sent),)) if sent else 0
        unacked += sent_stored - in_acked
        foreign += len(distinct) - sent_stored
    return Verification(
        lost, duplicated, unacked, foreign, stored_total, acked_total, len(report.acked)
    )


def _count_in(sorted_seqs: list[int], ranges: Iterable[tuple[int, int]]) -> int:
    """How many of ``sorted_seqs`` (ascending, distinct) fall in ``ranges``."""
    n = 0
    for a, b in ranges:
        n += bisect.bisect_right(sorted_seqs, b) - bisect.bisect_left(sorted_seqs, a)
    return n
