"""Issue 17, item 1: drifting features measured from a slow per-key level (`anomalyd.baseline`),
computed alike by the toolkit, which trains on it, and the daemon, which serves it."""

from __future__ import annotations

import csv
import json
import subprocess

import numpy as np
import onnx
import pytest

from anomalyd_train import baseline, cli, contract, data, export, machines

from conftest import anomalyd_bin

TEMPS = ["temp_motor", "temp_bearing"]


def test_the_level_starts_as_the_running_mean_and_a_clipped_step_keeps_standing_out():
    assert list(baseline.relative(np.array([10.0, 12.0, 14.0, 4.0]), 1e-3, 100.0)) == [0.0, 2.0, 3.0, -8.0]
    alpha = 1 - 2 ** (-1 / 50)
    drift = 20 + 0.001 * np.arange(2000)
    r = baseline.relative(drift, alpha, 1.0)
    assert abs(r[-1] - 0.001 / alpha) < 0.01, "a drift is followed, lagging by slope / alpha"
    step = np.concatenate([drift, 32 + 0.001 * np.arange(100)])
    assert baseline.relative(step, alpha, 1.0)[2000:].min() > 8, "a step of ten clips still reads above 8"
    assert baseline.relative(step, alpha, None)[-1] < 5, "unclipped, the level learns the step"


def machines_file(path, seeds=(0, 1), rows=500) -> list[machines.Run]:
    """Two machines in one file, keyed by `machine`, interleaved as a stream would hold them."""
    runs = [machines.run(rows, seed) for seed in seeds]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["machine", *machines.CHANNELS])
        for i in range(rows):
            for m, r in enumerate(runs):
                w.writerow([f"m{m}", *(f"{v:.4f}" for v in r.values[i])])
    return runs


def fit(tmp_path, kind: str, *extra: str) -> str:
    out = str(tmp_path / f"{kind}.onnx")
    code = cli.main(["fit", "--kind", kind, "--data", str(tmp_path / "machines.csv"), "--key", "machine",
                     "--features", ",".join(machines.CHANNELS), "--out", out, "-q", "--no-plot", *extra])
    assert code == 0
    return out


def test_fit_writes_the_baseline_into_the_contract_and_refuses_what_cannot_work(tmp_path):
    machines_file(tmp_path / "machines.csv")
    path = fit(tmp_path, "dense", "--baseline", ",".join(TEMPS), "--baseline-half-life", "30", "--epochs", "2")
    assert contract.check(path) == []
    meta = {p.key: p.value for p in onnx.load(path).metadata_props}
    b = json.loads(meta["anomalyd.baseline"])
    assert b["features"] == TEMPS and b["half_life"] == 30 and all(c > 0 for c in b["clip"])
    assert contract.summary(path)["baseline"] == b
    shown = subprocess.run([str(anomalyd_bin()), "inspect", path], capture_output=True, text=True)
    assert "baseline     temp_motor, temp_bearing measured from a per-key level (half-life 30 records)" in shown.stdout

    for bad, message in [(["--baseline", "temp_x"], "not one of --features"),
                         (["--baseline", "temp_motor,temp_motor"], "twice"),
                         (["--baseline", "temp_motor", "--baseline-half-life", "0.5"], "at least 1 record")]:
        with pytest.raises(data.DataError, match=message):
            from anomalyd_train.fit import FitOptions, fit as fit_model

            args = cli.parser().parse_args(["fit", "--kind", "dense", "--data", str(tmp_path / "machines.csv"),
                                            "--features", ",".join(machines.CHANNELS), "--out", "x.onnx", *bad])
            fit_model(FitOptions(kind="dense", data=args.data, features=args.features, out=args.out,
                                 baseline=args.baseline, baseline_half_life=args.baseline_half_life))

    proto = onnx.load(path)
    for p in proto.metadata_props:
        if p.key == "anomalyd.baseline":
            p.value = json.dumps({**b, "features": ["nope", "temp_bearing"]})
    onnx.save(proto, str(tmp_path / "broken.onnx"))
    assert any("distinct model features" in p for p in contract.check(str(tmp_path / "broken.onnx")))
    out = subprocess.run([str(anomalyd_bin()), "inspect", str(tmp_path / "broken.onnx")], capture_output=True, text=True)
    assert out.returncode != 0 and "`baseline`" in out.stderr and '"nope"' in out.stderr, out.stderr


@pytest.mark.parametrize("kind,window", [("dense", "1"), ("lstm", "8")])
def test_the_daemon_scores_a_baselined_model_as_the_toolkit_does(tmp_path, kind, window):
    machines_file(tmp_path / "machines.csv")
    path = fit(tmp_path, kind, "--window", window, "--baseline", ",".join(TEMPS), "--epochs", "2")
    scores = tmp_path / "scores.csv"
    p = subprocess.run([str(anomalyd_bin()), "score", "--model", path, "--input", str(tmp_path / "machines.csv"),
                        "--key-field", "machine", "--output", str(scores)], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    daemon: dict[str, list[float]] = {}
    with open(scores) as f:
        for row in csv.DictReader(f):
            if row["score"]:
                daemon.setdefault(row["key"], []).append(float(row["score"]))

    table = data.load(str(tmp_path / "machines.csv"), machines.CHANNELS, key="machine")
    spec = baseline.Baseline.from_metadata(contract.summary(path)["baseline"])
    sess = export.session(path)
    keys = list(dict.fromkeys(table.keys))
    for key, series in zip(keys, data.series(table)):
        relative = spec.apply(series, machines.CHANNELS).astype(np.float32)
        windows = np.lib.stride_tricks.sliding_window_view(relative, int(window), axis=0).transpose(0, 2, 1)
        _, err = export.run(sess, windows)
        toolkit = err.astype(np.float64).mean(axis=1)
        assert len(daemon[key]) == len(toolkit)
        assert np.allclose(daemon[key], toolkit, rtol=1e-4, atol=1e-5), np.abs(np.array(daemon[key]) - toolkit).max()
