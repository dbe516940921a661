"""New weights into an existing TFLite model, without TensorFlow: the template's bytes, patched.

Federated rounds produce new float weights for the anomaly autoencoder; devices need them as the
same int8 model they run (and the endpoint keeps a float32 copy). Rebuilding a model needs the
TFLite converter, i.e. TensorFlow, which the endpoint does not install. The graph never changes
between rounds, only the numbers, so a new model is the shipped template with some of its bytes
overwritten: every constant keeps its shape, every quantization vector its length, and the
FlatBuffer's layout stays exactly as the converter wrote it.

**Reading.** :func:`read_graph` is a minimal, strict, read-only FlatBuffer walker for the parts
of the TFLite schema used here (``tensorflow/lite/schema/schema.fbs``; field ids below are the
schema's declaration order, a union taking two ids: its type byte, then its value). Every offset
is bounds-checked against the file and every field against its table's declared size; a file
that is truncated, has offsets out of range or pointing at themselves, a vtable that does not
fit, or not the ``TFL3`` identifier raises :class:`~agent.errors.ModelError`, never IndexError or
struct.error. References in a FlatBuffer are unsigned offsets *forward* from where they are
stored and the walk has a fixed depth (model, subgraph, tensor, quantization), so a hostile file
cannot make it loop. Buffers stored outside the FlatBuffer (``Buffer.offset``, models over 2 GB)
are refused.

**The graph.** Subgraph 0 must be a chain from its one input to its one output of
FULLY_CONNECTED operators (weights ``[outputs, inputs]``, default weight layout, fused activation
none/relu/relu6/relu-1..1) and element-wise TANH. The dense layers are handed in and out in Keras'
layout (``agent.learn.autoencoder``): a list of ``(W, b)`` with ``W`` of shape
``(inputs, outputs)``, so :func:`read_float_layers` transposes, exactly as
``agent.learn.masters`` does when it reads the masters through the interpreter.

**Quantization** (:func:`quantize_layers`). The shipped int8 models quantize each FC weight per
output channel (``quantized_dimension`` 0, one scale per row), symmetric with zero point 0, and
each int32 bias with scale ``input_scale * weight_scale[ch]``, zero point 0. New weights get the
converter's rule: ``scale[ch] = max|W[ch]| / 127`` (per tensor: ``max|W| / 127``) in double,
stored as float32; values ``round(W / scale)`` clamped to [-127, 127], rounding half away from
zero (the MLIR quantizer's ``UniformQuantizedValueConverter``: ``std::round`` of
``float / double(scale)``; not numpy's ``rint``, which rounds half to even); biases
``round(b / (input_scale * float32(scale)))``. Applied to the float reference models these rules
give back the shipped int8 files byte for byte. Two cases of our own, which the shipped models
never hit: a row of (near) zeros keeps the template's scale (its values are 0 at any scale), and
a row whose bias would overflow int32 gets its weight scale raised until the bias fits.

Activation quantization (every input, output and intermediate tensor's scale and zero point)
stays the template's: it was calibrated on representative data, which the endpoint does not
have. New weights whose activations leave those ranges saturate in the int8 model;
:func:`activation_clipping` reports, for representative float inputs, the fraction of each
tensor's float values outside the template's range, so the caller can see the clipping.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from agent.errors import ModelError

IDENTIFIER = b"TFL3"

# Field ids (schema.fbs declaration order).
MODEL_OPERATOR_CODES, MODEL_SUBGRAPHS, MODEL_BUFFERS = 1, 2, 4
SUBGRAPH_TENSORS, SUBGRAPH_INPUTS, SUBGRAPH_OUTPUTS, SUBGRAPH_OPERATORS = 0, 1, 2, 3
TENSOR_SHAPE, TENSOR_TYPE, TENSOR_BUFFER, TENSOR_NAME, TENSOR_QUANTIZATION = 0, 1, 2, 3, 4
TENSOR_SPARSITY = 6
QUANT_MIN, QUANT_MAX, QUANT_SCALE, QUANT_ZERO_POINT = 0, 1, 2, 3
QUANT_DETAILS_TYPE, QUANT_DIMENSION = 4, 6  # details (union) takes ids 4 (type) and 5
OPERATOR_OPCODE_INDEX, OPERATOR_INPUTS, OPERATOR_OUTPUTS = 0, 1, 2
OPERATOR_OPTIONS_TYPE, OPERATOR_OPTIONS = 3, 4  # builtin_options (union)
OPCODE_DEPRECATED_BUILTIN, OPCODE_BUILTIN = 0, 3
BUFFER_DATA, BUFFER_OFFSET = 0, 1
FC_ACTIVATION, FC_WEIGHTS_FORMAT = 0, 1  # FullyConnectedOptions

# Enum values (schema.fbs).
FULLY_CONNECTED, TANH = 9, 28  # BuiltinOperator
FULLY_CONNECTED_OPTIONS = 8  # BuiltinOptions union member
#: ActivationFunctionType -> (name, lower clamp, upper clamp)
ACTIVATIONS = {
    0: ("none", -np.inf, np.inf),
    1: ("relu", 0.0, np.inf),
    2: ("relu_n1_to_1", -1.0, 1.0),
    3: ("relu6", 0.0, 6.0),
}
#: TensorType -> numpy dtype (little-endian), for the types this module reads.
DTYPES = {0: np.dtype("<f4"), 2: np.dtype("<i4"), 9: np.dtype("i1")}
TYPE_NAMES = {0: "float32", 1: "float16", 2: "int32", 3: "uint8", 4: "int64", 7: "int16", 9: "int8"}

INT8_LIMIT = 127  # symmetric, narrow range: weights in [-127, 127]
INT32_MAX = 2**31 - 1
#: Relative tolerance when checking that the template's bias scales are input * weight scale.
BIAS_SCALE_RTOL = 1e-5
#: Relative headroom when a weight scale is raised so that a bias fits int32.
BIAS_FIT_MARGIN = 1e-6

Layers = Sequence[tuple[np.ndarray, np.ndarray]]


# --- the FlatBuffer walker ---------------------------------------------------------------------
class _Bytes:
    """Bounds-checked little-endian reads from one file."""

    def __init__(self, data: bytes, label: str) -> None:
        self.data = data
        self.label = label

    def fail(self, message: str) -> ModelError:
        return ModelError(
            f"{self.label}: {message}; the file is corrupt or not a TFLite model: fetch it again"
        )

    def need(self, pos: int, size: int, what: str) -> None:
        if pos < 0 or size < 0 or pos + size > len(self.data):
            raise self.fail(
                f"{what} (bytes {pos}..{pos + size}) lies outside the file ({len(self.data)} bytes)"
            )

    def scalar(self, fmt: str, pos: int, what: str) -> int | float:
        self.need(pos, struct.calcsize(fmt), what)
        return struct.unpack_from("<" + fmt, self.data, pos)[0]

    def ref(self, pos: int, what: str) -> int:
        """The position an unsigned offset stored at ``pos`` points to (always forward)."""
        off = int(self.scalar("I", pos, what))
        if off == 0:
            raise self.fail(f"{what} at byte {pos} refers to itself")
        self.need(pos + off, 4, what)
        return pos + off

    def table(self, pos: int, what: str) -> _Table:
        return _Table(self, pos, what)


class _Table:
    """One FlatBuffer table: its position and its vtable, both checked to lie in the file."""

    def __init__(self, buf: _Bytes, pos: int, what: str) -> None:
        self.buf, self.pos, self.what = buf, pos, what
        vtable = pos - int(buf.scalar("i", pos, what))
        buf.need(vtable, 4, f"the vtable of {what}")
        self.vt_size = int(buf.scalar("H", vtable, what))
        self.size = int(buf.scalar("H", vtable + 2, what))
        if self.vt_size < 4 or self.vt_size % 2 or self.size < 4:
            raise buf.fail(f"{what} has a malformed vtable (sizes {self.vt_size}, {self.size})")
        buf.need(vtable, self.vt_size, f"the vtable of {what}")
        buf.need(pos, self.size, what)
        self.vtable = vtable

    def field(self, fid: int, size: int) -> int | None:
        slot = 4 + 2 * fid
        if slot + 2 > self.vt_size:
            return None
        off = int(self.buf.scalar("H", self.vtable + slot, self.what))
        if off == 0:
            return None
        if off < 4 or off + size > self.size:
            raise self.buf.fail(f"field {fid} of {self.what} lies outside its table")
        return self.pos + off

    def scalar(self, fid: int, fmt: str, default: int = 0) -> int:
        p = self.field(fid, struct.calcsize(fmt))
        return default if p is None else int(self.buf.scalar(fmt, p, self.what))

    def table(self, fid: int, what: str) -> _Table | None:
        p = self.field(fid, 4)
        return None if p is None else self.buf.table(self.buf.ref(p, what), what)

    def vector(self, fid: int, itemsize: int, what: str) -> tuple[int, int] | None:
        """``(position of the first element, count)`` of a vector field, or None if absent."""
        p = self.field(fid, 4)
        if p is None:
            return None
        v = self.buf.ref(p, what)
        count = int(self.buf.scalar("I", v, what))
        self.buf.need(v + 4, count * itemsize, f"{what} ({count} elements)")
        return v + 4, count

    def array(self, fid: int, dtype: str, what: str) -> tuple[int, np.ndarray]:
        """``(position, values)`` of a vector of scalars; ``(-1, empty)`` if absent."""
        dt = np.dtype(dtype)
        vec = self.vector(fid, dt.itemsize, what)
        if vec is None:
            return -1, np.zeros(0, dtype=dt)
        start, count = vec
        return start, np.frombuffer(self.buf.data, dtype=dt, count=count, offset=start).copy()

    def tables(self, fid: int, what: str) -> list[_Table]:
        vec = self.vector(fid, 4, what)
        if vec is None:
            return []
        start, count = vec
        return [
            self.buf.table(self.buf.ref(start + 4 * i, f"{what}[{i}]"), f"{what}[{i}]")
            for i in range(count)
        ]

    def string(self, fid: int, what: str) -> str:
        vec = self.vector(fid, 1, what)
        if vec is None:
            return ""
        start, count = vec
        return self.buf.data[start : start + count].decode("utf-8", "replace")


@dataclass(frozen=True)
class Quantization:
    """A tensor's affine quantization; ``scale_at`` is the byte position of the scale floats."""

    scale: np.ndarray
    zero_point: np.ndarray
    dimension: int
    scale_at: int
    has_min_max: bool


@dataclass(frozen=True)
class Tensor:
    """One tensor of subgraph 0: ``type`` is the schema's TensorType, ``buffer`` its index."""

    index: int
    name: str
    shape: tuple[int, ...]
    type: int
    buffer: int
    quantization: Quantization | None

    @property
    def type_name(self) -> str:
        return TYPE_NAMES.get(self.type, f"type {self.type}")

    @property
    def size(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class Operator:
    """One operator: its BuiltinOperator code, tensor indices (-1: absent) and FC options."""

    builtin: int
    inputs: tuple[int, ...]
    outputs: tuple[int, ...]
    activation: int  # FullyConnectedOptions.fused_activation_function (0 for other operators)
    weights_format: int


@dataclass(frozen=True)
class Graph:
    """What :func:`read_graph` reads: subgraph 0 and the model's buffers ``(position, size)`` of
    their data (``(-1, 0)`` for an empty buffer)."""

    label: str
    tensors: tuple[Tensor, ...]
    operators: tuple[Operator, ...]
    inputs: tuple[int, ...]
    outputs: tuple[int, ...]
    buffers: tuple[tuple[int, int], ...]

    def fail(self, message: str) -> ModelError:
        return ModelError(f"{self.label}: {message}")


def read_graph(data: bytes, *, label: str = "model") -> Graph:
    """Subgraph 0 of a TFLite model's bytes (tensors, operators, buffers). Raises ModelError."""
    buf = _Bytes(bytes(data), label)
    buf.need(0, 8, "the file header")
    if buf.data[4:8] != IDENTIFIER:
        raise buf.fail(f"the identifier is {buf.data[4:8]!r}, not {IDENTIFIER!r}")
    model = buf.table(buf.ref(0, "the root offset"), "the model")
    codes = [_builtin_code(t) for t in model.tables(MODEL_OPERATOR_CODES, "operator_codes")]
    buffers = []
    for i, t in enumerate(model.tables(MODEL_BUFFERS, "buffers")):
        if t.scalar(BUFFER_OFFSET, "Q") > 1:
            raise ModelError(
                f"{label}: buffer {i} is stored outside the FlatBuffer (a model over 2 GB); "
                "such models are not supported: use a model of the ordinary layout"
            )
        vec = t.vector(BUFFER_DATA, 1, f"buffers[{i}].data")
        buffers.append(vec if vec is not None else (-1, 0))
    subgraphs = model.tables(MODEL_SUBGRAPHS, "subgraphs")
    if not subgraphs:
        raise buf.fail("the model has no subgraph")
    sub = subgraphs[0]
    tensors = tuple(_tensor(t, i) for i, t in enumerate(sub.tables(SUBGRAPH_TENSORS, "tensors")))
    operators = []
    for i, t in enumerate(sub.tables(SUBGRAPH_OPERATORS, "operators")):
        operators.append(_operator(buf, t, i, codes, len(tensors)))
    ins = sub.array(SUBGRAPH_INPUTS, "<i4", "subgraph inputs")[1]
    outs = sub.array(SUBGRAPH_OUTPUTS, "<i4", "subgraph outputs")[1]
    for i in (*ins, *outs):
        if not 0 <= i < len(tensors):
            raise buf.fail(f"the subgraph names tensor {i} of {len(tensors)}")
    for t in tensors:
        if not 0 <= t.buffer < len(buffers):
            raise buf.fail(f"tensor {t.name!r} names buffer {t.buffer} of {len(buffers)}")
    return Graph(
        label,
        tensors,
        tuple(operators),
        tuple(int(i) for i in ins),
        tuple(int(i) for i in outs),
        tuple(buffers),
    )


def _builtin_code(t: _Table) -> int:
    # As TFLite reads it: the larger of the old byte field and the int32 field of schema 3a.
    return max(t.scalar(OPCODE_DEPRECATED_BUILTIN, "b"), t.scalar(OPCODE_BUILTIN, "i"))


def _tensor(t: _Table, index: int) -> Tensor:
    what = f"tensors[{index}]"
    shape = tuple(int(s) for s in t.array(TENSOR_SHAPE, "<i4", f"{what}.shape")[1])
    if any(s < 0 for s in shape):
        raise t.buf.fail(f"{what} has shape {shape}")
    if t.field(TENSOR_SPARSITY, 4) is not None:
        raise t.buf.fail(f"{what} is sparse, which this reader does not support")
    quant = None
    q = t.table(TENSOR_QUANTIZATION, f"{what}.quantization")
    if q is not None:
        if q.scalar(QUANT_DETAILS_TYPE, "B"):
            raise t.buf.fail(f"{what} has custom quantization details")
        at, scale = q.array(QUANT_SCALE, "<f4", f"{what}.quantization.scale")
        zero = q.array(QUANT_ZERO_POINT, "<i8", f"{what}.quantization.zero_point")[1]
        has_min_max = any(q.field(f, 4) is not None for f in (QUANT_MIN, QUANT_MAX))
        quant = Quantization(scale, zero, q.scalar(QUANT_DIMENSION, "i"), at, has_min_max)
    return Tensor(
        index,
        t.string(TENSOR_NAME, f"{what}.name"),
        shape,
        t.scalar(TENSOR_TYPE, "b"),
        t.scalar(TENSOR_BUFFER, "I"),
        quant,
    )


def _operator(buf: _Bytes, t: _Table, index: int, codes: list[int], n_tensors: int) -> Operator:
    what = f"operators[{index}]"
    opcode = t.scalar(OPERATOR_OPCODE_INDEX, "I")
    if opcode >= len(codes):
        raise buf.fail(f"{what} names operator code {opcode} of {len(codes)}")
    ins = tuple(int(i) for i in t.array(OPERATOR_INPUTS, "<i4", f"{what}.inputs")[1])
    outs = tuple(int(i) for i in t.array(OPERATOR_OUTPUTS, "<i4", f"{what}.outputs")[1])
    for i in (*ins, *outs):
        if not -1 <= i < n_tensors:
            raise buf.fail(f"{what} names tensor {i} of {n_tensors}")
    activation = weights_format = 0
    if t.scalar(OPERATOR_OPTIONS_TYPE, "B") == FULLY_CONNECTED_OPTIONS:
        options = t.table(OPERATOR_OPTIONS, f"{what}.builtin_options")
        if options is not None:
            activation = options.scalar(FC_ACTIVATION, "b")
            weights_format = options.scalar(FC_WEIGHTS_FORMAT, "b")
    return Operator(codes[opcode], ins, outs, activation, weights_format)


# --- the dense layers --------------------------------------------------------------------------
@dataclass(frozen=True)
class _Dense:
    x: Tensor
    w: Tensor
    b: Tensor
    out: Tensor
    activation: int


def _chain(g: Graph) -> list[tuple[Operator, _Dense | None]]:
    """The operators as a chain input -> output; FULLY_CONNECTED ones with their tensors."""
    if len(g.inputs) != 1 or len(g.outputs) != 1:
        raise g.fail(f"expected one input and one output, found {len(g.inputs)}, {len(g.outputs)}")
    previous = g.inputs[0]
    out: list[tuple[Operator, _Dense | None]] = []
    for k, op in enumerate(g.operators):
        if not op.inputs or op.inputs[0] != previous or len(op.outputs) != 1 or op.outputs[0] < 0:
            raise g.fail(
                f"operator {k} does not continue the chain from the input; use the "
                "autoencoder as tools/train_models.py exports it"
            )
        if op.builtin == TANH and len(op.inputs) == 1:
            out.append((op, None))
        elif op.builtin == FULLY_CONNECTED:
            out.append((op, _dense(g, k, op)))
        else:
            raise g.fail(
                f"operator {k} is builtin {op.builtin}: only a chain of FULLY_CONNECTED and "
                "TANH is supported (the anomaly autoencoder of tools/train_models.py)"
            )
        previous = op.outputs[0]
    if previous != g.outputs[0] or not any(d for _, d in out):
        raise g.fail("the chain of dense layers does not end at the output")
    return out


def _dense(g: Graph, k: int, op: Operator) -> _Dense:
    if len(op.inputs) != 3 or min(op.inputs) < 0:
        raise g.fail(f"dense layer {k} does not have a weight and a bias")
    x, w, b = (g.tensors[i] for i in op.inputs)
    out = g.tensors[op.outputs[0]]
    if len(w.shape) != 2 or b.shape != (w.shape[0],):
        raise g.fail(f"dense layer {k}: weight {w.shape} and bias {b.shape} do not match")
    if x.shape[-1:] != w.shape[1:] or out.shape[-1:] != w.shape[:1]:
        raise g.fail(f"dense layer {k}: weight {w.shape} between {x.shape} and {out.shape}")
    if op.weights_format != 0:
        raise g.fail(f"dense layer {k} keeps its weights shuffled (format {op.weights_format})")
    if op.activation not in ACTIVATIONS:
        raise g.fail(f"dense layer {k} has fused activation {op.activation}")
    for t in (w, b):
        dt = DTYPES.get(t.type)
        _, size = g.buffers[t.buffer]
        if dt is None or t.buffer == 0 or size != t.size * dt.itemsize:
            raise g.fail(
                f"dense layer {k}: {t.name!r} is not a constant {t.type_name} tensor of "
                f"{t.size} values (buffer {t.buffer}, {size} bytes)"
            )
    return _Dense(x, w, b, out, op.activation)


def _denses(g: Graph) -> list[_Dense]:
    return [d for _, d in _chain(g) if d is not None]


def _check_layers(denses: list[_Dense], layers: Layers, label: str) -> list[tuple[np.ndarray, ...]]:
    """The new layers as float64 ``(W [out, in], b)``, checked against the template's shapes."""
    if len(layers) != len(denses):
        raise ModelError(f"{label}: {len(layers)} layers given, the template has {len(denses)}")
    out = []
    for k, (layer, d) in enumerate(zip(layers, denses, strict=True)):
        try:
            w, b = (np.asarray(a, dtype=np.float64) for a in layer)
        except (TypeError, ValueError) as err:
            raise ModelError(f"{label}: layer {k} is not a pair of float arrays ({err})") from err
        want = (d.w.shape[1], d.w.shape[0])
        if w.shape != want or b.shape != (want[1],):
            raise ModelError(
                f"{label}: layer {k} has weight {w.shape} and bias {b.shape}, the template "
                f"needs {want} and {(want[1],)} (Keras layout: inputs, outputs)"
            )
        if not (np.all(np.isfinite(w)) and np.all(np.isfinite(b))):
            raise ModelError(f"{label}: layer {k} has NaN or infinite parameters; refused")
        out.append((np.ascontiguousarray(w.T), b))
    return out


class _Patch:
    """Writes into a copy of the template, each range at most once and inside the file."""

    def __init__(self, data: bytes, label: str) -> None:
        self.out = bytearray(data)
        self.label = label
        self.ranges: list[tuple[int, int, str]] = []

    def write(self, pos: int, payload: bytes, what: str) -> None:
        end = pos + len(payload)
        if pos < 0 or end > len(self.out):
            raise ModelError(f"{self.label}: {what} lies outside the file")
        for start, stop, other in self.ranges:
            if pos < stop and start < end:
                raise ModelError(
                    f"{self.label}: {what} shares bytes with {other}; a model whose constants "
                    "overlap cannot be patched in place"
                )
        self.ranges.append((pos, end, what))
        self.out[pos:end] = payload

    def tensor(self, g: Graph, t: Tensor, values: np.ndarray) -> None:
        pos, size = g.buffers[t.buffer]
        payload = np.ascontiguousarray(values, dtype=DTYPES[t.type]).tobytes()
        if len(payload) != size:
            raise ModelError(f"{self.label}: {t.name!r} needs {size} bytes, got {len(payload)}")
        self.write(pos, payload, f"the data of {t.name!r}")

    def scales(self, t: Tensor, scales: np.ndarray) -> None:
        q = t.quantization
        assert q is not None and len(scales) == len(q.scale)
        self.write(q.scale_at, np.asarray(scales, "<f4").tobytes(), f"the scales of {t.name!r}")


# --- float32 models ----------------------------------------------------------------------------
def read_float_layers(data: bytes, *, label: str = "model") -> list[tuple[np.ndarray, np.ndarray]]:
    """``(W, b)`` of each dense layer of a float32 model, Keras layout (``W``: inputs, outputs),
    float32, in graph order. Raises ModelError."""
    g = read_graph(data, label=label)
    layers = []
    for d in _denses(g):
        w = _float_at(data, g, d.w, label)
        b = _float_at(data, g, d.b, label)
        layers.append((np.ascontiguousarray(w.T), b))
    return layers


def _float_at(data: bytes, g: Graph, t: Tensor, label: str) -> np.ndarray:
    if t.type != 0:
        raise ModelError(
            f"{label}: {t.name!r} is {t.type_name}, not float32: read float weights from the "
            "float32 model (models/cloud/); quantize_layers writes the int8 one"
        )
    pos, _ = g.buffers[t.buffer]
    return np.frombuffer(data, dtype="<f4", count=t.size, offset=pos).reshape(t.shape).copy()


def with_float_layers(template: bytes, layers: Layers, *, label: str = "template") -> bytes:
    """The float32 ``template`` with its dense layers' weights and biases replaced by ``layers``
    (Keras layout, the template's shapes). Raises ModelError."""
    g = read_graph(template, label=label)
    denses = _denses(g)
    new = _check_layers(denses, layers, label)
    patch = _Patch(template, label)
    for d, (wt, b) in zip(denses, new, strict=True):
        for t, values in ((d.w, wt), (d.b, b)):
            if t.type != 0:
                raise ModelError(f"{label}: {t.name!r} is {t.type_name}; use quantize_layers")
            with np.errstate(over="ignore"):
                v32 = values.astype(np.float32)
            if not np.all(np.isfinite(v32)):
                raise ModelError(f"{label}: {t.name!r}: values beyond float32's range; refused")
            patch.tensor(g, t, v32)
    return bytes(patch.out)


# --- int8 models -------------------------------------------------------------------------------
@dataclass(frozen=True)
class LayerQuantization:
    """How a template quantizes one dense layer: ``weight_scales`` has one entry per output
    channel (``per_channel``) or one for the tensor; zero points are all 0 (checked)."""

    weight: str
    per_channel: bool
    input_scale: float
    weight_scales: np.ndarray
    bias_scales: np.ndarray


def template_quantization(template: bytes, *, label: str = "template") -> list[LayerQuantization]:
    """The quantization of each dense layer of an int8 template. Raises ModelError for a
    template this module cannot patch (not symmetric int8 weights with int32 biases scaled
    ``input_scale * weight_scale``)."""
    g = read_graph(template, label=label)
    return [_layer_quantization(d, label) for d in _denses(g)]


def _scales(t: Tensor, label: str, lengths: tuple[int, ...]) -> np.ndarray:
    q = t.quantization
    if q is None or len(q.scale) not in lengths:
        raise ModelError(
            f"{label}: {t.name!r} has {0 if q is None else len(q.scale)} quantization scales, "
            f"expected {' or '.join(str(n) for n in sorted(set(lengths)))}"
        )
    if len(q.zero_point) != len(q.scale):
        raise ModelError(f"{label}: {t.name!r} has {len(q.zero_point)} zero points")
    if not (np.all(np.isfinite(q.scale)) and np.all(q.scale > 0)):
        raise ModelError(f"{label}: {t.name!r} has scales that are not positive and finite")
    return q.scale.astype(np.float64)


def _layer_quantization(d: _Dense, label: str) -> LayerQuantization:
    n_out = d.w.shape[0]
    if (d.x.type, d.w.type, d.b.type) != (9, 9, 2):
        raise ModelError(
            f"{label}: {d.w.name!r}: expected int8 input and weight and an int32 bias, found "
            f"{d.x.type_name}, {d.w.type_name}, {d.b.type_name}: is this the int8 model?"
        )
    s_in = _scales(d.x, label, (1,))
    s_w = _scales(d.w, label, (1, n_out))
    s_b = _scales(d.b, label, (len(s_w),))
    qw, qb = d.w.quantization, d.b.quantization
    assert qw is not None and qb is not None
    per_channel = len(s_w) == n_out and n_out > 1
    if per_channel and qw.dimension != 0:
        raise ModelError(f"{label}: {d.w.name!r} is quantized along axis {qw.dimension}, not 0")
    if np.any(qw.zero_point != 0) or np.any(qb.zero_point != 0):
        raise ModelError(
            f"{label}: {d.w.name!r}: only symmetric weights (zero point 0) are supported"
        )
    if qw.has_min_max or qb.has_min_max:
        raise ModelError(f"{label}: {d.w.name!r} records min/max, which would not be updated")
    if not np.allclose(s_b, s_in[0] * s_w, rtol=BIAS_SCALE_RTOL, atol=0):
        raise ModelError(f"{label}: the bias scales of {d.b.name!r} are not input * weight scales")
    return LayerQuantization(d.w.name, per_channel, float(s_in[0]), s_w, s_b)


def round_half_away(x: np.ndarray) -> np.ndarray:
    """Round to the nearest integer, halves away from zero (C's ``std::round``), as floats."""
    x = np.asarray(x, dtype=np.float64)
    r = np.trunc(x)
    return r + np.sign(x) * (np.abs(x - r) >= 0.5)


def _weight_scales(wt: np.ndarray, b: np.ndarray, lq: LayerQuantization) -> np.ndarray:
    """The converter's symmetric scales ``max|W| / 127`` (per output row or for the tensor);
    a row of (near) zeros keeps the template's scale; raised where the bias would not fit int32."""
    if lq.per_channel:
        peak, bias_peak = np.max(np.abs(wt), axis=1), np.abs(b)
    else:
        peak, bias_peak = np.array([np.max(np.abs(wt))]), np.array([np.max(np.abs(b))])
    scale = peak / INT8_LIMIT
    scale = np.where(scale < np.finfo(np.float32).tiny, lq.weight_scales, scale)
    # the margin covers the scale's rounding to float32 when it is stored
    return np.maximum(scale, bias_peak / (lq.input_scale * INT32_MAX) * (1 + BIAS_FIT_MARGIN))


def quantize_layers(template: bytes, layers: Layers, *, label: str = "template") -> bytes:
    """The int8 ``template`` with new weights ``layers`` (Keras layout, float): int8 weights
    and int32 biases with new scales written over the template's, in place. Activation
    quantization stays the template's (see :func:`activation_clipping`). Raises ModelError."""
    g = read_graph(template, label=label)
    denses = _denses(g)
    new = _check_layers(denses, layers, label)
    patch = _Patch(template, label)
    for d, (wt, b) in zip(denses, new, strict=True):
        lq = _layer_quantization(d, label)
        w_scale = _weight_scales(wt, b, lq)
        rows = w_scale[:, None] if lq.per_channel else w_scale[0]
        q_w = np.clip(round_half_away(wt / rows), -INT8_LIMIT, INT8_LIMIT)
        # the converter multiplies by the weight scales as stored (float32)
        b_scale = lq.input_scale * w_scale.astype(np.float32).astype(np.float64)
        q_b = round_half_away(b / (b_scale if lq.per_channel else b_scale[0]))
        if np.any(np.abs(q_b) > INT32_MAX):  # unreachable after _weight_scales; kept as a guard
            raise ModelError(f"{label}: the bias of {d.w.name!r} does not fit int32")
        patch.tensor(g, d.w, q_w.astype(np.int8))
        patch.tensor(g, d.b, q_b.astype(np.int32))
        patch.scales(d.w, w_scale)
        patch.scales(d.b, b_scale)
    return bytes(patch.out)


# --- activation ranges -------------------------------------------------------------------------
@dataclass(frozen=True)
class Clipping:
    """How much of one tensor's float values falls outside the template's int8 range."""

    tensor: str
    low: float
    high: float
    below: float
    above: float

    @property
    def fraction(self) -> float:
        return self.below + self.above


def activation_clipping(
    template: bytes, layers: Layers, inputs: np.ndarray, *, label: str = "template"
) -> list[Clipping]:
    """For float ``inputs`` (rows of the model's input width) run the new ``layers`` in float
    along the template's graph and report, for the input and each operator's output tensor in
    order, the fraction of values outside the range the template's quantization can represent
    (``(-128 - zero_point) * scale .. (127 - zero_point) * scale``): those saturate in the int8
    model. A float template's tensors have no range and report 0. Raises ModelError."""
    g = read_graph(template, label=label)
    chain = _chain(g)
    new = iter(_check_layers(_denses(g), layers, label))
    x = np.asarray(inputs, dtype=np.float64)
    width = g.tensors[g.inputs[0]].shape[-1:]
    if x.ndim != 2 or x.shape[1:] != width or not np.all(np.isfinite(x)):
        raise ModelError(f"{label}: inputs must be finite rows of width {width}, got {x.shape}")
    report = [_clipping(g.tensors[g.inputs[0]], x, label)]
    for op, d in chain:
        if d is None:
            x = np.tanh(x)
        else:
            wt, b = next(new)
            _, lo, hi = ACTIVATIONS[d.activation]
            x = np.clip(x @ wt.T + b, lo, hi)
        report.append(_clipping(g.tensors[op.outputs[0]], x, label))
    return report


def _clipping(t: Tensor, values: np.ndarray, label: str) -> Clipping:
    if t.quantization is None or t.type == 0:
        return Clipping(t.name, -np.inf, np.inf, 0.0, 0.0)
    if t.type != 9:
        raise ModelError(f"{label}: {t.name!r} is {t.type_name}, expected int8 activations")
    scale = float(_scales(t, label, (1,))[0])
    zero = int(t.quantization.zero_point[0])
    low, high = (-128 - zero) * scale, (127 - zero) * scale
    n = max(values.size, 1)
    below = float(np.count_nonzero(values < low)) / n
    above = float(np.count_nonzero(values > high)) / n
    return Clipping(t.name, low, high, below, above)
