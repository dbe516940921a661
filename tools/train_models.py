#!/usr/bin/env python3
"""Train, quantize and validate the on-device models from the SKAB data.

    tools/train_models.py SKAB_DIR [--out models/] [--seed 1] [--no-validate]

Needs TensorFlow (``pip install -e '.[train]'``); the device never does. Writes into ``--out``:

- ``skab-ae.tflite``: the anomaly model, a denoising autoencoder over a short history of feature
  vectors (agent/detect/features.py), trained on normal running only: the anomaly-free recording
  plus the
  first 400 rows of each labelled file whose first 400 rows are labelled normal. Inputs are
  corrupted during training (one channel shifted by a random offset) and the target is the clean
  window, so the model learns to reconstruct *normal* running and not to copy a fault through.
- ``skab-ae-lite.tflite``: the lightweight variant (one feature vector, 8-8-3-8-8 units).
- ``skab-clf.tflite``: the fault classifier (normal / valve / other) on the same windows.
- ``manifest.json``: per model name, version, sha256, size, tensors with quantization, features
  (channel names, scaler rule and global normal scales, window), threshold and its rule, scores.
- ``cloud/``: the float32 versions (not shipped to devices; the cloud endpoint's full-precision
  validation inference and the benchmark's int8-vs-float32 comparison), with their own manifest.

All models are full-integer int8 (int8 input and output tensors), calibrated on a representative
dataset drawn from the training windows. Everything is seeded (numpy, Python, TensorFlow with
deterministic ops): the same data and seed give the same weights and files.

Validation (on by default): the labelled files are split in two halves by file (alternate files
of each folder). For each half, models are trained without that half's rows, the threshold is
chosen on the other half, and the held-out half is scored: that is the estimate for unseen
devices. The classifier's accuracy is measured the same way.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import random
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

from evaluate import (  # noqa: E402
    FAR_CAP,
    SKIP_ROWS,
    THRESHOLDS,
    Confusion,
    SkabFile,
    alternate_halves,
    confusion,
    detector_factory,
    evaluate,
    find_csv,
    read_skab_csv,
)

from agent.detect.detector import Hysteresis  # noqa: E402
from agent.detect.features import (  # noqa: E402
    CHANNELS,
    FeatureSpec,
    calibrate,
    feature_names,
    levels,
    transform,
    windows,
)
from agent.detect.inference import MANIFEST_FORMAT, TensorInfo, TFLiteModel, sha256_bytes  # noqa: E402
from agent.learn.local import corrupt  # noqa: E402  (the denoising corruption devices use too)

VERSION = "1.0.0"
ANOMALY, LITE, CLASSIFIER = "skab-ae", "skab-ae-lite", "skab-clf"
CLASSES = ("normal", "valve", "other")
MAX_ANOMALY_BYTES = 64 * 1024
MAX_SHIPPED_BYTES = 256 * 1024

# Hyperparameters (global; chosen with the two-fold file split, see models/README.md).
RAISE_AFTER = 5  # consecutive windows above the threshold to raise
CLEAR_AFTER = 20  # consecutive windows at or below it to clear
NORMAL_QUANTILE = 0.95  # normal_scale: this quantile of |level| in the anomaly-free recording
AF_HORIZON = 800  # rows after commissioning used from each anomaly-free pseudo-device
AF_STEP_SCALE = 50  # start spacing of pseudo-devices when learning normal_scale
AF_STEP_TRAIN = 100  # ... and when drawing training windows
EPOCHS = 20
BATCH = 128
LEARNING_RATE = 2e-3


@dataclass(frozen=True)
class Arch:
    name: str
    steps: int
    hidden: int
    bottleneck: int
    description: str


ARCHS = {
    ANOMALY: Arch(ANOMALY, 4, 32, 4, "denoising autoencoder, 4 feature vectors 5 s apart"),
    LITE: Arch(LITE, 1, 8, 3, "lightweight denoising autoencoder, newest feature vector only"),
}


def spec_for(steps: int, normal_scale: Sequence[float] | None = None) -> FeatureSpec:
    base = FeatureSpec(steps=steps, step_stride=5 if steps > 1 else 1)
    if normal_scale is None:
        return base
    d = base.to_dict()
    d["normal_scale"] = [round(float(s), 6) for s in normal_scale]
    return FeatureSpec.from_dict(d)


# --- data -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Skab:
    root: Path
    anomaly_free: SkabFile
    labelled: tuple[SkabFile, ...]

    def name(self, f: SkabFile) -> str:
        return str(f.path.relative_to(self.root))


def load_skab(root: Path) -> Skab:
    af_path = root / "anomaly-free" / "anomaly-free.csv"
    if not af_path.is_file():
        raise SystemExit(f"{af_path}: missing (is {root} the SKAB data folder?)")
    labelled = []
    for p in find_csv(root):
        if p == af_path:
            continue
        f = read_skab_csv(p)
        if f.labelled:
            labelled.append(f)
    if not labelled:
        raise SystemExit(f"{root}: no labelled SKAB files")
    return Skab(root, read_skab_csv(af_path), tuple(labelled))


def fault_class(skab: Skab, f: SkabFile) -> str:
    return "valve" if skab.name(f).split("/")[0].startswith("valve") else "other"


def halves(skab: Skab) -> tuple[list[SkabFile], list[SkabFile]]:
    """Alternate files of each folder (natural order): half A and half B."""
    return alternate_halves(skab.labelled, lambda f: skab.name(f).split("/")[0])


def pseudo_devices(skab: Skab, step: int) -> list[np.ndarray]:
    """Chunks of the anomaly-free recording, each one device: commissioning + AF_HORIZON rows."""
    rows = skab.anomaly_free.rows
    n = FeatureSpec().commissioning + AF_HORIZON
    return [rows[s : s + n] for s in range(0, len(rows) - n + 1, step)]


def learn_normal_scale(skab: Skab) -> np.ndarray:
    spec = spec_for(1)
    devs = []
    for chunk in pseudo_devices(skab, AF_STEP_SCALE):
        cal = calibrate(spec, chunk)
        devs.append(np.abs(levels(spec, cal, chunk))[spec.commissioning :])
    return np.quantile(np.vstack(devs), NORMAL_QUANTILE, axis=0)


def normal_windows(spec: FeatureSpec, skab: Skab, files: Sequence[SkabFile]) -> np.ndarray:
    """Training windows of normal running, flattened (n, steps * channels)."""
    start = spec.smooth + spec.rate_lag
    out = []
    for chunk in pseudo_devices(skab, AF_STEP_TRAIN):
        out.append(windows(spec, transform(spec, calibrate(spec, chunk), chunk)[start:]))
    for f in files:
        n = spec.commissioning
        if f.labels is None or f.labels[:n].any():
            continue  # e.g. other/2.csv: its fault starts at row 104
        part = f.rows[:n]
        out.append(windows(spec, transform(spec, calibrate(spec, part), part)[start:]))
    w = np.concatenate(out)
    return w.reshape(len(w), -1)


# --- TensorFlow -----------------------------------------------------------------------------------
def tf_setup(seed: int) -> Any:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ["PYTHONHASHSEED"] = str(seed)
    import tensorflow as tf

    random.seed(seed)
    np.random.seed(seed)
    tf.keras.utils.set_random_seed(seed)
    tf.config.experimental.enable_op_determinism()
    return tf


def fresh_session(tf: Any, seed: int) -> None:
    """Reset Keras' name counters and all seeds, so a model does not depend on what was built
    before it in the same process (names end up in the .tflite file)."""
    tf.keras.backend.clear_session()
    tf.keras.utils.set_random_seed(seed)


def train_autoencoder(tf: Any, arch: Arch, y: np.ndarray, seed: int) -> Any:
    fresh_session(tf, seed)
    rng = np.random.default_rng(seed)
    dim = y.shape[1]
    model = tf.keras.Sequential(
        [
            tf.keras.Input((dim,), name="window"),
            tf.keras.layers.Dense(arch.hidden, activation="relu", name="encode"),
            tf.keras.layers.Dense(arch.bottleneck, name="code"),
            tf.keras.layers.Dense(arch.hidden, activation="relu", name="decode"),
            tf.keras.layers.Dense(dim, activation="tanh", name="reconstruction"),
        ],
        name=arch.name.replace("-", "_"),
    )
    model.compile(tf.keras.optimizers.Adam(LEARNING_RATE), "mse")
    clip = FeatureSpec().clip
    for _ in range(EPOCHS):
        x = corrupt(y, rng, len(CHANNELS), clip)
        model.fit(x, y, epochs=1, batch_size=BATCH, shuffle=True, verbose=0)
    return model


def classifier_windows(
    spec: FeatureSpec, skab: Skab, files: Sequence[SkabFile], with_af: bool = True
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Windows, class indices and a 'scored' mask (rows after commissioning of labelled files)."""
    xs, ys, scored = [], [], []
    for f in files:
        cal = calibrate(spec, f.rows)
        w = windows(spec, transform(spec, cal, f.rows))
        lab = f.labels[spec.span :]
        cls = CLASSES.index(fault_class(skab, f))
        xs.append(w.reshape(len(w), -1))
        ys.append(np.where(lab, cls, 0))
        scored.append(np.arange(spec.span, len(f.rows)) >= SKIP_ROWS)
    if with_af:
        start = spec.smooth + spec.rate_lag
        for chunk in pseudo_devices(skab, AF_STEP_TRAIN * 4):
            w = windows(spec, transform(spec, calibrate(spec, chunk), chunk)[start:])[::5]
            xs.append(w.reshape(len(w), -1))
            ys.append(np.zeros(len(w), dtype=int))
            scored.append(np.zeros(len(w), dtype=bool))
    return np.concatenate(xs), np.concatenate(ys), np.concatenate(scored)


def train_classifier(tf: Any, x: np.ndarray, y: np.ndarray, seed: int) -> Any:
    fresh_session(tf, seed)
    counts = np.bincount(y, minlength=len(CLASSES)).astype(float)
    weights = {i: float(len(y) / (len(CLASSES) * max(c, 1.0))) for i, c in enumerate(counts)}
    model = tf.keras.Sequential(
        [
            tf.keras.Input((x.shape[1],), name="window"),
            tf.keras.layers.Dense(32, activation="relu", name="hidden1"),
            tf.keras.layers.Dense(16, activation="relu", name="hidden2"),
            tf.keras.layers.Dense(len(CLASSES), activation="softmax", name="probabilities"),
        ],
        name="skab_clf",
    )
    model.compile(tf.keras.optimizers.Adam(LEARNING_RATE), "sparse_categorical_crossentropy")
    model.fit(x, y, epochs=EPOCHS, batch_size=BATCH, shuffle=True, verbose=0, class_weight=weights)
    return model


def to_tflite(tf: Any, model: Any, representative: np.ndarray | None) -> bytes:
    """Float32 TFLite (representative None) or full-integer int8 with int8 input and output."""
    conv = tf.lite.TFLiteConverter.from_keras_model(model)
    if representative is not None:
        rep = representative.astype(np.float32)

        def gen() -> Any:
            for i in range(len(rep)):
                yield [rep[i : i + 1]]

        conv.optimizations = [tf.lite.Optimize.DEFAULT]
        conv.representative_dataset = gen
        conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        conv.inference_input_type = tf.int8
        conv.inference_output_type = tf.int8
    with contextlib.redirect_stdout(io.StringIO()):  # the converter prints its SavedModel
        return bytes(conv.convert())


def representative_set(y: np.ndarray, seed: int, n: int = 1000) -> np.ndarray:
    rng = np.random.default_rng(seed + 7)
    clean = y[rng.choice(len(y), n, replace=False)]
    return np.concatenate([clean, corrupt(clean, rng, len(CHANNELS), FeatureSpec().clip)])


# --- thresholds and scoring -----------------------------------------------------------------------
def decisions(scores: np.ndarray, threshold: float) -> np.ndarray:
    """Replay the detector's hysteresis over its recorded scores (NaN = commissioning)."""
    h = Hysteresis(RAISE_AFTER, CLEAR_AFTER)
    out = np.zeros(len(scores), dtype=bool)
    for i, s in enumerate(scores):
        if not np.isnan(s):
            h.update(bool(s > threshold))
            out[i] = h.active
    return out


def total(
    scores: Sequence[np.ndarray], labels: Sequence[np.ndarray], threshold: float
) -> Confusion:
    c = Confusion()
    for s, y in zip(scores, labels, strict=True):
        c = c + confusion(y, decisions(s, threshold))
    return c


def select_threshold(scores: Sequence[np.ndarray], labels: Sequence[np.ndarray]) -> float:
    """The threshold rule: the best F1 with FAR <= FAR_CAP (ties: the higher threshold)."""
    best = (-1.0, THRESHOLDS[-1])
    for thr in THRESHOLDS:
        c = total(scores, labels, thr)
        if c.far <= FAR_CAP and (c.f1, thr) >= best:
            best = (c.f1, thr)
    return best[1]


def scores_of(models_dir: Path, name: str, files: Sequence[SkabFile]) -> list[np.ndarray]:
    """Per-row scores of the int8 model through the real interpreter and detector."""
    make = detector_factory(models_dir, name, runtime="auto")
    return [make().feed(f.times, f.rows).scores for f in files]


def conf_dict(c: Confusion) -> dict[str, Any]:
    return {
        "f1": round(c.f1, 4),
        "far": round(c.far, 2),
        "mar": round(c.mar, 2),
        "tp": c.tp,
        "fp": c.fp,
        "fn": c.fn,
        "tn": c.tn,
    }


# --- models and manifest --------------------------------------------------------------------------
@dataclass
class Built:
    name: str
    kind: str
    int8: bytes
    float32: bytes
    spec: FeatureSpec
    description: str
    extra: dict[str, Any]


def build_anomaly(
    tf: Any, arch: Arch, skab: Skab, files: Sequence[SkabFile], scale: np.ndarray, seed: int
) -> Built:
    spec = spec_for(arch.steps, scale)
    y = normal_windows(spec, skab, files)
    model = train_autoencoder(tf, arch, y, seed)
    return Built(
        arch.name,
        "anomaly",
        to_tflite(tf, model, representative_set(y, seed)),
        to_tflite(tf, model, None),
        spec,
        arch.description,
        {"training_windows": len(y), "layers": [y.shape[1], arch.hidden, arch.bottleneck]},
    )


def build_classifier(
    tf: Any, skab: Skab, files: Sequence[SkabFile], scale: np.ndarray, seed: int
) -> tuple[Built, Any]:
    spec = spec_for(ARCHS[ANOMALY].steps, scale)
    x, y, _ = classifier_windows(spec, skab, files)
    model = train_classifier(tf, x, y, seed)
    rng = np.random.default_rng(seed + 11)
    rep = x[rng.choice(len(x), 2000, replace=False)]
    built = Built(
        CLASSIFIER,
        "classifier",
        to_tflite(tf, model, rep),
        to_tflite(tf, model, None),
        spec,
        "fault classifier (normal / valve / other) on the anomaly model's windows",
        {"training_windows": len(x), "classes": list(CLASSES)},
    )
    return built, model


def tensor_infos(content: bytes) -> tuple[TensorInfo, TensorInfo]:
    m = TFLiteModel(content, name="probe")
    return m.input, m.output


def entry_for(b: Built, content: bytes, file: str, threshold: float | None) -> dict[str, Any]:
    inp, out = tensor_infos(content)
    e: dict[str, Any] = {
        "name": b.name,
        "kind": b.kind,
        "version": VERSION,
        "description": b.description,
        "file": file,
        "sha256": sha256_bytes(content),
        "size": len(content),
        "input": {**inp.to_dict(), "shape": [1, *inp.shape[1:]]},
        "output": {**out.to_dict(), "shape": [1, *out.shape[1:]]},
        "features": {
            **b.spec.to_dict(),
            "names": list(feature_names(b.spec)),
            "layout": "input = steps x channels, flattened row-major, oldest step first",
            "scaler": (
                "per device, from the first `commissioning` samples: mean/std per channel, then "
                "the smoothed feature's std (floor 1/sqrt(smooth)); per-channel scale = "
                "max(floor_factor * normal_scale, drift_factor * drift), drift = largest "
                "deviation of the second half of commissioning under a scaler fitted on the first"
            ),
            "window": b.spec.history,
            "stride": 1,
        },
    }
    if threshold is not None:
        e["threshold"] = {
            "value": threshold,
            "raise_after": RAISE_AFTER,
            "clear_after": CLEAR_AFTER,
            "score": "max over channels of |u - reconstruction| at the newest step",
            "rule": (
                f"the highest F1 with FAR <= {FAR_CAP:g} % over the training files' labelled rows "
                f"(after row {SKIP_ROWS}), thresholds {THRESHOLDS[0]}..{THRESHOLDS[-1]} step "
                f"0.05, with this hysteresis"
            ),
        }
    if b.kind == "classifier":
        e["classes"] = list(CLASSES)
    e["training"] = b.extra
    return e


def write_models(
    out: Path, built: Sequence[Built], thresholds: dict[str, float], provenance: dict[str, Any]
) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    cloud = out / "cloud"
    cloud.mkdir(exist_ok=True)
    man: dict[str, Any] = {"format": MANIFEST_FORMAT, "provenance": provenance, "models": {}}
    cman: dict[str, Any] = {"format": MANIFEST_FORMAT, "provenance": provenance, "models": {}}
    for b in built:
        f8 = f"{b.name}.tflite"
        f32 = f"{b.name}.float32.tflite"
        (out / f8).write_bytes(b.int8)
        (cloud / f32).write_bytes(b.float32)
        e = entry_for(b, b.int8, f8, thresholds.get(b.name))
        e["float_reference"] = f"cloud/{f32}"
        man["models"][b.name] = e
        cman["models"][b.name] = entry_for(b, b.float32, f32, thresholds.get(b.name))
    write_json(out / "manifest.json", man)
    write_json(cloud / "manifest.json", cman)
    return man


def write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n", encoding="utf-8")


def provenance(skab: Skab, argv: Sequence[str], seed: int, tf: Any) -> dict[str, Any]:
    commit = ""
    source = skab.root / "SOURCE.txt"
    if source.is_file():
        for line in source.read_text(encoding="utf-8").splitlines():
            if line.startswith("Commit copied from:"):
                commit = line.split(":", 1)[1].split()[0]
    files = [skab.anomaly_free, *skab.labelled]
    return {
        "data": "SKAB (Skoltech Anomaly Benchmark) v0.9, https://github.com/waico/SKAB",
        "data_commit": commit,
        "data_license": "GPL-3.0 (the data is not redistributed here; models are trained on it)",
        "citation": (
            "Katser, I. D. and Kozitsin, V. O., 'Skoltech Anomaly Benchmark (SKAB)', Kaggle, 2020, "
            "DOI 10.34740/KAGGLE/DSV/1693952"
        ),
        "files": {
            skab.name(f): hashlib.sha256(f.path.read_bytes()).hexdigest()[:16] for f in files
        },
        "training_command": " ".join(["tools/train_models.py", *argv]),
        "seed": seed,
        "tensorflow": tf.__version__,
    }


# --- validation -----------------------------------------------------------------------------------
def validate(tf: Any, skab: Skab, scale: np.ndarray, seed: int) -> dict[str, Any]:
    """Two folds by file: train without the held-out half, pick the threshold on the other
    half, score the held-out half with the int8 models through the detector."""
    a, b = halves(skab)
    result: dict[str, Any] = {"split": "alternate files of each folder", "folds": []}
    totals: dict[str, Confusion] = {ANOMALY: Confusion(), LITE: Confusion()}
    clf_hits = clf_n = fault_hits = fault_n = 0
    for tune, held in ((a, b), (b, a)):
        fold: dict[str, Any] = {"held_out": [skab.name(f) for f in held]}
        with tempfile.TemporaryDirectory() as tmp:
            built = [build_anomaly(tf, ARCHS[n], skab, tune, scale, seed) for n in (ANOMALY, LITE)]
            write_models(Path(tmp), built, {n: 1.0 for n in (ANOMALY, LITE)}, {})
            for name in (ANOMALY, LITE):
                tune_scores = scores_of(Path(tmp), name, tune)
                thr = select_threshold(tune_scores, [f.labels for f in tune])
                held_scores = scores_of(Path(tmp), name, held)
                c = total(held_scores, [f.labels for f in held], thr)
                totals[name] = totals[name] + c
                fold[name] = {"threshold": thr, "held_out": conf_dict(c)}
            clf, _ = build_classifier(tf, skab, tune, scale, seed)
            m = TFLiteModel(clf.int8, name=CLASSIFIER)
            x, y, scored = classifier_windows(clf.spec, skab, held, with_af=False)
            pred = np.argmax(m.predict(x[scored]), axis=1)
            truth = y[scored]
            clf_hits += int(np.sum(pred == truth))
            clf_n += len(truth)
            faulty = truth > 0
            fault_hits += int(np.sum(pred[faulty] == truth[faulty]))
            fault_n += int(np.sum(faulty))
            fold[CLASSIFIER] = {
                "accuracy": round(float(np.mean(pred == truth)), 4),
                "recall": {
                    c: round(float(np.mean(pred[truth == i] == i)), 4)
                    for i, c in enumerate(CLASSES)
                    if np.any(truth == i)
                },
            }
        result["folds"].append(fold)
        print(f"validation fold: {json.dumps(fold)}", flush=True)
    result["held_out_total"] = {n: conf_dict(c) for n, c in totals.items()}
    result[CLASSIFIER] = {
        "window_accuracy": round(clf_hits / clf_n, 4),
        "fault_type_accuracy_on_anomalous_windows": round(fault_hits / fault_n, 4),
        "windows": clf_n,
    }
    return result


# --- main -----------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("skab", type=Path, help="the SKAB data folder (anomaly-free/, valve1/, ...)")
    ap.add_argument("--out", type=Path, default=ROOT / "models")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--no-validate", action="store_true", help="skip the two-fold validation")
    args = ap.parse_args(argv)
    tf = tf_setup(args.seed)
    skab = load_skab(args.skab)
    scale = learn_normal_scale(skab)
    print(f"normal_scale: {np.round(scale, 3).tolist()}", flush=True)

    validation = None if args.no_validate else validate(tf, skab, scale, args.seed)

    built = [build_anomaly(tf, ARCHS[n], skab, skab.labelled, scale, args.seed) for n in ARCHS]
    clf, _ = build_classifier(tf, skab, skab.labelled, scale, args.seed)
    built.append(clf)
    prov = provenance(skab, argv, args.seed, tf)
    labels = [f.labels for f in skab.labelled]
    with tempfile.TemporaryDirectory() as tmp:
        write_models(Path(tmp), built, {n: 1.0 for n in ARCHS}, prov)
        thresholds = {
            n: select_threshold(scores_of(Path(tmp), n, skab.labelled), labels) for n in ARCHS
        }
    man = write_models(args.out, built, thresholds, prov)

    sizes = {b.name: len(b.int8) for b in built}
    if sizes[ANOMALY] > MAX_ANOMALY_BYTES or sum(sizes.values()) > MAX_SHIPPED_BYTES:
        raise SystemExit(f"models too large: {sizes}")

    # Scores of the shipped int8 models through the real interpreter (evaluate.py's code path).
    for name in ARCHS:
        make = detector_factory(args.out, name)
        report = evaluate(args.skab, make)
        man["models"][name]["scores"] = {
            "all_labelled_files": report.summary(),
            "evaluated_with": f"tools/evaluate.py --data SKAB_DIR --model {name}",
        }
        if validation is not None:
            man["models"][name]["scores"]["two_fold_held_out"] = validation["held_out_total"][name]
    if validation is not None:
        man["models"][CLASSIFIER]["scores"] = validation[CLASSIFIER]
        man["validation"] = validation
    write_json(args.out / "manifest.json", man)
    print(json.dumps({n: man["models"][n].get("scores") for n in man["models"]}, indent=2))
    print(f"sizes (bytes): {sizes}, total {sum(sizes.values())}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
