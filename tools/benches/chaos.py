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
files stay in a directory under /tmp when a target is missed (named in the notes).
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

from benches import Result
from tools.chaos import LONG, SHORT, run_chaos


def run(args: argparse.Namespace) -> Result:
    plan = SHORT if args.quick else LONG
    workdir = Path(tempfile.mkdtemp(prefix="bench-chaos-"))
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
    return res
