"""The ``edge-agent`` command line.

edge-agent check-config FILE          validate a config file (exit 78 when it is bad)
edge-agent run --config FILE          run the agent (--simulate pump|skab: on simulated parts)
edge-agent selftest --config FILE     probe every sensor once and print a table
edge-agent demo                       the reference rig on simulated parts, live readings
edge-agent plan --profile FILE        cost of edge-only, cloud-only and hybrid inference
edge-agent models [--config FILE]     cached models: size, last use, pin, signature status
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent import __version__, logsetup
from agent.errors import AgentError, ConfigError, DriverError
from drivers.clock import Clock, RealClock, ScaledClock

if TYPE_CHECKING:
    from agent.service import config as configmod

EX_OK = 0
EX_FAIL = 1
EX_USAGE = 64
EX_UNAVAILABLE = 69
EX_NOPERM = 77
EX_CONFIG = 78  # sysexits.h: configuration error (as agent.service.config.EX_CONFIG)

log = logging.getLogger("agent.service.cli")


def _load(path: str | Path) -> configmod.Config:
    from agent.service import config as configmod

    return configmod.load(path)


def load_config(args: argparse.Namespace) -> configmod.Config:
    from agent.service import config as configmod

    cfg = _load(args.config)
    sim = configmod.simulation_from_args(args)
    if sim is not None:
        cfg = configmod.simulated(cfg, sim)
    if getattr(args, "data_dir", None):
        cfg = configmod.replace_data_dir(cfg, Path(args.data_dir).resolve())
    return cfg


def _rig(cfg: configmod.Config, clock: Clock) -> Any:
    if not any(s.simulated for s in cfg.sensors):
        return None
    from agent.sense.simrig import SimRig

    return SimRig(cfg, clock)


# ---------------------------------------------------------------------------------------------
def cmd_check_config(args: argparse.Namespace) -> int:
    cfg = _load(args.file)
    print(f"{args.file}: ok ({len(cfg.sensors)} sensors: {', '.join(s.name for s in cfg.sensors)})")
    return EX_OK


def cmd_run(args: argparse.Namespace) -> int:
    from agent.service.cpu import pin_to_one_cpu
    from agent.service.runtime import Agent

    cfg = load_config(args)
    logsetup.setup(args.log_level or cfg.agent.log_level)

    if args.time_scale != 1.0 and not args.simulate:
        raise ConfigError("--time-scale", "", "only with --simulate (real parts run in real time)")
    if cfg.agent.cpu_affinity == "single":  # before any thread starts: they inherit it
        pin_to_one_cpu()

    async def main() -> None:
        clock = ScaledClock(args.time_scale) if args.time_scale != 1.0 else RealClock()
        rig = _rig(cfg, clock)
        try:
            await Agent(cfg, clock=clock, rig=rig).run()
        finally:
            if rig is not None:
                rig.close()

    asyncio.run(main())
    return EX_OK


async def selftest(cfg: configmod.Config, clock: Clock, rig: Any = None) -> list[dict[str, Any]]:
    """Probe every sensor: open (identity check) and one read. Returns one row per sensor."""
    from agent.sense.hardware import Hardware
    from agent.sense.sampling import scale_values

    hardware = Hardware(cfg, clock, rig)
    rows: list[dict[str, Any]] = []
    try:
        for scfg in cfg.sensors:
            row: dict[str, Any] = {
                "sensor": scfg.name,
                "driver": scfg.driver,
                "location": scfg.location,
                "required": scfg.required,
                "identity": "",
                "values": {},
                "latency_ms": None,
                "ok": False,
                "error": "",
            }
            started = time.perf_counter()
            driver = None
            try:
                opening = hardware.driver(scfg)
                identity = await opening.open()
                driver = opening  # opened: close it afterwards
                row["identity"] = identity.detail
                row["values"] = scale_values(scfg, await driver.read(), driver)
                row["ok"] = True
            except DriverError as err:
                row["error"] = str(err)
            finally:
                row["latency_ms"] = (time.perf_counter() - started) * 1000
                if driver is not None:
                    try:
                        await driver.close()
                    except DriverError as err:
                        log.warning("sensor=%s event=close_failed error=%r", scfg.name, str(err))
            rows.append(row)
    finally:
        hardware.close()
    return rows


def format_selftest(rows: list[dict[str, Any]]) -> str:
    table = [("sensor", "driver", "bus/address", "identity", "value", "latency", "result")]
    for r in rows:
        value = ", ".join(f"{k}={v:.5g}" for k, v in r["values"].items())
        if r["ok"]:
            result = "ok"
        else:
            result = ("FAIL: " if r["required"] else "warn: ") + r["error"]
        table.append(
            (
                r["sensor"],
                r["driver"],
                r["location"],
                r["identity"] or "-",
                value or "-",
                f"{r['latency_ms']:.1f} ms",
                result,
            )
        )
    widths = [max(len(row[i]) for row in table) for i in range(6)]
    lines = []
    for row in table:
        lines.append(
            "  ".join(c.ljust(w) for c, w in zip(row[:6], widths, strict=True)) + "  " + row[6]
        )
    return "\n".join(lines)


def cmd_selftest(args: argparse.Namespace) -> int:
    cfg = load_config(args)
    logsetup.setup("warning")

    async def main() -> list[dict[str, Any]]:
        clock = RealClock()
        rig = _rig(cfg, clock)
        try:
            return await selftest(cfg, clock, rig)
        finally:
            if rig is not None:
                rig.close()

    rows = asyncio.run(main())
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print(format_selftest(rows))
    failed = [r for r in rows if r["required"] and not r["ok"]]
    return EX_FAIL if failed else EX_OK


def cmd_queue(args: argparse.Namespace) -> int:
    from agent.store.report import queue_report

    cfg = _load(args.config)
    print(asyncio.run(queue_report(cfg.store, as_json=args.json)))
    return EX_OK


def _status_socket(args: argparse.Namespace) -> Path:
    from agent.service.status import SOCKET_NAME, socket_path

    if args.socket:
        return Path(args.socket)
    system = Path("/run/edge-agent") / SOCKET_NAME  # RuntimeDirectory of the systemd unit
    if args.config:
        local = socket_path(_load(args.config).agent.data_dir)
        return local if local.exists() or not system.exists() else system
    return system


def cmd_status(args: argparse.Namespace) -> int:
    from agent.service.status import format_status, query

    path = _status_socket(args)
    try:
        doc = query(path)
    except (FileNotFoundError, ConnectionRefusedError):
        print(f"edge-agent status: no agent is running ({path} does not answer)", file=sys.stderr)
        return EX_UNAVAILABLE
    except PermissionError:
        print(
            f"edge-agent status: {path}: permission denied (join group edge-agent)", file=sys.stderr
        )
        return EX_NOPERM
    except (OSError, ValueError) as err:
        print(f"edge-agent status: {path}: {err}", file=sys.stderr)
        return EX_FAIL
    print(json.dumps(doc, indent=2, sort_keys=True) if args.json else format_status(doc))
    return EX_OK


def format_models(rows: list[dict[str, Any]]) -> str:
    def when(t: float | None) -> str:
        if t is None:
            return "-"
        return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))

    table = [("model", "version", "source", "bytes", "last use", "pin", "signature")]
    for r in rows:
        table.append(
            (
                r["name"],
                r["version"],
                r["source"],
                str(r["size"]),
                when(r["last_used"]),
                "pinned" if r["pinned"] else "-",
                r["signature"],
            )
        )
    widths = [max(len(row[i]) for row in table) for i in range(6)]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(row[:6], widths, strict=True)) + "  " + row[6]
        for row in table
    )


def cmd_models(args: argparse.Namespace) -> int:
    from agent.modelstore.cache import ModelCache
    from agent.service import config as configmod

    cfg = _load(args.config or configmod.example_config())
    shipped = cfg.detect.detect.models_dir if cfg.detect is not None else None
    cache = ModelCache.open(cfg.models, shipped_dir=shipped, readonly=True)
    rows = cache.listing(verify=True)
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print(
            f"model cache {cfg.models.cache_dir}: {cache.disk_used} of "
            f"{cfg.models.disk_budget} bytes on disk"
        )
        print(format_models(rows))
    return EX_OK


def cmd_plan(args: argparse.Namespace) -> int:
    from agent.service.planner import format_plan, plan

    result = plan(args.profile, args.measured)
    print(json.dumps(result.to_dict(), indent=2) if args.json else format_plan(result))
    return EX_OK


def cmd_demo(args: argparse.Namespace) -> int:
    from agent.service.demo import run_demo

    return run_demo(args)


# ---------------------------------------------------------------------------------------------
def _add_sim_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--simulate",
        choices=("pump", "skab"),
        help="run every sensor on simulated parts driven by a synthetic pump or a SKAB replay",
    )
    p.add_argument("--skab-file", help="the SKAB CSV to replay with --simulate skab")
    p.add_argument(
        "--fault",
        choices=("bearing_wear", "cavitation", "valve_closing"),
        help="with --simulate pump: inject this fault",
    )
    p.add_argument("--fault-at", type=float, default=60.0, help="seconds after start (default 60)")
    p.add_argument("--seed", type=int, default=1, help="seed of the synthetic pump (default 1)")
    p.add_argument("--data-dir", help="override agent.data_dir")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edge-agent", description="edge-agent device agent")
    parser.add_argument("--version", action="version", version=f"edge-agent {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("check-config", help="validate a config file")
    p.add_argument("file")
    p.set_defaults(func=cmd_check_config)

    p = sub.add_parser("run", help="run the agent")
    p.add_argument("--config", required=True)
    p.add_argument("--log-level", choices=("debug", "info", "warning", "error"))
    p.add_argument(
        "--time-scale",
        type=float,
        default=1.0,
        help="with --simulate: run the agent's clock this many times faster than real time",
    )
    _add_sim_args(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("selftest", help="probe every configured sensor once")
    p.add_argument("--config", required=True)
    p.add_argument("--json", action="store_true")
    _add_sim_args(p)
    p.set_defaults(func=cmd_selftest)

    p = sub.add_parser("queue", help="depth, bytes and evictions of the durable queue")
    p.add_argument("--config", required=True)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_queue)

    p = sub.add_parser("status", help="the running agent's live state")
    p.add_argument("--json", action="store_true")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--socket", help="the agent's status socket")
    where.add_argument("--config", help="find the socket from this config's data_dir")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("models", help="cached models: size, last use, pin, signature")
    p.add_argument("--config", default=None, help="default: the packaged reference rig")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("plan", help="cost of edge-only, cloud-only and hybrid inference")
    p.add_argument("--profile", required=True, help="the workload and price profile (TOML)")
    p.add_argument(
        "--measured", help="saved bench results (default: bench-results/ of the checkout)"
    )
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("demo", help="the reference rig on simulated parts")
    p.add_argument("--config", default=None, help="default: the packaged reference rig")
    p.add_argument("--seconds", type=float, default=0.0, help="stop after this long (0: run on)")
    p.add_argument(
        "--link",
        choices=("clean", "lossy", "poor"),
        default="clean",
        help="lossy: 5%% loss, 150 ms RTT; poor: 30%% loss, 600 ms RTT (the impairment proxy)",
    )
    p.add_argument("--no-cloud", action="store_true", help="no local endpoint: readings only")
    _add_sim_args(p)
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as err:
        print(str(err), file=sys.stderr)
        return EX_CONFIG
    except AgentError as err:
        print(f"edge-agent: {err}", file=sys.stderr)
        return EX_FAIL
    except KeyboardInterrupt:
        return EX_OK


if __name__ == "__main__":
    sys.exit(main())
