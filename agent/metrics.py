"""Metrics in the Prometheus text exposition format, for node_exporter's textfile collector.

The registry holds counters, gauges and histograms with labels. :func:`write_textfile` renders it
and replaces the file atomically (write a temporary file in the same directory, fsync, rename), so
the collector never reads half a file. Stages update their metrics as they work; collectors
registered with :meth:`Registry.collector` are called just before each render for values that are
cheaper to read than to track (queue depth, link state).
"""

from __future__ import annotations

import bisect
import math
import os
import re
import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from drivers.base import Options

_NAME = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*\Z")
_LABEL = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*\Z")

LabelValues = tuple[str, ...]

#: Default latency buckets in seconds (inference, exchanges): 50 us .. 10 s.
LATENCY_BUCKETS = (
    5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 0.01, 0.025,
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _fmt(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if float(value).is_integer() and abs(value) < 1e15:
        return str(int(value))
    return repr(float(value))


class _Metric:
    kind = "untyped"

    def __init__(self, name: str, help: str, labels: Sequence[str] = ()) -> None:
        if not _NAME.match(name):
            raise ValueError(f"bad metric name {name!r}")
        for label in labels:
            if not _LABEL.match(label) or label.startswith("__"):
                raise ValueError(f"bad label name {label!r}")
        self.name = name
        self.help = help
        self.labels = tuple(labels)

    def _key(self, labels: dict[str, str]) -> LabelValues:
        if set(labels) != set(self.labels):
            raise ValueError(f"{self.name}: labels {sorted(labels)} != {sorted(self.labels)}")
        return tuple(str(labels[k]) for k in self.labels)

    def _labelstr(self, key: LabelValues, extra: tuple[tuple[str, str], ...] = ()) -> str:
        pairs = list(zip(self.labels, key, strict=True)) + list(extra)
        if not pairs:
            return ""
        return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in pairs) + "}"

    def samples(self) -> Iterable[str]:
        raise NotImplementedError

    def render(self) -> str:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]
        lines.extend(self.samples())
        return "\n".join(lines)


class Counter(_Metric):
    kind = "counter"

    def __init__(self, name: str, help: str, labels: Sequence[str] = ()) -> None:
        super().__init__(name, help, labels)
        self.values: dict[LabelValues, float] = {}

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        if amount < 0:
            raise ValueError("a counter only goes up")
        key = self._key(labels)
        self.values[key] = self.values.get(key, 0.0) + amount

    def set_total(self, total: float, **labels: str) -> None:
        """Mirror a monotonic total kept elsewhere (e.g. eviction counters in the store)."""
        self.values[self._key(labels)] = float(total)

    def samples(self) -> Iterable[str]:
        for key, value in sorted(self.values.items()):
            yield f"{self.name}{self._labelstr(key)} {_fmt(value)}"


class Gauge(Counter):
    kind = "gauge"

    def set(self, value: float, **labels: str) -> None:
        self.values[self._key(labels)] = float(value)

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        key = self._key(labels)
        self.values[key] = self.values.get(key, 0.0) + amount


class Histogram(_Metric):
    kind = "histogram"

    def __init__(
        self,
        name: str,
        help: str,
        labels: Sequence[str] = (),
        buckets: Sequence[float] = LATENCY_BUCKETS,
    ) -> None:
        super().__init__(name, help, labels)
        if list(buckets) != sorted(buckets) or not buckets:
            raise ValueError("buckets must be sorted and non-empty")
        self.buckets = tuple(float(b) for b in buckets)
        self.counts: dict[LabelValues, list[int]] = {}
        self.sums: dict[LabelValues, float] = {}

    def observe(self, value: float, **labels: str) -> None:
        key = self._key(labels)
        counts = self.counts.setdefault(key, [0] * (len(self.buckets) + 1))
        counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sums[key] = self.sums.get(key, 0.0) + value

    def samples(self) -> Iterable[str]:
        for key in sorted(self.counts):
            cumulative = 0
            for bound, n in zip((*self.buckets, math.inf), self.counts[key], strict=True):
                cumulative += n
                le = (("le", _fmt(bound)),)
                yield f"{self.name}_bucket{self._labelstr(key, le)} {cumulative}"
            yield f"{self.name}_sum{self._labelstr(key)} {_fmt(self.sums[key])}"
            yield f"{self.name}_count{self._labelstr(key)} {cumulative}"


class Registry:
    def __init__(self, prefix: str = "edge_agent_") -> None:
        self.prefix = prefix
        self.metrics: dict[str, _Metric] = {}
        self._collectors: list[Callable[[], None]] = []

    def _add(self, metric: _Metric) -> _Metric:
        if metric.name in self.metrics:
            raise ValueError(f"metric {metric.name} registered twice")
        self.metrics[metric.name] = metric
        return metric

    def counter(self, name: str, help: str, labels: Sequence[str] = ()) -> Counter:
        return self._add(Counter(self.prefix + name, help, labels))  # type: ignore[return-value]

    def gauge(self, name: str, help: str, labels: Sequence[str] = ()) -> Gauge:
        return self._add(Gauge(self.prefix + name, help, labels))  # type: ignore[return-value]

    def histogram(
        self,
        name: str,
        help: str,
        labels: Sequence[str] = (),
        buckets: Sequence[float] = LATENCY_BUCKETS,
    ) -> Histogram:
        return self._add(Histogram(self.prefix + name, help, labels, buckets))  # type: ignore[return-value]

    def collector(self, fn: Callable[[], None]) -> None:
        self._collectors.append(fn)

    def render(self) -> str:
        for fn in self._collectors:
            fn()
        return "\n".join(m.render() for m in self.metrics.values()) + "\n"


def write_textfile(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` atomically (same-directory temp file, fsync, rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


@dataclass(frozen=True)
class MetricsSettings:
    """``[metrics]``: ``textfile`` (path of the .prom file, relative to the data dir; ``""``
    turns metrics off) and ``interval`` (seconds between writes)."""

    textfile: Path | None
    interval: float = 15.0

    @classmethod
    def from_options(cls, opts: Options, data_dir: Path) -> MetricsSettings:
        raw = opts.string("textfile", "metrics/edge_agent.prom")
        interval = opts.number("interval", 15.0, minimum=0.5, maximum=3600.0)
        opts.finish()
        if not raw.strip():
            return cls(None, interval)
        path = Path(raw).expanduser()
        if not path.is_absolute():
            path = data_dir / path
        if path.suffix != ".prom":
            raise opts.error("textfile", "node_exporter's textfile collector reads only *.prom")
        return cls(path, interval)
