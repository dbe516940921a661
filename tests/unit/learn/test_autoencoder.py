"""The numpy autoencoder (agent/learn/autoencoder.py): its gradient against finite differences,
the parameter vector's round trip, training, and FedProx's proximal term."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from agent.learn.autoencoder import DenseAutoencoder, _shapes


def small_model(seed: int, dim: int = 6, hidden: int = 5, bottleneck: int = 2) -> DenseAutoencoder:
    """A random model with non-zero biases, so every parameter's gradient is exercised."""
    rng = np.random.default_rng(seed)
    model = DenseAutoencoder.initial(dim, hidden, bottleneck, rng)
    vec = model.to_vector()
    return model.with_vector(vec + rng.normal(0.0, 0.1, vec.shape).astype(np.float32))


def structured_data(n: int, dim: int, seed: int) -> np.ndarray:
    """Rows from one fixed distribution: 2 latent factors through a fixed linear map, in (-1, 1)."""
    rng = np.random.default_rng(seed)
    mix = np.random.default_rng(1234).normal(0.0, 0.6, (2, dim))
    z = rng.normal(0.0, 1.0, (n, 2))
    return np.tanh(z @ mix + rng.normal(0.0, 0.02, (n, dim))).astype(np.float32)


def central_differences(
    model: DenseAutoencoder, x: np.ndarray, h: float = 1e-6, **kwargs: object
) -> np.ndarray:
    vec = model.to_vector()
    out = np.empty_like(vec)
    for i in range(len(vec)):
        up, down = vec.copy(), vec.copy()
        up[i] += h
        down[i] -= h
        f_up = model.with_vector(up).gradients(x, **kwargs)[0]  # type: ignore[arg-type]
        f_down = model.with_vector(down).gradients(x, **kwargs)[0]  # type: ignore[arg-type]
        out[i] = (f_up - f_down) / (2 * h)
    return out


@pytest.mark.parametrize("prox_mu", [0.0, 0.7])
def test_gradient_matches_central_differences(prox_mu: float) -> None:
    model = small_model(3).astype(np.float64)
    x = np.random.default_rng(4).normal(0.0, 1.0, (9, model.dim))
    anchor = model.to_vector() + np.random.default_rng(5).normal(0.0, 0.3, model.parameter_count)
    kwargs = {"prox_mu": prox_mu, "anchor": anchor if prox_mu else None}
    loss, grad = model.gradients(x, **kwargs)
    numeric = central_differences(model, x, **kwargs)
    assert grad.dtype == np.float64
    assert loss == pytest.approx(
        model.loss(x) + 0.5 * prox_mu * np.sum((model.to_vector() - anchor) ** 2)
    )
    np.testing.assert_allclose(grad, numeric, rtol=1e-5, atol=1e-8)


def test_gradient_with_a_denoising_target_matches_central_differences() -> None:
    model = small_model(6).astype(np.float64)
    rng = np.random.default_rng(7)
    target = rng.uniform(-0.9, 0.9, (7, model.dim))
    x = target + rng.normal(0.0, 0.5, target.shape)
    _, grad = model.gradients(x, target)
    numeric = central_differences(model, x, target=target)
    np.testing.assert_allclose(grad, numeric, rtol=1e-5, atol=1e-8)


def test_float32_gradient_agrees_with_float64() -> None:
    model = small_model(8)
    x = np.random.default_rng(9).normal(0.0, 1.0, (32, model.dim)).astype(np.float32)
    loss32, g32 = model.gradients(x)
    loss64, g64 = model.astype(np.float64).gradients(x)
    assert g32.dtype == np.float32
    assert loss32 == pytest.approx(loss64, rel=1e-5)
    np.testing.assert_allclose(g32, g64, rtol=1e-3, atol=1e-6)


def test_forward_computes_the_keras_layers() -> None:
    """relu -> linear -> relu -> tanh, written out independently of the module's _forward."""
    model = small_model(10)
    x = np.random.default_rng(11).normal(0.0, 2.0, (5, model.dim)).astype(np.float32)
    h = x
    for w, b, act in zip(
        model.weights, model.biases, ("relu", "linear", "relu", "tanh"), strict=True
    ):
        h = np.einsum("ni,io->no", h, w) + b
        h = {"relu": lambda v: np.where(v > 0, v, 0), "linear": lambda v: v, "tanh": np.tanh}[act](
            h
        )
    np.testing.assert_allclose(model.forward(x), h, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(model.forward(x[0]), h[0], rtol=1e-5, atol=1e-6)
    assert model.loss(x) == pytest.approx(float(np.mean((h - x) ** 2)), rel=1e-5)


@st.composite
def vectors_and_sizes(draw: st.DrawFn) -> tuple[np.ndarray, tuple[int, ...]]:
    dim, hidden, bottleneck = (draw(st.integers(1, 6)) for _ in range(3))
    sizes = (dim, hidden, bottleneck, hidden, dim)
    count = sum(int(np.prod(s)) for s in _shapes(sizes))
    elements = st.floats(width=32, allow_nan=False, allow_infinity=False)
    return draw(hnp.arrays(np.float32, count, elements=elements)), sizes


@given(vectors_and_sizes())
@settings(max_examples=100, deadline=None)
def test_vector_round_trip(case: tuple[np.ndarray, tuple[int, ...]]) -> None:
    vec, sizes = case
    model = DenseAutoencoder.from_vector(vec, sizes)
    assert model.sizes == sizes
    assert [p.shape for p in model.parameters()] == list(model.shapes)
    np.testing.assert_array_equal(model.to_vector(), vec)
    again = DenseAutoencoder.from_vector(model.to_vector(), model.sizes)
    for a, b in zip(again.parameters(), model.parameters(), strict=True):
        np.testing.assert_array_equal(a, b)


def test_vector_order_is_the_documented_one() -> None:
    model = small_model(12, dim=3, hidden=2, bottleneck=1)
    expected = np.concatenate(
        [
            model.weights[0].ravel(),
            model.biases[0],
            model.weights[1].ravel(),
            model.biases[1],
            model.weights[2].ravel(),
            model.biases[2],
            model.weights[3].ravel(),
            model.biases[3],
        ]
    )
    np.testing.assert_array_equal(model.to_vector(), expected)


def test_from_vector_refuses_a_wrong_length() -> None:
    with pytest.raises(ValueError, match="parameters"):
        DenseAutoencoder.from_vector(np.zeros(10, np.float32), (3, 2, 1, 2, 3))


def test_parameters_are_read_only() -> None:
    model = small_model(13)
    with pytest.raises(ValueError):
        model.weights[0][0, 0] = 1.0


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_training_lowers_the_loss(optimizer: str) -> None:
    x = structured_data(600, 8, seed=14)
    held_out = structured_data(300, 8, seed=15)
    model = DenseAutoencoder.initial(8, 8, 3, np.random.default_rng(16))
    lr = 1e-2 if optimizer == "adam" else 0.5
    result = model.train(
        x, 40, np.random.default_rng(17), batch_size=32, lr=lr, optimizer=optimizer
    )
    assert result.samples == 600
    assert len(result.epoch_losses) == 40
    assert result.model.dtype == np.float32
    assert result.model.loss(x) < 0.3 * model.loss(x)
    assert result.model.loss(held_out) < 0.3 * model.loss(held_out)
    assert result.epoch_losses[-1] < result.epoch_losses[0]


def test_training_is_deterministic_for_a_seed_and_leaves_the_start_unchanged() -> None:
    x = structured_data(100, 6, seed=18)
    model = small_model(19)
    before = model.to_vector()
    a = model.train(x, 3, np.random.default_rng(20), batch_size=16)
    b = model.train(x, 3, np.random.default_rng(20), batch_size=16)
    np.testing.assert_array_equal(a.model.to_vector(), b.model.to_vector())
    np.testing.assert_array_equal(model.to_vector(), before)
    assert not np.array_equal(a.model.to_vector(), before)


def test_zero_epochs_returns_the_same_weights() -> None:
    model = small_model(21)
    result = model.train(structured_data(10, 6, seed=22), 0, np.random.default_rng(0))
    np.testing.assert_array_equal(result.model.to_vector(), model.to_vector())
    assert result.samples == 10


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_fedprox_with_a_large_mu_stays_near_the_anchor(optimizer: str) -> None:
    x = structured_data(400, 6, seed=23)
    model = small_model(24)
    anchor = model.to_vector()
    lr = 0.05 if optimizer == "sgd" else 1e-3
    free = model.train(x, 10, np.random.default_rng(25), lr=lr, batch_size=32, optimizer=optimizer)
    prox = model.train(
        x, 10, np.random.default_rng(25), lr=lr, batch_size=32, optimizer=optimizer, prox_mu=10.0
    )
    drift_free = np.linalg.norm(free.model.to_vector() - anchor)
    drift_prox = np.linalg.norm(prox.model.to_vector() - anchor)
    assert drift_prox < 0.25 * drift_free


def test_fedprox_anchor_defaults_to_the_starting_weights() -> None:
    x = structured_data(50, 6, seed=26)
    model = small_model(27)
    implicit = model.train(x, 2, np.random.default_rng(28), prox_mu=1.0)
    explicit = model.train(x, 2, np.random.default_rng(28), prox_mu=1.0, anchor=model)
    np.testing.assert_array_equal(implicit.model.to_vector(), explicit.model.to_vector())


def test_gradients_refuse_a_proximal_term_without_anchor() -> None:
    with pytest.raises(ValueError, match="anchor"):
        small_model(29).gradients(np.zeros((2, 6), np.float32), prox_mu=0.1)
