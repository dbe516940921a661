#!/usr/bin/env python3
"""linkem: a UDP link impairment proxy (user-space netem) between a CoAP client and its server.

The machine has no ``tc netem``, so delay, loss and reordering are emulated here, in user space. The
proxy listens on a local address; every client (source address and port) gets its own upstream
socket connected to the target, so replies find their way back to the right client, like a NAT. The
two directions are impaired independently: ``up`` (client to target) and ``down`` (target back to
the client).

What a packet goes through, in this order, per direction::

    outage? -> duplicate? -> (each copy) shaper queue (tail drop) -> loss (independent or
    Gilbert-Elliott) -> delay + jitter (FIFO if preserve_order) -> held back (reorder)? -> out

and a packet that is due during an outage is dropped too (an outage drops what is on the wire).

Use it from tests, in the same event loop::

    proxy = LinkEmulator(listen=("127.0.0.1", 0), target=("127.0.0.1", 5683),
                         impairment=Impairment(delay=0.15, jitter=0.02, loss=0.1), seed=1)
    await proxy.start()
    ...  # point the client at coap://127.0.0.1:{proxy.port}/
    proxy.set(Impairment(loss=0.3))            # live change, both directions
    proxy.update(direction="down", delay=0.5)  # change some fields of one direction
    proxy.outage(True); proxy.outage(False)
    proxy.stats()                              # counters per direction
    await proxy.stop()

or from people and other processes::

    python tools/linkem.py run --listen 127.0.0.1:5684 --target 127.0.0.1:5683 --delay 150ms \\
        --jitter 20ms --loss 10% --burst 3 --dup 1% --reorder 1% --rate 256kbit \\
        --outage 30s+120s --seed 7 --control /tmp/linkem.sock
    python tools/linkem.py ctl --control /tmp/linkem.sock set loss=30% delay=600ms
    python tools/linkem.py ctl --control /tmp/linkem.sock outage on
    python tools/linkem.py ctl --control /tmp/linkem.sock stats

The control channel speaks one JSON object per line (request, then response) over a Unix socket or
a TCP port on 127.0.0.1; :func:`control` and :func:`control_sync` are its clients.

Timing uses the running event loop's clock (``loop.time()`` and ``loop.call_at``), so the proxy also
runs on a simulated-time loop. This module imports nothing from the agent: it runs standalone.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import heapq
import json
import logging
import math
import os
import random
import re
import signal
import socket
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)

# Logging policy: debug for per-flow events under normal operation, info for state changes (start,
# stop, outage on/off, impairment changed), warning for a peer or socket that misbehaves.

MAX_DATAGRAM = 65535
READ_BATCH = 64  # datagrams read per readiness callback before yielding to the loop
LISTEN_RCVBUF = 1 << 20  # best effort: room for bursts on the listening socket
DEFAULT_REORDER_GAP = 0.05  # seconds a held-back packet waits on top of its normal delay
DEFAULT_QUEUE_LIMIT = 100  # packets waiting for the bandwidth shaper
CONTROL_TIMEOUT = 5.0  # seconds a control client waits for an answer

EX_USAGE = 64  # bad command line (sysexits.h)
EX_UNAVAILABLE = 69  # the control channel does not answer
EX_OSERR = 71  # cannot bind or connect

DIRECTIONS = ("up", "down")
DROP_CAUSES = ("outage", "queue", "loss", "error")


# --------------------------------------------------------------------------------------------------
# Configuration


@dataclass(frozen=True)
class GilbertElliott:
    """The Gilbert-Elliott two-state loss model, stepped once per packet.

    ``p`` is P(good -> bad), ``r`` is P(bad -> good); ``loss_bad`` and ``loss_good`` are the loss
    probabilities in each state (1 - h and 1 - k in the literature). With ``loss_bad=1`` and
    ``loss_good=0`` (the simple Gilbert model) every stay in the bad state is one burst of losses.
    """

    p: float
    r: float
    loss_bad: float = 1.0
    loss_good: float = 0.0

    def __post_init__(self) -> None:
        for name in ("p", "r", "loss_bad", "loss_good"):
            _check_probability(f"gilbert {name}", getattr(self, name))
        if self.r == 0 and self.p > 0:
            raise ValueError("gilbert r must be > 0 when p > 0, or the link never leaves bad")

    @classmethod
    def from_burst(cls, loss: float, burst: float) -> GilbertElliott:
        """The simple Gilbert model with mean loss rate ``loss`` and mean burst length ``burst``."""
        _check_probability("loss", loss)
        if burst < 1:
            raise ValueError(f"burst must be >= 1 packet, got {burst:g}")
        if loss >= 1:
            raise ValueError("a bursty loss of 100% is no different from independent loss of 100%")
        r = 1.0 / burst
        p = loss * r / (1.0 - loss)
        if p > 1:
            raise ValueError(
                f"loss {loss:.0%} with mean burst {burst:g} is impossible: with bursts of "
                f"{burst:g} packets the loss can be at most {burst / (burst + 1):.0%}"
            )
        return cls(p=p, r=r)

    @property
    def bad_fraction(self) -> float:
        """The stationary probability of the bad state."""
        return self.p / (self.p + self.r) if self.p + self.r else 0.0

    @property
    def mean_loss(self) -> float:
        """The long-run loss rate."""
        bad = self.bad_fraction
        return bad * self.loss_bad + (1.0 - bad) * self.loss_good

    @property
    def mean_burst_length(self) -> float:
        """The mean stay in the bad state, in packets (the mean loss burst when loss_bad=1)."""
        return 1.0 / self.r if self.r else math.inf


@dataclass(frozen=True)
class Impairment:
    """What one direction of the link does to packets. Times in seconds, rate in bytes per second.

    Loss: ``loss`` alone is independent (Bernoulli) loss. With ``burst`` > 1 the same mean loss
    comes in bursts of that mean length (a simple Gilbert model, see :meth:`loss_model`). An
    explicit ``gilbert`` model replaces both.
    """

    delay: float = 0.0
    jitter: float = 0.0  # uniform: +-jitter around delay; normal: the standard deviation
    distribution: str = "uniform"  # "uniform" | "normal"
    preserve_order: bool = False  # jitter never reorders: a packet waits for the one before it
    loss: float = 0.0
    burst: float = 1.0  # mean loss-burst length in packets; 1 = independent loss
    gilbert: GilbertElliott | None = None
    dup: float = 0.0  # probability that a packet is sent twice
    reorder: float = 0.0  # probability that a packet is held back by reorder_gap
    reorder_gap: float = DEFAULT_REORDER_GAP
    rate: float = 0.0  # bytes per second; 0 = unlimited
    queue_limit: int = DEFAULT_QUEUE_LIMIT  # packets waiting for the shaper; more are tail-dropped
    bucket: int = 0  # token bucket depth in bytes; 0 = every packet takes size/rate to serialize

    def __post_init__(self) -> None:
        for name in ("delay", "jitter", "reorder_gap", "rate"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        for name in ("loss", "dup", "reorder"):
            _check_probability(name, getattr(self, name))
        if self.distribution not in ("uniform", "normal"):
            raise ValueError(f"distribution must be uniform or normal, got {self.distribution!r}")
        if not isinstance(self.burst, int | float) or not self.burst >= 1:
            raise ValueError(f"burst must be a number >= 1 (packets), got {self.burst!r}")
        if isinstance(self.queue_limit, bool) or not isinstance(self.queue_limit, int):
            raise ValueError(
                f"queue_limit must be a whole number of packets, got {self.queue_limit!r}"
            )
        if self.queue_limit < 1:
            raise ValueError(f"queue_limit must be >= 1 packet, got {self.queue_limit}")
        if isinstance(self.bucket, bool) or not isinstance(self.bucket, int) or self.bucket < 0:
            raise ValueError(f"bucket must be a whole number of bytes >= 0, got {self.bucket!r}")
        self.loss_model()  # validates the loss/burst pair

    def loss_model(self) -> GilbertElliott | float:
        """The Gilbert-Elliott model in force, or the independent loss probability."""
        if self.gilbert is not None:
            return self.gilbert
        if self.burst > 1 and 0 < self.loss < 1:
            return GilbertElliott.from_burst(self.loss, self.burst)
        return self.loss

    @property
    def is_clear(self) -> bool:
        """True when packets pass untouched (no delay, loss, duplication, reordering or cap)."""
        model = self.loss_model()
        loss = model.mean_loss if isinstance(model, GilbertElliott) else model
        return not (self.delay or self.jitter or loss or self.dup or self.reorder or self.rate)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def describe(self) -> str:
        """One line, key=value, only what differs from a clear link."""
        parts = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value == f.default:
                continue
            if f.name in ("delay", "jitter", "reorder_gap"):
                text = _fmt_duration(value)
            elif f.name in ("loss", "dup", "reorder"):
                text = f"{value * 100:.4g}%"
            elif f.name == "rate":
                text = f"{value * 8 / 1000:.6g}kbit"
            elif f.name == "gilbert":
                text = f"{value.p:.4g}:{value.r:.4g}:{value.loss_bad:.4g}:{value.loss_good:.4g}"
            else:
                text = f"{value:g}" if isinstance(value, float) else str(value)
            parts.append(f"{f.name}={text}")
        return " ".join(parts) or "clear"


def _check_probability(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
        raise ValueError(f"{name} must be a probability between 0 and 1, got {value!r}")


# --------------------------------------------------------------------------------------------------
# Parsing of human values (shared by the CLI, the control channel and `ctl`)

_NUMBER = r"([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)"
_DURATION_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0, "": 1.0}
_RATE_UNITS = {  # to bytes per second
    "bit": 1 / 8,
    "kbit": 1000 / 8,
    "mbit": 1e6 / 8,
    "gbit": 1e9 / 8,
    "": 1.0,
    "b/s": 1.0,
    "kb/s": 1000.0,
    "mb/s": 1e6,
    "gb/s": 1e9,
}
_SIZE_UNITS = {"": 1, "b": 1, "kb": 1000, "kib": 1024, "mb": 1000**2, "mib": 1024**2}


def _split_number(text: str, what: str) -> tuple[float, str]:
    match = re.fullmatch(_NUMBER + r"\s*([a-zA-Z/%]*)", text.strip())
    if not match:
        raise ValueError(f"bad {what} {text!r}")
    return float(match.group(1)), match.group(2)


def parse_duration(value: str | float) -> float:
    """``150ms``, ``0.15s``, ``2m``, ``500us``; a bare number is seconds."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        seconds = float(value)
    else:
        number, unit = _split_number(str(value), "duration")
        if unit.lower() not in _DURATION_UNITS:
            raise ValueError(f"bad duration {value!r}: use us, ms, s, m or h")
        seconds = number * _DURATION_UNITS[unit.lower()]
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"bad duration {value!r}: must be >= 0")
    return seconds


def parse_probability(value: str | float) -> float:
    """``10%`` or ``0.1``."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        prob = float(value)
    else:
        number, unit = _split_number(str(value), "probability")
        if unit not in ("", "%"):
            raise ValueError(f"bad probability {value!r}: use a percentage (10%) or a fraction")
        prob = number / 100 if unit == "%" else number
    if not 0 <= prob <= 1:
        raise ValueError(f"bad probability {value!r}: must be between 0% and 100%")
    return prob


def parse_rate(value: str | float) -> float:
    """Bandwidth to bytes per second: ``256kbit``, ``2mbit``, ``32kB/s``; a bare number is B/s."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        rate = float(value)
    else:
        number, unit = _split_number(str(value), "rate")
        key = unit.lower()
        if key in ("bps", "kbps", "mbps", "gbps"):
            raise ValueError(
                f"ambiguous rate unit {unit!r} in {value!r}: say kbit (kilobits/s) or kB/s "
                "(kilobytes/s)"
            )
        if key not in _RATE_UNITS:
            raise ValueError(f"bad rate {value!r}: use bit, kbit, mbit, gbit, B/s, kB/s or MB/s")
        rate = number * _RATE_UNITS[key]
    if not math.isfinite(rate) or rate < 0:
        raise ValueError(f"bad rate {value!r}: must be >= 0")
    return rate


def parse_size(value: str | float) -> int:
    """Bytes: ``1500``, ``16kB``, ``16KiB``."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        number, unit = float(value), ""
    else:
        number, unit = _split_number(str(value), "size")
    if unit.lower() not in _SIZE_UNITS:
        raise ValueError(f"bad size {value!r}: use B, kB, KiB, MB or MiB")
    size = number * _SIZE_UNITS[unit.lower()]
    if size != int(size) or size < 0:
        raise ValueError(f"bad size {value!r}: must be a whole number of bytes >= 0")
    return int(size)


def parse_count(value: str | float) -> int:
    """A whole number >= 1."""
    text = str(value).strip()
    if isinstance(value, bool) or not re.fullmatch(r"[0-9]+(\.0*)?", text) or float(text) < 1:
        raise ValueError(f"bad count {value!r}: must be a whole number >= 1")
    return int(float(text))


def parse_burst(value: str | float) -> float:
    """Mean burst length in packets, >= 1."""
    try:
        burst = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"bad burst {value!r}: a mean burst length in packets (>= 1)") from None
    if isinstance(value, bool) or not math.isfinite(burst) or burst < 1:
        raise ValueError(f"bad burst {value!r}: a mean burst length in packets (>= 1)")
    return burst


def parse_bool(value: str | bool | float) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"bad boolean {value!r}: use on/off, true/false, yes/no or 1/0")


def parse_distribution(value: str) -> str:
    text = str(value).strip().lower()
    if text not in ("uniform", "normal"):
        raise ValueError(f"bad distribution {value!r}: use uniform or normal")
    return text


def parse_gilbert(value: str | Mapping[str, float] | None) -> GilbertElliott | None:
    """``P:R[:LOSS_BAD[:LOSS_GOOD]]`` (each a fraction or a percentage), a mapping, or ``none``."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none", "off")):
        return None
    if isinstance(value, Mapping):
        try:
            return GilbertElliott(**{k: parse_probability(v) for k, v in value.items()})
        except TypeError as err:
            raise ValueError(
                f"bad gilbert model {dict(value)!r}: keys are p, r, loss_bad, loss_good"
            ) from err
    parts = str(value).split(":")
    if not 2 <= len(parts) <= 4:
        raise ValueError(f"bad gilbert model {value!r}: use P:R[:LOSS_BAD[:LOSS_GOOD]]")
    return GilbertElliott(*(parse_probability(p) for p in parts))


def parse_outage(value: str) -> tuple[float, float]:
    """``START+DURATION``, both durations: ``30s+120s`` is an outage from 30 s to 150 s."""
    start, sep, duration = str(value).partition("+")
    if not sep:
        raise ValueError(f"bad outage {value!r}: use START+DURATION, e.g. 30s+120s")
    return parse_duration(start), parse_duration(duration)


def parse_address(value: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``[V6HOST]:PORT``."""
    text = str(value).strip()
    match = re.fullmatch(r"\[([^\]]+)\]:([0-9]+)", text) or re.fullmatch(r"([^:]+):([0-9]+)", text)
    if not match or int(match.group(2)) > 65535:
        raise ValueError(f"bad address {value!r}: use HOST:PORT or [V6HOST]:PORT")
    return match.group(1), int(match.group(2))


# Parameter names as people and the control channel say them -> (Impairment field, parser).
PARAMS: dict[str, tuple[str, Callable[[Any], Any]]] = {
    "delay": ("delay", parse_duration),
    "jitter": ("jitter", parse_duration),
    "distribution": ("distribution", parse_distribution),
    "preserve_order": ("preserve_order", parse_bool),
    "loss": ("loss", parse_probability),
    "burst": ("burst", parse_burst),
    "gemodel": ("gilbert", parse_gilbert),
    "dup": ("dup", parse_probability),
    "reorder": ("reorder", parse_probability),
    "reorder_gap": ("reorder_gap", parse_duration),
    "rate": ("rate", parse_rate),
    "queue": ("queue_limit", parse_count),
    "bucket": ("bucket", parse_size),
}
_ALIASES = {"gilbert": "gemodel", "queue_limit": "queue", "dist": "distribution"}


def parse_params(params: Mapping[str, Any]) -> dict[str, Any]:
    """Human or JSON parameters (``{"loss": "10%", "delay": 0.15}``) -> Impairment field values."""
    fields: dict[str, Any] = {}
    for raw_key, raw_value in params.items():
        key = str(raw_key).strip().lower().replace("-", "_")
        key = _ALIASES.get(key, key)
        if key not in PARAMS:
            raise ValueError(f"unknown parameter {raw_key!r}; known: {', '.join(PARAMS)}")
        name, parser = PARAMS[key]
        try:
            fields[name] = parser(raw_value)
        except ValueError as err:
            raise ValueError(f"{key}: {err}") from None
    return fields


def parse_assignments(items: Iterable[str]) -> dict[str, str]:
    """``["loss=30%", "delay=600ms"]`` (or one string with commas/spaces) -> a mapping."""
    out: dict[str, str] = {}
    for item in items:
        for token in re.split(r"[,\s]+", item.strip()):
            if not token:
                continue
            key, sep, value = token.partition("=")
            if not sep or not key:
                raise ValueError(f"bad setting {token!r}: use KEY=VALUE, e.g. loss=10%")
            out[key] = value
    return out


def _fmt_duration(seconds: float) -> str:
    if seconds and seconds < 1:
        return f"{seconds * 1000:.6g}ms"
    return f"{seconds:.6g}s"


# --------------------------------------------------------------------------------------------------
# Counters


@dataclass
class Counters:
    """What one direction saw. ``reordered`` counts packets delivered after a later-sent one."""

    packets_in: int = 0
    bytes_in: int = 0
    packets_out: int = 0
    bytes_out: int = 0
    dropped: dict[str, int] = field(default_factory=lambda: dict.fromkeys(DROP_CAUSES, 0))
    duplicated: int = 0
    held: int = 0  # packets held back on purpose (the reorder knob)
    reordered: int = 0

    def as_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["dropped_total"] = sum(self.dropped.values())
        return data


class _Shaper:
    """A FIFO token bucket: ``rate`` bytes/s, depth ``bucket`` bytes, at most ``limit`` waiting."""

    def __init__(self) -> None:
        self.tokens = 0.0
        self.t_last = -math.inf  # when the last admitted packet leaves
        self.departures: deque[float] = deque()

    def admit(self, now: float, size: int, imp: Impairment) -> float | None:
        """When a packet of ``size`` bytes arriving ``now`` leaves the shaper; None: tail drop."""
        waiting = self.departures
        while waiting and waiting[0] <= now:
            waiting.popleft()
        if len(waiting) >= imp.queue_limit:
            return None
        t = max(now, self.t_last)
        elapsed = t - self.t_last
        tokens = (
            min(float(imp.bucket), self.tokens + elapsed * imp.rate) if elapsed else self.tokens
        )
        if tokens < size:
            t += (size - tokens) / imp.rate
            tokens = float(size)
        self.tokens = tokens - size
        self.t_last = t
        waiting.append(t)
        return t


class _Direction:
    """One direction's impairment, random streams, link state and counters."""

    def __init__(self, name: str, impairment: Impairment, seed: int) -> None:
        self.name = name
        self.imp = impairment
        self.model = impairment.loss_model()
        self.counters = Counters()
        self.shaper = _Shaper()
        self.bad = False  # Gilbert-Elliott state
        self.last_t = -math.inf  # delivery time of the last in-order packet (preserve_order)
        self.next_seq = 0
        self.max_delivered = -1
        # One stream per mechanism, so changing one knob does not shift the others' draws.
        self.rng_loss = random.Random(f"{seed}:{name}:loss")
        self.rng_delay = random.Random(f"{seed}:{name}:delay")
        self.rng_dup = random.Random(f"{seed}:{name}:dup")
        self.rng_reorder = random.Random(f"{seed}:{name}:reorder")

    def set(self, impairment: Impairment) -> None:
        self.imp = impairment
        self.model = impairment.loss_model()

    def drop(self, cause: str) -> None:
        self.counters.dropped[cause] += 1

    def lose(self) -> bool:
        model = self.model
        rng = self.rng_loss
        if isinstance(model, GilbertElliott):
            if self.bad:
                if rng.random() < model.r:
                    self.bad = False
            elif rng.random() < model.p:
                self.bad = True
            return rng.random() < (model.loss_bad if self.bad else model.loss_good)
        return model > 0 and rng.random() < model

    def latency(self) -> float:
        imp = self.imp
        if not imp.jitter:
            return imp.delay
        if imp.distribution == "normal":
            return max(0.0, self.rng_delay.gauss(imp.delay, imp.jitter))
        return max(0.0, imp.delay + self.rng_delay.uniform(-imp.jitter, imp.jitter))


class _Flow:
    """One client and its upstream socket to the target."""

    __slots__ = ("client", "closed", "last_seen", "sock")

    def __init__(self, client: tuple[Any, ...], sock: socket.socket, now: float) -> None:
        self.client = client
        self.sock = sock
        self.last_seen = now
        self.closed = False


# --------------------------------------------------------------------------------------------------
# The emulator


class LinkEmulator:
    """The proxy. Build it, ``await start()``, point the client at :attr:`port`, ``await stop()``.

    ``impairment`` applies to both directions; ``up`` and ``down`` override one direction.
    ``outages`` are ``(start, duration)`` pairs in seconds after :meth:`start`; during an outage
    nothing passes in either direction. ``seed`` makes every random choice repeatable (None: a
    random seed, logged and shown in :meth:`stats`). ``control`` opens the JSON control channel on
    a Unix socket path or a TCP port on 127.0.0.1 (0: any free port, see :attr:`control_address`).
    ``flow_timeout`` forgets a client idle that long (None: never), as a NAT would.
    """

    def __init__(
        self,
        listen: tuple[str, int],
        target: tuple[str, int],
        impairment: Impairment | None = None,
        *,
        up: Impairment | None = None,
        down: Impairment | None = None,
        outages: Iterable[tuple[float, float]] = (),
        seed: int | None = None,
        control: str | int | None = None,
        flow_timeout: float | None = None,
    ) -> None:
        base = impairment or Impairment()
        self.seed = seed if seed is not None else random.SystemRandom().randrange(2**32)
        self._dirs = {
            "up": _Direction("up", up or base, self.seed),
            "down": _Direction("down", down or base, self.seed),
        }
        self._listen = listen
        self._target = target
        self._outage_plan = [(float(s), float(d)) for s, d in outages]
        for start, duration in self._outage_plan:
            if start < 0 or duration < 0:
                raise ValueError(f"outage ({start}, {duration}): start and duration must be >= 0")
        self._control_spec = control
        self._flow_timeout = flow_timeout
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sock: socket.socket | None = None
        self._target_info: tuple[int, tuple[Any, ...]] | None = None
        self._flows: dict[tuple[Any, ...], _Flow] = {}
        self._heap: list[tuple[float, int, _Direction, _Flow, bytes, int]] = []
        self._tie = 0
        self._timer: asyncio.TimerHandle | None = None
        self._resolution = time.get_clock_info("monotonic").resolution
        self._manual_outage = False
        self._windows: list[tuple[float, float]] = []  # absolute loop times [start, end)
        self._outage_state = False
        self._handles: list[asyncio.TimerHandle] = []
        self._control_server: asyncio.Server | None = None
        self._control_writers: set[asyncio.StreamWriter] = set()
        self._control_address: str | tuple[str, int] | None = None
        self._started_at = 0.0
        self.icmp_errors = 0
        self.flows_opened = 0

    # -- life cycle -------------------------------------------------------------------------------

    async def start(self) -> None:
        """Bind the listening socket, resolve the target, open the control channel."""
        if self._loop is not None:
            raise RuntimeError("LinkEmulator already started")
        loop = asyncio.get_running_loop()
        family, sockaddr = await _resolve(loop, self._listen)
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, LISTEN_RCVBUF)
            sock.setblocking(False)
            sock.bind(sockaddr)
            self._target_info = await _resolve(loop, self._target)
        except BaseException:
            sock.close()
            raise
        self._loop = loop
        self._sock = sock
        loop.add_reader(sock.fileno(), self._on_listen_readable)
        self._started_at = loop.time()
        for start, duration in self._outage_plan:
            self._add_window(self._started_at + start, duration)
        if self._flow_timeout:
            self._schedule_sweep()
        if self._control_spec is not None:
            try:
                await self._start_control(self._control_spec)
            except BaseException:
                await self.stop()
                raise
        log.info(
            "linkem started listen=%s target=%s seed=%s up=[%s] down=[%s]",
            _fmt_addr(self.address),
            _fmt_addr(self._target),
            self.seed,
            self._dirs["up"].imp.describe(),
            self._dirs["down"].imp.describe(),
        )

    async def stop(self) -> None:
        """Close every socket and drop whatever is still in flight."""
        loop = self._loop
        if loop is None:
            return
        if self._control_server is not None:
            self._control_server.close()
            for writer in list(self._control_writers):
                writer.close()
            await self._control_server.wait_closed()
            self._control_server = None
            if isinstance(self._control_address, str):
                with contextlib.suppress(OSError):
                    os.unlink(self._control_address)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for handle in self._handles:
            handle.cancel()
        self._handles.clear()
        self._heap.clear()
        for flow in list(self._flows.values()):
            self._close_flow(flow)
        if self._sock is not None:
            loop.remove_reader(self._sock.fileno())
            self._sock.close()
            self._sock = None
        self._loop = None
        log.info("linkem stopped")

    async def __aenter__(self) -> LinkEmulator:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -- addresses --------------------------------------------------------------------------------

    @property
    def address(self) -> tuple[str, int]:
        """The listening (host, port) a client sends to."""
        if self._sock is None:
            raise RuntimeError("LinkEmulator not started")
        host, port = self._sock.getsockname()[:2]
        return host, port

    @property
    def port(self) -> int:
        return self.address[1]

    @property
    def control_address(self) -> str | tuple[str, int] | None:
        """The control channel: a Unix socket path, ("127.0.0.1", port), or None."""
        return self._control_address

    # -- control ----------------------------------------------------------------------------------

    @property
    def impairment(self) -> dict[str, Impairment]:
        """The impairment in force per direction: {"up": ..., "down": ...}."""
        return {name: d.imp for name, d in self._dirs.items()}

    def set(
        self,
        impairment: Impairment | None = None,
        *,
        up: Impairment | None = None,
        down: Impairment | None = None,
    ) -> None:
        """Replace the impairment, live: ``impairment`` for both directions, or one of them.

        Packets already in flight keep the fate they were given; the link state (Gilbert state,
        shaper backlog) carries over.
        """
        if impairment is not None:
            up = impairment if up is None else up
            down = impairment if down is None else down
        for name, imp in (("up", up), ("down", down)):
            if imp is not None:
                self._dirs[name].set(imp)
                log.info("linkem set direction=%s %s", name, imp.describe())

    def update(self, direction: str = "both", **changes: Any) -> None:
        """Change some fields of the current impairment (Impairment field names), live."""
        for name in _directions(direction):
            self._dirs[name].set(dataclasses.replace(self._dirs[name].imp, **changes))
            log.info("linkem set direction=%s %s", name, self._dirs[name].imp.describe())

    def outage(self, on: bool = True) -> None:
        """Start or end a manual outage (both directions). Scheduled outages apply regardless."""
        self._manual_outage = bool(on)
        self._note_outage()

    def schedule_outage(self, after: float, duration: float) -> None:
        """An outage ``after`` seconds from now, lasting ``duration`` seconds."""
        if self._loop is None:
            raise RuntimeError("LinkEmulator not started")
        if after < 0 or duration < 0:
            raise ValueError("outage start and duration must be >= 0")
        self._add_window(self._loop.time() + after, duration)

    @property
    def in_outage(self) -> bool:
        return self._outage_active(self._loop.time() if self._loop else 0.0)

    def counters(self, direction: str) -> Counters:
        """The live counters of ``up`` or ``down``."""
        return self._dirs[direction].counters

    def stats(self) -> dict[str, Any]:
        """Counters per direction and the state of the link, as plain data (JSON-ready)."""
        now = self._loop.time() if self._loop else 0.0
        return {
            "up": self._dirs["up"].counters.as_dict(),
            "down": self._dirs["down"].counters.as_dict(),
            "flows": len(self._flows),
            "flows_opened": self.flows_opened,
            "in_flight": len(self._heap),
            "outage": self._outage_active(now) if self._loop else False,
            "uptime": now - self._started_at if self._loop else 0.0,
            "icmp_errors": self.icmp_errors,
            "seed": self.seed,
        }

    def handle_command(self, request: Mapping[str, Any]) -> dict[str, Any]:
        """One control-channel request -> its response. Bad requests raise ValueError.

        Requests: ``{"cmd": "set", "dir": "both|up|down", "params": {"loss": "10%", ...}}``
        (changes the given fields), ``{"cmd": "clear", "dir": ...}``, ``{"cmd": "outage", "on":
        true}`` or ``{"cmd": "outage", "at": 5, "for": 30}`` (seconds from now), ``{"cmd":
        "stats"}``, ``{"cmd": "show"}``.
        """
        if not isinstance(request, Mapping):
            raise ValueError("a request is a JSON object with a 'cmd' key")
        cmd = request.get("cmd")
        if cmd == "set":
            params = request.get("params", {})
            if not isinstance(params, Mapping):
                raise ValueError("'params' must be an object of parameter -> value")
            changes = parse_params(params)
            dirs = _directions(request.get("dir", "both"))
            new = {name: dataclasses.replace(self._dirs[name].imp, **changes) for name in dirs}
            self.set(**new)
            return {"ok": True, "impairment": self._impairment_dict()}
        if cmd == "clear":
            self.set(**{name: Impairment() for name in _directions(request.get("dir", "both"))})
            return {"ok": True, "impairment": self._impairment_dict()}
        if cmd == "outage":
            if "on" in request:
                self.outage(parse_bool(request["on"]))
            elif "at" in request or "for" in request:
                self.schedule_outage(
                    parse_duration(request.get("at", 0)), parse_duration(request.get("for", 0))
                )
            else:
                raise ValueError("outage needs 'on' (true/false) or 'at' and 'for' (seconds)")
            return {"ok": True, "outage": self.in_outage}
        if cmd == "stats":
            return {"ok": True, "stats": self.stats()}
        if cmd == "show":
            return {"ok": True, "impairment": self._impairment_dict(), "outage": self.in_outage}
        raise ValueError(f"unknown command {cmd!r}; known: set, clear, outage, stats, show")

    def _impairment_dict(self) -> dict[str, Any]:
        return {name: d.imp.to_dict() for name, d in self._dirs.items()}

    async def _start_control(self, spec: str | int) -> None:
        kind, where = _control_target(spec)
        if kind == "unix":
            server = await asyncio.start_unix_server(self._serve_control, path=where)
            self._control_address = str(where)
        else:
            server = await asyncio.start_server(self._serve_control, "127.0.0.1", where)
            self._control_address = server.sockets[0].getsockname()[:2]
        self._control_server = server

    async def _serve_control(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self._control_writers.add(writer)
        try:
            while line := await reader.readline():
                try:
                    response = self.handle_command(json.loads(line))
                except (ValueError, TypeError) as err:
                    response = {"ok": False, "error": str(err)}
                    log.warning("linkem control bad request error=%s", err)
                writer.write(json.dumps(response).encode() + b"\n")
                await writer.drain()
        except (ConnectionError, ValueError) as err:  # ValueError: a line over the stream limit
            log.warning("linkem control connection error=%s", err)
        finally:
            self._control_writers.discard(writer)
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    # -- outages ----------------------------------------------------------------------------------

    def _add_window(self, start: float, duration: float) -> None:
        assert self._loop is not None
        end = start + duration
        self._windows.append((start, end))
        self._handles.append(self._loop.call_at(start, self._note_outage))
        self._handles.append(self._loop.call_at(end, self._note_outage))

    def _outage_active(self, now: float) -> bool:
        if self._manual_outage:
            return True
        res = self._resolution
        return any(start <= now + res and now + res < end for start, end in self._windows)

    def _note_outage(self) -> None:
        if self._loop is None:
            return
        now = self._loop.time()
        self._windows = [(s, e) for s, e in self._windows if e > now + self._resolution]
        self._handles = [h for h in self._handles if not h.cancelled() and h.when() > now]
        state = self._outage_active(now)
        if state != self._outage_state:
            self._outage_state = state
            log.info("linkem outage=%s", "on" if state else "off")

    # -- the data path ----------------------------------------------------------------------------

    def _on_listen_readable(self) -> None:
        sock = self._sock
        if sock is None:
            return
        up = self._dirs["up"]
        for _ in range(READ_BATCH):
            try:
                data, client = sock.recvfrom(MAX_DATAGRAM)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as err:
                log.warning("linkem listen recv error=%s", err)
                return
            flow = self._flows.get(client)
            if flow is None:
                flow = self._open_flow(client)
                if flow is None:
                    up.counters.packets_in += 1
                    up.counters.bytes_in += len(data)
                    up.drop("error")
                    continue
            self._ingress(up, flow, data)

    def _on_upstream_readable(self, flow: _Flow) -> None:
        down = self._dirs["down"]
        for _ in range(READ_BATCH):
            try:
                data = flow.sock.recv(MAX_DATAGRAM)
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionRefusedError:
                # ICMP port unreachable for an earlier datagram: the target is not listening.
                self.icmp_errors += 1
                continue
            except OSError as err:
                log.warning("linkem upstream recv client=%s error=%s", _fmt_addr(flow.client), err)
                return
            self._ingress(down, flow, data)

    def _open_flow(self, client: tuple[Any, ...]) -> _Flow | None:
        assert self._loop is not None and self._target_info is not None
        family, sockaddr = self._target_info
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            sock.setblocking(False)
            sock.connect(sockaddr)
        except OSError as err:
            sock.close()
            log.warning("linkem cannot reach target=%s error=%s", _fmt_addr(self._target), err)
            return None
        flow = _Flow(client, sock, self._loop.time())
        self._flows[client] = flow
        self.flows_opened += 1
        self._loop.add_reader(sock.fileno(), self._on_upstream_readable, flow)
        log.debug(
            "linkem flow open client=%s via=%s", _fmt_addr(client), _fmt_addr(sock.getsockname())
        )
        return flow

    def _close_flow(self, flow: _Flow) -> None:
        if flow.closed:
            return
        flow.closed = True
        self._flows.pop(flow.client, None)
        if self._loop is not None:
            self._loop.remove_reader(flow.sock.fileno())
        flow.sock.close()
        log.debug("linkem flow closed client=%s", _fmt_addr(flow.client))

    def _schedule_sweep(self) -> None:
        assert self._loop is not None and self._flow_timeout
        self._handles.append(
            self._loop.call_later(max(0.5, self._flow_timeout / 4), self._sweep_flows)
        )

    def _sweep_flows(self) -> None:
        if self._loop is None or not self._flow_timeout:
            return
        limit = self._loop.time() - self._flow_timeout
        for flow in [f for f in self._flows.values() if f.last_seen < limit]:
            self._close_flow(flow)
        self._handles = [h for h in self._handles if not h.cancelled()]
        self._schedule_sweep()

    def _ingress(self, d: _Direction, flow: _Flow, data: bytes) -> None:
        assert self._loop is not None
        now = self._loop.time()
        flow.last_seen = now
        c = d.counters
        c.packets_in += 1
        c.bytes_in += len(data)
        if self._outage_active(now):
            d.drop("outage")
            return
        imp = d.imp
        copies = 1
        if imp.dup and d.rng_dup.random() < imp.dup:
            copies = 2
            c.duplicated += 1
        seq = d.next_seq
        d.next_seq += 1
        for _ in range(copies):
            t = now
            if imp.rate:
                departs = d.shaper.admit(now, len(data), imp)
                if departs is None:
                    d.drop("queue")
                    continue
                t = departs
            if d.lose():
                d.drop("loss")
                continue
            t += d.latency()
            if imp.preserve_order:
                t = max(t, d.last_t)
                d.last_t = t
            if imp.reorder and d.rng_reorder.random() < imp.reorder:
                t += imp.reorder_gap
                c.held += 1
            if t <= now and not self._heap:
                self._deliver(d, flow, data, seq)
            else:
                self._schedule(t, d, flow, data, seq)

    def _schedule(self, t: float, d: _Direction, flow: _Flow, data: bytes, seq: int) -> None:
        assert self._loop is not None
        self._tie += 1
        heapq.heappush(self._heap, (t, self._tie, d, flow, data, seq))
        timer = self._timer
        if timer is None or t < timer.when():
            if timer is not None:
                timer.cancel()
            self._timer = self._loop.call_at(t, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        if self._loop is None:
            return
        heap = self._heap
        due = self._loop.time() + self._resolution
        while heap and heap[0][0] <= due:
            _, _, d, flow, data, seq = heapq.heappop(heap)
            self._deliver(d, flow, data, seq)
        if heap:
            self._timer = self._loop.call_at(heap[0][0], self._on_timer)

    def _deliver(self, d: _Direction, flow: _Flow, data: bytes, seq: int) -> None:
        assert self._loop is not None and self._sock is not None
        if self._outage_active(self._loop.time()):
            d.drop("outage")
            return
        if flow.closed:
            d.drop("error")
            return
        try:
            if d.name == "up":
                flow.sock.send(data)
            else:
                self._sock.sendto(data, flow.client)
        except ConnectionRefusedError:
            self.icmp_errors += 1
            d.drop("error")
            return
        except OSError as err:  # a full socket buffer on the way out is a drop, as on a real link
            log.debug("linkem send direction=%s error=%s", d.name, err)
            d.drop("error")
            return
        c = d.counters
        c.packets_out += 1
        c.bytes_out += len(data)
        if seq < d.max_delivered:
            c.reordered += 1
        else:
            d.max_delivered = seq


async def _resolve(
    loop: asyncio.AbstractEventLoop, address: tuple[str, int]
) -> tuple[int, tuple[Any, ...]]:
    """(family, sockaddr) of a UDP address; numeric hosts without a resolver thread."""
    host, port = address
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM, flags=socket.AI_NUMERICHOST)
    except socket.gaierror:
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
    return infos[0][0], infos[0][4]


def _directions(direction: object) -> tuple[str, ...]:
    if direction in (None, "both"):
        return DIRECTIONS
    if direction in DIRECTIONS:
        return (str(direction),)
    raise ValueError(f"bad direction {direction!r}: use up, down or both")


def _fmt_addr(addr: tuple[Any, ...]) -> str:
    host, port = addr[0], addr[1]
    return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"


# --------------------------------------------------------------------------------------------------
# Control channel clients


def _control_target(spec: str | int | tuple[str, int]) -> tuple[str, Any]:
    """``5700`` or ``"5700"``: TCP port on 127.0.0.1; a (host, port) tuple: TCP; else Unix path."""
    if isinstance(spec, tuple):
        return "tcp", spec[1]
    if isinstance(spec, int) and not isinstance(spec, bool):
        if not 0 <= spec <= 65535:
            raise ValueError(f"bad control port {spec}")
        return "tcp", spec
    text = str(spec)
    if re.fullmatch(r"[0-9]+", text):
        return _control_target(int(text))
    if not text:
        raise ValueError("empty control path")
    return "unix", text


async def control(
    address: str | int | tuple[str, int],
    request: Mapping[str, Any],
) -> dict[str, Any]:
    """Send one request to a proxy's control channel and return its response (from a coroutine).

    Gives up after ``CONTROL_TIMEOUT`` seconds (TimeoutError).
    """
    kind, where = _control_target(address)
    async with asyncio.timeout(CONTROL_TIMEOUT):
        if kind == "unix":
            reader, writer = await asyncio.open_unix_connection(where)
        else:
            reader, writer = await asyncio.open_connection("127.0.0.1", where)
        try:
            writer.write(json.dumps(request).encode() + b"\n")
            await writer.drain()
            line = await reader.readline()
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
    if not line:
        raise ConnectionError("control channel closed without an answer")
    return json.loads(line)


def control_sync(
    address: str | int | tuple[str, int],
    request: Mapping[str, Any],
    timeout: float = CONTROL_TIMEOUT,
) -> dict[str, Any]:
    """Send one request to a proxy's control channel, blocking (for code outside an event loop)."""
    kind, where = _control_target(address)
    if kind == "unix":
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        target: Any = where
    else:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        target = ("127.0.0.1", where)
    with sock:
        sock.settimeout(timeout)
        sock.connect(target)
        sock.sendall(json.dumps(request).encode() + b"\n")
        chunks = []
        while not chunks or not chunks[-1].endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
    line = b"".join(chunks)
    if not line:
        raise ConnectionError("control channel closed without an answer")
    return json.loads(line)


# --------------------------------------------------------------------------------------------------
# Command line


class UsageError(Exception):
    """A bad command line: one line on stderr, exit 64."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(message)


def _arg(parser: Callable[[Any], Any]) -> Callable[[str], Any]:
    def convert(text: str) -> Any:
        try:
            return parser(text)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None

    convert.__name__ = parser.__name__.removeprefix("parse_")
    return convert


_RUN_OPTIONS = [  # (PARAMS key, help)
    ("delay", "one-way delay, e.g. 150ms"),
    ("jitter", "jitter around the delay, e.g. 20ms (may reorder unless --preserve-order)"),
    ("distribution", "jitter distribution: uniform (+-jitter) or normal (jitter = sigma)"),
    ("loss", "loss probability, e.g. 10%%"),
    ("burst", "mean loss-burst length in packets: > 1 makes --loss bursty (Gilbert model)"),
    ("gemodel", "full Gilbert-Elliott model P:R[:LOSS_BAD[:LOSS_GOOD]] (replaces --loss/--burst)"),
    ("dup", "duplication probability, e.g. 1%%"),
    ("reorder", "probability that a packet is held back by --reorder-gap, e.g. 1%%"),
    (
        "reorder_gap",
        f"extra delay of a held-back packet (default {_fmt_duration(DEFAULT_REORDER_GAP)})",
    ),
    ("rate", "bandwidth cap, e.g. 256kbit, 2mbit, 32kB/s"),
    (
        "queue",
        f"packets that may wait for the rate cap, more are dropped (default {DEFAULT_QUEUE_LIMIT})",
    ),
    ("bucket", "token bucket depth in bytes for the rate cap (default 0: pure serialization)"),
]


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="linkem.py",
        description="A UDP link impairment proxy (delay, jitter, loss, duplication, reordering, "
        "rate cap, outages) between a CoAP client and its server.",
    )
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    run = sub.add_parser("run", help="run the proxy")
    run.add_argument(
        "--listen", required=True, type=_arg(parse_address), help="HOST:PORT to listen on"
    )
    run.add_argument(
        "--target", required=True, type=_arg(parse_address), help="HOST:PORT of the server"
    )
    for key, help_text in _RUN_OPTIONS:
        run.add_argument(
            f"--{key.replace('_', '-')}", dest=key, type=_arg(PARAMS[key][1]), help=help_text
        )
    run.add_argument("--preserve-order", action="store_true", help="jitter never reorders packets")
    run.add_argument(
        "--up",
        action="append",
        default=[],
        metavar="KEY=VALUE,...",
        help="settings for client->target only, on top of the options above (e.g. loss=20%%)",
    )
    run.add_argument(
        "--down", action="append", default=[], metavar="KEY=VALUE,...", help="same, target->client"
    )
    run.add_argument(
        "--outage",
        action="append",
        default=[],
        type=_arg(parse_outage),
        metavar="START+DURATION",
        help="drop everything from START for DURATION after start-up, e.g. 30s+120s (repeatable)",
    )
    run.add_argument("--seed", type=int, help="random seed (default: random, printed)")
    run.add_argument(
        "--control", help="control channel: a Unix socket PATH or a TCP PORT on 127.0.0.1"
    )
    run.add_argument(
        "--stats",
        type=_arg(parse_duration),
        default=5.0,
        metavar="INTERVAL",
        help="print counters every INTERVAL (default 5s; 0: only at exit)",
    )
    run.add_argument(
        "--flow-timeout",
        type=_arg(parse_duration),
        metavar="DURATION",
        help="forget a client idle this long (default: never)",
    )
    run.add_argument("-v", "--verbose", action="store_true", help="log every flow")

    ctl = sub.add_parser("ctl", help="control a running proxy")
    ctl.add_argument("--control", required=True, help="the proxy's control PATH or PORT")
    ctl.add_argument("--dir", default="both", choices=["both", "up", "down"], help="for set/clear")
    ctl.add_argument(
        "action",
        choices=["set", "clear", "outage", "stats", "show"],
        help="set KEY=VALUE...; clear; outage on|off|START+DURATION; stats; show",
    )
    ctl.add_argument("args", nargs="*", help="arguments of the action")
    return parser


def _impairments_from_args(args: argparse.Namespace) -> dict[str, Impairment]:
    base: dict[str, Any] = {}
    for key, _ in _RUN_OPTIONS:
        value = getattr(args, key)
        if value is not None:
            base[PARAMS[key][0]] = value
    if args.preserve_order:
        base["preserve_order"] = True
    out = {}
    for name in DIRECTIONS:
        fields = dict(base)
        fields.update(parse_params(parse_assignments(getattr(args, name))))
        try:
            out[name] = Impairment(**fields)
        except ValueError as err:
            raise UsageError(f"{name}: {err}" if getattr(args, name) else str(err)) from None
    return out


def _ctl_request(args: argparse.Namespace) -> dict[str, Any]:
    if args.action == "set":
        if not args.args:
            raise UsageError("set needs KEY=VALUE settings, e.g. set loss=10% delay=150ms")
        params = parse_assignments(args.args)
        parse_params(params)  # refuse bad values here, before sending
        return {"cmd": "set", "dir": args.dir, "params": params}
    if args.action == "outage":
        if len(args.args) != 1:
            raise UsageError("outage needs one argument: on, off or START+DURATION")
        arg = args.args[0]
        if arg.lower() in ("on", "off"):
            return {"cmd": "outage", "on": arg.lower() == "on"}
        start, duration = parse_outage(arg)
        return {"cmd": "outage", "at": start, "for": duration}
    if args.args:
        raise UsageError(f"{args.action} takes no arguments")
    if args.action == "clear":
        return {"cmd": "clear", "dir": args.dir}
    return {"cmd": args.action}


def _stats_line(proxy: LinkEmulator) -> str:
    stats = proxy.stats()
    parts = [f"t={stats['uptime']:.1f}s flows={stats['flows']} outage={int(stats['outage'])}"]
    for name in DIRECTIONS:
        c = stats[name]
        drops = " ".join(f"{k}={v}" for k, v in c["dropped"].items() if v)
        parts.append(
            f"{name}: in={c['packets_in']} out={c['packets_out']} bytes_out={c['bytes_out']} "
            f"dup={c['duplicated']} reordered={c['reordered']} dropped={c['dropped_total']}"
            + (f" ({drops})" if drops else "")
        )
    return " | ".join(parts)


async def _run(args: argparse.Namespace, impairments: dict[str, Impairment]) -> int:
    proxy = LinkEmulator(
        listen=args.listen,
        target=args.target,
        up=impairments["up"],
        down=impairments["down"],
        outages=args.outage,
        seed=args.seed,
        control=args.control,
        flow_timeout=args.flow_timeout,
    )
    try:
        await proxy.start()
    except OSError as err:
        print(f"linkem: cannot start: {err}", file=sys.stderr)
        return EX_OSERR
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    where = proxy.control_address
    control_text = ""
    if where is not None:
        control_text = f" control={where if isinstance(where, str) else where[1]}"
    print(
        f"linkem: listening on {_fmt_addr(proxy.address)} -> {_fmt_addr(args.target)} "
        f"seed={proxy.seed}{control_text}",
        flush=True,
    )
    for name in DIRECTIONS:
        print(f"linkem: {name}: {impairments[name].describe()}", flush=True)
    try:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(args.stats or None):
                    await stop.wait()
            if args.stats and not stop.is_set():
                print(_stats_line(proxy), flush=True)
    finally:
        print(_stats_line(proxy), flush=True)
        await proxy.stop()
    return 0


def main(argv: list[str] | None = None) -> int:
    """The command line. Bad arguments: one line on stderr and exit 64."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if args.command == "run":
            impairments = _impairments_from_args(args)
            if args.control is not None:
                _control_target(args.control)
        else:
            request = _ctl_request(args)
            _control_target(args.control)
    except (UsageError, ValueError) as err:
        print(f"linkem: error: {err}", file=sys.stderr)
        return EX_USAGE
    if args.command == "run":
        logging.basicConfig(
            level=logging.DEBUG if args.verbose else logging.INFO,
            format="%(asctime)s %(levelname)s %(message)s",
        )
        return asyncio.run(_run(args, impairments))
    try:
        response = control_sync(args.control, request)
    except (OSError, ValueError) as err:
        print(f"linkem: error: control channel {args.control}: {err}", file=sys.stderr)
        return EX_UNAVAILABLE
    print(json.dumps(response, indent=2, sort_keys=True))
    if not response.get("ok"):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
