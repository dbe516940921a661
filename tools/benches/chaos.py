"""Bench of robustness under chaos: the long plan of the chaos harness (tools/chaos, plan
``LONG``): 20 agent SIGKILLs, 5 endpoint SIGKILLs, 20 power cuts of the agent's data directory,
2 queue corruptions, 2 fill/empty cycles of a second agent's small disk (with a restart on the
full disk), 10,000 malformed datagrams and 1,000 hostile desired documents, with the agent's
link at 10 % loss; then the backlog drains and the books are read.

Each figure is shown against its target: ``lost`` 0 (committed records not stored, not counting
rows the deliberate corruption destroyed), ``duplicated`` 0, ``salvaged_ratio`` 1.0 (readable rows
of the damaged queue that reached the endpoint / readable rows, counted by independent point
lookups), ``crashes`` 0, ``tracebacks`` 0, ``log_bytes_per_bad_datagram`` <= 20 (growth of the
endpoint's log over the floods / datagrams sent). ``--quick`` runs the short (CI) plan. The run's
files stay in their directory (inside ``--dir``, tools/benches/__init__.py) when a target is
missed (named in the notes).
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

from benches import Result, describe, locate
from tools.chaos import LONG, SHORT, run_chaos

MEASURES = (
    "records lost or duplicated, salvage ratio, crashes, tracebacks and log bytes per bad "
    "datagram under SIGKILLs, power cuts, queue corruption, a full disk and hostile floods "
    "(needs root)"
)
BASELINE = (
    "the targets (0 lost, 0 duplicated, salvage 1.0, 0 crashes, <= 20 log bytes per bad "
    "datagram); nothing to race"
)


def run(args: argparse.Namespace) -> Result:
    plan = SHORT if args.quick else LONG
    base, _ = locate(getattr(args, "dir", None))
    base.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="bench-chaos-", dir=base))
    where = describe(workdir, "--dir" if getattr(args, "dir", None) else "default")
    report = run_chaos(plan, workdir)
    res = Result()
    for metric, value, reference in report.rows():
        res.add(metric, value, reference)
    res.notes.extend(report.details())
    if report.failures():
        res.notes.append(f"targets missed: {'; '.join(report.failures())}")
        res.notes.append(f"the run's logs and databases are kept in {workdir}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    res.summary = report.summary()
    return where.stamp(res)
