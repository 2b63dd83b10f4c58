"""Training data: load a CSV or NDJSON file, pick the features, group rows by entity key, cut
windows of T rows, and split them into training and validation sets.

Rows of one entity are taken in file order (the order the daemon would see them). Windows never
cross entities. For sequence models the validation split is made of contiguous blocks of rows, so
that overlapping windows do not leak the same rows into both sets and calibration stays honest.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
from dataclasses import dataclass

import numpy as np


class DataError(Exception):
    """A problem with the user's data or arguments, reported as one clear sentence."""


@dataclass
class Table:
    path: str
    features: list[str]
    # [N, F] for tabular data, [N, C, H, W] for image-shaped data.
    values: np.ndarray
    # The entity key of each row, or None when no key column was given.
    keys: list[str] | None
    sha256: str

    @property
    def rows(self) -> int:
        return int(self.values.shape[0])


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _number(value, path: str, where: str, column: str) -> float:
    if isinstance(value, bool) or value is None or value == "":
        raise DataError(f"{path}:{where}: column {column!r} is empty or not a number: {value!r}")
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise DataError(f"{path}:{where}: column {column!r} is not a number: {value!r}") from None
    if not math.isfinite(x):
        raise DataError(f"{path}:{where}: column {column!r} is not finite: {value!r}")
    return x


def _image(value, path: str, where: str, column: str, hw: tuple[int, int]) -> np.ndarray:
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise DataError(f"{path}:{where}: field {column!r} is not an array of numbers") from None
    if arr.size != hw[0] * hw[1] or arr.ndim not in (1, 2):
        raise DataError(
            f"{path}:{where}: field {column!r} has {arr.size} values in shape {list(arr.shape)}, "
            f"expected {hw[0]}x{hw[1]} = {hw[0] * hw[1]} (flat or nested)"
        )
    if not np.all(np.isfinite(arr)):
        raise DataError(f"{path}:{where}: field {column!r} holds a non-finite value")
    return arr.reshape(hw)


def _missing(path: str, what: str, name: str, present: list[str]) -> DataError:
    shown = ", ".join(present[:30]) + (" ..." if len(present) > 30 else "")
    return DataError(f"{what} {name!r} is not a column of {path} (columns: {shown})")


def load(
    path: str,
    features: list[str],
    key: str | None = None,
    shape: tuple[int, int, int] | None = None,
) -> Table:
    """Reads `features` (and `key`) from a .csv or .ndjson/.jsonl file.

    With `shape` = (C, H, W) the data is image-shaped: `features` names C fields, each holding an
    H x W array (nested or flat) per record; only NDJSON can carry those.
    """
    if not features:
        raise DataError("no features given (--features a,b,c)")
    if len(set(features)) != len(features):
        raise DataError(f"--features names a column twice: {','.join(features)}")
    if not os.path.isfile(path):
        raise DataError(f"data file {path} does not exist")
    if shape is not None and len(features) != shape[0]:
        raise DataError(
            f"--shape {','.join(map(str, shape))} has {shape[0]} channel(s) but --features names "
            f"{len(features)}: one feature (an H x W array field) per channel"
        )
    lower = path.lower()
    if lower.endswith(".csv"):
        if shape is not None:
            raise DataError(f"{path}: image-shaped data (--shape) must be NDJSON with array fields")
        values, keys = _load_csv(path, features, key)
    elif lower.endswith((".ndjson", ".jsonl", ".json")):
        values, keys = _load_ndjson(path, features, key, shape)
    else:
        raise DataError(f"{path}: unknown data format; use .csv or .ndjson")
    if values.shape[0] == 0:
        raise DataError(f"{path} holds no data rows")
    return Table(path=path, features=list(features), values=values, keys=keys, sha256=file_sha256(path))


DELIMITERS = ",;\t|"


def delimiter(header: str) -> str:
    """The delimiter of a CSV file, from its header line: the most frequent of , ; tab |
    (a comma when none occurs, as in a one-column file)."""
    counts = {d: header.count(d) for d in DELIMITERS}
    best = max(DELIMITERS, key=lambda d: counts[d])
    return best if counts[best] > 0 else ","


def _delimiter_name(d: str) -> str:
    return {",": "comma", ";": "semicolon", "\t": "tab", "|": "pipe"}[d]


def _load_csv(path: str, features: list[str], key: str | None):
    with open(path, newline="") as f:
        first = f.readline()
        if not first.strip():
            raise DataError(f"{path} is empty (expected a header line)")
        sep = delimiter(first)
        f.seek(0)
        reader = csv.reader(f, delimiter=sep)
        header = [h.strip() for h in next(reader)]
        index = {name: i for i, name in enumerate(header)}
        seen = f"{path}, read as {_delimiter_name(sep)}-separated"
        for name in features:
            if name not in index:
                raise _missing(seen, "feature", name, header)
        if key is not None and key not in index:
            raise _missing(seen, "key", key, header)
        cols = [index[name] for name in features]
        kcol = index[key] if key is not None else None
        rows, keys = [], []
        for line, record in enumerate(reader, start=2):
            if not record or (len(record) == 1 and not record[0].strip()):
                continue
            if len(record) != len(header):
                raise DataError(f"{path}:{line}: {len(record)} fields, the header has {len(header)} ({_delimiter_name(sep)}-separated)")
            rows.append([_number(record[c], path, str(line), features[j]) for j, c in enumerate(cols)])
            if kcol is not None:
                keys.append(record[kcol])
    values = np.asarray(rows, dtype=np.float64).reshape(len(rows), len(features))
    return values, (keys if key is not None else None)


def _load_ndjson(path: str, features: list[str], key: str | None, shape):
    rows, keys = [], []
    with open(path) as f:
        for line, text in enumerate(f, start=1):
            if not text.strip():
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{line}: not valid JSON ({e.msg})") from None
            if not isinstance(obj, dict):
                raise DataError(f"{path}:{line}: a record must be a JSON object")
            for name in features:
                if name not in obj:
                    raise _missing(path, "feature", name, list(obj.keys()))
            if key is not None:
                if key not in obj:
                    raise _missing(path, "key", key, list(obj.keys()))
                keys.append(str(obj[key]))
            if shape is None:
                rows.append([_number(obj[n], path, str(line), n) for n in features])
            else:
                rows.append([_image(obj[n], path, str(line), n, shape[1:]) for n in features])
    if shape is None:
        values = np.asarray(rows, dtype=np.float64).reshape(len(rows), len(features))
    else:
        values = np.asarray(rows, dtype=np.float64).reshape(len(rows), *shape)
    return values, (keys if key is not None else None)


def series(table: Table) -> list[np.ndarray]:
    """The table's rows grouped into one series per entity key (file order within an entity)."""
    if table.keys is None:
        return [table.values]
    groups: dict[str, list[int]] = {}
    for i, k in enumerate(table.keys):
        groups.setdefault(k, []).append(i)
    return [table.values[idx] for idx in groups.values()]


def block_length(window: int) -> int:
    """Rows per validation block: single rows for point models, several windows' worth otherwise."""
    return 1 if window == 1 else max(8 * window, 64)


def windows(s: np.ndarray, window: int) -> np.ndarray:
    """All windows of `window` consecutive rows of one series (stride 1): [n, window, F], or
    [n, C, H, W] for image rows (window 1)."""
    if window == 1:
        return s[:, None] if s.ndim == 2 else s
    w = np.lib.stride_tricks.sliding_window_view(s, window, axis=0)  # [n-T+1, F, T]
    return np.moveaxis(w, -1, 1)  # [n-T+1, T, F]


def split_windows(
    parts: list[np.ndarray], window: int, val_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Cuts every series into sliding windows of `window` rows (stride 1) and splits them.

    Each series is cut into blocks of `block_length(window)` rows; a seeded draw sends each block
    to validation with probability `val_fraction`. A window belongs to a set when all its rows do;
    windows straddling a training and a validation block are dropped. When that leaves either
    side without windows (short data: a block as long as the series), each series long enough
    is split once instead: its last `val_fraction` of rows (at least a window, at most all but
    window + 1 rows) for validation. So whenever one entity has 2 x window + 1 rows, both sides
    get windows.
    Returns (train, val), each [n, window, F] (or [n, C, H, W] for image data with window 1).
    """
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"--val-fraction must be between 0 and 1, got {val_fraction}")
    longest = max((len(s) for s in parts), default=0)
    if longest < 2 * window + 1:
        most = (longest - 1) // 2
        hint = f"give a --window of at most {most}" if most >= 1 else "give more rows"
        raise DataError(
            f"too little data for a window of {window} rows: the longest entity has {longest} rows, "
            f"and one needs at least {2 * window + 1} (two training windows and one validation "
            f"window); {hint}, or more rows"
        )
    tr, va = _random_blocks(parts, window, val_fraction, seed)
    if len(tr) < 2 or len(va) < 1:
        tr, va = _tail_split(parts, window, val_fraction)
    return tr, va


def _stack(windows: list[np.ndarray]) -> np.ndarray:
    return np.ascontiguousarray(np.concatenate(windows), dtype=np.float32)


def _random_blocks(parts, window, val_fraction, seed):
    rng = np.random.default_rng(seed)
    blen = block_length(window)
    train, val = [], []
    assignments = []
    for s in parts:
        nblocks = math.ceil(len(s) / blen)
        assignments.append(rng.random(nblocks) < val_fraction)
    flat = np.concatenate(assignments) if assignments else np.zeros(0, bool)
    if flat.size >= 2 and not flat.any():
        assignments[int(rng.integers(len(assignments)))][0] = True
    if flat.size >= 2 and flat.all():
        assignments[int(rng.integers(len(assignments)))][0] = False
    for s, is_val_block in zip(parts, assignments):
        if len(s) < window:
            continue
        is_val = np.repeat(is_val_block, blen)[: len(s)]
        if window == 1:
            mask_val, mask_train = is_val, ~is_val
        else:
            flags = np.lib.stride_tricks.sliding_window_view(is_val, window)
            mask_val, mask_train = flags.all(axis=1), (~flags).all(axis=1)
        w = windows(s, window)
        train.append(w[mask_train])
        val.append(w[mask_val])
    return _stack(train), _stack(val)


def _tail_split(parts, window, val_fraction):
    train, val = [], []
    for s in parts:
        n = len(s)
        if n < window:
            continue
        if n < 2 * window + 1:
            train.append(windows(s, window))
            continue
        n_val = min(max(window, round(n * val_fraction)), n - window - 1)
        train.append(windows(s[: n - n_val], window))
        val.append(windows(s[n - n_val :], window))
    return _stack(train), _stack(val)


def folds(parts: list[np.ndarray], window: int, k: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(train, held-out) splits for out-of-fold scores. Each series is cut into blocks (single rows
    for point models, `2 x window` rows for sequence models) dealt to `k` folds at random, so the
    held-out sets cover the data once. A window is held out when all its rows are in the fold's
    blocks and trained on when none is, so no row is both; windows straddling the two are left
    out of that split. Splits with no window on either side are left out.

    Blocks spread over the series, not `k` contiguous chunks: a model that has not seen a fifth of
    the series in one piece scores that piece as a regime it never saw (a series' start, a
    baseline still settling, a stretch of load the other chunks lack), which the serving model has
    trained on. Those scores set the calibration's tail, and the thresholds sat 2-4 times above
    every live normal score on some machines (drifting machines, conv: F1 0.788 with 5 contiguous
    chunks of which the first was never held out, 0.801 with blocks; the same serving models)."""
    rng = np.random.default_rng(seed)
    blen = 1 if window == 1 else 2 * window
    fold_of = [np.repeat(rng.permutation(np.arange(-(-len(s) // blen)) % k), blen)[: len(s)] for s in parts]
    out = []
    for f in range(k):
        train, held = [], []
        for s, where in zip(parts, fold_of):
            if len(s) < window:
                continue
            flags = np.lib.stride_tricks.sliding_window_view(where == f, window)
            w = windows(s, window)
            held.append(w[flags.all(axis=1)])
            train.append(w[(~flags).all(axis=1)])
        tr, he = _stack(train), _stack(held)
        if len(tr) >= 2 and len(he) >= 1:
            out.append((tr, he))
    return out


def normalisation(train: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-feature (per-channel for images) mean and standard deviation of the training windows.

    A constant feature gets std 1 so that the graph never divides by zero.
    """
    if train.ndim == 3:  # [n, T, F]
        axes = (0, 1)
    else:  # [n, C, H, W]
        axes = (0, 2, 3)
    mean = train.astype(np.float64).mean(axis=axes)
    std = train.astype(np.float64).std(axis=axes)
    std = np.where(std < 1e-8 * np.maximum(1.0, np.abs(mean)), 1.0, std)
    return mean.astype(np.float32), std.astype(np.float32)
