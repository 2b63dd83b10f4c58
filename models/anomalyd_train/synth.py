"""Synthetic datasets for tests and examples, all seeded.

- `sensors`: entities with four correlated sensors driven by one latent load (a cycle plus noise);
  values are O(1..30) so raw-unit comparisons stay meaningful in float32.
- `perturb`: injects anomalies into the last rows of windows (spike, level shift, broken
  correlation), the "easy case" of the detection tests.
- `blobs`: image-shaped records (a Gaussian blob, its second channel a dimmer copy).
- `noisy_series`: a clean quasi-periodic signal and a noisy copy (the denoising test).
- `machine`: one run of a machine whose temperatures drift with the ambient, normal for its
  first rows, then labelled faults of five shapes (issue 17; `machines.py` holds the generator
  and the benchmark that scores the defaults on it).
"""

from __future__ import annotations

import csv
import json

import numpy as np

SENSOR_FEATURES = ["temp", "pressure", "flow", "power"]
PERIOD = 60


def sensors(rows: int, entities: int = 1, seed: int = 0, start: int = 0) -> np.ndarray:
    """[entities, rows, 4] of normal data. `start` offsets time, for held-out continuations
    (same seed, same entities)."""
    rng = np.random.default_rng(seed)
    phase = rng.uniform(0, 2 * np.pi, entities)[:, None]
    scale = rng.uniform(0.8, 1.2, entities)[:, None]
    noise = np.random.default_rng(seed + 1000 + start)
    t = np.arange(start, start + rows)[None, :]
    load = 0.5 + 0.35 * np.sin(2 * np.pi * t / PERIOD + phase) + 0.03 * noise.standard_normal((entities, rows))
    n = lambda: noise.standard_normal((entities, rows))  # noqa: E731
    temp = 20 + 10 * load + 0.3 * n()
    pressure = 2 + 3 * load**2 + 0.1 * n()
    flow = scale * (5 + 10 * load) + 0.3 * n()
    power = 0.5 * flow + 2 * load + 0.3 * n()
    return np.stack([temp, pressure, flow, power], axis=-1)


def windows(series: np.ndarray, window: int) -> np.ndarray:
    """All sliding windows of every entity: [entities, rows, F] -> [n, window, F]."""
    w = np.lib.stride_tricks.sliding_window_view(series, window, axis=1)  # [E, n, F, T]
    return np.ascontiguousarray(np.moveaxis(w, -1, 2).reshape(-1, window, series.shape[-1]))


def perturb(x: np.ndarray, seed: int, frac: float = 0.5, magnitude: float = 5.0):
    """Returns (x', labels): a share `frac` of the windows [n, T, F] get an anomaly in their last
    max(1, T // 2) rows: a spike or level shift of `magnitude` feature standard deviations on one
    feature, or one feature's values mirrored around its mean (a broken correlation)."""
    rng = np.random.default_rng(seed)
    x = x.copy()
    n, t, f = x.shape
    mean, std = x.reshape(-1, f).mean(0), x.reshape(-1, f).std(0)
    labels = rng.random(n) < frac
    span = max(1, t // 2)
    for i in np.flatnonzero(labels):
        j = rng.integers(f)
        kind = rng.integers(3)
        rows = slice(t - span, t)
        if kind == 0:
            x[i, -1, j] += rng.choice([-1, 1]) * magnitude * std[j]
        elif kind == 1:
            x[i, rows, j] += rng.choice([-1, 1]) * magnitude * std[j]
        else:
            x[i, rows, j] = 2 * mean[j] - x[i, rows, j] + rng.choice([-1, 1]) * 2 * std[j]
    return x, labels


def sensors_table(rows: int, entities: int, anomalies: float, seed: int):
    """A CSV-ready table: entity, t, the four sensors, and `anomaly` (0/1) when anomalies > 0.
    Anomalies are 5-row segments (level shift of 5 std, or a feature mirrored)."""
    per = max(1, rows // entities)
    data = sensors(per, entities, seed)
    labels = np.zeros(data.shape[:2], dtype=int)
    if anomalies > 0:
        rng = np.random.default_rng(seed + 7)
        std = data.reshape(-1, 4).std(0)
        mean = data.reshape(-1, 4).mean(0)
        segments = int(anomalies * entities * per / 5)
        for _ in range(segments):
            e, s, j = rng.integers(entities), rng.integers(0, per - 5), rng.integers(4)
            if rng.random() < 0.5:
                data[e, s : s + 5, j] += rng.choice([-1, 1]) * 5 * std[j]
            else:
                data[e, s : s + 5, j] = 2 * mean[j] - data[e, s : s + 5, j]
            labels[e, s : s + 5] = 1
    cols = ["entity", "t", *SENSOR_FEATURES] + (["anomaly"] if anomalies > 0 else [])
    out = []
    for t in range(per):  # interleaved by time, as a stream would deliver them
        for e in range(entities):
            row = [f"e{e:02d}", t, *[round(float(v), 4) for v in data[e, t]]]
            if anomalies > 0:
                row.append(int(labels[e, t]))
            out.append(row)
    return cols, out


def write_csv(path: str, cols: list[str], rows) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(cols)
        w.writerows(rows)


def write_series_csv(path: str, series: np.ndarray, features: list[str], key: str | None = "entity") -> None:
    """[entities, rows, F] -> CSV interleaved by time (with a key column unless key is None)."""
    e, n, _ = series.shape
    cols = ([key] if key else []) + features
    rows = []
    for t in range(n):
        for i in range(e):
            rows.append(([f"e{i:02d}"] if key else []) + [repr(float(v)) for v in series[i, t]])
    write_csv(path, cols, rows)


def blobs(n: int, seed: int, shape=(2, 12, 12)) -> np.ndarray:
    """[n, C, H, W]: a Gaussian blob of random position and width; channel c is a copy scaled by
    1 / (c + 1), plus a little noise."""
    rng = np.random.default_rng(seed)
    c, h, w = shape
    yy, xx = np.mgrid[0:h, 0:w]
    cy = rng.uniform(3, h - 3, n)[:, None, None]
    cx = rng.uniform(3, w - 3, n)[:, None, None]
    s = rng.uniform(1.5, 2.5, n)[:, None, None]
    blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * s**2))
    img = np.stack([blob / (k + 1) for k in range(c)], axis=1)
    return img + 0.02 * rng.standard_normal(img.shape)


def perturb_images(x: np.ndarray, seed: int, frac: float = 0.5):
    """A bright 3x3 square at a random place in one channel of a share `frac` of the images."""
    rng = np.random.default_rng(seed)
    x = x.copy()
    n, c, h, w = x.shape
    labels = rng.random(n) < frac
    for i in np.flatnonzero(labels):
        y, z, ch = rng.integers(0, h - 3), rng.integers(0, w - 3), rng.integers(c)
        x[i, ch, y : y + 3, z : z + 3] += 1.0
    return x, labels


def write_images_ndjson(path: str, images: np.ndarray, channels: list[str]) -> None:
    with open(path, "w") as f:
        for img in images:
            f.write(json.dumps({name: np.round(img[k], 5).tolist() for k, name in enumerate(channels)}) + "\n")


def noisy_series(rows: int, seed: int, noise_std: float = 0.3, start: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(clean, noisy), each [rows] from time `start`: two sines (periods 40 and 13 rows) with a
    slowly drifting amplitude, plus white Gaussian noise of `noise_std`."""
    rng = np.random.default_rng(seed)
    t = np.arange(start, start + rows)
    amp = 1.0 + 0.3 * np.sin(2 * np.pi * t / 997)
    clean = amp * np.sin(2 * np.pi * t / 40) + 0.5 * np.sin(2 * np.pi * t / 13 + 1.0)
    return clean, clean + noise_std * rng.standard_normal(rows)


def auc(scores: np.ndarray, labels: np.ndarray, weights: np.ndarray | None = None) -> float:
    """ROC AUC by the rank-sum (Mann-Whitney U) formula, ties counted half; `weights` count each
    sample that many times (a bootstrap replicate)."""
    scores, labels = np.asarray(scores, float), np.asarray(labels, bool)
    w = np.ones(len(scores)) if weights is None else np.asarray(weights, float)
    _, group = np.unique(scores, return_inverse=True)
    pos = np.bincount(group, weights=w * labels)
    neg = np.bincount(group, weights=w * ~labels)
    if pos.sum() == 0 or neg.sum() == 0:
        raise ValueError("AUC needs both anomalous and normal samples")
    below = np.cumsum(neg) - neg  # negatives scoring strictly lower than each distinct score
    return float((pos * (below + neg / 2)).sum() / (pos.sum() * neg.sum()))


def average_precision(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the precision-recall curve as average precision: the precision at each distinct
    score threshold, from the highest down, weighted by the recall it adds."""
    scores, labels = np.asarray(scores, float), np.asarray(labels, bool)
    if not labels.any():
        raise ValueError("average precision needs anomalous samples")
    _, group = np.unique(-scores, return_inverse=True)  # group 0: the highest score
    tp = np.cumsum(np.bincount(group, weights=labels.astype(float)))
    seen = np.cumsum(np.bincount(group))
    recall_added = np.diff(tp, prepend=0.0) / tp[-1]
    return float((recall_added * tp / seen).sum())


def factors(rows: int, features: int = 8, factors: int = 2, curved: bool = False, noise: float = 0.1,
            seed: int = 0) -> np.ndarray:
    """[rows, features] of independent rows driven by a few hidden factors z ~ N(0, 1): a random
    linear map of them (linear structure: PCA's home ground), or with `curved` each feature a
    sine of its own random combination of them (a curved manifold: a linear projection of any
    size misses it), plus Gaussian noise of `noise`. The `select` tests' two kinds of data."""
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((rows, factors))
    a = rng.standard_normal((factors, features))
    if curved:
        x = np.sin(1.5 * z @ a + rng.uniform(0, 2 * np.pi, features))
    else:
        x = z @ a / np.sqrt(factors)
    return x + noise * rng.standard_normal((rows, features))


FLEET_FEATURES = ["cpu_pct", "requests_per_s", "latency_ms", "net_out_mbps"]
FLEET_INCIDENTS = ("spike", "level_shift", "stuck_sensor", "broken_correlation")


def fleet(hosts: int, ticks: int, seed: int, start: int = 0) -> np.ndarray:
    """[hosts, ticks, 4]: the same model of a fleet as `anomalyd demo` (src/demo/stream.rs),
    normal data only: load l = 0.55 + 0.35 sin(2 pi t / 288 + phase) + 0.03 N, cpu = 8 + 75 l,
    requests = s (50 + 450 l), latency = 25 + 40 l^2, net = 0.1 requests (plus noise)."""
    rng = np.random.default_rng(seed)
    phase = rng.uniform(0, 0.6, hosts)[:, None]
    scale = rng.uniform(0.7, 1.3, hosts)[:, None]
    noise = np.random.default_rng(seed + 1000 + start)
    n = lambda: noise.standard_normal((hosts, ticks))  # noqa: E731
    t = np.arange(start, start + ticks)[None, :]
    load = 0.55 + 0.35 * np.sin(2 * np.pi * t / 288 + phase) + 0.03 * n()
    requests = scale * (50 + 450 * load)
    return np.stack(
        [8 + 75 * load + 1.5 * n(), requests + 8 * n(), 25 + 40 * load**2 + 1.5 * n(), 0.1 * requests + 2 * n()],
        axis=-1,
    )


def fleet_incident(rows: np.ndarray, kind: str) -> np.ndarray:
    """Applies one of the demo's incidents to consecutive rows [n, 4] of one host (as the demo
    does: latency x4, cpu +25, requests stuck at the first row's value, requests and net x0.2)."""
    rows = rows.copy()
    if kind == "spike":
        rows[:, 2] *= 4.0
    elif kind == "level_shift":
        rows[:, 0] += 25.0
    elif kind == "stuck_sensor":
        rows[:, 1] = rows[0, 1]
    elif kind == "broken_correlation":
        rows[:, 1] *= 0.2
        rows[:, 3] *= 0.2
    else:
        raise ValueError(f"unknown incident {kind!r}")
    return rows


def machine(rows: int, seed: int, train_rows: int = 400):
    """A drifting machine's run with labelled faults (`machines.Run`: values, labels, faults)."""
    from .machines import run

    return run(rows, seed, train_rows)
