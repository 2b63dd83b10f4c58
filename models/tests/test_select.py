"""`anomalyd-train select`: the injector, the AUCs, the rule, and what the selection measures on
data whose structure is known (linear: PCA's ground; curved: an autoencoder's)."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest

from anomalyd_train import contract, export, inject, selection, synth
from anomalyd_train.data import DataError
from anomalyd_train.selection import Candidate, SelectOptions, choose, grid

from conftest import anomalyd_bin

# Margins measured over seeds 0-5 (models/README.md, "Choosing a model"): on linear structure the
# best autoencoder's ROC AUC exceeds PCA's by at most LINEAR_MARGIN; on the curved manifold it
# beats PCA's by at least CURVED_MARGIN.
LINEAR_MARGIN = 0.02
CURVED_MARGIN = 0.05
FACTOR_FEATURES = [f"f{i}" for i in range(8)]


def test_injector_is_seeded_and_changes_only_what_it_labels():
    parts = list(synth.sensors(1200, entities=3, seed=4))
    stacked = np.concatenate(parts)
    args = dict(spread=stacked.std(0), mean=stacked.mean(0), gap=16, season=60)
    a = inject.inject(parts, seed=1, **args)
    b = inject.inject(parts, seed=1, **args)
    c = inject.inject(parts, seed=2, **args)
    assert a.events == b.events and all(np.array_equal(x, y) for x, y in zip(a.series, b.series))
    assert a.events != c.events
    assert set(Counter(e.shape for e in a.events)) == set(inject.SHAPES)
    share = sum(lab.sum() for lab in a.labels) / sum(len(p) for p in parts)
    assert 0.1 <= share < 0.13, share
    for clean, dirty, lab in zip(parts, a.series, a.labels):
        changed = (clean != dirty).any(axis=1)
        assert not (changed & ~lab).any(), "a row changed that is not labelled"
        assert changed[lab].mean() > 0.9  # stuck values leave their first row as it was
    for e in a.events:
        assert e.rows == 1 if e.shape == "spike" else inject.SEGMENT_ROWS[0] <= e.rows <= inject.SEGMENT_ROWS[1]
        others = [o for o in a.events if o.series == e.series and o.start > e.start]
        assert all(o.start >= e.start + e.rows + 16 for o in others), "events closer than the gap"
    # Without a season, no phase shift.
    assert "phase_shift" not in {e.shape for e in inject.inject(parts, seed=1, **{**args, "season": None}).events}


def test_period_of_seasonal_data_and_none_for_noise_or_trend():
    # Within 3 %: a noisy sine's autocorrelation peaks broadly (phase shifts need a quarter of it).
    assert abs(inject.period(list(synth.sensors(1000, entities=4, seed=0))) - 60) <= 2
    assert abs(inject.period(list(synth.fleet(4, 1500, seed=0))) - 288) <= 8
    rng = np.random.default_rng(0)
    assert inject.period([rng.standard_normal((2000, 3))]) is None
    assert inject.period([np.cumsum(rng.standard_normal((2000, 3)), axis=0)]) is None


def test_auc_and_average_precision_match_their_definitions():
    rng = np.random.default_rng(3)
    scores = np.round(rng.standard_normal(400), 1)  # ties
    labels = rng.random(400) < 0.2
    scores[labels] += 0.8
    pos, neg = scores[labels][:, None], scores[~labels][None, :]
    assert synth.auc(scores, labels) == pytest.approx(((pos > neg) + 0.5 * (pos == neg)).mean())
    # Weights count samples that many times.
    w = rng.integers(0, 3, 400)
    rep = np.repeat(np.arange(400), w)
    assert synth.auc(scores, labels, w) == pytest.approx(synth.auc(scores[rep], labels[rep]))
    # Average precision: precision at each distinct threshold, weighted by the recall it adds.
    ap = 0.0
    for t in np.unique(scores)[::-1]:
        at = scores == t
        flagged = scores >= t
        ap += (labels & at).sum() / labels.sum() * (labels & flagged).sum() / flagged.sum()
    assert synth.average_precision(scores, labels) == pytest.approx(ap)
    assert synth.average_precision(np.arange(10.0), np.arange(10) >= 7) == 1.0


def test_rule_takes_the_simplest_within_one_standard_error():
    def cand(kind, latent, auc, se, params, mse=0.1):
        return Candidate(kind, 1, latent, "ok", params, mse, auc, se, 0.5)

    best = cand("dense", 8, 0.90, 0.02, 900)
    near = cand("pca", 2, 0.885, 0.01, 24)
    far = cand("pca", 1, 0.85, 0.01, 16)
    assert choose([best, near, far]) is near  # within 0.02 of the best, and fewer numbers
    assert choose([cand("dense", 8, 0.90, 0.005, 900), near, far]).latent == 8  # 0.015 is beyond 1 s.e.
    tie = cand("dense", 2, 0.885, 0.01, 24, mse=0.05)
    assert choose([best, near, tie]) is tie  # same size: the lower reconstruction error
    failed = Candidate("lstm", 16, 4, "failed: too little data")
    assert choose([failed, far]) is far
    with pytest.raises(DataError, match="no candidate could be trained"):
        choose([failed])


def test_grid_stops_at_the_input_width_and_runs_cheapest_first():
    g = grid(["lstm", "pca", "dense"], [1, 2, 4, 8, 16], [4], features=2)
    names = [c.name for c in g]
    assert names[:2] == ["pca latent 1", "dense latent 1"], names  # pca: D - 1 = 1 component at most
    assert "dense latent 2" in names and "dense latent 4" not in names  # D = 2: the identity, no wider
    assert [c.latent for c in g if c.kind == "lstm"] == [1, 2]  # a code per row: D = 2 features
    one = grid(["lstm"], [1, 2, 4, 8, 16], [4], features=1)
    assert [c.latent for c in one] == [1, 2, 4]  # one feature, a code per window: D = 4 x 1
    with pytest.raises(DataError, match="unknown kind"):
        grid(["dense", "transformer"], [1], [16], features=2)


def _select(tmp_path, x: np.ndarray, name: str, **kw) -> selection.Selection:
    path = tmp_path / f"{name}.csv"
    synth.write_series_csv(str(path), x[None], FACTOR_FEATURES, key=None)
    opts = SelectOptions(data=str(path), features=FACTOR_FEATURES, out=str(tmp_path / name), kinds=["pca", "dense"],
                         latents=[1, 2, 4, 8], quiet=True, **kw)
    return selection.select(opts)


def _best(s: selection.Selection, kinds) -> Candidate:
    return max((c for c in s.candidates if c.kind in kinds and c.status == "ok"), key=lambda c: c.roc_auc)


@pytest.fixture(scope="module")
def linear(tmp_path_factory):
    return _select(tmp_path_factory.mktemp("linear"), synth.factors(3000, seed=0), "linear")


@pytest.fixture(scope="module")
def curved(tmp_path_factory):
    return _select(tmp_path_factory.mktemp("curved"), synth.factors(3000, curved=True, seed=0), "curved")


def test_on_linear_structure_pca_is_as_good_as_the_best_autoencoder(linear):
    pca, ae = _best(linear, ["pca"]), _best(linear, ["dense"])
    assert ae.roc_auc - pca.roc_auc <= LINEAR_MARGIN, (pca, ae)
    assert linear.chosen.kind == "pca", linear.chosen  # as good, and far fewer numbers


def test_on_curved_structure_the_autoencoder_beats_pca_clearly(curved):
    pca, ae = _best(curved, ["pca"]), _best(curved, ["dense"])
    assert ae.roc_auc - pca.roc_auc >= CURVED_MARGIN, (pca, ae)
    assert curved.chosen.kind == "dense", curved.chosen


@pytest.mark.parametrize("data", ["linear", "curved"])
def test_the_identity_loses_on_injected_anomalies_though_it_reconstructs_best(data, request):
    s = request.getfixturevalue(data)
    identity = next(c for c in s.candidates if c.kind == "dense" and c.latent == len(FACTOR_FEATURES))
    chosen = s.chosen
    assert identity.val_mse == min(c.val_mse for c in s.candidates if c.status == "ok")
    assert identity.roc_auc < chosen.roc_auc - chosen.roc_auc_se, (identity, chosen)
    assert chosen is not identity


def test_the_chosen_model_follows_the_contract_and_carries_its_evidence(curved):
    assert contract.check(curved.model) == []
    meta = export.metadata(curved.model)
    sel = json.loads(meta["anomalyd.selection"])
    assert sel["chosen"] == curved.chosen.name
    assert len(sel["candidates"]) == len(curved.candidates) == 7
    assert sel["injected"]["season_rows"] is None  # independent rows: no season, no phase shifts
    assert set(sel["injected"]["events"]) == {"spike", "level_shift", "stuck", "correlation"}
    training = json.loads(meta["anomalyd.training"])
    assert training["architecture"]["latent"] == curved.chosen.latent
    assert training["train_windows"] + training["val_windows"] == 3000  # refitted on all the rows
    with open(curved.table) as f:
        rows = list(csv.DictReader(f))
    assert [r["chosen"] for r in rows].count("1") == 1 and len(rows) == 7


def test_cli_selects_over_sequence_kinds_within_a_budget(tmp_path):
    """The command end to end on keyed, seasonal data with a sequence kind; a budget spent after
    the first candidate skips the rest, and the daemon loads what it writes."""
    data = tmp_path / "sensors.csv"
    cols, rows = synth.sensors_table(3000, 3, 0.0, seed=2)
    synth.write_csv(str(data), cols, rows)
    out = tmp_path / "sel"
    common = [sys.executable, "-m", "anomalyd_train.cli", "select", "--data", str(data), "--key", "entity",
              "--features", ",".join(synth.SENSOR_FEATURES), "--latent", "1,2", "--window", "8", "--epochs", "3",
              "--quiet"]
    p = subprocess.run(common + ["--kinds", "pca,dense,conv", "--out", str(out)], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    line = p.stdout.strip().splitlines()[-1]
    assert line.startswith("selected ") and str(out / "model.onnx") in line, line
    for f in ("model.onnx", "model.loss.png", "candidates.csv", "selection.png"):
        assert (out / f).stat().st_size > 0, f
    sel = json.loads(export.metadata(str(out / "model.onnx"))["anomalyd.selection"])
    assert abs(sel["injected"]["season_rows"] - 60) <= 2
    assert "phase_shift" in sel["injected"]["events"]
    assert [c["status"] for c in sel["candidates"]] == ["ok"] * 6
    inspect = subprocess.run([str(anomalyd_bin()), "inspect", str(out / "model.onnx")], capture_output=True, text=True)
    assert inspect.returncode == 0, inspect.stderr

    p = subprocess.run(common + ["--kinds", "dense,conv", "--budget", "0.001s", "--out", str(tmp_path / "b")],
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert "(3 not run)" in p.stdout
    with open(tmp_path / "b" / "candidates.csv") as f:
        status = [r["status"] for r in csv.DictReader(f)]
    assert status[0] == "ok" and all(s.startswith("skipped: --budget") for s in status[1:]), status


def test_too_little_held_back_data_is_refused_clearly(tmp_path):
    with pytest.raises(DataError, match="too short to inject anomalies"):
        _select(tmp_path, synth.factors(120, seed=1), "short")


def test_baseline_lets_a_drifting_feature_through_selection(tmp_path):
    """A feature that drifts out of its training range over the held-back part: without
    --baseline every candidate rebuilds the held-back rows badly; with it, they are judged as the
    daemon would feed them (each key's level carried on from its training rows), and the winner
    says so in its metadata."""
    x = synth.factors(2000, seed=1)
    x[:, 0] += np.linspace(0, 15, len(x)) * x[:, 0].std()  # a slow drift, 15 spreads over the run
    plain = _select(tmp_path, x, "plain")
    level = _select(tmp_path, x, "level", baseline=[FACTOR_FEATURES[0]])
    # The autoencoders' codes are bounded to their training range (PCA's linear map follows a
    # linear drift either way).
    before, after = (min(c.val_mse for c in s.candidates if c.kind == "dense") for s in (plain, level))
    print(f"held-back error of the best dense candidate: plain {before:.4g}, baseline {after:.4g}")
    assert after < before / 5, (plain.candidates, level.candidates)
    meta = export.metadata(level.model)
    assert json.loads(meta["anomalyd.baseline"])["features"] == [FACTOR_FEATURES[0]]
