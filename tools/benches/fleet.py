"""Fleet ingest: simulated devices (tools/fleet.py: real wire format, real OSCORE) posting to the
endpoint on PostgreSQL with 1, 2 and 4 processes, and the same load on one SQLite process, in
one run; every acknowledged record checked stored exactly once.

Issue target: 10,000 devices, a batch of 10 readings every 10 s each (1,000 requests/s, 10,000
records/s) with ``ack_p99_ms`` <= 200 and nothing lost. On this machine the simulator and the
endpoint share the same cores, so besides what was sustained the bench reports what the endpoint
used: ``records_per_s_per_core`` is records per second per core of endpoint CPU (its processes
together, over the steady window), the figure that scales to a machine of its own. The same full
load runs once more on PostgreSQL x2 with ``serve --no-fast-path`` (every request through
aiocoap's generic path): ``fast_path_cpu_ratio`` is the endpoint's CPU per request with the short
way for ingest (cloud/fastpath.py) over that.

Options after the name: ``--devices N --interval S --batch N --duration S --warmup S
--processes 1,2,4``; ``--quick`` runs a small fleet (300 devices, 15 s) for a smoke run.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from benches import Result
from benches import workdir as bench_workdir

MEASURES = (
    "endpoint ingest from simulated devices (real OSCORE): records/s, ack p99 and records/s per"
    " endpoint core on PostgreSQL with 1, 2, 4 processes"
)
BASELINE = (
    "the same load on one SQLite endpoint process; and on PostgreSQL x2 with every request"
    " through aiocoap's generic path (serve --no-fast-path)"
)

TARGET_DEVICES = 10_000  # the load: 10,000 devices, 10 readings each every 10 s
TOOLS = Path(__file__).resolve().parents[1]
ROOT = TOOLS.parent


def _options(args: argparse.Namespace) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bench fleet")
    parser.add_argument("--devices", type=int, default=300 if args.quick else 10_000)
    parser.add_argument("--interval", type=float, default=10.0)
    parser.add_argument("--batch", type=int, default=10)
    # the steady window starts once the fleet's cold start is over: every device's first
    # request goes through the Echo round trip within the first interval
    parser.add_argument("--duration", type=float, default=15.0 if args.quick else 70.0)
    parser.add_argument("--warmup", type=float, default=5.0 if args.quick else 30.0)
    parser.add_argument("--processes", default="1,2" if args.quick else "1,2,4")
    parser.add_argument("--sim-processes", type=int, default=2)
    parser.add_argument(
        "--light-devices",
        type=int,
        default=150 if args.quick else 4_000,
        help="a second PostgreSQL run with this many devices: the latency below saturation",
    )
    parser.add_argument("--dir", help="where the SQLite files go (default: a temporary directory)")
    return parser.parse_args(args.extra)


def _pg_tree_cpu(cluster: Any) -> float:
    from fleet import tree_cpu

    pid_file = cluster.data / "postmaster.pid"
    pid = int(pid_file.read_text().split()[0])
    return sum(tree_cpu(pid).values())


async def _one(
    opts: argparse.Namespace,
    workdir: Path,
    name: str,
    storage: str | None,
    processes: int,
    devices: int | None = None,
    fast_path: bool = True,
) -> dict[str, Any]:
    """Provision a fresh storage, start the endpoint, run the fleet, verify, stop."""
    opts = argparse.Namespace(**{**vars(opts), "devices": devices or opts.devices})
    from fleet import EndpointProcess, FleetConfig, run_fleet
    from fleetlib.provision import provision
    from fleetlib.report import verify

    from cloud.storage import open_storage

    data = workdir / name
    data.mkdir(parents=True)
    spec = storage or f"sqlite:{data}"
    store = open_storage(spec)
    try:
        started = time.perf_counter()
        creds = provision(store, opts.devices, "fleet")
        provision_s = time.perf_counter() - started
    finally:
        store.close()
    endpoint = EndpointProcess(
        data, insecure=False, storage=storage, processes=processes, fast_path=fast_path
    )
    await endpoint.start()
    assert endpoint.proc is not None
    config = FleetConfig(
        target=endpoint.uri,
        devices=opts.devices,
        processes=opts.sim_processes,
        interval=opts.interval,
        batch=opts.batch,
        duration=opts.duration,
        warmup=opts.warmup,
        credentials=tuple(creds),
        endpoint_pid=endpoint.proc.pid,
        seed=1,
    )
    try:
        report = await run_fleet(replace(config))
    finally:
        await endpoint.stop()
    store = open_storage(spec)
    try:
        checked = verify(store, report)
    finally:
        store.close()
    cpu = (report.endpoint or {}).get("cpu_s_window") or 0.0
    cores = cpu / report.window_s if report.window_s else 0.0
    return {
        "name": name,
        "devices": opts.devices,
        "storage": "postgresql" if storage else "sqlite",
        "processes": processes,
        "fast_path": fast_path,
        "records_per_s": round(report.records_per_s, 1),
        "requests_per_s": round(report.requests_per_s, 1),
        "ack_p50_ms": report.ack_p50_ms,
        "ack_p99_ms": report.ack_p99_ms,
        "retransmissions": report.retransmissions,
        "timeouts": report.timeouts,
        "endpoint_cores": round(cores, 3),
        "records_per_s_per_core": round(report.records_per_s / cores, 1) if cores else None,
        "endpoint_cpu_ms_per_request": (report.endpoint or {}).get("cpu_ms_per_request"),
        "lost": checked.lost,
        "duplicated": checked.duplicated,
        "stored_unacked": checked.stored_unacked,
        "provision_s": round(provision_s, 1),
        "window_s": report.window_s,
    }


async def _all(opts: argparse.Namespace, workdir: Path) -> tuple[list[dict[str, Any]], float]:
    import psycopg
    from pgcluster import Cluster

    runs: list[dict[str, Any]] = []
    with Cluster() as cluster:  # its own directory, which the postgres user may enter
        pg_cpu = 0.0
        plan = [(n, None, True) for n in (int(x) for x in opts.processes.split(","))]
        plan.append((2, opts.light_devices, True))
        plan.append((2, None, False))  # the same load, every request through aiocoap's path
        for n, devices, fast in plan:
            db = f"fleet_p{n}_{devices or opts.devices}" + ("" if fast else "_aiocoap")
            with psycopg.connect(cluster.dsn(), autocommit=True) as admin:
                admin.execute(f'CREATE DATABASE "{db}"')
            before = _pg_tree_cpu(cluster)
            name = f"pg-{n}" + (f"-{devices}" if devices else "") + ("" if fast else "-aiocoap")
            runs.append(await _one(opts, workdir, name, cluster.dsn(db), n, devices, fast))
            used = _pg_tree_cpu(cluster) - before
            runs[-1]["postgres_cpu_s"] = round(used, 1)
            pg_cpu += used
    runs.append(await _one(opts, workdir, "sqlite-1", None, 1))
    return runs, pg_cpu


def run(args: argparse.Namespace) -> Result:
    opts = _options(args)
    with bench_workdir(opts, "fleet") as where:
        started = time.perf_counter()
        runs, _ = asyncio.run(_all(opts, where.path))
        elapsed = time.perf_counter() - started
    sqlite = runs[-1]
    light, generic = runs[-3], runs[-2]
    pg_runs = [r for r in runs if r["storage"] == "postgresql" and r not in (light, generic)]
    clean = [r for r in pg_runs if r["lost"] == 0 and r["duplicated"] == 0] or pg_runs
    offered = opts.devices * opts.batch / opts.interval
    # the best run kept up with the load (a run still draining its cold start's backlog in the
    # window stores more than is offered: not a better run), then has the lowest ack p99
    best = min(
        clean,
        key=lambda r: (
            r["records_per_s"] < 0.99 * offered,
            r["ack_p99_ms"] if r["ack_p99_ms"] is not None else float("inf"),
        ),
    )
    met = (
        opts.devices >= TARGET_DEVICES
        and best["records_per_s"] >= 0.99 * offered
        and best["ack_p99_ms"] is not None
        and best["ack_p99_ms"] <= 200
        and all(r["lost"] == 0 for r in runs)
    )
    result = Result()
    result.add(
        "devices", str(opts.devices), f"each a batch of {opts.batch} every {opts.interval:g} s"
    )
    result.add("offered records/s", f"{offered:.0f}", f"{offered / opts.batch:.0f} requests/s")
    for r in runs:
        label = f"{r['storage']} x{r['processes']}"
        if r is light:
            label += f", {r['devices']} devices"
        if not r["fast_path"]:
            label += ", aiocoap path"
        load = r["devices"] * opts.batch / opts.interval
        result.add(
            f"{label}: records/s sustained",
            f"{r['records_per_s']:.0f}",
            f"{r['records_per_s'] / load:.2f} of offered ({load:.0f})",
        )
        result.add(
            f"{label}: ack p50 / p99 ms",
            f"{r['ack_p50_ms']} / {r['ack_p99_ms']}",
            "target p99 <= 200",
        )
        result.add(
            f"{label}: endpoint cores, records/s per core",
            f"{r['endpoint_cores']:.2f}, {r['records_per_s_per_core']}",
            f"{r['endpoint_cpu_ms_per_request']} ms CPU per request",
        )
        result.add(
            f"{label}: lost / duplicated / retransmissions",
            f"{r['lost']} / {r['duplicated']} / {r['retransmissions']}",
            f"stored unacked {r['stored_unacked']}",
        )
    ratio = best["records_per_s"] / sqlite["records_per_s"] if sqlite["records_per_s"] else None
    per_core = (
        best["records_per_s_per_core"] / sqlite["records_per_s_per_core"]
        if best["records_per_s_per_core"] and sqlite["records_per_s_per_core"]
        else None
    )
    fast = next(r for r in pg_runs if r["processes"] == generic["processes"])
    cpu_ratio = (
        fast["endpoint_cpu_ms_per_request"] / generic["endpoint_cpu_ms_per_request"]
        if fast["endpoint_cpu_ms_per_request"] and generic["endpoint_cpu_ms_per_request"]
        else None
    )
    result.add(
        f"postgresql x{fast['processes']}: CPU per request, short way / aiocoap path",
        f"{cpu_ratio:.3f}" if cpu_ratio else "-",
        f"{fast['endpoint_cpu_ms_per_request']} / {generic['endpoint_cpu_ms_per_request']} ms"
        " (cloud/fastpath.py)",
    )
    result.add(
        "best postgresql vs sqlite x1: records/s, per core",
        f"{ratio:.2f}, {per_core:.2f}" if ratio and per_core else "-",
        f"postgresql x{best['processes']} (below both capacities the first is 1)",
    )
    result.add(
        "target met",
        str(met).lower(),
        "10,000 devices: 10,000 records/s, p99 <= 200 ms, nothing lost"
        + ("" if opts.devices >= TARGET_DEVICES else " (not this load)"),
    )
    result.notes.append(
        f"(the simulator ran {opts.sim_processes} processes on the same {os.cpu_count()} cores; "
        f"{elapsed:.0f} s; the SQLite files and each endpoint's --data in the directory below, "
        "PostgreSQL in its own cluster directory on the system temp directory)"
    )
    result.summary = {
        "devices": opts.devices,
        "batch_interval_s": opts.interval,
        "batch_size": opts.batch,
        "offered_records_per_s": offered,
        "records_per_s": best["records_per_s"],
        "records_per_s_per_core": best["records_per_s_per_core"],
        "ack_p99_ms": best["ack_p99_ms"],
        "lost": sum(r["lost"] for r in runs),
        "duplicated": sum(r["duplicated"] for r in runs),
        "processes": best["processes"],
        "storage": "postgresql",
        "ratio_vs_sqlite": round(ratio, 3) if ratio else None,
        "per_core_ratio_vs_sqlite": round(per_core, 3) if per_core else None,
        "target_met": met,
        "fast_path_cpu_ratio": round(cpu_ratio, 3) if cpu_ratio else None,
        "scaling": {
            f"{r['storage']}_x{r['processes']}": r for r in runs if r not in (light, generic)
        },
        "light_load": light,
        "aiocoap_path": generic,
        "cores": os.cpu_count(),
    }
    return where.stamp(result)


if __name__ == "__main__":
    sys.exit("run it through ./tools/dev bench fleet")
