"""The float masters read out of the shipped float32 models (agent/learn/masters.py), checked
against a real TFLite interpreter running the same files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from agent.detect.inference import TFLiteModel, load_manifest
from agent.errors import ModelError
from agent.learn.masters import load_master_file, load_masters, read_masters

ROOT = Path(__file__).resolve().parents[3]
CLOUD = ROOT / "models" / "cloud"
#: (dim, hidden, bottleneck) of each model, from tools/train_models.py's ARCHS and the features.
ARCHS = {"skab-ae": (32, 32, 4), "skab-ae-lite": (8, 8, 3)}


@pytest.mark.parametrize("name", sorted(ARCHS))
def test_masters_have_the_trained_architecture(name: str) -> None:
    model = load_masters(load_manifest(CLOUD), name)
    dim, hidden, bottleneck = ARCHS[name]
    assert model.sizes == (dim, hidden, bottleneck, hidden, dim)
    assert model.dtype == np.float32
    expected = dim * hidden + hidden + hidden * bottleneck + bottleneck
    expected += bottleneck * hidden + hidden + hidden * dim + dim
    assert model.parameter_count == expected == len(model.to_vector())


@pytest.mark.parametrize("name", sorted(ARCHS))
def test_numpy_forward_equals_the_tflite_float_model(name: str) -> None:
    manifest = load_manifest(CLOUD)
    model = load_masters(manifest, name)
    tflite = TFLiteModel.open(manifest, name)
    rng = np.random.default_rng(31)
    rows = np.concatenate(
        [
            rng.normal(0.0, 1.0, (500, model.dim)),  # normal running: features near 0
            rng.uniform(-8.0, 8.0, (500, model.dim)),  # the whole clipped input range
        ]
    ).astype(np.float32)
    diff = np.abs(model.forward(rows) - tflite.predict(rows))
    assert float(diff.max()) <= 1e-4


def test_masters_from_a_file_equal_those_from_the_manifest() -> None:
    a = load_master_file(CLOUD / "skab-ae-lite.float32.tflite")
    b = load_masters(load_manifest(CLOUD), "skab-ae-lite")
    np.testing.assert_array_equal(a.to_vector(), b.to_vector())


def test_the_int8_model_is_refused() -> None:
    """Federated rounds start from float masters, never from the quantized device model."""
    with pytest.raises(ModelError):
        load_master_file(ROOT / "models" / "skab-ae.tflite")


def test_a_model_of_another_shape_is_refused() -> None:
    with pytest.raises(ModelError, match="four dense layers"):
        load_master_file(CLOUD / "skab-clf.float32.tflite")


def test_a_truncated_file_is_refused() -> None:
    data = (CLOUD / "skab-ae.float32.tflite").read_bytes()
    with pytest.raises(ModelError):
        read_masters(data[: len(data) // 2], label="truncated")


def test_a_model_with_a_corrupted_manifest_entry_is_refused(tmp_path: Path) -> None:
    """A file corrupted at rest: one weight byte flipped, caught by the manifest's checksum."""
    manifest = load_manifest(CLOUD)
    entry = manifest.entry("skab-ae")
    data = bytearray((CLOUD / entry.file).read_bytes())
    data[len(data) // 2] ^= 0x01
    (tmp_path / entry.file).write_bytes(bytes(data))
    (tmp_path / "manifest.json").write_bytes((CLOUD / "manifest.json").read_bytes())
    with pytest.raises(ModelError):
        load_masters(load_manifest(tmp_path), "skab-ae")
