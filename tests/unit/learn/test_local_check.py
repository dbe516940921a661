"""agent/learn/local.py, the check: :func:`fault_recall` counts the synthetic faults (held-out
windows with one channel shifted) each model detects above its own threshold, and
:func:`local_update` reports it when the task names an incumbent (without weights when the task
only checks)."""

from __future__ import annotations

import numpy as np
import pytest

from agent.learn.local import (
    FAULT_COPIES,
    corrupt,
    fault_recall,
    local_update,
    score_summary,
    split,
    train_local,
)
from agent.wire.learning import ModelUpdate, Recall
from tests.unit.learn.test_local import device_windows, model, task

INCUMBENT = "cd" * 32


def test_one_model_twice_detects_the_same_fraction_of_the_same_faults() -> None:
    _, w = device_windows()
    held = split(w)[1]
    m = model(3)
    a, b = fault_recall((m, m), held, np.random.default_rng(5))
    assert a == b
    assert (a,) == fault_recall((m,), held, np.random.default_rng(5))  # the faults: the seed's
    assert a * FAULT_COPIES * len(held) == round(a * FAULT_COPIES * len(held))  # a count of them


def test_a_model_that_copies_a_shifted_channel_through_detects_fewer_faults() -> None:
    """The poisoning the check is for: one model trained as the device's recipe does (denoising:
    shifted inputs, clean targets), the other from the same start on shifted inputs as their own
    targets (it learns to pass a shift through to its output, so a fault scores low)."""
    _, w = device_windows(900)
    train, held = split(w)
    denoising = train_local(model(), train, 30, 5e-3, np.random.default_rng(1)).model
    flat = train.reshape(len(train), -1)
    rng = np.random.default_rng(2)
    shifted = np.concatenate([*(corrupt(flat, rng, 8, p=1.0) for _ in range(4)), flat])
    copier = model().train(shifted, 30, np.random.default_rng(1), lr=5e-3).model
    good, bad = fault_recall((denoising, copier), held, np.random.default_rng(3))
    assert good > 0.85 and bad < good - 0.15, (good, bad)


def test_a_check_only_task_uploads_the_recall_and_the_summary_and_no_weights() -> None:
    _, w = device_windows()
    masters, incumbent = model(1), model(2)
    up = local_update(
        masters, w, task(epochs=0, check=INCUMBENT), np.random.default_rng(9), incumbent=incumbent
    )
    held = split(w)[1]
    expect = fault_recall((masters, incumbent), held, np.random.default_rng(9))
    assert up.delta is None and up.recall == Recall(*expect)
    assert (up.samples, up.loss) == (len(w), 0.0)  # nothing trained: every window counted
    assert up.scores == score_summary(masters, held)
    back = ModelUpdate.from_cbor(up.to_cbor(), masters.parameter_count)
    assert back.delta is None and back.recall == up.recall


def test_a_checked_training_task_uploads_weights_and_the_recall() -> None:
    _, w = device_windows()
    masters, incumbent = model(1), model(2)
    up = local_update(
        masters, w, task(epochs=1, check=INCUMBENT), np.random.default_rng(9), incumbent=incumbent
    )
    expect = fault_recall((masters, incumbent), split(w)[1], np.random.default_rng(9))
    assert up.recall == Recall(*expect)
    assert up.delta is not None and up.delta.shape == (masters.parameter_count,)
    assert up.samples == len(split(w)[0])


@pytest.mark.parametrize(
    ("check", "incumbent"), [(INCUMBENT, False), (None, True)], ids=["no-weights", "no-check"]
)
def test_the_incumbents_weights_go_with_a_checked_task_and_only_with_one(
    check: str | None, incumbent: bool
) -> None:
    _, w = device_windows()
    with pytest.raises(ValueError, match="incumbent"):
        local_update(
            model(),
            w,
            task(check=check),
            np.random.default_rng(0),
            incumbent=model(2) if incumbent else None,
        )
