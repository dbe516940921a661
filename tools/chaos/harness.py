"""One chaos run (:func:`run_chaos`): the real endpoint and the real agent, each in its own process,
the agent's link through the impairment proxy, and a seeded schedule of things going wrong.

Three lanes run side by side:

- the main lane, events at random moments (:func:`tools.chaos.plan.schedule`): agent SIGKILL and
  restart; endpoint SIGKILL and restart on the same port; a power cut of the agent's data
  directory, which lives on the power-cut file system (``tools/powercut``), and a restart; a
  corrupted queue (a link outage first so that the queue holds rows, then SIGTERM, b-tree leaf
  pages of ``queue.db`` overwritten, see :mod:`tools.chaos.queuedamage`, and a restart); bursts of
  malformed datagrams straight to the endpoint's port, measuring its log's growth;
- the documents lane: hostile desired documents written into the endpoint's database while the
  agent observes (:class:`tools.chaos.attacks.DesiredWriter`);
- the disk lane: a second agent (its own device, ``DEVICE-disk``) whose data directory is a small
  tmpfs, filled to ENOSPC with a ballast file and emptied again, with a restart on the full disk
  if the plan asks. The power-cut file system and a small disk cannot both hold one data
  directory (the power-cut file system keeps un-synced pages in memory, so a full disk would
  only show at fsync), hence the second agent.

At the end the backlog drains (every committed seq stored, within ``drain_timeout``), the agents
get SIGTERM, and :class:`tools.chaos.report.Report` holds the books. Everything started is
stopped and unmounted on the way out, also when the run fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import re
import shutil
import subprocess
import time
import traceback
from pathlib import Path

from agent.service.config import example_config
from agent.wire import statedoc
from tools.chaos import attacks, ledger
from tools.chaos.plan import AGENT_KILL, CORRUPT, ENDPOINT_KILL, FLOOD, POWER_CUT, Plan, schedule
from tools.chaos.procs import Crash, Managed, python
from tools.chaos.queuedamage import damage
from tools.chaos.report import Books, Report
from tools.hostile import Datagram, hostile_desired_documents, malformed_datagrams
from tools.linkem import Impairment, LinkEmulator
from tools.ports import free_port
from tools.powercut import PowerCutFS

DEVICE = "pump-rig-01"
DISK_DEVICE = f"{DEVICE}-disk"
GOOD_KEY = "sensor/motor/interval"  # the valid key of every hostile document
LATE_ARRIVALS = 3.0  # seconds to wait, after the stop, for batches already on their way
POLL = 0.5  # seconds between looks at the endpoint's records while draining
GRACE = 10.0  # seconds a record committed before a drain gave up had to be delivered
RETRY_MAX = 8.0  # the agents' [uplink] backoff_max (agent_config)
EXCHANGE_DEADLINE = 10.0  # the agents' [uplink] deadline


def free_udp_port() -> int:
    return free_port()


def agent_config(device: str, data_dir: Path, port: int, interval: float) -> str:
    """The packaged rig config, edited as tests/e2e/test_sync_e2e.py does; its own ``[uplink]``
    table (if the example has one) gives way to ours, whose credential is the default one,
    ``DATA/credential.json``."""
    example = re.sub(r"(?ms)^\[uplink\]\n.*?(?=^\[|\Z)", "", example_config().read_text())
    text = (
        example.replace('device_id = "pump-rig-01"', f'device_id = "{device}"')
        .replace('data_dir = "/var/lib/edge-agent"', f'data_dir = "{data_dir}"')
        .replace("interval = 1.0", f"interval = {interval}")
    )
    text += "commissioning_samples = 60\n"  # the [detect] table ends the example
    # Retries stay well inside the drain's stall timeout (plan.stall_timeout, 30 s) even across
    # an outage (plan.backlog_seconds, 8 s): at most RETRY_MAX between two attempts and
    # EXCHANGE_DEADLINE for one exchange whose datagrams were lost (with 30 s each, one unlucky
    # backoff after an endpoint restart, then an outage, outlasted the stall timeout while every
    # record sat safely in the queue).
    text += (
        f'\n[uplink]\nendpoints = ["coap://127.0.0.1:{port}"]\n'
        f"backoff_max = {RETRY_MAX}\ndeadline = {EXCHANGE_DEADLINE}\n"
    )
    return text


class ChaosRun:
    """The state of one run; :func:`run_chaos` drives it."""

    def __init__(self, plan: Plan, workdir: Path) -> None:
        self.plan = plan
        self.workdir = workdir.resolve()
        # one generator per lane: the lanes interleave differently from run to run
        self.rng = random.Random(plan.seed * 7919 + 1)  # the main lane
        self.disk_rng = random.Random(plan.seed * 7919 + 2)
        self.report = Report(plan=plan, workdir=self.workdir)
        self.crashes: list[Crash] = self.report.crashes
        self.logdir = self.workdir / "logs"
        self.cloud_dir = self.workdir / "cloud"
        self.cloud_db = self.cloud_dir / "cloud.sqlite3"
        self.backing = self.workdir / "agent-disk"  # the power-cut file system's disk
        self.data_dir = self.workdir / "agent-data"  # its mount point: the agent's data_dir
        self.disk_dir = self.workdir / "small-disk"  # the tmpfs of the disk lane
        self.port = free_udp_port()
        self.started = time.monotonic()
        self.endpoint: Managed | None = None
        self.agent: Managed | None = None
        self.disk_agent: Managed | None = None
        self.proxy: LinkEmulator | None = None
        self.fs: PowerCutFS | None = None
        self.bad_pairs: set[tuple[str, int]] = set()
        self.written_revs: set[int] = set()
        self.disk_books: Books | None = None
        self.tail = ledger.Tail()  # the main agent's logs, read as they grow

    # -- set-up and tear-down --------------------------------------------------------------------

    async def setup(self) -> None:
        for d in (self.logdir, self.cloud_dir, self.backing, self.data_dir):
            d.mkdir(parents=True, exist_ok=True)
        for device, credential in (
            (DEVICE, self.backing / "credential.json"),
            (DISK_DEVICE, self.workdir / "disk-credential.json"),
        ):
            add = ["devices", "add", "--data", str(self.cloud_dir)]
            await self._cli(*add, "--credential-out", str(credential), device)
        self.endpoint = Managed(
            "endpoint",
            lambda run: self._serve_argv(),
            self.logdir,
            "event=listening",
            self.crashes,
            start_timeout=self.plan.start_timeout,
        )
        if not await self.endpoint.start():
            raise RuntimeError(f"the endpoint did not start, see {self.endpoint.log}")
        self.proxy = LinkEmulator(
            listen=("127.0.0.1", 0),
            target=("127.0.0.1", self.port),
            impairment=Impairment(loss=self.plan.loss),
            seed=self.plan.seed,
        )
        await self.proxy.start()
        self.fs = PowerCutFS(self.backing, self.data_dir, host_fsync=False)
        await asyncio.to_thread(self.fs.mount)
        config = self.workdir / "agent.toml"
        interval = self.plan.sample_interval
        config.write_text(agent_config(DEVICE, self.data_dir, self.proxy.port, interval))
        self.agent = self._agent("agent", config)
        if not await self.agent.start():
            raise RuntimeError(f"the agent did not start, see {self.agent.log}")

    async def _cli(self, *args: str) -> None:
        proc = await asyncio.create_subprocess_exec(
            *python("-m", "cloud.cli", *args),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        out, _ = await proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(f"cloud.cli {' '.join(args)}: {out.decode(errors='replace')}")

    def _serve_argv(self) -> list[str]:
        args = ["serve", "--listen", f"127.0.0.1:{self.port}", "--data", str(self.cloud_dir)]
        if self.plan.endpoint_debug:
            args = ["--log-level", "debug", *args]
        if self.plan.desired_poll is None:
            return python("-m", "cloud.cli", *args)
        # the poll interval is a module constant "tests may shorten"; serve has no option for it
        launcher = (
            "import sys, cloud.desired as d; d.POLL_INTERVAL = float(sys.argv[1]); "
            "from cloud.cli import main; sys.exit(main(sys.argv[2:]))"
        )
        return python("-c", launcher, str(self.plan.desired_poll), *args)

    def _agent(self, name: str, config: Path) -> Managed:
        def argv(run: int) -> list[str]:
            return python(
                "-m", "agent.service.cli", "run", "--config", str(config),
                "--simulate", "pump", "--time-scale", str(self.plan.time_scale),
                "--seed", str(self.plan.seed * 1000 + run), "--log-level", "debug",
            )  # fmt: skip

        return Managed(
            name, argv, self.logdir, "event=start device=", self.crashes,
            start_timeout=self.plan.start_timeout,
        )  # fmt: skip

    async def cleanup(self) -> None:
        for proc in (self.disk_agent, self.agent, self.endpoint):
            if proc is not None:
                with contextlib.suppress(Exception):
                    await proc.close()
        if self.proxy is not None:
            with contextlib.suppress(Exception):
                await self.proxy.stop()
        if self.fs is not None:
            await asyncio.to_thread(self._close_fs, self.fs)
        await asyncio.to_thread(attacks.unmount, self.disk_dir)

    def _close_fs(self, fs: PowerCutFS) -> None:
        try:
            fs.close()
        except Exception as err:
            self.report.errors.append(f"power-cut file system did not close: {err}")
        if os.path.ismount(self.data_dir):
            subprocess.run(["fusermount3", "-u", "-z", str(self.data_dir)], check=False)

    # -- the lanes -------------------------------------------------------------------------------

    def _mark(self, kind: str, detail: str = "") -> None:
        self.report.timeline.append((time.monotonic() - self.started, kind, detail))

    async def main_lane(self) -> None:
        datagrams = malformed_datagrams(self.plan.datagrams, self.plan.seed, DEVICE)
        bursts = max(1, self.plan.datagram_bursts)
        size = max(1, -(-len(datagrams) // bursts))
        chunks = [datagrams[i : i + size] for i in range(0, len(datagrams), size)]
        corruption = 0
        for kind, pause in schedule(self.plan):
            await asyncio.sleep(pause)
            if kind == AGENT_KILL:
                await self._agent_kill()
            elif kind == ENDPOINT_KILL:
                await self._endpoint_kill()
            elif kind == POWER_CUT:
                await self._power_cut()
            elif kind == CORRUPT:
                corruption += 1
                await self._corrupt(corruption)
            elif kind == FLOOD and chunks:
                await self._flood(chunks.pop(0))

    async def _agent_kill(self) -> None:
        assert self.agent is not None
        self._mark(AGENT_KILL)
        await self.agent.kill_and_start()
        self.report.agent_sigkills += 1

    async def _endpoint_kill(self) -> None:
        assert self.endpoint is not None
        self._mark(ENDPOINT_KILL)
        if await self.endpoint.kill():
            self.report.endpoint_sigkills += 1
        await asyncio.sleep(self.rng.uniform(0.2, 1.5))
        await self.endpoint.start()

    async def _power_cut(self) -> None:
        assert self.agent is not None and self.fs is not None
        fs = self.fs

        def cut(pids: list[int]) -> None:
            stats = fs.cut(kill=pids)
            self.report.cut_pending_bytes += stats.pending_bytes
            self.report.cut_rolled_back += stats.rolled_back

        self._mark(POWER_CUT)
        await self.agent.restart_after(cut)
        self.report.power_cuts += 1

    async def _corrupt(self, n: int) -> None:
        assert self.agent is not None and self.proxy is not None
        self._mark(CORRUPT, f"outage {self.plan.backlog_seconds:g} s first")
        self.proxy.outage(True)
        try:
            await asyncio.sleep(self.plan.backlog_seconds)
            where, queue = self.workdir / f"damage-{n}", self.data_dir / "queue.db"

            def work() -> None:
                d = damage(queue, where, self.plan.corrupt_pages, self.rng)
                self.report.damages.append(d)

            await self.agent.stopped_for(work)
        finally:
            self.proxy.outage(False)

    async def _flood(self, chunk: list[Datagram]) -> None:
        assert self.endpoint is not None
        self._mark(FLOOD, f"{len(chunk)} datagrams")
        async with self.endpoint.lock:  # no endpoint restart in the middle of a measurement
            result = await attacks.flood(self.port, chunk, self.endpoint.log)
        self.report.flood.merge(result)

    async def documents_lane(self) -> None:
        """Each hostile document in turn; the next one once the agent received this one (its
        log says ``event=desired_document rev=...``) or ``doc_wait`` ran out."""
        assert self.agent is not None
        agent, plan = self.agent, self.plan
        docs = hostile_desired_documents(plan.documents, plan.seed)
        writer = attacks.DesiredWriter(self.cloud_db, DEVICE)
        report = self.report.documents
        await asyncio.sleep(2.0)  # the agent observes by then
        for doc in docs:
            try:
                parsed = statedoc.DesiredDoc.from_cbor(doc.payload)
                rev = await asyncio.to_thread(writer.write, doc)
            except statedoc.StateError:
                report.unwritable += 1
                continue
            report.written += 1
            self._mark("desired_document", f"rev {rev}")
            report.bad_keys += len(doc.bad)
            self.written_revs.add(rev)
            self.bad_pairs |= {(k, parsed.entries[k].version) for k in doc.bad}
            await asyncio.sleep(plan.doc_spacing)
            deadline = time.monotonic() + plan.doc_wait
            while time.monotonic() < deadline:
                self.tail.update(agent.logs)
                if rev in self.tail.revisions:
                    break
                await asyncio.sleep(0.1)

    async def disk_lane(self) -> None:
        plan, phase = self.plan, self.report.disk
        if plan.disk_fills <= 0:
            return
        if os.geteuid() != 0:
            phase.note = "mounting a tmpfs needs root"
            self.report.notes.append(f"disk fill not run: {phase.note}")
            return
        await asyncio.sleep(self.disk_rng.uniform(1.0, 3.0))
        try:
            await asyncio.to_thread(attacks.mount_tmpfs, self.disk_dir, plan.disk_tmpfs_mb)
        except (subprocess.CalledProcessError, OSError) as err:
            phase.note = f"cannot mount a tmpfs: {getattr(err, 'stderr', err)}"
            self.report.notes.append(f"disk fill not run: {phase.note}")
            return
        phase.ran = True
        try:
            await self._disk_cycles()
        finally:
            if self.disk_agent is not None:
                await self.disk_agent.close()
            # kept for a post-mortem (at most the tmpfs's few MiB)
            await asyncio.to_thread(
                shutil.copytree, self.disk_dir, self.workdir / "small-disk-at-end",
                ignore=shutil.ignore_patterns("*.sock"), dirs_exist_ok=True,
            )  # fmt: skip
            await asyncio.to_thread(attacks.unmount, self.disk_dir)

    async def _disk_cycles(self) -> None:
        plan, phase = self.plan, self.report.disk
        credential = self.disk_dir / "credential.json"
        shutil.copyfile(self.workdir / "disk-credential.json", credential)
        credential.chmod(0o600)
        assert self.proxy is not None
        config = self.workdir / "disk-agent.toml"
        text = agent_config(DISK_DEVICE, self.disk_dir, self.proxy.port, plan.sample_interval)
        config.write_text(text)
        self.disk_agent = agent = self._agent("disk-agent", config)
        if not await agent.start():
            return
        ballast = self.disk_dir / "ballast"
        for _ in range(plan.disk_fills):
            await asyncio.sleep(self.disk_rng.uniform(2.0, 4.0))
            self._mark("disk_full")
            phase.ballast_bytes.append(await asyncio.to_thread(attacks.fill, ballast))
            phase.fills += 1
            await asyncio.sleep(plan.disk_full_seconds / 2)
            if plan.disk_full_restart:
                self._mark("disk_agent_sigkill", "on the full disk")
                await agent.kill_and_start()
                self.report.disk_agent_sigkills += 1
                phase.restarts_while_full += 1
            await asyncio.sleep(plan.disk_full_seconds / 2)
            ballast.unlink()
            self._mark("disk_emptied")
        await asyncio.sleep(3.0)
        books = Books(DISK_DEVICE)
        await self._drain(agent, books, ledger.Tail(), destroyed=set())
        await agent.terminate()
        books.committed = ledger.committed_all(agent.logs)
        self._finish_books(books, ledger.queued_seqs(self.disk_dir / "queue.db"), agent.logs)
        phase.disk_full_events = ledger.count_in(agent.logs, "event=disk_full ")
        phase.dropped_telemetry = ledger.count_in(agent.logs, "event=store_full ")
        self.disk_books = books

    # -- the end ---------------------------------------------------------------------------------

    async def _drain(
        self, agent: Managed, books: Books, tail: ledger.Tail, destroyed: set[int]
    ) -> float | None:
        """Wait until every seq the agent's logs name as committed (but not destroyed) is stored;
        the seconds it took, or None when ``drain_timeout`` ran out or a record stayed missing
        for ``stall_timeout`` (stuck: more time would not help)."""
        started = time.monotonic()
        since: dict[int, float] = {}  # missing seq -> when the drain first saw it missing
        while True:
            tail.update(agent.logs)
            want = tail.committed - destroyed
            stored = await asyncio.to_thread(ledger.stored_seqs, self.cloud_db, books.device)
            missing = want - stored
            now = time.monotonic()
            if want and not missing:
                books.drained_to = max(want)
                return now - started
            since = {seq: since.get(seq, now) for seq in missing}
            oldest = min(since.values())
            if now - started > self.plan.drain_timeout or now - oldest > self.plan.stall_timeout:
                # what was committed GRACE seconds before this had its chance to be delivered
                old = [s for s in want if tail.seen_at.get(s, now) <= now - GRACE]
                books.drained_to = max(old, default=0)
                self.report.notes.append(
                    f"{books.device}: {len(missing)} committed records not stored when the drain "
                    f"gave up after {now - started:.0f} s"
                )
                return None
            await asyncio.sleep(POLL)

    def _finish_books(self, books: Books, queued: set[int] | None, logs: list[Path]) -> None:
        """Stored seqs, duplicates, and what the stopped agent's queue still holds."""
        books.stored = ledger.stored_seqs(self.cloud_db, books.device)
        dup = ledger.duplicates(self.cloud_db, books.device)
        books.same_seq = dup.same_seq
        runs = ledger.committed_by_run(logs)
        for group in dup.same_body:
            if ledger.separate_commits(group, runs):
                books.equal_readings.append(group)
            else:
                books.same_body.append(group)
        if queued is None:
            books.queue_unreadable = True
            queued = set()
        waiting = (queued & books.committed) - books.stored
        books.pending = {s for s in waiting if s > books.drained_to}
        books.stuck = waiting - books.pending

    async def finish(self) -> None:
        assert self.agent is not None and self.endpoint is not None and self.proxy is not None
        self.proxy.outage(False)
        books = Books(DEVICE)
        destroyed = set().union(*(d.destroyed for d in self.report.damages))
        self.report.drain_seconds = await self._drain(self.agent, books, self.tail, destroyed)
        await self.agent.terminate()
        await asyncio.sleep(LATE_ARRIVALS)
        await self.endpoint.terminate()
        self.report.books.append(books)

    def account(self) -> None:
        """The books, after every process stopped and the power-cut file system closed (its
        backing directory then holds the agent's files as they were at the stop)."""
        report = self.report
        agent_logs = self.agent.logs if self.agent is not None else []
        books = report.books[0] if report.books else Books(DEVICE)
        if not report.books:
            report.books.append(books)
        books.committed = ledger.committed_all(agent_logs)
        stored_now = ledger.stored_seqs(self.cloud_db, DEVICE) if self.cloud_db.exists() else set()
        destroyed = set().union(*(d.destroyed for d in report.damages))
        books.destroyed = destroyed - stored_now
        if self.cloud_db.exists():
            queued = ledger.queued_seqs(self.backing / "queue.db")
            self._finish_books(books, queued, agent_logs)
        if self.disk_books is not None:
            report.books.append(self.disk_books)
        report.salvage_lines = [(s.salvaged, s.lost) for s in ledger.salvages_in(agent_logs)]
        report.tracebacks = ledger.tracebacks(sorted(self.logdir.glob("*.log")))
        endpoint_logs = self.endpoint.logs if self.endpoint is not None else []
        report.seq_conflicts = ledger.count_in(endpoint_logs, "event=seq_conflict")
        docs = report.documents
        docs.seen = len(ledger.documents_seen(agent_logs) & self.written_revs)
        docs.hostile_applied = [p for p in ledger.applied_keys(agent_logs) if p in self.bad_pairs]
        if report.flood.sent and report.flood.rcvbuf_errors:
            report.notes.append(
                f"{report.flood.rcvbuf_errors} UDP datagrams were dropped by the host's receive "
                "buffers during the flood (host-wide counter): those never reached the endpoint"
            )
        if self.plan.endpoint_debug:
            report.notes.append(
                "the endpoint logged at debug level: log_bytes_per_bad_datagram is not the "
                "figure of an endpoint as shipped (info)"
            )
        if self.plan.desired_poll is not None:
            report.notes.append(
                f"the endpoint ran with cloud.desired.POLL_INTERVAL = {self.plan.desired_poll} s "
                "(shipped: 1 s) so that documents written to its database reach the agent sooner"
            )
        report.elapsed = time.monotonic() - self.started
        with (self.workdir / "timeline.txt").open("w") as f:
            for at, kind, detail in report.timeline:
                f.write(f"{at:8.1f} s  {kind} {detail}\n")


async def run_chaos_async(plan: Plan, workdir: Path) -> Report:
    """Run ``plan`` with every file under ``workdir`` (module docstring); the report says what
    happened, also when the harness itself failed (``report.errors``)."""
    run = ChaosRun(plan, workdir)
    try:
        await run.setup()
        results = await asyncio.gather(
            run.main_lane(), run.documents_lane(), run.disk_lane(), return_exceptions=True
        )
        for name, result in zip(("main", "documents", "disk"), results, strict=True):
            if isinstance(result, BaseException):
                run.report.errors.append(f"{name} lane: {type(result).__name__}: {result}")
                _save_traceback(run.workdir, result)
        await run.finish()
    except Exception as err:
        run.report.errors.append(f"{type(err).__name__}: {err}")
        _save_traceback(run.workdir, err)
    finally:
        await run.cleanup()
    try:
        run.account()
    except Exception as err:
        run.report.errors.append(f"accounting: {type(err).__name__}: {err}")
        _save_traceback(run.workdir, err)
    return run.report


def _save_traceback(workdir: Path, err: BaseException) -> None:
    """The harness's own failures go to harness-errors.txt (not a log the report counts)."""
    with (workdir / "harness-errors.txt").open("a") as f:
        f.write("".join(traceback.format_exception(err)) + "\n")


def run_chaos(plan: Plan, workdir: Path) -> Report:
    """Run ``plan`` (see :func:`run_chaos_async`) in a new event loop."""
    workdir.mkdir(parents=True, exist_ok=True)
    return asyncio.run(run_chaos_async(plan, workdir))
