"""Generation: `anomalyd-train generate` samples synthetic normal data from a trained VAE file."""

from __future__ import annotations

import csv

import numpy as np
import onnx
import pytest
import torch

from anomalyd_train import calibrate, cli, export, generate, synth
from anomalyd_train.fit import FitOptions, fit

from conftest import FEATURES


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    d = tmp_path_factory.mktemp("gen")
    data = synth.sensors(500, entities=8, seed=4)
    synth.write_series_csv(str(d / "normal.csv"), data, FEATURES)
    common = dict(data=str(d / "normal.csv"), features=FEATURES, key="entity", quiet=True, plot=False, seed=0)
    vae = fit(FitOptions(kind="vae", epochs=30, out=str(d / "vae.onnx"), **common))
    dense = fit(FitOptions(kind="dense", epochs=20, out=str(d / "dense.onnx"), **common))
    return d, data.reshape(-1, len(FEATURES)), vae, dense


def test_decoder_subgraph_is_the_models_decoder(trained):
    """The sub-graph that generate runs (latent code -> reconstruction) is exactly the model's
    decoder: fed the encoder's mu, it gives the full model's reconstruction."""
    _, _, vae, _ = trained
    sub, name, k = generate.decoder(onnx.load(vae.path))
    x = vae.val[:16]
    with torch.no_grad():
        z = (torch.from_numpy(x) - vae.model.mean) / vae.model.std
        mu = vae.core.encode(torch.flatten(z, 1)).numpy()
    assert mu.shape == (16, k)
    (decoded,) = export.session(sub).run(["reconstruction"], {name: mu})
    rec, _ = export.run(export.session(vae.path), x)
    assert np.abs(decoded - rec).max() <= 1e-4


def test_samples_look_like_the_training_data(trained):
    _, real, vae, dense = trained
    features, samples = generate.generate(vae.path, 4000, seed=1)
    assert features == FEATURES and samples.shape == (4000, 1, 4)
    gen = samples[:, 0, :]
    mean, std = real.mean(0), real.std(0)
    print("generated mean", gen.mean(0), "real", mean)
    print("generated std", gen.std(0), "real", std)
    assert np.all(np.abs(gen.mean(0) - mean) < 0.15 * std)
    assert np.all(np.abs(gen.std(0) / std - 1) < 0.2)
    corr_gap = np.abs(np.corrcoef(gen.T) - np.corrcoef(real.T)).max()
    print("max correlation difference", corr_gap)
    assert corr_gap < 0.1
    # An independently trained dense model finds the samples about as normal as real data.
    _, err = export.run(export.session(dense.path), samples)
    above = float(np.mean(calibrate.scores(err) > dense.calibration["quantiles"]["0.99"]))
    print(f"generated samples above the dense model's p99: {above:.1%}")
    assert above < 0.1
    # Random rows, in contrast, are not normal: the check can fail.
    rng = np.random.default_rng(0)
    shuffled = np.stack([rng.permutation(real[:, j]) for j in range(4)], axis=1)[:4000, None, :]
    _, err = export.run(export.session(dense.path), shuffled.astype(np.float32))
    assert np.mean(calibrate.scores(err) > dense.calibration["quantiles"]["0.99"]) > 0.5


def test_generate_command_writes_csv(trained, tmp_path):
    d, _, vae, dense = trained
    out = tmp_path / "gen.csv"
    assert cli.main(["generate", "--model", vae.path, "-n", "7", "--seed", "3", "--out", str(out)]) == 0
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 7 and list(rows[0]) == FEATURES
    # Seeded: the same seed gives the same samples, another seed others.
    again = tmp_path / "again.csv"
    cli.main(["generate", "--model", vae.path, "-n", "7", "--seed", "3", "--out", str(again)])
    assert again.read_text() == out.read_text()
    cli.main(["generate", "--model", vae.path, "-n", "7", "--seed", "4", "--out", str(again)])
    assert again.read_text() != out.read_text()


def test_generate_refuses_other_kinds(trained, capsys):
    _, _, _, dense = trained
    assert cli.main(["generate", "--model", dense.path, "-n", "3"]) == 2
    assert "needs a model of kind vae" in capsys.readouterr().err
