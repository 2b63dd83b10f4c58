"""The project's NAB scorer: small hand-computed cases, and the validation against the published
scores of two detectors (numenta, randomCutForest) in `../shared/nab/results/final_results.json`."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest

from anomalyd_train import nab_score as ns

REPO = Path(__file__).resolve().parents[2]
NAB = REPO.parent / "shared" / "nab"


def nab_dir() -> Path:
    if not (NAB / "labels" / "combined_windows.json").is_file():
        pytest.skip(f"NAB data not found at {NAB} (a NAB checkout beside the repository)")
    return NAB


def times(n: int) -> np.ndarray:
    return np.datetime64("2020-01-01T00:00:00", "us") + np.arange(n) * np.timedelta64(5, "m")


def text(t: np.datetime64) -> str:
    return str(t).replace("T", " ")  # datetime64[us] prints its .000000


def test_scaled_sigmoid_matches_nab():
    assert ns.scaled_sigmoid(0.0) == pytest.approx(0.0)
    assert ns.scaled_sigmoid(-1.0) == pytest.approx(2 / (1 + np.exp(-5)) - 1)
    assert ns.scaled_sigmoid(3.5) == -1.0
    assert ns.probation_rows(1000) == 150
    assert ns.probation_rows(22695) == 750


def test_weights_around_a_window():
    t = times(100)
    fr = ns.file_rows("c/f.csv", t, [(text(t[40]), text(t[49]))])
    assert fr.probation == 15
    assert np.all(fr.unweighted[:40] == -1.0)
    # Left edge earns the full tpWeight, the right edge a little.
    assert fr.unweighted[40] == pytest.approx(1.0)
    assert 0 < fr.unweighted[49] < 0.3
    assert np.all(np.diff(fr.unweighted[40:50]) < 0)
    # Just past the window a false positive is cheap, far past it costs the full fpWeight.
    assert -0.6 < fr.unweighted[50] < 0
    assert fr.unweighted[99] == pytest.approx(-1.0, abs=1e-6)
    assert list(fr.window[39:51]) == [-1] + [0] * 10 + [-1]


def test_sweep_picks_the_best_threshold_and_ties_switch_together():
    t = times(100)
    fr = ns.file_rows("c/f.csv", t, [(text(t[40]), text(t[49]))])
    s = np.zeros(100)
    s[42] = 0.9  # a hit near the left edge
    s[70] = 0.9  # a false positive tied with it: both switch on together
    s[80] = 0.95  # a false positive above it
    s[5] = 1.0  # probationary: counts for nothing
    r = ns.sweep([fr], [s], "standard", ns.PROFILES["standard"])
    w = fr.weights(ns.PROFILES["standard"])
    expect = w[42] + w[70] + w[80]
    assert r.threshold == 0.9
    assert r.raw == pytest.approx(expect)
    assert (r.tp, r.fn, r.fp) == (1, 0, 2)
    assert r.normalised == pytest.approx(100 * (expect + 1) / 2)
    # With the fpWeight doubled and a lower fnWeight nothing beats never detecting.
    r = ns.sweep([fr], [s], "x", {"tpWeight": 1.0, "fpWeight": 10.0, "fnWeight": 0.1})
    assert r.threshold == float("inf") and r.normalised == 0.0


@pytest.mark.parametrize("detector", ["numenta", "randomCutForest"])
def test_scorer_reproduces_the_published_scores(detector):
    nab = nab_dir()
    published = json.loads((nab / "results" / "final_results.json").read_text())[detector]
    started = time.perf_counter()
    results = ns.score_detector(nab, nab / "results", detector)
    seconds = time.perf_counter() - started
    for profile, r in results.items():
        assert r.normalised == pytest.approx(published[profile], abs=0.1), (detector, profile, r.normalised)
    print(f"scoring {detector}'s published results took {seconds:.1f} s")  # a figure, not a test: shared machines are noisy
    line = ns.summary_line(results)
    assert line.startswith("NAB standard=")
