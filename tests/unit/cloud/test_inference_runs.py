"""``CloudInference.validation_runs`` (cloud/inference.py) stays bounded: it counts the model runs
per (device, seq), which grew by one entry per alert for as long as the endpoint ran. Now it keeps
the most recently run :data:`~cloud.inference.MAX_VALIDATION_RUNS` only, and still counts a
second run of one alert (another window) as before. The real float32 models of models/cloud."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import numpy as np
import pytest

from cloud import inference
from cloud.inference import CloudInference, ValidateRequest

pytestmark = pytest.mark.timeout(60)
DEVICE = "pump-11"


def request(seq: int, seed: int = 0) -> ValidateRequest:
    window = np.random.default_rng(seed).normal(0.0, 0.3, 32)  # 4 steps x 8 channels
    alert: dict[str, Any] = {"model": "skab-ae", "threshold": 1.0, "score": 1.4}
    body = {"seq": seq, "alert": alert, "window": [float(v) for v in window]}
    return ValidateRequest.parse(body)


@pytest.fixture
async def cloud() -> AsyncIterator[CloudInference]:
    engine = CloudInference()
    yield engine
    await engine.close()


async def test_attack_fresh_seqs_do_not_grow_the_run_counts_past_their_bound(
    cloud: CloudInference, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(inference, "MAX_VALIDATION_RUNS", 3)
    for seq in range(1, 6):
        await cloud.validate(DEVICE, request(seq))
    assert cloud.validation_runs == {(DEVICE, 3): 1, (DEVICE, 4): 1, (DEVICE, 5): 1}
    await cloud.validate(DEVICE, request(3))  # the stored verdict: no run, nothing counted
    await cloud.validate(DEVICE, request(3, seed=1))  # another window of seq 3: a second run
    await cloud.validate(DEVICE, request(6))  # drops the least recently run: seq 4
    assert cloud.validation_runs == {(DEVICE, 5): 1, (DEVICE, 3): 2, (DEVICE, 6): 1}


@pytest.mark.parametrize("value", [1e39, -3.5e38, 10**400])
def test_attack_a_window_value_beyond_float32_is_refused(value: float) -> None:
    """The models run in float32: a finite value beyond its range became an infinity there, and
    the verdict stored for the alert a NaN score (an integer beyond float64, which only a caller
    other than the CBOR decoder can hand over, raised OverflowError). Refused as not finite."""
    alert: dict[str, Any] = {"model": "skab-ae", "threshold": 1.0, "score": 1.4}
    body = {"seq": 1, "alert": alert, "window": [0.5] * 31 + [value]}
    with pytest.raises(inference.InferenceError, match="finite float32"):
        ValidateRequest.parse(body)
