"""`anomalyd-train select`: the kind and the bottleneck chosen on the user's own data.

Each series is cut in time: its first `1 - holdout` of rows train every candidate (a kind, a
code size and, for the sequence kinds, a window), each with `fit`'s own validation split for
early stopping; its last rows are held back, and every candidate is judged on them twice:

- **reconstruction**: the mean score (squared error in normalised units, the daemon's score) of
  the clean held-back rows. Reported, not the rule: it always prefers a wider code, and a code as
  wide as the input reconstructs anomalies as well as normal data.
- **detection**: anomalies injected into a copy of the held-back rows (`inject.py`); each row is
  scored as the daemon scores it (the window ending at it) and the scores are summarised as ROC
  AUC and PR AUC (average precision) against the injected labels. Every candidate is scored on
  the same rows: those with a full window for the longest window in the grid, leaving out the
  rows just after an anomaly, whose windows still hold some of it.

**The rule** (`choose`): the highest ROC AUC sets the bar; every candidate within one standard
error of it is as good within the noise of this measurement, and of those the one with the
fewest stored numbers wins (ties: the lower reconstruction error). That is the one-standard-error
rule of model selection (Breiman et al. 1984; Hastie, Tibshirani and Friedman, *Elements of
Statistical Learning* §7.10). The standard error is the spread of the AUC over bootstrap
replicates that resample whole anomalies and blocks of normal rows, so that the rows of one event
or of one quiet stretch, which are not independent, count as one draw. ROC AUC rather than PR AUC
for the rule: it does not depend on the share of anomalies injected.
"""

from __future__ import annotations

import csv
import math
import os
import time
from collections import Counter
from dataclasses import asdict, dataclass, field, replace

import numpy as np
from tqdm import tqdm

from . import KINDS, SEQUENCE_KINDS, data, export, inject, plots
from . import baseline as baselines
from .fit import DEFAULT_SEQUENCE_WINDOW, FitOptions, fit_series, write
from .kinds import Spec
from .synth import auc, average_precision

DEFAULT_KINDS = ("pca", "dense", "conv", "lstm")
DEFAULT_LATENTS = (1, 2, 4, 8, 16)
BOOTSTRAP = 200
MIN_EVENTS = 200
MAX_COPIES = 20
RULE = ("highest ROC AUC on injected anomalies sets the bar; of the candidates within one bootstrap "
        "standard error of it, the fewest stored numbers wins (ties: lower held-back reconstruction error)")


@dataclass
class SelectOptions:
    data: str
    features: list[str]
    out: str  # a directory
    key: str | None = None
    kinds: list[str] = field(default_factory=lambda: list(DEFAULT_KINDS))
    latents: list[int] = field(default_factory=lambda: list(DEFAULT_LATENTS))
    windows: list[int] = field(default_factory=lambda: [DEFAULT_SEQUENCE_WINDOW])  # sequence kinds
    holdout: float = 0.3
    inject_share: float = 0.1
    inject_magnitude: float = 4.0
    budget: float = 1800.0  # seconds; once spent, the candidates not yet started are skipped (the first always runs)
    epochs: int | None = None  # None: fit's early stopping
    seed: int = 0
    threads: int = 1
    quiet: bool = False
    # features measured from each key's slow level (fit --baseline), in every candidate alike
    baseline: list[str] = field(default_factory=list)
    baseline_half_life: float = baselines.DEFAULT_HALF_LIFE


@dataclass
class Candidate:
    kind: str
    window: int
    latent: int
    status: str = "pending"  # "ok", "skipped: <why>", "failed: <why>"
    params: int = 0  # numbers the model stores (weights, components, code bounds)
    val_mse: float = math.nan  # mean score of the clean held-back rows
    roc_auc: float = math.nan
    roc_auc_se: float = math.nan
    pr_auc: float = math.nan
    seconds: float = 0.0

    @property
    def name(self) -> str:
        return f"{self.kind} latent {self.latent}" + (f" window {self.window}" if self.window > 1 else "")


@dataclass
class Selection:
    chosen: Candidate
    candidates: list[Candidate]
    model: str
    table: str
    plot: str


def _cost(kind: str) -> int:
    return {"pca": 0, "conv": 2, "lstm": 3, "gru": 3}.get(kind, 1)


def grid(kinds: list[str], latents: list[int], windows: list[int], features: int) -> list[Candidate]:
    """Every (kind, window, latent), cheapest first. A code wider than the input (D = window x
    features values, or the features alone for a sequence kind's code per row, kinds.StepCode)
    is left out, except D itself: the identity the rule must see lose. PCA stops at D - 1
    components (with D it reproduces every input exactly: every score 0)."""
    out = []
    for kind in kinds:
        if kind not in KINDS:
            raise data.DataError(f"unknown kind {kind!r} in --kinds; kinds: {', '.join(KINDS)}")
        for window in windows if kind in SEQUENCE_KINDS else [1]:
            d = features if Spec(kind=kind, window=window, features=features).step_code() else window * features
            for latent in sorted(set(latents)):
                if latent <= d - (kind == "pca"):
                    out.append(Candidate(kind, window, latent))
    if not out:
        raise data.DataError(f"no candidate: every --latent is wider than the input ({features} features)")
    return sorted(out, key=lambda c: (_cost(c.kind), c.kind, c.window, c.latent))


def choose(candidates: list[Candidate]) -> Candidate:
    """The rule of the module's doc: one standard error from the best ROC AUC, then the simplest."""
    ok = [c for c in candidates if c.status == "ok"]
    if not ok:
        raise data.DataError("no candidate could be trained: " + "; ".join(f"{c.name}: {c.status}" for c in candidates))
    best = max(ok, key=lambda c: c.roc_auc)
    near = [c for c in ok if c.roc_auc >= best.roc_auc - best.roc_auc_se]
    return min(near, key=lambda c: (c.params, c.val_mse))


@dataclass
class HeldBack:
    """The held-back rows every candidate is judged on: clean, and in copies with anomalies
    injected (as many copies, each seeded anew, as make MIN_EVENTS anomalies, at most
    MAX_COPIES), with the bootstrap replicates of their AUC."""

    clean: list[np.ndarray]
    clean_rows: list[np.ndarray]  # per series: the rows with a full window for every candidate
    injected: list[np.ndarray]  # every copy's series, copy after copy
    rows: list[np.ndarray]  # per injected series: the rows scored
    labels: np.ndarray  # over the scored rows of all injected series, in order
    unit: np.ndarray  # the bootstrap unit of each scored row
    replicates: np.ndarray  # [BOOTSTRAP, units]: how often each replicate draws each unit
    events: list[inject.Event]
    season: int | None

    @staticmethod
    def build(held: list[np.ndarray], train: list[np.ndarray], longest: int, opts: SelectOptions) -> "HeldBack":
        stacked = np.concatenate(train)
        spread, mean, season = stacked.std(0), stacked.mean(0), inject.period(train)
        gap = max(16, longest)
        # The bootstrap's units: each injected anomaly, and each block of `gap` rows of a series
        # (the same block in every copy: its normal rows are the same rows).
        block_base = np.cumsum([0] + [-(-len(h) // gap) for h in held])

        def injected(copy: int) -> inject.Injected:
            return inject.inject(held, spread, mean, seed=opts.seed + 1000 * copy, share=opts.inject_share,
                                 magnitude=opts.inject_magnitude, gap=gap, season=season)

        copies = [injected(0)]
        wanted = min(MAX_COPIES, -(-MIN_EVENTS // max(1, len(copies[0].events))))
        copies += [injected(c) for c in range(1, wanted)]
        series, rows, labels, units, events = [], [], [], [], 0
        for copy in copies:
            for i, (s, lab) in enumerate(zip(copy.series, copy.labels)):
                scored = np.arange(len(s)) >= longest - 1
                for end in np.flatnonzero(lab[:-1] & ~lab[1:]) + 1:  # the rows whose window holds some of it
                    scored[end : end + longest - 1] = False
                idx = np.flatnonzero(scored)
                event = np.cumsum(lab & ~np.r_[False, lab[:-1]])  # of each row: events begun so far
                unit = np.where(lab[idx], block_base[-1] + events + event[idx] - 1, block_base[i] + idx // gap)
                events += int(event[-1]) if len(event) else 0
                series.append(s)
                rows.append(idx)
                labels.append(lab[idx])
                units.append(unit)
        labels, unit = np.concatenate(labels), np.concatenate(units)
        if events < 10 or labels.all():
            raise data.DataError(
                f"the held-back part ({sum(len(h) for h in held)} rows, --holdout {opts.holdout}) is too "
                f"short to inject anomalies into (room for {events}, need 10): give more rows or a larger --holdout"
            )
        rng = np.random.default_rng(opts.seed)
        pos_units, neg_units = np.unique(unit[labels]), np.unique(unit[~labels])
        replicates = np.zeros((BOOTSTRAP, block_base[-1] + events), np.float32)
        for counts in replicates:
            np.add.at(counts, rng.choice(pos_units, len(pos_units)), 1)
            np.add.at(counts, rng.choice(neg_units, len(neg_units)), 1)
        clean_rows = [np.arange(longest - 1, len(h)) for h in held]
        all_events = [e for copy in copies for e in copy.events]
        return HeldBack(held, clean_rows, series, rows, labels, unit, replicates, all_events, season)

    def relative(self, baseline: baselines.Baseline, train: list[np.ndarray], names: list[str]) -> "HeldBack":
        """The held-back series as a model with this `--baseline` sees them in the daemon: each
        key's level carried on from its training rows (anomalies are injected in raw units)."""

        def after(i: int, s: np.ndarray) -> np.ndarray:
            t = train[i % len(train)]  # clean, then every copy, series by series
            return baseline.apply(np.concatenate([t, s]), names)[len(t):]

        return replace(self, clean=[after(i, s) for i, s in enumerate(self.clean)],
                       injected=[after(i, s) for i, s in enumerate(self.injected)])

    @staticmethod
    def scores(sess, window: int, series: list[np.ndarray], rows: list[np.ndarray]) -> np.ndarray:
        """The daemon's score (mean of `error`) of the window ending at each of `rows`."""
        out = [np.zeros(0, np.float32)]
        for s, r in zip(series, rows):
            if len(r):
                _, err = export.run(sess, data.windows(s.astype(np.float32), window)[r - window + 1])
                out.append(err.mean(1))
        return np.concatenate(out)

    def judge(self, c: Candidate, sess) -> None:
        scores = self.scores(sess, c.window, self.injected, self.rows)
        c.val_mse = float(self.scores(sess, c.window, self.clean, self.clean_rows).mean())
        c.roc_auc = auc(scores, self.labels)
        c.roc_auc_se = float(np.std([auc(scores, self.labels, counts[self.unit]) for counts in self.replicates]))
        c.pr_auc = average_precision(scores, self.labels)


def _options(opts: SelectOptions, c: Candidate, out: str, calibration_folds: int, name: str | None = None) -> FitOptions:
    return FitOptions(
        kind=c.kind, data=opts.data, features=opts.features, out=out, key=opts.key, window=c.window,
        latent=c.latent, epochs=opts.epochs, seed=opts.seed, threads=opts.threads, quiet=True, plot=True,
        calibration_folds=calibration_folds, name=name, baseline=opts.baseline,
        baseline_half_life=opts.baseline_half_life,
    )


def select(opts: SelectOptions) -> Selection:
    if not 0.0 < opts.holdout < 1.0:
        raise data.DataError(f"--holdout must be between 0 and 1, got {opts.holdout}")
    if min(opts.latents, default=0) < 1 or min(opts.windows, default=0) < 2:
        raise data.DataError("--latent sizes must be at least 1 and --window sizes at least 2")
    candidates = grid(opts.kinds, opts.latents, opts.windows, len(opts.features))
    longest = max(c.window for c in candidates)
    table = data.load(opts.data, opts.features, key=opts.key)
    parts = data.series(table)
    cut = [len(s) - round(len(s) * opts.holdout) for s in parts]
    train = [s[:n] for s, n in zip(parts, cut)]
    held = HeldBack.build([s[n:] for s, n in zip(parts, cut)], train, longest, opts)
    if opts.baseline:
        level = baselines.fit(train, opts.features, opts.baseline, opts.baseline_half_life)
        held = held.relative(level, train, opts.features)
    source = {"sha256": table.sha256, "rows": table.rows, "file": os.path.basename(opts.data)}
    model = os.path.join(opts.out, "model.onnx")

    started = time.perf_counter()
    bar = tqdm(candidates, desc="select", unit="model", disable=opts.quiet, dynamic_ncols=True)
    for c in bar:
        if c is not candidates[0] and time.perf_counter() - started > opts.budget:
            c.status = f"skipped: --budget of {opts.budget:g} s spent"
            continue
        bar.set_postfix_str(c.name)
        t0 = time.perf_counter()
        try:
            res = fit_series(_options(opts, c, model, calibration_folds=1), train, source)
        except (data.DataError, ValueError) as e:
            c.status = f"failed: {e}"
            continue
        c.params = sum(t.numel() for t in res.core.state_dict().values())
        held.judge(c, export.session(res.proto))
        c.seconds = time.perf_counter() - t0
        c.status = "ok"
    bar.close()

    chosen = choose(candidates)
    os.makedirs(opts.out, exist_ok=True)
    injected = {
        "seed": opts.seed, "share": opts.inject_share, "magnitude": opts.inject_magnitude,
        "season_rows": held.season, "scored_rows": int(len(held.labels)),
        "events": dict(Counter(e.shape for e in held.events)),
    }
    # The winner, refitted on all the data (training and held-back parts) like `fit` would.
    stem = os.path.splitext(os.path.basename(opts.data))[0]
    final_opts = _options(opts, chosen, model, FitOptions.calibration_folds, name=f"{stem}-{chosen.kind}")
    final = fit_series(final_opts, parts, source)
    final.meta["anomalyd.selection"] = {
        "rule": RULE, "chosen": chosen.name, "holdout": opts.holdout, "injected": injected,
        "candidates": [_row(c) for c in candidates],
    }
    write(final, final_opts)
    table_path = os.path.join(opts.out, "candidates.csv")
    with open(table_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(_row(chosen)) + ["chosen"])
        w.writeheader()
        for c in candidates:
            w.writerow({**_row(c), "chosen": int(c is chosen)})
    plot_path = os.path.join(opts.out, "selection.png")
    plots.selection(candidates, chosen, f"{stem}: {len(opts.features)} features, {held.labels.sum()} injected "
                    f"anomalous rows of {len(held.labels)}", plot_path)
    return Selection(chosen, candidates, model, table_path, plot_path)


def _row(c: Candidate) -> dict:
    row = asdict(c)
    for k in ("val_mse", "roc_auc", "roc_auc_se", "pr_auc", "seconds"):
        row[k] = float(f"{row[k]:.4g}") if not math.isnan(row[k]) else None
    return row
