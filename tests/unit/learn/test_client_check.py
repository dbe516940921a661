"""The learning client in a checked round (agent/learn/client.py): it fetches the masters and the
incumbent by the SHA-256 each has in the task, and a round that only checks (``epochs`` 0)
sends the check and the summary, no weights, and charges nothing to the privacy ledger, which
lets a device answer at most as many such rounds as it has rounds charged. The
real client, its training process and files, against the scripted endpoint of
tests/unit/learn/test_client_hostile.py on loopback."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from aiocoap import Code

from agent.learn.autoencoder import DenseAutoencoder
from agent.learn.client import _trained
from agent.learn.ledger import LEDGER_FILE
from agent.wire.learning import Masters, ModelUpdate, Recall, RoundTask, ScoreSummary
from tests.unit.learn import test_client_hostile
from tests.unit.learn.test_client_hostile import DEVICE, Device, Learn, _round_files, task, until

pytestmark = pytest.mark.timeout(90)

endpoint = test_client_hostile.endpoint  # the fixture: a scripted /learn on loopback
SIZES = (32, 16, 4, 16, 32)


def weights(seed: int) -> Masters:
    return Masters(
        "skab-ae",
        SIZES,
        DenseAutoencoder.initial(32, 16, 4, np.random.default_rng(seed)).to_vector(),
    )


def served(learn: Learn, *docs: Masters) -> list[str]:
    """Serve ``docs`` at their SHA-256 and accept uploads; their SHA-256s."""
    learn.routes[DEVICE] = Code.CHANGED
    for doc in docs:
        learn.routes[f"masters/{doc.sha256()}"] = doc.to_cbor()
    return [doc.sha256() for doc in docs]


def check_task(masters: str, incumbent: str, *, rnd: int = 4, epochs: int = 0) -> dict:
    return task(1, masters, rnd=rnd, epochs=epochs, check=bytes.fromhex(incumbent))


def trained_before(dev: Device) -> None:
    """The device has one round charged (job 1 round 3): it may answer one round that only
    checks."""
    dev.client.ledger.charge(1, 3, 0.5)


async def test_a_check_only_round_fetches_both_by_sha256_sends_no_weights_and_charges_nothing(
    endpoint: tuple[str, Learn], tmp_path: Path
) -> None:
    uri, learn = endpoint
    masters, incumbent = served(learn, weights(1), weights(2))
    dev = Device(uri, tmp_path).start()
    trained_before(dev)
    spent = dev.client.status()["epsilon_spent"]
    try:
        dev.client.apply("skab-ae", check_task(masters, incumbent))
        await until(lambda: dev.st().get("status") == "uploaded", "the check uploaded")
        assert learn.asked(masters) == 1 and learn.asked(incumbent) == 1
        assert len(learn.posts) == 1
        sent = ModelUpdate.from_cbor(learn.posts[0], weights(1).weights.size)
        assert (sent.job, sent.round, sent.delta, sent.loss) == (1, 4, None, 0.0)
        assert isinstance(sent.recall, Recall) and sent.samples == dev.client.ring.capacity
        assert dev.client.ledger.charged == ["1:3"] and dev.client.ledger.checked == ["1:4"]
        assert dev.client.status()["epsilon_spent"] == spent  # nothing charged
        assert dev.st()["status"] == "uploaded" and _round_files(tmp_path) == []
    finally:
        await dev.stop()
    saved = json.loads((tmp_path / LEDGER_FILE).read_text())
    assert (saved["charged"], saved["checked"]) == (["1:3"], ["1:4"])


async def test_a_device_answers_no_more_checks_than_rounds_it_trained(
    endpoint: tuple[str, Learn], tmp_path: Path
) -> None:
    """Attack: an endpoint asks for one check-only round after another (each upload holds a
    score summary without noise of a model the endpoint chose, on the device's newest windows).
    A device with no round charged answers none; with one charged, one: the next is refused
    before anything is fetched. The one it answered, asked again, is answered (the same kept
    update, recorded once)."""
    uri, learn = endpoint
    masters, incumbent = served(learn, weights(1), weights(2))
    dev = Device(uri, tmp_path).start()
    try:
        dev.client.apply("skab-ae", check_task(masters, incumbent, rnd=4))
        await until(lambda: dev.st().get("status") == "refused", "the check refused")
        assert "0 answered, as many as the 0 rounds" in dev.st()["error"]
        assert learn.asked(masters) == 0 and learn.posts == []
        trained_before(dev)
        dev.client.apply(
            "skab-ae", task(2, masters, rnd=4, epochs=0, check=bytes.fromhex(incumbent))
        )
        await until(lambda: dev.st().get("status") == "uploaded", "one check answered")
        dev.client.apply(
            "skab-ae", task(3, masters, rnd=4, epochs=0, check=bytes.fromhex(incumbent))
        )
        await until(
            lambda: dev.st().get("job") == 3 and dev.st().get("status") == "refused",
            "the second refused",
        )
        assert len(learn.posts) == 1 and dev.client.ledger.checked == ["2:4"]
    finally:
        await dev.stop()


async def test_an_incumbent_the_endpoint_does_not_serve_leaves_the_round_waiting(
    endpoint: tuple[str, Learn], tmp_path: Path
) -> None:
    uri, learn = endpoint
    (masters,) = served(learn, weights(1))
    missing = weights(2).sha256()
    dev = Device(uri, tmp_path).start()
    trained_before(dev)
    try:
        dev.client.apply("skab-ae", check_task(masters, missing))
        await until(lambda: learn.asked(missing) > 1, "the incumbent asked for again")
        st = dev.st()
        assert (st["round"], st["status"]) == (4, "waiting")
        assert st["reason"] == "incumbent: the endpoint answered 4.04"
        assert learn.asked(masters) == 1 and learn.posts == []
    finally:
        await dev.stop()


async def test_a_checked_training_round_sends_weights_and_the_check_charged_once(
    endpoint: tuple[str, Learn], tmp_path: Path
) -> None:
    uri, learn = endpoint
    masters, incumbent = served(learn, weights(1), weights(2))
    dev = Device(uri, tmp_path).start()
    try:
        dev.client.apply("skab-ae", check_task(masters, incumbent, rnd=2, epochs=1))
        await until(lambda: dev.st().get("status") == "uploaded", "the round uploaded")
        sent = ModelUpdate.from_cbor(learn.posts[0], weights(1).weights.size)
        assert sent.round == 2 and sent.delta is not None and sent.recall is not None
        assert dev.client.ledger.charged == ["1:2"]
    finally:
        await dev.stop()


async def test_a_check_only_update_kept_across_a_restart_is_sent_as_it_is(
    endpoint: tuple[str, Learn], tmp_path: Path
) -> None:
    """The agent restarted after the check was recorded and before it was answered: the same
    update goes, nothing is fetched, and still nothing is charged."""
    uri, learn = endpoint
    masters, incumbent = served(learn, weights(1), weights(2))
    kept = ModelUpdate(1, 4, 16, None, ScoreSummary.of(np.ones(4)), 0.0, Recall(0.5, 0.25))
    (tmp_path / "learn-1-4.cbor").write_bytes(kept.to_cbor())
    dev = Device(uri, tmp_path).start()
    trained_before(dev)
    dev.client.ledger.check_only(1, 4, True)  # recorded before the restart
    try:
        dev.client.apply("skab-ae", check_task(masters, incumbent))
        await until(lambda: dev.st().get("status") == "uploaded", "the kept check uploaded")
        assert learn.posts == [kept.to_cbor()] and learn.asked(masters) == 0
        assert dev.client.ledger.charged == ["1:3"] and dev.client.ledger.checked == ["1:4"]
    finally:
        await dev.stop()


async def test_a_check_only_task_never_sends_a_training_update_kept_on_disk(
    endpoint: tuple[str, Learn], tmp_path: Path
) -> None:
    """Attack: an uncharged training update of job 1 round 4 is on disk (the agent stopped
    between the training process writing it and the ledger charging it), and the endpoint sends
    a task for that round with ``epochs`` 0. Was: the check-only round uploads any update file
    of its round as it is: the weights left and the ledger charged nothing. Now a kept file
    that is not a check is dropped and the round computes its check."""
    uri, learn = endpoint
    masters, incumbent = served(learn, weights(1), weights(2))
    size = weights(1).weights.size
    trained = ModelUpdate(
        1, 4, 16, np.full(size, 0.01, np.float32), ScoreSummary.of(np.ones(4)), 0.1
    )
    (tmp_path / "learn-1-4.cbor").write_bytes(trained.to_cbor())
    dev = Device(uri, tmp_path).start()
    trained_before(dev)
    try:
        dev.client.apply("skab-ae", check_task(masters, incumbent))
        await until(lambda: dev.st().get("status") == "uploaded", "the check uploaded")
        assert [ModelUpdate.from_cbor(p, size).delta is None for p in learn.posts] == [True]
        assert dev.client.ledger.charged == ["1:3"]
    finally:
        await dev.stop()


@pytest.mark.parametrize(
    ("epochs", "kept_weights"),
    [(0, True), (1, False)],
    ids=["weights-for-a-check-only-round", "a-check-for-a-training-round"],
)
def test_an_update_kept_of_the_other_kind_is_not_this_rounds(
    tmp_path: Path, epochs: int, kept_weights: bool
) -> None:
    out = tmp_path / "learn-1-4.cbor"
    delta = np.zeros(8, np.float32) if kept_weights else None
    summary = ScoreSummary.of(np.ones(4))
    out.write_bytes(ModelUpdate(1, 4, 10, delta, summary, 0.1, Recall(0.5, 0.5)).to_cbor())
    kind = RoundTask.from_value(check_task("ab" * 32, "cd" * 32, epochs=epochs))
    assert _trained(out, kind) is False and not out.exists()


async def test_the_incumbent_fetched_as_the_last_rounds_masters_is_not_fetched_again(
    endpoint: tuple[str, Learn], tmp_path: Path
) -> None:
    """Round 1 trains from A; round 2 trains from B and checks it against A (the incumbent):
    A, which the device fetched for round 1, is not asked for again."""
    uri, learn = endpoint
    a, b = served(learn, weights(1), weights(2))
    dev = Device(uri, tmp_path).start()
    try:
        dev.client.apply("skab-ae", task(1, a, rnd=1))
        await until(lambda: dev.st().get("status") == "uploaded", "round 1 uploaded")
        dev.client.apply("skab-ae", check_task(b, a, rnd=2, epochs=1))
        await until(
            lambda: dev.st().get("round") == 2 and dev.st().get("status") == "uploaded",
            "round 2 uploaded",
        )
        assert (learn.asked(a), learn.asked(b)) == (1, 1)
        sent = ModelUpdate.from_cbor(learn.posts[-1], weights(1).weights.size)
        assert sent.round == 2 and sent.recall is not None and sent.delta is not None
    finally:
        await dev.stop()


async def test_a_check_answered_whose_upload_is_gone_is_not_computed_again(
    endpoint: tuple[str, Learn], tmp_path: Path
) -> None:
    """Attack: the endpoint sends a check-only round the device answered (its upload sent and
    removed) again, under another model's key (or after another job's task), with other models
    to compare. Was: the ledger lets a round in ``checked`` through and no update was kept, so
    the device computed and sent a new summary and check of the endpoint's new models, as many
    times as it was asked, for one round charged. Now it fails, as a charged training round
    whose update is gone does."""
    uri, learn = endpoint
    masters, incumbent, other, other_incumbent = served(
        learn, weights(1), weights(2), weights(3), weights(4)
    )
    dev = Device(uri, tmp_path).start()
    trained_before(dev)
    try:
        dev.client.apply("skab-ae", check_task(masters, incumbent))
        await until(lambda: dev.st().get("status") == "uploaded", "the check uploaded")
        dev.client.apply("skab-ae2", check_task(other, other_incumbent))
        await until(lambda: dev.st("skab-ae2").get("status") == "failed", "the second failed")
        assert "answered already" in dev.st("skab-ae2")["error"]
        assert len(learn.posts) == 1 and learn.asked(other) == 0
        assert dev.client.ledger.checked == ["1:4"]
    finally:
        await dev.stop()
