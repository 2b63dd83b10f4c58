"""The command line and the data path: help, clear errors, reproducibility, formats, windows and
the validation split, calibration."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import numpy as np
import pytest

from anomalyd_train import KINDS, calibrate, cli, contract, data, export, synth

from conftest import FEATURES


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "anomalyd_train.cli", *args], capture_output=True, text=True,
                          timeout=300)


def test_help_explains_every_command_and_kind():
    top = run_cli("--help")
    assert top.returncode == 0
    for command in ("fit", "generate", "check", "synth", "select"):
        assert command in top.stdout
    fit_help = run_cli("fit", "--help").stdout
    for kind in KINDS:
        assert kind in fit_help
    for option in ("--features", "--key", "--window", "--shape", "--epochs", "--seed", "--out"):
        assert option in fit_help
    assert run_cli("generate", "--help").returncode == 0


def test_unknown_feature_names_the_column_and_the_file(sensors_csv, tmp_path, capsys):
    code = cli.main(["fit", "--kind", "dense", "--data", str(sensors_csv), "--features", "temp,presure",
                     "--out", str(tmp_path / "m.onnx"), "-q"])
    err = capsys.readouterr().err
    assert code == 2
    assert "'presure'" in err and str(sensors_csv) in err and "pressure" in err  # lists the real columns
    assert not (tmp_path / "m.onnx").exists()


def test_other_data_errors_are_one_clear_line(tmp_path, capsys):
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b\n1,2\n3,oops\n")
    assert cli.main(["fit", "--kind", "dense", "--data", str(bad), "--features", "a,b", "--out",
                     str(tmp_path / "m.onnx"), "-q"]) == 2
    err = capsys.readouterr().err
    assert f"{bad}:3" in err and "'b'" in err and "oops" in err
    assert cli.main(["fit", "--kind", "dense", "--data", str(tmp_path / "missing.csv"), "--features", "a",
                     "--out", str(tmp_path / "m.onnx"), "-q"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert cli.main(["fit", "--kind", "lstm", "--data", str(bad), "--features", "a", "--key", "host",
                     "--out", str(tmp_path / "m.onnx"), "-q"]) == 2
    assert "key 'host' is not a column" in capsys.readouterr().err


def test_fit_is_reproducible_from_the_seed(sensors_csv, tmp_path, monkeypatch):
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1795824000")
    digests = []
    for name, seed in (("a", 5), ("b", 5), ("c", 6)):
        out = tmp_path / f"{name}.onnx"
        assert cli.main(["fit", "--kind", "dense", "--data", str(sensors_csv), "--features", ",".join(FEATURES),
                         "--key", "entity", "--epochs", "3", "--seed", str(seed), "--name", "m", "--out", str(out),
                         "-q"]) == 0
        digests.append(hashlib.sha256(out.read_bytes()).hexdigest())
        assert (tmp_path / f"{name}.loss.png").stat().st_size > 1000
    assert digests[0] == digests[1], "same seed, same data: the same bytes"
    assert digests[0] != digests[2], "another seed: another model"
    meta = export.metadata(str(tmp_path / "a.onnx"))
    assert meta["anomalyd.trained_at"] == "2026-11-28T00:00:00Z"
    assert json.loads(meta["anomalyd.training_data"]) == {
        "sha256": data.file_sha256(str(sensors_csv)), "rows": 1600, "file": "sensors.csv",
    }


def test_ndjson_and_csv_give_the_same_model(tmp_path):
    series = synth.sensors(150, entities=3, seed=2)
    csv_path, nd_path = tmp_path / "d.csv", tmp_path / "d.ndjson"
    synth.write_series_csv(str(csv_path), series, FEATURES)
    with nd_path.open("w") as f:
        for t in range(series.shape[1]):
            for e in range(series.shape[0]):
                rec = {"entity": f"e{e:02d}", **{k: float(v) for k, v in zip(FEATURES, series[e, t])}}
                f.write(json.dumps(rec) + "\n")
    a = data.load(str(csv_path), FEATURES, key="entity")
    b = data.load(str(nd_path), FEATURES, key="entity")
    assert np.array_equal(a.values, b.values) and a.keys == b.keys


def test_windows_never_cross_entities_and_splits_share_no_rows():
    # Entity e's rows are e*1000 + t: a window crossing entities or a row in both sets shows.
    parts = [np.stack([np.arange(300) + 1000 * e] * 2, axis=1).astype(float) for e in range(4)]
    train, val = data.split_windows(parts, window=8, val_fraction=0.25, seed=0)
    for w in (train, val):
        first = w[:, :, 0]
        assert np.all(np.diff(first, axis=1) == 1), "a window is 8 consecutive rows of one entity"
    train_rows = set(train[:, :, 0].ravel().tolist())
    val_rows = set(val[:, :, 0].ravel().tolist())
    assert not train_rows & val_rows, "validation windows share no row with training windows"
    assert 0.1 < len(val) / (len(train) + len(val)) < 0.4


def test_folds_hold_out_blocks_spread_over_each_series_once():
    # Rows are e*1000 + t again. Point models: every row held out once. Sequence models: blocks
    # of 2 x window rows, each held out in one split, spread over the series, never a row both
    # trained on and held out, and every window inside a block held out once.
    parts = [np.stack([np.arange(200) + 1000 * e] * 2, axis=1).astype(float) for e in range(3)]
    point = data.folds(parts, window=1, k=5, seed=0)
    assert sorted(np.concatenate([h[:, 0, 0] for _, h in point]).tolist()) == sorted(
        np.concatenate([p[:, 0] for p in parts]).tolist())
    seq = data.folds(parts, window=8, k=5, seed=0)
    assert len(seq) == 5
    starts = []
    for train, held in seq:
        assert not set(train[:, :, 0].ravel().tolist()) & set(held[:, :, 0].ravel().tolist())
        blocks = set((held[:, 0, 0] // 16).tolist())
        assert len(blocks) >= 5, "each split holds out several blocks, not one stretch"
        starts += held[:, 0, 0].tolist()
    assert len(starts) == len(set(starts)), "no window is held out twice"
    inside = {e * 1000 + b * 16 + i for e in range(3) for b in range(13) for i in range(9) if b * 16 + i + 8 <= 200}
    assert inside <= set(starts), "every window inside one block is held out once"


def test_a_variational_models_noise_variance_is_its_error_on_the_held_back_windows():
    # The score divides by the error on rows the model was not fitted to (kinds.Variational.fit_noise):
    # here the held-back rows are four times noisier, and so is the variance.
    import torch

    from anomalyd_train import fit, kinds, train

    gen = torch.Generator().manual_seed(0)
    base = torch.randn(400, 1, 1, generator=gen).repeat(1, 1, 4)
    train_n = base[:300] + 0.05 * torch.randn(300, 1, 4, generator=gen)
    val_n = base[300:] + 0.2 * torch.randn(100, 1, 4, generator=gen)
    spec = kinds.Spec(kind="vae", window=1, features=4, latent=1)
    core, _ = fit._train(spec, train_n, val_n, train.TrainConfig(epochs=3, quiet=True))
    with torch.no_grad():
        on_val = ((core(val_n) - val_n) ** 2).mean(dim=0)
        on_train = ((core(train_n) - train_n) ** 2).mean(dim=0)
    assert torch.allclose(core.noise_var, on_val.clamp(min=kinds.Variational.NOISE_FLOOR))
    assert (on_val > on_train).all()
    # Too few held-back windows for a variance of their own: the training windows are added.
    core, _ = fit._train(spec, train_n, val_n[: fit.MIN_NOISE_WINDOWS - 1], train.TrainConfig(epochs=1, quiet=True))
    both = torch.cat([train_n, val_n[: fit.MIN_NOISE_WINDOWS - 1]])
    with torch.no_grad():
        assert torch.allclose(core.noise_var, ((core(both) - both) ** 2).mean(dim=0).clamp(min=1e-4))


def test_calibration_summary():
    rng = np.random.default_rng(0)
    err = rng.gamma(2.0, 0.01, size=(5000, 3))
    cal = calibrate.summarise(err)
    s = err.mean(axis=1)
    assert cal["count"] == 5000 and len(cal["sample"]) == 2000
    assert cal["sample"] == sorted(cal["sample"])
    assert cal["sample"][0] == pytest.approx(s.min(), rel=1e-5) and cal["sample"][-1] == pytest.approx(s.max(), rel=1e-5)
    assert cal["quantiles"]["0.99"] == pytest.approx(np.quantile(s, 0.99), rel=1e-5)
    assert np.quantile(cal["sample"], 0.9) == pytest.approx(np.quantile(s, 0.9), rel=0.01)
    assert cal["feature_mean"] == pytest.approx(err.mean(axis=0).tolist(), rel=1e-5)
    small = calibrate.summarise(err[:10])
    assert small["count"] == 10 and len(small["sample"]) == 10


def test_check_rejects_a_broken_contract(quick_models, tmp_path):
    import onnx

    res = quick_models("dense")
    proto = onnx.load(res.path)
    meta = export.metadata(proto)
    meta["anomalyd.features"] = json.dumps(["only", "three", "names"])
    del meta["anomalyd.version"]
    export.set_metadata(proto, meta)
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(proto.SerializeToString())
    problems = contract.check(str(bad))
    assert any("anomalyd.version" in p for p in problems)
    assert cli.main(["check", str(bad)]) == 1
    meta["anomalyd.version"] = "1"
    export.set_metadata(proto, meta)
    bad.write_bytes(proto.SerializeToString())
    assert any("input shape" in p for p in contract.check(str(bad)))


def test_image_models_need_ndjson_arrays(images_ndjson, tmp_path, capsys):
    assert cli.main(["fit", "--kind", "conv", "--shape", "2,12,12", "--data", str(images_ndjson), "--features",
                     "near", "--out", str(tmp_path / "m.onnx"), "-q"]) == 2
    assert "2 channel(s)" in capsys.readouterr().err
    assert cli.main(["fit", "--kind", "conv", "--shape", "2,10,10", "--data", str(images_ndjson), "--features",
                     "near,far", "--out", str(tmp_path / "m.onnx"), "-q"]) == 2
    assert "expected 10x10" in capsys.readouterr().err


def test_fit_shows_a_progress_bar_and_a_summary(sensors_csv, tmp_path):
    out = run_cli("fit", "--kind", "dense", "--data", str(sensors_csv), "--features", ",".join(FEATURES),
                  "--epochs", "2", "--out", str(tmp_path / "m.onnx"))
    assert out.returncode == 0, out.stderr
    assert "2/2" in out.stderr and "epoch" in out.stderr  # tqdm, on stderr
    assert "wrote" in out.stdout and "p99" in out.stdout and "m.loss.png" in out.stdout
    assert cli.main(["check", str(tmp_path / "m.onnx")]) == 0


def test_synth_writes_labelled_anomalies(tmp_path):
    out = tmp_path / "s.csv"
    assert cli.main(["synth", "--rows", "2000", "--entities", "4", "--anomalies", "0.05", "--out", str(out)]) == 0
    table = data.load(str(out), FEATURES + ["anomaly"], key="entity")
    labels = table.values[:, -1]
    assert table.rows == 2000 and set(np.unique(labels)) == {0.0, 1.0}
    assert 0.02 < labels.mean() < 0.08
