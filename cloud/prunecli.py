"""``edge-agent-cloud prune`` and ``serve --retain-days N``: retention of what devices sent
(the rule: cloud/retention.py; docs/ops.md "Retention").

``prune --data DIR|--storage SPEC --older-than-days N [--dry-run] [--json]`` removes what the
storage received before midnight (UTC) of the day N days ago, records, features records, verdicts
and the federated-learning uploads no longer read (cloud/learnuploads.py ``prune_uploads``), and
prints what it removed (``--dry-run``: would remove; nothing changes). A server may run on the same
storage meanwhile: the prune works in short transactions. Exit codes (agent/exits.py): 0 done, 64
usage, 66 no endpoint data in DIR, 69 a database server that does not answer, 74 a storage that
fails, 75 another prune is running (PostgreSQL) or a lock was held too long: run it again.

``serve --retain-days N`` runs the same prune in a thread of the endpoint, once at start and
then every :data:`RETAIN_INTERVAL`, each logged as one line (``event=retention_pruned``);
with ``--processes`` only the first worker prunes. On PostgreSQL the prune's advisory lock lets
one process of a fleet of hosts prune at a time; the others log ``event=retention_skipped``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import logging
import threading
from typing import Any

from agent.errors import AgentError
from agent.exits import EX_OK, EX_TEMPFAIL, EX_USAGE, CommandError
from cloud.learnuploads import prune_uploads
from cloud.retention import PruneBusy, PruneResult, cutoff, describe_result, iso
from cloud.storage import Storage, describe_storage, open_storage
from drivers.clock import Clock, RealClock

log = logging.getLogger("cloud.retention")

RETAIN_INTERVAL = 86_400.0  # seconds from one prune of serve --retain-days to the next
RETRY_INTERVAL = 3_600.0  # seconds to the next try after a prune that failed
MB = 1_000_000


def add_parser(sub: Any, open_storage_fn: Any, serve: argparse.ArgumentParser) -> None:
    """The ``prune`` subcommand and ``serve --retain-days``; ``open_storage_fn(data, existing=,
    storage=)`` is cloud/cli.py's (passed in: it imports this module)."""
    serve.add_argument(
        "--retain-days",
        type=days,
        metavar="N",
        help="remove what devices sent more than N days ago, at start and then daily "
        '(docs/ops.md "Retention")',
    )
    p = sub.add_parser("prune", help="remove what devices sent more than N days ago")
    p.add_argument("--data", help="the endpoint's data directory (or --storage SPEC)")
    p.add_argument("--older-than-days", type=days, required=True, metavar="N")
    p.add_argument("--dry-run", action="store_true", help="count only; change nothing")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_prune, open_storage=open_storage_fn)


def days(text: str) -> int:
    """An argparse type: a whole number of days, 1 or more (a usage error otherwise: 64)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: a whole number of days, 1 or more")
    return value


def cmd_prune(args: argparse.Namespace) -> int:
    if args.data is None and args.storage is None:
        raise CommandError(EX_USAGE, "error: give --data DIR or --storage SPEC")
    storage = args.open_storage(args.data, existing=True, storage=args.storage)
    try:
        before = cutoff(RealClock().time(), args.older_than_days)
        result = prune(storage, before, dry_run=args.dry_run)
    except PruneBusy as err:
        raise CommandError(EX_TEMPFAIL, f"error: {err}") from None
    finally:
        storage.close()
    where = describe_storage(args.storage if args.storage is not None else args.data)
    if args.json:
        doc = {"storage": where, "older_than_days": args.older_than_days, **result.to_json()}
        print(json.dumps(doc, indent=2))
    else:
        print("\n".join(report(result, where, args.older_than_days)))
    return EX_OK


def prune(
    storage: Storage,
    before: float,
    *,
    dry_run: bool = False,
    stop: threading.Event | None = None,
) -> PruneResult:
    """One prune: the storage's (records, features records, verdicts), then the learning uploads
    no longer read (cloud/learnuploads.py :func:`~cloud.learnuploads.prune_uploads`), unless
    ``stop`` ended the first."""
    result = storage.prune(before, dry_run=dry_run, stop=stop)
    if result.stopped:
        return result
    uploads, stopped = prune_uploads(storage, result.before, dry_run=dry_run, stop=stop)
    return dataclasses.replace(result, learn_uploads=uploads, stopped=stopped)


def report(result: PruneResult, where: str, days: int) -> list[str]:
    """The text a prune prints."""
    verb = "would remove" if result.dry_run else "removed"
    lines = [
        f"{where}: {verb} what was received before {iso(result.before)} ({days} days)"
        + (" (dry run: nothing changed)" if result.dry_run else ""),
        f"  records     {result.records}",
        f"  features    {result.features}",
        f"  verdicts    {result.verdicts}",
        f"  partitions  {', '.join(result.partitions) or '-'}",
        f"  devices     {result.devices} (pruned floor raised: docs/protocol.md"
        ' "Retention and exactly-once")',
        f"  learn_uploads {result.learn_uploads} (federated learning, rounds no longer read)",
    ]
    if result.free_bytes is not None:
        lines.append(
            f"  free        {result.free_bytes / MB:.1f} MB inside the file, reused by new records"
            ' (the file does not shrink: docs/ops.md "Retention")'
        )
    if result.stopped:
        lines.append("  stopped before the end: run it again to finish")
    return lines


class Retainer:
    """``serve --retain-days N`` (module docstring): opens the storage ``spec`` names for each
    prune, in a thread (its transactions are short; the endpoint's own go on between them)."""

    def __init__(self, spec: str, days: int, clock: Clock | None = None) -> None:
        self._spec = spec
        self._days = days
        self._clock = clock or RealClock()
        self._stop = threading.Event()
        self._task: asyncio.Task[None] | None = None
        self.where = describe_storage(spec)

    def start(self) -> Retainer:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="retention")
        return self

    async def _run(self) -> None:
        while not self._stop.is_set():
            await self._clock.sleep(await self.once())

    async def once(self) -> float:
        """One prune, logged; the seconds until the next."""
        started = self._clock.monotonic()
        try:
            result = await self._clock.run_blocking(None, self._prune)
        except PruneBusy as err:
            log.info("event=retention_skipped storage=%s reason=%s", self.where, err)
            return RETAIN_INTERVAL
        except Exception as err:  # a failing prune must not stop the endpoint: try again later
            level = logging.WARNING if isinstance(err, AgentError) else logging.ERROR
            log.log(
                level,
                "event=retention_failed storage=%s error=%s retry_in=%d",
                self.where,
                " ".join(str(err).split())[:300],
                RETRY_INTERVAL,
                exc_info=not isinstance(err, AgentError),
            )
            return RETRY_INTERVAL
        log.info(
            "event=retention_pruned older_than_days=%d %s seconds=%.1f",
            self._days,
            describe_result(result, self.where),
            self._clock.monotonic() - started,
        )
        return RETAIN_INTERVAL

    def _prune(self) -> PruneResult:
        storage = open_storage(self._spec, check=False)  # checked when serving started
        try:
            return prune(storage, cutoff(self._clock.time(), self._days), stop=self._stop)
        finally:
            storage.close()

    async def stop(self) -> None:
        """Stop: a prune running ends after its current transaction."""
        self._stop.set()
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


class _Off:
    async def stop(self) -> None:
        return None


def start_serving(args: argparse.Namespace, clock: Clock | None = None) -> Retainer | _Off:
    """``serve``'s retention: a started :class:`Retainer` with ``--retain-days``, else nothing
    to stop."""
    if args.retain_days is None:
        return _Off()
    spec = args.storage if args.storage is not None else args.data
    return Retainer(spec, args.retain_days, clock).start()


def worker_argv(args: argparse.Namespace) -> list[str]:
    """What ``serve --processes`` passes on to the worker that prunes (the first)."""
    return [] if args.retain_days is None else ["--retain-days", str(args.retain_days)]
