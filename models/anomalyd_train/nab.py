"""`anomalyd-train nab`: run the daemon's detector over the Numenta Anomaly Benchmark.

For every file of the corpus (`DIR/data/<category>/<file>.csv`, labels in `DIR/labels`):

1. features are computed causally from each row and the rows before it (the value, its
   difference from the previous value, time-of-day encodings, ...);
2. a model is trained with the toolkit (`fit`) on the file's probationary rows only (the first
   15%, at most 750 rows): the normalisation, the weights and the calibration see nothing else
   (by default an ensemble of five, exported as one graph that averages their errors);
3. the whole file is streamed through `anomalyd score` (the daemon's own decode, window, infer,
   threshold and alert code), with one parameter set for every file;
4. each row's NAB anomaly score is taken from the daemon's output (see `REPORTS`), and written as
   `OUT/<detector>/<category>/<detector>_<file>.csv` (`timestamp,value,anomaly_score,label`);
5. the results are scored with the project's NAB scorer (`nab_score`), and the last line printed
   is `NAB standard=S low_fp=S low_fn=S`.
"""

from __future__ import annotations

import bisect
import csv
import json
import math
import os
import re
import shutil
import subprocess
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from . import nab_score as ns
from .data import DataError, file_sha256

# Feature groups the harness can compute, and the columns each becomes.
FEATURE_GROUPS = {
    "value": ["value"],
    "diff": ["diff"],  # value minus the previous row's value (0 on the first row)
    "tod": ["tod_sin", "tod_cos"],  # time of day on the unit circle
    "dow": ["dow_sin", "dow_cos"],  # time of week on the unit circle
    # Robust, compressed versions: asinh of the deviation from the probationary median in units
    # of the probationary median absolute deviation (a spike of 1000 MADs becomes ~7.6).
    "rvalue": ["rvalue"],
    "rdiff": ["rdiff"],
    # The value minus the mean of the previous 32 values, robust-scaled and compressed.
    "dev": ["dev"],
    # Rolling z-score: the value's deviation from the mean of the previous ZWIN values in units of
    # their standard deviation (floored at a small share of the probationary spread), compressed.
    "z": ["z"],
}
ZWIN = int(os.environ.get("NAB_ZWIN", "64"))

# How a row's NAB anomaly score is read from the daemon's output.
REPORTS = {
    "score": "the daemon's calibrated anomaly_score on every row",
    "firing": "the anomaly_score on rows whose event is `firing` (the row that opened an alert "
              "episode under the pipeline's [alert] hysteresis), 0 elsewhere",
    "novelty": "on rows whose event is `firing`, x / (1 + x) where x is the row's score (reconstruction "
               "error) over the largest score of every earlier row of the file (x > 1: the largest error "
               "the key has ever produced); 0 elsewhere",
    "rarity": "on rows whose event is `firing`, x / (1 + x) where x is the row's score over the 99th "
              "percentile of the scores of every earlier row of the file (an empirical tail that, unlike "
              "the threshold's, keeps learning from anomalous rows too); 0 elsewhere",
    "escalation": "rarity on rows whose event is `firing`, and, while that episode is open, again on any "
                  "anomalous row whose rarity x is at least --escalate times the largest x reported in the "
                  "episode so far (a re-notification: the anomaly has grown); 0 elsewhere",
}
RARITY_QUANTILE = 0.99

THRESHOLD_METHODS = ("spot", "dspot", "quantile", "ewma")


@dataclass
class NabOptions:
    """One run of the benchmark. The defaults are the parameter set of docs/BENCHMARKS.md (NAB),
    the same for every file; `--kind` changes the kind and keeps the rest."""

    nab_dir: str
    out: str
    # The model: a 1-D convolutional autoencoder over 16 rows of the value and the time of day
    # (most NAB series have a daily rhythm; the probation is too short to learn a weekly one).
    kind: str = "conv"
    detector: str | None = None  # default anomalyd-<kind>
    features: list[str] = field(default_factory=lambda: ["value", "tod"])
    window: int = 16
    epochs: int = 20
    hidden: int = 32
    latent: int | None = None
    lr: float = 1e-3
    batch_size: int = 32
    seed: int = 0
    # Five members per file (seeds seed .. seed+4), one graph, their errors averaged: a model
    # trained on a few hundred rows is noisy, and one seed can land two or three points of the
    # corpus score away from another.
    ensemble: int = 5
    val_fraction: float = 0.2
    # The threshold's warm start: the scores of every probationary window ("val": only the
    # windows the toolkit held back, 20% of a short probation, too few for a tail).
    calibration: str = "probation"
    # The daemon: SPOT over the top 1% of the warm-start scores, a risk of 0.5%; an episode fires
    # after 5 consecutive anomalous rows and resolves after 50 normal ones.
    threshold: str = "spot"
    q: float = 5e-3
    level: float = 0.99
    max_peaks: int = 200
    depth: int = 10
    exclude: float = 0.01
    alpha: float = 0.01
    k: float = 4.0
    memory: int = 10000
    fire_after: int = 5
    resolve_after: int = 50
    # An episode that outlasts this many rows accepts its level as the key's normal ("never": it
    # fires until the values come back): the daemon's default, chosen on this corpus (BENCHMARKS).
    rebaseline_after: str = "350"
    # Learning (issue 12): every `retrain_every` rows after the probation, a model is trained like
    # the first on the file's rows so far that the daemon did not alert on (the most recent
    # `retrain_rows` of them) and placed beside the serving one as a candidate: the daemon scores
    # it in the shadow for `shadow_rows` rows and promotes or refuses it by its promotion rule
    # (`anomalyd score --candidate`, the daemon's own code). 0: the model stays the probation's.
    retrain_every: int = 0
    retrain_rows: int = 1500
    shadow_rows: int = 1000
    # A retrained model's threshold warm start: "probation" (every window it was trained on, as
    # the first model's) or "val" (the windows its members held back). The defaults of these
    # three are the best measured (docs/BENCHMARKS.md, "Learning").
    retrain_calibration: str = "val"
    # What NAB sees: each firing row, and each doubling of an open episode's rarity (see REPORTS).
    report: str = "escalation"
    escalate: float = 2.0
    # A key's k-th episode reports its rarity divided by 1 + repeat_discount * (k - 1): a key that
    # keeps alerting is noisier than its tail says (docs/BENCHMARKS.md, "Repeat discount").
    repeat_discount: float = 0.1
    # ... and multiplied by ((s + 1) / k) ** key_rank, where s of its k - 1 earlier episodes opened
    # with a smaller rarity: an alert ranks against the key's own earlier alerts (BENCHMARKS,
    # "Rank among the key's own alerts").
    key_rank: float = 1.0
    jobs: int = 2
    files: list[str] | None = None  # a subset of <category>/<file>.csv; default every labelled file
    anomalyd: str | None = None  # the daemon binary
    keep_work: bool = True
    reuse_models: bool = False  # keep a file's model when its training options are unchanged
    quiet: bool = False

    @property
    def name(self) -> str:
        return self.detector or f"anomalyd-{self.kind}"

    def columns(self) -> list[str]:
        return [c for g in self.features for c in FEATURE_GROUPS[g]]


def find_anomalyd(explicit: str | None) -> str:
    """The daemon binary: --anomalyd, else $ANOMALYD_BIN, else the newest of this checkout's
    `cargo build` outputs (release or debug, under $CARGO_TARGET_DIR or target/), else `anomalyd`
    on the PATH. The newest, because a stale release build next to a fresh debug one (or the
    reverse) would benchmark code that is no longer there."""
    if explicit:
        if os.path.isfile(explicit) and os.access(explicit, os.X_OK):
            return explicit
        raise ns.NabError(f"--anomalyd {explicit}: not an executable file")
    env = os.environ.get("ANOMALYD_BIN")
    if env:
        if os.path.isfile(env) and os.access(env, os.X_OK):
            return env
        raise ns.NabError(f"ANOMALYD_BIN={env}: not an executable file")
    repo = Path(__file__).resolve().parents[2]
    targets = [Path(os.environ["CARGO_TARGET_DIR"])] if os.environ.get("CARGO_TARGET_DIR") else []
    targets.append(repo / "target")
    built = [t / profile / "anomalyd" for t in targets for profile in ("release", "debug")]
    built = [b for b in built if b.is_file() and os.access(b, os.X_OK)]
    if built:
        return str(max(built, key=lambda b: b.stat().st_mtime))
    on_path = shutil.which("anomalyd")
    if on_path:
        return on_path
    raise ns.NabError(
        "the anomalyd binary was not found: build it (cargo build --release), or pass --anomalyd PATH "
        "or set ANOMALYD_BIN"
    )


def validate(opts: NabOptions) -> None:
    from . import KINDS

    checks = [
        (opts.kind in KINDS, f"unknown kind {opts.kind!r}; kinds: {', '.join(KINDS)}"),
        (bool(opts.features) and all(g in FEATURE_GROUPS for g in opts.features),
         f"--features must be a list of {', '.join(FEATURE_GROUPS)}, got {','.join(opts.features)}"),
        (opts.window >= 1, f"--window must be at least 1, got {opts.window}"),
        (opts.kind not in ("lstm", "gru", "conv") or opts.window >= 2,
         f"kind {opts.kind} needs --window of at least 2"),
        (opts.epochs >= 1, f"--epochs must be at least 1, got {opts.epochs}"),
        (opts.threshold in THRESHOLD_METHODS,
         f"--threshold must be one of {', '.join(THRESHOLD_METHODS)}, got {opts.threshold}"),
        (opts.report in REPORTS, f"--report must be one of {', '.join(REPORTS)}, got {opts.report}"),
        (opts.jobs >= 1, f"--jobs must be at least 1, got {opts.jobs}"),
        (opts.ensemble >= 1, f"--ensemble must be at least 1, got {opts.ensemble}"),
        (opts.escalate > 1, f"--escalate must be above 1, got {opts.escalate}"),
        (opts.repeat_discount >= 0, f"--repeat-discount must be 0 or more, got {opts.repeat_discount}"),
        (opts.key_rank >= 0, f"--key-rank must be 0 or more, got {opts.key_rank}"),
        (opts.calibration in ("val", "probation"), f"--calibration must be val or probation, got {opts.calibration}"),
        (opts.retrain_calibration in ("val", "probation"),
         f"--retrain-calibration must be val or probation, got {opts.retrain_calibration}"),
        (opts.fire_after >= 1 and opts.resolve_after >= 1, "--fire-after and --resolve-after must be at least 1"),
        (opts.retrain_every >= 0, f"--retrain-every must be 0 (never) or a number of rows, got {opts.retrain_every}"),
        (opts.retrain_rows >= 1, f"--retrain-rows must be at least 1, got {opts.retrain_rows}"),
        (opts.shadow_rows >= 1, f"--shadow-rows must be at least 1, got {opts.shadow_rows}"),
        (opts.retrain_every == 0 or opts.shadow_rows < opts.retrain_every,
         f"--shadow-rows ({opts.shadow_rows}) must be under --retrain-every ({opts.retrain_every}): a candidate "
         "still in the shadow when the next one comes is replaced by it, undecided"),
        (opts.rebaseline_after == "never" or (opts.rebaseline_after.isdigit() and int(opts.rebaseline_after) >= 1),
         f"--rebaseline-after must be a number of rows or 'never', got {opts.rebaseline_after!r}"),
    ]
    for ok, message in checks:
        if not ok:
            raise ns.NabError(message)
    if not (Path(opts.nab_dir) / "data").is_dir():
        raise ns.NabError(f"{opts.nab_dir} has no data/ folder: --nab-dir must be a NAB checkout")


# ---------------------------------------------------------------------------------------------
# Features


def _robust(x: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """asinh((x - median) / scale) with the median and scale of `ref` (the probationary rows)."""
    med = float(np.median(ref))
    mad = float(np.median(np.abs(ref - med))) * 1.4826
    scale = mad if mad > 0 else float(np.std(ref))
    if not scale > 0:
        scale = max(abs(med), 1.0) * 1e-3
    return np.arcsinh((x - med) / scale)


def features(times: np.ndarray, values: np.ndarray, groups: list[str], probation: int) -> dict[str, np.ndarray]:
    """Causal per-row features: each depends only on the row and the rows before it, and on
    constants computed from the probationary rows."""
    out: dict[str, np.ndarray] = {}
    p = max(probation, 2)
    secs = (times - np.datetime64("1970-01-01T00:00:00", "us")) / np.timedelta64(1, "s")
    for g in groups:
        if g == "value":
            out["value"] = values
        elif g == "diff":
            out["diff"] = np.r_[0.0, np.diff(values)]
        elif g == "tod":
            a = 2 * np.pi * (secs % 86400) / 86400
            out["tod_sin"], out["tod_cos"] = np.sin(a), np.cos(a)
        elif g == "dow":
            # 1970-01-01 was a Thursday; the phase does not matter, only the period.
            a = 2 * np.pi * (secs % (7 * 86400)) / (7 * 86400)
            out["dow_sin"], out["dow_cos"] = np.sin(a), np.cos(a)
        elif g == "rvalue":
            out["rvalue"] = _robust(values, values[:p])
        elif g == "rdiff":
            d = np.r_[0.0, np.diff(values)]
            out["rdiff"] = _robust(d, d[1:p])
        elif g == "dev":
            mean, _ = _trailing_moments(values, 32)
            d = values - np.where(np.arange(len(values)) > 0, mean, values[0])
            out["dev"] = _robust(d, d[1:p])
        elif g == "z":
            out["z"] = rolling_z(values, ZWIN, values[:p])
    return out


def _trailing_moments(values: np.ndarray, w: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean and variance of the previous `w` values (x_{t-w..t-1}) for each row t; 0 on row 0."""
    c1 = np.r_[0.0, np.cumsum(values)]
    c2 = np.r_[0.0, np.cumsum(values * values)]
    i = np.arange(len(values))
    lo = np.maximum(i - w, 0)
    cnt = np.maximum(i - lo, 1)
    mean = (c1[i] - c1[lo]) / cnt
    return mean, np.maximum((c2[i] - c2[lo]) / cnt - mean * mean, 0.0)


def rolling_z(values: np.ndarray, w: int, ref: np.ndarray) -> np.ndarray:
    """asinh((x_t - mean(x_{t-w..t-1})) / std(x_{t-w..t-1})): causal, from the row's past only."""
    mean, var = _trailing_moments(values, w)
    floor = 0.05 * max(float(np.std(ref)), 1e-9)
    sd = np.maximum(np.sqrt(var), floor)
    z = np.where(np.arange(len(values)) > 0, (values - mean) / sd, 0.0)
    return np.arcsinh(z)


def _write_csv(path: Path, header: list[str], columns: list) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        for row in zip(*columns):
            w.writerow([v if isinstance(v, str) else repr(float(v)) for v in row])


# ---------------------------------------------------------------------------------------------
# One file


def config_toml(opts: NabOptions, model: Path) -> str:
    t = opts.threshold
    if t in ("spot", "dspot"):
        params = (f"q = {opts.q!r}\nlevel = {opts.level!r}\nmax_peaks = {opts.max_peaks}\n"
                  f"exclude = {opts.exclude!r}\n" + (f"depth = {opts.depth}\n" if t == "dspot" else ""))
    elif t == "quantile":
        params = f"q = {1 - opts.q!r}\nmemory = {opts.memory}\n"
    else:
        params = f"alpha = {opts.alpha!r}\nk = {opts.k!r}\n"
    return (
        "# written by anomalyd-train nab: one pipeline, one key per file\n"
        "[pipelines.nab]\n"
        'topics = ["nab"]\n'
        f"model = {json.dumps(str(model))}\n"
        'key_field = "key"\n'
        'timestamp_field = "timestamp"\n'
        'alerts_topic = ""\n'
        'dead_letter_topic = ""\n'
        "\n[pipelines.nab.threshold]\n"
        f'method = "{t}"\n' + params +
        "\n[pipelines.nab.alert]\n"
        f"fire_after = {opts.fire_after}\nresolve_after = {opts.resolve_after}\n"
        f"rebaseline_after = {rebaseline_toml(opts.rebaseline_after)}\n"
        "\n[pipelines.nab.promotion]\n"
        f"records = {opts.shadow_rows}\n"
    )


def rebaseline_toml(value: str) -> str:
    """`rebaseline_after` as the daemon's configuration writes it: a count, or "never"."""
    return value if value.isdigit() else json.dumps(value)


@dataclass
class FileOutcome:
    name: str
    rows: int
    probation: int
    train_seconds: float
    score_seconds: float
    alerts: int
    # Learning: retrained models the daemon promoted, and refused.
    promoted: int = 0
    refused: int = 0


def run_file(opts: NabOptions, name: str, binary: str, windows: list[tuple[str, str]]) -> FileOutcome:
    from .fit import FitOptions

    src = Path(opts.nab_dir) / "data" / name
    cols = ns.read_columns(src, ["timestamp", "value"])
    stamps = cols["timestamp"]
    times = ns.parse_times(stamps)
    try:
        values = np.array([float(v) for v in cols["value"]], dtype=np.float64)
    except ValueError as e:
        raise ns.NabError(f"{src}: a value is not a number ({e})") from None
    n = len(values)
    probation = ns.probation_rows(n)
    feats = features(times, values, opts.features, probation)
    columns = opts.columns()

    work = Path(opts.out) / ".work" / opts.name / name.replace(".csv", "")
    work.mkdir(parents=True, exist_ok=True)
    train_csv, input_csv = work / "train.csv", work / "input.csv"
    model, config, scores = work / "model.onnx", work / "config.toml", work / "scores.csv"
    _write_csv(train_csv, columns, [feats[c][:probation] for c in columns])
    _write_csv(input_csv, ["key", "timestamp"] + columns, [["nab"] * n, stamps] + [feats[c] for c in columns])

    started = time.perf_counter()
    fit_opts = FitOptions(
        kind=opts.kind, data=str(train_csv), features=columns, out=str(model), window=opts.window,
        epochs=opts.epochs, batch_size=opts.batch_size, lr=opts.lr, val_fraction=opts.val_fraction,
        seed=opts.seed, threads=1, quiet=True, plot=False, hidden=opts.hidden, latent=opts.latent,
        name=f"nab-{Path(name).stem}",
        # The NAB line was measured on the probation's validation windows alone (SPOT fits its
        # tail on them); out-of-fold calibration is for the quantile's small-sample problem.
        calibration_folds=1,
        # One series plus calendar columns, which the rows before predict exactly: a code per row
        # (kinds.StepCode) would be left to carry the value itself. One code per window.
        code="window",
    )
    table = np.stack([feats[c] for c in columns], axis=1)
    train_model(fit_opts, opts, [table[:probation]], work)
    train_seconds = time.perf_counter() - started

    # Relative to the config file (which anomalyd resolves it against), wherever --out is.
    config.write_text(config_toml(opts, Path(model.name)))
    score_seconds = 0.0

    def score(candidates: list[tuple[int, Path]], rows: int = n) -> DaemonRows:
        """The daemon's verdicts on the first `rows` rows, with the candidates placed so far."""
        nonlocal score_seconds
        started = time.perf_counter()
        candidate_args = [a for row, m in candidates for a in ("--candidate", f"{row}={m}")]
        prefix = None if rows == n else "".join(input_lines[:rows + 1])
        p = subprocess.run([binary, "score", "-c", str(config), "--pipeline", "nab", "--input",
                            "-" if prefix else str(input_csv), "--input-format", "csv", "--output", str(scores),
                            *candidate_args], input=prefix, capture_output=True, text=True)
        score_seconds += time.perf_counter() - started
        if p.returncode != 0:
            raise ns.NabError(f"{name}: anomalyd score failed (exit {p.returncode}): {p.stderr.strip()[-2000:]}")
        (work / "score.log").write_text(p.stderr)  # the daemon's own account: promotions, refusals
        counts = re.search(r"candidates: (\d+) promoted, (\d+) refused", p.stderr)
        decided[:] = [int(c) for c in counts.groups()] if counts else [0, 0]
        promoted = [int(r) for r in re.findall(r"^row (\d+): promoted", p.stderr, re.M)]
        if len(promoted) != decided[0]:
            raise ns.NabError(f"{name}: the daemon counted {decided[0]} promotions but logged {len(promoted)}")
        return read_scores(scores, rows, name, promoted)

    # Scoring is causal, so the rows before a candidate are the same whichever come after it: each
    # retrain reads the daemon's verdicts on the rows so far from a run with the candidates so far.
    candidates: list[tuple[int, Path]] = []
    decided = [0, 0]  # the last run's counts of promoted and refused candidates
    input_lines = input_csv.read_text().splitlines(keepends=True) if opts.retrain_every else []
    retrains = range(probation + opts.retrain_every, n, opts.retrain_every) if opts.retrain_every else ()
    for k, row in enumerate(retrains, 1):
        started = time.perf_counter()
        parts = clean_segments(table[:row], alerted(score(candidates, row)), opts.retrain_rows)
        if not parts:
            continue
        retrained = work / f"model-{k}.onnx"
        data_csv = work / f"retrain-{k}.csv"
        _write_csv(data_csv, ["segment"] + columns,
                   [np.concatenate([np.full(len(p), f"s{i}") for i, p in enumerate(parts)])] +
                   [np.concatenate([p[:, j] for p in parts]) for j in range(len(columns))])
        (work / f"retrain-{k}").mkdir(exist_ok=True)
        retrain_opts = replace(fit_opts, data=str(data_csv), key="segment", out=str(retrained))
        try:
            train_model(retrain_opts, replace(opts, calibration=opts.retrain_calibration), parts,
                        work / f"retrain-{k}")
            candidates.append((row, retrained.resolve()))
        except DataError:
            pass  # too little clean data in this stretch: the model before keeps serving
        train_seconds += time.perf_counter() - started
    daemon = score(candidates)
    nab = report(opts.report, daemon, opts.escalate, opts.repeat_discount, opts.key_rank)
    firing = daemon.firing

    rows = ns.file_rows(name, times, windows)
    label = (rows.window >= 0).astype(int)
    dest = ns.result_path(opts.out, opts.name, name)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(dest, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["timestamp", "value", "anomaly_score", "label"])
        for t, v, s, lab in zip(stamps, cols["value"], nab, label):
            w.writerow([t, v, repr(float(s)), int(lab)])
    if not opts.keep_work:
        shutil.rmtree(work, ignore_errors=True)
    promoted, refused = decided
    return FileOutcome(name=name, rows=n, probation=probation, train_seconds=train_seconds,
                       score_seconds=score_seconds, alerts=int(firing.sum()), promoted=promoted, refused=refused)


def read_scores(path: Path, n: int, name: str, promoted: list[int] | None = None) -> "DaemonRows":
    """The daemon's per-row output of one file, checked: one row per input, all scored.
    `promoted`: the rows from which a promoted candidate served (the daemon's log says them)."""
    out = ns.read_columns(path, ["score", "threshold", "anomaly_score", "is_anomaly", "event", "error"])
    if len(out["anomaly_score"]) != n:
        raise ns.NabError(f"{name}: anomalyd score wrote {len(out['anomaly_score'])} rows for {n} inputs")
    bad = [e for e in out["error"] if e]
    if bad:
        raise ns.NabError(f"{name}: anomalyd could not score {len(bad)} rows, e.g. {bad[0]}")
    return DaemonRows(
        anomaly_score=np.array([float(v) if v else 0.0 for v in out["anomaly_score"]]),
        score=np.array([float(v) if v else 0.0 for v in out["score"]]),
        threshold=np.array([float(v) if v else math.nan for v in out["threshold"]]),
        promoted=list(promoted or []),
        is_anomaly=np.array([v == "true" for v in out["is_anomaly"]]),
        firing=np.array([e == "firing" for e in out["event"]]),
        resolved=np.array([e == "resolved" for e in out["event"]]),
    )


def alerted(d: "DaemonRows") -> np.ndarray:
    """The rows a retrain leaves out: those over their threshold, and every row of an alert
    episode (from its firing row to its resolving row)."""
    out = d.is_anomaly.copy()
    open_ = False
    for i in range(len(out)):
        open_ = open_ or bool(d.firing[i])
        out[i] |= open_
        open_ = open_ and not d.resolved[i]
    return out


def clean_segments(rows: np.ndarray, excluded: np.ndarray, keep: int) -> list[np.ndarray]:
    """The most recent `keep` rows not `excluded`, as the contiguous stretches they form (a
    window never spans a left-out row)."""
    kept = np.flatnonzero(~excluded)[-keep:]
    if len(kept) == 0:
        return []
    breaks = np.flatnonzero(np.diff(kept) > 1) + 1
    return [rows[idx] for idx in np.split(kept, breaks)]


def probation_windows(rows: np.ndarray, window: int) -> np.ndarray:
    """Every window of `window` consecutive probationary rows (stride 1), [n, T, F]: what the
    daemon scores on the probation, so what its threshold's warm start should describe."""
    from numpy.lib.stride_tricks import sliding_window_view

    return np.ascontiguousarray(sliding_window_view(rows, window, axis=0).transpose(0, 2, 1))


def train_model(fit_opts, opts: NabOptions, parts: list[np.ndarray], work: Path) -> None:
    """Trains the file's model (on `parts`, the stretches of rows `fit_opts.data` holds) into
    `fit_opts.out`: `opts.ensemble` members (seeds seed, seed + 1,
    ...), combined into one graph whose `error` is the mean of theirs (one member: the member).

    Why an ensemble: an autoencoder trained on a few hundred rows is a noisy estimate; two seeds
    agree on the normal patterns but differ in which unusual windows they happen to reconstruct
    well, and the corpus score moves by a few points between seeds. Averaging the members' errors
    keeps what they agree on, and it stays one model file that the daemon scores like any other.

    Members are cached in the work folder under their recipe (options, seed and the training
    data's hash), so `--reuse-models` reruns with other daemon settings train nothing.
    """
    import onnx

    from . import calibrate, data, export

    members = [train_member(fit_opts, fit_opts.seed + i, work, opts.reuse_models) for i in range(opts.ensemble)]
    protos = [onnx.load(str(m)) for m in members]
    proto = protos[0] if len(protos) == 1 else combine(protos)
    meta = export.metadata(protos[0])
    window = int(meta["anomalyd.window"])
    if opts.calibration == "probation":
        windows = np.concatenate([probation_windows(p, window) for p in parts if len(p) >= window])
    elif len(protos) > 1:
        # The windows the first member held back (the same seeded split `fit` made); the other
        # members may have trained on some of them, so this sample is slightly optimistic.
        _, windows = data.split_windows(parts, window, fit_opts.val_fraction, fit_opts.seed)
    else:
        windows = None  # the single member's own calibration, as `fit` wrote it
    if windows is not None:
        _, err = export.run(export.session(proto), windows)
        meta["anomalyd.calibration"] = json.dumps(calibrate.summarise(err), separators=(",", ":"))
    if len(protos) > 1:
        training = json.loads(meta["anomalyd.training"])
        training["ensemble"] = {"members": len(protos), "seeds": [fit_opts.seed + i for i in range(len(protos))],
                                "combine": "mean of the members' reconstruction and error outputs"}
        meta["anomalyd.training"] = json.dumps(training, separators=(",", ":"))
        proto.doc_string = (f"anomalyd ensemble of {len(protos)} {meta['anomalyd.kind']} autoencoders "
                            "(mean error); see docs/MODEL-CONTRACT.md")
    export.set_metadata(proto, meta)
    export.save(proto, fit_opts.out)


def train_member(fit_opts, seed: int, work: Path, reuse: bool) -> Path:
    """One fitted model (seed `seed`), or the cached one when its recipe is unchanged."""
    from .fit import fit

    path, stamp = work / f"member-{seed}.onnx", work / f"member-{seed}.json"
    member = replace(fit_opts, seed=seed, out=str(path))
    recipe = {k: v for k, v in asdict(member).items() if k not in ("data", "out")}
    recipe = json.dumps({"fit": recipe, "train_sha256": file_sha256(member.data)}, sort_keys=True)
    if reuse and path.is_file() and stamp.is_file() and stamp.read_text() == recipe:
        return path
    stamp.unlink(missing_ok=True)
    fit(member)
    stamp.write_text(recipe)
    return path


def combine(protos: list) -> "onnx.ModelProto":
    """One graph from several models of the contract: every member reads the shared `input`;
    `reconstruction` and `error` are the means of the members' (Sum, then Mul by 1/K: plain
    operators every runtime has)."""
    import onnx
    from onnx import TensorProto, helper

    from .export import ERROR, INPUT, RECONSTRUCTION

    nodes, inits = [], []
    outs = {RECONSTRUCTION: [], ERROR: []}
    for i, p in enumerate(protos):
        prefix = f"m{i}/"
        g = onnx.compose.add_prefix(p, prefix=prefix).graph
        rename = {prefix + INPUT: INPUT}
        for n in g.node:
            n.input[:] = [rename.get(x, x) for x in n.input]
            nodes.append(n)
        inits.extend(g.initializer)
        outs[RECONSTRUCTION].append(prefix + RECONSTRUCTION)
        outs[ERROR].append(prefix + ERROR)
    k = helper.make_tensor("ensemble/one_over_k", TensorProto.FLOAT, [], [1.0 / len(protos)])
    inits.append(k)
    for name, parts in outs.items():
        nodes.append(helper.make_node("Sum", parts, [f"ensemble/{name}_sum"], name=f"ensemble/{name}_sum"))
        nodes.append(helper.make_node("Mul", [f"ensemble/{name}_sum", k.name], [name], name=f"ensemble/{name}"))
    first = protos[0].graph
    graph = helper.make_graph(nodes, "anomalyd-ensemble", list(first.input), list(first.output), inits)
    model = helper.make_model(graph, opset_imports=list(protos[0].opset_import))
    model.ir_version = protos[0].ir_version
    model.producer_name = "anomalyd-train"
    return model


@dataclass
class DaemonRows:
    """The columns of `anomalyd score`'s output that reports read, one entry per input row."""

    anomaly_score: np.ndarray  # calibrated, in [0, 1]
    score: np.ndarray  # the reconstruction error (0 while a sequence window is still filling)
    is_anomaly: np.ndarray  # above the adaptive threshold
    firing: np.ndarray  # the row opened an alert episode
    resolved: np.ndarray  # the row closed one
    threshold: np.ndarray | None = None  # the key's threshold on the row (NaN while warming)
    promoted: list[int] = field(default_factory=list)  # the first row of each promoted model


def report(mode: str, d: DaemonRows, escalate: float = 2.0, repeat_discount: float = 0.0,
           key_rank: float = 0.0) -> np.ndarray:
    """A row's NAB anomaly score from the daemon's columns (see REPORTS); causal: a row's value
    depends on that row and the rows before it only."""
    if mode == "score":
        return d.anomaly_score
    if mode == "firing":
        return np.where(d.firing, d.anomaly_score, 0.0)
    if mode == "novelty":
        before = np.maximum.accumulate(np.r_[0.0, d.score[:-1]])  # largest score of the earlier rows
        x = d.score / np.maximum(before, 1e-300)
        return np.where(d.firing, x / (1.0 + x), 0.0)
    if mode in ("rarity", "escalation"):
        return _rarity(d, escalate if mode == "escalation" else math.inf, repeat_discount, key_rank)
    raise ns.NabError(f"unknown report mode {mode!r}")


def _rarity(d: DaemonRows, escalate: float, repeat_discount: float = 0.0, key_rank: float = 0.0) -> np.ndarray:
    """x = score / (99th percentile of the scores of every earlier row), reported as x / (1 + x)
    on firing rows and, inside the episode, on anomalous rows where x has grown `escalate`-fold
    over the largest x reported in it so far. In the key's k-th episode the reported x is
    divided by 1 + `repeat_discount` * (k - 1), and multiplied by ((s + 1) / k) ** `key_rank`,
    where s of the key's k - 1 earlier episodes opened with a smaller x (an escalation compares
    with every episode opened so far, its own included).

    Why the discount: the threshold's tail calls a fixed share of scores rare whatever the key's
    history, but a key that has alerted many times is noisier than that tail says (unlabelled
    bursts, a regime the model never saw), and an operator reads its next alert with less
    urgency. The rank of an alert among all keys' alerts, which is what NAB's corpus threshold
    reads, should say the same.

    Why the rank among the key's own alerts: within most files the labelled alerts are the
    largest the key has raised so far, but one key's x does not mean what another's does (their
    tails differ). A key's first alert and each new largest keep their x; an alert smaller than
    most of the key's earlier ones ranks lower, as an operator who has seen that key raise bigger
    ones would read it.

    Why rescale at a promotion: a promoted model's errors are on its own scale (a model trained
    on more data usually reconstructs better), so the earlier rows' scores, another model's, are
    multiplied by the ratio of the key's threshold after the swap to the one before (each
    model's calibrated tail, at the same point of the stream). Without it a better model's
    first alerts would look small against the old model's errors, and a worse one's large.

    Why re-report: an episode fires on its first few anomalous rows, often on the shoulder of what
    becomes a much larger anomaly (a spike after a small bump, a level shift that never resolves,
    so later anomalies happen inside it). An operator would want to hear that it has grown; NAB
    credits the detection inside a labelled window, and the report of a firing row alone cannot
    show it when the episode opened before the window.
    """
    out = np.zeros(len(d.score))
    past: list[float] = []  # every earlier score, sorted
    in_episode, best, episodes = False, 0.0, 0
    opened: list[float] = []  # the x of each earlier episode's firing row, sorted

    def reported(x: float) -> float:
        """x ranked and discounted against the key's earlier episodes, as x / (1 + x)."""
        x *= ((bisect.bisect_left(opened, x) + 1) / (len(opened) + 1)) ** key_rank
        x /= 1.0 + repeat_discount * (episodes - 1)
        return x / (1.0 + x)

    promoted = set(d.promoted) if d.threshold is not None else set()
    for i, s in enumerate(d.score):
        if i in promoted and past:
            ratio = d.threshold[i] / d.threshold[i - 1]
            if math.isfinite(ratio) and ratio > 0:
                past = [p * ratio for p in past]
        if past:
            q = past[min(int(RARITY_QUANTILE * len(past)), len(past) - 1)]
            x = s / max(q, 1e-300)
            if d.firing[i]:
                in_episode, best, episodes = True, x, episodes + 1
                out[i] = reported(x)
                bisect.insort(opened, x)
            elif in_episode and d.is_anomaly[i] and x >= escalate * best:
                best = x
                out[i] = reported(x)
        if d.resolved[i]:
            in_episode = False
        if s > 0:  # rows still filling a sequence window have no score
            bisect.insort(past, s)
    return out


def _run_one(args):
    opts, name, binary, windows = args
    import torch

    torch.set_num_threads(1)
    return run_file(opts, name, binary, windows)


# ---------------------------------------------------------------------------------------------
# The corpus


@dataclass
class NabRun:
    results: dict[str, ns.ProfileResult]
    outcomes: list[FileOutcome]
    seconds: float


def run(opts: NabOptions, log=print) -> NabRun:
    validate(opts)
    binary = find_anomalyd(opts.anomalyd)
    windows = ns.load_windows(opts.nab_dir)
    files = opts.files if opts.files else ns.data_files(opts.nab_dir)
    for f in files:
        if f not in windows:
            raise ns.NabError(f"{f} is not a labelled file of {opts.nab_dir} (e.g. realKnownCause/nyc_taxi.csv)")
        if not (Path(opts.nab_dir) / "data" / f).is_file():
            raise ns.NabError(f"{Path(opts.nab_dir) / 'data' / f} does not exist")
    Path(opts.out).mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    tasks = [(opts, f, binary, windows[f]) for f in files]
    outcomes: list[FileOutcome] = []
    if opts.jobs == 1:
        for i, t in enumerate(tasks, 1):
            outcomes.append(_run_one(t))
            _progress(log, opts, i, len(tasks), outcomes[-1])
    else:
        with ProcessPoolExecutor(max_workers=opts.jobs) as pool:
            for i, o in enumerate(pool.map(_run_one, tasks), 1):
                outcomes.append(o)
                _progress(log, opts, i, len(tasks), o)
    rows, scores = ns.load_results(opts.nab_dir, opts.out, opts.name, files)
    results = ns.score_corpus(rows, scores, ns.load_profiles(opts.nab_dir))
    seconds = time.perf_counter() - started
    (Path(opts.out) / opts.name / f"{opts.name}_scores.json").write_text(json.dumps({
        "options": {k: v for k, v in asdict(opts).items() if k not in ("quiet",)},
        "seconds": seconds,
        "profiles": {p: {k: v for k, v in asdict(r).items() if k != "per_file"} for p, r in results.items()},
        "per_file_standard": results["standard"].per_file if "standard" in results else {},
    }, indent=1, default=str))
    return NabRun(results=results, outcomes=outcomes, seconds=seconds)


def _progress(log, opts: NabOptions, i: int, total: int, o: FileOutcome) -> None:
    if not opts.quiet:
        log(f"[{i}/{total}] {o.name}: {o.rows} rows ({o.probation} probationary), trained in "
            f"{o.train_seconds:.1f} s, scored in {o.score_seconds:.1f} s, {o.alerts} alerts", flush=True)


def print_summary(r: NabRun, opts: NabOptions, log=print) -> None:
    train = sum(o.train_seconds for o in r.outcomes)
    score = sum(o.score_seconds for o in r.outcomes)
    learning = (f"; retrained models promoted {sum(o.promoted for o in r.outcomes)}, refused "
                f"{sum(o.refused for o in r.outcomes)}") if opts.retrain_every else ""
    log(f"{opts.name}: {len(r.outcomes)} files, {r.seconds:.1f} s wall ({opts.jobs} jobs; training "
        f"{train:.1f} s, anomalyd score {score:.1f} s in total{learning})")
    for p, res in r.results.items():
        log(f"  {p:20s} {res.normalised:6.2f}  threshold {res.threshold:.6g}, windows hit {res.tp}/"
            f"{res.tp + res.fn}, false positive rows {res.fp}")
    log(ns.summary_line(r.results))


# ---------------------------------------------------------------------------------------------
# The plot


def plot_file(out: str, detector: str, name: str, nab_dir: str, png: str, title: str | None = None) -> str:
    """One file of a finished run: the value with the rows the report marked (episode opened,
    escalated), the daemon's score and adaptive threshold (log scale), and the NAB anomaly score
    with the corpus threshold of the standard profile when the run's summary has it; the labelled
    windows shaded, the probation in grey."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    work = Path(out) / ".work" / detector / name.replace(".csv", "")
    result = ns.result_path(out, detector, name)
    if not result.is_file() or not (work / "scores.csv").is_file():
        raise ns.NabError(f"no finished run of {name} for detector {detector} under {out} "
                          f"({result} and {work / 'scores.csv'} are needed)")
    res = ns.read_columns(result, ["timestamp", "value", "anomaly_score"])
    sc = ns.read_columns(work / "scores.csv", ["score", "threshold", "event"])
    stamps = ns.parse_times(res["timestamp"])
    times = stamps.astype("datetime64[s]").astype(object)
    value = np.array([float(v) for v in res["value"]])
    nab = np.array([float(v) for v in res["anomaly_score"]])
    score = np.array([float(v) if v else np.nan for v in sc["score"]])
    thr = np.array([float(v) if v else np.nan for v in sc["threshold"]])
    fired = np.array([e == "firing" for e in sc["event"]])
    escalated = (nab > 0) & ~fired
    rows = ns.file_rows(name, stamps, ns.load_windows(nab_dir)[name])
    corpus_threshold = None
    summary = Path(out) / detector / f"{detector}_scores.json"
    if summary.is_file():
        corpus_threshold = json.loads(summary.read_text())["profiles"].get("standard", {}).get("threshold")

    fig, axes = plt.subplots(3, 1, figsize=(13, 7.5), sharex=True, height_ratios=[2.2, 1.6, 1])
    for ax in axes:
        for left, right in rows.windows:
            ax.axvspan(times[left], times[right], color="tab:red", alpha=0.15, lw=0)
        ax.axvspan(times[0], times[max(rows.probation - 1, 0)], color="0.85", alpha=0.5, lw=0)
    axes[0].plot(times, value, lw=0.6, color="tab:blue")
    axes[0].plot(times[fired], value[fired], "v", color="tab:red", ms=6, label="episode fired")
    if escalated.any():
        axes[0].plot(times[escalated], value[escalated], "^", color="tab:orange", ms=6, label="episode escalated")
    axes[0].set_ylabel("value")
    axes[0].legend(loc="upper left", fontsize=8)
    axes[1].semilogy(times, score, lw=0.5, color="tab:purple", label="score (reconstruction error)")
    axes[1].semilogy(times, thr, lw=1.0, color="tab:orange", label="threshold (adaptive, SPOT)")
    axes[1].set_ylabel("score")
    axes[1].legend(loc="upper left", fontsize=8)
    axes[2].vlines(times[nab > 0], 0, nab[nab > 0], lw=1.2, color="tab:green")
    if corpus_threshold is not None and math.isfinite(corpus_threshold):
        axes[2].axhline(corpus_threshold, lw=0.8, ls="--", color="0.3",
                        label=f"corpus threshold (standard) {corpus_threshold:.3f}")
        axes[2].legend(loc="upper left", fontsize=8)
    axes[2].set_ylabel("NAB anomaly\nscore")
    axes[2].set_ylim(-0.05, 1.05)
    fig.suptitle(title or f"{name} ({detector}); shaded: labelled anomaly windows (red), probation (grey)",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(png, dpi=90)
    plt.close(fig)
    return png
