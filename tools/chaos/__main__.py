"""``./tools/dev chaos``: a chaos run on demand, printing the report.

    ./tools/dev chaos                       # the long plan (as the bench runs it)
    ./tools/dev chaos --short               # the CI plan
    ./tools/dev chaos --seed 7 --minutes 15 # the long plan's counts, paced over 15 minutes
    ./tools/dev chaos --power-cuts 50 --agent-kills 0 --documents 0

Every file of the run (logs, databases, damaged queue copies) stays in ``--workdir`` (default: a
new directory under /tmp, printed). The exit status is 1 when a target was missed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
from pathlib import Path

from tools.chaos.harness import run_chaos
from tools.chaos.plan import LONG, SHORT

COUNTS = {
    "agent_kills": "agent SIGKILLs",
    "endpoint_kills": "endpoint SIGKILLs",
    "power_cuts": "power cuts of the agent's data directory",
    "corruptions": "queue corruptions",
    "disk_fills": "fill/empty cycles of the small disk (0: no disk lane)",
    "datagrams": "malformed datagrams",
    "documents": "hostile desired documents",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="./tools/dev chaos",
        description="A chaos run of the real agent and endpoint (tools/chaos); prints the report.",
    )
    parser.add_argument("--short", action="store_true", help="start from the CI plan")
    parser.add_argument("--seed", type=int, help="seed of the schedule and the hostile input")
    parser.add_argument("--minutes", type=float, help="pace the run to last about this long")
    for name, text in COUNTS.items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, help=text)
    parser.add_argument(
        "--disk-full-restart",
        choices=("yes", "no"),
        help="SIGKILL and restart the small-disk agent while its disk is full",
    )
    parser.add_argument("--loss", type=float, help="packet loss of the agent's link (0..1)")
    parser.add_argument(
        "--endpoint-debug",
        action="store_true",
        help="the endpoint logs at debug level (to see why; the log-bytes figure is then moot)",
    )
    parser.add_argument("--workdir", type=Path, help="where the run's files go")
    parser.add_argument("--json", action="store_true", help="print the summary as a last line")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    plan = SHORT if args.short else LONG
    changes = {k: getattr(args, k) for k in COUNTS if getattr(args, k) is not None}
    if args.seed is not None:
        changes["seed"] = args.seed
    if args.loss is not None:
        changes["loss"] = args.loss
    if args.disk_full_restart:
        changes["disk_full_restart"] = args.disk_full_restart == "yes"
    if args.endpoint_debug:
        changes["endpoint_debug"] = True
    plan = dataclasses.replace(plan, **changes)
    if args.minutes:
        plan = plan.stretched(args.minutes)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="edge-chaos-"))
    print(f"chaos: {plan}\nchaos: files in {workdir}", file=sys.stderr, flush=True)
    try:
        report = run_chaos(plan, workdir)
    except KeyboardInterrupt:  # the run stopped everything it started on the way out
        print(f"chaos: interrupted; files in {workdir}", file=sys.stderr)
        return 130
    print(report.render())
    failures = report.failures()
    print("targets met" if not failures else "targets missed: " + "; ".join(failures))
    if args.json:
        print(json.dumps(report.summary(), sort_keys=True))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
