"""Bench of the uplink's security: what OSCORE costs against plain CoAP, and what an endpoint
answers to requests nobody authenticated.

Two reference endpoints run side by side, each in its own process (``edge-agent-cloud serve``,
i.e. ``CloudServer.start``) with its own data directory and the bench's device registered: a plain
one (``--insecure``: ``allow_plain=True``; the agent with security "none") and a secure one (the
agent with security "oscore" and the device's credential). Measured in one run:

- records/s: the real uplink drains a fresh durable queue of telemetry records (bench sync's
  records: one 2-channel reading each) to each endpoint through the link impairment proxy
  (tools/linkem.py), on a clean loopback link (``--quick``: one run each, else the median of
  three, plain and OSCORE alternating) and with 5 % loss and 100 ms delay each way (bench sync's
  lossy link), at the link policy's high level (agent/sync/link.py: SenML-CBOR, 64 KiB batches);
  the OSCORE device starts each drain without context state, as a fresh device does;
- bytes per record: every UDP payload byte both ways on the proxy (requests, answers, acks,
  retransmissions, the Echo round trip) per record delivered, on the clean link, at the policy's
  low level (compact + deflate + dictionary, 1 KiB batches) and at its high level; the level's
  policy is put in force by the real link monitor (``LinkMonitor``, its initial state);
- handshake: wall time from a fresh device (credential read, no OSCORE state file: a new ID
  Context) to its first 2.05 (GET of its desired state, through the clean proxy), which includes
  the endpoint's 4.01 + Echo round trip that verifies the new context; median over fresh devices,
  beside the same first request of a plain device and the steady-state round trip of both;
- amplification: every kind of unauthenticated request (each method on each route of
  ``cloud.protocol._route`` and on unknown paths, with and without payloads, CON and NON,
  /.well-known/core with and without queries and Block2, odd options, malformed and unverifiable
  OSCORE) sent from a raw UDP socket (a fresh one per request, empty token: the worst case for
  the ratio) to the secure endpoint; every datagram that comes back is counted (CON answers are
  acknowledged, as a client would). ``amplification_max`` is the largest response datagram over
  its request datagram.

Targets (the issue): OSCORE throughput >= 0.7x plain, bytes per record <= 1.15x plain at the low
level, amplification <= 3 (cloud.protocol.AMPLIFICATION_LIMIT). A target missed says NOT MET.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import secrets
import select
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from linkem import Impairment, LinkEmulator

from agent.store.queue import Store
from agent.store.settings import StoreSettings
from agent.sync.link import HIGH, LOW, LinkMonitor, LinkSettings
from agent.sync.security import ClientSecurity
from agent.sync.transport import CoapTransport, Endpoints
from agent.sync.uplink import Exchange, Uplink, UplinkSettings, UplinkStats
from agent.wire.credentials import Credential
from benches import Result, workdir
from benches.sync import _free_udp_port, _records
from cloud.protocol import AMPLIFICATION_LIMIT
from drivers.clock import RealClock

MEASURES = (
    "OSCORE against plain CoAP: records/s clean and lossy, bytes per record, handshake time, "
    "unauthenticated amplification"
)
BASELINE = "a plain (--insecure) endpoint, the same uplink and link, alternating in the same run"

HOST = "127.0.0.1"
DEVICE = "bench-sec-01"
LOSSY = Impairment(delay=0.1, loss=0.05)  # bench sync's lossy link: 5 % loss, 100 ms each way
THROUGHPUT_TARGET = 0.7
BYTES_TARGET = 1.15
START_TIMEOUT = 30.0  # s for an endpoint process to listen
PROBE_FIRST_WAIT = 0.5  # s for the first answer to a raw request (some get none)
PROBE_QUIET = 0.05  # s without a datagram after an answer: the request is done
PROBE_SEPARATE_WAIT = 3.0  # s for a separate response after an empty ACK


# -- the endpoints ---------------------------------------------------------------------------------
class _Endpoint:
    """A reference endpoint in its own process, the bench's device registered with it."""

    def __init__(self, root: Path, *, secure: bool) -> None:
        self.secure = secure
        self.mode = "oscore" if secure else "none"
        self.data = root / ("cloud-oscore" if secure else "cloud-plain")
        self.credential = root / f"credential-{self.mode}.json"
        self.port = 0
        self._proc: subprocess.Popen[str] | None = None

    def _cli(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "cloud.cli", "--log-level", "warning", *args]

    def __enter__(self) -> _Endpoint:
        add = ["devices", "add", "--data", str(self.data), DEVICE]
        subprocess.run(
            self._cli(*add, "--credential-out", str(self.credential)),
            check=True,
            capture_output=True,
        )
        self.port = _free_udp_port()
        serve = ["serve", "--listen", f"{HOST}:{self.port}", "--data", str(self.data)]
        # rounds of 20,000 records at loopback speed from one device: the transport is measured,
        # not the endpoint's per-device rate limit (docs/ops.md "Rate limit")
        serve += ["--device-rate", "0"]
        self._proc = subprocess.Popen(
            self._cli(*serve, *([] if self.secure else ["--insecure"])),
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        try:
            self._wait_listening()
        except BaseException:
            self.__exit__()
            raise
        return self

    def _wait_listening(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        deadline = time.monotonic() + START_TIMEOUT
        while (left := deadline - time.monotonic()) > 0:
            ready, _, _ = select.select([self._proc.stdout], [], [], left)
            if not ready:
                break
            line = self._proc.stdout.readline()
            if not line:
                raise RuntimeError(f"the {self.mode} endpoint exited ({self._proc.wait()})")
            if "listening" in line:
                return
        raise RuntimeError(f"the {self.mode} endpoint did not listen within {START_TIMEOUT:g} s")

    def cpu_seconds(self) -> float:
        """User + system CPU time of the endpoint's process so far (Linux /proc)."""
        assert self._proc is not None
        stat = Path(f"/proc/{self._proc.pid}/stat").read_text().rpartition(")")[2].split()
        return (int(stat[11]) + int(stat[12])) / os.sysconf("SC_CLK_TCK")

    def __exit__(self, *exc: object) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# -- draining a backlog ----------------------------------------------------------------------------
@dataclass
class Drain:
    mode: str
    records: int
    elapsed: float
    wire_bytes: int
    datagrams: int
    stats: UplinkStats
    cpu_agent: float  # s of this process (uplink, store, linkem) during the drain
    cpu_endpoint: float  # s of the endpoint's process during the drain

    @property
    def rate(self) -> float:
        return self.records / self.elapsed

    @property
    def per_record(self) -> float:
        return self.wire_bytes / self.records


async def _until_delivered(uplink: Uplink, n: int, limit: float) -> float:
    """Run the uplink until the endpoint acknowledged ``n`` records; the seconds it took."""
    delivered = 0
    done = asyncio.Event()

    def count(ex: Exchange) -> None:
        nonlocal delivered
        delivered += ex.delivered
        if delivered >= n:
            done.set()

    uplink.on_exchange = count
    began = time.perf_counter()
    runner = asyncio.create_task(uplink.run(), name="bench-uplink")
    try:
        await asyncio.wait_for(done.wait(), limit)
    except TimeoutError:
        raise RuntimeError(f"{delivered} of {n} records delivered in {limit:g} s") from None
    finally:
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)
    return time.perf_counter() - began


async def _drain(
    ep: _Endpoint, workdir: Path, n: int, level: str, imp: Impairment, seed: int
) -> Drain:
    """A fresh store of ``n`` records, drained by the real uplink to ``ep`` through linkem."""
    clock = RealClock()
    async with contextlib.AsyncExitStack() as stack:
        store = await Store.open(StoreSettings(path=workdir / "queue.db", budget_bytes=1 << 30))
        stack.push_async_callback(store.close)
        await store.put(_records(n))
        proxy = await stack.enter_async_context(
            LinkEmulator((HOST, 0), (HOST, ep.port), imp, seed=seed)
        )
        uri = f"coap://{HOST}:{proxy.port}"
        security = ClientSecurity.open(ep.mode, (uri,), ep.credential, workdir / "oscore.json")
        stack.callback(security.close)
        settings = UplinkSettings(
            endpoints=(uri,), backoff_base=0.05, backoff_max=2.0, security=ep.mode
        )
        transport = CoapTransport(
            clock, lanes=settings.max_inflight, uris=settings.endpoints, security=security
        )
        stack.push_async_callback(transport.close)
        uplink = Uplink(
            settings,
            store,
            transport,
            Endpoints(settings.endpoints, clock),
            clock,
            device_id=DEVICE,
            rng=random.Random(seed),
        )
        LinkMonitor(LinkSettings(initial=level), clock, uplink=uplink)  # the level's policy
        cpu0 = (time.process_time(), ep.cpu_seconds())
        elapsed = await _until_delivered(uplink, n, 60.0 + n / 20)
        cpu = (time.process_time() - cpu0[0], ep.cpu_seconds() - cpu0[1])
        if (left := (await store.stats()).depth) != 0:
            raise RuntimeError(f"{left} records left in the store after the drain")
        counters = [proxy.counters(d) for d in ("up", "down")]
    return Drain(
        ep.mode,
        n,
        elapsed,
        sum(c.bytes_in for c in counters),
        sum(c.packets_in for c in counters),
        uplink.stats,
        *cpu,
    )


@dataclass
class Paired:
    """Drains of both modes on one link and level; rates are medians over the rounds."""

    plain: list[Drain] = field(default_factory=list)
    oscore: list[Drain] = field(default_factory=list)

    @staticmethod
    def _median(drains: list[Drain], what: str) -> float:
        return statistics.median(getattr(d, what) for d in drains)

    def rate(self, mode: str) -> float:
        return self._median(getattr(self, mode), "rate")

    def per_record(self, mode: str) -> float:
        return self._median(getattr(self, mode), "per_record")

    @property
    def ratio(self) -> float:
        return self.rate("oscore") / self.rate("plain")

    @property
    def bytes_ratio(self) -> float:
        return self.per_record("oscore") / self.per_record("plain")

    @property
    def runs(self) -> str:
        return f"median of {len(self.plain)} runs" if len(self.plain) > 1 else "1 run"

    def cpu_ms(self, mode: str, which: str) -> float:
        """Median CPU ms per 1,000 records delivered, of ``which`` ("agent" or "endpoint")."""
        return self._median(getattr(self, mode), f"cpu_{which}") * 1e6 / self.plain[0].records

    def rates(self, mode: str) -> str:
        return ", ".join(f"{d.rate:,.0f}" for d in getattr(self, mode))


def _measure(
    eps: tuple[_Endpoint, _Endpoint],
    root: Path,
    tag: str,
    n: int,
    level: str,
    imp: Impairment,
    rounds: int,
) -> Paired:
    """``rounds`` drains to each endpoint, plain and OSCORE alternating; both drains of a round
    get the same linkem seed (the same loss draws)."""
    out = Paired()
    for r in range(rounds):
        for ep in eps:
            workdir = root / f"{tag}-{r}-{ep.mode}"
            workdir.mkdir()
            drain = asyncio.run(_drain(ep, workdir, n, level, imp, r + 1))
            (out.oscore if ep.secure else out.plain).append(drain)
    return out


# -- context establishment ------------------------------------------------------------------------
@dataclass
class Handshakes:
    mode: str
    first_ms: list[float] = field(default_factory=list)  # fresh device to its first 2.05
    open_ms: list[float] = field(default_factory=list)  # of which ClientSecurity.open
    steady_ms: list[float] = field(default_factory=list)  # later requests' round trips
    first_datagrams: list[int] = field(default_factory=list)  # both ways, first request

    def median(self, what: str) -> float:
        return statistics.median(getattr(self, what))


async def _handshakes(ep: _Endpoint, workdir: Path, fresh: int, steady: int) -> Handshakes:
    """``fresh`` devices without context state, each timed to its first answer, then
    ``steady`` more requests on the last one's context."""
    clock = RealClock()
    out = Handshakes(ep.mode)
    async with LinkEmulator((HOST, 0), (HOST, ep.port), Impairment(), seed=1) as proxy:
        uri = f"coap://{HOST}:{proxy.port}"
        # desired state: what a device reads at start; its cost does not grow with the records
        # stored (GET /devices/ID counts them)
        resource = f"{uri}/state/{DEVICE}/desired"
        for i in range(fresh):
            before = sum(proxy.counters(d).packets_in for d in ("up", "down"))
            t0 = time.perf_counter()
            security = ClientSecurity.open(
                ep.mode, (uri,), ep.credential, workdir / f"oscore-{i}.json"
            )
            t1 = time.perf_counter()
            transport = CoapTransport(clock, lanes=1, uris=(uri,), security=security)
            try:
                resp = await transport.request("GET", resource, deadline=10.0)
                t2 = time.perf_counter()
                if not resp.success:
                    raise RuntimeError(f"first request of a fresh {ep.mode} device: {resp.dotted}")
                out.first_ms.append((t2 - t0) * 1000)
                out.open_ms.append((t1 - t0) * 1000)
                after = sum(proxy.counters(d).packets_in for d in ("up", "down"))
                out.first_datagrams.append(after - before)
                if i == fresh - 1:
                    for _ in range(steady):
                        t = time.perf_counter()
                        resp = await transport.request("GET", resource, deadline=10.0)
                        out.steady_ms.append((time.perf_counter() - t) * 1000)
                        if not resp.success:
                            raise RuntimeError(f"steady request ({ep.mode}): {resp.dotted}")
            finally:
                await transport.close()
                security.close()
    return out


# -- amplification -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Probe:
    kind: str
    message: Any  # aiocoap.Message (its MID is set when it is sent) or raw bytes


@dataclass
class Answer:
    kind: str
    request: int  # bytes
    responses: list[int]  # bytes of each datagram that came back
    codes: list[str]

    @property
    def worst(self) -> float:
        return max(self.responses, default=0) / self.request

    @property
    def total(self) -> float:
        return sum(self.responses) / self.request


def _probes(cred: Credential) -> Iterator[Probe]:
    """Every kind of unauthenticated request, as an attacker (or a lost client) may send it."""
    from aiocoap import CON, DELETE, EMPTY, GET, NON, POST, PUT, Message
    from aiocoap.numbers.optionnumbers import OptionNumber
    from aiocoap.optiontypes import BlockOption, OpaqueOption

    from agent.wire.oscore import PersistentContext, Sequence

    def msg(code: Any, path: tuple[str, ...] = (), payload: bytes = b"", **opt: Any) -> Any:
        m = Message(code=code, payload=payload)
        m.opt.uri_path = path
        for name, value in opt.items():
            setattr(m.opt, name, value)
        return m

    d = DEVICE
    routes = [
        (".well-known", "core"),
        ("ingest", d),
        ("state", d, "reported"),
        ("state", d, "desired"),
        ("devices", d),
        ("models", "m"),
        ("models", "m", "1", "manifest"),
        ("models", "m", "1", "file"),
        ("infer", d),
        ("validate", d),
        ("ingest", "ghost"),  # a device that is not registered
        ("state", "ghost", "desired"),
        ("devices", "-bad"),  # not a device id
    ]
    unknown = [(), ("x",), ("ingest",), ("state", d), ("devices", d, "x"), ("models",)]
    bodies = {"": (b"", None), "+cbor": (b"\xa1\x61a\x01", 60), "+senml": (b"\x80", 112)}
    for mtype, mt in ((CON, "CON"), (NON, "NON")):

        def add(kind: str, m: Any, mtype: Any = mtype, mt: str = mt) -> Probe:
            m.mtype = mtype
            return Probe(f"{mt} {kind}", m)

        yield add("empty message (ping)", Message(code=EMPTY))
        for path in routes + unknown:
            where = "/" + "/".join(path)
            for method in (GET, POST, PUT, DELETE):
                for suffix, (body, cf) in bodies.items():
                    m = msg(method, path, body)
                    if cf is not None:
                        m.opt.content_format = cf
                    yield add(f"{method.name} {where}{suffix}", m)
        wkc = (".well-known", "core")
        for q in ("rt=*", "rt=edge-agent.ingest", "href=/ingest*", "ct=112", "obs", "if=x"):
            yield add(f"GET /.well-known/core?{q}", msg(GET, wkc, uri_query=(q,)))
        for szx in (0, 2, 6):
            for num in (0, 1):
                block = BlockOption.BlockwiseTuple(num, False, szx)
                yield add(
                    f"GET /.well-known/core Block2 {num}/{16 << szx}", msg(GET, wkc, block2=block)
                )
        yield add("GET /.well-known/core Accept 40", msg(GET, wkc, accept=40))
        yield add("GET /.well-known/core Accept 60", msg(GET, wkc, accept=60))
        desired = ("state", d, "desired")
        yield add("GET desired Observe", msg(GET, desired, observe=0))
        yield add("GET desired ETag", msg(GET, desired, etags=(b"12345678",)))
        yield add("PUT desired If-Match", msg(PUT, desired, b"\xa0", if_match=(b"x",)))
        yield add("POST ingest bogus Echo", msg(POST, ("ingest", d), b"\x80", echo=b"12345678"))
        block1 = BlockOption.BlockwiseTuple(0, True, 6)
        yield add("POST ingest Block1 0/1024", msg(POST, ("ingest", d), bytes(1024), block1=block1))
        yield add("GET Proxy-Uri", msg(GET, proxy_uri="coap://example.org/x"))
        crit = msg(GET, ("devices", d))
        crit.opt.add_option(OpaqueOption(OptionNumber(65001), b"x"))
        yield add("GET unknown critical option", crit)
        # OSCORE that cannot be verified: no context, or not yet verified by Echo
        kid, ctx8 = cred.sender_id, secrets.token_bytes(8)
        oscore_options = {
            "empty OSCORE option": b"",
            "OSCORE reserved flag bits": b"\xe0",
            "OSCORE truncated PIV": b"\x09",
            "OSCORE truncated ID Context": b"\x19\x00\x08",
            "OSCORE unknown kid": b"\x09\x00" + b"\xde\xad\xbe\xef",
            "OSCORE unknown kid + ID Context": b"\x19\x00\x08" + ctx8 + b"\xde\xad\xbe\xef",
            "OSCORE known kid, no ID Context": b"\x09\x00" + kid,
            "OSCORE known kid, garbage ciphertext": b"\x19\x00\x08" + ctx8 + kid,
        }
        for name, value in oscore_options.items():
            for method in (POST, GET):
                yield add(f"{method.name} {name}", msg(method, (), bytes(9), oscore=value))
            yield add(f"POST {name}, no payload", msg(POST, (), oscore=value))
        # correctly protected by the device's key, with a new ID Context: the endpoint cannot
        # tell it from a replay until the Echo comes back (the handshake's first message)
        for path in (("devices", d), ("ingest", d), wkc):
            device = PersistentContext(
                cred,
                Sequence(0, lambda: None),
                sender_id=cred.sender_id,
                recipient_id=cred.recipient_id,
                id_context=secrets.token_bytes(8),
            )
            inner = msg(POST if path[0] == "ingest" else GET, path)
            protected, _ = device.protect(inner)
            yield add(
                f"OSCORE, valid key, unverified ID Context: {inner.code.name} /{'/'.join(path)}",
                protected,
            )
    # a Uri-Path that is not UTF-8 (aiocoap cannot even decode it)
    yield Probe("CON GET non-UTF-8 Uri-Path", bytes([0x40, 0x01, 0, 0, 0xB2, 0xFF, 0xFE]))


def _send_probe(port: int, probe: Probe, mid: int) -> Answer:
    """Send one request from a fresh socket; every datagram back until it is quiet."""
    if isinstance(probe.message, bytes):
        data = probe.message[:2] + mid.to_bytes(2, "big") + probe.message[4:]
    else:
        probe.message.mid = mid
        probe.message.token = b""
        data = probe.message.encode()
    answer = Answer(probe.kind, len(data), [], [])
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((HOST, 0))
        sock.sendto(data, (HOST, port))
        wait = PROBE_FIRST_WAIT
        deadline = time.monotonic() + PROBE_FIRST_WAIT + PROBE_SEPARATE_WAIT
        while (left := min(wait, deadline - time.monotonic())) > 0:
            sock.settimeout(left)
            try:
                back = sock.recv(65536)
            except TimeoutError:
                break
            answer.responses.append(len(back))
            mtype, code = (back[0] >> 4) & 3, back[1] if len(back) > 1 else 0
            answer.codes.append(f"{code >> 5}.{code & 31:02d}")
            if mtype == 0 and len(back) >= 4:  # a CON answer: acknowledge it, as clients do
                sock.sendto(bytes([0x60, 0]) + back[2:4], (HOST, port))
            empty_ack = mtype == 2 and code == 0
            wait = PROBE_SEPARATE_WAIT if empty_ack else PROBE_QUIET
    return answer


def _amplification(port: int, cred: Credential) -> list[Answer]:
    return [_send_probe(port, p, 0x1000 + i) for i, p in enumerate(_probes(cred))]


# -- the bench ------------------------------------------------------------------------------------
def _fs_type(path: Path) -> str:
    proc = subprocess.run(["stat", "-f", "-c", "%T", str(path)], capture_output=True, text=True)
    return proc.stdout.strip() or "unknown"


def _check(ok: bool, text: str, missed: list[str], name: str) -> str:
    if not ok:
        missed.append(name)
    return text if ok else f"{text}; NOT MET"


def run(args: argparse.Namespace) -> Result:
    import logging

    # "none" warns at every open (once per drain here); the bench says it once, in its notes
    logging.getLogger("agent.sync.security").setLevel(logging.ERROR)
    n_clean = 5000 if args.quick else 20000
    n_lossy = 1000 if args.quick else 4000
    rounds = 1 if args.quick else 3
    fresh, steady = (10, 20) if args.quick else (20, 50)
    with workdir(args, "security") as wd:
        tmp = str(wd.path)
        root = Path(tmp)
        fs = _fs_type(root)
        with _Endpoint(root, secure=False) as plain_ep, _Endpoint(root, secure=True) as sec_ep:
            eps = (plain_ep, sec_ep)
            (root / "hs-plain").mkdir()
            (root / "hs-oscore").mkdir()
            hs_plain = asyncio.run(_handshakes(plain_ep, root / "hs-plain", fresh, steady))
            hs_oscore = asyncio.run(_handshakes(sec_ep, root / "hs-oscore", fresh, steady))
            high = _measure(eps, root, "high", n_clean, HIGH, Impairment(), rounds)
            low = _measure(eps, root, "low", n_clean, LOW, Impairment(), rounds)
            lossy = _measure(eps, root, "lossy", n_lossy, HIGH, LOSSY, rounds)
            answers = _amplification(sec_ep.port, Credential.read(sec_ep.credential))
    return wd.stamp(_report(root, fs, high, low, lossy, hs_plain, hs_oscore, answers))


def _report(
    root: Path,
    fs: str,
    high: Paired,
    low: Paired,
    lossy: Paired,
    hs_plain: Handshakes,
    hs_oscore: Handshakes,
    answers: list[Answer],
) -> Result:
    res = Result()
    missed: list[str] = []
    n_clean, n_lossy = high.plain[0].records, lossy.plain[0].records
    for label, p, n, name in (
        ("clean loopback", high, n_clean, "throughput_ratio"),
        ("5% loss + 100 ms each way", lossy, n_lossy, "throughput_ratio_lossy"),
        ("clean loopback, low level", low, n_clean, ""),
    ):
        res.add(
            f"records/s plain, {label}",
            f"{p.rate('plain'):,.0f}",
            f"{n} records, {p.runs} ({p.rates('plain')})",
        )
        ratio = f"{p.ratio:.3f}x plain"
        if name:
            ratio = _check(
                p.ratio >= THROUGHPUT_TARGET,
                f"{ratio} (target >= {THROUGHPUT_TARGET})",
                missed,
                name,
            )
        res.add(
            f"records/s OSCORE, {label}",
            f"{p.rate('oscore'):,.0f}",
            f"{ratio}; runs {p.rates('oscore')}",
        )
    res.add(
        "CPU ms per 1,000 records, OSCORE, clean (agent / endpoint)",
        f"{high.cpu_ms('oscore', 'agent'):.0f} / {high.cpu_ms('oscore', 'endpoint'):.0f}",
        f"plain {high.cpu_ms('plain', 'agent'):.0f} / {high.cpu_ms('plain', 'endpoint'):.0f}; "
        "agent: this process (uplink, store, linkem)",
    )
    for label, p, name in (("low", low, "bytes_ratio"), ("high", high, "")):
        d = p.plain[0]
        res.add(
            f"bytes/record plain, {label} level",
            f"{p.per_record('plain'):.2f}",
            f"{d.datagrams / d.records:.3f} datagrams/record; {d.stats.batches_sent} batches",
        )
        ratio = f"{p.bytes_ratio:.3f}x plain"
        if name:
            ratio = _check(
                p.bytes_ratio <= BYTES_TARGET, f"{ratio} (target <= {BYTES_TARGET})", missed, name
            )
        o = p.oscore[0]
        res.add(
            f"bytes/record OSCORE, {label} level",
            f"{p.per_record('oscore'):.2f}",
            f"{ratio}; {o.datagrams / o.records:.3f} datagrams/record; "
            f"{o.stats.batches_sent} batches",
        )
    res.add(
        "bytes/record OSCORE, lossy link (high level)",
        f"{lossy.per_record('oscore'):.2f}",
        f"{lossy.bytes_ratio:.3f}x plain ({lossy.per_record('plain'):.2f}); retransmitted "
        f"batches {lossy.plain[0].stats.retransmitted} plain, {lossy.oscore[0].stats.retransmitted}"
        " OSCORE",
    )
    res.add(
        "handshake_ms (fresh device to first 2.05)",
        f"{hs_oscore.median('first_ms'):.1f}",
        f"plain fresh device {hs_plain.median('first_ms'):.1f} ms; median of "
        f"{len(hs_oscore.first_ms)}; datagrams {statistics.median(hs_oscore.first_datagrams):.0f}"
        f" vs {statistics.median(hs_plain.first_datagrams):.0f}; of it ClientSecurity.open "
        f"{hs_oscore.median('open_ms'):.1f} ms",
    )
    res.add(
        "request round trip, steady state, OSCORE (ms)",
        f"{hs_oscore.median('steady_ms'):.2f}",
        f"plain {hs_plain.median('steady_ms'):.2f} ms "
        f"({hs_oscore.median('steady_ms') / hs_plain.median('steady_ms'):.2f}x); median of "
        f"{len(hs_oscore.steady_ms)} GETs of desired state",
    )
    worst = max(answers, key=lambda a: a.worst)
    worst_total = max(answers, key=lambda a: a.total)
    over = [a for a in answers if a.worst > AMPLIFICATION_LIMIT]
    silent = sum(1 for a in answers if not a.responses)
    res.add(
        "amplification_max (response/request datagram)",
        f"{worst.worst:.2f}",
        _check(
            worst.worst <= AMPLIFICATION_LIMIT,
            f"limit {AMPLIFICATION_LIMIT}; {worst.kind}: {worst.request} B -> "
            f"{max(worst.responses)} B ({', '.join(worst.codes)}); {len(over)} of "
            f"{len(answers)} kinds above the limit",
            missed,
            "amplification_max",
        ),
    )
    res.add(
        "amplification, all datagrams of one request",
        f"{worst_total.total:.2f}",
        f"{worst_total.kind} ({', '.join(worst_total.codes)}); {silent} kinds got no answer",
    )
    res.notes.append(f"ran in {root} (filesystem: {fs}); stores and OSCORE state files live there")
    res.notes.append(
        "Endpoints: edge-agent-cloud serve in their own processes (plain: --insecure, "
        "allow_plain=True; secure: OSCORE only); the uplink in this process, 8 lanes, through "
        "linkem (clean: counts the bytes; lossy: 5 % loss, 100 ms delay each way). Levels: the "
        "link policy's defaults, put in force by LinkMonitor (high: SenML-CBOR 64 KiB batches; "
        "low: compact + deflate + dictionary, 1 KiB batches)."
    )
    res.notes.append(
        f"Amplification: {len(answers)} kinds of unauthenticated request (CON and NON, empty "
        "token: the worst case), each from a fresh UDP socket straight to the secure endpoint; "
        "a ratio is one response datagram's bytes over the request datagram's (UDP payloads)."
    )
    for a in sorted(over, key=lambda a: -a.worst)[:12]:
        res.notes.append(
            f"  above {AMPLIFICATION_LIMIT}x: {a.kind}: {a.request} B -> "
            f"{'+'.join(map(str, a.responses))} B ({', '.join(a.codes)}) = {a.worst:.2f}x"
        )
    if len(over) > 12:
        res.notes.append(f"  ... and {len(over) - 12} more kinds above {AMPLIFICATION_LIMIT}x")
    res.notes.append("Targets NOT MET: " + ", ".join(missed) if missed else "All targets met.")
    res.summary = {
        "records_per_s_plain": round(high.rate("plain"), 1),
        "records_per_s_oscore": round(high.rate("oscore"), 1),
        "throughput_ratio": round(high.ratio, 3),
        "records_per_s_plain_lossy": round(lossy.rate("plain"), 1),
        "records_per_s_oscore_lossy": round(lossy.rate("oscore"), 1),
        "throughput_ratio_lossy": round(lossy.ratio, 3),
        "records_per_s_plain_low": round(low.rate("plain"), 1),
        "records_per_s_oscore_low": round(low.rate("oscore"), 1),
        "bytes_per_record_plain": round(low.per_record("plain"), 2),
        "bytes_per_record_oscore": round(low.per_record("oscore"), 2),
        "bytes_ratio": round(low.bytes_ratio, 3),
        "bytes_per_record_plain_high": round(high.per_record("plain"), 2),
        "bytes_per_record_oscore_high": round(high.per_record("oscore"), 2),
        "bytes_ratio_high": round(high.bytes_ratio, 3),
        "cpu_ms_per_1000_agent_plain": round(high.cpu_ms("plain", "agent"), 1),
        "cpu_ms_per_1000_agent_oscore": round(high.cpu_ms("oscore", "agent"), 1),
        "cpu_ms_per_1000_endpoint_plain": round(high.cpu_ms("plain", "endpoint"), 1),
        "cpu_ms_per_1000_endpoint_oscore": round(high.cpu_ms("oscore", "endpoint"), 1),
        "handshake_ms": round(hs_oscore.median("first_ms"), 1),
        "handshake_ms_plain": round(hs_plain.median("first_ms"), 1),
        "request_rtt_ms_oscore": round(hs_oscore.median("steady_ms"), 2),
        "request_rtt_ms_plain": round(hs_plain.median("steady_ms"), 2),
        "amplification_max": round(worst.worst, 2),
        "amplification_kind": worst.kind,
        "amplification_kinds_over_limit": len(over),
        "filesystem": fs,
        "targets_missed": missed,
    }
    return res
