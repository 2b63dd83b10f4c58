"""Drifting machines: a labelled benchmark of the class where short training and slow sensor drift
cause false alarms (issue 17), and the harness that scores the defaults on it.

Each run is one machine: 8 channels driven by one load (a slow cycle, a faster one, noise), two of
them temperatures that follow the load through a thermal lag *and* an ambient that drifts (a
trend plus a random walk), so that later rows sit well outside the range of the first ones. The
first `train_rows` rows are normal and are all a model may learn from; the rest hold labelled
faults of several shapes between normal stretches:

- `leak`: pressure drops by a quarter while flow rises (a step that breaks their relation);
- `spike`: short bursts of vibration;
- `decoupled`: flow falls to 60 % while the power drawn stays (a broken relation, no level out
  of range);
- `overheat`: the bearing temperature climbs faster than any drift (a ramp in a drifting channel);
- `stuck`: the pressure sensor freezes at its last value.

`evaluate` trains each kind with its defaults on every run's training rows, the two temperatures
named as drifting (`--baseline`, which a user of such machines would know to do), streams the whole run
through `anomalyd score --model` (the daemon's own code), and counts, over the rows after
training: the share of normal rows flagged (`is_anomaly`), the share of fault rows missed, and
the point-wise F1, with the F1 of flagging every row beside it.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

CHANNELS = ["load_pct", "pressure", "flow", "power", "current", "vibration", "temp_motor", "temp_bearing"]
FAULTS = ("leak", "spike", "decoupled", "overheat", "stuck")


@dataclass
class Run:
    values: np.ndarray  # [rows, 8]
    labels: np.ndarray  # [rows] bool
    faults: list[tuple[str, int, int]]  # (kind, start, end)


def _lagged(x: np.ndarray, alpha: float) -> np.ndarray:
    out = np.empty_like(x)
    acc = x[0]
    for i, v in enumerate(x):
        acc += alpha * (v - acc)
        out[i] = acc
    return out


def run(rows: int, seed: int, train_rows: int = 400, fault_share: float = 0.35) -> Run:
    """One machine's run: `rows` rows, normal for the first `train_rows`, then faults covering
    about `fault_share` of the rest."""
    rng = np.random.default_rng(seed)
    t = np.arange(rows)
    n = lambda s: s * rng.standard_normal(rows)  # noqa: E731
    ar = np.zeros(rows)
    for i in range(1, rows):
        ar[i] = 0.9 * ar[i - 1] + 0.02 * rng.standard_normal()
    load = (0.6 + 0.2 * np.sin(2 * np.pi * t / rng.uniform(80, 120) + rng.uniform(0, 6.3))
            + 0.08 * np.sin(2 * np.pi * t / rng.uniform(15, 25) + rng.uniform(0, 6.3)) + ar)
    flow = 10 * load + n(0.15)
    pressure = 1 + 3 * load**2 + n(0.04)
    power = 2 + 0.5 * flow * pressure / 4 + n(0.1)
    current = 0.8 * power + n(0.05)
    vibration = 0.2 + 0.3 * load + np.abs(n(0.03))
    # The ambient drifts: a trend of a few degrees over the run plus a random walk.
    ambient = 20 + rng.uniform(-4, 8) * t / rows + np.cumsum(0.05 * rng.standard_normal(rows))
    temp_motor = ambient + 12 * _lagged(power, 0.05) - 12 * power[:1].mean() + 35 + n(0.1)
    temp_bearing = ambient + 10 * _lagged(load, 0.02) + 25 + n(0.1)
    values = np.stack([100 * load, pressure, flow, power, current, vibration, temp_motor, temp_bearing], axis=1)

    labels = np.zeros(rows, bool)
    faults = []
    at = train_rows + int(rng.integers(20, 80))
    mean_fault = 80
    gap = mean_fault * (1 - fault_share) / fault_share
    while at < rows - 20:
        kind = FAULTS[int(rng.integers(len(FAULTS)))]
        length = int(rng.integers(10, 25)) if kind == "spike" else int(rng.integers(50, 110))
        end = min(rows, at + length)
        s = slice(at, end)
        k = end - at
        if kind == "leak":
            values[s, 1] *= 0.75
            values[s, 2] *= 1.1
        elif kind == "spike":
            bursts = rng.random(k) < 0.5
            values[s, 5] += np.where(bursts, rng.uniform(0.4, 1.0, k), 0.0)
        elif kind == "decoupled":
            values[s, 2] *= 0.6
        elif kind == "overheat":
            values[s, 7] += 0.25 * np.arange(1, k + 1)
        elif kind == "stuck":
            values[s, 1] = values[at - 1, 1]
        labels[s] = True
        faults.append((kind, at, end))
        at = end + int(rng.uniform(0.5, 1.5) * gap)
    return Run(values=values, labels=labels, faults=faults)


def write(path: Path, values: np.ndarray, start: int = 0) -> None:
    """A run as users write such files: semicolon separated, a `datetime` column, no key."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f, delimiter=";")
        w.writerow(["datetime", *CHANNELS])
        for i, row in enumerate(values, start=start):
            stamp = f"2020-03-{9 + i // 86400:02d} {i // 3600 % 24:02d}:{i // 60 % 60:02d}:{i % 60:02d}"
            w.writerow([stamp, *(f"{v:.4f}" for v in row)])


@dataclass
class Figures:
    kind: str
    normal_rows: int
    fault_rows: int
    false_alarms: int
    missed: int

    @property
    def false_alarm_rate(self) -> float:
        return self.false_alarms / max(1, self.normal_rows)

    @property
    def miss_rate(self) -> float:
        return self.missed / max(1, self.fault_rows)

    @property
    def f1(self) -> float:
        tp = self.fault_rows - self.missed
        return 2 * tp / max(1, 2 * tp + self.false_alarms + self.missed)

    @property
    def flag_everything_f1(self) -> float:
        return 2 * self.fault_rows / max(1, 2 * self.fault_rows + self.normal_rows)


# The channels a user of such machines knows to follow the ambient: measured from their level.
DRIFTING = ["temp_motor", "temp_bearing"]


def evaluate(kind: str, runs: list[Run], binary: str, train_rows: int = 400, work: Path | None = None,
             extra_fit: list[str] | None = None, baseline: list[str] | None = None) -> Figures:
    """Trains `kind` with its defaults on each run's first `train_rows` rows, the `baseline`
    channels (default: the temperatures) measured from their level, scores the run with
    `anomalyd score --model`, and pools the counts over the rows after training."""
    baseline = DRIFTING if baseline is None else baseline
    from . import cli

    figures = Figures(kind, 0, 0, 0, 0)
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(work or tmp)
        for i, r in enumerate(runs):
            train, data, model, out = (base / f"{kind}-{i}-{name}" for name in
                                       ("train.csv", "run.csv", "model.onnx", "scores.csv"))
            write(train, r.values[:train_rows])
            write(data, r.values)
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                code = cli.main(["fit", "--kind", kind, "--data", str(train), "--features", ",".join(CHANNELS),
                                 "--out", str(model), "--no-plot", "-q",
                                 *(["--baseline", ",".join(baseline)] if baseline else []), *(extra_fit or [])])
            if code != 0:
                raise RuntimeError(f"fit {kind} on run {i} failed ({code})")
            p = subprocess.run([binary, "score", "--model", str(model), "--input", str(data),
                                "--timestamp-field", "datetime", "--output", str(out)],
                               capture_output=True, text=True, timeout=600)
            if p.returncode != 0:
                raise RuntimeError(f"anomalyd score on run {i}: {p.stderr.strip()}")
            with open(out) as f:
                flagged = np.array([row["is_anomaly"] == "true" for row in csv.DictReader(f)])
            labels = r.labels[train_rows:]
            flagged = flagged[train_rows:]
            figures.normal_rows += int((~labels).sum())
            figures.fault_rows += int(labels.sum())
            figures.false_alarms += int((flagged & ~labels).sum())
            figures.missed += int((~flagged & labels).sum())
    return figures


def stationary_false_alarms(kind: str, binary: str, seeds: int = 5, train_rows: int = 400,
                            live_rows: int = 20_000) -> list[float]:
    """The calibration check of issue 17: trains `kind` with its defaults on `train_rows` rows of
    stationary normal data (`synth.sensors`, one series per seed), streams the next `live_rows`
    normal rows through `anomalyd score --model` with the default quantile threshold (q = 0.999),
    and returns the share of them flagged, per seed."""
    from . import cli, synth

    features = ["temp", "pressure", "flow", "power"]
    shares = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(seeds):
            base = Path(tmp) / str(seed)
            base.mkdir()
            series = synth.sensors(train_rows + live_rows, 1, seed=seed)[0]
            for name, rows in (("train.csv", series[:train_rows]), ("all.csv", series)):
                with open(base / name, "w") as f:
                    f.write(",".join(features) + "\n")
                    f.writelines(",".join(f"{v:.4f}" for v in row) + "\n" for row in rows)
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                code = cli.main(["fit", "--kind", kind, "--data", str(base / "train.csv"), "--features",
                                 ",".join(features), "--out", str(base / "m.onnx"), "--no-plot", "-q"])
            if code != 0:
                raise RuntimeError(f"fit {kind} on seed {seed} failed ({code})")
            p = subprocess.run([binary, "score", "--model", str(base / "m.onnx"), "--input", str(base / "all.csv"),
                                "--output", str(base / "scores.csv")], capture_output=True, text=True, timeout=600)
            if p.returncode != 0:
                raise RuntimeError(f"anomalyd score on seed {seed}: {p.stderr.strip()}")
            with open(base / "scores.csv") as f:
                flagged = [row["is_anomaly"] == "true" for row in csv.DictReader(f)][train_rows:]
            shares.append(float(np.mean(flagged)))
    return shares


def table(figures: list[Figures]) -> str:
    lines = ["| kind | false alarms (of normal rows) | missed (of fault rows) | F1 | flag-everything F1 |",
             "|---|---|---|---|---|"]
    for f in figures:
        lines.append(f"| {f.kind} | {f.false_alarm_rate:.1%} | {f.miss_rate:.1%} | {f.f1:.3f} | "
                     f"{f.flag_everything_f1:.3f} |")
    return "\n".join(lines)


def add_parser(sub) -> None:
    m = sub.add_parser("machines", help="score the defaults on drifting machines with labelled faults",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    m.add_argument("--kinds", default="dense,conv,lstm,vae", help="kinds to evaluate (default dense,conv,lstm,vae)")
    m.add_argument("--runs", type=int, default=8, help="machines (default 8)")
    m.add_argument("--rows", type=int, default=1200, help="rows per run (default 1200)")
    m.add_argument("--train-rows", type=int, default=400, help="normal rows to train on (default 400)")
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--baseline", default=",".join(DRIFTING), metavar="A,B",
                   help=f"channels measured from their per-machine level (default {','.join(DRIFTING)}; "
                        "'' for none)")
    m.add_argument("--anomalyd", metavar="PATH", help="the daemon binary (default: as `nab` finds it)")
    m.add_argument("--calibration-check", action="store_true",
                   help="instead: train each kind on 400 rows of stationary normal data (5 seeds) and "
                        "print the share of the next 20,000 normal rows flagged, against the 0.1 %% the "
                        "default threshold (q = 0.999) asks for")


def main(args) -> int:
    import sys

    from .nab import find_anomalyd
    from .nab_score import NabError

    try:
        binary = find_anomalyd(args.anomalyd)
    except NabError as e:
        print(f"anomalyd-train machines: error: {e}", file=sys.stderr)
        return 2
    if args.calibration_check:
        print("| kind | normal rows flagged: mean | per seed |\n|---|---|---|")
        for kind in (k for k in args.kinds.split(",") if k):
            shares = stationary_false_alarms(kind, binary, train_rows=args.train_rows)
            print(f"| {kind} | {np.mean(shares):.3%} | {', '.join(f'{s:.3%}' for s in shares)} |", flush=True)
        return 0
    runs = [run(args.rows, args.seed * 1000 + i, args.train_rows) for i in range(args.runs)]
    drifting = [c for c in args.baseline.split(",") if c]
    figures = [evaluate(k, runs, binary, args.train_rows, baseline=drifting) for k in args.kinds.split(",") if k]
    print(table(figures))
    return 0

