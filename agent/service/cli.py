"""The ``edge-agent`` command line.

edge-agent check-config FILE          validate a config file (exit 78 when it is bad)
edge-agent run --config FILE          run the agent (--simulate pump|skab: on simulated parts)
edge-agent selftest --config FILE     probe every sensor once and print a table
edge-agent demo                       the reference rig on simulated parts, live readings
edge-agent plan --profile FILE        cost of edge-only, cloud-only and hybrid inference
edge-agent bench --quick [--json]     this device's fsync, store, int8 latency, codec bytes
edge-agent models [--config FILE]     cached models: size, last use, pin, signature status
edge-agent example-config             print the packaged reference rig's config
edge-agent config-reference           every config key, from the parsers (docs/config.md)

Exit codes (agent/exits.py, sysexits.h): 0 done, 1 a check failed (selftest), 64 usage, 65 bad
data, 66 a missing input, 69 unavailable (no agent answers), 70 a bug, 73 cannot create, 74 I/O
error, 75 try again (in use by another process), 77 permission denied, 78 bad configuration, 141
standard output closed early. Every error is one line on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent import __version__, logsetup
from agent.errors import AgentError, ConfigError, DriverError, ModelError, StoreError, SyncError
from agent.exits import (
    EX_CONFIG,
    EX_DATAERR,
    EX_FAIL,
    EX_IOERR,
    EX_NOINPUT,
    EX_NOPERM,
    EX_OK,
    EX_SOFTWARE,
    EX_TEMPFAIL,
    EX_UNAVAILABLE,
    EX_USAGE,
    CommandError,
    UsageParser,
    os_error_code,
    os_error_line,
    stdout_closed,
)
from drivers.clock import Clock, RealClock, ScaledClock

if TYPE_CHECKING:
    from agent.service import config as configmod

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
    from agent.service.config import notes

    cfg = _load(args.file)
    print(f"{args.file}: ok ({len(cfg.sensors)} sensors: {', '.join(s.name for s in cfg.sensors)})")
    for note in notes(cfg):
        print(f"{args.file}: note: {note}")
    return EX_OK


def cmd_gateway_secret(args: argparse.Namespace) -> int:
    """A new site secret for the site's peer gateways (docs/gateway.md, "Peer state")."""
    from agent.gateway.peersecurity import write_secret

    path = Path(args.file)
    try:
        write_secret(path)
    except FileExistsError as err:
        raise CommandError(EX_USAGE, f"edge-agent gateway-secret: {err}") from None
    except OSError as err:
        raise CommandError(os_error_code(err), os_error_line(err)) from None
    print(f"{path}: a new site secret (mode 600); copy it to every gateway of the site")
    return EX_OK


def cmd_gateway(args: argparse.Namespace) -> int:
    from agent.gateway.service import run_gateway
    from agent.gateway.settings import load_gateway_config
    from agent.service.notify import Announcer, Health, Notifier
    from agent.service.supervise import Supervisor

    try:
        config = load_gateway_config(args.config)
    except ConfigError as err:
        print(err, file=sys.stderr)
        return EX_CONFIG
    logsetup.setup(args.log_level)
    clock = RealClock()  # the gateway's loops run as the agent's stages (a failing one restarts)
    health = Health(clock)  # a loop down too long stops the systemd watchdog, as in the agent
    return run_gateway(config, Supervisor(clock, health), Announcer(Notifier(), health, clock))


def cmd_run(args: argparse.Namespace) -> int:
    from agent.service.cpu import pin_to_one_cpu
    from agent.service.datadir import prepare_data_dir
    from agent.service.runtime import Agent

    cfg = load_config(args)
    if args.time_scale != 1.0 and not args.simulate:
        raise CommandError(EX_USAGE, "edge-agent run: --time-scale is only for --simulate")
    prepare_data_dir(cfg)
    logsetup.setup(args.log_level or cfg.agent.log_level)
    if cfg.agent.cpu_affinity == "single":  # before any thread starts: they inherit it
        pin_to_one_cpu()

    async def main() -> int:
        clock = ScaledClock(args.time_scale) if args.time_scale != 1.0 else RealClock()
        rig = _rig(cfg, clock)
        try:
            agent = Agent(cfg, clock=clock, rig=rig)
            await agent.run()
            return agent.exit_code  # 75 after a restart command: systemd starts it again
        finally:
            if rig is not None:
                rig.close()

    return asyncio.run(main())


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
            except Exception as err:  # a driver's bug, as the sampler says it: the others go on
                row["error"] = f"{type(err).__name__}: {err} (a driver bug: report this line)"
            finally:
                row["latency_ms"] = (time.perf_counter() - started) * 1000
                if driver is not None:
                    try:
                        await driver.close()
                    except Exception as err:
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
    if not cfg.store.path.exists():
        raise CommandError(
            EX_NOINPUT,
            f"edge-agent queue: no queue at {cfg.store.path}: the agent has not run with "
            f"{args.config} yet (give the --config it runs with)",
        )
    print(asyncio.run(queue_report(cfg.store, as_json=args.json)))
    return EX_OK


#: The agent's status socket as systemd runs it: RuntimeDirectory=edge-agent.
SYSTEM_RUNTIME_DIR = Path("/run/edge-agent")
#: The config tools/flash installs (its data_dir is where an agent run without systemd's
#: RuntimeDirectory listens).
SYSTEM_CONFIG = Path("/etc/edge-agent/agent.toml")


def status_sockets(args: argparse.Namespace) -> list[Path]:
    """Where a running agent's status socket may be, most likely first: ``--socket``;
    ``--config``'s or ``--data-dir``'s; else systemd's directories ($RUNTIME_DIRECTORY,
    /run/edge-agent, $STATE_DIRECTORY) and the data_dir of the installed config
    (/etc/edge-agent/agent.toml) and of the packaged one (/var/lib/edge-agent)."""
    from agent.service import config as configmod
    from agent.service.status import SOCKET_NAME

    if args.socket:
        return [Path(args.socket)]
    if args.data_dir:
        return [Path(args.data_dir) / SOCKET_NAME]
    dirs: list[Path] = []
    if args.config:
        dirs.append(_load(args.config).agent.data_dir)
    for var in ("RUNTIME_DIRECTORY", "STATE_DIRECTORY"):
        dirs += [Path(d) for d in os.environ.get(var, "").split(":") if d]
    dirs.append(SYSTEM_RUNTIME_DIR)
    if not args.config:
        for config in (SYSTEM_CONFIG, configmod.example_config()):
            data_dir = _data_dir_of(config)
            if data_dir is not None:
                dirs.append(data_dir)
    return [d / SOCKET_NAME for d in dict.fromkeys(dirs)]


def _data_dir_of(config: Path) -> Path | None:
    """``[agent] data_dir`` of a config file, if it can be read (nothing else is checked)."""
    import tomllib

    from agent.files import resolve_path

    try:
        doc = tomllib.loads(config.read_text(encoding="utf-8"))
        return resolve_path(config.resolve().parent, str(doc["agent"]["data_dir"]))
    except (OSError, ValueError, KeyError, TypeError, RecursionError):
        return None


def cmd_status(args: argparse.Namespace) -> int:
    from agent.service.status import format_status, query

    paths = status_sockets(args)
    denied: Path | None = None
    doc = None
    for path in paths:
        try:
            doc = query(path)
            break
        except (FileNotFoundError, ConnectionRefusedError, NotADirectoryError):
            continue
        except PermissionError:
            denied = denied or path
        except (OSError, ValueError) as err:  # a socket that answers with something else
            raise CommandError(
                EX_UNAVAILABLE, f"edge-agent status: {path}: no status answer ({err})"
            ) from None
    if doc is None:
        if denied is not None:
            raise CommandError(
                EX_NOPERM,
                f"edge-agent status: {denied}: permission denied; run it as a member of the "
                "agent's group (sudo usermod -aG edge-agent $USER) or with sudo",
            )
        tried = ", ".join(str(p) for p in paths)
        raise CommandError(
            EX_UNAVAILABLE,
            f"edge-agent status: no agent is running (none answers at {tried}); start one "
            "(systemctl start edge-agent) or name its socket: --socket PATH, --config FILE or "
            "--data-dir DIR",
        )
    if args.json:
        print(json.dumps(doc, indent=2, sort_keys=True))
        return EX_OK
    try:
        text = format_status(doc)
    except (TypeError, ValueError, AttributeError, KeyError) as err:  # a peer of another kind
        raise CommandError(
            EX_UNAVAILABLE, f"edge-agent status: {path}: no status answer (not the agent's: {err})"
        ) from None
    print(text)
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


def default_config() -> Path:
    """The config a command uses without ``--config``: the installed one, else the packaged
    reference rig's."""
    from agent.service.config import example_config

    return SYSTEM_CONFIG if SYSTEM_CONFIG.exists() else example_config()


def device_results(args: argparse.Namespace) -> Path | None:
    """This device's ``bench --quick`` summary for ``plan``: in ``--data-dir``'s or
    ``--config``'s data directory; without either (and without ``--measured``) in the installed
    config's, else the packaged one's (/var/lib/edge-agent), whichever has one."""
    from agent.service.quickbench import result_path

    if args.data_dir:
        if not Path(args.data_dir).is_dir():
            raise CommandError(
                EX_NOINPUT,
                f"edge-agent plan: --data-dir {args.data_dir}: no such directory; give the "
                "agent's data directory (where bench --quick saved its results)",
            )
        return result_path(Path(args.data_dir))
    if args.config:
        return result_path(_load(args.config).agent.data_dir)
    if args.measured:
        return None
    from agent.service.config import example_config

    for config in (SYSTEM_CONFIG, example_config()):
        data_dir = _data_dir_of(config)
        if data_dir is not None and result_path(data_dir).is_file():
            return result_path(data_dir)
    return None


def cmd_plan(args: argparse.Namespace) -> int:
    from agent.service.planner import format_plan, plan

    result = plan(args.profile, args.measured, device_results(args))
    print(json.dumps(result.to_dict(), indent=2) if args.json else format_plan(result))
    return EX_OK


def _writable_dir(path: Path, what: str, fix: str) -> None:
    from agent.files import ensure_writable_dir

    try:
        ensure_writable_dir(path)
    except OSError as err:
        raise CommandError(
            os_error_code(err), "edge-agent bench: " + os_error_line(err, what, fix)
        ) from None


def cmd_bench(args: argparse.Namespace) -> int:
    from agent.service import quickbench

    if not args.quick:
        raise CommandError(
            EX_USAGE,
            "edge-agent bench: give --quick (this device's quick bench, seconds); the full "
            "benches are ./tools/dev bench NAME in a checkout",
        )
    durability, single_cpu = "full", True
    data_dir = Path(args.data_dir).resolve() if args.data_dir else None
    if args.config or data_dir is None:
        cfg = _load(args.config or default_config())
        data_dir = data_dir or cfg.agent.data_dir
        durability = cfg.store.durability
        single_cpu = cfg.agent.cpu_affinity == "single"
    where = Path(args.dir).resolve() if args.dir else data_dir
    fix = (
        "run it as the agent's user (sudo -u edge-agent edge-agent bench --quick) or name "
        "another: --data-dir DIR (results), --dir DIR (where it runs)"
    )
    try:  # by descriptor: as root, DATA/bench may be a link the agent's user planted
        quickbench.check_result_dir(data_dir)
    except OSError as err:  # named as the directory (a descriptor's call names "bench")
        err.filename = str(quickbench.result_path(data_dir).parent)
        line = os_error_line(err, "bench results directory", fix)
        raise CommandError(os_error_code(err), "edge-agent bench: " + line) from None
    _writable_dir(where, "bench directory", fix)
    doc = quickbench.run_quick(
        quickbench.QuickSettings(where=where, durability=durability, single_cpu=single_cpu)
    )
    saved = quickbench.save(doc, data_dir)
    if args.json:
        print(json.dumps({**doc, "saved": str(saved)}, indent=2, sort_keys=True))
    else:
        print(quickbench.format_report(doc))
        print(f"\nsaved to {saved}: edge-agent plan reads these figures first")
    return EX_OK


def cmd_example_config(args: argparse.Namespace) -> int:
    from agent.service.config import example_config

    sys.stdout.write(example_config().read_text(encoding="utf-8"))
    return EX_OK


def cmd_config_reference(args: argparse.Namespace) -> int:
    from agent.service.configref import ReferenceError, render

    try:
        text = render()
    except ReferenceError as err:
        raise CommandError(EX_SOFTWARE, f"edge-agent config-reference: {err}") from None
    sys.stdout.write(text)
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
    parser = UsageParser(prog="edge-agent", description="edge-agent device agent")
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
        type=_positive_number,
        default=1.0,
        help="with --simulate: run the agent's clock this many times faster than real time",
    )
    _add_sim_args(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("gateway", help="serve devices behind this one (docs/gateway.md)")
    p.add_argument("--config", required=True)
    p.add_argument("--log-level", choices=("debug", "info", "warning", "error"), default="info")
    p.set_defaults(func=cmd_gateway)

    p = sub.add_parser(
        "gateway-secret", help="make the site secret of the peer gateways ([gateway.peers] secret)"
    )
    p.add_argument("file", help="the file to write (refused if it exists)")
    p.set_defaults(func=cmd_gateway_secret)

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
    where.add_argument("--data-dir", help="the agent's data directory (as run --data-dir)")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("models", help="cached models: size, last use, pin, signature")
    p.add_argument("--config", default=None, help="default: the packaged reference rig")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("plan", help="cost of edge-only, cloud-only and hybrid inference")
    p.add_argument("--profile", required=True, help="the workload and price profile (TOML)")
    p.add_argument(
        "--measured",
        help="use the bench runs saved in this directory instead of the bundled ones (and no "
        "device results unless --config or --data-dir names them)",
    )
    where = p.add_mutually_exclusive_group()
    where.add_argument(
        "--config",
        help="read this device's `bench --quick` results from this config's data_dir first "
        "(default: /etc/edge-agent/agent.toml, else the packaged rig's)",
    )
    where.add_argument("--data-dir", help="read them from this data directory")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser(
        "bench", help="measure this device (--quick): fsync, store puts, int8 latency, codec bytes"
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="the quick bench (seconds); results go to DATA/bench/quick.json for `plan`",
    )
    p.add_argument("--json", action="store_true", help="print the saved JSON document")
    p.add_argument(
        "--dir",
        help="run in a new directory made in DIR (default: the agent's data directory); its "
        "filesystem's fsync sets the durable rates",
    )
    p.add_argument(
        "--config",
        help="the agent's config: data_dir, [store] durability, cpu_affinity (default: "
        "/etc/edge-agent/agent.toml, else the packaged rig's)",
    )
    p.add_argument("--data-dir", help="override agent.data_dir (where the results are saved)")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser(
        "example-config", help="print the packaged reference rig's config (pump-rig.toml)"
    )
    p.set_defaults(func=cmd_example_config)

    p = sub.add_parser(
        "config-reference", help="every config table and key, as Markdown (docs/config.md)"
    )
    p.set_defaults(func=cmd_config_reference)

    p = sub.add_parser("demo", help="the reference rig on simulated parts")
    p.add_argument("--config", default=None, help="default: the packaged reference rig")
    p.add_argument("--seconds", type=_seconds, default=0.0, help="stop after this long (0: run on)")
    p.add_argument(
        "--link",
        choices=("clean", "lossy", "poor"),
        default="clean",
        help="lossy: 5%% loss, 150 ms RTT; poor: 30%% loss, 600 ms RTT (the impairment proxy)",
    )
    p.add_argument("--no-cloud", action="store_true", help="no local endpoint: readings only")
    p.add_argument(
        "--verbose", action="store_true", help="print every reading (default: a line a second)"
    )
    _add_sim_args(p)
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code = args.func(args)
        sys.stdout.flush()
        return code
    except BrokenPipeError:  # `edge-agent ... | head`: the reader has what it wanted
        return stdout_closed()
    except CommandError as err:
        print(err, file=sys.stderr)
        return err.code
    except ConfigError as err:
        print(str(err), file=sys.stderr)
        return EX_CONFIG
    except AgentError as err:
        print(f"edge-agent: {err}", file=sys.stderr)
        return error_code(err)
    except OSError as err:
        print(f"edge-agent {args.command}: {os_error_line(err)}", file=sys.stderr)
        return os_error_code(err)
    except KeyboardInterrupt:
        return EX_OK


def _positive_number(text: str) -> float:
    """An argparse type: a finite number > 0 (argparse makes anything else exit 64)."""
    return _finite_number(text, zero=False)


def _seconds(text: str) -> float:
    """An argparse type: a finite number >= 0 of seconds (0: no limit)."""
    return _finite_number(text, zero=True)


def _finite_number(text: str, *, zero: bool) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value) or value < 0 or (value == 0 and not zero):
        need = "0 or more" if zero else "greater than 0"
        raise argparse.ArgumentTypeError(f"{text!r}: a finite number {need} is needed")
    return value


def error_code(err: AgentError) -> int:
    """The exit code of an agent error: from the OS error behind it when there is one."""
    cause = err.__cause__
    if isinstance(cause, OSError) and cause.errno is not None:
        return EX_TEMPFAIL if "in use by another process" in str(err) else os_error_code(cause)
    if isinstance(err, StoreError):
        return EX_IOERR
    if isinstance(err, ModelError):
        return EX_DATAERR
    if isinstance(err, SyncError):
        return EX_UNAVAILABLE
    return EX_SOFTWARE


if __name__ == "__main__":
    sys.exit(main())
