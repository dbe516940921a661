"""Bench of link utilization: goodput of the uplink draining a backlog over a thin, lossy link.

Two network namespaces joined by a veth pair, each end shaped by ``tc tbf`` at 256 kbit/s; in the
endpoint's namespace the reference endpoint (``edge-agent-cloud serve``) behind the link impairment
proxy (tools/linkem.py: 50 ms delay and 2 % loss each way, so 100 ms RTT on top of the shaping);
in the device's namespace an uplink drains a pre-filled durable queue (telemetry records, one
2-channel reading each). Each side runs as its own process under ``ip netns exec``.

Measured side by side in one run, each from a fresh queue:

- ours: the uplink as configured by default (up to 8 confirmable exchanges in flight, AIMD);
- stop-and-wait: the same uplink with ``max_inflight = 1``, CoAP's one exchange at a time.

Goodput is the encoded batch bytes the endpoint acknowledged per second (CoAP, UDP, IP and
Ethernet headers and retransmissions not counted), as a share of the 256 kbit/s link rate. The
backlog is 10 MB of stored records (``--quick``: 1 MB); stop-and-wait drains 512 kB (``--quick``:
128 kB), enough for a rate. Needs root (namespaces, tc); everything is removed on exit.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

MEASURES = (
    "uplink goodput draining a backlog over 256 kbit/s, 100 ms RTT, 2 % loss (network "
    "namespaces, tc; needs root)"
)
BASELINE = "the same uplink stop-and-wait (max_inflight = 1), same link, same run"

ROOT = Path(__file__).resolve().parents[2]
if __name__ == "__main__":  # the agent side, run inside its namespace
    sys.path[:0] = [str(ROOT), str(ROOT / "tools")]

from benches import Result, workdir  # noqa: E402

DEVICE = "bench-link-01"
RATE_BITS = 256_000
NET = "10.231.0"
SRV_IP, DEV_IP = f"{NET}.1", f"{NET}.2"
SERVER_PORT, PROXY_PORT = 5683, 5684
DELAY = "50ms"  # each way: 100 ms RTT
LOSS = "2%"  # each way
TBF = ["rate", "256kbit", "burst", "2kb", "latency", "400ms"]
SETUP_TIMEOUT = 20.0


def _run(*cmd: str) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {proc.stderr.strip() or proc.returncode}")


class Namespaces:
    """The two namespaces, the veth pair and the shaping; removed on exit whatever happened."""

    def __init__(self) -> None:
        tag = f"{os.getpid() % 100000}"
        self.srv, self.dev = f"ea-srv-{tag}", f"ea-dev-{tag}"
        self.veth_srv, self.veth_dev = f"eas{tag}", f"ead{tag}"

    def __enter__(self) -> Namespaces:
        if os.geteuid() != 0:
            raise RuntimeError("bench link needs root (ip netns, tc)")
        try:
            _run("ip", "netns", "add", self.srv)
            _run("ip", "netns", "add", self.dev)
            _run("ip", "link", "add", self.veth_srv, "type", "veth", "peer", "name", self.veth_dev)
            for ns, veth, ip in (
                (self.srv, self.veth_srv, SRV_IP),
                (self.dev, self.veth_dev, DEV_IP),
            ):
                _run("ip", "link", "set", veth, "netns", ns)
                _run("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", veth)
                _run("ip", "-n", ns, "link", "set", veth, "up")
                _run("ip", "-n", ns, "link", "set", "lo", "up")
                _run(
                    "ip",
                    "netns",
                    "exec",
                    ns,
                    "tc",
                    "qdisc",
                    "add",
                    "dev",
                    veth,
                    "root",
                    "tbf",
                    *TBF,
                )
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        for ns in (self.srv, self.dev):  # deleting a namespace deletes the veth end in it
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        subprocess.run(["ip", "link", "del", self.veth_srv], capture_output=True)

    def popen(self, ns: str, *cmd: str, **kw) -> subprocess.Popen:
        env = {**os.environ, "PYTHONPATH": f"{ROOT}:{ROOT / 'tools'}", "PYTHONUNBUFFERED": "1"}
        return subprocess.Popen(["ip", "netns", "exec", ns, *cmd], cwd=ROOT, env=env, **kw)


def _records(n_bytes: int) -> list:
    from agent.store.queue import NewRecord
    from agent.wire.records import Kind, TelemetryBody

    t0 = 1_700_000_000.0
    rng = random.Random(7)
    out, total, i = [], 0, 0
    while total < n_bytes:
        body = TelemetryBody(
            "motor", t0 + i, {"current_a": round(2.4 + rng.gauss(0, 0.2), 4), "supply_v": 229.1}
        ).to_cbor()
        out.append(NewRecord(Kind.TELEMETRY, body, created=t0 + i))
        total += len(body)
        i += 1
    return out


async def _prefill(path: Path, n_bytes: int) -> int:
    from agent.store.queue import Store
    from agent.store.settings import StoreSettings

    store = await Store.open(StoreSettings(path=path, budget_bytes=1 << 30))
    try:
        records = _records(n_bytes)
        for i in range(0, len(records), 5000):
            await store.put(records[i : i + 5000])
        return len(records)
    finally:
        await store.close()


# -- the agent side (inside the device namespace) ------------------------------------------------
async def _drain(store_path: Path, uri: str, max_inflight: int) -> dict:
    from agent.store.queue import Store
    from agent.store.settings import StoreSettings
    from agent.sync.transport import CoapTransport, Endpoints
    from agent.sync.uplink import Exchange, Uplink, UplinkSettings
    from drivers.clock import RealClock

    clock = RealClock()
    store = await Store.open(StoreSettings(path=store_path, budget_bytes=1 << 30))
    settings = UplinkSettings(
        endpoints=(uri,), max_inflight=max_inflight, backoff_base=0.05, backoff_max=2.0
    )
    good = {"bytes": 0, "exchanges": 0, "lost": 0}

    def on_exchange(ex: Exchange) -> None:
        good["exchanges"] += 1
        if not ex.ok or ex.retransmitted:
            good["lost"] += 1
        if ex.ok and ex.records:
            good["bytes"] += ex.bytes_sent * ex.delivered // ex.records

    transport = CoapTransport(clock, lanes=max_inflight)
    uplink = Uplink(
        settings,
        store,
        transport,
        Endpoints(settings.endpoints, clock),
        clock,
        device_id=DEVICE,
        on_exchange=on_exchange,
        rng=random.Random(1),
    )
    started = time.perf_counter()
    task = asyncio.create_task(uplink.run())
    try:
        while (await store.stats()).depth:  # noqa: ASYNC110 - the store is polled
            await asyncio.sleep(0.05)
        elapsed = time.perf_counter() - started
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await transport.close()
        await store.close()
    st = uplink.stats
    return {
        "elapsed": elapsed,
        "goodput_bytes": good["bytes"],
        "exchanges": good["exchanges"],
        "exchanges_lost": good["lost"],
        "bytes_sent": st.bytes_sent,
        "records": st.records_acked,
        "srtt": uplink.rtt.srtt,
        "window": uplink.window,
    }


def _agent_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--store", required=True, type=Path)
    p.add_argument("--uri", required=True)
    p.add_argument("--max-inflight", type=int, required=True)
    a = p.parse_args(argv)
    print(json.dumps(asyncio.run(_drain(a.store, a.uri, a.max_inflight))), flush=True)
    return 0


# -- the bench -----------------------------------------------------------------------------------
def _wait_udp_listen(ns: Namespaces, port: int) -> None:
    deadline = time.monotonic() + SETUP_TIMEOUT
    while time.monotonic() < deadline:
        out = subprocess.run(
            ["ip", "netns", "exec", ns.srv, "ss", "-uln"], capture_output=True, text=True
        ).stdout
        if f":{port} " in out:
            return
        time.sleep(0.2)
    raise RuntimeError(f"nothing listens on udp port {port} in {ns.srv}")


def _tx_bytes(ns: Namespaces) -> int:
    out = subprocess.run(
        ["ip", "netns", "exec", ns.dev, "cat", f"/sys/class/net/{ns.veth_dev}/statistics/tx_bytes"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return int(out.strip())


def _measure(ns: Namespaces, workdir: Path, n_bytes: int, max_inflight: int) -> dict:
    store = workdir / f"queue-{max_inflight}.db"
    n = asyncio.run(_prefill(store, n_bytes))
    tx0 = _tx_bytes(ns)
    proc = ns.popen(
        ns.dev,
        sys.executable,
        str(Path(__file__).resolve()),
        "--store",
        str(store),
        "--uri",
        f"coap://{SRV_IP}:{PROXY_PORT}",
        "--max-inflight",
        str(max_inflight),
        stdout=subprocess.PIPE,
        text=True,
    )
    # four times the time the backlog takes at the full link rate, at the least
    limit = 120 + 4 * n_bytes * 8 / RATE_BITS
    try:
        out, _ = proc.communicate(timeout=limit)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise RuntimeError(
            f"the agent side did not drain the backlog within {limit:.0f} s"
        ) from None
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if proc.returncode != 0:
        raise RuntimeError(f"agent side exited {proc.returncode}")
    result = json.loads(out.strip().splitlines()[-1])
    result["link_bytes"] = _tx_bytes(ns) - tx0
    result["stored_records"] = n
    result["stored_bytes"] = n_bytes
    result["goodput_bps"] = result["goodput_bytes"] * 8 / result["elapsed"]
    return result


def run(args: argparse.Namespace) -> Result:
    backlog = (1 if args.quick else 10) * 1_000_000
    saw_backlog = (128 if args.quick else 512) * 1000
    with workdir(args, "link") as wd, Namespaces() as ns:
        tmp = str(wd.path)
        tmp_path = Path(tmp)
        cloud = tmp_path / "cloud"
        subprocess.run(
            [sys.executable, "-m", "cloud.cli", "devices", "add", "--data", str(cloud), DEVICE],
            check=True,
            capture_output=True,
            cwd=ROOT,
        )
        procs = [
            ns.popen(
                ns.srv,
                sys.executable,
                "-m",
                "cloud.cli",
                "serve",
                "--listen",
                f"{SRV_IP}:{SERVER_PORT}",
                "--data",
                str(cloud),
                "--insecure",  # plain CoAP measured here; bench security compares OSCORE
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            ),
            ns.popen(
                ns.srv,
                sys.executable,
                str(ROOT / "tools" / "linkem.py"),
                "run",
                "--listen",
                f"{SRV_IP}:{PROXY_PORT}",
                "--target",
                f"{SRV_IP}:{SERVER_PORT}",
                "--delay",
                DELAY,
                "--loss",
                LOSS,
                "--seed",
                "1",
                "--stats",
                "0",
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            ),
        ]
        try:
            _wait_udp_listen(ns, SERVER_PORT)
            _wait_udp_listen(ns, PROXY_PORT)
            ours = _measure(ns, tmp_path, backlog, 8)
            saw = _measure(ns, tmp_path, saw_backlog, 1)
        finally:
            for p in procs:
                p.terminate()
            for p in procs:
                try:
                    p.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    p.kill()
    ratio = ours["goodput_bps"] / RATE_BITS
    saw_ratio = saw["goodput_bps"] / RATE_BITS
    res = Result()
    res.add(
        "goodput, up to 8 exchanges in flight",
        f"{ours['goodput_bps'] / 1000:.1f} kbit/s",
        f"{ratio:.1%} of 256 kbit/s; {ours['stored_bytes'] / 1e6:.0f} MB backlog in "
        f"{ours['elapsed']:.0f} s",
    )
    res.add(
        "goodput, stop-and-wait (1 in flight)",
        f"{saw['goodput_bps'] / 1000:.1f} kbit/s",
        f"{saw_ratio:.1%} of 256 kbit/s; ours is {ratio / saw_ratio:.1f}x",
    )
    for name, r in (("ours", ours), ("stop-and-wait", saw)):
        res.add(
            f"exchanges retransmitted or lost, {name}",
            f"{r['exchanges_lost'] / max(1, r['exchanges']):.1%}",
            f"{r['exchanges']} exchanges; link bytes "
            f"{r['link_bytes'] / max(1, r['goodput_bytes']):.2f}x the acknowledged bytes",
        )
    res.notes.append(
        "veth pair between two namespaces, tbf 256 kbit/s (burst 2 kB, latency 400 ms) on both "
        f"ends; linkem {DELAY} delay and {LOSS} loss each way; endpoint and proxy in one "
        "namespace, the uplink in the other; SenML-CBOR batches of one datagram (1 KiB). "
        "Link bytes: what the device's veth end sent (Ethernet frames, retransmissions included)."
    )
    res.summary = {
        "goodput_ratio": round(ratio, 3),
        "goodput_ratio_stop_and_wait": round(saw_ratio, 3),
        "goodput_kbps": round(ours["goodput_bps"] / 1000, 1),
        "backlog_bytes": backlog,
    }
    return wd.stamp(res)


if __name__ == "__main__":
    sys.exit(_agent_main(sys.argv[1:]))
