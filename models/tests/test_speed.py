"""Training speed (slow; run with `pytest -m slow`): every kind trains with its default settings
(epochs until the validation loss settles, at most 40 on this size; default window) on a
10,000-row dataset, exports and calibrates in under a minute on one CPU thread."""

from __future__ import annotations

import pytest

from anomalyd_train import synth
from anomalyd_train.fit import FitOptions, fit

from conftest import FEATURES, IMAGE_CHANNELS, IMAGE_SHAPE

CASES = {
    "pca": ("pca", {}), "dense": ("dense", {}), "conv1d": ("conv", {}), "conv2d": ("conv", {"shape": IMAGE_SHAPE}),
    "vae": ("vae", {}), "sparse": ("sparse", {}), "stacked": ("stacked", {}), "denoising": ("denoising", {}),
    "lstm": ("lstm", {}), "gru": ("gru", {}),
}


@pytest.fixture(scope="module")
def ten_k(tmp_path_factory):
    d = tmp_path_factory.mktemp("speed")
    synth.write_series_csv(str(d / "rows.csv"), synth.sensors(1000, entities=10, seed=0), FEATURES)
    synth.write_images_ndjson(str(d / "images.ndjson"), synth.blobs(10000, seed=0, shape=IMAGE_SHAPE),
                              IMAGE_CHANNELS)
    return d


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_trains_in_under_a_minute_on_10k_rows(name, ten_k, tmp_path):
    kind, extra = CASES[name]
    image = "shape" in extra
    res = fit(FitOptions(
        kind=kind, data=str(ten_k / ("images.ndjson" if image else "rows.csv")),
        features=IMAGE_CHANNELS if image else FEATURES, key=None if image else "entity",
        out=str(tmp_path / f"{name}.onnx"), quiet=True, **extra,
    ))
    epochs = res.meta["anomalyd.training"]["epochs"]
    print(f"{name}: {res.seconds:.1f} s for {len(res.train)} training windows (10,000 rows), {epochs} epochs")
    assert res.seconds < 60
