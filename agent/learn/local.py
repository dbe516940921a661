"""A device's part of a federated round: score, train, privatize (docs/learning.md).

:func:`local_update` is the one recipe, used by the agent and by ``./tools/dev bench federated``:

1. **Windows.** The device's normal windows (``features.windows`` of its commissioning period and
   of recent rows the detector judged normal, oldest first), shape ``(n, steps, channels)``, or
   flat ``(n, steps * channels)`` as ``Detector.normal_sink`` hands them on. Only
   the newest ``max_windows`` are used (:data:`MAX_WINDOWS`): memory and time stay bounded
   however long the device has been collecting.
2. **Score summary.** The newest :data:`HOLDOUT` (a quarter) of those windows are held out of
   training (:func:`split`): no device ever trains on them, so their scores are what the model
   will score on this device's normal rows to come, not the lower scores of windows it was fitted
   to (a model trained longer on its windows scores them lower, and a threshold from those
   scores comes out too low). Before training, the round's masters score the held-out windows
   exactly as the detector scores a row (:func:`agent.detect.detector.newest_residuals` and
   :func:`~agent.detect.detector.anomaly_scores`: ``max_c |u_c - r_c|`` at the newest step) and
   the device keeps only :meth:`ScoreSummary.of <agent.wire.learning.ScoreSummary.of>` of them
   (a count, five quantiles, mean and standard deviation) for the fleet threshold. One caveat: a
   window's values are clipped to ``+-spec.clip`` (8) and the detector's ``u`` is not, so a row
   with ``|u| > 8`` scores higher in the detector; normal windows do not come near that.
3. **Training** (:func:`train_local`): ``task.epochs`` epochs of Adam at ``task.lr`` from the
   masters with FedProx's proximal term ``task.mu / 2 * ||w - masters||^2``, batches of
   :data:`~agent.learn.autoencoder.BATCH_SIZE`, as a *denoising* autoencoder like the shipped
   model (``tools/train_models.py``): each epoch, a fraction :data:`CORRUPT_P` of the inputs get
   one channel shifted by a random offset over all steps, and the target is the clean window,
   so the model learns not to copy a shifted channel through. (Kept because the shipped model is
   trained so; the bench has not compared it with plain training.)
4. **Update.** ``delta = trained - masters``, clipped to L2 norm ``task.clip`` and, when
   ``task.noise > 0``, Gaussian noise of standard deviation ``task.noise * task.clip`` added to
   every coordinate (:func:`agent.learn.privacy.privatize`). ``samples`` is the number of windows
   trained on (FedAvg's weight). The noise is the device's: a device seeds ``rng`` from OS
   entropy (``numpy.random.default_rng()``), tests and the bench from a fixed seed.

5. **Check** (a task that names an incumbent, ``task.check``): :func:`fault_recall` of the
   masters and of the incumbent on the same synthetic faults made from the held-out windows,
   reported as ``recall``. The endpoint assigns a round's model to the fleet only if, on the
   median device, it detects as many of them as the model the fleet runs (cloud/learning.py).
   A task with ``epochs`` 0 only checks: no training, no delta, nothing charged to privacy.

The endpoint sets one fleet threshold from the devices' summaries (``cloud.fedavg.
fleet_threshold``) and ships it with the model; a device applies the same rule to its own scores
only to count the faults a model detects in the check.
"""

from __future__ import annotations

import math

import numpy as np

from agent.detect.detector import anomaly_scores, newest_residuals
from agent.detect.features import CHANNELS
from agent.learn.autoencoder import BATCH_SIZE, DenseAutoencoder, TrainResult
from agent.learn.privacy import clip_update, privatize
from agent.wire.learning import (
    THRESHOLD_MARGIN,
    THRESHOLD_QUANTILE,
    ModelUpdate,
    Recall,
    RoundTask,
    ScoreSummary,
)

#: Most windows one round trains on (the newest): 2048 windows of 32 float32 are 256 KiB, and an
#: epoch of the 2404-weight autoencoder over them is a few milliseconds of numpy on a Pi.
MAX_WINDOWS = 2048
#: The newest fraction of the windows is held out of training and summarized (step 2).
HOLDOUT = 0.25
#: Denoising: the fraction of training inputs corrupted each epoch, and the offsets' range
#: (log-uniform in [1, CORRUPT_MAX], random sign), as tools/train_models.py trains the masters.
CORRUPT_P = 0.95
CORRUPT_MAX = 10.0
#: Denoising epochs are drawn as fresh corrupted copies of the windows and trained as one pass,
#: so Adam's state carries over from epoch to epoch; at most this many rows at a time (8 MiB).
BLOCK_ROWS = 1 << 16
#: Model inputs are clipped to +-this (FeatureSpec.clip): so are the corrupted ones.
INPUT_CLIP = 8.0
#: The check's synthetic faults: this many corrupted copies of each held-out window, every one
#: with one channel shifted (as :func:`corrupt`, all rows hit).
FAULT_COPIES = 4


def _check_windows(
    windows: np.ndarray, model: DenseAutoencoder, channels: int = len(CHANNELS)
) -> np.ndarray:
    """Windows as ``(n, steps, channels)``; flat ones ``(n, steps * channels)`` (as the detector
    hands them on) are reshaped with ``channels`` channels."""
    w = np.asarray(windows)
    if w.ndim == 2 and channels > 0 and w.shape[1] == model.dim and model.dim % channels == 0:
        w = w.reshape(len(w), model.dim // channels, channels)
    if w.ndim != 3 or w.shape[1] * w.shape[2] != model.dim:
        raise ValueError(
            f"windows must have shape (n, steps, channels) or (n, steps * channels) with "
            f"steps * channels = {model.dim}, got {w.shape}"
        )
    if not np.all(np.isfinite(w)):
        raise ValueError("windows must be finite")
    return w


def recent(windows: np.ndarray, max_windows: int = MAX_WINDOWS) -> np.ndarray:
    """The newest ``max_windows`` of ``windows`` (oldest first, as they were collected)."""
    if max_windows < 1:
        raise ValueError(f"max_windows must be >= 1, got {max_windows}")
    return windows[-max_windows:]


def split(windows: np.ndarray, holdout: float = HOLDOUT) -> tuple[np.ndarray, np.ndarray]:
    """(training windows, held-out windows): the newest ``ceil(holdout * n)`` windows are held
    out for the score summary, the older ones are trained on. With fewer than two windows there
    is nothing to hold out: the one window is both."""
    if not 0.0 <= holdout < 1.0:
        raise ValueError(f"holdout must be in [0, 1), got {holdout}")
    n = len(windows)
    k = min(n - 1, math.ceil(holdout * n)) if n > 1 else 0
    if k == 0:
        return windows, windows
    return windows[: n - k], windows[n - k :]


def window_scores(
    model: DenseAutoencoder, windows: np.ndarray, channels: int = len(CHANNELS)
) -> np.ndarray:
    """The detector's anomaly score of each window under ``model`` (windows ``(n, steps,
    channels)``, or flat with ``channels`` channels): the newest step's ``max_c |u_c - r_c|``."""
    w = _check_windows(windows, model, channels)
    if len(w) == 0:
        return np.zeros(0)
    flat = w.reshape(len(w), -1)
    return anomaly_scores(newest_residuals(w[:, -1, :], model.forward(flat)))


def score_summary(
    model: DenseAutoencoder, windows: np.ndarray, channels: int = len(CHANNELS)
) -> ScoreSummary:
    """What a device reports of its scores: :meth:`ScoreSummary.of` of :func:`window_scores`."""
    return ScoreSummary.of(window_scores(model, windows, channels))


def corrupt(
    clean: np.ndarray,
    rng: np.random.Generator,
    channels: int,
    clip: float = INPUT_CLIP,
    p: float = CORRUPT_P,
) -> np.ndarray:
    """Denoising inputs: in a fraction ``p`` of the flat windows ``clean`` (rows of
    ``steps * channels``), one channel shifted by a log-uniform offset over all its steps."""
    x = np.array(clean, copy=True)
    n = len(x)
    steps = x.shape[1] // channels
    hit = rng.random(n) < p
    ch = rng.integers(0, channels, n)
    mag = np.exp(rng.uniform(0.0, np.log(CORRUPT_MAX), n)) * rng.choice([-1.0, 1.0], n)
    rows = np.nonzero(hit)[0]
    for s in range(steps):
        x[rows, s * channels + ch[rows]] += mag[rows]
    return np.clip(x, -clip, clip)


def train_local(
    model: DenseAutoencoder,
    windows: np.ndarray,
    epochs: int,
    lr: float,
    rng: np.random.Generator,
    *,
    mu: float = 0.0,
    denoise: bool = True,
    batch_size: int = BATCH_SIZE,
    channels: int = len(CHANNELS),
) -> TrainResult:
    """``epochs`` epochs of the local recipe (module docstring, step 3) from ``model`` on
    ``windows`` ``(n, steps, channels)``; ``mu > 0`` anchors FedProx at ``model``.

    When ``denoise``, each epoch gets its own corruption of the windows; the epochs' corrupted
    copies are trained as one shuffled pass (in blocks of at most :data:`BLOCK_ROWS` rows), so
    the optimizer's state is kept across epochs as Keras keeps it. ``epoch_losses`` then holds
    the mean of the block an epoch was in, once per epoch."""
    w = _check_windows(windows, model, channels)
    clean = w.reshape(len(w), -1).astype(model.dtype)
    if not denoise:
        return model.train(clean, epochs, rng, batch_size=batch_size, lr=lr, prox_mu=mu)
    if len(clean) == 0:
        return TrainResult(model, 0, ())
    channels = w.shape[2]
    per_block = max(1, BLOCK_ROWS // len(clean))
    current, losses, done = model, [], 0
    while done < epochs:
        k = min(per_block, epochs - done)
        noisy = np.concatenate([corrupt(clean, rng, channels) for _ in range(k)])
        step = current.train(
            noisy,
            1,
            rng,
            batch_size=batch_size,
            lr=lr,
            prox_mu=mu,
            anchor=model,
            target=np.tile(clean, (k, 1)),
        )
        current = step.model
        losses.extend(step.epoch_losses * k)
        done += k
    return TrainResult(current, len(clean), tuple(losses))


def fault_recall(
    models: tuple[DenseAutoencoder, ...],
    held: np.ndarray,
    rng: np.random.Generator,
    channels: int = len(CHANNELS),
    copies: int = FAULT_COPIES,
) -> tuple[float, ...]:
    """For each of ``models``, the fraction of synthetic faults it detects: ``copies`` copies of
    the held-out windows ``held``, each with one channel shifted by 1 to 10 of the features'
    units over the whole window (:func:`corrupt`; the same faults for every model), scored as
    the detector scores a row, counted above the model's threshold by the fleet rule applied to
    its scores of ``held`` itself (the 0.9 quantile plus the margin).

    A model that copies a shifted channel through to its output (what a denoising autoencoder
    is trained not to do, and what a poisoned update can teach it) scores those faults low and
    detects fewer; a model whose normal scores are high (noise) gets a high threshold and
    detects fewer too."""
    w = _check_windows(held, models[0], channels)
    if len(w) == 0:
        return tuple(0.0 for _ in models)
    flat = w.reshape(len(w), -1)
    faults = np.concatenate([corrupt(flat, rng, w.shape[2], p=1.0) for _ in range(copies)])
    faults = faults.reshape(-1, *w.shape[1:])
    out = []
    for model in models:
        normal = window_scores(model, w)
        threshold = float(np.quantile(normal, THRESHOLD_QUANTILE)) + THRESHOLD_MARGIN
        out.append(float(np.mean(window_scores(model, faults) > threshold)))
    return tuple(out)


def local_update(
    masters: DenseAutoencoder,
    windows: np.ndarray,
    task: RoundTask,
    rng: np.random.Generator,
    *,
    max_windows: int = MAX_WINDOWS,
    holdout: float = HOLDOUT,
    denoise: bool = True,
    batch_size: int = BATCH_SIZE,
    channels: int = len(CHANNELS),
    incumbent: DenseAutoencoder | None = None,
) -> ModelUpdate:
    """The device's upload for ``task``: the score summary of ``masters`` on its held-out
    windows, the check against ``incumbent`` when the task names one, then (unless the task
    only checks) training on the others, clipping and noise (module docstring), from its newest
    ``max_windows`` normal windows.

    Raises ValueError on windows of the wrong shape or none at all (nothing to upload), and on a
    checked task without the incumbent's weights.
    """
    w = recent(_check_windows(windows, masters, channels), max_windows)
    if len(w) == 0:
        raise ValueError("no normal windows to train on: this device has nothing to upload")
    if (task.check is None) != (incumbent is None):
        raise ValueError("the incumbent's weights go with a task that checks, and only with one")
    train, held = split(w, holdout)
    summary = score_summary(masters, held)
    recall = None
    if incumbent is not None:
        recall = Recall(*fault_recall((masters, incumbent), held, rng, channels))
    if task.evaluate:
        return ModelUpdate(task.job, task.round, len(w), None, summary, 0.0, recall)
    start = masters.astype(np.float32)  # a device trains in float32
    trained = train_local(
        start,
        train,
        task.epochs,
        task.lr,
        rng,
        mu=task.mu,
        denoise=denoise,
        batch_size=batch_size,
    )
    delta = trained.model.to_vector() - start.to_vector()
    if task.noise > 0:
        delta = privatize(delta, task.clip, task.noise, rng)
    else:
        delta = clip_update(delta, task.clip)
    return ModelUpdate(
        job=task.job,
        round=task.round,
        samples=trained.samples,
        delta=delta.astype(np.float32),
        scores=summary,
        loss=max(0.0, float(trained.epoch_losses[-1])),
        recall=recall,
    )
