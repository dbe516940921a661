"""agent/wire/learning.py, the check (cloud/learning.py): a round task names the incumbent's
SHA-256 in ``check`` (32 bytes on the wire, hex in memory; ``epochs`` 0 only with it), and an
upload carries ``recall`` (two fractions) with or without its ``delta``. Fixed expected bytes,
and hostile values refused as :class:`LearningError`."""

from __future__ import annotations

import math

import numpy as np
import pytest

from agent.wire import records, statedoc
from agent.wire.learning import (
    LearningError,
    ModelUpdate,
    Recall,
    RoundTask,
    ScoreSummary,
    learn_key,
)

MASTERS = "ab" * 32
INCUMBENT = "cd" * 32
SUMMARY = ScoreSummary(10, (0.1, 0.2, 0.3, 0.4, 0.5), 0.2, 0.1)


def task(**kw: object) -> RoundTask:
    d: dict = dict(
        job=1,
        round=4,
        base="1.0.0",
        masters=MASTERS,
        deadline=2_000_000_000,
        epochs=10,
        lr=2e-3,
        mu=0.01,
        clip=0.3,
        noise=0.5,
    )
    return RoundTask(**(d | kw))


def test_a_checked_task_carries_the_incumbent_as_32_bytes_and_decodes_to_hex() -> None:
    t = task(check=INCUMBENT)
    value = t.to_value()
    assert value["check"] == bytes.fromhex(INCUMBENT)
    wire = records.dumps(value)
    # the key "check", then a byte string of 32 (0x58 0x20): not 64 characters of hex
    assert b"\x65check\x58\x20" + bytes.fromhex(INCUMBENT) in wire
    assert len(wire) - len(records.dumps(task().to_value())) == 6 + 2 + 32
    back = RoundTask.from_value(records.loads(wire))
    assert back == t and back.check == INCUMBENT and not back.evaluate
    assert RoundTask.from_value(task().to_value()).check is None


def test_epochs_0_is_a_round_that_only_checks_and_needs_the_check() -> None:
    with pytest.raises(LearningError, match="epochs"):
        RoundTask.from_value(task(epochs=0).to_value())
    t = RoundTask.from_value(task(epochs=0, check=INCUMBENT).to_value())
    assert t.epochs == 0 and t.evaluate and t.check == INCUMBENT


@pytest.mark.parametrize(
    "check",
    [
        INCUMBENT,  # hex text, as in memory: not what the wire carries
        bytes(31),
        bytes(33),
        b"",
        0,
        True,
        [bytes(32)],
        {"sha": bytes(32)},
    ],
    ids=["hex-text", "31-bytes", "33-bytes", "empty", "int", "bool", "nested-list", "nested-map"],
)
def test_a_check_that_is_not_32_bytes_is_refused(check: object) -> None:
    value = task(epochs=0).to_value() | {"check": check}
    with pytest.raises(LearningError, match="check"):
        RoundTask.from_value(value)


def test_a_realistic_checked_task_fits_a_desired_value() -> None:
    """The endpoint's largest real task of a check round: a 6-digit job, the last round, a
    deadline past 2038, a base version of a release with a build tag."""
    t = task(job=999_999, round=10_000, base="1.0.0+fl12.9", deadline=2**33, check=INCUMBENT)
    size = len(records.dumps(t.to_value()))
    assert size <= statedoc.MAX_VALUE_BYTES, size
    statedoc.check_desired(learn_key("skab-ae"), t.to_value())  # the endpoint's own rule


def test_a_check_only_update_round_trips_without_a_delta() -> None:
    u = ModelUpdate(1, 4, 100, None, SUMMARY, 0.0, Recall(0.75, 0.5))
    wire = u.to_cbor()
    assert wire == bytes.fromhex(
        "a6636a6f6201646c6f7373f9000065726f756e640466726563616c6c82f93a00f938006673636f726573a4"
        "616e0a617185fb3fb999999999999afb3fc999999999999afb3fd3333333333333fb3fd999999999999a"
        "f9380063737464fb3fb999999999999a646d65616efb3fc999999999999a6773616d706c65731864"
    )
    back = ModelUpdate.from_cbor(wire, 2404)  # no weights to count against the model's
    assert back.delta is None and back.recall == Recall(0.75, 0.5)
    assert (back.job, back.round, back.samples, back.scores) == (1, 4, 100, SUMMARY)


def test_an_update_with_weights_and_recall_round_trips_both() -> None:
    delta = np.array([0.5, -0.25, 0.0], np.float32)
    back = ModelUpdate.from_cbor(
        ModelUpdate(1, 4, 100, delta, SUMMARY, 0.1, Recall(1.0, 0.0)).to_cbor(), 3
    )
    np.testing.assert_array_equal(back.delta, delta)
    assert back.recall == Recall(1.0, 0.0)


def _with_recall(recall: object) -> bytes:
    value = records.loads(ModelUpdate(1, 4, 100, None, SUMMARY, 0.0, Recall(0.5, 0.5)).to_cbor())
    return records.dumps(value | {"recall": recall})


@pytest.mark.parametrize(
    "recall",
    [
        [True, 0.5],
        [0.5, False],
        [math.nan, 0.5],
        [0.5, math.inf],
        [1.0000001, 0.5],
        [0.5, -1e-9],
        [0.5],
        [0.5, 0.5, 0.5],
        [],
        [[0.5], 0.5],
        [0.5, [0.5, 0.5]],
        {"masters": 0.5, "incumbent": 0.5},
        "0.5,0.5",
        0.5,
        None,
    ],
    ids=[
        "bool",
        "bool-second",
        "nan",
        "inf",
        "above-1",
        "below-0",
        "one",
        "three",
        "empty",
        "nested",
        "nested-second",
        "map",
        "text",
        "number",
        "null",
    ],
)
def test_a_hostile_recall_is_refused(recall: object) -> None:
    with pytest.raises(LearningError, match="recall"):
        ModelUpdate.from_cbor(_with_recall(recall))


def test_an_update_with_neither_delta_nor_recall_is_refused() -> None:
    wire = ModelUpdate(1, 4, 100, None, SUMMARY, 0.0).to_cbor()
    assert set(records.loads(wire)) == {"job", "round", "samples", "scores", "loss"}
    with pytest.raises(LearningError, match="neither a delta nor a check"):
        ModelUpdate.from_cbor(wire)


@pytest.mark.parametrize("delta", [b"", b"\x00", None, 0], ids=["empty", "odd", "null", "int"])
def test_a_delta_key_that_carries_no_weights_is_refused(delta: object) -> None:
    """Attack: the key present with nothing in it, to pass for a check-only upload's weights."""
    value = records.loads(_with_recall([0.5, 0.5])) | {"delta": delta}
    with pytest.raises(LearningError, match="delta"):
        ModelUpdate.from_cbor(records.dumps(value))
