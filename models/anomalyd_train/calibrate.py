"""Calibration: the summary of held-back validation scores written into the model
(`anomalyd.calibration`), which the daemon replays to warm-start every entity's threshold.

score = mean over features of the `error` output, exactly as the daemon computes it.
"""

from __future__ import annotations

import numpy as np

QUANTILES = ("0.5", "0.9", "0.95", "0.99", "0.999")
MAX_SAMPLE = 2000
# Fewer held-back scores than this cannot place a 0.999 quantile (their max is the estimate): fit
# then adds out-of-fold scores, and warns if there are still fewer.
SMALL_CALIBRATION = 1000


def _r(x: float) -> float:
    """Six significant digits keep the metadata small and stable."""
    return float(f"{float(x):.6g}")


def scores(error: np.ndarray) -> np.ndarray:
    """Per-sample score from the `error` output [n, F]."""
    return error.astype(np.float64).mean(axis=1)


def summarise(error: np.ndarray, max_sample: int = MAX_SAMPLE) -> dict:
    """`error` is the model's `error` output on the validation windows, [n, F].

    `sample` holds all scores when there are at most `max_sample`, else `max_sample` evenly spaced
    order statistics (always including the minimum and the maximum): a deterministic, uniform
    subsample of the distribution, sorted ascending.
    """
    if error.ndim != 2 or error.shape[0] == 0:
        raise ValueError(f"calibration needs a non-empty [n, F] error array, got shape {error.shape}")
    s = np.sort(scores(error))
    n = len(s)
    if n > max_sample:
        idx = np.round(np.linspace(0, n - 1, max_sample)).astype(int)
        sample = s[idx]
    else:
        sample = s
    return {
        "count": int(n),
        "mean": _r(s.mean()),
        "std": _r(s.std()),
        "quantiles": {q: _r(np.quantile(s, float(q))) for q in QUANTILES},
        "sample": [_r(v) for v in sample],
        "feature_mean": [_r(v) for v in error.astype(np.float64).mean(axis=0)],
    }
