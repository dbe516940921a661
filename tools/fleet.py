#!/usr/bin/env python3
"""fleet: thousands of simulated devices in a few processes posting telemetry batches to the
cloud endpoint over CoAP/UDP, with the real wire format and real OSCORE, then a check that every
record the endpoint acknowledged is stored exactly once.

Each device has its own name (``fleet-00001``...), credential, OSCORE context (a new random ID
Context: its first request goes through the endpoint's Echo round trip) and record numbers
(from 1, never reused); every ``interval`` seconds, at a phase spread evenly over the fleet, it
takes ``batch`` readings and posts everything not yet acknowledged (one request out at a time;
a batch that was not acknowledged goes again with the next, as the agent's store and forward
does). Workers are separate processes (spawned), each with its slice of the devices on a few
UDP sockets: the message layer is done by hand (tools/fleetlib/coap.py), not by an aiocoap
context per device.

Library (the bench calls it)::

    creds = provision(storage, 10_000, "fleet")          # before the endpoint starts
    report = await run_fleet(FleetConfig(target="coap://127.0.0.1:5683", devices=10_000,
                                         credentials=tuple(creds)))
    lost, duplicated = verify(storage, report)           # storage: cloud.storage.Storage

Workers are spawned processes that import the caller's main module again: a script that calls
:func:`run_fleet` keeps its own work under ``if __name__ == "__main__":``.

Command line::

    python tools/fleet.py provision --data DIR --devices 10000 --creds FILE
    edge-agent-cloud serve --data DIR --listen 127.0.0.1:5683 &
    python tools/fleet.py run --target coap://127.0.0.1:5683 --devices 10000 --processes 2 \\
        --interval 10 --batch 10 --duration 60 --security oscore --creds FILE --data DIR --json

    # the same in one go: provision into a new DIR, start the endpoint on a free port, run,
    # stop it, verify; the endpoint's CPU is measured too
    python tools/fleet.py run --serve DIR --devices 1000 --duration 30 --json

``--security none`` needs an endpoint started with ``--insecure`` (``--serve`` does it). The
``--proxy-*`` flags put tools/linkem.py's LinkEmulator between the workers and the endpoint (in
this process). ``--data DIR`` verifies against the endpoint's database afterwards (``lost``
and ``duplicated`` must be 0; the exit status is 1 otherwise). Each run needs devices the
database has no records of yet (a new DIR, or ``provision`` with another ``--prefix``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing
import os
import queue
import random
import socket
import sys
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

TOOLS = Path(__file__).resolve().parent
ROOT = TOOLS.parent
if str(TOOLS) not in sys.path:  # fleetlib and linkem
    sys.path.insert(0, str(TOOLS))
if str(ROOT) not in sys.path:  # agent and cloud, when the project is not installed
    sys.path.append(str(ROOT))

from fleetlib.coap import ACK_TIMEOUT, MID_RATE, max_transmit_wait  # noqa: E402
from fleetlib.device import DEFAULT_CONTENT_FORMAT  # noqa: E402
from fleetlib.provision import (  # noqa: E402
    device_names,
    provision,
    read_credentials,
    write_credentials,
)
from fleetlib.report import FleetReport, Verification, verify  # noqa: E402
from fleetlib.worker import WorkerSpec, worker_main  # noqa: E402
from linkem import Impairment, LinkEmulator, parse_duration, parse_probability  # noqa: E402

from agent.wire.credentials import Credential, CredentialError  # noqa: E402

__all__ = [
    "FleetConfig",
    "FleetError",
    "FleetReport",
    "Impairment",
    "Verification",
    "provision",
    "read_credentials",
    "run_fleet",
    "run_fleet_sync",
    "verify",
    "write_credentials",
]

DEFAULT_TARGET = "coap://127.0.0.1:5683"
#: Devices per UDP socket: each socket's message IDs last EXCHANGE_LIFETIME at 10 s intervals
#: (fleetlib/coap.py MID_RATE), and the endpoint sends separate responses to one socket one at
#: a time (aiocoap's NSTART = 1 per peer), so a socket is not shared by too many devices.
DEVICES_PER_SOCKET = 100
#: Seconds beyond duration + drain that the parent waits for the workers' results.
RESULT_GRACE = 60.0
ENDPOINT_START_TIMEOUT = 60.0


class FleetError(Exception):
    """The fleet could not run (a worker failed, a bad configuration)."""


@dataclass(frozen=True)
class FleetConfig:
    """A fleet run. Times in seconds.

    ``credentials``: with ``security="oscore"``, one per device (names are theirs, in order);
    with ``"none"`` the names are ``prefix-00001``... ``warmup``: the start of the steady
    window (None: one interval). ``drain``: how long requests in flight may finish after
    ``duration`` (None: RFC 7252's MAX_TRANSMIT_WAIT for ``ack_timeout``, 93 s by default).
    ``proxy``: put a LinkEmulator with this impairment (both directions) in between.
    ``endpoint_pid``: measure this process's CPU (Linux /proc) over the steady window."""

    target: str = DEFAULT_TARGET
    devices: int = 100
    processes: int = 2
    interval: float = 10.0
    batch: int = 10
    duration: float = 60.0
    security: str = "oscore"
    credentials: tuple[Credential, ...] = ()
    prefix: str = "fleet"
    content_format: int = DEFAULT_CONTENT_FORMAT
    max_records: int = 100
    devices_per_socket: int = DEVICES_PER_SOCKET
    ack_timeout: float = ACK_TIMEOUT
    warmup: float | None = None
    drain: float | None = None
    proxy: Impairment | None = None
    proxy_seed: int | None = None
    seed: int | None = None
    endpoint_pid: int | None = None
    start_timeout: float = 300.0

    def check(self) -> None:
        if self.devices < 1 or self.processes < 1 or self.batch < 1:
            raise FleetError("devices, processes and batch must be at least 1")
        if self.interval <= 0 or self.duration <= 0 or self.ack_timeout <= 0:
            raise FleetError("interval, duration and ack_timeout must be positive")
        if self.security not in ("oscore", "none"):
            raise FleetError(f"security must be oscore or none, not {self.security!r}")
        if self.security == "oscore" and len(self.credentials) < self.devices:
            raise FleetError(
                f"security oscore needs a credential per device: {len(self.credentials)} for "
                f"{self.devices} devices (python tools/fleet.py provision makes them)"
            )

    @property
    def drain_s(self) -> float:
        return max_transmit_wait(self.ack_timeout) if self.drain is None else self.drain

    @property
    def warmup_s(self) -> float:
        return self.interval if self.warmup is None else self.warmup


def parse_target(uri: str) -> tuple[str, int]:
    """``coap://host[:port]`` -> (host, port)."""
    parts = urlsplit(uri)
    if parts.scheme != "coap" or not parts.hostname:
        raise FleetError(f"{uri!r}: give a coap://HOST[:PORT] target")
    return parts.hostname, parts.port or 5683


async def run_fleet(config: FleetConfig) -> FleetReport:
    """Run the fleet; the report of what was sent and acknowledged (verify() it against the
    endpoint's storage)."""
    config.check()
    host, port = parse_target(config.target)
    processes = min(config.processes, config.devices)
    if config.security == "oscore":
        creds: list[dict[str, Any] | None] = [
            c.to_json() for c in config.credentials[: config.devices]
        ]
        names = [c.principal for c in config.credentials[: config.devices]]
    else:
        creds = [None] * config.devices
        names = device_names(config.prefix, config.devices)
    seed = config.seed if config.seed is not None else random.SystemRandom().randrange(2**32)
    proxy = None
    target = (host, port)
    if config.proxy is not None:
        proxy = LinkEmulator(
            listen=("127.0.0.1", 0), target=target, impairment=config.proxy, seed=config.proxy_seed
        )
        await proxy.start()
        target = ("127.0.0.1", proxy.port)
    specs = [
        WorkerSpec(
            index=w,
            target=target,
            devices=tuple((g, names[g], creds[g]) for g in range(w, config.devices, processes)),
            fleet_size=config.devices,
            interval=config.interval,
            batch=config.batch,
            duration=config.duration,
            warmup=config.warmup_s,
            drain=config.drain_s,
            content_format=config.content_format,
            max_records=config.max_records,
            # never more than a socket's message IDs allow (MID_RATE new messages a second)
            devices_per_socket=min(
                config.devices_per_socket, max(1, int(MID_RATE * config.interval))
            ),
            ack_timeout=config.ack_timeout,
            seed=seed * 1000 + w,
        )
        for w in range(processes)
    ]
    endpoint: dict[str, Any] | None = None
    try:
        results, endpoint = await _run_workers(config, specs)
    finally:
        proxy_stats = None
        if proxy is not None:
            proxy_stats = {"impairment": config.proxy.describe(), **proxy.stats()}  # type: ignore[union-attr]
            await proxy.stop()
    report = FleetReport.merge(
        results,
        devices=config.devices,
        processes=processes,
        batch_interval_s=config.interval,
        batch_size=config.batch,
        duration_s=config.duration,
        security=config.security,
        content_format=config.content_format,
        target=config.target,
    )
    report.proxy = proxy_stats
    if endpoint is not None:
        requests = report.requests_per_s * report.window_s
        cpu = endpoint["cpu_s_window"]
        endpoint["cpu_ms_per_request"] = round(cpu / requests * 1000, 4) if requests else None
        endpoint["utilisation"] = round(cpu / report.window_s, 3) if report.window_s else None
        report.endpoint = endpoint
    return report


def run_fleet_sync(config: FleetConfig) -> FleetReport:
    """:func:`run_fleet` in a new event loop."""
    return asyncio.run(run_fleet(config))


async def _run_workers(
    config: FleetConfig, specs: list[WorkerSpec]
) -> tuple[list[Any], dict[str, Any] | None]:
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(len(specs) + 1)
    results_q = ctx.Queue()
    procs = [
        ctx.Process(
            target=worker_main,
            args=(spec, barrier, results_q),
            name=f"fleet-worker-{spec.index}",
            daemon=True,
        )
        for spec in specs
    ]
    loop = asyncio.get_running_loop()
    for p in procs:
        p.start()
    try:
        waiting = loop.run_in_executor(None, barrier.wait, config.start_timeout)
        while not waiting.done():
            await asyncio.wait([waiting], timeout=0.2)
            if not waiting.done() and any(p.exitcode is not None for p in procs):
                barrier.abort()
        try:
            waiting.result()
        except threading.BrokenBarrierError:
            raise FleetError("the workers did not start: " + _errors(results_q, procs)) from None
        probe = None
        if config.endpoint_pid is not None:
            probe = loop.create_task(_endpoint_cpu(config.endpoint_pid, config))
        results: list[Any] = []
        deadline = loop.time() + config.duration + config.drain_s + RESULT_GRACE
        while len(results) < len(specs):
            left = deadline - loop.time()
            try:
                kind, index, payload = await loop.run_in_executor(
                    None, _get, results_q, max(0.1, min(left, 1.0))
                )
            except queue.Empty:
                if left <= 0:
                    raise FleetError("the workers did not finish in time") from None
                if any(p.exitcode not in (None, 0) for p in procs):
                    raise FleetError("a worker died: " + _errors(results_q, procs)) from None
                continue
            if kind != "ok":
                raise FleetError(f"worker {index} failed:\n{payload}")
            results.append(payload)
        endpoint = await probe if probe is not None else None
        return results, endpoint
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.terminate()
                p.join()


def _get(q: Any, timeout: float) -> Any:
    return q.get(timeout=timeout)


def _errors(q: Any, procs: list[Any]) -> str:
    lines = []
    with contextlib.suppress(queue.Empty, OSError, ValueError):
        while True:
            kind, index, payload = q.get(timeout=0.5)
            if kind != "ok":
                lines.append(f"worker {index}:\n{payload}")
    codes = [f"{p.name} exit {p.exitcode}" for p in procs if p.exitcode not in (None, 0)]
    return "\n".join(lines + codes) or "no error reported"


def process_cpu(pid: int) -> float:
    """CPU seconds (user + system) of process ``pid`` so far (Linux /proc); 0 once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants (``serve --processes N``: the parent and its workers)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parents[int(entry.name)] = int(stat.rpartition(")")[2].split()[1])
    tree, frontier = [pid], [pid]
    while frontier:
        frontier = [child for child, parent in parents.items() if parent in frontier]
        tree += frontier
    return tree


def tree_cpu(pid: int) -> dict[int, float]:
    """CPU seconds so far of each process of ``pid``'s tree."""
    return {p: process_cpu(p) for p in process_tree(pid)}


async def _endpoint_cpu(pid: int, config: FleetConfig) -> dict[str, Any]:
    """The endpoint's CPU (its processes together) over the steady window (from the barrier)."""
    await asyncio.sleep(min(config.warmup_s, config.duration))
    before = tree_cpu(pid)
    await asyncio.sleep(max(0.0, config.duration - config.warmup_s))
    after = tree_cpu(pid)
    used = sum(cpu - before.get(p, 0.0) for p, cpu in after.items())
    return {"pid": pid, "processes": len(after), "cpu_s_window": round(used, 3)}


# -- the endpoint as a child process (run --serve) ------------------------------------------------


class EndpointProcess:
    """``edge-agent-cloud serve`` on a free loopback port, its log in DIR/endpoint.log;
    ``storage``: its ``--storage`` (default SQLite in DIR); ``processes``: ``--processes``."""

    def __init__(
        self,
        data: Path,
        insecure: bool,
        storage: str | None = None,
        processes: int = 1,
        fast_path: bool = True,
    ) -> None:
        self.data = data.resolve()  # the child runs in the checkout
        self.insecure = insecure
        self.storage = storage
        self.processes = processes
        self.fast_path = fast_path
        self.port = 0
        self.proc: asyncio.subprocess.Process | None = None

    @property
    def uri(self) -> str:
        return f"coap://127.0.0.1:{self.port}"

    async def start(self) -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        cmd = [sys.executable, "-m", "cloud.cli", "serve", "--data", str(self.data)]
        cmd += ["--listen", f"127.0.0.1:{self.port}"] + (["--insecure"] if self.insecure else [])
        cmd += ["--storage", self.storage] if self.storage else []
        cmd += ["--processes", str(self.processes)] if self.processes > 1 else []
        cmd += [] if self.fast_path else ["--no-fast-path"]
        log = _append(self.data / "endpoint.log")
        try:
            self.proc = await asyncio.create_subprocess_exec(
                *cmd, stdout=asyncio.subprocess.PIPE, stderr=log, cwd=ROOT
            )
        finally:
            log.close()
        assert self.proc.stdout is not None
        async with asyncio.timeout(ENDPOINT_START_TIMEOUT):
            line = await self.proc.stdout.readline()
        if b"listening" not in line:
            await self.stop()
            raise FleetError(f"the endpoint did not start; see {self.data / 'endpoint.log'}")

    async def stop(self) -> None:
        if self.proc is None or self.proc.returncode is not None:
            return
        self.proc.terminate()
        try:
            async with asyncio.timeout(30):
                await self.proc.wait()
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()


def _append(path: Path) -> Any:
    return open(path, "ab")


# -- command line ---------------------------------------------------------------------------------


def _impairment(args: argparse.Namespace) -> Impairment | None:
    if args.proxy_loss is None and args.proxy_delay is None and args.proxy_jitter is None:
        return None
    return Impairment(
        delay=parse_duration(args.proxy_delay or 0),
        jitter=parse_duration(args.proxy_jitter or 0),
        loss=parse_probability(args.proxy_loss or 0),
    )


def _storage(spec: Path | str) -> Any:
    """The endpoint's storage: a data directory, sqlite:DIR or postgresql://..."""
    from cloud.storage import open_storage

    return open_storage(spec if isinstance(spec, str) else f"sqlite:{spec}")


def cmd_provision(args: argparse.Namespace) -> int:
    if not (args.data or args.storage):
        raise FleetError("give --data DIR or --storage SPEC")
    storage = _storage(args.storage or Path(args.data))
    try:
        started = time.perf_counter()
        creds = provision(storage, args.devices, args.prefix)
        took = time.perf_counter() - started
    finally:
        storage.close()
    write_credentials(Path(args.creds), creds)
    print(f"{len(creds)} devices registered in {took:.1f} s; credentials in {args.creds}")
    return 0


async def _run(args: argparse.Namespace) -> tuple[FleetReport, Verification | None]:
    config = FleetConfig(
        target=args.target,
        devices=args.devices,
        processes=args.processes,
        interval=args.interval,
        batch=args.batch,
        duration=args.duration,
        security=args.security,
        prefix=args.prefix,
        content_format=args.format,
        max_records=args.max_records,
        devices_per_socket=args.devices_per_socket,
        ack_timeout=args.ack_timeout,
        warmup=args.warmup,
        drain=args.drain,
        proxy=_impairment(args),
        proxy_seed=args.proxy_seed,
        seed=args.seed,
        endpoint_pid=args.endpoint_pid,
    )
    endpoint = None
    data: Path | str | None = args.storage or (Path(args.data) if args.data else None)
    if args.serve:
        data = Path(args.serve)
        if (data / "cloud.sqlite3").exists():
            raise FleetError(f"{data}: --serve makes a new endpoint; give a new directory")
        data.mkdir(parents=True, exist_ok=True)
        storage = _storage(data)
        try:
            creds = provision(storage, args.devices, args.prefix)
        finally:
            storage.close()
        endpoint = EndpointProcess(
            data, insecure=args.security == "none", fast_path=not args.no_fast_path
        )
        await endpoint.start()
        assert endpoint.proc is not None
        config = replace(config, target=endpoint.uri, endpoint_pid=endpoint.proc.pid)
    elif args.creds:
        creds = read_credentials(Path(args.creds))
    else:
        creds = []
    if config.security == "oscore":
        config = replace(config, credentials=tuple(creds))
    try:
        report = await run_fleet(config)
    finally:
        if endpoint is not None:
            await endpoint.stop()
    checked = None
    if data is not None:
        storage = _storage(data)
        try:
            checked = verify(storage, report)
        finally:
            storage.close()
        report.verification = checked.as_dict()
    return report, checked


def cmd_run(args: argparse.Namespace) -> int:
    try:
        report, checked = asyncio.run(_run(args))
    except (FleetError, CredentialError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    doc = report.to_json()
    if args.json:
        print(json.dumps(doc))
    else:
        for key, value in doc.items():
            if key.endswith("_per_s") and isinstance(value, list):
                value = " ".join(map(str, value))
            print(f"{key:>20}: {value}")
    return 1 if checked is not None and (checked.lost or checked.duplicated) else 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="fleet.py", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("provision", help="register devices and write their credentials")
    p.add_argument("--data", help="the endpoint's data directory (its SQLite storage)")
    p.add_argument("--storage", help="or the endpoint's storage: postgresql://... or sqlite:DIR")
    p.add_argument("--devices", type=int, required=True)
    p.add_argument("--prefix", default="fleet", help="device names: PREFIX-00001...")
    p.add_argument("--creds", required=True, help="the credentials file to write (0600)")
    p.set_defaults(func=cmd_provision)

    p = sub.add_parser("run", help="run the fleet against an endpoint")
    p.add_argument("--target", default=DEFAULT_TARGET, help="coap://HOST:PORT")
    p.add_argument("--devices", type=int, default=100)
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--interval", type=float, default=10.0, help="seconds between batches")
    p.add_argument("--batch", type=int, default=10, help="readings per batch")
    p.add_argument("--duration", type=float, default=60.0, help="seconds")
    p.add_argument("--security", choices=("oscore", "none"), default="oscore")
    p.add_argument("--creds", help="the credentials file of `provision` (security oscore)")
    p.add_argument("--prefix", default="fleet", help="device names with security none")
    p.add_argument("--format", type=int, default=DEFAULT_CONTENT_FORMAT, help="content format")
    p.add_argument("--max-records", type=int, default=100, help="most records per request")
    p.add_argument("--devices-per-socket", type=int, default=DEVICES_PER_SOCKET)
    p.add_argument("--ack-timeout", type=float, default=ACK_TIMEOUT, help="RFC 7252 ACK_TIMEOUT")
    p.add_argument("--warmup", type=float, help="start of the steady window (default: interval)")
    p.add_argument("--drain", type=float, help="seconds for requests in flight at the end")
    p.add_argument("--proxy-loss", help="put the impairment proxy in between: loss, e.g. 10%%")
    p.add_argument("--proxy-delay", help="proxy delay each way, e.g. 50ms")
    p.add_argument("--proxy-jitter", help="proxy jitter each way, e.g. 10ms")
    p.add_argument("--proxy-seed", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--data", help="verify against the endpoint's data directory afterwards")
    p.add_argument("--storage", help="or against this storage (postgresql://... or sqlite:DIR)")
    p.add_argument("--endpoint-pid", type=int, help="measure this endpoint process's CPU")
    p.add_argument(
        "--serve",
        metavar="DIR",
        help="provision into a new DIR, run `edge-agent-cloud serve` on it for the run, verify",
    )
    p.add_argument(
        "--no-fast-path",
        action="store_true",
        help="with --serve: the endpoint answers every request through aiocoap (serve "
        "--no-fast-path)",
    )
    p.add_argument("--json", action="store_true", help="one JSON object on stdout")
    p.set_defaults(func=cmd_run)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
