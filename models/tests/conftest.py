"""Shared fixtures: small synthetic datasets, a cache of trained models, the tract leg."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

from anomalyd_train import synth
from anomalyd_train.fit import FitOptions, fit

REPO = Path(__file__).resolve().parents[2]
FEATURES = synth.SENSOR_FEATURES
IMAGE_SHAPE = (2, 12, 12)
IMAGE_CHANNELS = ["near", "far"]


def anomalyd_bin() -> Path:
    """The daemon binary. Without it the tract legs skip, unless ANOMALYD_BIN names it
    explicitly (as scripts/test.sh does): then a missing binary is a failure, not a skip."""
    explicit = os.environ.get("ANOMALYD_BIN")
    binary = Path(explicit) if explicit else REPO / "target" / "debug" / "anomalyd"
    if not binary.exists():
        if explicit:
            pytest.fail(f"ANOMALYD_BIN={explicit} does not exist")
        pytest.skip(f"tract leg: {binary} is not built (cargo build, or set ANOMALYD_BIN)")
    return binary


def tract_verify(model: str, x: np.ndarray, rec: np.ndarray, err: np.ndarray, tmp: Path, tolerance: float = 1e-4):
    """Runs `anomalyd inspect MODEL --verify SAMPLES.json` (tract). Returns (exit code, output)."""
    binary = anomalyd_bin()
    samples = tmp / f"samples-{x.shape[0]}.json"
    samples.write_text(json.dumps({"input": x.tolist(), "reconstruction": rec.tolist(), "error": err.tolist()}))
    p = subprocess.run(
        [str(binary), "inspect", model, "--verify", str(samples), "--tolerance", str(tolerance)],
        capture_output=True, text=True, timeout=120,
    )
    return p.returncode, p.stdout + p.stderr


@pytest.fixture(scope="session")
def sensors_csv(tmp_path_factory) -> Path:
    """8 entities x 200 rows of normal sensor data (1600 rows)."""
    path = tmp_path_factory.mktemp("data") / "sensors.csv"
    synth.write_series_csv(str(path), synth.sensors(200, entities=8, seed=1), FEATURES)
    return path


@pytest.fixture(scope="session")
def images_ndjson(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "images.ndjson"
    synth.write_images_ndjson(str(path), synth.blobs(600, seed=1, shape=IMAGE_SHAPE), IMAGE_CHANNELS)
    return path


# name -> (kind, extra FitOptions): the variants that the parity tests cover.
VARIANTS = {
    "pca": ("pca", {}),
    "dense": ("dense", {}),
    "conv1d": ("conv", {"window": 8}),
    "conv1d-window": ("conv", {"window": 8, "code": "window"}),
    "conv2d": ("conv", {"shape": IMAGE_SHAPE}),
    "vae": ("vae", {}),
    "sparse-kl": ("sparse", {"sparsity": "kl"}),
    "sparse-l1": ("sparse", {"sparsity": "l1"}),
    "stacked": ("stacked", {"pretrain_epochs": 1}),
    "denoising": ("denoising", {}),
    "denoising-window": ("denoising", {"window": 4}),
    "lstm": ("lstm", {"window": 8}),
    "gru": ("gru", {"window": 8}),
    "lstm-window": ("lstm", {"window": 8, "code": "window"}),
    "gru-window": ("gru", {"window": 8, "code": "window"}),
    "lstm-1feature": ("lstm", {"window": 8, "features": ["flow"]}),
    "gru-1feature": ("gru", {"window": 8, "features": ["flow"]}),
    # the recurrence written out as matrix products instead of ONNX's LSTM / GRU operator
    "lstm-unrolled": ("lstm", {"window": 8, "code": "window", "unroll": True}),
    "gru-unrolled": ("gru", {"window": 8, "code": "window", "unroll": True}),
}


@pytest.fixture(scope="session")
def quick_models(tmp_path_factory, sensors_csv, images_ndjson):
    """Trains each variant for 2 epochs on small data, once per session; returns a getter."""
    out = tmp_path_factory.mktemp("models")
    cache = {}

    def get(name: str, **overrides):
        key = (name, tuple(sorted(overrides.items())))
        if key not in cache:
            kind, extra = VARIANTS[name] if name in VARIANTS else (name, {})
            extra = {**extra, **overrides}
            image = "shape" in extra
            features = extra.pop("features", IMAGE_CHANNELS if image else FEATURES)
            opts = FitOptions(
                kind=kind,
                data=str(images_ndjson if image else sensors_csv),
                features=features,
                key=None if image else "entity",
                out=str(out / f"{name}{'-' + str(abs(hash(key))) if overrides else ''}.onnx"),
                epochs=2, quiet=True, plot=False, seed=3, **extra,
            )
            cache[key] = fit(opts)
        return cache[key]

    return get
