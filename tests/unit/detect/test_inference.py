"""The interpreter seam (agent/detect/inference.py) on the shipped models, against both runtimes.

ai-edge-litert runs in this process; tflite-runtime (which needs numpy<2) runs in a subprocess
with ``$EDGE_AGENT_TFLITE_PYTHON`` (set by ``./tools/dev test``) on the same inputs, and the raw
int8 outputs of the two are compared.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.detect.inference import (
    TensorInfo,
    TFLiteModel,
    available_runtimes,
    load_manifest,
    make_interpreter,
)
from agent.errors import ModelError

ROOT = Path(__file__).resolve().parents[3]
MODELS = ROOT / "models"
NAMES = ("skab-ae", "skab-ae-lite", "skab-clf")


@pytest.fixture(scope="module")
def manifest():
    return load_manifest(MODELS)


@pytest.fixture
def model_copy(tmp_path: Path) -> Path:
    """A copy of the models folder that a test may damage."""
    dst = tmp_path / "models"
    dst.mkdir()
    for name in ("manifest.json", *(f"{n}.tflite" for n in NAMES)):
        shutil.copy(MODELS / name, dst / name)
    return dst


def _inputs(model: TFLiteModel, n: int = 64, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.normal(0.0, 1.5, size=(n, *model.input_shape)).astype(np.float32)


def test_manifest_lists_the_shipped_models(manifest) -> None:
    assert set(NAMES) <= set(manifest.models)
    for name in NAMES:
        e = manifest.entry(name)
        assert e.input.dtype == "int8" and e.output.dtype == "int8"
        assert (MODELS / e.file).stat().st_size == e.size
    assert manifest.entry("skab-ae").size <= 64 * 1024
    assert sum(manifest.entry(n).size for n in NAMES) <= 256 * 1024


@pytest.mark.parametrize("name", NAMES)
def test_open_verifies_and_predicts(manifest, name: str) -> None:
    m = TFLiteModel.open(manifest, name, runtime="litert")
    assert m.runtime == "litert"
    x = _inputs(m)
    y = m.predict(x)
    assert y.shape == (len(x), *m.output_shape)
    assert y.dtype == np.float32 and np.all(np.isfinite(y))
    # One window without the batch axis gives the same as its row of a batch.
    np.testing.assert_array_equal(m.predict(x[3]), y[3])


@pytest.mark.parametrize("name", NAMES)
def test_batched_resize_equals_one_by_one(manifest, name: str) -> None:
    batched = TFLiteModel.open(manifest, name, batch_mode="resize")
    looped = TFLiteModel.open(manifest, name, batch_mode="loop")
    x = _inputs(batched, n=37, seed=1)
    np.testing.assert_array_equal(batched.predict(x), looped.predict(x))
    # resizing back and forth keeps the answers
    np.testing.assert_array_equal(batched.predict(x[:5]), looped.predict(x[:5]))
    assert batched.predict(np.zeros((0, *batched.input_shape))).shape[0] == 0


def test_num_threads_does_not_change_answers(manifest) -> None:
    one = TFLiteModel.open(manifest, "skab-ae", num_threads=1)
    two = TFLiteModel.open(manifest, "skab-ae", num_threads=2)
    x = _inputs(one, n=200)
    np.testing.assert_array_equal(one.predict(x), two.predict(x))


def test_autoencoder_outputs_are_bounded_by_tanh(manifest) -> None:
    m = TFLiteModel.open(manifest, "skab-ae")
    y = m.predict(np.full((4, *m.input_shape), 50.0, dtype=np.float32))
    assert np.all(np.abs(y) <= 1.0 + m.output.scale)


def test_classifier_outputs_are_probabilities(manifest) -> None:
    m = TFLiteModel.open(manifest, "skab-clf")
    p = m.predict(_inputs(m))
    assert np.all(p >= 0) and np.allclose(p.sum(axis=1), 1.0, atol=0.03)
    assert len(manifest.entry("skab-clf").raw["classes"]) == p.shape[1]


_TFLITE_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    from agent.detect.inference import TFLiteModel, load_manifest
    models, work = sys.argv[1], sys.argv[2]
    man = load_manifest(models)
    info = {"numpy": np.__version__}
    for name in json.loads(sys.argv[3]):
        for delegates in (True, False):
            m = TFLiteModel.open(man, name, runtime="tflite-runtime", delegates=delegates)
            x = np.load(f"{work}/{name}.in.npy")
            np.save(f"{work}/{name}.{delegates}.out.npy", m.invoke_raw(m.input.quantize(x)))
            info[name] = m.runtime
    print(json.dumps(info))
    """
)


def tflite_python() -> str:
    py = os.environ.get("EDGE_AGENT_TFLITE_PYTHON", "")
    if not py or not Path(py).is_file():
        pytest.skip(
            "EDGE_AGENT_TFLITE_PYTHON is not set or missing: run through ./tools/dev test "
            "(it points at .venv-tflite with tflite-runtime 2.14)"
        )
    return py


def test_tflite_runtime_agrees_with_litert(manifest, tmp_path: Path) -> None:
    """With the same kernels (no default delegate) both runtimes are bit-identical. By default
    ai-edge-litert runs int8 through XNNPACK, which rounds its requantization like the reference
    kernels while tflite-runtime's optimized kernels do not: a few outputs differ by some steps
    (the SKAB scores agree: see test_evaluate.py)."""
    py = tflite_python()
    builtin, default = {}, {}
    for name in NAMES:
        m = TFLiteModel.open(manifest, name, runtime="litert", delegates=False)
        x = _inputs(m, n=256, seed=7)
        np.save(tmp_path / f"{name}.in.npy", x)
        builtin[name] = m.invoke_raw(m.input.quantize(x))
        d = TFLiteModel.open(manifest, name, runtime="litert")
        default[name] = d.invoke_raw(d.input.quantize(x))
    out = subprocess.run(
        [py, "-c", _TFLITE_SCRIPT, str(MODELS), str(tmp_path), json.dumps(NAMES)],
        capture_output=True,
        text=True,
        timeout=100,
        cwd=ROOT,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    info = json.loads(out.stdout.strip().splitlines()[-1])
    assert info["numpy"].startswith("1.")
    for name in NAMES:
        assert info[name] == "tflite-runtime"
        theirs = np.load(tmp_path / f"{name}.True.out.npy")
        theirs_builtin = np.load(tmp_path / f"{name}.False.out.npy")
        assert theirs.dtype == builtin[name].dtype == np.int8
        np.testing.assert_array_equal(theirs, builtin[name])
        np.testing.assert_array_equal(theirs_builtin, builtin[name])
        same = np.mean(theirs == default[name])
        assert same > 0.95, f"{name}: only {same:.1%} of outputs agree with XNNPACK's"


def test_auto_prefers_litert() -> None:
    assert available_runtimes()[0] == "litert"
    content = (MODELS / "skab-ae-lite.tflite").read_bytes()
    _, runtime = make_interpreter(content, "auto")
    assert runtime == "litert"


# --- errors ---------------------------------------------------------------------------------------
def test_missing_file(model_copy: Path) -> None:
    (model_copy / "skab-ae.tflite").unlink()
    with pytest.raises(ModelError, match="missing"):
        TFLiteModel.open(load_manifest(model_copy), "skab-ae")


def test_truncated_file(model_copy: Path) -> None:
    p = model_copy / "skab-ae.tflite"
    p.write_bytes(p.read_bytes()[:1000])
    with pytest.raises(ModelError, match="truncated"):
        TFLiteModel.open(load_manifest(model_copy), "skab-ae")
    # Without a manifest the interpreter itself refuses it.
    with pytest.raises(ModelError, match=r"refused|not a TFLite"):
        TFLiteModel.from_file(p)


def test_garbage_file(model_copy: Path) -> None:
    p = model_copy / "garbage.tflite"
    p.write_bytes(np.random.default_rng(0).bytes(4000))
    with pytest.raises(ModelError, match="not a TFLite flatbuffer"):
        TFLiteModel.from_file(p)
    p.write_text("this is not a model\n" * 40)
    with pytest.raises(ModelError, match="not a TFLite flatbuffer"):
        TFLiteModel.from_file(p)


def test_sha_mismatch(model_copy: Path) -> None:
    p = model_copy / "skab-ae.tflite"
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0xFF
    p.write_bytes(bytes(data))
    with pytest.raises(ModelError, match="SHA-256"):
        TFLiteModel.open(load_manifest(model_copy), "skab-ae")


def _edit_entry(model_copy: Path, name: str, path: tuple[str, ...], value) -> None:
    mf = model_copy / "manifest.json"
    raw = json.loads(mf.read_text())
    node = raw["models"][name]
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    mf.write_text(json.dumps(raw))


@pytest.mark.parametrize(
    ("path", "value", "match"),
    [
        (("input", "shape"), [1, 16], "input tensor"),
        (("output", "shape"), [1, 7], "output tensor"),
        (("input", "dtype"), "float32", "input tensor"),
        (("output", "zero_point"), 5, "quantization"),
    ],
)
def test_manifest_mismatch(model_copy: Path, path, value, match: str) -> None:
    _edit_entry(model_copy, "skab-ae", path, value)
    with pytest.raises(ModelError, match=match):
        TFLiteModel.open(load_manifest(model_copy), "skab-ae")


def test_manifest_errors(model_copy: Path, tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="no model manifest"):
        load_manifest(tmp_path / "nowhere")
    with pytest.raises(ModelError, match="no model named"):
        load_manifest(model_copy).entry("nope")
    (model_copy / "manifest.json").write_text("{not json")
    with pytest.raises(ModelError, match="unreadable"):
        load_manifest(model_copy)
    (model_copy / "manifest.json").write_text(json.dumps({"format": 1, "models": {"x": {}}}))
    with pytest.raises(ModelError, match="malformed"):
        load_manifest(model_copy)


def test_bad_runtime_and_threads() -> None:
    content = (MODELS / "skab-ae-lite.tflite").read_bytes()
    with pytest.raises(ModelError, match="unknown runtime"):
        make_interpreter(content, "tensorflow")
    with pytest.raises(ModelError, match="num_threads"):
        make_interpreter(content, "auto", num_threads=0)


def test_no_tensorflow_on_the_device_path() -> None:
    code = (
        "import sys, agent.detect.detector, agent.detect.inference, agent.detect.features, "
        "agent.detect.novelty; "
        "print('tensorflow' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# --- quantization ---------------------------------------------------------------------------------
tensors = st.builds(
    TensorInfo,
    shape=st.just((1, 8)),
    dtype=st.just("int8"),
    scale=st.floats(1e-4, 10.0),
    zero_point=st.integers(-128, 127),
)


@settings(max_examples=200, deadline=None)
@given(tensors, st.data())
def test_quantize_dequantize_round_trip(t: TensorInfo, data) -> None:
    lo, hi = t.representable
    x = np.array(data.draw(st.lists(st.floats(lo, hi), min_size=1, max_size=20)))
    q = t.quantize(x)
    assert q.dtype == np.int8
    assert np.all(np.abs(t.dequantize(q) - x) <= t.scale / 2 * (1 + 1e-5) + 1e-6)
    # Every int8 code survives dequantize -> quantize unchanged.
    codes = np.arange(-128, 128, dtype=np.int8)
    np.testing.assert_array_equal(t.quantize(t.dequantize(codes)), codes)


@settings(max_examples=100, deadline=None)
@given(tensors, st.floats(1.0, 1e6))
def test_quantize_saturates(t: TensorInfo, beyond: float) -> None:
    lo, hi = t.representable
    q = t.quantize(np.array([hi + beyond * t.scale, lo - beyond * t.scale]))
    assert q.tolist() == [127, -128]


def test_model_quantization_matches_its_tensors(manifest) -> None:
    m = TFLiteModel.open(manifest, "skab-ae")
    x = np.linspace(-3, 3, m.input_shape[0], dtype=np.float32)
    q = m.input.quantize(x)
    assert np.all(np.abs(m.input.dequantize(q) - x) <= m.input.scale / 2 + 1e-6)
    assert m.input == TensorInfo.from_dict(manifest.entry("skab-ae").input.to_dict())


def test_two_interpreters_built_at_once_leave_stderr_where_it_was(capfd) -> None:
    """Two models loaded at once (two roles assigned in one desired document: each built in a
    worker thread) overlap in :func:`native_banner_filtered`, which points fd 2 at a temporary
    file: A enters, B enters (saving A's file as "stderr"), A leaves, B leaves. Was: B put
    back A's temporary file, so from then on everything the process wrote to stderr (its
    whole log, on journald) went into a deleted file. Now the second waits for the first: fd 2
    is the real stderr again afterwards, and nothing written meanwhile is lost."""
    import threading

    from agent.detect.inference import native_banner_filtered

    a_in, b_in, a_out = threading.Event(), threading.Event(), threading.Event()

    def first() -> None:
        with native_banner_filtered():
            a_in.set()
            b_in.wait(0.5)  # B is inside too (or, waiting for A, never gets in meanwhile)
            os.write(2, b"INFO: Created TensorFlow Lite XNNPACK delegate for CPU.\nfrom A\n")
        a_out.set()

    def second() -> None:
        a_in.wait(10)
        with native_banner_filtered():
            b_in.set()
            a_out.wait(10)
            os.write(2, b"from B\n")

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    os.write(2, b"after both\n")
    err = capfd.readouterr().err
    assert err.splitlines() == ["from A", "from B", "after both"], err
