"""One worker process of the fleet: its slice of the devices in one event loop, on a few UDP
sockets (:class:`~fleetlib.coap.CoapEndpoint`, ``devices_per_socket`` devices each).

Each device runs the same loop: it sleeps until its next tick (a phase in the interval spread
evenly over the whole fleet), takes a batch of readings, and posts what it has not had
acknowledged, one request at a time; ticks missed while a request was out (retransmissions, a
slow endpoint) are made up with their own readings before the next post. After a 5.03 it posts
nothing until Max-Age has passed (readings go on). After ``duration``
seconds devices take no more readings; requests in flight may finish for ``drain`` seconds, then
are abandoned.

The loop is not a coroutine per device but callbacks (:class:`Worker` ``_go``, ``_wake``,
``_answered``) on a device's small state (:class:`_Run`): its tick is an entry in the worker's
one :class:`~fleetlib.coap.Timers` heap (which the sockets' retransmission deadlines share), its
request an exchange that calls back when it ends. No task, future or asyncio timer per tick or
request, and no extra pass of the event loop to resume a coroutine: a tick's readings, encoding,
protection and datagram happen in the timer's callback, the answer's handling and the next
tick's timer in the datagram's.

Every worker starts at the same moment (a barrier with the parent), so the fleet's phases hold
across processes. The steady window (from ``warmup`` to ``duration``) is when throughput,
latency and CPU per request are measured: the first interval is all Echo round trips (every
device has a new OSCORE ID Context).

:func:`worker_main` is the process entry; the :class:`WorkerResult` goes back through a queue.
It first tunes glibc's malloc (:func:`tune_malloc`): the encoder's zlib state (a few hundred KB)
comes and goes four times per request, and with the default thresholds glibc hands the top of
the heap back and maps it again each time, every page a fault: at 200 requests a second about
140 faults and 0.2 ms of CPU per request (at higher rates the heap's top may stay in use).
"""

from __future__ import annotations

import asyncio
import ctypes
import math
import random
import time
import traceback
from array import array
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from aiocoap import Message
from aiocoap.numbers.codes import Code

from agent.wire.batch import CodecError, IngestAck
from agent.wire.credentials import Credential
from fleetlib.coap import CoapEndpoint, LinkStats, Outcome, Timers
from fleetlib.device import Device, Unprotected

#: Seconds a worker waits at the start barrier for the others (spawning, imports, keys).
BARRIER_TIMEOUT = 300.0
#: Seconds a device waits after a 5.03 without Max-Age (agent/sync/uplink.py does the same).
UNAVAILABLE_PAUSE = 10.0
# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3


@dataclass(frozen=True)
class WorkerSpec:
    """What one worker simulates. ``devices``: (index in the fleet, name, credential as JSON or
    None for plain CoAP). Times in seconds."""

    index: int
    target: tuple[str, int]
    devices: tuple[tuple[int, str, dict[str, Any] | None], ...]
    fleet_size: int
    interval: float
    batch: int
    duration: float
    warmup: float
    drain: float
    content_format: int
    max_records: int
    devices_per_socket: int
    ack_timeout: float
    seed: int


@dataclass
class DeviceResult:
    name: str
    acked: tuple[tuple[int, int], ...]  # acknowledged seqs, as inclusive ranges
    sent: int  # seqs 1..sent were sent at least once
    generated: int
    conflicted: int


@dataclass
class WorkerResult:
    """What one worker saw. ``*_window``: within the steady window only."""

    index: int
    sockets: int
    devices: list[DeviceResult] = field(default_factory=list)
    link: LinkStats = field(default_factory=LinkStats)
    requests_sent: int = 0  # CoAP requests started (Echo repeats too; not retransmissions)
    requests_acked: int = 0  # answered 2.04 with an ack
    records_acked: int = 0
    echo_handshakes: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    requests_sent_window: int = 0
    requests_acked_window: int = 0
    records_acked_window: int = 0
    latencies_ms: array[float] = field(default_factory=lambda: array("f"))  # acks in the window
    tick_lag_ms: array[float] = field(default_factory=lambda: array("f"))
    # per second since the start: requests acknowledged, requests started (retransmissions not)
    acked_per_s: array[int] = field(default_factory=lambda: array("l"))
    sent_per_s: array[int] = field(default_factory=lambda: array("l"))
    abandoned: int = 0  # devices whose request was still out when the drain ended
    cpu_s: float = 0.0  # the whole run, setup included
    cpu_s_window: float = 0.0
    window_s: float = 0.0


def worker_main(spec: WorkerSpec, barrier: Any, results: Any) -> None:
    """Process entry: run the worker, put ``("ok", index, WorkerResult)`` or ``("error", index,
    traceback)`` on ``results``."""
    tune_malloc()
    try:
        result = asyncio.run(Worker(spec).run(barrier))
    except BaseException:
        try:
            barrier.abort()  # the others (and the parent) must not wait for this one
        except Exception:
            pass
        results.put(("error", spec.index, traceback.format_exc()))
        return
    results.put(("ok", spec.index, result))


class _Run:
    """One device's place in its loop, carried by the worker's callbacks: the next tick, the
    request in flight (its inner message, seqs, Echo and OSCORE request id) and the timer or
    exchange it waits on."""

    __slots__ = (
        "device",
        "done",
        "echo",
        "endpoint",
        "error",
        "exchange",
        "inner",
        "request_id",
        "seqs",
        "tick",
        "timer",
    )

    def __init__(self, device: Device, endpoint: CoapEndpoint, first: float) -> None:
        self.device = device
        self.endpoint = endpoint
        self.tick = first
        self.timer: list[Any] | None = None
        self.exchange: Outcome | None = None
        self.inner: Message | None = None
        self.seqs: list[int] = []
        self.echo: bytes | None = None
        self.request_id: Any = None
        self.done = False
        self.error: Exception | None = None


def tune_malloc() -> bool:
    """Keep freed memory in this process (glibc): no heap trimming below 64 MiB free, the heap
    grown 16 MiB at a time, blocks up to 32 MiB from the heap rather than their own mappings.
    False where there is no glibc ``mallopt``."""
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    ok = True
    for param, value in (
        (_M_TRIM_THRESHOLD, 64 << 20),
        (_M_TOP_PAD, 16 << 20),
        (_M_MMAP_THRESHOLD, 32 << 20),
    ):
        ok = mallopt(param, value) == 1 and ok
    return ok


class Worker:
    _loop: asyncio.AbstractEventLoop  # set by run()
    _timers: Timers

    def __init__(self, spec: WorkerSpec) -> None:
        self.spec = spec
        self.rng = random.Random(spec.seed)
        self.result = WorkerResult(spec.index, 0)
        self.t0 = 0.0
        self.wall0 = 0.0
        self.end = 0.0
        self.w0 = 0.0
        self.w1 = 0.0
        self._cpu_w0 = 0.0
        self._left = 0
        self._all_done: asyncio.Future[None] | None = None

    async def run(self, barrier: Any) -> WorkerResult:
        spec, res = self.spec, self.result
        loop = self._loop = asyncio.get_running_loop()
        timers = self._timers = Timers(loop)
        cpu0 = time.process_time()
        devices = [
            Device(
                name,
                batch=spec.batch,
                rng=random.Random(self.rng.getrandbits(64)),
                content_format=spec.content_format,
                credential=Credential.from_json(cred) if cred is not None else None,
                max_records=spec.max_records,
            )
            for _, name, cred in spec.devices
        ]
        n_sockets = max(1, math.ceil(len(devices) / max(1, spec.devices_per_socket)))
        endpoints = [
            await CoapEndpoint.open(
                spec.target,
                random.Random(self.rng.getrandbits(64)),
                ack_timeout=spec.ack_timeout,
                stats=res.link,
                timers=timers,
            )
            for _ in range(n_sockets)
        ]
        res.sockets = n_sockets
        try:
            await loop.run_in_executor(None, barrier.wait, BARRIER_TIMEOUT)
            self.t0 = loop.time()
            self.wall0 = time.time()
            self.end = self.t0 + spec.duration
            self.w0 = self.t0 + min(spec.warmup, spec.duration)
            self.w1 = self.end
            res.window_s = self.w1 - self.w0
            loop.call_at(self.w0, self._window_opens)
            loop.call_at(self.w1, self._window_closes)
            runs = []
            for k, ((index, _, _), device) in enumerate(zip(spec.devices, devices, strict=True)):
                phase = (index + self.rng.random()) / spec.fleet_size * spec.interval
                runs.append(_Run(device, endpoints[k % n_sockets], self.t0 + phase))
            if runs:
                self._left = len(runs)
                self._all_done = loop.create_future()
                for run in runs:
                    try:
                        self._go(run, None)
                    except Exception as err:
                        self._failed(run, err)
                timeout = self.end + spec.drain - loop.time()
                await asyncio.wait([self._all_done], timeout=max(0.0, timeout))
                pending = [run for run in runs if not run.done]
                for run in pending:
                    self._abandon(run)
                res.abandoned = len(pending)
            if loop.time() < self.w1:  # the window (and its CPU reading) ends at duration
                await asyncio.sleep(self.w1 - loop.time())
            for run in runs:
                if run.error is not None:
                    raise run.error
        finally:
            for ep in endpoints:
                ep.close()
        res.cpu_s = time.process_time() - cpu0
        res.devices = [
            DeviceResult(d.name, d.acked_ranges(), d.sent, d.generated, d.conflicted)
            for d in devices
        ]
        return res

    def _window_opens(self) -> None:
        self._cpu_w0 = time.process_time()

    def _window_closes(self) -> None:
        self.result.cpu_s_window = time.process_time() - self._cpu_w0

    # -- a device's loop, as callbacks -------------------------------------------------------------

    def _go(self, run: _Run, now: float | None) -> None:
        """The device's loop: from its top (``now`` None: done after ``end``, or sleep until
        the next tick, or go on at once) or from just after its sleep (``now``): the readings
        of every tick up to ``now`` (ticks missed meanwhile too), then a post, unless a 5.03's
        Max-Age holds it. A post goes on in :meth:`_answered`; a sleep in :meth:`_wake`."""
        device = run.device
        end, interval = self.end, self.spec.interval
        while True:
            tick = run.tick
            if now is None:
                if tick >= end:
                    self._done(run)
                    return
                now = self._loop.time()
                if tick > now:
                    run.timer = self._timers.call_at(tick, self._wake, run)
                    return
            while tick <= now and tick < end:
                device.produce(self.wall0 + (tick - self.t0), interval)
                tick += interval
            run.tick = tick
            if now >= device.hold_until and self._post(run):
                return
            now = None

    def _wake(self, run: _Run) -> None:
        """The timer of the device's next tick."""
        run.timer = None
        try:
            now = self._loop.time()
            if self.w0 <= run.tick < self.w1:  # how late the loop woke it: the worker's load
                self.result.tick_lag_ms.append((now - run.tick) * 1000.0)
            self._go(run, max(now, run.tick))
        except Exception as err:
            self._failed(run, err)

    def _post(self, run: _Run) -> bool:
        """Start a request with what the device has not had acknowledged; False: nothing."""
        request = run.device.next_request()
        if request is None:
            return False
        run.inner, run.seqs = request
        run.echo = None
        self._send(run)
        return True

    def _send(self, run: _Run) -> None:
        session = run.device.session
        if session is not None:
            outer, run.request_id = session.protect(run.inner, run.echo)  # type: ignore[arg-type]
        else:
            outer = run.inner  # type: ignore[assignment]
        res = self.result
        started = self._loop.time()
        res.requests_sent += 1
        _count(res.sent_per_s, started - self.t0)
        if self.w0 <= started < self.w1:
            res.requests_sent_window += 1
        run.exchange = run.endpoint.send(outer, self._answered, run)

    def _answered(self, run: _Run, outcome: Outcome) -> None:
        """The end of the device's exchange: on with its loop (or the Echo round's request)."""
        run.exchange = None
        try:
            if not self._answer(run, outcome):
                run.inner = run.request_id = None
                self._go(run, None)
        except Exception as err:
            self._failed(run, err)

    def _answer(self, run: _Run, outcome: Outcome) -> bool:
        """What the answer means; True when the request went again (with the Echo asked for)."""
        res = self.result
        answer = outcome.response
        if answer is None:
            res.errors[outcome.error] += 1
            return False
        device = run.device
        session = device.session
        if session is not None:
            try:
                answer = session.unprotect(answer, run.request_id)
            except Unprotected as err:
                res.errors[f"{err.code.dotted} unprotected"] += 1
                return False
            except Exception as err:  # aiocoap's OSCORE errors: a forged or broken answer
                res.errors[f"oscore {type(err).__name__}"] += 1
                return False
        code = answer.code
        if code == Code.UNAUTHORIZED and run.echo is None and answer.opt.echo is not None:
            run.echo = answer.opt.echo  # a new ID Context: prove freshness, then it is ours
            res.echo_handshakes += 1
            self._send(run)
            return True
        if code != Code.CHANGED:
            res.errors[code.dotted] += 1
            if code == Code.SERVICE_UNAVAILABLE:  # as the agent: wait Max-Age (or 10 s)
                max_age = answer.opt.max_age
                wait = float(max_age if max_age is not None else UNAVAILABLE_PAUSE)
                device.hold_until = self._loop.time() + wait
            return False
        try:
            ack = IngestAck.from_cbor(bytes(answer.payload))
        except CodecError:
            res.errors["bad ack"] += 1
            return False
        count = device.acknowledged(ack, run.seqs)
        res.requests_acked += 1
        res.records_acked += count
        finished = outcome.finished
        _count(res.acked_per_s, finished - self.t0)
        if self.w0 <= finished < self.w1:
            res.requests_acked_window += 1
            res.records_acked_window += count
            res.latencies_ms.append(outcome.latency * 1000.0)
        return False

    def _done(self, run: _Run) -> None:
        run.done = True
        self._left -= 1
        if self._left == 0 and self._all_done is not None and not self._all_done.done():
            self._all_done.set_result(None)

    def _abandon(self, run: _Run) -> None:
        """Nothing more for this device: its timer and its exchange (nothing more is sent)."""
        if run.timer is not None:
            Timers.cancel(run.timer)
            run.timer = None
        if run.exchange is not None:
            run.endpoint.abandon(run.exchange)
            run.exchange = None

    def _failed(self, run: _Run, err: Exception) -> None:
        """A device's step raised: it stops, and the worker raises it at the end."""
        self._abandon(run)
        if not run.done:
            run.error = err
            self._done(run)


def _count(per_second: array[int], t: float) -> None:
    """One more in the second ``t`` (seconds since the start) of ``per_second``."""
    i = max(0, int(t))
    if i >= len(per_second):
        per_second.extend([0] * (i + 1 - len(per_second)))
    per_second[i] += 1
