"""Anomalies injected into held-back normal data, so that `select` can measure how well a
candidate model *detects*, not only how well it reconstructs.

Five shapes, each on one feature `j` of one series, over a segment of rows. Sizes are relative to
that feature's spread `s_j` (its standard deviation in the training part), so one setting fits
every unit and scale:

| shape         | rows    | what happens to feature j                                              |
|---------------|---------|------------------------------------------------------------------------|
| `spike`       | 1       | + or - `magnitude` x s_j                                               |
| `level_shift` | 8 to 24 | + or - `magnitude` / 2 x s_j, for the whole segment                    |
| `stuck`       | 8 to 24 | held at its value in the segment's first row (a frozen sensor)         |
| `correlation` | 8 to 24 | mirrored about its training mean (2 m_j - x): its range is unchanged,  |
|               |         | its relation to the other features is broken                           |
| `phase_shift` | 8 to 24 | its values a quarter of the data's period later: its own seasonal      |
|               |         | shape, out of step with the other features                             |

`phase_shift` needs a period, found in the training part by `period` (autocorrelation peaks).
Data with no such seasonality gets the other four shapes only.

Segments are spread at random over every series, at least `gap` rows apart and `gap` rows from a
series' start, until `share` of the rows are labelled, and the shapes take turns (a seeded
shuffle of the list, repeated), so each is about equally frequent. Everything is seeded: the
same data, seed and settings inject the same anomalies.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SHAPES = ("spike", "level_shift", "stuck", "correlation", "phase_shift")
SEGMENT_ROWS = (8, 24)
MIN_PERIOD_PEAK = 0.3


@dataclass
class Event:
    series: int
    start: int
    rows: int
    shape: str
    feature: int


@dataclass
class Injected:
    series: list[np.ndarray]  # each [rows, F], the anomalies applied
    labels: list[np.ndarray]  # each [rows] bool: the rows of an event
    events: list[Event]


def period(parts: list[np.ndarray], most: int = 2000) -> int | None:
    """The dominant seasonal period of the series, in rows: the first lag (2 or more) where the
    autocorrelation, averaged over the series, of any feature peaks within 90 % of its highest
    peak; None when no peak reaches 0.3 and rises 0.2 above the lowest value before it (a slow
    trend's autocorrelation is high at every lag, without peaks)."""
    lags = min(most, max(len(p) for p in parts) // 2)  # two cycles are enough to see one
    acf, count = np.zeros((lags, parts[0].shape[1])), 0
    for p in parts:
        if len(p) < 2 * lags or lags < 4:
            continue
        x = p - p.mean(0)
        spectrum = np.fft.rfft(x, n=2 * len(x), axis=0)
        r = np.fft.irfft(spectrum * np.conj(spectrum), axis=0)[:lags]
        r /= (len(x) - np.arange(lags))[:, None]  # the mean product at each lag: no bias to short lags
        acf += r / np.where(r[0] > 0, r[0], 1.0)
        count += 1
    if count == 0:
        return None
    acf /= count
    peaks = {}  # lag -> height, of the peaks high and prominent enough
    for k in range(2, lags - 1):
        for j in range(acf.shape[1]):
            a = acf[k, j]
            if a >= acf[k - 1, j] and a >= acf[k + 1, j] and a >= MIN_PERIOD_PEAK and a - acf[1:k, j].min() >= 0.2:
                peaks[k] = max(a, peaks.get(k, a))
    if not peaks:
        return None
    # A period's multiples peak about as high as the period itself: the first of the highest.
    top = max(peaks.values())
    return min(k for k, a in peaks.items() if a >= 0.9 * top)


def inject(
    parts: list[np.ndarray],
    spread: np.ndarray,
    mean: np.ndarray,
    seed: int,
    share: float = 0.1,
    magnitude: float = 4.0,
    gap: int = 16,
    season: int | None = None,
) -> Injected:
    """Copies of `parts` ([rows, F] each) with anomalies injected (see the module's doc).
    `spread` and `mean` are the per-feature standard deviation and mean of the training data;
    `season` the period for `phase_shift` (None: that shape is left out)."""
    rng = np.random.default_rng(seed)
    shapes = [s for s in SHAPES if s != "phase_shift" or season]
    features = parts[0].shape[1]
    out = [p.astype(np.float64, copy=True) for p in parts]
    labels = [np.zeros(len(p), bool) for p in parts]
    target = share * sum(len(p) for p in parts)
    events: list[Event] = []
    turn: list[str] = []
    free = [np.ones(len(p), bool) for p in parts]  # rows an event may still start at
    for f in free:
        f[:gap] = False
    labelled, attempts = 0, 0
    while labelled < target and attempts < 10_000:
        attempts += 1
        if not turn:
            turn = [str(s) for s in rng.permutation(shapes)]
        shape = turn[-1]
        rows = 1 if shape == "spike" else int(rng.integers(SEGMENT_ROWS[0], SEGMENT_ROWS[1] + 1))
        i = int(rng.integers(len(parts)))
        n = len(parts[i])
        if n - rows - gap <= gap:
            continue
        start = int(rng.integers(gap, n - rows - gap))
        if not free[i][start : start + rows + gap].all():
            continue
        if shape == "phase_shift":  # a quarter period later, or earlier where the series ends too soon
            lag = max(1, season // 4)
            lag = lag if start + rows + lag <= n else -lag
            if start + lag < 0:
                continue
        turn.pop()
        j = int(rng.integers(features))
        seg = slice(start, start + rows)
        x = out[i]
        sign = 1.0 if rng.random() < 0.5 else -1.0
        if shape == "spike":
            x[seg, j] += sign * magnitude * spread[j]
        elif shape == "level_shift":
            x[seg, j] += sign * magnitude / 2 * spread[j]
        elif shape == "stuck":
            x[seg, j] = x[start, j]
        elif shape == "correlation":
            x[seg, j] = 2 * mean[j] - x[seg, j]
        else:
            x[seg, j] = parts[i][start + lag : start + rows + lag, j]
        labels[i][seg] = True
        free[i][max(0, start - gap) : start + rows + gap] = False
        labelled += rows
        events.append(Event(series=i, start=start, rows=rows, shape=shape, feature=j))
    return Injected(series=out, labels=labels, events=events)
