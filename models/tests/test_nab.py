"""The NAB harness (`anomalyd-train nab`): the ensemble graph, the escalation report, and a run on
two small corpus files through the daemon."""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from anomalyd_train import export
from anomalyd_train import nab as nb
from anomalyd_train import nab_score as ns
from anomalyd_train.fit import FitOptions, fit

from conftest import anomalyd_bin, tract_verify

REPO = Path(__file__).resolve().parents[2]
NAB = REPO.parent / "shared" / "nab"
FILES = ["realKnownCause/rogue_agent_key_hold.csv", "artificialWithAnomaly/art_daily_jumpsup.csv"]


def nab_dir() -> Path:
    if not (NAB / "labels" / "combined_windows.json").is_file():
        pytest.skip(f"NAB data not found at {NAB} (a NAB checkout beside the repository)")
    return NAB


def daemon_rows(score, is_anomaly, events) -> nb.DaemonRows:
    score = np.asarray(score, dtype=float)
    return nb.DaemonRows(
        anomaly_score=np.zeros(len(score)), score=score, is_anomaly=np.asarray(is_anomaly, dtype=bool),
        firing=np.array([e == "f" for e in events]), resolved=np.array([e == "r" for e in events]),
    )


def test_escalation_reports_the_opening_row_and_each_doubling_only():
    # 1000 normal rows of score 1, then an episode: the 99th percentile of the earlier scores
    # stays 1 throughout, so a row's rarity x is its score.
    n = 1000
    score = [1.0] * n + [3.0, 4.0, 7.0, 13.0, 20.0, 1.0, 30.0]
    anomalous = [False] * n + [True, True, True, True, True, False, True]
    events = [""] * n + ["f", "", "", "", "", "r", ""]
    out = nb.report("escalation", daemon_rows(score, anomalous, events), escalate=2.0)
    x = np.array(score[n:])
    expected = np.zeros(7)
    expected[0] = x[0] / (1 + x[0])  # opens the episode (x = 3)
    expected[2] = x[2] / (1 + x[2])  # 7 >= 2 * 3 (4 was not: 4 < 6)
    expected[4] = x[4] / (1 + x[4])  # 20 >= 2 * 7 (13 was not: 13 < 14)
    # After `resolved`, an anomalous row (30) is not reported without a new `firing`.
    np.testing.assert_allclose(out[n:], expected)
    assert np.all(out[:n] == 0)
    # The rarity report is the same without the re-notifications.
    rarity = nb.report("rarity", daemon_rows(score, anomalous, events))
    np.testing.assert_allclose(rarity[n:], [expected[0], 0, 0, 0, 0, 0, 0])


def test_a_keys_later_episodes_report_their_rarity_discounted():
    # Three episodes of the same rarity (x = 3) after 1000 rows of score 1: the k-th reports
    # x / (1 + 0.5 (k - 1)), its escalations too; no discount reports all three alike.
    n = 1000
    score = [1.0] * n + [3.0, 3.0, 1.0, 3.0, 9.0, 1.0, 3.0]
    anomalous = [False] * n + [True, True, False, True, True, False, True]
    events = [""] * n + ["f", "", "r", "f", "", "r", "f"]
    rows = daemon_rows(score, anomalous, events)
    out = nb.report("escalation", rows, escalate=2.0, repeat_discount=0.5)

    def rep(x):
        return x / (1 + x)

    np.testing.assert_allclose(out[n:], [rep(3), 0, 0, rep(3 / 1.5), rep(9 / 1.5), 0, rep(3 / 2)])
    plain = nb.report("escalation", rows, escalate=2.0)
    np.testing.assert_allclose(plain[n:], [rep(3), 0, 0, rep(3), rep(9), 0, rep(3)])


def test_an_alert_ranks_against_the_keys_own_earlier_alerts():
    # Episodes opening at x = 8, 2, 4 and 16 after 1000 rows of score 1 (x is the score): the
    # first and each new largest keep x; the second (smaller than the one before it) is halved,
    # the third (above one of two) multiplied by 2/3.
    n = 1000
    score = [1.0] * n + [8.0, 1.0, 2.0, 1.0, 4.0, 1.0, 16.0]
    anomalous = [s > 1 for s in score]
    events = [""] * n + ["f", "r", "f", "r", "f", "r", "f"]
    out = nb.report("rarity", daemon_rows(score, anomalous, events), key_rank=1.0)

    def rep(x):
        return x / (1 + x)

    np.testing.assert_allclose(out[n:], [rep(8), 0, rep(2 / 2), 0, rep(4 * 2 / 3), 0, rep(16)])
    off = nb.report("rarity", daemon_rows(score, anomalous, events))
    np.testing.assert_allclose(off[n:], [rep(8), 0, rep(2), 0, rep(4), 0, rep(16)])


def test_a_promotion_rescales_the_earlier_scores_to_the_new_models():
    # 1000 rows of score 2 under a threshold of 4; from row 1000 a promoted model serves whose
    # threshold is 2 (its errors are half the old one's): its first alert, a score of 3, ranks
    # against the earlier scores halved (x = 3 / 1), not against the old model's (x = 3 / 2).
    n = 1000
    score = [2.0] * n + [1.0, 3.0]
    events = [""] * n + ["", "f"]
    rows = daemon_rows(score, [False] * (n + 1) + [True], events)
    plain = nb.report("rarity", rows)
    rows.threshold = np.r_[np.full(n, 4.0), 2.0, 2.0]
    rows.promoted = [n]
    promoted = nb.report("rarity", rows)
    np.testing.assert_allclose(plain[-1], 1.5 / 2.5)
    np.testing.assert_allclose(promoted[-1], 3 / 4)


def test_reports_are_causal():
    rng = np.random.default_rng(3)
    n = 400
    score = rng.lognormal(size=n)
    anomalous = score > 4
    events = np.where(rng.random(n) < 0.05, "f", np.where(rng.random(n) < 0.05, "r", ""))
    full = nb.report("escalation", daemon_rows(score, anomalous, events), key_rank=1.0)
    cut = 250
    changed = score.copy()
    changed[cut:] = rng.lognormal(size=n - cut) * 50
    again = nb.report("escalation", daemon_rows(changed, changed > 4, events), key_rank=1.0)
    np.testing.assert_array_equal(full[:cut], again[:cut])


@pytest.fixture(scope="module")
def two_members(tmp_path_factory):
    """Two small conv models (different seeds) on one series of a value and its time of day."""
    d = tmp_path_factory.mktemp("ensemble")
    t = np.arange(600)
    value = np.sin(2 * np.pi * t / 96) + 0.1 * np.random.default_rng(0).normal(size=len(t))
    rows = np.stack([value, np.sin(2 * np.pi * t / 288), np.cos(2 * np.pi * t / 288)], axis=1)
    data = d / "train.csv"
    with open(data, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["value", "tod_sin", "tod_cos"])
        w.writerows(rows.tolist())
    paths = []
    for seed in (0, 1):
        out = d / f"m{seed}.onnx"
        fit(FitOptions(kind="conv", data=str(data), features=["value", "tod_sin", "tod_cos"], out=str(out),
                       window=8, epochs=2, seed=seed, quiet=True, plot=False))
        paths.append(out)
    return d, rows, paths


def test_ensemble_graph_is_the_mean_of_its_members(two_members, tmp_path):
    d, rows, paths = two_members
    protos = [onnx.load(str(p)) for p in paths]
    combined = nb.combine(protos)
    x = nb.probation_windows(rows, 8)[::7]
    (r0, e0), (r1, e1) = (export.run(export.session(p), x) for p in protos)
    rec, err = export.run(export.session(combined), x)
    assert not np.allclose(e0, e1), "two seeds should give two different models"
    np.testing.assert_allclose(err, (e0 + e1) / 2, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(rec, (r0 + r1) / 2, rtol=1e-5, atol=1e-6)
    # The daemon's runtime (tract) computes the same graph.
    path = tmp_path / "ensemble.onnx"
    combined.metadata_props.extend(protos[0].metadata_props)
    export.save(combined, str(path))
    code, output = tract_verify(str(path), x[:3], rec[:3], err[:3], tmp_path)
    assert code == 0, output


def test_probation_windows_are_every_window_in_order():
    rows = np.arange(20, dtype=float).reshape(10, 2)
    w = nb.probation_windows(rows, 4)
    assert w.shape == (7, 4, 2)
    np.testing.assert_array_equal(w[0], rows[:4])
    np.testing.assert_array_equal(w[-1], rows[-4:])


def test_a_retrain_leaves_out_alerted_rows_and_keeps_the_most_recent_clean_stretches():
    # Rows 3-4 over the threshold without an episode; an episode fires at 7 and resolves at 9.
    is_anomaly = [0, 0, 0, 1, 1, 0, 0, 1, 1, 0, 0, 0]
    events = ["", "", "", "", "", "", "", "f", "", "r", "", ""]
    out = nb.alerted(daemon_rows(np.ones(12), is_anomaly, events))
    np.testing.assert_array_equal(out, [0, 0, 0, 1, 1, 0, 0, 1, 1, 1, 0, 0])
    rows = np.arange(24, dtype=float).reshape(12, 2)
    parts = nb.clean_segments(rows, out, keep=5)
    assert [p[:, 0].tolist() for p in parts] == [[4.0], [10.0, 12.0], [20.0, 22.0]], parts
    parts = nb.clean_segments(rows, out, keep=100)
    assert [len(p) for p in parts] == [3, 2, 2]
    assert nb.clean_segments(rows, np.ones(12, dtype=bool), keep=5) == []


def test_harness_learns_by_swapping_in_models_retrained_on_clean_rows(tmp_path):
    """One file, one member: a model retrained every 1000 rows on the rows so far that the
    daemon did not alert on, placed as a candidate (`anomalyd score --candidate`) that the daemon
    promotes or refuses after 200 rows in the shadow. A shadow as long as the retraining period is
    refused: each candidate would be replaced, undecided, by the next."""
    nab = nab_dir()
    name = "artificialWithAnomaly/art_daily_jumpsup.csv"
    opts = nb.NabOptions(nab_dir=str(nab), out=str(tmp_path), files=[name], ensemble=1, retrain_every=1000,
                         retrain_rows=800, shadow_rows=200, anomalyd=str(anomalyd_bin()), quiet=True)
    run = nb.run(opts)
    work = tmp_path / ".work" / "anomalyd-conv" / name.replace(".csv", "")
    retrained = sorted(work.glob("model-*.onnx"))
    rows = len(ns.read_columns(nab / "data" / name, ["timestamp"])["timestamp"])
    probation = ns.probation_rows(rows)
    assert len(retrained) == len(range(probation + 1000, rows, 1000)) >= 2
    for k, model in enumerate(retrained, 1):
        training = json.loads(export.metadata(str(model))["anomalyd.training"])
        assert training["train_windows"] + training["val_windows"] <= 800, training
    assert run.outcomes[0].promoted + run.outcomes[0].refused == len(retrained), "each candidate decided"
    assert run.results["standard"].per_file[name] > 0, "the jump is still found"
    with pytest.raises(ns.NabError, match="--shadow-rows"):
        nb.validate(dataclasses.replace(opts, shadow_rows=1000))

def test_harness_on_two_files(tmp_path):
    """Two members per file (~10 s): NAB's layout, labels from the windows, the ensemble and its
    probation calibration in the model, and the jump of art_daily_jumpsup found."""
    nab = nab_dir()
    opts = nb.NabOptions(nab_dir=str(nab), out=str(tmp_path), files=FILES, ensemble=2,
                         anomalyd=str(anomalyd_bin()), quiet=True)
    run = nb.run(opts)
    lines: list[str] = []
    nb.print_summary(run, opts, log=lambda *a, **k: lines.append(" ".join(map(str, a))))
    assert lines[-1].startswith("NAB standard=") and " low_fp=" in lines[-1] and " low_fn=" in lines[-1]

    windows = ns.load_windows(nab)
    for name in FILES:
        path = ns.result_path(tmp_path, "anomalyd-conv", name)
        cols = ns.read_columns(path, ["timestamp", "value", "anomaly_score", "label"])
        data = ns.read_columns(nab / "data" / name, ["timestamp", "value"])
        assert cols["timestamp"] == data["timestamp"] and cols["value"] == data["value"]
        score = np.array([float(v) for v in cols["anomaly_score"]])
        assert np.all((score >= 0) & (score <= 1))
        rows = ns.file_rows(name, ns.parse_times(data["timestamp"]), windows[name])
        np.testing.assert_array_equal(np.array(cols["label"], dtype=int), (rows.window >= 0).astype(int))

        model = tmp_path / ".work" / "anomalyd-conv" / name.replace(".csv", "") / "model.onnx"
        meta = export.metadata(str(model))
        assert json.loads(meta["anomalyd.training"])["ensemble"]["members"] == 2
        probation = ns.probation_rows(len(data["timestamp"]))
        assert json.loads(meta["anomalyd.calibration"])["count"] == probation - opts.window + 1

    assert run.results["standard"].tp >= 1
    jumps = run.results["standard"].per_file["artificialWithAnomaly/art_daily_jumpsup.csv"]
    assert jumps > 0, "the jump of art_daily_jumpsup should be detected inside its window"


def test_pca_trains_on_fewer_windows_than_dimensions(tmp_path):
    """A short probation: 200 rows of 8 features cut into windows of 16 rows (128 values) give
    at most 113 training windows, so fewer components than dimensions; fit used to index past
    them."""
    t = np.arange(200)[:, None]
    rows = np.sin(t / (3 + np.arange(8))) + 0.01 * np.random.default_rng(0).normal(size=(200, 8))
    names = [f"f{i}" for i in range(8)]
    data = tmp_path / "short.csv"
    np.savetxt(data, rows, delimiter=",", header=",".join(names), comments="")
    res = fit(FitOptions(kind="pca", data=str(data), features=names, out=str(tmp_path / "pca.onnx"),
                         window=16, quiet=True, plot=False))
    assert len(res.train) < 16 * 8
    assert 1 <= res.core.components.shape[1] <= len(res.train)
