"""Differential privacy of a device's weight update: clipping, Gaussian noise, and the accountant.

Before upload a device clips its whole update vector (new weights minus the round's global
weights) to L2 norm ``max_norm`` (:func:`clip_update`) and adds Gaussian noise of standard
deviation ``noise_multiplier * max_norm`` to every coordinate (:func:`add_gaussian_noise`;
:func:`privatize` does both, in that order). :class:`Accountant` turns the noise multiplier and
the number of rounds into an (epsilon, delta) guarantee; :func:`noise_for_epsilon` goes the other
way.

What this guarantees. The unit of privacy is a device's *whole update* in a round, not one record:
user-level (device-level) DP. Each upload is the Gaussian mechanism applied to the device's clipped
update, so it is (epsilon, delta)-DP with respect to the device's entire local data set, under
add/remove adjacency: the update present versus absent (a zero update), L2 sensitivity
``max_norm``, which is ``sensitivity=1`` in units of ``max_norm``. Under replace adjacency (this
device's data swapped for any other) two clipped updates can lie ``2 * max_norm`` apart: pass
``sensitivity=2``. Rounds compose: Renyi DP of the Gaussian mechanism is
``eps_RDP(alpha) = alpha * s^2 / (2 * sigma^2)`` (Mironov 2017, Prop. 7; ``s`` the sensitivity and
``sigma`` the noise multiplier, both in units of ``max_norm``), and RDP adds up over rounds. The
conversion to (epsilon, delta)-DP is Mironov 2017, Prop. 3:
``epsilon = min over alpha of rdp(alpha) + log(1/delta) / (alpha - 1)``, over the grid
:data:`ORDERS`. Because the noise is added on the device, the guarantee holds against whoever sees
the upload, the server included.

Its limits, stated plainly:

- Full participation is assumed for the accounting: every round the device uploads is charged at
  full cost. No amplification by subsampling (devices selected at random) is claimed, nor any from
  the server averaging many devices' updates.
- The server is trusted to add nothing and to release nothing beyond the average; the guarantee is
  only the devices' own noise. There is no secure aggregation: the server sees each device's noisy
  update on its own, and the guarantee above is exactly the guarantee for that single upload.
- Only the uploads are covered. Anything else a device sends (alerts, readings, sample counts:
  FedAvg's weighting uses the count, which is not noised) is outside this accounting.
- The noise comes from a numpy ``Generator`` (not a cryptographic source) in floating point; known
  attacks on the low bits of floating-point Gaussian samples (Mironov 2012) are not defended
  against. A device must seed it from OS entropy; fixed seeds are for tests.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

#: Renyi orders for the conversion to (epsilon, delta): dense near 1, geometric up to 10^5, which
#: covers the optimum ``1 + sigma * sqrt(2 log(1/delta) / rounds) / s`` for sigma up to ~ 10^3.
ORDERS: tuple[float, ...] = tuple(float(a) for a in 1.0 + np.geomspace(1e-3, 1e5, 400))
#: noise_for_epsilon: relative precision of the bisection on the noise multiplier.
NOISE_SEARCH_RTOL = 1e-6
#: clip_update: most rescaling steps to absorb float rounding (one or two are ever needed).
CLIP_ROUNDING_STEPS = 64


def _norm(x: np.ndarray) -> float:
    """L2 norm in float64, so a float32 vector's norm neither overflows nor loses precision."""
    return float(np.linalg.norm(x.astype(np.float64, copy=False)))


def _check_vector(delta: np.ndarray) -> np.ndarray:
    delta = np.asarray(delta)
    if delta.ndim != 1 or not np.issubdtype(delta.dtype, np.floating):
        raise ValueError(f"an update is a 1-D float vector, got {delta.dtype} {delta.shape}")
    if not np.all(np.isfinite(delta)):
        raise ValueError("the update has non-finite values: refuse it rather than upload it")
    return delta


def _check_positive(name: str, value: float) -> None:
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"{name} must be finite and > 0, got {value}")


def clip_update(delta: np.ndarray, max_norm: float) -> np.ndarray:
    """``delta`` scaled down to L2 norm ``max_norm`` if it is longer; shorter ones are returned
    unchanged (a copy). The result's norm never exceeds ``max_norm``, float rounding included,
    since the privacy guarantee rests on that bound."""
    delta = _check_vector(delta)
    _check_positive("max_norm", max_norm)
    norm = _norm(delta)
    if norm <= max_norm:
        return delta.copy()
    out = (delta.astype(np.float64) * (max_norm / norm)).astype(delta.dtype)
    shrink = out.dtype.type(1.0 - np.finfo(out.dtype).eps)
    for _ in range(CLIP_ROUNDING_STEPS):
        if _norm(out) <= max_norm:
            return out
        out *= shrink
    raise ArithmeticError(f"could not clip an update of norm {norm} to {max_norm}")


def add_gaussian_noise(
    delta: np.ndarray, max_norm: float, noise_multiplier: float, rng: np.random.Generator
) -> np.ndarray:
    """The Gaussian mechanism: ``delta`` plus independent N(0, (noise_multiplier * max_norm)^2)
    noise on every coordinate, in ``delta``'s dtype. Clip first (:func:`privatize`): without the
    norm bound the noise protects nothing."""
    delta = _check_vector(delta)
    _check_positive("max_norm", max_norm)
    _check_positive("noise_multiplier", noise_multiplier)
    noise = rng.normal(0.0, noise_multiplier * max_norm, delta.shape)
    return (delta.astype(np.float64) + noise).astype(delta.dtype)


def privatize(
    delta: np.ndarray, max_norm: float, noise_multiplier: float, rng: np.random.Generator
) -> np.ndarray:
    """What a device uploads: its update clipped to ``max_norm``, then noised."""
    return add_gaussian_noise(clip_update(delta, max_norm), max_norm, noise_multiplier, rng)


def gaussian_rdp(
    orders: Sequence[float] | np.ndarray, noise_multiplier: float, sensitivity: float = 1.0
) -> np.ndarray:
    """RDP of one Gaussian mechanism at each order: ``alpha * s^2 / (2 sigma^2)``."""
    a = np.asarray(orders, dtype=np.float64)
    return a * sensitivity**2 / (2.0 * noise_multiplier**2)


def rdp_to_epsilon(
    orders: Sequence[float] | np.ndarray, rdp: Sequence[float] | np.ndarray, delta: float
) -> tuple[float, float]:
    """(epsilon, the order attaining it) by ``min rdp(alpha) + log(1/delta) / (alpha - 1)``."""
    a = np.asarray(orders, dtype=np.float64)
    if np.any(a <= 1):
        raise ValueError("Renyi orders must be > 1")
    eps = np.asarray(rdp, dtype=np.float64) + math.log(1.0 / delta) / (a - 1.0)
    i = int(np.argmin(eps))
    return float(eps[i]), float(a[i])


class Accountant:
    """The privacy spent by one device over the rounds it uploaded in, for a fixed noise multiplier.

    ``step()`` after each upload; ``epsilon()`` is the (epsilon, ``delta``)-DP guarantee so far
    (see the module docstring for what it covers). Zero rounds spend nothing: epsilon 0.
    """

    def __init__(
        self,
        noise_multiplier: float,
        delta: float,
        *,
        sensitivity: float = 1.0,
        orders: Sequence[float] = ORDERS,
    ) -> None:
        _check_positive("noise_multiplier", noise_multiplier)
        _check_positive("sensitivity", sensitivity)
        if not 0 < delta < 1:
            raise ValueError(f"delta must be in (0, 1), got {delta}")
        self.noise_multiplier = float(noise_multiplier)
        self.delta = float(delta)
        self.sensitivity = float(sensitivity)
        self.orders = np.asarray(orders, dtype=np.float64)
        if self.orders.ndim != 1 or len(self.orders) == 0 or np.any(self.orders <= 1):
            raise ValueError("orders must be a non-empty list of Renyi orders > 1")
        self.rounds = 0

    def step(self, rounds: int = 1) -> None:
        """Charge ``rounds`` more uploads (RDP composes by adding)."""
        if rounds < 0:
            raise ValueError(f"rounds must be >= 0, got {rounds}")
        self.rounds += int(rounds)

    def rdp(self) -> np.ndarray:
        """The composed RDP at each of :attr:`orders`."""
        return self.rounds * gaussian_rdp(self.orders, self.noise_multiplier, self.sensitivity)

    def epsilon_at(self, order: float) -> float:
        """The (epsilon, delta) bound through one Renyi order (an upper bound on :meth:`epsilon`
        when ``order`` is in the grid)."""
        if self.rounds == 0:
            return 0.0
        return rdp_to_epsilon(
            [order],
            self.rounds * gaussian_rdp([order], self.noise_multiplier, self.sensitivity),
            self.delta,
        )[0]

    def epsilon(self) -> float:
        """The (epsilon, delta)-DP guarantee after the rounds so far: the best order of the grid."""
        if self.rounds == 0:
            return 0.0
        return rdp_to_epsilon(self.orders, self.rdp(), self.delta)[0]


def noise_for_epsilon(
    target_epsilon: float,
    rounds: int,
    delta: float,
    *,
    sensitivity: float = 1.0,
    orders: Sequence[float] = ORDERS,
) -> float:
    """The smallest noise multiplier (to :data:`NOISE_SEARCH_RTOL`) whose epsilon after ``rounds``
    rounds is at most ``target_epsilon``; the value returned always meets the target.

    Epsilon falls as the noise grows (every order's RDP does), so a bisection finds it.
    """
    _check_positive("target_epsilon", target_epsilon)
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")

    def eps(sigma: float) -> float:
        acc = Accountant(sigma, delta, sensitivity=sensitivity, orders=orders)
        acc.step(rounds)
        return acc.epsilon()

    lo, hi = 0.0, 1.0
    while eps(hi) > target_epsilon:
        lo, hi = hi, hi * 2.0
        if hi > 1e12:
            raise ValueError(
                f"epsilon {target_epsilon} after {rounds} rounds is out of reach with the orders "
                "given (the smallest epsilon they allow is log(1/delta)/(max order - 1))"
            )
    while hi - lo > NOISE_SEARCH_RTOL * hi:
        mid = 0.5 * (lo + hi)
        if eps(mid) <= target_epsilon:
            hi = mid
        else:
            lo = mid
    return hi
