"""Issue 16: a user's own file, from `anomalyd-train fit` to `anomalyd score`, without friction:
semicolon (or tab) separated CSV, a `datetime` column written as people write it, one series
without a key column, few rows for a long window, and no configuration file."""

from __future__ import annotations

import csv
import re
import subprocess

import numpy as np
import pytest

from anomalyd_train import cli, data, synth

from conftest import anomalyd_bin

FEATURES = ["temp", "pressure", "flow", "power"]


def own_file(path, rows: int, sep: str = ";", seed: int = 0, start: int = 0) -> list[str]:
    """One series of `rows` sensor rows with a `datetime` column and no key, `sep`-separated.
    Returns the timestamps as written."""
    series = synth.sensors(start + rows, entities=1, seed=seed)[0][start:]
    stamps = [f"2020-03-09 {10 + i // 3600:02d}:{i // 60 % 60:02d}:{i % 60:02d}" for i in range(start, start + rows)]
    with open(path, "w") as f:
        f.write(sep.join(["datetime", *FEATURES]) + "\n")
        for t, row in zip(stamps, series):
            f.write(sep.join([t, *(f"{v:.4f}" for v in row)]) + "\n")
    return stamps


def test_semicolon_and_tab_files_read_as_the_comma_one(tmp_path):
    tables = {}
    for name, sep in [("comma", ","), ("semicolon", ";"), ("tab", "\t")]:
        path = tmp_path / f"{name}.csv"
        own_file(path, 50, sep)
        tables[name] = data.load(str(path), FEATURES)
    assert np.array_equal(tables["comma"].values, tables["semicolon"].values)
    assert np.array_equal(tables["comma"].values, tables["tab"].values)
    with pytest.raises(data.DataError, match="read as semicolon-separated"):
        data.load(str(tmp_path / "semicolon.csv"), ["temp", "presure"])


@pytest.mark.parametrize("window", [24, 45, 46, 47, 48, 49, 50, 60, 99])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_split_leaves_both_sides_a_window_whenever_the_data_allows(window, seed):
    """400 rows hold 2 x window + 1 for every window up to 199: both sides always get windows."""
    series = [synth.sensors(400, entities=1, seed=seed)[0]]
    for val_fraction in (0.1, 0.2, 0.5, 0.9):
        train, val = data.split_windows(series, window, val_fraction, seed)
        assert len(train) >= 2 and len(val) >= 1, (window, val_fraction)
        assert train.shape[1:] == (window, len(FEATURES))


def test_too_little_data_says_what_would_work():
    series = [synth.sensors(400, entities=1, seed=0)[0]]
    with pytest.raises(data.DataError, match=r"longest entity has 400 rows.*--window of at most 199"):
        data.split_windows(series, 200, 0.2, 0)


def test_pca_on_one_value_is_refused_saying_what_works(tmp_path, capsys):
    path = tmp_path / "one.csv"
    own_file(path, 200)
    out = str(tmp_path / "m.onnx")
    assert cli.main(["fit", "--kind", "pca", "--data", str(path), "--features", "flow", "--out", out, "-q"]) == 2
    err = capsys.readouterr().err
    assert "pca" in err and "every score would be 0" in err and "--window" in err
    # A window of the series' recent shape gives PCA something to reduce.
    assert cli.main(["fit", "--kind", "pca", "--window", "4", "--data", str(path), "--features", "flow",
                     "--out", out, "-q"]) == 0


def test_a_users_file_goes_through_fit_and_score_with_nothing_else(tmp_path):
    """The issue's file: semicolons, `datetime`, no key, 400 training rows, a window of 60."""
    train, test = tmp_path / "train.csv", tmp_path / "machine-1.csv"
    own_file(train, 400)
    stamps = own_file(test, 300, start=400)
    model = tmp_path / "machine.onnx"
    assert cli.main(["fit", "--kind", "conv", "--window", "60", "--epochs", "5", "--data", str(train),
                     "--features", ",".join(FEATURES), "--out", str(model), "-q"]) == 0
    out = tmp_path / "scores.csv"
    p = subprocess.run([str(anomalyd_bin()), "score", "--model", str(model), "--input", str(test),
                        "--timestamp-field", "datetime", "--output", str(out)],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 300
    assert {r["key"] for r in rows} == {"machine-1"}
    assert [r["timestamp"] for r in rows] == stamps
    scored = [r for r in rows if r["score"]]
    assert len(scored) == 300 - 59, "every row scored once its window is full"
    assert all(r["error"] == "" for r in rows)


def test_fit_warns_when_the_calibration_is_small(tmp_path, capsys):
    """What the user of a short file needs to know: its thresholds rest on few samples."""
    path = tmp_path / "short.csv"
    own_file(path, 400)
    assert cli.main(["fit", "--kind", "dense", "--data", str(path), "--features", ",".join(FEATURES),
                     "--out", str(tmp_path / "m.onnx"), "-q", "--no-plot", "--epochs", "2"]) == 0
    err = capsys.readouterr().err
    # 80 validation windows and the held-out scores of 5 fold models: every row once, plus 80.
    assert re.search(r"calibration rests on 481 held-back scores \(of the validation windows and of 5 models", err)
    assert "extrapolates" in err and "rough" in err
