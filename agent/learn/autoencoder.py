"""The anomaly autoencoder as numpy arrays: forward pass, hand-written backpropagation, training.

Devices train the float master weights without TensorFlow (which they never install), so this
module computes the same function as the Keras model of ``tools/train_models.py``
(``train_autoencoder``)::

    window (dim) -> Dense(hidden, relu) "encode" -> Dense(bottleneck, linear) "code"
                 -> Dense(hidden, relu) "decode" -> Dense(dim, tanh) "reconstruction"

with the loss Keras compiles it with: mean squared error, the mean over every element of the
batch (Keras averages over the last axis, then over the rows; with rows of one width that is the
same number). The Keras training is a *denoising* autoencoder (corrupted inputs, clean targets):
:meth:`DenseAutoencoder.train` takes an optional ``target`` for that; without it the input is the
target.

Weights are held in Keras' layout, ``W`` of shape ``(inputs, outputs)`` so a layer is
``x @ W + b``. :meth:`DenseAutoencoder.to_vector` flattens every parameter in one fixed order,
the order in which updates are clipped, noised, uploaded and averaged::

    encode.W, encode.b, code.W, code.b, decode.W, decode.b, reconstruction.W, reconstruction.b

each ``W`` row-major (C order). All arithmetic is in the parameters' dtype: float32 on devices,
float64 for the gradient check. Randomness comes only from a ``numpy.random.Generator`` passed in.
Memory is bounded by the minibatch: activations of one batch at a time, never per-sample
gradients of the whole set.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

#: Layer names and activations, in order (the Keras model's names).
LAYERS = ("encode", "code", "decode", "reconstruction")
ACTIVATIONS = ("relu", "linear", "relu", "tanh")

#: Defaults of the Keras training (tools/train_models.py: BATCH, LEARNING_RATE) and of Keras'
#: Adam (beta_1, beta_2, epsilon).
BATCH_SIZE = 128
LEARNING_RATE = 2e-3
ADAM_BETA1 = 0.9
ADAM_BETA2 = 0.999
ADAM_EPSILON = 1e-7
#: Rows per chunk when evaluating the loss of a whole set (bounds memory, not the result).
EVAL_CHUNK = 4096
OPTIMIZERS = ("adam", "sgd")


@dataclass(frozen=True)
class TrainResult:
    """What local training hands to the update step: the new weights and how many samples made
    them (FedAvg weights a device's update by that count)."""

    model: DenseAutoencoder
    samples: int
    epoch_losses: tuple[float, ...]


@dataclass(frozen=True, eq=False)
class DenseAutoencoder:
    """Weights and biases of the four dense layers (read-only arrays of one float dtype).

    ``weights[i]`` has shape ``(sizes[i], sizes[i+1])`` and ``biases[i]`` shape ``(sizes[i+1],)``,
    with ``sizes = (dim, hidden, bottleneck, hidden, dim)``. Instances never change: training
    returns a new one, so the global model a device received stays available as FedProx's anchor.
    """

    weights: tuple[np.ndarray, ...]
    biases: tuple[np.ndarray, ...]

    def __post_init__(self) -> None:
        if len(self.weights) != len(LAYERS) or len(self.biases) != len(LAYERS):
            raise ValueError(f"expected {len(LAYERS)} weight matrices and bias vectors")
        dtype = np.asarray(self.weights[0]).dtype
        if dtype not in (np.float32, np.float64):
            raise ValueError(f"parameters must be float32 or float64, got {dtype}")
        ws, bs = [], []
        for i, (w, b) in enumerate(zip(self.weights, self.biases, strict=True)):
            w = np.array(w, dtype=dtype)  # a private copy, so no caller can change it later
            b = np.array(b, dtype=dtype)
            if w.ndim != 2 or b.shape != (w.shape[1],):
                raise ValueError(f"{LAYERS[i]}: weight {w.shape} and bias {b.shape} do not match")
            if i and w.shape[0] != ws[-1].shape[1]:
                raise ValueError(f"{LAYERS[i]}: {w.shape[0]} inputs after {ws[-1].shape[1]} units")
            w.flags.writeable = False
            b.flags.writeable = False
            ws.append(w)
            bs.append(b)
        if ws[0].shape[0] != ws[-1].shape[1]:
            raise ValueError(f"input width {ws[0].shape[0]} != output width {ws[-1].shape[1]}")
        object.__setattr__(self, "weights", tuple(ws))
        object.__setattr__(self, "biases", tuple(bs))

    # --- construction and the parameter vector ---------------------------------------------
    @classmethod
    def initial(
        cls, dim: int, hidden: int, bottleneck: int, rng: np.random.Generator
    ) -> DenseAutoencoder:
        """Keras' default initialisation (Glorot uniform weights, zero biases): for tests and for a
        model trained from scratch, not for federated rounds, which start from the masters."""
        sizes = (dim, hidden, bottleneck, hidden, dim)
        ws, bs = [], []
        for n_in, n_out in itertools.pairwise(sizes):
            limit = np.sqrt(6.0 / (n_in + n_out))
            ws.append(rng.uniform(-limit, limit, (n_in, n_out)).astype(np.float32))
            bs.append(np.zeros(n_out, dtype=np.float32))
        return cls(tuple(ws), tuple(bs))

    @property
    def sizes(self) -> tuple[int, ...]:
        """Layer widths ``(dim, hidden, bottleneck, hidden, dim)``."""
        return (self.weights[0].shape[0], *(w.shape[1] for w in self.weights))

    @property
    def dim(self) -> int:
        return self.sizes[0]

    @property
    def dtype(self) -> np.dtype:
        return self.weights[0].dtype

    @property
    def shapes(self) -> tuple[tuple[int, ...], ...]:
        """Shapes of the parameters in :meth:`to_vector` order (W, b of each layer)."""
        return _shapes(self.sizes)

    @property
    def parameter_count(self) -> int:
        return sum(int(np.prod(s)) for s in self.shapes)

    def parameters(self) -> tuple[np.ndarray, ...]:
        """The parameter arrays in :meth:`to_vector` order."""
        return tuple(p for wb in zip(self.weights, self.biases, strict=True) for p in wb)

    def to_vector(self) -> np.ndarray:
        """All parameters as one new 1-D array, in the order of the module docstring."""
        return np.concatenate([p.ravel() for p in self.parameters()])

    @classmethod
    def from_vector(cls, vector: np.ndarray, sizes: Sequence[int]) -> DenseAutoencoder:
        """The inverse of :meth:`to_vector` for layer widths ``sizes``; keeps the vector's dtype."""
        sizes = tuple(int(s) for s in sizes)
        if len(sizes) != len(LAYERS) + 1:
            raise ValueError(f"sizes must have {len(LAYERS) + 1} widths, got {sizes}")
        vector = np.asarray(vector)
        params = _unflatten(vector, sizes)
        return cls(tuple(params[0::2]), tuple(params[1::2]))

    def with_vector(self, vector: np.ndarray) -> DenseAutoencoder:
        """A model of this one's shape with parameters ``vector``."""
        return self.from_vector(vector, self.sizes)

    def astype(self, dtype: type[np.floating]) -> DenseAutoencoder:
        return DenseAutoencoder(
            tuple(w.astype(dtype) for w in self.weights),
            tuple(b.astype(dtype) for b in self.biases),
        )

    # --- the function and its gradient ------------------------------------------------------
    def _rows(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=self.dtype)
        if x.ndim == 1:
            x = x[None]
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"expected rows of width {self.dim}, got shape {x.shape}")
        return x

    def forward(self, x: np.ndarray) -> np.ndarray:
        """The reconstruction of rows ``x`` (shape ``(n, dim)``, or one row ``(dim,)``)."""
        single = np.ndim(x) == 1
        y = _forward(self.parameters(), self._rows(x))[-1]
        return y[0] if single else y

    def loss(self, x: np.ndarray, target: np.ndarray | None = None) -> float:
        """Mean squared error of the reconstruction of ``x`` against ``target`` (default ``x``),
        over every element, evaluated in chunks of :data:`EVAL_CHUNK` rows."""
        x = self._rows(x)
        t = x if target is None else self._rows(target)
        if len(x) != len(t):
            raise ValueError(f"{len(x)} inputs but {len(t)} targets")
        if len(x) == 0:
            raise ValueError("loss of an empty set")
        params = self.parameters()
        total = 0.0
        for start in range(0, len(x), EVAL_CHUNK):
            y = _forward(params, x[start : start + EVAL_CHUNK])[-1]
            total += float(np.sum(np.square(y - t[start : start + EVAL_CHUNK]), dtype=np.float64))
        return total / x.size

    def gradients(
        self,
        x: np.ndarray,
        target: np.ndarray | None = None,
        *,
        prox_mu: float = 0.0,
        anchor: DenseAutoencoder | np.ndarray | None = None,
    ) -> tuple[float, np.ndarray]:
        """The objective on the batch ``x`` and its gradient as a vector (:meth:`to_vector` order).

        The objective is the MSE of :meth:`loss` plus, when ``prox_mu > 0``, FedProx's proximal
        term ``prox_mu / 2 * ||w - anchor||^2`` (``anchor``: the global weights of the round, a
        model or its vector), which keeps a device on non-IID data near the global model.
        """
        x = self._rows(x)
        t = x if target is None else self._rows(target)
        if len(x) != len(t) or len(x) == 0:
            raise ValueError(
                f"need equal, non-zero numbers of inputs and targets: {len(x)}, {len(t)}"
            )
        anchor_vec = self._anchor(prox_mu, anchor)
        vec = self.to_vector()
        loss, grad = _loss_and_grad(_unflatten(vec, self.sizes), x, t)
        if anchor_vec is not None:
            diff = vec - anchor_vec
            loss += 0.5 * prox_mu * float(np.dot(diff, diff))
            grad += self.dtype.type(prox_mu) * diff
        return loss, grad

    def _anchor(
        self, prox_mu: float, anchor: DenseAutoencoder | np.ndarray | None
    ) -> np.ndarray | None:
        if prox_mu < 0 or not np.isfinite(prox_mu):
            raise ValueError(f"prox_mu must be finite and >= 0, got {prox_mu}")
        if prox_mu == 0:
            return None
        if anchor is None:
            raise ValueError("prox_mu > 0 needs the anchor (the round's global weights)")
        vec = anchor.to_vector() if isinstance(anchor, DenseAutoencoder) else np.asarray(anchor)
        if vec.shape != (self.parameter_count,):
            raise ValueError(f"anchor has {vec.size} parameters, model {self.parameter_count}")
        return vec.astype(self.dtype)

    # --- local training -----------------------------------------------------------------------
    def train(
        self,
        x: np.ndarray,
        epochs: int,
        rng: np.random.Generator,
        *,
        batch_size: int = BATCH_SIZE,
        lr: float = LEARNING_RATE,
        prox_mu: float = 0.0,
        anchor: DenseAutoencoder | np.ndarray | None = None,
        optimizer: str = "adam",
        target: np.ndarray | None = None,
    ) -> TrainResult:
        """Minibatch training from these weights; returns the new weights and the sample count.

        Each epoch visits the rows in a fresh order drawn from ``rng`` (the last batch may be
        short, as in Keras). ``optimizer="adam"`` uses Keras' defaults (beta 0.9/0.999, epsilon
        1e-7) with state that starts fresh each call (optimizer state is not shipped with the
        masters); ``"sgd"`` is plain gradient descent. With ``prox_mu > 0`` the FedProx anchor
        defaults to these starting weights, i.e. the global model the device received.
        ``epoch_losses`` are the mean batch objectives seen during each epoch.
        """
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}")
        if epochs < 0 or batch_size < 1 or not lr > 0:
            raise ValueError("need epochs >= 0, batch_size >= 1 and lr > 0")
        x = self._rows(x)
        t = x if target is None else self._rows(target)
        if len(x) != len(t):
            raise ValueError(f"{len(x)} inputs but {len(t)} targets")
        if prox_mu > 0 and anchor is None:
            anchor = self
        anchor_vec = self._anchor(prox_mu, anchor)
        dt = self.dtype.type
        vec = self.to_vector()  # the working parameters; `params` are views into it
        params = _unflatten(vec, self.sizes)
        m = np.zeros_like(vec)
        v = np.zeros_like(vec)
        step = 0
        n = len(x)
        losses = []
        for _ in range(epochs if n else 0):
            order = rng.permutation(n)
            seen = 0.0
            for start in range(0, n, batch_size):
                idx = order[start : start + batch_size]
                loss, grad = _loss_and_grad(params, x[idx], t[idx])
                if anchor_vec is not None:
                    diff = vec - anchor_vec
                    loss += 0.5 * prox_mu * float(np.dot(diff, diff))
                    grad += dt(prox_mu) * diff
                seen += loss * len(idx)
                step += 1
                if optimizer == "sgd":
                    vec -= dt(lr) * grad
                    continue
                m *= dt(ADAM_BETA1)
                m += dt(1 - ADAM_BETA1) * grad
                v *= dt(ADAM_BETA2)
                v += dt(1 - ADAM_BETA2) * np.square(grad)
                # bias-corrected step size, as Keras computes it
                alpha = lr * np.sqrt(1 - ADAM_BETA2**step) / (1 - ADAM_BETA1**step)
                vec -= dt(alpha) * m / (np.sqrt(v) + dt(ADAM_EPSILON))
            losses.append(seen / n)
        return TrainResult(self.with_vector(vec), n, tuple(losses))


def _shapes(sizes: Sequence[int]) -> tuple[tuple[int, ...], ...]:
    out: list[tuple[int, ...]] = []
    for n_in, n_out in itertools.pairwise(sizes):
        out += [(n_in, n_out), (n_out,)]
    return tuple(out)


def _unflatten(vector: np.ndarray, sizes: Sequence[int]) -> list[np.ndarray]:
    """Views into ``vector``, one per parameter, in :meth:`DenseAutoencoder.to_vector` order."""
    shapes = _shapes(sizes)
    total = sum(int(np.prod(s)) for s in shapes)
    if vector.shape != (total,):
        raise ValueError(f"expected a vector of {total} parameters, got shape {vector.shape}")
    out, offset = [], 0
    for shape in shapes:
        size = int(np.prod(shape))
        out.append(vector[offset : offset + size].reshape(shape))
        offset += size
    return out


def _forward(params: Sequence[np.ndarray], x: np.ndarray) -> list[np.ndarray]:
    """Pre-activations and activations ``[x, z1, a1, z2, z3, a3, z4, y]`` (a2 is z2: linear)."""
    w1, b1, w2, b2, w3, b3, w4, b4 = params
    z1 = x @ w1 + b1
    a1 = np.maximum(z1, 0)
    z2 = a1 @ w2 + b2
    z3 = z2 @ w3 + b3
    a3 = np.maximum(z3, 0)
    z4 = a3 @ w4 + b4
    return [x, z1, a1, z2, z3, a3, z4, np.tanh(z4)]


def _loss_and_grad(
    params: Sequence[np.ndarray], x: np.ndarray, t: np.ndarray
) -> tuple[float, np.ndarray]:
    """MSE over all elements of one batch and its gradient (backpropagation by hand)."""
    x, z1, a1, z2, z3, a3, _, y = _forward(params, x)
    _, _, w2, _, w3, _, w4, _ = params
    err = y - t
    loss = float(np.mean(np.square(err), dtype=np.float64))
    dy = err * y.dtype.type(2.0 / err.size)
    dz4 = dy * (1 - np.square(y))  # tanh' = 1 - tanh^2
    da3 = dz4 @ w4.T
    dz3 = da3 * (z3 > 0)  # relu' (0 at 0, as TensorFlow takes it)
    dz2 = dz3 @ w3.T  # linear layer: a2 = z2
    da1 = dz2 @ w2.T
    dz1 = da1 * (z1 > 0)
    grads = (
        x.T @ dz1,
        dz1.sum(axis=0),
        a1.T @ dz2,
        dz2.sum(axis=0),
        z2.T @ dz3,
        dz3.sum(axis=0),
        a3.T @ dz4,
        dz4.sum(axis=0),
    )
    return loss, np.concatenate([g.ravel() for g in grads])
