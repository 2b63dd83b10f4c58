"""Detection sanity for every kind on an easy synthetic case: train on normal data, score held-out
normal windows and windows with injected anomalies (spikes and level shifts of 5 standard
deviations, one feature mirrored around its mean) through the exported ONNX file, and require a
ROC AUC of at least 0.9 for the score the daemon uses (mean of `error` over features)."""

from __future__ import annotations

import numpy as np
import pytest

from anomalyd_train import calibrate, export, synth
from anomalyd_train.fit import FitOptions, fit

from conftest import FEATURES, IMAGE_CHANNELS, IMAGE_SHAPE

# name -> (kind, window, epochs, extra options)
CASES = {
    "pca": ("pca", 1, 0, {}),
    "dense": ("dense", 1, 10, {}),
    "conv1d": ("conv", 8, 10, {}),
    "conv2d": ("conv", None, 15, {"shape": IMAGE_SHAPE}),
    "vae": ("vae", 1, 15, {}),
    "sparse": ("sparse", 1, 10, {}),
    "stacked": ("stacked", 1, 10, {}),
    "denoising": ("denoising", 1, 10, {}),
    "lstm": ("lstm", 8, 10, {}),
    "gru": ("gru", 8, 10, {}),
}


@pytest.fixture(scope="module")
def train_csv(tmp_path_factory):
    path = tmp_path_factory.mktemp("det") / "normal.csv"
    synth.write_series_csv(str(path), synth.sensors(500, entities=8, seed=11), FEATURES)
    return path


@pytest.fixture(scope="module")
def train_images(tmp_path_factory):
    path = tmp_path_factory.mktemp("det") / "images.ndjson"
    synth.write_images_ndjson(str(path), synth.blobs(1500, seed=11, shape=IMAGE_SHAPE), IMAGE_CHANNELS)
    return path


@pytest.mark.parametrize("name", list(CASES))
def test_detects_injected_anomalies(name, train_csv, train_images, tmp_path):
    kind, window, epochs, extra = CASES[name]
    image = "shape" in extra
    res = fit(FitOptions(
        kind=kind, data=str(train_images if image else train_csv),
        features=IMAGE_CHANNELS if image else FEATURES, key=None if image else "entity",
        window=window, epochs=epochs, out=str(tmp_path / f"{name}.onnx"), quiet=True, plot=False, seed=0,
        **extra,
    ))
    if image:
        x, labels = synth.perturb_images(synth.blobs(600, seed=99, shape=IMAGE_SHAPE), seed=5)
    else:
        held_out = synth.sensors(200, entities=8, seed=11, start=500)  # the same entities, later
        x, labels = synth.perturb(synth.windows(held_out, window), seed=5)
    _, err = export.run(export.session(res.path), x.astype(np.float32))
    scores = calibrate.scores(err)
    auc = synth.auc(scores, labels)
    p99 = res.calibration["quantiles"]["0.99"]
    caught = float(np.mean(scores[labels] > p99))
    false_alarms = float(np.mean(scores[~labels] > p99))
    print(f"{name}: AUC {auc:.4f}; above calibration p99: {caught:.1%} of anomalies, "
          f"{false_alarms:.1%} of normal windows; training {res.seconds:.1f} s")
    assert auc >= 0.9
    # Calibration describes held-back normal data: about 1% of fresh normal windows exceed p99.
    assert false_alarms < 0.05
