"""The learning client against an endpoint that misbehaves: a real aiocoap server on loopback, the
real transport and the real client (its loop, its training process, its files and privacy ledger).

Attacks and faults:

- a round task whose masters the endpoint never serves (5.03 forever), with a deadline 2**40 s
  ahead: it used to hold all federated learning on the device until then (rounds ran one at a
  time, each until its deadline): a newer task for the same model, a task for another model and
  withdrawing the task all waited, and nothing was reported about the stuck round;
- a task replaced or withdrawn while its round trains or uploads: the round is cancelled, and the
  files and the privacy ledger stay consistent (a charged update is never trained again);
- a task with a huge job id (2**53 - 1) that ended failed: every later job of its model counted
  as done, across restarts;
- renaming jobs to reset the privacy budget.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiocoap
import aiocoap.resource
import numpy as np
import pytest
from aiocoap import Code, Message

import agent.learn.client as learn_client
from agent.learn.autoencoder import DenseAutoencoder
from agent.learn.client import LearningClient
from agent.learn.ledger import PrivacyLedger
from agent.learn.settings import LearnSettings
from agent.sync.transport import CoapTransport, Endpoints
from agent.wire.learning import Masters, ModelUpdate, RoundTask, ScoreSummary
from drivers.clock import RealClock
from tools.ports import free_port

pytestmark = pytest.mark.timeout(90)

DEVICE = "pump-a"
WAIT = 30.0  # at most this long for a state the client reaches in well under a second


class Learn(aiocoap.resource.Resource, aiocoap.resource.PathCapable):
    """``GET /learn/masters/<sha256>`` and ``POST /learn/<device>``: each path answered by
    ``routes`` (bytes: 2.05 with them; a Code: that code; absent: 4.04), every request logged."""

    def __init__(self) -> None:
        super().__init__()
        self.routes: dict[str, bytes | Code] = {}
        self.log: list[str] = []
        self.posts: list[bytes] = []

    async def needs_blockwise_assembly(self, request: Message) -> bool:
        return True

    async def render(self, request: Message) -> Message:
        path = "/".join(request.opt.uri_path)
        self.log.append(path)
        if request.code == Code.POST:
            self.posts.append(request.payload)
        answer = self.routes.get(path)
        if answer is None:
            return Message(code=Code.NOT_FOUND, payload=b"no such thing")
        if isinstance(answer, Code):
            return Message(code=answer, payload=b"not now")
        return Message(code=Code.CONTENT, payload=answer, content_format=60)

    def asked(self, sha: str) -> int:
        return self.log.count(f"masters/{sha}")


@pytest.fixture
async def endpoint(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[tuple[str, Learn]]:
    monkeypatch.setattr(learn_client, "RETRY", 0.05)
    resource = Learn()
    site = aiocoap.resource.Site()
    site.add_resource(["learn"], resource)
    port = free_port()
    ctx = await aiocoap.Context.create_server_context(
        site, bind=("127.0.0.1", port), transports=["udp6"]
    )
    yield f"coap://127.0.0.1:{port}", resource
    await ctx.shutdown()


class Device:
    """A learning client on ``data_dir`` running its loop, with a transport of its own."""

    def __init__(self, uri: str, data_dir: Path, settings: LearnSettings | None = None) -> None:
        data_dir.mkdir(exist_ok=True)
        self.transport = CoapTransport(RealClock())
        self.client = LearningClient(
            settings or LearnSettings(windows=16, min_windows=1),
            self.transport,
            Endpoints((uri,), RealClock()),
            RealClock(),
            device_id=DEVICE,
            data_dir=data_dir,
            window_shape=lambda: (4, 8),
        )
        rng = np.random.default_rng(3)
        for _ in range(self.client.ring.capacity):
            self.client.ring.add(rng.normal(size=32).astype(np.float32))
        self.loop: asyncio.Task[None] | None = None

    def start(self) -> Device:
        self.loop = asyncio.create_task(self.client.run())
        return self

    def st(self, model: str = "skab-ae") -> dict[str, Any]:
        return self.client.status()["models"].get(model, {})

    async def stop(self) -> None:
        if self.loop is not None:
            self.loop.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.loop
        await self.transport.close()


async def until(what: Callable[[], object], why: str) -> None:
    """Wait for ``what()`` to hold (a bound on a hang, not a timing assertion)."""
    end = time.monotonic() + WAIT
    while not what():
        if time.monotonic() > end:
            raise AssertionError(f"never: {why}")
        await asyncio.sleep(0.01)


def serve_masters(learn: Learn) -> str:
    """A small model's masters served by ``learn`` (uploads answered 2.04); their SHA-256."""
    model = DenseAutoencoder.initial(32, 16, 4, np.random.default_rng(1))
    masters = Masters("skab-ae", (32, 16, 4, 16, 32), model.to_vector()).to_cbor()
    sha = hashlib.sha256(masters).hexdigest()
    learn.routes[f"masters/{sha}"] = masters
    learn.routes[DEVICE] = Code.CHANGED
    return sha


def task(job: int, masters: str, *, rnd: int = 1, deadline: float | None = None, **kw: Any) -> dict:
    return {
        "job": job,
        "round": rnd,
        "base": "1.0.0",
        "masters": masters,
        "deadline": int(time.time() + 600) if deadline is None else int(deadline),
        "epochs": 1,
        "lr": 0.001,
        "mu": 0.0,
        "clip": 0.3,
        "noise": 0.5,
    } | kw


A, B, C = "a" * 64, "b" * 64, "c" * 64


async def test_a_round_stuck_on_masters_blocks_no_newer_task_no_other_model_and_no_withdrawal(
    endpoint: tuple[str, Learn], tmp_path: Path
) -> None:
    """Attack: the masters of job 1 are answered 5.03 forever and its deadline is 2**40 s ahead.
    Was: the device asked for them until then and did nothing else; B and C were never asked for
    and the reported learn/skab-ae said nothing."""
    uri, learn = endpoint
    learn.routes[f"masters/{A}"] = Code.SERVICE_UNAVAILABLE
    dev = Device(uri, tmp_path).start()
    try:
        dev.client.apply("skab-ae", task(1, A, deadline=2**40))
        await until(lambda: learn.asked(A) > 1, "the masters asked for again")

        dev.client.apply("other", task(3, C))  # another model's round: not behind skab-ae's
        await until(lambda: learn.asked(C) > 0, "the other model's masters asked for")
        await until(lambda: dev.st("other").get("status") == "waiting", "other reported")
        assert "4.04" in dev.st("other")["reason"]
        st = dev.st()  # the stuck round says so, and its deadline is capped, not 2**40
        assert (st["job"], st["status"], st["reason"]) == (
            1,
            "waiting",
            "masters: the endpoint answered 5.03",
        )
        assert st["deadline"] <= time.time() + learn_client.MAX_AHEAD + 1

        dev.client.apply("skab-ae", task(2, B))  # the endpoint corrects the task
        await until(lambda: learn.asked(B) > 0, "the newer task's masters asked for")
        await until(lambda: dev.st().get("job") == 2, "the newer task reported")
        asked = learn.asked(A)
        await until(lambda: learn.asked(B) > 3, "the newer task retried")
        assert learn.asked(A) == asked  # the replaced round is gone, not running beside it

        dev.client.apply("skab-ae", None)  # withdrawn
        await until(lambda: dev.st().get("status") == "withdrawn", "the withdrawal reported")
        assert dev.st()["reason"] == "withdrawn by the endpoint"
        assert dev.st("other")["status"] == "waiting"  # the other model's round goes on
    finally:
        await dev.stop()


def _round_files(data_dir: Path) -> list[str]:
    return sorted(p.name for p in data_dir.glob("learn-*-*"))


def _workers() -> list[int]:
    """Training processes (agent.learn.worker) this test process started and not reaped."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == os.getpid() and b"agent.learn.worker" in cmd:
            found.append(int(pid))
    return found


async def test_a_round_withdrawn_while_training_kills_its_worker_and_charges_nothing(
    endpoint: tuple[str, Learn], tmp_path: Path
) -> None:
    """Was: the round trained to the end, charged the ledger and uploaded after the endpoint
    withdrew it. Now the training process is killed at once, its job file (the device's windows)
    removed, nothing charged or sent, and the round can be taken again from the start."""
    uri, learn = endpoint
    sizes = (32, 256, 32, 256, 32)  # big enough that training lasts well beyond the withdrawal
    model = DenseAutoencoder.initial(32, 256, 32, np.random.default_rng(1))
    masters = Masters("skab-ae", sizes, model.to_vector()).to_cbor()
    sha = hashlib.sha256(masters).hexdigest()
    learn.routes[f"masters/{sha}"] = masters
    learn.routes[f"{DEVICE}"] = Code.CHANGED
    dev = Device(uri, tmp_path, LearnSettings(windows=2048, min_windows=16)).start()
    try:
        dev.client.apply("skab-ae", task(5, sha, epochs=100))
        await until(lambda: _workers(), "the training process started")
        dev.client.apply("skab-ae", None)
        await until(lambda: dev.st().get("status") == "withdrawn", "the withdrawal reported")
        await until(lambda: not _workers(), "the training process killed and reaped")
        assert _round_files(tmp_path) == []  # no job file, no update, no half-written one
        assert dev.client.ledger.charged == [] and dev.client.status()["epsilon_spent"] == 0.0
        assert learn.posts == []
        assert not dev.client._done("skab-ae", RoundTask.from_value(task(5, sha)))  # taken again
    finally:
        await dev.stop()
    assert PrivacyLedger(tmp_path / "learn-privacy.json", 200.0, 1e-5).charged == []


async def test_an_update_trained_but_not_charged_when_its_round_is_replaced_never_leaves(
    endpoint: tuple[str, Learn], tmp_path: Path
) -> None:
    """Attack: the endpoint replaces a round's task (noise 0.5) by one for the same round with
    more noise (5.0) just as the training process has written its update, before the ledger
    charged it (the cancellation lands at one of the round's awaits after the worker exited).
    Was: the update stayed on disk, the new task found it as "trained before a restart", charged
    the round at noise 5.0 and sent the update noised at 0.5: the ledger counted less privacy
    than the device released. Now an update not charged goes with its cancelled round, and the
    new task trains one of its own, at its own noise."""
    uri, learn = endpoint
    sha = serve_masters(learn)
    dev = Device(uri, tmp_path).start()
    real_worker = dev.client._run_worker
    trained: list[bytes] = []

    async def worker(t: RoundTask, job: Path, out: Path) -> bool:
        ok = await real_worker(t, job, out)
        trained.append(await asyncio.to_thread(out.read_bytes))
        if len(trained) == 1:  # the endpoint's new task comes as the first update is written
            dev.client.apply("skab-ae", task(1, sha, noise=5.0))
            await asyncio.sleep(0)  # cancelled here, before the charge
        return ok

    dev.client._run_worker = worker  # type: ignore[method-assign]
    try:
        dev.client.apply("skab-ae", task(1, sha, noise=0.5))
        await until(lambda: dev.st().get("status") == "uploaded", "the new task uploaded")
        assert len(trained) == 2 and learn.posts == [trained[1]]  # noised at 5.0
        reference = PrivacyLedger(tmp_path / "reference.json", 200.0, 1e-5)
        reference.charge(1, 1, 5.0)
        assert dev.client.ledger.charged == ["1:1"]
        assert np.array_equal(dev.client.ledger.rdp, reference.rdp)
    finally:
        await dev.stop()


async def test_a_round_replaced_while_uploading_sends_its_charged_update_and_never_trains_again(
    endpoint: tuple[str, Learn], tmp_path: Path
) -> None:
    """The endpoint re-opens a round (a later deadline) while the device's upload of it is
    answered 5.03: the running attempt is cancelled, and the new one sends the same noisy update,
    charged once; a later round replacing it leaves the round charged, and taking the old round
    again fails rather than train (a second update, noised anew, would be spent privacy the
    ledger does not count)."""
    uri, learn = endpoint
    learn.routes[DEVICE] = Code.SERVICE_UNAVAILABLE
    update = ModelUpdate(1, 3, 10, np.zeros(8, np.float32), ScoreSummary.of(np.ones(20)), 0.1)
    (tmp_path / "learn-1-3.cbor").write_bytes(update.to_cbor())  # charged before a restart
    PrivacyLedger(tmp_path / "learn-privacy.json", 200.0, 1e-5).charge(1, 3, 0.5)
    dev = Device(uri, tmp_path).start()
    try:
        dev.client.apply("skab-ae", task(1, A, rnd=3))
        await until(lambda: len(learn.posts) > 1, "the upload retried")
        assert dev.st()["status"] == "uploading" and dev.client.ledger.charged == ["1:3"]
        assert dev.st()["reason"] == "the endpoint answered 5.03"
        one = dev.client.ledger.rdp.copy()

        learn.routes[DEVICE] = Code.CHANGED
        dev.client.apply("skab-ae", task(1, A, rnd=3, deadline=time.time() + 900))  # re-opened
        await until(lambda: dev.st().get("status") == "uploaded", "the re-opened attempt sent")
        assert set(learn.posts) == {update.to_cbor()}  # the same update each time
        assert dev.client.ledger.charged == ["1:3"] and np.array_equal(dev.client.ledger.rdp, one)
        assert learn.asked(A) == 0  # never trained

        learn.routes[DEVICE] = Code.SERVICE_UNAVAILABLE
        (tmp_path / "learn-1-4.cbor").write_bytes(
            ModelUpdate(1, 4, 10, update.delta, update.scores, 0.1).to_cbor()
        )
        dev.client.ledger.charge(1, 4, 0.5)  # as if charged before a restart
        dev.client.apply("skab-ae", task(1, A, rnd=4))
        await until(lambda: dev.st().get("reason") == "the endpoint answered 5.03", "round 4")
        dev.client.apply("skab-ae", task(1, B, rnd=5))  # replaced while uploading round 4
        await until(lambda: dev.st().get("round") == 5, "round 5 taken")
        assert "1:4" in dev.client.ledger.charged and not (tmp_path / "learn-1-4.cbor").exists()
        dev.client.apply("skab-ae", task(1, A, rnd=4, deadline=time.time() + 900))  # stale
        await until(lambda: dev.st().get("round") == 4, "round 4 again")
        await until(lambda: dev.st().get("status") == "failed", "round 4 refused to train")
        assert "charged already" in dev.st()["error"] and learn.asked(A) == 0
    finally:
        await dev.stop()


async def test_a_task_with_a_huge_job_id_does_not_end_later_jobs_across_restarts(
    endpoint: tuple[str, Learn], tmp_path: Path
) -> None:
    """Attack: job 2**53 - 1 (accepted: up to 2**62), its masters not what the task names, so
    the round fails and learn.json keeps it. Was: jobs 7 and then 8 (after a restart) counted as
    done and were never fetched."""
    uri, learn = endpoint
    poison = "d" * 64
    learn.routes[f"masters/{poison}"] = b"\xa0"  # not the document the task names
    learn.routes[f"masters/{B}"] = learn.routes[f"masters/{C}"] = Code.SERVICE_UNAVAILABLE
    dev = Device(uri, tmp_path).start()
    try:
        dev.client.apply("skab-ae", task(2**53 - 1, poison))
        await until(lambda: dev.st().get("status") == "failed", "the poison round failed")
        dev.client.apply("skab-ae", task(7, B))
        await until(lambda: learn.asked(B) > 0, "job 7 taken")
    finally:
        await dev.stop()
    assert '"job": 9007199254740991' in (tmp_path / "learn.json").read_text()
    again = Device(uri, tmp_path).start()  # a restart, with learn.json as the poison left it
    try:
        again.client.apply("skab-ae", task(8, C))
        await until(lambda: learn.asked(C) > 0, "job 8 taken after a restart")
        await until(lambda: again.st().get("job") == 8, "job 8 reported")
    finally:
        await again.stop()


async def test_a_stale_round_of_the_same_job_is_still_skipped(
    endpoint: tuple[str, Learn], tmp_path: Path
) -> None:
    """Replay within a job: once round 3 of job 1 was uploaded, its round 2 sent again is done
    (not fetched, not trained), as is round 3 itself."""
    uri, learn = endpoint
    learn.routes[DEVICE] = Code.CHANGED
    update = ModelUpdate(1, 3, 10, np.zeros(8, np.float32), ScoreSummary.of(np.ones(20)), 0.1)
    (tmp_path / "learn-1-3.cbor").write_bytes(update.to_cbor())  # charged before a restart
    PrivacyLedger(tmp_path / "learn-privacy.json", 200.0, 1e-5).charge(1, 3, 0.5)
    dev = Device(uri, tmp_path).start()
    try:
        dev.client.apply("skab-ae", task(1, A, rnd=3))
        await until(lambda: dev.st().get("status") == "uploaded", "round 3 uploaded")
        for stale in (task(1, B, rnd=2), task(1, C, rnd=3, deadline=time.time() + 900)):
            dev.client.apply("skab-ae", stale)
            assert dev.client._done("skab-ae", dev.client._tasks["skab-ae"])
        await asyncio.sleep(0)
        assert learn.asked(B) == learn.asked(C) == 0 and dev.st()["round"] == 3
    finally:
        await dev.stop()


async def test_renaming_a_job_does_not_reset_the_privacy_budget(
    endpoint: tuple[str, Learn], tmp_path: Path
) -> None:
    """Attack: the endpoint has spent the device's budget on job 1 and asks for the 'same' round
    under a new job id (a huge one, a small one, after a restart). Every (job, round) is charged
    in full to one ledger whatever its id: the rounds are refused before any training."""
    uri, learn = endpoint
    learn.routes[f"masters/{A}"] = Code.SERVICE_UNAVAILABLE
    ledger = PrivacyLedger(tmp_path / "learn-privacy.json", 200.0, 1e-5)
    ledger.charge(1, 1, 0.5)
    budget = ledger.spent() + 1.0  # room for no second round at noise 0.5
    settings = LearnSettings(windows=16, min_windows=1, epsilon_budget=budget)
    for i, job in enumerate((2**53 - 1, 2, 2**62)):
        dev = Device(uri, tmp_path, settings).start()
        try:
            dev.client.apply("skab-ae", task(job, A))
            refused = lambda d=dev: d.st().get("status") == "refused"  # noqa: E731
            await until(refused, f"job {job} refused ({i})")
            assert "privacy budget" in dev.st()["error"]
        finally:
            await dev.stop()
    assert learn.asked(A) == 0
    assert PrivacyLedger(tmp_path / "learn-privacy.json", budget, 1e-5).charged == ["1:1"]


async def test_an_update_kept_across_a_restart_but_never_charged_is_made_again_under_the_task(
    endpoint: tuple[str, Learn], tmp_path: Path
) -> None:
    """Attack: the agent stopped between its training process writing round 3's update (noised
    at 0.5) and the ledger charging it; after the restart the endpoint sends round 3 with noise
    5.0. Was: the kept update was charged at 5.0 and sent, so the ledger counted less than the
    device released. Now an update never charged (nothing of it left) is made again under the
    task in force."""
    uri, learn = endpoint
    learn.routes[f"masters/{A}"] = Code.SERVICE_UNAVAILABLE  # the new training waits for them
    update = ModelUpdate(1, 3, 10, np.zeros(8, np.float32), ScoreSummary.of(np.ones(20)), 0.1)
    (tmp_path / "learn-1-3.cbor").write_bytes(update.to_cbor())  # written, never charged
    dev = Device(uri, tmp_path).start()
    try:
        dev.client.apply("skab-ae", task(1, A, rnd=3, noise=5.0))
        await until(lambda: learn.asked(A) > 0, "the masters asked for: made again")
        assert learn.posts == [] and dev.client.ledger.charged == []
        assert not (tmp_path / "learn-1-3.cbor").exists()
    finally:
        await dev.stop()


async def test_a_round_replaced_while_the_ledger_charges_it_sends_the_update_charged(
    endpoint: tuple[str, Learn], tmp_path: Path
) -> None:
    """Attack: the endpoint replaces round 1's task (noise 5.0) by one for the same round with
    less noise (0.5) while the ledger is writing the charge of the update trained at 5.0 (in
    its thread: cancelling the round does not stop it). Was: the new round found the update not
    charged yet, removed it and trained another at 0.5; its charge found the round charged (at
    5.0, by the thread) and sent the update noised at 0.5: the ledger counted less than the
    device released. Now a cancelled round ends once its charge is written, and the new round
    sends the update that charge counts."""
    uri, learn = endpoint
    sha = serve_masters(learn)
    dev = Device(uri, tmp_path).start()
    ledger = dev.client.ledger
    real_worker, real_write = dev.client._run_worker, ledger._write
    trained: list[bytes] = []
    writing, release = threading.Event(), threading.Event()

    async def worker(t: RoundTask, job: Path, out: Path) -> bool:
        ok = await real_worker(t, job, out)
        trained.append(await asyncio.to_thread(out.read_bytes))
        return ok

    def write(*args: Any) -> None:  # the charge's durable write, under the ledger's lock
        if not writing.is_set():
            writing.set()
            release.wait(3.0)  # released once the new round looked (or after 3 s if it waits)
        real_write(*args)

    class Looked(list):  # the ledger's charged rounds: the new round's second look releases
        looks = 0

        def __contains__(self, key: object) -> bool:
            found = super().__contains__(key)
            if writing.is_set():
                Looked.looks += 1
                if Looked.looks == 2:  # ledger.check, then _round's own look
                    release.set()
            return found

    dev.client._run_worker = worker  # type: ignore[method-assign]
    ledger._write = write  # type: ignore[method-assign]
    ledger.charged = Looked()
    try:
        dev.client.apply("skab-ae", task(1, sha, noise=5.0))
        await until(writing.is_set, "the charge being written")
        dev.client.apply("skab-ae", task(1, sha, noise=0.5))
        await until(lambda: dev.st().get("status") == "uploaded", "round 1 uploaded")
        reference = PrivacyLedger(tmp_path / "reference.json", 200.0, 1e-5)
        reference.charge(1, 1, 5.0)
        assert list(ledger.charged) == ["1:1"]
        assert np.array_equal(ledger.rdp, reference.rdp)
        assert learn.posts == [trained[0]]  # the update the ledger charged
        assert len(trained) == 1
    finally:
        release.set()
        await dev.stop()


async def test_an_upload_cut_short_by_4_08_is_sent_again_not_given_up(
    endpoint: tuple[str, Learn], tmp_path: Path
) -> None:
    """Fault: the endpoint restarted (or its Block1 state expired on a slow link) while the
    update's blocks were on their way: the later block is answered 4.08, no upload in progress
    (cloud/protocol.py _Block1Uploads). Was: any 4.xx ended the round ``refused``, a status that
    stands for every attempt: the update charged to the ledger never delivered, the device out
    of the round. Now only the endpoint's refusals (4.00, 4.03, 4.04) end it; this answer is
    the reason of an ``uploading`` round, sent again until the deadline."""
    uri, learn = endpoint
    sha = serve_masters(learn)
    learn.routes[DEVICE] = Code.REQUEST_ENTITY_INCOMPLETE
    dev = Device(uri, tmp_path).start()
    try:
        dev.client.apply("skab-ae", task(1, sha))
        await until(lambda: learn.posts or dev.st().get("status") == "failed", "an upload")
        learn.routes[DEVICE] = Code.CHANGED  # the endpoint takes the next one
        ended = lambda: dev.st().get("status") in ("uploaded", "refused")  # noqa: E731
        await until(ended, "the round ended")
        assert dev.st()["status"] == "uploaded" and len(learn.posts) >= 2
        assert dev.client.ledger.charged == ["1:1"]
    finally:
        await dev.stop()


async def test_a_training_worker_that_writes_much_to_stderr_is_not_blocked_by_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Defect: the worker's stderr was a pipe read only after the worker exited; a worker that
    wrote more than the pipe holds (64 KiB: warnings of a library, a long traceback) blocked on
    it and the round waited until its deadline, then failed. Now it is read as it comes; the
    last 4 KiB are kept for the log line."""
    real = asyncio.create_subprocess_exec
    script = (
        "import pathlib, sys; sys.stderr.write('x' * 1_000_000 + 'the last line'); "
        "sys.stderr.flush(); pathlib.Path(sys.argv[2]).write_bytes(b'update')"
    )

    async def worker(program: str, *args: str, **kw: Any) -> Any:  # argv: -m module job out ...
        return await real(program, "-c", script, args[2], args[3], **kw)

    monkeypatch.setattr(asyncio, "create_subprocess_exec", worker)
    dev = Device("coap://127.0.0.1:9", tmp_path)
    try:
        rt = RoundTask.from_value(task(1, "0" * 64))
        out = tmp_path / "update.bin"
        done = await asyncio.wait_for(dev.client._run_worker(rt, tmp_path / "job", out), WAIT)
        assert done and out.read_bytes() == b"update"
        kept = await learn_client._tail(_Stream(b"y" * 10_000 + b"end"))  # type: ignore[arg-type]
        assert len(kept) == learn_client.STDERR_KEPT and kept.endswith(b"yend")
    finally:
        await dev.stop()


class _Stream:
    """A stream of ``data`` read in pieces."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    async def read(self, n: int) -> bytes:
        piece, self.data = self.data[:1000], self.data[1000:]
        return piece
