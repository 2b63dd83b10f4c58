"""The Numenta Anomaly Benchmark's scorer, written from the rules in NAB's documentation
(`../shared/nab/SCORING.md` beside the repository; the public NAB repository has the same layout).

Per file, every row gets a weight `w` from its position relative to the labelled anomaly windows
(a scaled sigmoid: early detections inside a window earn up to `tpWeight`, a false positive costs
up to `fpWeight`, less right after a window). For a threshold `t`, the rows scoring `>= t` are
detections; a window scores the largest `w` among its detected rows, or `-fnWeight` when none was
detected; detected rows outside windows add their (negative) `w`. The first
`min(floor(0.15 n), 0.15 * 5000)` rows of each file are probationary and count for nothing.

One threshold per profile is chosen for the whole corpus by sweeping every distinct score (all
rows with the same score switch together) and keeping the best corpus score, which is normalised
to 100 * (raw - null) / (perfect - null), with `null` = -windows * fnWeight (never detect) and
`perfect` = windows * tpWeight.

The sweep is vectorised: all rows of all files are sorted once, by descending score; the
false-positive part of the corpus score is a cumulative sum, and each window's part changes only
where a detected row beats the window's best so far, so it is a cumulative sum of those changes.
The 58-file corpus (365k rows) is swept for three profiles in about a second.
"""

from __future__ import annotations

import csv
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

PROFILES = {
    "standard": {"tpWeight": 1.0, "fpWeight": 0.11, "fnWeight": 1.0},
    "reward_low_FP_rate": {"tpWeight": 1.0, "fpWeight": 0.22, "fnWeight": 1.0},
    "reward_low_FN_rate": {"tpWeight": 1.0, "fpWeight": 0.11, "fnWeight": 2.0},
}
# Short names, in the order the summary line prints them.
PROFILE_SHORT = {"standard": "standard", "reward_low_FP_rate": "low_fp", "reward_low_FN_rate": "low_fn"}
PROBATION_PERCENT = 0.15


class NabError(Exception):
    """A problem with the benchmark's files or a detector's results, as one sentence."""


def scaled_sigmoid(x):
    """NAB's scaled sigmoid: 2 / (1 + e^{5x}) - 1, from ~0.987 at x = -1 through 0 at 0 to -1;
    exactly -1 beyond x = 3."""
    x = np.asarray(x, dtype=np.float64)
    with np.errstate(over="ignore"):
        v = 2.0 / (1.0 + np.exp(5.0 * x)) - 1.0
    return np.where(x > 3.0, -1.0, v)


def probation_rows(n: int) -> int:
    """Rows of a file in its probationary (learning) period."""
    return int(min(math.floor(PROBATION_PERCENT * n), PROBATION_PERCENT * 5000))


def parse_times(texts) -> np.ndarray:
    """Timestamps (`2014-07-01 00:00:00`, optionally with fractional seconds) as datetime64[us]."""
    try:
        return np.array([t.strip().replace(" ", "T") for t in texts], dtype="datetime64[us]")
    except ValueError as e:
        raise NabError(f"unreadable timestamp: {e}") from None


def load_profiles(nab_dir: str | os.PathLike | None = None) -> dict[str, dict[str, float]]:
    """The profiles of `config/profiles.json` when present, else NAB's published ones."""
    if nab_dir is not None:
        path = Path(nab_dir) / "config" / "profiles.json"
        if path.is_file():
            raw = json.loads(path.read_text())
            return {name: {k: float(v) for k, v in p["CostMatrix"].items()} for name, p in raw.items()
                    if name in PROFILES}
    return {k: dict(v) for k, v in PROFILES.items()}


def load_windows(nab_dir: str | os.PathLike) -> dict[str, list[tuple[str, str]]]:
    """`labels/combined_windows.json`: `<category>/<file>.csv` -> [(start, end), ...]."""
    path = Path(nab_dir) / "labels" / "combined_windows.json"
    if not path.is_file():
        raise NabError(f"{path} does not exist: --nab-dir must be a NAB checkout (data/, labels/)")
    return {k: [(a, b) for a, b in v] for k, v in json.loads(path.read_text()).items()}


def data_files(nab_dir: str | os.PathLike) -> list[str]:
    """The corpus files, `<category>/<file>.csv`, in sorted order (those with labels)."""
    windows = load_windows(nab_dir)
    missing = [f for f in windows if not (Path(nab_dir) / "data" / f).is_file()]
    if missing:
        raise NabError(f"{len(missing)} labelled files are missing under {Path(nab_dir) / 'data'}, e.g. {missing[0]}")
    return sorted(windows)


def read_columns(path: str | os.PathLike, columns: list[str]) -> dict[str, list[str]]:
    """The named columns of a CSV file with a header line, as text."""
    with open(path, newline="") as f:
        reader = csv.reader(f)
        try:
            header = [h.strip() for h in next(reader)]
        except StopIteration:
            raise NabError(f"{path} is empty") from None
        idx = {}
        for c in columns:
            if c not in header:
                raise NabError(f"{path}: no column {c!r} (columns: {', '.join(header)})")
            idx[c] = header.index(c)
        out: dict[str, list[str]] = {c: [] for c in columns}
        for line, row in enumerate(reader, start=2):
            if not row:
                continue
            if len(row) != len(header):
                raise NabError(f"{path}:{line}: {len(row)} fields, the header has {len(header)}")
            for c, i in idx.items():
                out[c].append(row[i])
    return out


@dataclass
class FileRows:
    """One file's rows as the scorer sees them (independent of any detector)."""

    name: str  # <category>/<file>.csv
    times: np.ndarray  # datetime64[us]
    window: np.ndarray  # int: index of the window a row is in (within the file), -1 outside
    # The unweighted score of a row: inside a window scaled(p)/scaled(-1), outside -1 before the
    # first window or scaled(distance past the previous window) after one.
    unweighted: np.ndarray
    probation: int
    n_windows: int
    windows: list[tuple[int, int]] = field(default_factory=list)  # (left, right) row indices

    def weights(self, profile: dict[str, float]) -> np.ndarray:
        inside = self.window >= 0
        return np.where(inside, self.unweighted * profile["tpWeight"], self.unweighted * profile["fpWeight"])


def _row_of(times: np.ndarray, t: np.datetime64, name: str, text: str) -> int:
    hit = np.flatnonzero(times == t)
    if len(hit) == 0:
        raise NabError(f"{name}: the window edge {text} is not the timestamp of any row")
    return int(hit[0])


def file_rows(name: str, times: np.ndarray, windows: list[tuple[str, str]]) -> FileRows:
    """Each row's window and unweighted score, following NAB's sweeper row by row."""
    n = len(times)
    win = np.full(n, -1, dtype=np.int64)
    unweighted = np.empty(n, dtype=np.float64)
    bounds = []
    idx = np.arange(n)
    for a, b in windows:
        ta, tb = parse_times([a, b])
        # NAB enters a window at the row whose timestamp equals its start and ends it at the
        # first row equal to its end (a few files repeat or step back a timestamp, so the rows
        # are not searched as if sorted).
        left, right = _row_of(times, ta, name, a), _row_of(times, tb, name, b)
        if left > right:
            raise NabError(f"{name}: window {a} .. {b} holds no row")
        bounds.append((left, right))
    bounds.sort()
    for (l1, r1), (l2, _) in zip(bounds, bounds[1:]):
        if l2 <= r1:
            raise NabError(f"{name}: anomaly windows overlap")
    # Before the first window: -1.
    first = bounds[0][0] if bounds else n
    unweighted[:first] = -1.0
    s1 = scaled_sigmoid(-1.0)
    for k, (left, right) in enumerate(bounds):
        width = right - left + 1
        i = idx[left:right + 1]
        win[left:right + 1] = k
        unweighted[left:right + 1] = scaled_sigmoid(-(right - i + 1) / width) / s1
        nxt = bounds[k + 1][0] if k + 1 < len(bounds) else n
        j = idx[right + 1:nxt]
        if len(j):
            # NAB divides by (width - 1); a one-row window would divide by zero there.
            denom = max(width - 1, 1)
            unweighted[right + 1:nxt] = scaled_sigmoid(np.abs(right - j) / denom)
    return FileRows(name=name, times=times, window=win, unweighted=unweighted,
                    probation=probation_rows(n), n_windows=len(bounds), windows=bounds)


def corpus_rows(nab_dir: str | os.PathLike, files: list[str] | None = None) -> list[FileRows]:
    """The scorer's view of every corpus file (or of `files`)."""
    windows = load_windows(nab_dir)
    out = []
    for name in files if files is not None else data_files(nab_dir):
        if name not in windows:
            raise NabError(f"{name} has no entry in labels/combined_windows.json")
        cols = read_columns(Path(nab_dir) / "data" / name, ["timestamp"])
        out.append(file_rows(name, parse_times(cols["timestamp"]), windows[name]))
    return out


@dataclass
class ProfileResult:
    profile: str
    threshold: float
    raw: float
    null: float
    perfect: float
    normalised: float
    tp: int  # windows detected
    fn: int  # windows missed
    fp: int  # detected rows outside windows
    per_file: dict[str, float]  # raw score of each file at the threshold


def sweep(rows: list[FileRows], scores: list[np.ndarray], profile_name: str,
          profile: dict[str, float]) -> ProfileResult:
    """Optimises the threshold over the corpus for one profile and scores at it."""
    tp_w, fp_w, fn_w = profile["tpWeight"], profile["fpWeight"], profile["fnWeight"]
    all_scores, all_w, all_win, file_of = [], [], [], []
    offset = 0
    n_windows = 0
    for k, (fr, sc) in enumerate(zip(rows, scores)):
        sc = np.asarray(sc, dtype=np.float64)
        if len(sc) != len(fr.times):
            raise NabError(f"{fr.name}: {len(sc)} scores for {len(fr.times)} rows")
        if not np.all(np.isfinite(sc)):
            raise NabError(f"{fr.name}: an anomaly score is not a finite number")
        keep = np.arange(len(sc)) >= fr.probation
        w = fr.weights(profile)
        win = np.where(fr.window >= 0, fr.window + offset, -1)
        all_scores.append(sc[keep])
        all_w.append(w[keep])
        all_win.append(win[keep])
        file_of.append(np.full(int(keep.sum()), k))
        offset += fr.n_windows
        n_windows += fr.n_windows
    s = np.concatenate(all_scores)
    w = np.concatenate(all_w)
    win = np.concatenate(all_win)
    fidx = np.concatenate(file_of)
    order = np.argsort(-s, kind="stable")
    s, w, win, fidx = s[order], w[order], win[order], fidx[order]
    outside = win < 0
    delta = np.where(outside, w, 0.0)
    # Per window: running maximum of w over its detected rows (in score order), starting from
    # -fn; the change of the window's contribution at each row.
    inside_pos = np.flatnonzero(~outside)
    if len(inside_pos):
        wid = win[inside_pos]
        grp = np.argsort(wid, kind="stable")  # keeps score order within each window
        pos, wids, ws = inside_pos[grp], wid[grp], w[inside_pos][grp]
        starts = np.flatnonzero(np.r_[True, wids[1:] != wids[:-1]])
        ends = np.r_[starts[1:], len(wids)]
        for a, b in zip(starts, ends):
            run = np.maximum.accumulate(np.maximum(ws[a:b], -fn_w))
            prev = np.r_[-fn_w, run[:-1]]
            delta[pos[a:b]] = run - prev
    base = -fn_w * n_windows
    total = base + np.cumsum(delta)
    # Ties switch together: a threshold is only evaluated after the last row of its score.
    last_of_tie = np.flatnonzero(np.r_[s[1:] != s[:-1], True]) if len(s) else np.array([], dtype=int)
    if len(last_of_tie):
        best_at = last_of_tie[int(np.argmax(total[last_of_tie]))]
        best_raw = float(total[best_at])
        if best_raw < base:  # never detecting beats every threshold
            threshold, best_raw, cut = math.inf, base, -1
        else:
            threshold, cut = float(s[best_at]), best_at
    else:
        threshold, best_raw, cut = math.inf, base, -1

    detected = np.zeros(len(s), dtype=bool)
    detected[:cut + 1] = True
    fp = int(np.sum(detected & outside))
    hit_windows = np.unique(win[detected & ~outside])
    per_file = {}
    for k, fr in enumerate(rows):
        m = fidx == k
        part = float(np.sum(w[m & detected & outside]))
        lo = sum(r.n_windows for r in rows[:k])
        for j in range(fr.n_windows):
            g = lo + j
            sel = m & detected & (win == g)
            part += float(w[sel].max()) if np.any(sel) else -fn_w
        per_file[fr.name] = part
    null = -fn_w * n_windows
    perfect = tp_w * n_windows
    normalised = 100.0 * (best_raw - null) / (perfect - null) if perfect != null else 0.0
    return ProfileResult(profile=profile_name, threshold=threshold, raw=best_raw, null=null, perfect=perfect,
                         normalised=normalised, tp=int(len(hit_windows)), fn=int(n_windows - len(hit_windows)),
                         fp=fp, per_file=per_file)


def score_corpus(rows: list[FileRows], scores: list[np.ndarray],
                 profiles: dict[str, dict[str, float]] | None = None) -> dict[str, ProfileResult]:
    """Every profile's optimised, normalised score."""
    profiles = profiles or PROFILES
    return {name: sweep(rows, scores, name, p) for name, p in profiles.items()}


def result_path(results_dir: str | os.PathLike, detector: str, name: str) -> Path:
    """`<results>/<detector>/<category>/<detector>_<file>.csv` for `<category>/<file>.csv`."""
    category, base = name.split("/", 1)
    return Path(results_dir) / detector / category / f"{detector}_{base}"


def load_results(nab_dir: str | os.PathLike, results_dir: str | os.PathLike, detector: str,
                 files: list[str] | None = None) -> tuple[list[FileRows], list[np.ndarray]]:
    """Reads a detector's result files in NAB's layout. Like NAB, the rows are scored in the
    result file's own order (a detector may have sorted a file whose timestamps step back, as
    randomCutForest did with machine_temperature_system_failure); its timestamps must be the
    data file's, as a multiset."""
    windows = load_windows(nab_dir)
    names = files if files is not None else data_files(nab_dir)
    rows, scores = [], []
    for name in names:
        if name not in windows:
            raise NabError(f"{name} has no entry in labels/combined_windows.json")
        path = result_path(results_dir, detector, name)
        if not path.is_file():
            raise NabError(f"missing result file {path}")
        cols = read_columns(path, ["timestamp", "anomaly_score"])
        times = parse_times(cols["timestamp"])
        data_times = parse_times(read_columns(Path(nab_dir) / "data" / name, ["timestamp"])["timestamp"])
        if len(times) != len(data_times) or np.any(np.sort(times) != np.sort(data_times)):
            raise NabError(f"{path}: its timestamps are not those of data/{name}")
        try:
            sc = np.array([float(v) for v in cols["anomaly_score"]], dtype=np.float64)
        except ValueError as e:
            raise NabError(f"{path}: anomaly_score is not a number ({e})") from None
        rows.append(file_rows(name, times, windows[name]))
        scores.append(sc)
    return rows, scores


def score_detector(nab_dir: str | os.PathLike, results_dir: str | os.PathLike, detector: str,
                   files: list[str] | None = None) -> dict[str, ProfileResult]:
    """Scores a detector's results (NAB layout) with the profiles of `nab_dir`."""
    rows, scores = load_results(nab_dir, results_dir, detector, files)
    return score_corpus(rows, scores, load_profiles(nab_dir))


def summary_line(results: dict[str, ProfileResult]) -> str:
    """`NAB standard=S low_fp=S low_fn=S`."""
    parts = [f"{PROFILE_SHORT[p]}={results[p].normalised:.2f}" for p in PROFILE_SHORT if p in results]
    return "NAB " + " ".join(parts)
