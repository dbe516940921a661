"""The float master weights of the autoencoder, read out of its float32 TFLite model.

Federated rounds start from the float masters, never from the int8 model a device runs (its weights
are quantized), so they ship as the float32 ``.tflite`` of ``models/cloud/`` and are read here into
a :class:`~agent.learn.autoencoder.DenseAutoencoder`. The interpreter comes from the one seam,
:func:`agent.detect.inference.make_interpreter`; TensorFlow is never needed.

The model must be exactly what ``tools/train_models.py`` builds: four FULLY_CONNECTED operators in
a chain from the input, then TANH to the output, with float32 weights and biases. TFLite keeps a
FullyConnected weight as ``[outputs, inputs]``; it is transposed to Keras' ``[inputs, outputs]``.
The fused activations (relu, none, relu) are not in the interpreter's operator details, so after
reading the weights the numpy forward pass is compared with the interpreter on probe inputs: a
model whose function differs by more than :data:`VERIFY_TOLERANCE` is refused. Anything else is
refused with a :class:`~agent.errors.ModelError` too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from agent.detect.inference import (
    InterpreterLike,
    Manifest,
    make_interpreter,
    read_model_file,
)
from agent.errors import ModelError
from agent.learn.autoencoder import LAYERS, DenseAutoencoder

#: Largest |numpy - TFLite| accepted on the probe inputs (float32 rounding is ~1e-6 here).
VERIFY_TOLERANCE = 1e-4
#: Probe inputs: rows uniform in +-PROBE_RANGE (the features' clip is 8), from a fixed seed.
PROBE_ROWS = 64
PROBE_RANGE = 8.0
PROBE_SEED = 20240601
EXPECTED_OPS = ("FULLY_CONNECTED",) * len(LAYERS) + ("TANH",)


def read_masters(
    content: bytes, *, label: str = "model", runtime: str = "auto"
) -> DenseAutoencoder:
    """The autoencoder in a float32 TFLite model's bytes. Raises ModelError."""
    interp, _ = make_interpreter(content, runtime, delegates=False, label=label)
    model = _weights(interp, label)
    diff = _probe_difference(interp, model)
    if not diff <= VERIFY_TOLERANCE:
        raise ModelError(
            f"{label}: the weights read do not reproduce the model (max |difference| {diff:.3g}): "
            "its activations are not relu/linear/relu/tanh; use a model from tools/train_models.py"
        )
    return model


def load_master_file(path: str | Path, *, runtime: str = "auto") -> DenseAutoencoder:
    """The masters in a file, without a manifest (no checksum): for tools and tests."""
    p = Path(path)
    return read_masters(read_model_file(p), label=str(p), runtime=runtime)


def load_masters(manifest: Manifest, name: str, *, runtime: str = "auto") -> DenseAutoencoder:
    """The masters of model ``name`` of a manifest (``models/cloud/``), checked against its entry
    (size, SHA-256) first."""
    entry = manifest.entry(name)
    path = manifest.directory / entry.file
    return read_masters(read_model_file(path, entry), label=str(path), runtime=runtime)


def _ops(interp: InterpreterLike, label: str) -> list[dict[str, Any]]:
    get_ops = getattr(interp, "_get_ops_details", None)
    if get_ops is None:
        raise ModelError(
            f"{label}: this TFLite runtime does not list operators; use ai-edge-litert"
        )
    ops = list(get_ops())
    names = tuple(str(op["op_name"]) for op in ops)
    if names != EXPECTED_OPS:
        raise ModelError(
            f"{label}: expected the autoencoder's four dense layers and tanh "
            f"({', '.join(EXPECTED_OPS)}), found {', '.join(names) or 'no operators'}; "
            "is this the float32 anomaly model from models/cloud/?"
        )
    return ops


def _weights(interp: InterpreterLike, label: str) -> DenseAutoencoder:
    ops = _ops(interp, label)
    ins, outs = interp.get_input_details(), interp.get_output_details()
    if len(ins) != 1 or len(outs) != 1:
        raise ModelError(f"{label}: expected one input and one output tensor")
    details = {int(d["index"]): d for d in interp.get_tensor_details()}  # type: ignore[attr-defined]
    previous = int(ins[0]["index"])
    weights, biases = [], []
    for layer, op in zip(LAYERS, ops, strict=False):
        inputs = [int(i) for i in op["inputs"]]
        if len(inputs) != 3 or inputs[0] != previous or inputs[2] < 0:
            raise ModelError(
                f"{label}: layer {layer} is not a dense layer with a bias on the chain"
            )
        w = _constant(interp, details[inputs[1]], label, layer, 2)
        b = _constant(interp, details[inputs[2]], label, layer, 1)
        if b.shape != (w.shape[0],):
            raise ModelError(f"{label}: layer {layer}: weight {w.shape} and bias {b.shape} differ")
        weights.append(w.T.copy())  # TFLite [out, in] -> Keras [in, out]
        biases.append(b.copy())
        previous = int(op["outputs"][0])
    tanh = ops[-1]
    if int(tanh["inputs"][0]) != previous or int(tanh["outputs"][0]) != int(outs[0]["index"]):
        raise ModelError(f"{label}: the tanh does not take the last dense layer to the output")
    try:
        return DenseAutoencoder(tuple(weights), tuple(biases))
    except ValueError as err:
        raise ModelError(f"{label}: the dense layers do not form an autoencoder ({err})") from err


def _constant(
    interp: InterpreterLike, detail: dict[str, Any], label: str, layer: str, ndim: int
) -> np.ndarray:
    if np.dtype(detail["dtype"]) != np.float32:
        raise ModelError(
            f"{label}: layer {layer} has {np.dtype(detail['dtype'])} parameters, not float32: "
            "read the masters from the float32 model in models/cloud/, not the int8 one"
        )
    try:
        value = np.array(interp.get_tensor(int(detail["index"])), dtype=np.float32)
    except ValueError as err:
        raise ModelError(f"{label}: layer {layer}: cannot read {detail['name']} ({err})") from err
    if value.ndim != ndim:
        raise ModelError(f"{label}: layer {layer}: {detail['name']} has shape {value.shape}")
    return value


def _probe_difference(interp: InterpreterLike, model: DenseAutoencoder) -> float:
    """Max |numpy - interpreter| over the probe rows, one row per invoke (no resizing needed)."""
    rows = np.random.default_rng(PROBE_SEED).uniform(
        -PROBE_RANGE, PROBE_RANGE, (PROBE_ROWS, model.dim)
    )
    rows = rows.astype(np.float32)
    i_in = int(interp.get_input_details()[0]["index"])
    i_out = int(interp.get_output_details()[0]["index"])
    ours = model.forward(rows)
    worst = 0.0
    for k in range(PROBE_ROWS):
        interp.set_tensor(i_in, rows[k : k + 1])
        interp.invoke()
        theirs = interp.get_tensor(i_out)[0]
        worst = max(worst, float(np.max(np.abs(theirs - ours[k]))))
    return worst
