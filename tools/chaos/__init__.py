"""Chaos harness: the real endpoint and the real agent, each in its own process, through a lossy
link, while agents and the endpoint are SIGKILLed, the agent's disk loses power, its queue is
corrupted at rest, a small disk fills and empties, and hostile datagrams and desired documents
arrive; then the books: nothing lost, nothing duplicated, nothing stuck, no crash, no traceback.

One function, three callers::

    from tools.chaos import SHORT, run_chaos
    report = run_chaos(SHORT, workdir)     # tests/chaos/test_chaos.py (the CI run)
    report.summary(); print(report.render())

``./tools/dev chaos`` (:mod:`tools.chaos.__main__`, a longer run on demand) and
``./tools/dev bench chaos`` (tools/benches/chaos.py, the long plan) are the others.

Modules: :mod:`.plan` (counts and schedule), :mod:`.harness` (the run), :mod:`.procs` (the
processes), :mod:`.attacks` (hostile input, the small disk), :mod:`.queuedamage` (corruption at
rest), :mod:`.ledger` (reading logs and databases), :mod:`.report` (the figures).
It needs root (FUSE for the power-cut file system, a tmpfs mount for the small disk).
"""

from __future__ import annotations

from tools.chaos.harness import run_chaos, run_chaos_async
from tools.chaos.plan import LONG, SHORT, Plan
from tools.chaos.report import SUMMARY_KEYS, Report

__all__ = ["LONG", "SHORT", "SUMMARY_KEYS", "Plan", "Report", "run_chaos", "run_chaos_async"]
