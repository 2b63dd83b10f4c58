"""`anomalyd score --swap ROW=MODEL` (the daemon's hot reload mid-file) and `--candidate ROW=MODEL` (its
shadow evaluation and promotion), as a retraining loop (the NAB harness with learning, issue 12)
replays them. Real models from the real training code."""

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


def test_a_candidate_is_scored_in_the_shadow_then_promoted_or_refused_as_the_daemon_would(tmp_path):
    train = tmp_path / "train.csv"
    synth.write_series_csv(str(train), synth.sensors(300, entities=2, seed=1), FEATURES)
    model = tmp_path / "m.onnx"
    fit(FitOptions(kind="dense", data=str(train), features=FEATURES, key="entity", out=str(model),
                   epochs=2, quiet=True, plot=False, seed=1))
    twin = tmp_path / "twin.onnx"
    twin.write_bytes(model.read_bytes())
    lstm = tmp_path / "lstm.onnx"
    fit(FitOptions(kind="lstm", window=4, data=str(train), features=FEATURES, key="entity", out=str(lstm),
                   epochs=1, quiet=True, plot=False))
    live = tmp_path / "live.csv"
    synth.write_series_csv(str(live), synth.sensors(80, entities=1, seed=9), FEATURES)
    config = tmp_path / "anomalyd.toml"
    config.write_text(f'[pipelines.p]\ntopics = ["-"]\nmodel = "{model}"\nkey_field = "entity"\n'
                      "[pipelines.p.batch]\nmax_size = 8\n[pipelines.p.promotion]\nrecords = 16\n")

    def score(*args):
        out = tmp_path / "out.csv"
        p = subprocess.run([str(anomalyd_bin()), "score", "-c", str(config), "--input", str(live), "--output",
                            str(out), *args], capture_output=True, text=True, timeout=120)
        assert p.returncode == 0, p.stderr
        return p.stderr, list(csv.DictReader(open(out)))

    _, alone = score()
    # The same model as a candidate from row 20: its verdicts agree, so it is promoted once 16
    # records were compared (rows 20-35, two batches of 8); the scores do not change.
    err, shadowed = score("--candidate", f"20={twin}")
    assert "row 36: promoted candidate" in err and "1 promoted, 0 refused" in err, err
    assert [r["score"] for r in shadowed] == [r["score"] for r in alone]
    # A candidate that could not serve without a restart is refused at once; scoring goes on.
    err, refused = score("--candidate", f"20={lstm}")
    assert "row 20: refused candidate" in err and "window 4" in err and "0 promoted, 1 refused" in err, err
    assert [r["score"] for r in refused] == [r["score"] for r in alone]
