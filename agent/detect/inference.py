"""The one seam between the agent and a TFLite interpreter.

Two runtimes implement the same low-level API (:class:`InterpreterLike`): ``ai-edge-litert``
(preferred; ``ai_edge_litert.interpreter``) and the legacy ``tflite-runtime``
(``tflite_runtime.interpreter``, which needs numpy<2). :func:`make_interpreter` picks one
(``auto`` tries them in that order). On top of it :class:`TFLiteModel` is what the agent uses (the
:class:`Inference` protocol): it verifies the file against its manifest entry (size, SHA-256,
TFLite identifier, tensor shapes, dtypes and quantization parameters), quantizes float inputs with
the model's own scale and zero point, invokes on batches (resizing the batch dimension, or one
window at a time) and dequantizes the outputs.

Every problem with a model (missing, truncated, not a TFLite file, checksum or shape mismatch, a
runtime that is not installed) is a :class:`~agent.errors.ModelError` that names the file and what
to do next. TensorFlow is never imported here.

Logging policy: info when a model is loaded (name, runtime, size), debug for batch resizes. The
runtimes' C++ banner on stderr (``INFO: Created TensorFlow Lite XNNPACK delegate for CPU.``,
printed by TFLite's minimal logger, which ``TF_CPP_MIN_LOG_LEVEL`` does not reach) is filtered
out around interpreter creation (:func:`native_banner_filtered`); anything else written to stderr
meanwhile is passed on.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import re
import sys
import tempfile
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from agent.errors import ModelError
from agent.files import read_json

log = logging.getLogger(__name__)

RUNTIMES = ("auto", "litert", "tflite-runtime")
BATCH_MODES = ("resize", "loop")
MAX_BATCH = 4096  # windows per invoke when draining a backlog
TFLITE_IDENTIFIER = b"TFL3"  # flatbuffer file identifier, bytes 4..8 of every .tflite file
MANIFEST_FORMAT = 1
HASH_CHUNK = 1 << 16  # bytes read at a time when a model file is hashed without being loaded

#: Lines the runtimes' C++ code prints on stderr when an interpreter is made, filtered out.
NATIVE_BANNER = re.compile(
    rb"^INFO: (Created TensorFlow Lite \S+ delegate for \S+"
    rb"|Initialized TensorFlow Lite runtime)\.?\s*$"
)

_DTYPES = {"int8": np.int8, "uint8": np.uint8, "int16": np.int16, "float32": np.float32}


@runtime_checkable
class InterpreterLike(Protocol):
    """The subset of ``tf.lite.Interpreter`` that both runtimes provide and we use."""

    def allocate_tensors(self) -> None: ...

    def get_input_details(self) -> list[dict[str, Any]]: ...

    def get_output_details(self) -> list[dict[str, Any]]: ...

    def resize_tensor_input(
        self, input_index: int, tensor_size: Sequence[int], strict: bool = False
    ) -> None: ...

    def set_tensor(self, tensor_index: int, value: np.ndarray) -> None: ...

    def invoke(self) -> None: ...

    def get_tensor(self, tensor_index: int) -> np.ndarray: ...


@runtime_checkable
class Inference(Protocol):
    """What the detector needs from a model: float windows in, float outputs out."""

    name: str
    runtime: str

    def predict(self, x: np.ndarray) -> np.ndarray: ...


def _import_runtime(runtime: str) -> Any:
    if runtime == "litert":
        from ai_edge_litert.interpreter import Interpreter
    elif runtime == "tflite-runtime":
        from tflite_runtime.interpreter import Interpreter
    else:
        raise ValueError(runtime)
    return Interpreter


def available_runtimes() -> list[str]:
    """The runtimes that import in this environment, preferred first."""
    found = []
    for r in RUNTIMES[1:]:
        try:
            _import_runtime(r)
        except ImportError:
            continue
        found.append(r)
    return found


def make_interpreter(
    content: bytes,
    runtime: str = "auto",
    num_threads: int = 1,
    *,
    delegates: bool = True,
    label: str = "model",
) -> tuple[InterpreterLike, str]:
    """An interpreter over ``content`` with tensors allocated, and the runtime that built it.

    ``delegates=False`` runs the runtime's built-in kernels without its default delegate
    (ai-edge-litert applies XNNPACK by default, and XNNPACK's int8 requantization rounds like
    the reference kernels, while tflite-runtime 2.14's built-in optimized kernels round
    differently). Without delegates both runtimes give bit-identical int8 outputs.
    """
    if runtime not in RUNTIMES:
        raise ModelError(f"{label}: unknown runtime {runtime!r}; use one of {', '.join(RUNTIMES)}")
    if num_threads < 1:
        raise ModelError(f"{label}: num_threads must be >= 1, got {num_threads}")
    candidates = list(RUNTIMES[1:]) if runtime == "auto" else [runtime]
    cls: Any = None
    chosen = ""
    errors = []
    for r in candidates:
        try:
            cls = _import_runtime(r)
            chosen = r
            break
        except ImportError as err:
            errors.append(f"{r}: {err}")
    if cls is None:
        raise ModelError(
            f"{label}: no TFLite runtime available ({'; '.join(errors)}); "
            "install ai-edge-litert (or tflite-runtime with numpy<2)"
        )
    kwargs: dict[str, Any] = {"model_content": content, "num_threads": num_threads}
    if not delegates:
        resolver = sys.modules[cls.__module__].OpResolverType
        kwargs["experimental_op_resolver_type"] = resolver.BUILTIN_WITHOUT_DEFAULT_DELEGATES
    try:
        with native_banner_filtered():
            interp = cls(**kwargs)
            interp.allocate_tensors()
    except (ValueError, RuntimeError) as err:
        raise ModelError(
            f"{label}: the {chosen} interpreter refused the model ({err}); "
            "the file is corrupt or not a TFLite model: fetch it again"
        ) from err
    return interp, chosen


#: Held while fd 2 points at a filter's temporary file: fd 2 is one per process, so two
#: interpreters built at once (two models loaded in worker threads) take turns. (Were they to
#: overlap, the second would save the first's temporary file as "stderr" and put it back last.)
_FD2 = threading.Lock()


@contextlib.contextmanager
def native_banner_filtered() -> Iterator[None]:
    """File descriptor 2 goes to a temporary file for the block; afterwards every line of it
    but :data:`NATIVE_BANNER`'s is written to the real stderr (other threads' output included:
    delayed, never lost). Without a usable fd 2 the block simply runs. One block at a time in
    the process (:data:`_FD2`)."""
    with _FD2, _fd2_filtered():
        yield


@contextlib.contextmanager
def _fd2_filtered() -> Iterator[None]:
    try:
        saved = os.dup(2)
    except OSError:
        yield
        return
    with tempfile.TemporaryFile() as tmp:
        with contextlib.suppress(Exception):
            sys.stderr.flush()
        os.dup2(tmp.fileno(), 2)
        try:
            yield
        finally:
            with contextlib.suppress(Exception):
                sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            kept = b"".join(
                line for line in tmp.read().splitlines(True) if not NATIVE_BANNER.match(line)
            )
            if kept:
                with contextlib.suppress(OSError):
                    os.write(2, kept)


@dataclass(frozen=True)
class TensorInfo:
    """Shape, dtype and affine quantization of one input or output tensor."""

    shape: tuple[int, ...]
    dtype: str
    scale: float = 0.0
    zero_point: int = 0

    @property
    def quantized(self) -> bool:
        return self.dtype != "float32" and self.scale > 0

    @property
    def np_dtype(self) -> Any:
        return _DTYPES[self.dtype]

    @functools.cached_property
    def _limits(self) -> tuple[int, int]:
        info = np.iinfo(self.np_dtype)
        return int(info.min), int(info.max)

    def quantize(self, x: np.ndarray) -> np.ndarray:
        """Float -> the tensor's integer type: ``round(x / scale) + zero_point``, saturated."""
        if not self.quantized:
            return np.asarray(x, dtype=self.np_dtype)
        lo, hi = self._limits
        q = np.multiply(x, 1.0 / self.scale, dtype=np.float64)
        np.rint(q, out=q)
        q += self.zero_point
        q.clip(lo, hi, out=q)
        return q.astype(self.np_dtype)

    def dequantize(self, q: np.ndarray) -> np.ndarray:
        """Integer values -> float: ``(q - zero_point) * scale``."""
        if not self.quantized:
            return np.asarray(q, dtype=np.float32)
        f = np.asarray(q, dtype=np.float64) - self.zero_point
        f *= self.scale
        return f.astype(np.float32)

    @property
    def representable(self) -> tuple[float, float]:
        """The float range the tensor can hold without saturating."""
        if not self.quantized:
            return (-np.inf, np.inf)
        lo, hi = self._limits
        return ((lo - self.zero_point) * self.scale, (hi - self.zero_point) * self.scale)

    def to_dict(self) -> dict[str, Any]:
        return {
            "shape": list(self.shape),
            "dtype": self.dtype,
            "scale": self.scale,
            "zero_point": self.zero_point,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TensorInfo:
        return cls(
            shape=tuple(int(s) for s in d["shape"]),
            dtype=str(d["dtype"]),
            scale=float(d.get("scale", 0.0)),
            zero_point=int(d.get("zero_point", 0)),
        )

    @classmethod
    def from_details(cls, d: Mapping[str, Any]) -> TensorInfo:
        """From an interpreter's tensor details."""
        scale, zero = d.get("quantization", (0.0, 0))
        dtype = np.dtype(d["dtype"]).name
        return cls(tuple(int(s) for s in d["shape"]), dtype, float(scale), int(zero))


@dataclass(frozen=True)
class ModelEntry:
    """One model of a manifest. ``raw`` keeps every field (features, threshold, scores...)."""

    name: str
    kind: str
    file: str
    sha256: str
    size: int
    input: TensorInfo
    output: TensorInfo
    raw: Mapping[str, Any] = field(default_factory=dict, compare=False)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], *, label: str = "manifest") -> ModelEntry:
        try:
            return cls(
                name=str(d["name"]),
                kind=str(d["kind"]),
                file=str(d["file"]),
                sha256=str(d["sha256"]).lower(),
                size=int(d["size"]),
                input=TensorInfo.from_dict(d["input"]),
                output=TensorInfo.from_dict(d["output"]),
                raw=dict(d),
            )
        except (KeyError, TypeError, ValueError) as err:
            raise ModelError(f"{label}: malformed model entry ({err!r})") from err


@dataclass(frozen=True)
class Manifest:
    """``models/manifest.json``: the models of a directory, by name."""

    path: Path
    models: Mapping[str, ModelEntry]
    raw: Mapping[str, Any] = field(default_factory=dict, compare=False)

    @property
    def directory(self) -> Path:
        return self.path.parent

    def entry(self, name: str) -> ModelEntry:
        try:
            return self.models[name]
        except KeyError:
            known = ", ".join(sorted(self.models)) or "none"
            raise ModelError(f"{self.path}: no model named {name!r} (known: {known})") from None

    def model_path(self, name: str) -> Path:
        return self.directory / self.entry(name).file


def load_manifest(path: str | Path) -> Manifest:
    """Read a manifest (a file, or a directory holding ``manifest.json``). Raises ModelError."""
    p = Path(path)
    if p.is_dir():
        p = p / "manifest.json"
    try:
        raw = read_json(p)
    except FileNotFoundError:
        raise ModelError(
            f"{p}: no model manifest; run tools/train_models.py or fetch the models"
        ) from None
    except (OSError, ValueError) as err:
        raise ModelError(f"{p}: unreadable manifest ({err})") from err
    if not isinstance(raw, dict) or not isinstance(raw.get("models"), dict):
        raise ModelError(f"{p}: not a model manifest (no 'models' table)")
    if raw.get("format") != MANIFEST_FORMAT:
        raise ModelError(f"{p}: manifest format {raw.get('format')!r}, expected {MANIFEST_FORMAT}")
    models = {
        name: ModelEntry.from_dict(d, label=f"{p}: models.{name}")
        for name, d in raw["models"].items()
    }
    return Manifest(p, models, raw)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _model_error(path: Path, err: OSError) -> ModelError:
    if isinstance(err, FileNotFoundError):
        return ModelError(f"{path}: model file missing; fetch the models again")
    return ModelError(f"{path}: cannot read the model file ({err})")


def _check_size(path: Path, size: int, entry: ModelEntry) -> None:
    if size != entry.size:
        what = "truncated" if size < entry.size else "longer than expected"
        raise ModelError(
            f"{path}: {what} ({size} bytes, manifest says {entry.size}); fetch the model again"
        )


def _check_digest(path: Path, digest: str, entry: ModelEntry) -> None:
    if digest != entry.sha256:
        raise ModelError(
            f"{path}: SHA-256 {digest[:16]}... does not match the manifest "
            f"({entry.sha256[:16]}...); the file is corrupt or not the one the manifest names"
        )


def _check_identifier(path: Path, head: bytes) -> None:
    if len(head) < 8 or head[4:8] != TFLITE_IDENTIFIER:
        raise ModelError(f"{path}: not a TFLite flatbuffer (no {TFLITE_IDENTIFIER.decode()} id)")


def check_model_file(path: Path, entry: ModelEntry) -> None:
    """:func:`read_model_file`'s checks (size, SHA-256, TFLite identifier) without holding the
    file: it is hashed in chunks of :data:`HASH_CHUNK` bytes. Raises ModelError."""
    try:
        with open(path, "rb") as f:
            _check_size(path, os.fstat(f.fileno()).st_size, entry)
            head = f.read(8)
            h = hashlib.sha256(head)
            got = len(head)
            while chunk := f.read(HASH_CHUNK):
                h.update(chunk)
                got += len(chunk)
    except OSError as err:
        raise _model_error(path, err) from err
    _check_size(path, got, entry)  # it changed while it was read
    _check_digest(path, h.hexdigest(), entry)
    _check_identifier(path, head)


def read_model_file(path: Path, entry: ModelEntry | None = None) -> bytes:
    """The bytes of a model file, checked against ``entry`` (size, SHA-256) and the TFLite
    identifier. With ``entry`` the file's size is checked before it is read, and no more than
    the size it declares is ever read. Raises ModelError."""
    try:
        with open(path, "rb") as f:
            if entry is None:
                data = f.read()
            else:
                _check_size(path, os.fstat(f.fileno()).st_size, entry)
                data = f.read(entry.size + 1)  # one more: a file that grew meanwhile
    except OSError as err:
        raise _model_error(path, err) from err
    if entry is not None:
        _check_size(path, len(data), entry)
        _check_digest(path, sha256_bytes(data), entry)
    _check_identifier(path, data[:8])
    return data


class TFLiteModel:
    """A TFLite model with one input and one output, behind the :class:`Inference` protocol.

    ``predict`` takes float inputs of shape ``(n, *input_shape[1:])`` (or one window without the
    batch axis) and returns float outputs ``(n, *output_shape[1:])``. Quantized tensors are
    (de)quantized with the model's own parameters. ``batch_mode="resize"`` resizes the batch
    dimension to run a backlog in one invoke; ``"loop"`` invokes once per window.
    """

    def __init__(
        self,
        content: bytes,
        *,
        name: str = "model",
        runtime: str = "auto",
        num_threads: int = 1,
        batch_mode: str = "resize",
        delegates: bool = True,
        entry: ModelEntry | None = None,
        label: str | None = None,
    ) -> None:
        label = label or name
        if batch_mode not in BATCH_MODES:
            raise ModelError(f"{label}: batch_mode must be one of {', '.join(BATCH_MODES)}")
        self.name = name
        self.entry = entry
        self.batch_mode = batch_mode
        self.num_threads = num_threads
        self.size = len(content)
        self.delegates = delegates
        self._interp, self.runtime = make_interpreter(
            content, runtime, num_threads, delegates=delegates, label=label
        )
        ins = self._interp.get_input_details()
        outs = self._interp.get_output_details()
        if len(ins) != 1 or len(outs) != 1:
            raise ModelError(
                f"{label}: expected one input and one output tensor, got {len(ins)} and {len(outs)}"
            )
        self._in_index = int(ins[0]["index"])
        self._out_index = int(outs[0]["index"])
        self.input = TensorInfo.from_details(ins[0])
        self.output = TensorInfo.from_details(outs[0])
        if entry is not None:
            for what, got, want in (
                ("input", self.input, entry.input),
                ("output", self.output, entry.output),
            ):
                _check_tensor(label, what, got, want)
        self._batch = int(self.input.shape[0])
        self.nonfinite = False  # the last batch's outputs held NaN or inf (said on each change)

    @classmethod
    def open(
        cls,
        manifest: Manifest,
        name: str,
        *,
        runtime: str = "auto",
        num_threads: int = 1,
        batch_mode: str = "resize",
        delegates: bool = True,
    ) -> TFLiteModel:
        """Load model ``name`` of ``manifest``, verifying it. Raises ModelError."""
        entry = manifest.entry(name)
        path = manifest.directory / entry.file
        data = read_model_file(path, entry)
        model = cls(
            data,
            name=name,
            runtime=runtime,
            num_threads=num_threads,
            batch_mode=batch_mode,
            delegates=delegates,
            entry=entry,
            label=str(path),
        )
        log.info(
            "model loaded name=%s runtime=%s bytes=%d threads=%d",
            name,
            model.runtime,
            len(data),
            num_threads,
        )
        return model

    @classmethod
    def from_file(cls, path: str | Path, **kwargs: Any) -> TFLiteModel:
        """Load a file without a manifest (no checksum): for tools and tests."""
        p = Path(path)
        return cls(read_model_file(p), name=kwargs.pop("name", p.stem), label=str(p), **kwargs)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.input.shape[1:])

    @property
    def output_shape(self) -> tuple[int, ...]:
        return tuple(self.output.shape[1:])

    def _resize(self, n: int) -> None:
        if n != self._batch:
            self._interp.resize_tensor_input(self._in_index, [n, *self.input_shape])
            self._interp.allocate_tensors()
            self._batch = n
            log.debug("model batch resized name=%s batch=%d", self.name, n)

    def invoke_raw(self, q: np.ndarray) -> np.ndarray:
        """Run already-quantized inputs ``(n, *input_shape)``; returns the raw output tensor."""
        n = len(q)
        if n == 1 or self.batch_mode == "loop":
            self._resize(1)
        if n == 1:  # the streaming path: one window
            self._interp.set_tensor(self._in_index, np.ascontiguousarray(q))
            self._interp.invoke()
            return self._interp.get_tensor(self._out_index).copy()
        out = np.empty((n, *self.output_shape), dtype=self.output.np_dtype)
        if self.batch_mode == "loop":
            for i in range(n):
                self._interp.set_tensor(self._in_index, q[i : i + 1])
                self._interp.invoke()
                out[i] = self._interp.get_tensor(self._out_index)[0]
            return out
        for start in range(0, n, MAX_BATCH):
            chunk = q[start : start + MAX_BATCH]
            self._resize(len(chunk))
            self._interp.set_tensor(self._in_index, np.ascontiguousarray(chunk))
            self._interp.invoke()
            out[start : start + len(chunk)] = self._interp.get_tensor(self._out_index)
        return out

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Float inputs -> float outputs, batched."""
        x = np.asarray(x, dtype=np.float32)
        single = x.shape == self.input_shape
        if single:
            x = x[None]
        if x.shape[1:] != self.input_shape:
            raise ValueError(f"{self.name}: expected inputs of shape {self.input_shape}")
        if len(x) == 0:
            return np.zeros((0, *self.output_shape), dtype=np.float32)
        y = self.output.dequantize(self.invoke_raw(self.input.quantize(x)))
        if bool(np.isfinite(y).all()) == self.nonfinite:
            self.nonfinite = not self.nonfinite
            if self.nonfinite:
                log.warning(
                    "event=model_output_not_finite name=%s: the model gives NaN or inf for these "
                    "inputs (the detector scores such windows without its reconstruction); "
                    "assign another version",
                    self.name,
                )
            else:
                log.info("event=model_output_finite name=%s", self.name)
        return y[0] if single else y


def _check_tensor(label: str, what: str, got: TensorInfo, want: TensorInfo) -> None:
    if tuple(got.shape[1:]) != tuple(want.shape[1:]) or got.dtype != want.dtype:
        raise ModelError(
            f"{label}: {what} tensor is {got.dtype}{list(got.shape)}, the manifest says "
            f"{want.dtype}{list(want.shape)}; the model and its manifest do not belong together"
        )
    if want.quantized and (
        not np.isclose(got.scale, want.scale, rtol=1e-6) or got.zero_point != want.zero_point
    ):
        raise ModelError(
            f"{label}: {what} quantization (scale {got.scale:g}, zero point {got.zero_point}) "
            f"differs from the manifest ({want.scale:g}, {want.zero_point})"
        )
