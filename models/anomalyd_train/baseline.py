"""Baseline: a slow per-key level subtracted from drifting features before the model sees them
(the model contract's `anomalyd.baseline`, docs/MODEL-CONTRACT.md).

A temperature that follows the ambient drifts further from the training rows every day: its
absolute value soon lies many training standard deviations out, and a model fed that value flags
normal rows. Fed the value's distance from the key's own recent level instead, the model sees
what stays stationary: how the channel moves against its level, and a fault (a step, a spike, a
ramp faster than any drift) still stands out.

For each listed feature and each key, in record order, with `n` the key's records before this one:

    r = x - b                                  (0 for the key's first record, where b = x)
    b = b + max(alpha, 1/(n+1)) * clamp(r, -clip, +clip)

`alpha = 1 - 2^(-1/half_life)`. Early on `b` is the running mean of the key's values; after
`half_life` records weigh half. `clip` bounds how far one record moves the level, so a fault
(a step of many clips) pulls it by at most `alpha * clip` per record and keeps standing out for
its whole length, and the level does not lag a fault's end either; a drift, by definition small
per record, is followed fully. The daemon computes exactly this (src/baseline.rs), in float64.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# How many standard deviations of the unclipped residual a record may move the level by.
CLIP_STDS = 2.0
DEFAULT_HALF_LIFE = 50.0


@dataclass(frozen=True)
class Baseline:
    features: list[str]
    half_life: float
    clip: list[float]

    @property
    def alpha(self) -> float:
        return 1.0 - 2.0 ** (-1.0 / self.half_life)

    def metadata(self) -> dict:
        return {"features": list(self.features), "half_life": self.half_life,
                "clip": [float(f"{c:.6g}") for c in self.clip]}

    @staticmethod
    def from_metadata(meta: dict) -> "Baseline":
        return Baseline(list(meta["features"]), float(meta["half_life"]), [float(c) for c in meta["clip"]])

    def apply(self, series: np.ndarray, names: list[str]) -> np.ndarray:
        """One key's rows [N, F] in record order, with the listed features made relative."""
        out = np.array(series, dtype=np.float64, copy=True)
        for name, clip in zip(self.features, self.clip):
            j = names.index(name)
            out[:, j] = relative(out[:, j], self.alpha, clip)
        return out


def relative(x: np.ndarray, alpha: float, clip: float | None) -> np.ndarray:
    """`x - b` for one key's values, `b` the clipped exponentially weighted level (module doc)."""
    out = np.empty(len(x), dtype=np.float64)
    b = 0.0
    for n, v in enumerate(np.asarray(x, dtype=np.float64)):
        if n == 0:
            b = v
            out[0] = 0.0
            continue
        r = v - b
        out[n] = r
        step = r if clip is None else min(max(r, -clip), clip)
        b += max(alpha, 1.0 / (n + 1)) * step
    return out


def fit(series: list[np.ndarray], names: list[str], features: list[str],
        half_life: float = DEFAULT_HALF_LIFE) -> Baseline:
    """The baseline of `features` for these training series: each clip is `CLIP_STDS` standard
    deviations of the feature's unclipped residual, pooled over the keys."""
    from .data import DataError

    if half_life < 1:
        raise DataError(f"--baseline-half-life must be at least 1 record, got {half_life}")
    alpha = 1.0 - 2.0 ** (-1.0 / half_life)
    clips = []
    for name in features:
        if name not in names:
            raise DataError(f"--baseline names {name!r}, which is not one of --features ({', '.join(names)})")
        if features.count(name) > 1:
            raise DataError(f"--baseline names {name!r} twice")
        j = names.index(name)
        residual = np.concatenate([relative(s[:, j], alpha, None)[1:] for s in series if len(s) > 1])
        spread = float(residual.std()) if len(residual) else 0.0
        # A constant feature still gets a positive clip: the level then moves by at most a
        # millionth of the value per record, as good as not at all.
        scale = float(np.abs(np.concatenate([s[:, j] for s in series])).max(initial=0.0))
        clips.append(max(CLIP_STDS * spread, 1e-6 * max(scale, 1.0)))
    return Baseline(list(features), float(half_life), clips)
