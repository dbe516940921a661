"""One worker process of the fleet: its slice of the devices in one event loop, on a few UDP
sockets (:class:`~fleetlib.coap.CoapEndpoint`, ``devices_per_socket`` devices each).

Each device is one coroutine: it sleeps until its next tick (a phase in the interval spread
evenly over the whole fleet), takes a batch of readings, and posts what it has not had
acknowledged, one request at a time; ticks missed while a request was out (retransmissions, a
slow endpoint) are made up with their own readings before the next post. After a 5.03 it posts
nothing until Max-Age has passed (readings go on). After ``duration``
seconds devices take no more readings; requests in flight may finish for ``drain`` seconds, then
are abandoned.

Every worker starts at the same moment (a barrier with the parent), so the fleet's phases hold
across processes. The steady window (from ``warmup`` to ``duration``) is when throughput,
latency and CPU per request are measured: the first interval is all Echo round trips (every
device has a new OSCORE ID Context).

:func:`worker_main` is the process entry; the :class:`WorkerResult` goes back through a queue.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
import traceback
from array import array
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from aiocoap.numbers.codes import Code

from agent.wire.batch import CodecError, IngestAck
from agent.wire.credentials import Credential
from fleetlib.coap import CoapEndpoint, LinkStats
from fleetlib.device import Device, Unprotected

#: Seconds a worker waits at the start barrier for the others (spawning, imports, keys).
BARRIER_TIMEOUT = 300.0
#: Seconds a device waits after a 5.03 without Max-Age (agent/sync/uplink.py does the same).
UNAVAILABLE_PAUSE = 10.0


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


class Worker:
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

    async def run(self, barrier: Any) -> WorkerResult:
        spec, res = self.spec, self.result
        loop = asyncio.get_running_loop()
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
            tasks = []
            for k, ((index, _, _), device) in enumerate(zip(spec.devices, devices, strict=True)):
                phase = (index + self.rng.random()) / spec.fleet_size * spec.interval
                coro = self._device(device, endpoints[k % n_sockets], self.t0 + phase)
                tasks.append(loop.create_task(coro))
            if tasks:
                timeout = self.end + spec.drain - loop.time()
                _, pending = await asyncio.wait(tasks, timeout=max(0.0, timeout))
                for task in pending:
                    task.cancel()
                res.abandoned = len(pending)
                await asyncio.gather(*pending, return_exceptions=True)
            if loop.time() < self.w1:  # the window (and its CPU reading) ends at duration
                await asyncio.sleep(self.w1 - loop.time())
            for task in tasks:
                if not task.cancelled() and task.exception() is not None:
                    raise task.exception()  # type: ignore[misc]
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

    def _in_window(self, t: float) -> bool:
        return self.w0 <= t < self.w1

    async def _device(self, device: Device, ep: CoapEndpoint, first: float) -> None:
        loop = asyncio.get_running_loop()
        interval, end = self.spec.interval, self.end
        lags = self.result.tick_lag_ms
        tick = first
        while tick < end:
            delay = tick - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
                if self._in_window(tick):  # how late the loop woke it: the worker's load
                    lags.append((loop.time() - tick) * 1000.0)
            now = loop.time()
            while tick <= now and tick < end:
                device.produce(self.wall0 + (tick - self.t0), interval)
                tick += interval
            if now >= device.hold_until:
                await self._post(device, ep)

    async def _post(self, device: Device, ep: CoapEndpoint) -> None:
        request = device.next_request()
        if request is None:
            return
        inner, seqs = request
        res = self.result
        session = device.session
        echo: bytes | None = None
        while True:
            if session is not None:
                outer, request_id = session.protect(inner, echo)
            else:
                outer, request_id = inner, None
            started = asyncio.get_running_loop().time()
            res.requests_sent += 1
            _count(res.sent_per_s, started - self.t0)
            if self._in_window(started):
                res.requests_sent_window += 1
            outcome = await ep.request(outer)
            if outcome.response is None:
                res.errors[outcome.error] += 1
                return
            answer = outcome.response
            if session is not None:
                try:
                    answer = session.unprotect(answer, request_id)
                except Unprotected as err:
                    res.errors[f"{err.code.dotted} unprotected"] += 1
                    return
                except Exception as err:  # aiocoap's OSCORE errors: a forged or broken answer
                    res.errors[f"oscore {type(err).__name__}"] += 1
                    return
            if answer.code == Code.UNAUTHORIZED and answer.opt.echo is not None and echo is None:
                echo = answer.opt.echo  # a new ID Context: prove freshness, then it is ours
                res.echo_handshakes += 1
                continue
            break
        if answer.code != Code.CHANGED:
            res.errors[answer.code.dotted] += 1
            if answer.code == Code.SERVICE_UNAVAILABLE:  # as the agent: wait Max-Age (or 10 s)
                max_age = answer.opt.max_age
                wait = float(max_age if max_age is not None else UNAVAILABLE_PAUSE)
                device.hold_until = asyncio.get_running_loop().time() + wait
            return
        try:
            ack = IngestAck.from_cbor(bytes(answer.payload))
        except CodecError:
            res.errors["bad ack"] += 1
            return
        count = device.acknowledged(ack, seqs)
        res.requests_acked += 1
        res.records_acked += count
        _count(res.acked_per_s, outcome.finished - self.t0)
        if self._in_window(outcome.finished):
            res.requests_acked_window += 1
            res.records_acked_window += count
            res.latencies_ms.append(outcome.latency * 1000.0)


def _count(per_second: array[int], t: float) -> None:
    """One more in the second ``t`` (seconds since the start) of ``per_second``."""
    i = max(0, int(t))
    if i >= len(per_second):
        per_second.extend([0] * (i + 1 - len(per_second)))
    per_second[i] += 1
