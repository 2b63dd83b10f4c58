"""`anomalyd score --swap ROW=MODEL`: the daemon's hot reload mid-file, as a retraining loop (the
NAB harness with learning, issue 12) replays it. Real models from the real training code."""

from __future__ import annotations

import csv
import subprocess

from anomalyd_train import synth
from anomalyd_train.fit import FitOptions, fit

from conftest import FEATURES, anomalyd_bin


def _score(tmp, data, model, *swaps):
    out = tmp / f"scores-{len(swaps)}-{model.stem}.csv"
    args = [str(anomalyd_bin()), "score", "--model", str(model), "--input", str(data), "--output", str(out)]
    for row, m in swaps:
        args += ["--swap", f"{row}={m}"]
    p = subprocess.run(args, capture_output=True, text=True, timeout=120)
    return p, (list(csv.DictReader(open(out))) if p.returncode == 0 else [])


def test_a_model_swapped_in_mid_file_scores_from_its_row_on_with_its_own_calibration(tmp_path):
    # Two models of the same features trained on different data: their errors and calibrations
    # differ, so which one scored a row shows.
    models = []
    for seed in (1, 2):
        train = tmp_path / f"train{seed}.csv"
        synth.write_series_csv(str(train), synth.sensors(300, entities=2, seed=seed), FEATURES)
        out = tmp_path / f"m{seed}.onnx"
        fit(FitOptions(kind="dense", data=str(train), features=FEATURES, key="entity", out=str(out),
                       epochs=2, quiet=True, plot=False, seed=seed))
        models.append(out)
    live = tmp_path / "live.csv"
    synth.write_series_csv(str(live), synth.sensors(60, entities=1, seed=9), FEATURES)
    k = 30
    _, first = _score(tmp_path, live, models[0])
    _, second = _score(tmp_path, live, models[1])
    p, swapped = _score(tmp_path, live, models[0], (k, models[1]))
    assert p.returncode == 0, p.stderr
    assert len(swapped) == 60

    def score(rows, i):
        return float(rows[i]["score"])

    assert all(score(swapped, i) == score(first, i) for i in range(k)), "before the swap: the first model"
    assert all(score(swapped, i) == score(second, i) for i in range(k, 60)), "from the swap on: the second"
    assert score(first, k) != score(second, k)
    # Every key's threshold restarts from the new model's calibration, as on a hot reload.
    assert swapped[k]["threshold"] == second[0]["threshold"] != first[0]["threshold"]

    # A model that cannot replace the first (another window) is refused before any row is scored,
    # naming the file and the row; so is a schedule out of order.
    lstm = tmp_path / "lstm.onnx"
    fit(FitOptions(kind="lstm", window=4, data=str(tmp_path / "train1.csv"), features=FEATURES, key="entity",
                   out=str(lstm), epochs=1, quiet=True, plot=False))
    p, _ = _score(tmp_path, live, models[0], (k, lstm))
    assert p.returncode != 0
    assert "lstm.onnx (from row 30) cannot replace" in p.stderr and "window 4" in p.stderr, p.stderr
    p, _ = _score(tmp_path, live, models[0], (40, models[1]), (20, models[0]))
    assert p.returncode == 64 and "ascending" in p.stderr, p.stderr
